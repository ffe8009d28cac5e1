"""A run's record and state: the status result.json says truthfully, whether a run is finished (the one test
the trainer and the sweeper share), force=true's "older than this command", and an attempt's clean start.

Status (result.json `status`):
  completed    every epoch ran; the only status a report averages
  diverged     a non-finite training loss stopped it (a result too: the layer cannot train in that setting)
  failed       an exception; the message is recorded, the rerun resumes from the last checkpoint
  interrupted  a signal (INTERRUPT_SIGNALS: Ctrl-C, SIGTERM, SIGHUP, SLURM's/submitit's SIGUSR2, ...) or SystemExit
               stopped it; the rerun, or the requeued job, resumes from the last finished epoch's checkpoint
Only completed and diverged runs are skipped when their command is run again. An interrupt does not checkpoint
mid-epoch: the work since the last epoch boundary is redone on resume.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import read_json, set_aside, write_json
from .identity import run_dir, run_id
from .interrupts import interruption_name
from .provenance import git_state

log = logging.getLogger("normbench")

STATUSES = ("completed", "diverged", "failed", "interrupted")
FINAL_STATUSES = ("completed", "diverged")  # a result that needs no more training


def is_finished(result) -> bool:
    """A result that needs no more training: completed, or diverged (a result too)."""
    return isinstance(result, dict) and result.get("status") in FINAL_STATUSES


def run_state(directory: Path) -> str:
    """done (is_finished), partial (a checkpoint to resume from) or new; reads only, never moves a file."""
    directory = Path(directory)
    if is_finished(read_json(directory / "result.json")):
        return "done"
    return "partial" if (directory / "checkpoint.pt").exists() else "new"


def read_result(directory: Path) -> dict | None:
    """result.json if it is a readable normbench result, else None; a damaged one is moved aside with one warning
    (the run is then resumed from its checkpoint or retrained)."""
    path = Path(directory) / "result.json"
    if not path.exists():
        return None
    data = read_json(path)
    if isinstance(data, dict) and data.get("status") in STATUSES and isinstance(data.get("epochs_completed"), int):
        return data
    aside = set_aside(path)
    log.warning(
        "%s is damaged or not a normbench result; moved to %s, the run will be resumed or retrained", path, aside.name
    )
    return None


def finished_result(directory: Path) -> dict | None:
    """The run's result if it needs no more training (completed, or diverged: a result too)."""
    result = read_result(directory)
    return result if is_finished(result) else None


def finished_on_main(directory: Path, d, device, quiet: bool = False) -> dict | None:
    """The finished result, read by rank 0 only (it may move a damaged file aside); every rank agrees."""
    from normbench import distributed

    result = finished_result(directory) if d.is_main else None
    if not distributed.broadcast_flag(result is not None, d, device):
        return None
    if result is None:  # another rank's view: rank 0 found it finished
        return {"status": "completed", "outcome": "skipped", "run_dir": str(directory)}
    if not quiet:
        log.info("skip %s: already %s", directory, result["status"])
    return {**result, "outcome": "skipped"}


@dataclass
class Outcome:
    """How a run ended: `status` for result.json, `outcome` for the sweep summary (also skipped/resumed)."""

    outcome: str
    status: str = "completed"
    diverged_epoch: int | None = None
    error: str | None = None
    interrupted_by: str | None = None

    def end(self, status: str, **details) -> None:
        self.status = self.outcome = status
        for key, value in details.items():
            setattr(self, key, value)


def result_record(
    config: dict, run: Outcome, history: list[dict], resumes: int, wall_time_s: float, *, metric: float | None, **fields
) -> dict:
    """result.json: the status, the numbers only when every epoch ran, and what produced them (config, git).
    `metric` is the run's median top-1 error of the last 5 epochs; `fields` are the trainer's labels."""
    done = run.status == "completed"
    last = history[-1] if history else {}
    return {
        "status": run.status,
        "experiment": config["experiment"],
        "run_id": run_id(config),
        "run_dir": str(run_dir(config).relative_to(config["results_dir"])),
        "model": config["model"]["id"],
        "data": config["data"]["name"],
        "norm": fields.pop("norm"),
        "norm_options": fields.pop("norm_options"),
        "gpus": config["gpus"],
        "per_gpu_batch": config["per_gpu_batch"],
        "seed": config["seed"],
        "epochs": config["epochs"],
        "epochs_completed": len(history),
        "top1_error_final": last.get("top1_error") if done else None,
        "top1_error_median_last5": metric if done else None,
        "top5_error_final": last.get("top5_error") if done else None,
        "diverged_epoch": run.diverged_epoch,
        "error_message": run.error,
        "interrupted_by": run.interrupted_by,
        "resumes": resumes,
        "requeues": requeue_count(),
        "wall_time_s": round(wall_time_s, 2),
        "sn_importance": fields.pop("sn_importance", None),  # SN only (NormSpec.recorded)
        "lr": fields.pop("lr"),
        **fields,
        "git": git_state(),
        "config": config,
    }


