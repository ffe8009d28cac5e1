"""Dashboards: wandb (offline unless asked otherwise) and TensorBoard (event files in the run directory's
``tensorboard/``), always beside the run's local files, which they are rebuilt from on a resume.

Both take the same scalars at the same x-axis, the global training step (``epoch * steps_per_epoch + step``):
per-step curves every ``logger.every_steps`` steps (``step/...``; also kept locally in ``steps.jsonl``) and each
epoch's row of ``metrics.jsonl`` at the step that ends it (``epoch/...``). TensorBoard's HParams view gets the
run's identifying settings, its environment and its final errors, so ``tensorboard --logdir
results_dir/EXPERIMENT`` shows a paper table's runs as one table. The wandb runs of one report (experiment,
model, dataset) share a group (``runs.sweep_group``); ``normbench report`` logs its table and figure there
(`publish_report`).

A resumed run continues the curves with every step once: what the local files hold up to the checkpoint is
replayed into a fresh TensorBoard event file (the killed attempt's files are then removed, so every reader
agrees) and, wandb being unable to resume an offline run, into the new offline run (the newest offline run of a
run id holds its whole history; ``wandb sync`` of it replaces the older ones). An online run that wandb resumes
already holds its history: steps below its ``starting_step`` are not sent again.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from normbench import runs
from normbench.config import leaves

log = logging.getLogger("normbench")

STEPS_FILE = "steps.jsonl"  # the per-step curves, one row per logger.every_steps: {"step": global step, ...}
ONLINE_TIMEOUT_S = 15  # wandb's own default waits 90 s for an unreachable server, per run
_online_failed = False  # said once per process: later runs of a sweep go offline without waiting again


class Tracker:
    """One run's dashboards and its ``steps.jsonl``; a context manager (the dashboards are always closed).
    A dashboard failure never stops training: the local files are the record. Online wandb that cannot reach
    the server within ONLINE_TIMEOUT_S falls back to offline (sync later with `wandb sync`).

    ``enabled`` is False off the main process (nothing is written). ``resume_step`` is the global step the
    checkpoint holds and ``history`` its epoch rows: with ``steps_per_epoch`` they are what is replayed."""

    def __init__(
        self,
        config: dict,
        run_dir,
        *,
        run_id: str,
        enabled: bool,
        environment: dict | None = None,
        resume_step: int = 0,
        history: list[dict] = (),
        steps_per_epoch: int = 1,
    ):
        self.tensorboard = self.run = self.steps_file = None
        self.wandb_floor = 0  # wandb steps below this are already in the (online, resumed) run
        self.hparams = hparams_of(config, environment)
        if not enabled:
            return
        run_dir = Path(run_dir)
        steps = _steps_up_to(run_dir / STEPS_FILE, resume_step)
        replay = _replay_rows(steps, history, steps_per_epoch)
        if config["logger"]["tensorboard"]:
            self.tensorboard = _tensorboard_writer(run_dir / "tensorboard", replay, environment)
        self.run = _wandb_run(config, run_dir, run_dir.name, run_id, environment)
        if self.run is not None:
            if self.run.resumed:  # online, and the server has the run: it holds every step it was sent
                self.wandb_floor = int(self.run.starting_step)
            else:
                for step, scalars in replay:
                    self.run.log(scalars, step=step)
        try:
            self.steps_file = (run_dir / STEPS_FILE).open("a")
        except OSError as err:
            log.warning("%s not written (%s)", run_dir / STEPS_FILE, err)

    def log_steps(self, scalars: dict, step: int) -> None:
        """A per-step point (train_loss, lr, images_per_s): ``steps.jsonl`` and both dashboards as ``step/...``."""
        if self.steps_file is not None:
            try:
                self.steps_file.write(json.dumps({"step": step, **scalars}) + "\n")
                self.steps_file.flush()
            except OSError as err:
                log.warning("%s: %s; per-step rows stop here", self.steps_file.name, err)
                self.steps_file = None
        self._log(_prefixed("step", scalars), step)

    def log_epoch(self, row: dict, step: int) -> None:
        """An epoch's row of metrics.jsonl as ``epoch/...`` at the step that ends the epoch."""
        self._log(_prefixed("epoch", row), step)

    def _log(self, metrics: dict, step: int) -> None:
        if self.run is not None and step >= self.wandb_floor:
            self.run.log(metrics, step=step)
        if self.tensorboard is not None:
            _add_scalars(self.tensorboard, metrics, step)

    def summary(self, values: dict, step: int) -> None:
        """The run's final numbers (top-1 errors, BN's evaluation decomposition): wandb's summary; in TensorBoard
        ``final/...`` scalars at ``step`` and the HParams row (settings -> final errors)."""
        if self.run is not None:
            self.run.summary.update(values)
        if self.tensorboard is not None:
            metrics = {f"final/{k}": v for k, v in leaves(values).items() if _number(v)}
            try:  # run_name=".": the HParams record lands in the run's own event directory, not a sub-run
                self.tensorboard.add_hparams(self.hparams, metrics, run_name=".", global_step=step)
            except Exception as err:  # noqa: BLE001 -- a dashboard never stops a run
                log.warning("TensorBoard hparams not written (%s: %s)", type(err).__name__, err)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.steps_file is not None:
            self.steps_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.run is not None:
            self.run.finish(exit_code=0 if exc[0] is None else 1)


