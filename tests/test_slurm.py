"""SLURM for real, on the local cluster of `make slurm-up` (`make slurm-test` starts it, runs these, stops it):
a sweep through sbatch gives the local sweep's runs and numbers; a run past its time limit is signalled,
requeued and resumed by SLURM to the numbers of an uninterrupted run; a cancelled job is never `completed`
and the next sweep resumes it. Without a cluster (`sinfo` fails) every test skips; every wait is bounded and
each test cancels its own jobs (by job name) when it ends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM_DIR = Path(os.environ.get("SLURM_DIR", "/tmp/normbench-slurm"))

# GN Table 2 at smoke-test scale on 8x8 synthetic images (seconds a run). preset=local trains on a 4096-image
# subset of Fashion-MNIST; these tests replace its data, so its data.train_subset / data.epoch_size go too.
TINY_LOCAL = [
    "experiment=gn_table2",
    "preset=local",
    "data=synthetic",
    "data.train_subset=null",
    "data.epoch_size=null",
    "data.num_train=256",
    "data.num_eval=128",
    "data.image_size=8",
    "data.num_classes=4",
    "model.width=4",
    "model.norm_groups=2",
    "logger.wandb.mode=disabled",
    "logger.progress=false",
]
# One run of the sweep (per-GPU BN, 8 GPUs x 8 images) for the interruption tests; its epoch length is set
# by data.num_train, sized from this machine's speed (`sized_run`).
ONE_RUN = [
    "experiment=gn_table2",
    "norm=bn",
    "per_gpu_batch=8",
    "preset=local",
    "data=synthetic",
    "data.train_subset=null",
    "data.epoch_size=null",
    "data.num_eval=256",
    "data.image_size=16",
    "data.num_classes=4",
    "logger.wandb.mode=disabled",
    "logger.progress=false",
]
GLOBAL_BATCH = 64  # preset=local: 64 images a step, whatever per_gpu_batch
METRIC_KEYS = ("epoch", "lr", "train_loss", "top1_error", "top5_error", "eval_loss")  # not the timings
RESULT_KEYS = (
    "status",
    "run_dir",
    "epochs_completed",
    "top1_error_final",
    "top1_error_median_last5",
    "top5_error_final",
    "lr",
)


@pytest.fixture(scope="module")
def slurm_env() -> dict:
    """SLURM_CONF for the commands and jobs: the environment's, else the local cluster's; skip without one."""
    env = {}
    if "SLURM_CONF" not in os.environ and (SLURM_DIR / "slurm.conf").exists():
        env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env={**os.environ, **env}, capture_output=True, text=True, timeout=30
        )
        answered = proc.returncode == 0 and proc.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        answered = False
    if not answered:
        pytest.skip("no SLURM cluster answers sinfo: run make slurm-test (or make slurm-up first)")
    return env


@pytest.fixture
def job_name(slurm_env):
    """A job name of this test's own: its jobs are cancelled when it ends, whatever happened."""
    name = f"nbtest-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["scancel", f"--name={name}"], env={**os.environ, **slurm_env}, capture_output=True, timeout=30)


def slurm(*args: str, env: dict) -> str:
    return subprocess.run(
        list(args), env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=True
    ).stdout


@pytest.fixture
def start():
    """start(ARGS..., env=) runs `normbench ARGS` in the background (cli() blocks), one thread as the SLURM
    jobs; whatever is still running when the test ends is killed."""
    procs = []

    def _start(*args: str, env: dict | None = None) -> subprocess.Popen:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "normbench.cli", *args],
                cwd=REPO,
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        return procs[-1]

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout:.0f} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def summary(stdout: str) -> dict:
    line = [l for l in stdout.splitlines() if re.match(r"sweep \S+: \d+ runs:", l)][-1]
    return {k: int(v) for v, k in re.findall(r"(\d+) ([a-z]+)", line.split("runs:", 1)[1])}


def runs(results_dir: Path) -> dict[str, dict]:
    """Each run directory's numbers: result.json's metrics and every epoch's row, minus timings and paths."""
    found = {}
    for path in sorted(results_dir.glob("gn_table2/*/result.json")):
        result = json.loads(path.read_text())
        rows = [json.loads(l) for l in (path.parent / "metrics.jsonl").read_text().splitlines() if l.strip()]
        found[path.parent.name] = {
            **{k: result[k] for k in RESULT_KEYS},
            "epochs": [{k: row[k] for k in METRIC_KEYS} for row in rows],
        }
    return found


