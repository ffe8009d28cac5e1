"""Run directories: identity, atomic files, provenance, and the lock that keeps two sweeps off one run.

A run's directory is named after a hash of its *identifying* config: everything that can change its numbers.
Keys that only say where or how fast to run (results_dir, logging, data location, loader workers, fast-path
switches whose effect is float error) are left out, so moving the data or turning on bf16 resumes the same run.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# Top-level keys, and dotted sub-keys, that never change what a run computes.
NON_IDENTIFYING = (
    "results_dir", "logger", "device", "fast", "sweep", "experiment", "bn_eval",
    "data.root", "data.download", "data.workers", "data.eval_batch",
)


def identifying_config(config: dict) -> dict:
    config = json.loads(json.dumps(config))  # deep copy of plain containers
    for key in NON_IDENTIFYING:
        node, *rest = key.split(".")
        if not rest:
            config.pop(node, None)
        elif isinstance(config.get(node), dict):
            config[node].pop(rest[0], None)
    return config


def run_id(config: dict) -> str:
    blob = json.dumps(identifying_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def run_name(config: dict) -> str:
    """Readable prefix plus hash: cifar_resnet20-fashion_mnist-gn-8x32-s0-1a2b3c4d5e."""
    return "-".join([config["model"]["id"], config["data"]["name"], config["norm"]["name"],
                     f"{config['gpus']}x{config['per_gpu_batch']}", f"s{config['seed']}", run_id(config)])


def run_dir(config: dict) -> Path:
    return Path(config["results_dir"]) / config["experiment"] / run_name(config)


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
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """metrics.jsonl is rewritten whole (it is small) so a resumed run drops epochs past its checkpoint."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


# ---- provenance ---------------------------------------------------------------------------------------------
def git_state(repo: Path | None = None) -> dict:
    """Commit of the code, and whether tracked files differ from it. ``results/`` is left out: it holds runs'
    outputs, not their inputs (regenerating a committed reference run rewrites it while the run trains)."""
    repo = repo or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                            ":(exclude)results").splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        commit, changed = "", []
    state = {"commit": commit or None, "dirty": bool(changed)}
    if changed:
        state["dirty_paths"] = changed[:20]
    return state


def environment(device: str) -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "timm", "hydra", "omegaconf", "wandb", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 -- a missing optional package is recorded, not fatal
            versions[name] = None
    info = {"git": git_state(), "versions": versions, "device": device, "host": platform.node(),
            "command": " ".join(sys.argv)}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


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