def _prefixed(prefix: str, row: dict) -> dict:
    """A local row as dashboard scalars: ``step/...`` (steps.jsonl, less its step) or ``epoch/...``."""
    return {f"{prefix}/{k}": v for k, v in row.items() if not (prefix == "step" and k == "step")}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _add_scalars(writer, metrics: dict, step: int) -> None:
    for key, value in metrics.items():
        if _number(value):
            writer.add_scalar(key, value, step)


def _steps_up_to(path: Path, last_step: int) -> list[dict]:
    """The rows of ``steps.jsonl`` the checkpoint covers; the file is cut back to them (a killed attempt's rows
    past the checkpoint are trained, and logged, again)."""
    rows = [r for r in runs.read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= last_step]
    if path.exists():
        try:
            runs.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        except OSError as err:
            log.warning("%s not cut back to the checkpoint (%s)", path, err)
    return rows


def _replay_rows(steps: list[dict], history: list[dict], steps_per_epoch: int) -> list[tuple[int, dict]]:
    """(step, dashboard scalars) in the order training logged them: a step's point before its epoch's row."""
    rows = [(r["step"], _prefixed("step", r)) for r in steps]
    rows += [(int(row["epoch"]) * steps_per_epoch, _prefixed("epoch", row)) for row in history]
    return sorted(rows, key=lambda r: r[0])  # stable: the step rows stay first


def _fresh_event_file(directory: Path, write):
    """A SummaryWriter on a new event file in ``directory``, ``write(writer)`` flushed into it, then every older
    event file there removed: the directory holds one stream, so every TensorBoard reader (the Rust data
    server, the legacy loader) shows each step once. Returns the open writer."""
    from torch.utils.tensorboard import SummaryWriter

    older = sorted(directory.glob("events.out.tfevents.*")) if directory.is_dir() else []
    writer = SummaryWriter(log_dir=str(directory))
    write(writer)
    writer.flush()
    for path in older:
        path.unlink(missing_ok=True)
    return writer


def _tensorboard_writer(directory: Path, replay: list[tuple[int, dict]], environment: dict | None):
    """The run's event stream, starting with ``replay`` (what the checkpoint holds) and the environment."""

    def write(writer) -> None:
        for step, scalars in replay:
            _add_scalars(writer, scalars, step)
        if environment:
            writer.add_text("environment", "```\n" + json.dumps(environment, indent=2, default=str) + "\n```", 0)

    try:
        return _fresh_event_file(directory, write)
    except Exception as err:  # noqa: BLE001 -- package missing, disk: the local files are the record
        log.warning("TensorBoard disabled for this run (%s: %s)", type(err).__name__, err)
        return None


def _wandb_run(config: dict, run_dir: Path, name: str, run_id: str, environment: dict | None):
    """wandb.init in the config's mode (``logger.wandb.mode``), or None (disabled, not installed, failed)."""
    mode = config["logger"]["wandb"]["mode"]
    if mode == "disabled":
        return None
    kwargs = dict(
        project=config["logger"]["wandb"]["project"],
        group=runs.sweep_group(config["experiment"], config["model"]["id"], config["data"]["name"]),
        name=name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config={**config, "env": environment} if environment else config,
        job_type="train",
    )
    return wandb_init(mode, run_dir, kwargs)


