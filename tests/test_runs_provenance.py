"""Provenance: a run records the code's commit and whether tracked code differs from it (results/ excluded)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from normbench.runs.provenance import git_state

from conftest import REPO, TINY, cli


def _git(repo, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_ignores_results_but_not_code(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "results" / "run.json").unlink()  # regenerating a committed run rewrites results/
    (tmp_path / "untracked.py").write_text("")
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True, "dirty_paths": ["code.py"]}


@pytest.mark.slow
def test_a_run_resumed_under_other_code_records_every_commit_with_its_epochs(tmp_path):
    """Train epoch 1 at one commit, finish at another with uncommitted changes: result.json names both."""
    code = tmp_path / "code"
    for part in ("normbench", "hydra_plugins", "configs"):
        shutil.copytree(REPO / part, code / part, ignore=shutil.ignore_patterns("__pycache__"))

    def git(*args):
        return subprocess.run(["git", *args], cwd=code, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "first")
    first = git("rev-parse", "HEAD")
    env = {"PYTHONPATH": str(code)}
    args = [*TINY, "data.num_train=2048", "per_gpu_batch=8", f"results_dir={tmp_path / 'runs'}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "normbench.cli", "train", *args],
        cwd=code,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while not list((tmp_path / "runs").rglob("checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    (result_path,) = (tmp_path / "runs").rglob("result.json")
    assert json.loads(result_path.read_text())["epochs_completed"] == 1, "the signal did not land in epoch 2"
    with open(code / "normbench" / "paths.py", "a") as handle:
        handle.write("# another commit\n")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "second")
    second = git("rev-parse", "HEAD")
    with open(code / "normbench" / "paths.py", "a") as handle:
        handle.write("# and an uncommitted change\n")
    rerun = cli("train", *args, cwd=code, env=env)
    assert rerun.returncode == 0, rerun.stderr
    told = [line for line in rerun.stdout.splitlines() if "under other code" in line]
    assert len(told) == 1 and first[:10] in told[0] and second[:10] in told[0], rerun.stdout
    result = json.loads(result_path.read_text())
    assert result["code_history"] == [
        {"commit": first, "dirty": False, "epochs": [1, 1]},
        {"commit": second, "dirty": True, "dirty_paths": ["normbench/paths.py"], "epochs": [2, 2]},
    ]
    assert result["git"]["commit"] == second and result["epochs_completed"] == 2


def test_committed_runs_keep_their_ids_and_a_non_default_precise_bn_count_is_a_new_run():
    """The ids of the committed reference runs (computed by the code that trained them) are what the identity
    gives today; bn_eval.precise_bn_images changes the recorded PreciseBN number, so another count is another
    run, while the default leaves the id as it was."""
    from normbench.runs import run_id

    committed = sorted((REPO / "results" / "fashion_mnist").glob("*/*/result.json"))
    assert len(committed) > 100
    for path in committed[::7]:
        result = json.loads(path.read_text())
        assert run_id(result["config"]) == result["run_id"], path
    config = json.loads(committed[0].read_text())["config"]
    other = json.loads(json.dumps(config))
    other["bn_eval"]["precise_bn_images"] = 4096
    assert run_id(other) != run_id(config)
    other["bn_eval"]["precise_bn_images"] = 8192
    other["bn_eval"]["enabled"] = False  # adds no number and changes none
    assert run_id(other) == run_id(config)