# ---- force=true: results older than this sweep -----------------------------------------------------------
FORCE_SINCE_ENV = "NORMBENCH_FORCE_SINCE"  # when this command started: set by `normbench`, inherited by its jobs


def mark_command_start() -> None:
    """Note when this `normbench` command started, for every run it launches (in process, or as submitit/SLURM
    jobs and their requeues, which inherit the environment and never call this). Each command sets it afresh: a
    value inherited from an earlier command (a shell, a notebook, a test process) would make force=true skip
    results that command made."""
    if os.environ.get("NORMBENCH_SWEEP_WORKER") and FORCE_SINCE_ENV in os.environ:
        return  # a worker process of a sweep (normbench.sweep_workers): the sweep's start is its own
    os.environ[FORCE_SINCE_ENV] = repr(time.time())


def command_start() -> float:
    """When this command started (mark_command_start), else now: force=true then retrains what exists."""
    try:
        return float(os.environ[FORCE_SINCE_ENV])
    except (KeyError, ValueError):
        return time.time()


def finished_during_this_command(directory: Path) -> bool:
    """A result.json written since this command started: under force=true another worker of the same sweep (or
    this one) already retrained the run, and it is not trained again."""
    try:
        return (Path(directory) / "result.json").stat().st_mtime >= command_start()
    except OSError:
        return False


def skip_finished(directory: Path, d, device, force: bool, quiet: bool = False) -> dict | None:
    """The result to return instead of training: a finished run; under force=true only one finished since this
    command started ("force" means: results older than this sweep)."""
    from normbench import distributed

    if not force:
        return finished_on_main(directory, d, device, quiet=quiet)
    fresh = d.is_main and finished_during_this_command(directory)
    if not distributed.broadcast_flag(fresh, d, device):
        return None
    finished = finished_on_main(directory, d, device, quiet=True)
    if finished and not quiet:
        log.info("skip %s: force=true, but it was trained again since this command started", directory)
    return finished


def begin_attempt(directory: Path) -> None:
    """Under the run's lock, before anything else: clear what an attempt killed for good (SIGKILL, power loss)
    left behind: its atomic writes' temporary files (up to a whole checkpoint each), and a result.json of an
    unfinished earlier attempt, which would go on claiming how far the run got while this one trains."""
    directory = Path(directory)
    _recorded["status"] = None
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
        log.info("removed %s, left by an attempt that was killed while writing it", stale.name)
    result = read_json(directory / "result.json")
    if isinstance(result, dict) and result.get("status") in STATUSES and result["status"] not in FINAL_STATUSES:
        (directory / "result.json").unlink(missing_ok=True)


def set_aside_finished(directory: Path) -> Path:
    """force=true: move a finished run's files into a sibling directory NAME.replaced-TIMESTAMP (kept, never
    deleted) so it is trained again from scratch. The lock file stays: the caller holds it."""
    directory = Path(directory)
    target = directory.with_name(f"{directory.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    target.mkdir(parents=True)
    for item in directory.iterdir():
        if item.name != ".lock":
            os.replace(item, target / item.name)
    return target


_recorded: dict[str, Any] = {"status": None}  # the status this process last wrote to a result.json


def write_result(directory: Path, result: dict) -> None:
    write_json(Path(directory) / "result.json", result)
    _recorded["status"] = result.get("status")


def interruption_message(err: BaseException) -> str:
    """What an interrupted command says: that the run is recorded as interrupted only when it is."""
    name = interruption_name(err)
    if _recorded["status"] == "interrupted":
        return f"interrupted by {name}; the run is recorded as interrupted: rerun the same command to resume it"
    if _recorded["status"] is not None:  # the signal came as the command wound down, after the run's record
        return (
            f"interrupted by {name} after the run was recorded as {_recorded['status']} (its result.json is whole); "
            "a rerun trains only what is not finished"
        )
    return f"interrupted by {name} before the run recorded anything (no result.json): rerun the same command"


def requeue_count() -> int:
    """How many times SLURM requeued the job now running (0 outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0
