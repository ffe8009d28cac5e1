"""A run's files: atomic writes (a reader, or a killed run, never sees half a file), the lock that keeps two
sweeps off one run, and damaged files moved aside instead of a traceback."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("normbench")

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