def the_result(results_dir: Path) -> dict:
    (path,) = results_dir.glob("gn_table2/*/result.json")
    return json.loads(path.read_text())


def submitted_jobs(results_dir: Path) -> list[str]:
    """The SLURM job ids submitit submitted for the sweeps in results_dir: its folder <id>/ holds
    <id>_submitted.pkl for each job, `ARRAY_TASK` for a sweep of several runs, a plain id for a single run."""
    return sorted(
        p.parent.name
        for p in results_dir.glob(".hydra/*/.submitit/*/*_submitted.pkl")
        if p.name == f"{p.parent.name}_submitted.pkl"
    )


def sacct_states(job: str, env: dict, timeout: float = 120) -> dict[str, list[str]]:
    """{job id: its states} for a job or a whole array, once SLURM has accounted every job as ended; each
    allocation of a requeued job is a record of its own (-D), oldest first."""
    deadline = time.monotonic() + timeout
    while True:
        out = slurm("sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State", "-j", job, env=env)
        states: dict[str, list[str]] = {}
        for line in out.splitlines():
            job_id, state = line.split("|")
            states.setdefault(job_id, []).append(state.split()[0])  # "CANCELLED by 0" -> CANCELLED
        if states and not {s[-1] for s in states.values()} & {"PENDING", "RUNNING", "COMPLETING", "REQUEUED"}:
            return states
        assert time.monotonic() < deadline, f"SLURM still accounts {job} as running: {states}"
        time.sleep(2)


