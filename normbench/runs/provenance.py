"""What produced a run: the code (commit, uncommitted changes, and which code trained which epochs), the
versions and the machine. Written to env.json and result.json; bit-reproducibility holds only where they agree.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("normbench")


def git_state(repo: Path | None = None) -> dict:
    """Commit of the code, and whether tracked files differ from it. ``results/`` is left out: it holds runs'
    outputs, not their inputs (regenerating a committed reference run rewrites it while the run trains)."""
    repo = repo or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [
            line[3:]
            for line in git(
                "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"
            ).splitlines()
            if line.strip()
        ]
    except (OSError, subprocess.SubprocessError):
        commit, changed = "", []
    state = {"commit": commit or None, "dirty": bool(changed)}
    if changed:
        state["dirty_paths"] = changed[:20]
    return state


def _code(state: dict) -> tuple:
    return state.get("commit"), state.get("dirty"), tuple(state.get("dirty_paths") or ())


class CodeHistory:
    """Which code trained which epochs: ``[{commit, dirty, [dirty_paths], epochs: [first, last]}, ...]``, carried
    in the checkpoint and written to result.json as ``code_history``. A run resumed under other code (another
    commit, or other uncommitted changes) gets a new entry, and the log says so. A checkpoint from before this
    record has one entry with commit None for the epochs it holds: their code is unknown, not assumed."""

    def __init__(self, checkpoint: dict | None, start_epoch: int):
        self.start = start_epoch
        self.now = git_state()
        earlier = (checkpoint or {}).get("code_history")
        if isinstance(earlier, list) and earlier:
            self.earlier = [dict(entry) for entry in earlier if entry["epochs"][0] <= start_epoch]
            if self.earlier:
                self.earlier[-1]["epochs"] = [self.earlier[-1]["epochs"][0], start_epoch]
        else:
            self.earlier = [{"commit": None, "dirty": None, "epochs": [1, start_epoch]}] if start_epoch else []
        if self.earlier and _code(self.earlier[-1]) != _code(self.now):
            log.warning(
                "resuming from epoch %d under other code: epochs %d-%d were trained at %s, epochs from %d on are "
                "trained at %s (both recorded in result.json's code_history)",
                start_epoch,
                *self.earlier[-1]["epochs"],
                _describe(self.earlier[-1]),
                start_epoch + 1,
                _describe(self.now),
            )

    def through(self, epoch: int) -> list[dict]:
        """The record for a run that has finished `epoch` epochs."""
        entries = [dict(entry) for entry in self.earlier]
        if epoch > self.start:
            if entries and _code(entries[-1]) == _code(self.now):
                entries[-1]["epochs"] = [entries[-1]["epochs"][0], epoch]
            else:
                entries.append({**self.now, "epochs": [self.start + 1, epoch]})
        return entries


def _describe(state: dict) -> str:
    if state.get("commit") is None:
        return "unknown code (a checkpoint from before code_history)" if state.get("dirty") is None else "no commit"
    return f"{state['commit'][:10]}{' with uncommitted changes' if state.get('dirty') else ''}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "timm", "hydra", "omegaconf", "wandb", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 -- a missing optional package is recorded, not fatal
            versions[name] = None
    info = {
        "git": git_state(),
        "versions": versions,
        "device": device,
        "host": platform.node(),
        # float results are bit-reproducible only on the same CPU kind, thread count and capability set
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": " ".join(sys.argv),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
