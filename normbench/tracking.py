"""Dashboards: wandb (offline unless asked otherwise) and TensorBoard (event files in the run directory's
``tensorboard/``), always beside the run's local files. Both take the same scalars at the same x-axis, the
global training step (``epoch * steps_per_epoch + step``): per-step curves every ``logger.every_steps`` steps
(``step/...``) and each epoch's row at the step that ends it (``epoch/...``). TensorBoard's HParams view gets
the run's identifying settings and its final errors, so ``tensorboard --logdir results_dir/EXPERIMENT`` shows a
paper table's runs as one table."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from normbench.config import leaves

log = logging.getLogger("normbench")


ONLINE_TIMEOUT_S = 15  # wandb's own default waits 90 s for an unreachable server, per run
_online_failed = False  # said once per process: later runs of a sweep go offline without waiting again


class Tracker:
    """One wandb run per training run, grouped by experiment; `finish()` is always called (use as a context
    manager). A wandb failure never stops training: the local files are the record. Online mode that cannot
    reach the server within ONLINE_TIMEOUT_S falls back to offline (sync later with `wandb sync`)."""

    def __init__(self, config: dict, run_dir, name: str, run_id: str, enabled: bool, resume_step: int = 0):
        self.tensorboard = None
        self.hparams = hparams_of(config)
        if enabled and config["logger"]["tensorboard"]:
            self.tensorboard = _tensorboard_writer(Path(run_dir) / "tensorboard", resume_step)
        self.run = self._wandb(config, run_dir, name, run_id, enabled)

    def _wandb(self, config: dict, run_dir, name: str, run_id: str, enabled: bool):
        global _online_failed
        mode = config["logger"]["wandb"]["mode"]
        if not enabled or mode == "disabled":
            return None
        if mode == "online" and _online_failed:
            mode = "offline"
        try:
            import wandb
        except Exception as err:  # noqa: BLE001
            log.warning("wandb disabled for this run (%s: %s)", type(err).__name__, err)
            return None
        kwargs = dict(
            project=config["logger"]["wandb"]["project"],
            group=config["experiment"],
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            job_type="train",
        )
        if mode == "online":
            try:
                return wandb.init(
                    mode="online",
                    settings=wandb.Settings(silent=True, console="off", init_timeout=ONLINE_TIMEOUT_S),
                    **kwargs,
                )
            except Exception as err:  # noqa: BLE001 -- no network, no key, server down: all mean "go offline"
                _online_failed = True
                try:
                    wandb.teardown()  # the failed online attempt still holds the run id
                except Exception:  # noqa: BLE001
                    pass
                log.warning(
                    "wandb online failed within %d s (%s); logging offline instead for this process: "
                    "sync later with `wandb sync %s/wandb/offline-run-*`",
                    ONLINE_TIMEOUT_S,
                    " ".join(str(err).split())[:160] or type(err).__name__,
                    run_dir,
                )
                mode = "offline"
        try:
            return wandb.init(mode=mode, settings=wandb.Settings(silent=True, console="off"), **kwargs)
        except Exception as err:  # noqa: BLE001
            log.warning("wandb disabled for this run (%s: %s)", type(err).__name__, err)
            return None

    def log(self, metrics: dict, step: int) -> None:
        """Scalars at the global training step (the same x-axis in both dashboards)."""
        if self.run is not None:
            self.run.log(metrics, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)

    def summary(self, values: dict) -> None:
        """The run's final numbers: wandb's summary; TensorBoard's HParams row (settings -> final errors)."""
        if self.run is not None:
            self.run.summary.update(values)
        if self.tensorboard is not None:
            metrics = {
                f"final/{k}": v for k, v in leaves(values).items() if isinstance(v, (int, float)) and math.isfinite(v)
            }
            try:  # run_name=".": the HParams record lands in the run's own event directory, not a sub-run
                self.tensorboard.add_hparams(self.hparams, metrics, run_name=".")
            except Exception as err:  # noqa: BLE001 -- a dashboard never stops a run
                log.warning("TensorBoard hparams not written (%s: %s)", type(err).__name__, err)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.run is not None:
            self.run.finish(exit_code=0 if exc[0] is None else 1)


def _tensorboard_writer(directory: Path, resume_step: int):
    """A SummaryWriter appending to the run's event stream; on a resume, ``purge_step`` makes TensorBoard drop
    what a killed attempt wrote past the checkpoint, so every step appears once."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        # every step up to resume_step is in the checkpoint: what lies beyond it the rerun trains (and logs) again
        return SummaryWriter(log_dir=str(directory), purge_step=resume_step + 1 if resume_step else None)
    except Exception as err:  # noqa: BLE001 -- package missing, disk: the local files are the record
        log.warning("TensorBoard disabled for this run (%s: %s)", type(err).__name__, err)
        return None


HPARAM_KEYS = ("experiment", "norm.name", "per_gpu_batch", "gpus", "seed", "model.id", "data.name", "epochs")


def hparams_of(config: dict) -> dict:
    """The settings that tell a sweep's runs apart, as TensorBoard's HParams columns (plain numbers and text);
    the norm's own options (groups, ...) as ``norm.<key>``."""
    flat = leaves(config)
    hparams = {key: flat[key] for key in HPARAM_KEYS if key in flat}
    for key, value in flat.items():
        if key.startswith("norm.") and key not in hparams:
            hparams[key] = value
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items() if v is not None}
