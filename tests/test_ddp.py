"""Several real processes (torchrun, gloo on the CPU) against one process emulating every GPU, and the
submitit -> torchrun environment export. A run under DDP must be the run one process computes: same weights,
same running statistics (README: "What images per GPU means here")."""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch

from normbench import distributed
from normbench.norms import build_norm

from conftest import TINY, cli, torchrun


def _run_dir(root):
    (run,) = sorted(p.parent for p in root.rglob("result.json"))
    return run


def _state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


# brn: reads its running statistics while training, so every step's buffers must be averaged over the ranks
# (a per-epoch average leaves rank 1 renormalizing with its own statistics for the rest of the epoch);
# evonorm_b0: per-GPU variance in training, running variance averaged like BN's;
# syncbn: SyncBatchNorm over both processes = one BN over the whole batch in one process.
@pytest.mark.slow
@pytest.mark.parametrize(
    "norm",
    [
        pytest.param(
            "brn",
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="open: DDP brn differs from the emulation by ~1e-4 absolute (parameters ~1e-3) with or "
                "without the per-step buffer average, while the float64 rule below is exact; to be diagnosed",
            ),
        ),
        "evonorm_b0",
        pytest.param(
            "syncbn",
            marks=pytest.mark.xfail(
                strict=True,
                raises=AssertionError,
                reason="torch's SyncBatchNorm raises 'expected input tensor to be on GPU' on the CPU (gloo)",
            ),
        ),
    ],
)
def test_two_process_ddp_matches_one_process_emulation(tmp_path, norm):
    args = [*TINY, f"norm={norm}", "epochs=1", "data.num_train=256"]  # 8 steps of 4 GPUs x 8 images
    single = cli("train", *args, f"results_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = torchrun(*args, f"results_dir={tmp_path / 'two'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _run_dir(tmp_path / "one"), _run_dir(tmp_path / "two")
    assert one.name == two.name  # the same identifying config: the same run
    wa, wb = _state(one), _state(two)
    buffers = [k for k in wa if "running_" in k]
    assert buffers, "no running statistics to compare"
    for key in buffers:  # the running statistics moved away from their init (so comparing them means something)
        init = 1.0 if "var" in key else 0.0
        assert (wa[key].double() - init).abs().max() > 1e-3, key
    for key in wa:
        torch.testing.assert_close(wa[key].double(), wb[key].double(), rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_a_diverged_loss_stops_every_rank(tmp_path):
    logs = tmp_path / "logs"
    # --log-dir/--redirects 3: each rank's stdout/stderr in its own file, so each rank's stop can be read
    proc = torchrun(
        *TINY,
        "norm=none",
        "base_lr=1e6",
        "logger.check_every=1",
        "epochs=3",
        f"results_dir={tmp_path / 'runs'}",
        launcher=("--log-dir", str(logs), "--redirects", "3"),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # neither rank crashed nor hung waiting for the other
    result = json.loads((_run_dir(tmp_path / "runs") / "result.json").read_text())
    assert result["status"] == "diverged" and result["diverged_epoch"] == 1 and result["epochs_completed"] == 0
    rank_logs = {
        int(d.name): (d / "stdout.log").read_text() + (d / "stderr.log").read_text()
        for d in {p.parent for p in logs.rglob("stdout.log")}
    }
    assert sorted(rank_logs) == [0, 1], sorted(logs.rglob("*"))
    for rank, text in rank_logs.items():
        assert "run diverged: non-finite training loss in epoch 1" in text, (rank, text[-2000:])
        assert "epoch 1/3" not in text, rank  # stopped inside epoch 1, before its evaluation


def _rank_halves_against_one_layer(name: str, average_every_step: bool, steps: int = 4, **options) -> float:
    """Largest output difference, over STEPS training forwards, between one float64 layer emulating 4 GPUs of 8
    images and two copies ("ranks") each given its interleaved half (rank r: positions r, r+2, ...), their float
    buffers averaged after every step when AVERAGE_EVERY_STEP -- what the trainer does under DDP."""
    torch.manual_seed(0)
    one = build_norm(name, 4, per_gpu_batch=8, **options).double()
    with torch.no_grad():  # running statistics away from the data's, so r and d (brn) are far from 1 and 0
        if hasattr(one, "running_mean"):  # evonorm_b0 keeps a running variance only
            one.running_mean.fill_(0.5)
        one.running_var.fill_(3.0)
    ranks = [copy.deepcopy(one) for _ in range(2)]
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(32, 4, 3, 3, dtype=torch.float64) * 1.5 + 0.3
        y = one(x)
        for r, layer in enumerate(ranks):
            worst = max(worst, (layer(x[r::2]) - y[r::2]).abs().max().item())
        if average_every_step:
            with torch.no_grad():
                for pair in zip(*(list(layer.buffers()) for layer in ranks)):
                    if pair[0].is_floating_point():
                        mean = (pair[0] + pair[1]) / 2
                        for buffer in pair:
                            buffer.copy_(mean)
    return worst


@pytest.mark.parametrize(
    "name, options", [("brn", {"rmax": 100.0, "dmax": 100.0}), ("brn", {}), ("evonorm_b0", {}), ("bn", {})]
)
def test_rank_halves_with_buffers_averaged_every_step_are_one_emulating_layer(name, options):
    """The rule behind the trainer's per-step buffer average (distributed.average_buffers): exact in float64.
    Batch renorm reads its running statistics while training, so without the average the ranks drift apart."""
    assert _rank_halves_against_one_layer(name, True, **options) < 1e-12
    if name == "brn" and options:  # r, d unclipped: the output depends on the running statistics directly
        assert _rank_halves_against_one_layer(name, False, **options) > 1e-3


# ---- submitit: a multi-task SLURM / local job exports the env:// variables torchrun would set ----------------

_EXPORTED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_SUBMITIT_LOCAL = (
    "SUBMITIT_EXECUTOR",
    "SUBMITIT_LOCAL_JOB_ID",
    "SUBMITIT_LOCAL_NTASKS",
    "SUBMITIT_LOCAL_JOB_NUM_NODES",
    "SUBMITIT_LOCAL_NODEID",
    "SUBMITIT_LOCAL_GLOBALID",
    "SUBMITIT_LOCAL_LOCALID",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "SLURM_JOB_NODELIST",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_JOB_NUM_NODES",
    "_TEST_CLUSTER_",
)


@pytest.fixture
def clean_env(monkeypatch):
    """No distributed or submitit variable set; whatever a test (or the code under test) sets is undone."""
    for name in _EXPORTED + _SUBMITIT_LOCAL:
        monkeypatch.setenv(name, "")  # registers the original value (or its absence) for restoring
        monkeypatch.delenv(name)
    return monkeypatch


def _exported_for_local_task(monkeypatch, task: int) -> dict:
    """What _export_submitit_env exports in task TASK of a 3-task job of submitit's local executor (the variables
    that executor sets: submitit/local/local.py)."""
    with monkeypatch.context() as m:
        for name, value in {
            "SUBMITIT_EXECUTOR": "local",
            "SUBMITIT_LOCAL_JOB_ID": "4242",
            "SUBMITIT_LOCAL_NTASKS": "3",
            "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
            "SUBMITIT_LOCAL_NODEID": "0",
            "SUBMITIT_LOCAL_GLOBALID": str(task),
            "SUBMITIT_LOCAL_LOCALID": str(task),
        }.items():
            m.setenv(name, value)
        for name in _EXPORTED:  # undo the export when the context ends
            m.setenv(name, "")
            m.delenv(name)
        distributed._export_submitit_env()
        return {k: os.environ.get(k) for k in _EXPORTED}


def test_multi_task_submitit_job_exports_the_torchrun_variables(clean_env):
    tasks = [_exported_for_local_task(clean_env, task) for task in range(3)]
    for task, exported in enumerate(tasks):
        assert {k: v for k, v in exported.items() if k != "MASTER_PORT"} == {
            "MASTER_ADDR": socket.gethostname(),
            "RANK": str(task),
            "WORLD_SIZE": "3",
            "LOCAL_RANK": str(task),
            "LOCAL_WORLD_SIZE": "3",
        }
    ports = {t["MASTER_PORT"] for t in tasks}
    assert len(ports) == 1 and 1024 <= int(ports.pop()) <= 65535  # every task meets at the same port
    assert not any(k in os.environ for k in _EXPORTED)


def test_one_task_or_no_submitit_job_exports_nothing(clean_env):
    clean_env.setenv("SUBMITIT_EXECUTOR", "local")
    clean_env.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    clean_env.setenv("SUBMITIT_LOCAL_NTASKS", "1")
    distributed._export_submitit_env()
    assert not any(k in os.environ for k in _EXPORTED)
    clean_env.delenv("SUBMITIT_EXECUTOR")
    clean_env.setenv("SLURM_JOB_ID", "77")  # plain `normbench train` inside a SLURM allocation: not submitit
    assert distributed.setup("cpu") == distributed.Dist()
    assert not any(k in os.environ for k in _EXPORTED)


def test_a_broken_submitit_environment_is_not_swallowed(clean_env):
    # a 2-task submitit SLURM job whose job id is missing: raised, not trained as two separate world-size-1 runs
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(KeyError, match="SLURM_JOB_ID"):
        distributed._export_submitit_env()
