"""A run's life on disk: identity, atomic files, the lock that keeps two sweeps off one run, and
the status that says truthfully how far it got.

A run's directory is named after a hash of its *identifying* config: everything that can change its numbers.
Keys that only say where or how fast to run (results_dir, logging, data location, loader workers, fast-path
switches whose effect is float error) are left out, so moving the data or turning on channels_last resumes the
same run. The precision (`fast.amp`, resolved: a bf16 run is not an fp32 run) is part of the identity, and so
is `data.decoder=gpu` (its pixels differ from PIL's by rounding; the default `pil` is left out of the hash), and
so are ImageNet's colour jitter and lighting strengths (`data.augment.brightness/...`; one set to 0 is left out,
so crop-and-flip runs made before those keys existed keep their ids).

Status (result.json `status`):
  completed    every epoch ran; the only status a report averages
  diverged     a non-finite training loss stopped it (a result too: the layer cannot train in that setting)
  failed       an exception; the message is recorded, the rerun resumes from the last checkpoint
  interrupted  a signal (INTERRUPT_SIGNALS: Ctrl-C, SIGTERM, SIGHUP, SLURM's/submitit's SIGUSR2, ...) or SystemExit
               stopped it; the rerun, or the requeued job, resumes from the last finished epoch's checkpoint
Only completed and diverged runs are skipped when their command is run again. An interrupt does not checkpoint
mid-epoch: the work since the last epoch boundary is redone on resume (an epoch is at most minutes here; on
ImageNet give SLURM's signal a delay of more than one checkpoint write, not of an epoch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normbench.interrupts import interruption_name
from normbench.provenance import git_state

log = logging.getLogger("normbench")

STATUSES = ("completed", "diverged", "failed", "interrupted")
FINAL_STATUSES = ("completed", "diverged")  # a result that needs no more training

COLOUR_AUGMENT_KEYS = ("brightness", "contrast", "saturation", "lighting")  # normbench.data.colour.KEYS

# Top-level keys, and dotted sub-keys, that never change what a run computes.
# `experiment` is not identifying on disk (the directory already sits under it) but is part of the wandb id.
NON_IDENTIFYING = (
    "results_dir",
    "logger",
    "device",
    "sweep",
    "experiment",
    "force",
    "preset_name",
    "claims",
    "bn_eval",
    "fast.channels_last",
    "fast.compile",
    "fast.cuda_graphs",
    "fast.cudnn_benchmark",
    "data.root",
    "data.download",
    "data.workers",
    "data.eval_batch",
)


def identifying_config(config: dict) -> dict:
    config = json.loads(json.dumps(config))  # deep copy of plain containers
    for key in NON_IDENTIFYING:
        node, *rest = key.split(".")
        if not rest:
            config.pop(node, None)
        elif isinstance(config.get(node), dict):
            config[node].pop(rest[0], None)
    if config.get("fast") == {}:
        config.pop("fast")
    data = config.get("data")
    if isinstance(data, dict) and data.get("decoder") == "pil":
        # PIL decoding, the default: the path every ImageNet run took before data.decoder existed (same ids).
        # data.decoder=gpu resamples (and, on CUDA, decodes) with different rounding: its own run.
        data.pop("decoder")
    augment = data.get("augment") if isinstance(data, dict) else None
    if isinstance(augment, dict):
        # A colour augmentation turned off (0) computes what runs from before these keys existed computed:
        # left out, so those runs keep their ids; one turned on is in the hash.
        for key in COLOUR_AUGMENT_KEYS:
            if augment.get(key, None) == 0:
                augment.pop(key)
    return config


def run_id(config: dict) -> str:
    blob = json.dumps(identifying_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def run_name(config: dict) -> str:
    """Readable prefix plus hash: cifar_resnet20-fashion_mnist-gn-8x32-s0-1a2b3c4d5e."""
    return "-".join(
        [
            config["model"]["id"],
            config["data"]["name"],
            config["norm"]["name"],
            f"{config['gpus']}x{config['per_gpu_batch']}",
            f"s{config['seed']}",
            run_id(config),
        ]
    )


def run_dir(config: dict) -> Path:
    return Path(config["results_dir"]) / config["experiment"] / run_name(config)


def wandb_id(config: dict) -> str:
    """The dashboard id: the run hash within its experiment (the same BN run in two tables is two runs)."""
    return f"{config['experiment']}-{run_id(config)}"[:64]


_UMASK = os.umask(0o022)
os.umask(_UMASK)


# ---- atomic writes: a reader (or a killed run) never sees half a file -------------------------------------
def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda handle: handle.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_torch(path: Path, obj: Any) -> None:
    import torch

    _atomic(path, lambda handle: torch.save(obj, handle))


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl that parse; a line cut by a crash ends the list (one warning)."""
    rows = []
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return rows
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: line %d is damaged; kept the %d rows before it", path, number, len(rows))
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def write_metrics(path: Path, rows: list[dict]) -> None:
    """metrics.jsonl is rewritten whole (it is small) so a resumed run drops epochs past its checkpoint."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


class RunLock:
    """Non-blocking exclusive lock on a run directory. The OS drops it when the holder dies (SIGKILL included),
    so an interrupted run can be taken over by the next sweep, while a live one is never run twice."""

    def __init__(self, directory: Path):
        from filelock import FileLock

        Path(directory).mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(Path(directory) / ".lock"))

    def acquire(self) -> bool:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
            return True
        except Timeout:
            return False

    def release(self) -> None:
        self._lock.release()


# ---- damaged files: moved aside, never a traceback -----------------------------------------------------------
def set_aside(path: Path) -> Path:
    """Move a damaged file to NAME.corrupt (the previous one of that name is replaced) and return the new path."""
    target = Path(path).with_name(Path(path).name + ".corrupt")
    os.replace(path, target)
    return target


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
    return result if result and result["status"] in FINAL_STATUSES else None


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
        "sn_importance": fields.pop("sn_importance"),
        "lr": fields.pop("lr"),
        **fields,
        "git": git_state(),
        "config": config,
    }


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "wall_time_s")


def load_checkpoint(path: Path, map_location) -> dict | None:
    """The checkpoint, or None if there is none or it cannot be read (truncated, empty, not ours): a damaged
    one is moved aside to checkpoint.pt.corrupt with one warning and the run restarts from epoch 0."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not (isinstance(state, dict) and all(k in state for k in CHECKPOINT_KEYS)):
            raise ValueError("missing keys")
    except Exception as err:  # noqa: BLE001 -- any unreadable checkpoint is handled the same way
        aside = set_aside(path)
        log.warning(
            "%s cannot be read (%s); moved to %s, the run restarts from epoch 0",
            path,
            " ".join(str(err).split())[:120] or type(err).__name__,
            aside.name,
        )
        return None
    return state


# ---- force=true: results older than this sweep -----------------------------------------------------------
FORCE_SINCE_ENV = "NORMBENCH_FORCE_SINCE"  # when this command started: set by `normbench`, inherited by its jobs


def mark_command_start() -> None:
    """Note when this `normbench` command started, for every run it launches (in process, or as submitit/SLURM
    jobs and their requeues, which inherit the environment and never call this). Each command sets it afresh: a
    value inherited from an earlier command (a shell, a notebook, a test process) would make force=true skip
    results that command made."""
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
    return f"interrupted by {name} before the run recorded anything (no result.json): rerun the same command"


def requeue_count() -> int:
    """How many times SLURM requeued the job now running (0 outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0
