"""`sweep.workers=N` (issue 25): several runs of a grid at once, each its own process pinned to its share; the same
results as one worker, failures counted, a signal to the sweep recorded by every worker and resumed by a rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_sweep import SWEEP_TINY, _summary

from normbench.sweep_workers import resolve_workers, slots

from conftest import REPO, cli


def _results(root) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in root.rglob("result.json") if ".replaced-" not in str(p)}


def test_cpu_slots_split_the_cores_and_auto_means_the_gpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    two = slots(2)
    assert [s.cores for s in two] == [(0, 1, 2, 3), (4, 5, 6, 7)] and {s.env["OMP_NUM_THREADS"] for s in two} == {"4"}
    assert [s.cores for s in slots(16)][:9] == [(i % 8,) for i in range(9)]  # more workers than cores: 1 each
    assert resolve_workers("auto") == 1 and resolve_workers(3) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    gpu = slots(5)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu] == ["3", "5", "3", "5", "3"]  # GPU i mod visible GPUs
    assert resolve_workers("auto") == 2 and resolve_workers("auto", device="cpu") == 1


@pytest.mark.slow
def test_two_workers_give_one_workers_results_and_count_failures(tmp_path):
    # width-4 model: 3 groups cannot divide its 4 channels, so the gn runs fail and the bn runs go on
    grid = ["sweep", "experiment=gn_table2", *SWEEP_TINY, "model.norm_groups=3", "per_gpu_batch=8,4"]
    one = cli(*grid, f"results_dir={tmp_path / 'one'}")
    two = cli(*grid, "sweep.workers=2", f"results_dir={tmp_path / 'two'}")
    for proc in (one, two):
        assert proc.returncode == 2, proc.stderr[-2000:]  # two runs failed
        assert _summary(proc.stdout)["completed"] == 2 and _summary(proc.stdout)["failed"] == 2
        assert "failed runs (2 of 4):" in proc.stderr and "does not divide" in proc.stderr
    assert "2 workers" in two.stderr + two.stdout
    assert len(_results(tmp_path / "one")) == 2
    ones, twos = _results(tmp_path / "one"), _results(tmp_path / "two")
    completed = {name for name, r in ones.items() if r["status"] == "completed"}
    assert completed == {name for name, r in twos.items() if r["status"] == "completed"} and len(completed) == 2
    for name in completed:  # each run is its own deterministic process: the same numbers, bit for bit
        assert twos[name]["top1_error_final"] == ones[name]["top1_error_final"], name
        assert twos[name]["top1_error_by_eval"] == ones[name]["top1_error_by_eval"], name
    again = cli(*grid, "sweep.workers=2", f"results_dir={tmp_path / 'two'}")
    assert _summary(again.stdout)["skipped"] == 2  # finished runs: no process started for them
    dry = cli(*grid, "sweep.workers=2", "sweep.dry_run=true", f"results_dir={tmp_path / 'two'}")
    assert "4 runs in" in dry.stdout and "2 done" in dry.stdout and "nothing trained" in dry.stdout


def _workers_of(results_dir) -> list[int]:
    """Live `normbench train` processes writing under results_dir (read from /proc: no truncated ps lines)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            args = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            state = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"train" in args and f"results_dir={results_dir}".encode() in args and state != "Z":
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_sigterm_to_a_sweep_reaches_every_worker_and_a_rerun_resumes_them(tmp_path):
    args = [
        "sweep",
        "experiment=gn_table2",
        *[a for a in SWEEP_TINY if not a.startswith(("epochs=", "data.num_train="))],
        "data.num_train=4096",
        "epochs=40",  # long enough to be caught training (about 0.5 s an epoch here)
        "per_gpu_batch=8",
        "sweep.workers=2",
        f"results_dir={tmp_path}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "normbench", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.rglob("checkpoint.pt"))) < 2:  # both past their first epoch
        time.sleep(0.2)
    assert len(_workers_of(tmp_path)) == 2, "two workers should be training"
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert b"interrupted by SIGTERM" in err and b"rerun the same sweep" in err
    assert _workers_of(tmp_path) == []  # no orphan
    statuses = sorted(r["status"] for r in _results(tmp_path).values())
    assert statuses == ["interrupted", "interrupted"], statuses
    rerun = cli(*args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _summary(rerun.stdout)["resumed"] == 2
    assert sorted(r["status"] for r in _results(tmp_path).values()) == ["completed", "completed"]
