"""Dashboards: wandb (offline unless asked otherwise), always beside the run's local files."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("normbench")


class Tracker:
    """One wandb run per training run, grouped by experiment; `finish()` is always called (use as a context
    manager). A wandb failure never stops training: the local files are the record."""

    def __init__(self, cfg, run_dir, name: str, run_id: str, config: dict, enabled: bool):
        self.run = None
        mode = cfg.logger.wandb.mode
        if not enabled or mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(project=cfg.logger.wandb.project, group=cfg.experiment, name=name, id=run_id,
                                  resume="allow", mode=mode, dir=str(run_dir), config=config, job_type="train",
                                  settings=wandb.Settings(silent=True, console="off"))
        except Exception as err:  # noqa: BLE001
            log.warning("wandb disabled for this run (%s: %s)", type(err).__name__, err)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if exc[0] is None else 1)


def progress(iterable, total: int, desc: str, enabled: bool):
    """A progress bar with images/s and ETA; sparse updates when the output is not a terminal (logs, CI)."""
    from tqdm import tqdm

    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30, postfix={"img/s": "-"})
