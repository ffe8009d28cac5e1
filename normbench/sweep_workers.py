"""`sweep.workers=N`: a sweep trains up to N runs at once, each a `normbench train` process of its own, pinned to
its own share of the machine (CUDA: GPU ``slot mod visible GPUs``; CPU: a disjoint set of cores, threads = cores / N).

Why processes started here rather than a Hydra launcher's pool (joblib/loky): a pool reuses its worker processes,
so one run's global state (torch threads, cudnn flags, compile caches, CUDA context on another GPU) would carry into
the next; a GPU can be pinned only before CUDA starts, i.e. when the process is spawned; and a pool's shutdown on
SIGTERM kills its workers without letting them record how far they got. Here every run starts clean, in its own
session (a terminal's Ctrl-C reaches the sweep only, which forwards it once: a second signal would stop a worker
before its record is written), and dies with the sweep (PR_SET_PDEATHSIG) if the sweep itself is killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from normbench.runs.interrupts import INTERRUPT_SIGNALS, Interrupted

__all__ = ["Slot", "resolve_workers", "slots", "run_in_workers"]

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Slot:
    """One worker's share: ``env`` for its process (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS), ``cores`` its CPUs."""

    index: int
    env: dict
    cores: tuple[int, ...] | None


def visible_gpus() -> list[str]:
    """The GPUs this sweep may use, as CUDA_VISIBLE_DEVICES names them (its own value first, else 0..n-1)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in (x.strip() for x in listed.split(",")) if g and g != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    except Exception:  # noqa: BLE001 -- no CUDA at all
        return []


def resolve_workers(setting, device: str = "auto") -> int:
    """``sweep.workers``: ``auto`` = the visible GPUs (1 without one, or when the runs are told device=cpu)."""
    if setting != "auto":
        return int(setting)
    return max(1, len(visible_gpus())) if device != "cpu" else 1


def slots(workers: int, device: str = "auto") -> list[Slot]:
    """The share of each of ``workers`` slots: on CUDA (runs not told device=cpu) GPU ``i mod (visible GPUs)``
    (so 16 workers on 8 GPUs put two runs on each); on the CPU ``cores // workers`` cores each (at least 1),
    disjoint while there are enough."""
    gpus = visible_gpus() if device != "cpu" else []
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    threads = max(1, len(cores) // workers)
    out = []
    for i in range(workers):
        env = {"OMP_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            share = None  # a GPU run's host threads are not the bottleneck: no core pinning
        else:
            start = (i * threads) % len(cores)
            share = tuple(cores[(start + j) % len(cores)] for j in range(threads))
        out.append(Slot(i, env, share))
    return out


def _start_in_slot(slot: Slot) -> Callable[[], None]:
    def start() -> None:  # runs in the child before exec
        if slot.cores is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, slot.cores)
        try:  # die with the sweep, even a SIGKILLed one: no orphaned training
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass

    return start


@dataclass
class Finished:
    index: int  # the job's position in the grid
    returncode: int
    log_path: Path


def run_in_workers(
    jobs: Sequence[Sequence[str]],
    indices: Sequence[int],
    workers: int,
    log_dir: Path,
    on_finished: Callable[[Finished], None],
    device: str = "auto",
) -> None:
    """Train the jobs at ``indices`` (each an override list for `normbench train`), up to ``workers`` at once;
    ``on_finished`` is told of each as it ends. A signal (INTERRUPT_SIGNALS) to the sweep is forwarded once to
    every running worker, which records `interrupted` and exits; then Interrupted is raised here."""
    import subprocess

    log_dir.mkdir(parents=True, exist_ok=True)
    free = slots(workers, device)
    queue = list(indices)
    running: dict[subprocess.Popen, tuple[int, Slot, Path]] = {}
    stop: list[int] = []

    def forward(signum, frame):
        if not stop:
            stop.append(signum)
            for process in running:
                if process.poll() is None:
                    process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in INTERRUPT_SIGNALS}
    try:
        while queue or running:
            while queue and free and not stop:
                index, slot = queue.pop(0), free.pop(0)
                log_path = log_dir / f"{index}.log"
                with open(log_path, "wb") as log_file:
                    process = subprocess.Popen(
                        [sys.executable, "-m", "normbench", "train", *jobs[index]],
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, **slot.env, "NORMBENCH_SWEEP_WORKER": "1"},
                        start_new_session=True,
                        preexec_fn=_start_in_slot(slot),
                    )
                running[process] = (index, slot, log_path)
            for process in [p for p in running if p.poll() is not None]:
                index, slot, log_path = running.pop(process)
                free.append(slot)
                on_finished(Finished(index, process.returncode, log_path))
            if stop and not running:
                break
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for process in running:  # an exception here: leave nothing behind
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
    if stop:
        raise Interrupted(stop[0])
