"""Dashboards: wandb (offline unless asked otherwise), always beside the run's local files."""

from __future__ import annotations

import logging

log = logging.getLogger("normbench")


ONLINE_TIMEOUT_S = 15  # wandb's own default waits 90 s for an unreachable server, per run
_online_failed = False  # said once per process: later runs of a sweep go offline without waiting again


class Tracker:
    """One wandb run per training run, grouped by experiment; `finish()` is always called (use as a context
    manager). A wandb failure never stops training: the local files are the record. Online mode that cannot
    reach the server within ONLINE_TIMEOUT_S falls back to offline (sync later with `wandb sync`)."""

    def __init__(self, config: dict, run_dir, name: str, run_id: str, enabled: bool):
        global _online_failed
        self.run = None
        mode = config["logger"]["wandb"]["mode"]
        if not enabled or mode == "disabled":
            return
        if mode == "online" and _online_failed:
            mode = "offline"
        try:
            import wandb
        except Exception as err:  # noqa: BLE001
            log.warning("wandb disabled for this run (%s: %s)", type(err).__name__, err)
            return
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
                self.run = wandb.init(
                    mode="online",
                    settings=wandb.Settings(silent=True, console="off", init_timeout=ONLINE_TIMEOUT_S),
                    **kwargs,
                )
                return
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
            self.run = wandb.init(mode=mode, settings=wandb.Settings(silent=True, console="off"), **kwargs)
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