def wandb_init(mode: str, directory: Path, kwargs: dict):
    """``wandb.init(mode=mode, **kwargs)``, quiet; online that fails goes offline (said once per process)."""
    global _online_failed
    try:
        import wandb
    except Exception as err:  # noqa: BLE001
        log.warning("wandb disabled (%s: %s)", type(err).__name__, err)
        return None
    if mode == "online" and _online_failed:
        mode = "offline"
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
                directory,
            )
            mode = "offline"
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(silent=True, console="off"), **kwargs)
    except Exception as err:  # noqa: BLE001
        log.warning("wandb disabled (%s: %s)", type(err).__name__, err)
        return None


HPARAM_KEYS = ("experiment", "norm.name", "per_gpu_batch", "gpus", "seed", "model.id", "data.name", "epochs")


def hparams_of(config: dict, environment: dict | None = None) -> dict:
    """The settings that tell a sweep's runs apart, as TensorBoard's HParams columns (plain numbers and text);
    the norm's own options (groups, ...) as ``norm.<key>``; the code and machine as ``env.*``."""
    flat = leaves(config)
    hparams = {key: flat[key] for key in HPARAM_KEYS if key in flat}
    for key, value in flat.items():
        if key.startswith("norm.") and key not in hparams:
            hparams[key] = value
    if environment:
        git = environment.get("git") or {}
        if git.get("commit"):
            hparams["env.commit"] = git["commit"][:10] + ("-dirty" if git.get("dirty") else "")
        hparams["env.device"] = environment.get("gpu") or environment.get("device")
        hparams["env.torch"] = (environment.get("versions") or {}).get("torch")
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items() if v is not None}


# ---- the report: its table and figure beside the runs it was built from ---------------------------------------
def publish_report(summary, directory: Path, *, wandb_mode: str, tensorboard: bool) -> list[str]:
    """Log a built report (normbench.report.ReportSummary) to the dashboards: TensorBoard event files in
    ``directory/tensorboard`` (``results_dir/EXPERIMENT/report/``: `tensorboard --logdir results_dir/EXPERIMENT`
    shows it beside the runs; each publication replaces the last), and with ``wandb_mode`` offline or online a
    wandb run (job_type "report") in the runs' group holding the CSV as a wandb Table and the figure as an
    Image. Returns what was written, in words; a dashboard failure is a warning, never a failed report."""
    directory = Path(directory)
    written = []
    if tensorboard:
        try:
            import numpy as np
            from PIL import Image

            def write(writer) -> None:
                writer.add_text("report/markdown", summary.markdown, 0)
                image = np.asarray(Image.open(summary.png_path).convert("RGB"))
                writer.add_image("report/figure", image, 0, dataformats="HWC")

            _fresh_event_file(directory / "tensorboard", write).close()
            written.append(f"TensorBoard: {directory / 'tensorboard'}")
        except Exception as err:  # noqa: BLE001
            log.warning("report not written to TensorBoard (%s: %s)", type(err).__name__, err)
    if wandb_mode != "disabled" and summary.group:
        kwargs = dict(
            project=summary.project,
            group=summary.group,
            name=f"report {summary.experiment}",
            id=f"report-{summary.group}"[:64],
            resume="allow",
            dir=str(directory),
            config={"experiment": summary.experiment, "model": summary.model, "data": summary.data},
            job_type="report",
        )
        run = wandb_init(wandb_mode, directory, kwargs)
        if run is not None:
            try:
                import wandb

                from normbench.report.csv_table import read_typed_csv

                columns, rows = read_typed_csv(summary.csv_path)
                table = wandb.Table(columns=columns, data=rows)
                run.log({"report/table": table, "report/figure": wandb.Image(str(summary.png_path))})
                run.summary.update({"n_completed": summary.n_completed, "n_missing_cells": summary.n_missing_cells})
                written.append(f"wandb ({wandb_mode}): group {summary.group}, run {kwargs['id']} in {directory}")
            except Exception as err:  # noqa: BLE001
                log.warning("report not logged to wandb (%s: %s)", type(err).__name__, err)
            finally:
                run.finish()
    return written
