"""Sweeps: grids from the real experiment configs, idempotent reruns, concurrent sweeps, failures, launchers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from hydra_plugins.normbench_sweeper.normbench_sweeper import finished_since, grid_eta, plan_jobs

from conftest import REPO, TINY, cli, compose

# The tiny run, minus the settings a grid sweeps over.
SWEEP_TINY = [a for a in TINY if not a.startswith(("per_gpu_batch=", "epochs="))] + ["epochs=1"]


def _grid(*overrides):
    cfg = compose(list(overrides))
    return [dict(b) for b in cfg.sweep.grid], list(cfg.sweep.seeds), dict(cfg.sweep.allowed)


def _two_sweeps_at_once(command: list[str], env: dict) -> list[dict]:
    """Two copies of the sweep `command` started together; both must succeed; their summaries."""
    procs = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [_summary(o[0]) for o in outs]


def _summary(stdout: str) -> dict:
    line = [l for l in stdout.splitlines() if re.match(r"sweep \S+: \d+ runs:", l)][-1]
    return {k: int(v) for v, k in re.findall(r"(\d+) (completed|skipped|resumed|diverged|busy|failed)", line)}


def test_sn_table_grid_has_the_papers_cells():
    grid, seeds, allowed = _grid("experiment=sn_table")
    jobs = plan_jobs([[]], grid, seeds, allowed)
    cells = {
        (
            dict(o.split("=") for o in j)["norm"],
            int(dict(o.split("=") for o in j)["gpus"]),
            int(dict(o.split("=") for o in j)["per_gpu_batch"]),
        )
        for j in jobs
    }
    settings = [(8, 32), (8, 16), (8, 8), (8, 4), (8, 2), (1, 16), (1, 32), (8, 1), (1, 8)]
    expected = {(n, g, b) for n in ("bn", "gn", "sn") for g, b in settings} - {("bn", 8, 1)}
    assert cells == expected and len(jobs) == 26
    (sn_one,) = [j for j in jobs if "norm=sn" in j and "per_gpu_batch=1" in j]
    assert "norm.use_bn=false" in sn_one


def test_command_line_value_selects_a_slice_and_seeds_multiply():
    grid, _, _ = _grid("experiment=gn_table2")
    jobs = plan_jobs([["per_gpu_batch=2"]], grid, [0, 1], {})
    assert sorted(" ".join(sorted(j)) for j in jobs) == sorted(
        " ".join(sorted(["per_gpu_batch=2", f"norm={n}", f"seed={s}"])) for n in ("bn", "gn") for s in (0, 1)
    )


def test_small_presets_keep_only_group_counts_their_model_has():
    grid, seeds, allowed = _grid("experiment=gn_groups", "preset=fashion_mnist")
    jobs = plan_jobs([[]], grid, seeds, allowed)
    assert sorted(int(j[0].split("=")[1]) for j in jobs) == [1, 2, 4, 8]


@pytest.mark.slow
def test_sweep_runs_the_grid_then_skips_it_and_reports(tmp_path):
    first = cli("sweep", "experiment=gn_table2", *SWEEP_TINY, f"results_dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert _summary(first.stdout) == {
        "completed": 10,
        "skipped": 0,
        "resumed": 0,
        "diverged": 0,
        "busy": 0,
        "failed": 0,
    }
    results = [json.loads(p.read_text()) for p in tmp_path.rglob("result.json")]
    assert sorted((r["norm"], r["per_gpu_batch"]) for r in results) == sorted(
        (n, b) for n in ("bn", "gn") for b in (32, 16, 8, 4, 2)
    )
    assert {r["experiment"] for r in results} == {"gn_table2"}
    again = cli("sweep", "experiment=gn_table2", *SWEEP_TINY, f"results_dir={tmp_path}")
    assert _summary(again.stdout)["skipped"] == 10
    report = cli("report", "experiment=gn_table2", f"results_dir={tmp_path}")
    assert report.returncode == 0, report.stderr
    for suffix in ("md", "csv", "png"):
        assert (tmp_path / "reports" / f"gn_table2.{suffix}").stat().st_size > 0


@pytest.mark.slow
def test_two_sweeps_at_once_never_run_a_config_twice(tmp_path):
    command = [
        sys.executable,
        "-m",
        "normbench.cli",
        "sweep",
        "experiment=gn_table2",
        *SWEEP_TINY,
        f"results_dir={tmp_path}",
    ]
    summaries = _two_sweeps_at_once(command, {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    # the sweeps overlapped (else this proves nothing about locking): one found a run busy, or both trained
    assert any(s["busy"] for s in summaries) or all(s["completed"] >= 1 for s in summaries), summaries
    assert sum(s["completed"] for s in summaries) == 10  # each config trained exactly once
    assert all(s["failed"] == 0 for s in summaries)
    assert len(list(tmp_path.rglob("result.json"))) == 10


@pytest.mark.slow
def test_a_failing_run_is_counted_and_the_sweep_goes_on(tmp_path):
    # width-4 model: 4, 8 and 16 channels, so 64, 32, 16 and 8 groups cannot divide its first layers
    proc = cli("sweep", "experiment=gn_groups", *SWEEP_TINY, "per_gpu_batch=8", f"results_dir={tmp_path}")
    assert proc.returncode == 4  # the exit status says how many failed
    assert "failed runs (4 of 7):" in proc.stderr
    summary = _summary(proc.stdout)
    assert summary["completed"] == 3 and summary["failed"] == 4
    done = sorted(json.loads(p.read_text())["norm_options"]["groups"] for p in tmp_path.rglob("result.json"))
    assert done == [1, 2, 4]
    assert "does not divide" in proc.stderr


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_sweep(tmp_path):
    proc = cli(
        "sweep",
        "experiment=gn_table2",
        *SWEEP_TINY,
        "per_gpu_batch=32",
        "hydra/launcher=local",
        f"results_dir={tmp_path}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _summary(proc.stdout)["completed"] == 2
    assert sorted(json.loads(p.read_text())["norm"] for p in tmp_path.rglob("result.json")) == ["bn", "gn"]


def _tree(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.slow
def test_sweep_tells_run_k_of_n_and_a_dry_run_lists_states_without_writing(tmp_path):
    first = cli("sweep", "experiment=gn_table2", *SWEEP_TINY, "per_gpu_batch=8", f"results_dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    progress = r"sweep gn_table2: run 1/2 completed; 1 of the 1 left to train, ETA \d+m\d\ds for the grid"
    assert re.search(progress, first.stdout)
    run_dirs = {json.loads(p.read_text())["norm"]: p.parent for p in tmp_path.rglob("result.json")}
    (run_dirs["gn"] / "result.json").unlink()  # its checkpoint stays: a run to resume
    before = _tree(tmp_path)
    dry = cli(
        "sweep",
        "experiment=gn_table2",
        *SWEEP_TINY,
        "per_gpu_batch=8,4",
        "sweep.dry_run=true",
        f"results_dir={tmp_path}",
    )
    assert dry.returncode == 0, dry.stderr[-2000:]
    listed = dict(reversed(line.split()) for line in dry.stdout.splitlines() if line.startswith("  "))
    assert listed[run_dirs["bn"].name] == "done" and listed[run_dirs["gn"].name] == "partial"
    new = sorted(name for name, state in listed.items() if state == "new")
    assert len(new) == 2 and all(re.fullmatch(r"cifar_resnet8-synthetic-(bn|gn)-4x4-s0-[0-9a-f]{10}", n) for n in new)
    assert f"4 runs in {tmp_path}/gn_table2/: 1 done, 1 partial, 2 new; nothing trained" in dry.stdout
    assert _tree(tmp_path) == before  # nothing trained, nothing written
    forced = cli(
        "sweep",
        "experiment=gn_table2",
        *SWEEP_TINY,
        "per_gpu_batch=8",
        "sweep.dry_run=true",
        "force=true",
        f"results_dir={tmp_path}",
        env={"NORMBENCH_FORCE_SINCE": "0"},  # a start time inherited from an earlier command is not this one's
    )
    assert f"  redo     {run_dirs['bn'].name}" in forced.stdout  # force=true retrains a finished run


@pytest.mark.slow
def test_sweep_cfg_job_prints_the_composed_config():
    proc = cli("sweep", "experiment=gn_table2", "preset=local", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "experiment: gn_table2" in proc.stdout and "train_subset: 4096" in proc.stdout


def test_grid_eta_is_the_grid_s_completion_rate_times_what_is_left():
    # Two workers finished 6 runs in 12 min between them (2 min a run for the grid): 9 left take 18 min, not the
    # 36 min one worker's own 4 min a run would say.
    assert grid_eta(12 * 60, done_since_start=6, not_done=9) == "18m00s"
    assert grid_eta(3 * 3600, done_since_start=4, not_done=2) == "1h30m"
    assert grid_eta(100.0, done_since_start=0, not_done=5) == "unknown"  # nothing finished yet: no rate
    assert grid_eta(100.0, done_since_start=0, not_done=0) == "0m00s"


def test_finished_since_counts_any_worker_s_runs_that_ended_after_the_sweep_started(tmp_path):
    """The ETA's numerator, read from real run directories: a run counts when its result is final (completed or
    diverged) and was written at or after the sweep started -- whoever trained it."""
    since = time.time() - 1  # a file's mtime is the kernel's coarser clock: it can read a little before time.time()

    def run(name, status=None, before=False, checkpoint=False):
        directory = tmp_path / name
        directory.mkdir()
        if checkpoint:
            (directory / "checkpoint.pt").write_bytes(b"x")
        if status:
            (directory / "result.json").write_text(json.dumps({"status": status}))
            if before:  # finished before this sweep started: not this grid's progress
                os.utime(directory / "result.json", (since - 60, since - 60))
        return directory

    directories = [
        run("by_another_worker", "completed"),
        run("diverged_now", "diverged"),
        run("done_before", "completed", before=True),
        run("interrupted_now", "interrupted", checkpoint=True),
        run("still_training", checkpoint=True),
        None,  # a bad config: no directory
    ]
    assert finished_since(directories, since) == [True, True, False, False, False, False]


@pytest.mark.slow
def test_force_with_two_workers_retrains_each_finished_run_once(tmp_path):
    grid = ["sweep", "experiment=gn_table2", *SWEEP_TINY, "per_gpu_batch=8,4", f"results_dir={tmp_path}"]
    first = cli(*grid)
    assert first.returncode == 0 and _summary(first.stdout)["completed"] == 4, first.stderr[-2000:]
    old = {p.parent.name: p.read_text() for p in tmp_path.rglob("result.json")}
    started = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("NORMBENCH_FORCE_SINCE", None)
    command = [sys.executable, "-m", "normbench.cli", *grid, "force=true"]
    summaries = _two_sweeps_at_once(command, env)
    assert sum(s["completed"] for s in summaries) == 4, summaries  # 4 trainings for a 4-run grid, not 5 or more
    replaced = sorted(tmp_path.rglob("*.replaced-*"))
    assert len(replaced) == 4  # each old result set aside once, never a result this sweep made
    assert sorted(r.name.split(".replaced-")[0] for r in replaced) == sorted(old)
    for kept in replaced:
        assert (kept / "result.json").read_text() == old[kept.name.split(".replaced-")[0]]
        assert (kept / "result.json").stat().st_mtime < started
    fresh = [p for p in tmp_path.rglob("result.json") if ".replaced-" not in str(p)]
    assert len(fresh) == 4 and all(p.stat().st_mtime >= started for p in fresh)