@pytest.fixture(scope="module")
def images_per_s(tmp_path_factory, slurm_env) -> float:
    """Training speed of ONE_RUN's model on this machine now (a one-epoch probe run), to size epochs in
    seconds: a SLURM time limit is wall-clock, and the tests need it to land in the middle of training."""
    results = tmp_path_factory.mktemp("probe")
    proc = cli("train", *ONE_RUN, "data.num_train=1024", "epochs=1", f"results_dir={results}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (metrics,) = results.glob("gn_table2/*/metrics.jsonl")
    return json.loads(metrics.read_text().splitlines()[0])["images_per_s"]


def sized_run(images_per_s: float, epoch_s: float, epochs: int) -> list[str]:
    num_train = max(4, round(images_per_s * epoch_s / GLOBAL_BATCH)) * GLOBAL_BATCH
    return [*ONE_RUN, f"data.num_train={num_train}", f"epochs={epochs}"]


def test_sweep_through_sbatch_gives_the_local_sweeps_runs_and_numbers(tmp_path, slurm_env, job_name):
    local = cli("sweep", *TINY_LOCAL, f"results_dir={tmp_path / 'local'}", timeout=600)
    assert local.returncode == 0, local.stderr[-2000:]
    on_slurm = cli(
        "sweep",
        *TINY_LOCAL,
        "hydra/launcher=slurm_local",
        f"hydra.launcher.name={job_name}",
        f"results_dir={tmp_path / 'slurm'}",
        env=slurm_env,
        timeout=600,
    )
    assert on_slurm.returncode == 0, on_slurm.stderr[-3000:]
    assert summary(on_slurm.stdout)["completed"] == 10

    jobs = submitted_jobs(tmp_path / "slurm")
    (array,) = {job.split("_")[0] for job in jobs}
    assert len(jobs) == 10
    assert sacct_states(array, slurm_env) == {f"{array}_{i}": ["COMPLETED"] for i in range(10)}
    names = slurm("sacct", "-X", "-n", "-P", "-o", "JobName", "-j", array, env=slurm_env).split()
    assert names == [job_name] * 10  # this sweep's jobs, none other

    expected, got = runs(tmp_path / "local"), runs(tmp_path / "slurm")
    assert len(expected) == 10 and {r["status"] for r in expected.values()} == {"completed"}
    assert got == expected  # same run directories, same numbers epoch by epoch


def test_a_run_past_its_time_limit_is_requeued_and_resumed_to_the_uninterrupted_numbers(
    tmp_path, slurm_env, job_name, images_per_s, start
):
    # 6 epochs of ~20 s: SLURM signals 30-60 s before a 2-minute limit (it checks about every 30 s), epochs
    # in, and the requeued job has the remaining ones to do (on a loaded machine, in several allocations).
    run = sized_run(images_per_s, epoch_s=20, epochs=6)
    reference = start("sweep", *run, f"results_dir={tmp_path / 'reference'}")
    sweep = start(
        "sweep",
        *run,
        "hydra/launcher=slurm_local",
        f"hydra.launcher.name={job_name}",
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.max_num_timeout=5",
        f"results_dir={tmp_path / 'slurm'}",
        env=slurm_env,
    )
    statuses = []  # result.json's status whenever it changes while the job runs, requeues included
    deadline = time.monotonic() + 900
    while sweep.poll() is None and time.monotonic() < deadline:
        found = list((tmp_path / "slurm").glob("gn_table2/*/result.json"))
        status = json.loads(found[0].read_text()) if found else None
        if status and (not statuses or statuses[-1] != (status["status"], status.get("interrupted_by"))):
            statuses.append((status["status"], status.get("interrupted_by")))
        time.sleep(1)
    code, out, err = finish(sweep, timeout=max(1, deadline - time.monotonic()))
    assert code == 0, err[-3000:]
    assert finish(reference, timeout=600)[0] == 0

    (job,) = submitted_jobs(tmp_path / "slurm")
    states = sacct_states(job, slurm_env)[job]
    assert states[-1] == "COMPLETED" and states.count("REQUEUED") >= 1, states
    log = next((tmp_path / "slurm").glob(f".hydra/*/.submitit/{job}/{job}_0_log.err")).read_text()
    assert "Caught signal SIGUSR2" in log and "timed-out" in log  # SLURM's time-limit signal, not a crash
    # the signal waited for its step to end and got a step checkpoint: the requeued job resumed inside the epoch
    job_out = "".join(p.read_text() for p in (tmp_path / "slurm").glob(f".hydra/*/.submitit/{job}/*_log.out"))
    assert re.search(r"resume \S+ from epoch \d+ step \d+ of \d+ \(checkpoint written", job_out), job_out[-3000:]

    assert summary(out)["resumed"] == 1
    assert ("interrupted", "SystemExit") in statuses, statuses  # submitit's requeue handler ends the job
    result = the_result(tmp_path / "slurm")
    assert result["status"] == "completed"
    assert result["requeues"] == states.count("REQUEUED")
    assert result["resumes"] >= 1
    assert runs(tmp_path / "slurm") == runs(tmp_path / "reference")


def test_a_cancelled_job_is_never_completed_and_the_next_sweep_resumes_it(
    tmp_path, slurm_env, job_name, images_per_s, start
):
    # 6 epochs of ~5 s: cancelled after the first checkpoint, the job has 25 s of training left, more than
    # SLURM's KillWait (10 s on the local cluster) between its SIGTERM and SIGKILL.
    run = sized_run(images_per_s, epoch_s=5, epochs=6)
    reference = start("sweep", *run, f"results_dir={tmp_path / 'reference'}")
    command = [
        "sweep",
        *run,
        "hydra/launcher=slurm_local",
        f"hydra.launcher.name={job_name}",
        f"results_dir={tmp_path / 'slurm'}",
    ]
    sweep = start(*command, env=slurm_env)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "slurm").glob("gn_table2/*/checkpoint.pt")):
        assert sweep.poll() is None and time.monotonic() < deadline, "no epoch checkpointed"
        time.sleep(0.5)
    (job,) = submitted_jobs(tmp_path / "slurm")
    slurm("scancel", job, env=slurm_env)
    code, _, err = finish(sweep, timeout=300)
    assert code != 0 and "CANCELLED" in err, err[-3000:]  # the sweep says the job was cancelled
    assert "Traceback" not in err and "rerun the same sweep" in err, err[-3000:]  # in one line, with the fix
    assert sacct_states(job, slurm_env) == {job: ["CANCELLED"]}
    found = list((tmp_path / "slurm").glob("gn_table2/*/result.json"))
    assert not found or json.loads(found[0].read_text())["status"] != "completed"

    again = cli(*command, env=slurm_env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (rerun,) = set(submitted_jobs(tmp_path / "slurm")) - {job}
    assert sacct_states(rerun, slurm_env) == {rerun: ["COMPLETED"]}
    assert summary(again.stdout)["resumed"] == 1
    assert finish(reference, timeout=600)[0] == 0
    result = the_result(tmp_path / "slurm")
    assert result["status"] == "completed" and result["resumes"] == 1 and result["requeues"] == 0
    assert runs(tmp_path / "slurm") == runs(tmp_path / "reference")
