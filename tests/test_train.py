"""The training pipeline end to end: composed from the real configs, shrunk to seconds."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normbench.train import train

from conftest import REPO, TINY, cli, compose

pytestmark = pytest.mark.slow  # every test here trains (in-process or in a subprocess)


def _run(tmp_path, *extra):
    return train(compose(TINY + [f"results_dir={tmp_path}", *extra]))


def _run_dirs(root):
    return sorted(p.parent for p in root.rglob("result.json"))


def test_run_writes_its_directory_and_is_skipped_when_rerun(tmp_path):
    result = _run(tmp_path)
    assert result["status"] == "completed" and result["outcome"] == "completed"
    (run,) = _run_dirs(tmp_path)
    for name in ("config.yaml", "overrides.yaml", "env.json", "metrics.jsonl", "result.json", "checkpoint.pt"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    on_disk = json.loads((run / "result.json").read_text())
    assert on_disk["top1_error_final"] == rows[-1]["top1_error"]
    assert on_disk["top1_error_median_last5"] == statistics.median(r["top1_error"] for r in rows)
    assert on_disk["top5_error_final"] == rows[-1]["top5_error"]
    assert (on_disk["model"], on_disk["data"], on_disk["norm"]) == ("cifar_resnet8", "synthetic", "bn")
    assert (on_disk["gpus"], on_disk["per_gpu_batch"], on_disk["seed"], on_disk["epochs"]) == (4, 8, 0, 2)
    assert on_disk["norm_options"]["per_gpu_batch"] == 8
    assert on_disk["lr"] == pytest.approx(on_disk["config"]["base_lr"] * 4 * 8 / 256)  # the papers' linear rule
    assert on_disk["wall_time_s"] > 0 and on_disk["config"]["per_gpu_batch"] == 8
    env = json.loads((run / "env.json").read_text())
    assert env["git"]["commit"] is None or len(env["git"]["commit"]) == 40
    assert env["versions"]["torch"] == torch.__version__
    # what float results depend on beyond the code: the thread count and the CPU's vector unit
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # the model name the kernel reports, as the machine's own record has it
        assert f": {env['cpu']}\n" in cpuinfo.read_text()
    again = _run(tmp_path)
    assert again["outcome"] == "skipped" and again["top1_error_final"] == on_disk["top1_error_final"]


def test_learning_rate_schedule_in_metrics_follows_the_step_rule(tmp_path):
    _run(
        tmp_path,
        "epochs=4",
        "base_lr=0.1",
        "schedule.name=step",
        "schedule.milestones=[0.5]",
        "schedule.gamma=0.1",
        "schedule.warmup_epochs=0",
    )
    (run,) = _run_dirs(tmp_path)
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    peak = 0.1 * 4 * 8 / 256
    assert lrs == pytest.approx([peak, peak, peak * 0.1, peak * 0.1])


def test_training_learns_the_synthetic_task(tmp_path):
    result = _run(tmp_path, "epochs=4", "base_lr=0.4")
    assert result["top1_error_final"] < 50.0  # chance is 75% with 4 classes


def test_non_finite_loss_is_a_diverged_result_not_a_crash(tmp_path):
    result = _run(tmp_path, "norm=none", "base_lr=1e6", "logger.check_every=1")
    assert result["status"] == "diverged" and result["diverged_epoch"] == 1
    (run,) = _run_dirs(tmp_path)
    assert json.loads((run / "result.json").read_text())["status"] == "diverged"
    assert _run(tmp_path, "norm=none", "base_lr=1e6", "logger.check_every=1")["outcome"] == "skipped"


@pytest.mark.parametrize(
    "override, words",
    [
        ("norm.groups=3", ["gn", "3"]),  # groups do not divide the channels
        ("per_gpu_batch=0", ["per_gpu_batch"]),
        ("schedule.name=linear", ["schedule.name"]),
        ("nosuchkey=1", ["nosuchkey"]),  # mistyped setting
        ("data.root=/nonexistent", ["/nonexistent"]),
    ],
)
def test_bad_input_fails_in_one_line_before_writing_anything(tmp_path, override, words):
    base = [a for a in TINY if not a.startswith("data")] if override.startswith("data.root") else TINY
    extra = ["data=fashion_mnist", "data.download=false"] if override.startswith("data.root") else []
    norm = ["norm=gn"] if override.startswith("norm.groups") else []
    proc = cli("train", *base, *extra, *norm, override, f"results_dir={tmp_path}")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not list(tmp_path.rglob("result.json")) and not (tmp_path / "adhoc").exists()


def _weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def test_sigkill_mid_epoch_then_rerun_gives_the_uninterrupted_result(tmp_path):
    # random crop and flip on: a resume must replay epoch 2's augmentation to match
    args = [
        *TINY,
        "data.num_train=4096",
        "epochs=3",
        "per_gpu_batch=4",
        "data.augment.crop_padding=2",
        "data.augment.flip=true",
    ]
    reference = cli("train", *args, f"results_dir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr
    command = [sys.executable, "-m", "normbench.cli", "train", *args, f"results_dir={tmp_path / 'killed'}"]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    def epoch_1_recorded() -> bool:  # its checkpoint, then its metrics row: no SIGKILL can wait for the second
        return any(p.read_text().strip() for p in (tmp_path / "killed").rglob("metrics.jsonl"))

    deadline = time.time() + 240
    while not epoch_1_recorded() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first epoch was recorded"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # epoch 1 is on disk: the kill lands in epoch 2 whatever the machine's speed
    proc.wait()
    (killed,) = [p.parent for p in (tmp_path / "killed").rglob("checkpoint.pt")]
    assert not (killed / "result.json").exists(), "the run finished before it was killed; make it longer"
    first_rows = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(first_rows) == 1
    resumed = cli("train", *args, f"results_dir={tmp_path / 'killed'}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume {killed} from epoch 1" in resumed.stdout  # resumed, not started over
    assert (killed / "metrics.jsonl").read_text().splitlines()[0] == first_rows[0]  # epoch 1 was not redone
    (ref,) = _run_dirs(tmp_path / "ref")
    a, b = json.loads((ref / "result.json").read_text()), json.loads((killed / "result.json").read_text())
    assert a["top1_error_final"] == b["top1_error_final"] and a["epochs_completed"] == b["epochs_completed"] == 3
    assert b["resumes"] == 1 and a["resumes"] == 0
    assert (ref / "metrics.jsonl").read_text().count("\n") == (killed / "metrics.jsonl").read_text().count("\n")
    wa, wb = _weights(ref), _weights(killed)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("norm", ["bn", "sn", "sn_batch_average"])
def test_two_process_ddp_bn_and_sn_match_one_process_emulation(tmp_path, norm):
    norm = ["norm=sn", "norm.inference=batch_average"] if norm == "sn_batch_average" else [f"norm={norm}"]
    args = [*TINY, *norm, "epochs=1", "data.num_train=128"]
    single = cli("train", *args, f"results_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "normbench",
            "train",
            *args,
            f"results_dir={tmp_path / 'two'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (one,), (two,) = _run_dirs(tmp_path / "one"), _run_dirs(tmp_path / "two")
    assert one.name == two.name  # same identifying config, same run
    wa, wb = _weights(one), _weights(two)
    assert any("running_mean" in k for k in wa)
    for key in wa:
        torch.testing.assert_close(wa[key].double(), wb[key].double(), rtol=1e-4, atol=1e-5, msg=key)
    ra, rb = json.loads((one / "result.json").read_text()), json.loads((two / "result.json").read_text())
    assert ra["top1_error_final"] == pytest.approx(rb["top1_error_final"], abs=1.0)


@pytest.mark.slow
def test_two_nodes_of_one_process_each_match_one_process_emulation(tmp_path):
    """Multi-node torchrun: two agents (`--nnodes=2`, node ranks 0 and 1, c10d rendezvous on localhost, gloo)
    as two real nodes would run them, against one process emulating both GPUs."""
    import socket

    args = [*TINY, "norm=bn", "epochs=1", "data.num_train=128"]
    single = cli("train", *args, f"results_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=normbench-two-nodes",
                "-m",
                "normbench",
                "train",
                *args,
                f"results_dir={tmp_path / 'two'}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    (one,), (two,) = _run_dirs(tmp_path / "one"), _run_dirs(tmp_path / "two")
    assert one.name == two.name
    wa, wb = _weights(one), _weights(two)
    for key in wa:
        torch.testing.assert_close(wa[key].double(), wb[key].double(), rtol=1e-4, atol=1e-5, msg=key)
    assert json.loads((two / "env.json").read_text())["world_size"] == 2


def test_channels_last_changes_nothing_beyond_float_error(tmp_path):
    # width 8: torch 2.14's CPU channels_last conv backward corrupts the heap on 4-channel layers
    plain = _run(tmp_path / "a", "epochs=1", "model.width=8", "fast.channels_last=false")
    fast = _run(tmp_path / "b", "epochs=1", "model.width=8", "fast.channels_last=true")
    assert plain["run_id"] == fast["run_id"]  # a speed switch is not part of the run's identity
    (a,), (b,) = _run_dirs(tmp_path / "a"), _run_dirs(tmp_path / "b")
    wa, wb = _weights(a), _weights(b)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("norm", sorted(p.stem for p in (REPO / "configs" / "norm").glob("*.yaml")))
def test_every_norm_config_trains_through_the_pipeline(tmp_path, norm):
    result = _run(tmp_path, f"norm={norm}", "epochs=4", "base_lr=0.4")
    assert result["status"] == "completed", result
    (run,) = _run_dirs(tmp_path)
    losses = [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0], losses  # it learns something
    if norm not in ("in", "none"):  # IN on 2x2 final maps and no norm at all stay near chance here (measured)
        assert result["top1_error_final"] < 65.0, result["top1_error_final"]  # chance: 75% with 4 classes
    if norm == "sn":
        weights = next(iter(result["sn_importance"].values()))
        assert sum(weights["mean"].values()) == pytest.approx(1.0)


def test_compiled_training_matches_eager_without_recompiling(tmp_path, monkeypatch, caplog):
    """torch.compile (inductor, C++ on the CPU) trains the same run: same directory, same numbers up to float
    reassociation. Static shapes hold: a partial last evaluation batch (128 = 48 + 48 + 32 images) and the
    switches between training, evaluation and the bn_eval passes recompile nothing (dynamo raises if they do)."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    common = ("epochs=2", "model.width=8", "data.eval_batch=48")
    eager = _run(tmp_path / "eager", *common)
    with caplog.at_level("INFO", logger="normbench"):
        compiled = _run(tmp_path / "compiled", *common, "fast.compile=true")
    assert compiled["status"] == "completed" and compiled["run_id"] == eager["run_id"]
    assert "torch.compile: the first training step took" in caplog.text
    (a,), (b,) = _run_dirs(tmp_path / "eager"), _run_dirs(tmp_path / "compiled")
    assert json.loads((b / "env.json").read_text())["fast"]["compile"] is True
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb) and not any(k.startswith("_orig_mod.") for k in wb)  # the raw model's keys
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=1e-4, msg=key)
    for key in ("top1_error_final", "top5_error_final"):  # the padded evaluation counts the same images
        assert abs(compiled[key] - eager[key]) <= 2 * 100 / 128, key
    torch._dynamo.reset()


@pytest.mark.parametrize("first,then", [("true", "false"), ("false", "true")])
def test_a_checkpoint_resumes_across_compiled_and_eager(tmp_path, monkeypatch, first, then):
    """Interrupted after epoch 1 (a KeyboardInterrupt in epoch 2's evaluation), trained one way, resumed the
    other: the final weights equal an uninterrupted eager run's up to float reassociation."""
    import normbench.train as trainer

    torch._dynamo.reset()
    common = ("epochs=2", "model.width=8")
    _run(tmp_path / "ref", *common)
    reference = _weights(_run_dirs(tmp_path / "ref")[0])
    real_evaluate, calls = trainer.evaluate, []

    def interrupt_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", interrupt_second_evaluation)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", *common, f"fast.compile={first}")
    monkeypatch.setattr(trainer, "evaluate", real_evaluate)
    resumed = _run(tmp_path / "run", *common, f"fast.compile={then}")
    assert resumed["status"] == "completed" and resumed["outcome"] == "resumed"
    weights = _weights(_run_dirs(tmp_path / "run")[0])
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=1e-3, atol=1e-4, msg=key)
    torch._dynamo.reset()
