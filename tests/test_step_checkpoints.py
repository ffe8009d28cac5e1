"""Step checkpoints (normbench/checkpoints.py): a run killed inside an epoch resumes at the step it reached and
ends bit for bit where the uninterrupted run ends. Real processes, real signals (SIGTERM held to the end of the
step, SIGKILL after a timed checkpoint), the on-device loader, the ImageFolder loader with workers (PIL and the
batched decoder) and two-process gloo DDP. The reference runs write no step checkpoints at all
(checkpoint.every_minutes=0), so these tests also show that writing them changes no number."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normbench import checkpoints
from normbench.runs import interrupts

from conftest import TINY, cli, start_train, torchrun

# 2 epochs of 128 steps (4 GPUs x 8 images): about a second each, long enough to stop inside one
SYNTHETIC = [*TINY, "data.num_train=4096", "data.augment.crop_padding=2", "data.augment.flip=true"]
OFTEN = "checkpoint.every_minutes=0.0005"  # a step checkpoint about every 30 ms: several per epoch
NEVER = "checkpoint.every_minutes=0"


def _start(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    # its own process group: a signal reaches every process of it (torchrun's workers too), as from a terminal
    return start_train(
        *args, launcher=launcher, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop_after(proc: subprocess.Popen, line_start: str, signum: int, timeout: float = 240) -> str:
    """Read the run's log until a line containing ``line_start``, then send ``signum`` to its process group;
    returns the whole log."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if line_start in line:
            os.killpg(proc.pid, signum)
            break
        assert time.time() < deadline, "".join(seen)
    else:
        pytest.fail("the run ended before " + line_start + "\n" + "".join(seen))
    seen.append(proc.stdout.read())
    proc.wait(timeout=120)
    return "".join(seen)


def _run_dir(root: Path) -> Path:
    (result,) = root.rglob("result.json")
    return result.parent


def _assert_identical(run: Path, reference: Path) -> None:
    """Bit for bit: every epoch's loss and errors, the final evaluations, every weight and buffer."""
    a, b = (json.loads((r / "result.json").read_text()) for r in (reference, run))
    assert b["status"] == "completed", b
    for key in ("top1_error_final", "top1_error_median_last5", "top1_error_by_eval", "epochs_completed"):
        assert b.get(key) == a.get(key), key
    rows_a, rows_b = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (reference, run))
    fields = ("train_loss", "top1_error", "top5_error", "eval_loss", "lr")
    assert [[row[f] for f in fields] for row in rows_b] == [[row[f] for f in fields] for row in rows_a]
    wa, wb = (torch.load(r / "checkpoint.pt", map_location="cpu", weights_only=True)["model"] for r in (reference, run))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _resumed_inside_epoch(log: str, epoch: int) -> int:
    """The step a rerun's log says it resumed at, inside ``epoch`` (1-based)."""
    found = re.search(rf"resume \S+ from epoch {epoch} step (\d+) of \d+ \(checkpoint written [0-9: -]+\)", log)
    assert found, log
    return int(found.group(1))


@pytest.fixture(scope="module")
def synthetic_reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    done = cli("train", *SYNTHETIC, NEVER, f"results_dir={root}")
    assert done.returncode == 0, done.stderr
    return _run_dir(root)


def test_sigterm_inside_an_epoch_writes_a_step_checkpoint_and_the_rerun_ends_bit_for_bit(tmp_path, synthetic_reference):
    log = _stop_after(
        _start([*SYNTHETIC, OFTEN, f"results_dir={tmp_path}"]), "step checkpoint: epoch 1 step", signal.SIGTERM
    )
    assert re.search(r"step checkpoint: epoch 1 step \d+ of 128 \([0-9.]+ MB in [0-9.]+s\), for SIGTERM", log), log
    assert "normbench train: interrupted by SIGTERM; the run is recorded as interrupted" in log
    result = json.loads((_run_dir(tmp_path) / "result.json").read_text())
    assert result["status"] == "interrupted" and result["epochs_completed"] == 0
    held = torch.load(_run_dir(tmp_path) / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert held["epoch"] == 0 and 0 < held["step"] < 128
    assert re.search(rf"after 0 of 2 epochs and {held['step']} steps of epoch 1 .*resume from epoch 1 step", log)

    rerun = cli("train", *SYNTHETIC, OFTEN, f"results_dir={tmp_path}")
    assert rerun.returncode == 0, rerun.stderr
    assert _resumed_inside_epoch(rerun.stdout, 1) == held["step"]
    _assert_identical(_run_dir(tmp_path), synthetic_reference)
    assert not list(_run_dir(tmp_path).glob(".*.tmp"))  # no step checkpoint left behind beside checkpoint.pt


def test_sigkill_after_a_timed_step_checkpoint_resumes_at_it_bit_for_bit(tmp_path, synthetic_reference):
    proc = _start([*SYNTHETIC, OFTEN, f"results_dir={tmp_path}"])
    log = _stop_after(proc, "step checkpoint: epoch 2 step", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, log
    rerun = cli("train", *SYNTHETIC, OFTEN, f"results_dir={tmp_path}")
    assert rerun.returncode == 0, rerun.stderr
    assert 0 < _resumed_inside_epoch(rerun.stdout, 2) < 128
    _assert_identical(_run_dir(tmp_path), synthetic_reference)


# ---- the ImageFolder loader: JPEGs decoded in DataLoader workers -------------------------------------------
@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    """2 classes x 96 training JPEGs, 2 x 8 validation ones, 24x28 pixels."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("val", 8)):
        for k, cls in enumerate(("ant", "bee")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)
                pixels[..., k] = 255
                Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg", quality=90)
    return root


def _imagefolder_run(root: Path, decoder: str) -> list[str]:
    return [
        "data=imagenet",
        f"data.root={root}",
        f"data.decoder={decoder}",
        "data.image_size=16",
        "data.workers=2",
        "data.eval_batch=8",
        "model=cifar_resnet8",
        "model.width=4",
        "model.norm_groups=2",
        "gpus=4",
        "per_gpu_batch=2",  # 24 steps an epoch
        "epochs=2",
        "bn_eval.precise_bn_images=16",
        "logger.wandb.mode=disabled",
        "logger.progress=false",
    ]


@pytest.mark.parametrize("decoder", ["pil", "gpu"])
def test_imagefolder_with_workers_resumes_inside_the_epoch_bit_for_bit(tmp_path, jpeg_folder, decoder):
    run = _imagefolder_run(jpeg_folder, decoder)
    done = cli("train", *run, NEVER, f"results_dir={tmp_path / 'reference'}")
    assert done.returncode == 0, done.stderr
    stopped = tmp_path / "stopped"
    every_step = "checkpoint.every_minutes=0.00001"  # a step checkpoint after (nearly) every step
    log = _stop_after(
        _start([*run, every_step, f"results_dir={stopped}"]), "step checkpoint: epoch 1 step", signal.SIGTERM
    )
    assert "interrupted by SIGTERM" in log, log
    rerun = cli("train", *run, every_step, f"results_dir={stopped}")
    assert rerun.returncode == 0, rerun.stderr
    assert 0 < _resumed_inside_epoch(rerun.stdout, 1) < 24
    _assert_identical(_run_dir(stopped), _run_dir(tmp_path / "reference"))


# ---- two processes (torchrun, gloo) -------------------------------------------------------------------------
def test_two_process_ddp_resumes_every_rank_at_the_same_step_bit_for_bit(tmp_path):
    run = [*SYNTHETIC, "logger.check_every=1"]  # the ranks agree on a checkpoint at every step
    done = torchrun(*run, NEVER, f"results_dir={tmp_path / 'reference'}")
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = tmp_path / "stopped"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "normbench"]
    log = _stop_after(
        _start([*run, OFTEN, f"results_dir={stopped}"], launcher), "step checkpoint: epoch 1 step", signal.SIGTERM
    )
    assert "for SIGTERM" in log, log[-3000:]
    held = torch.load(_run_dir(stopped) / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert held["world_size"] == 2 and len(held["ranks"]) == 2 and 0 < held["step"] < 128
    # the per-GPU running statistics differ between the ranks inside an epoch: both are kept
    assert not torch.equal(
        held["ranks"][0]["buffers"]["bn1.running_mean"], held["ranks"][1]["buffers"]["bn1.running_mean"]
    )
    rerun = torchrun(*run, OFTEN, f"results_dir={stopped}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _resumed_inside_epoch(rerun.stdout, 1) == held["step"]
    _assert_identical(_run_dir(stopped), _run_dir(tmp_path / "reference"))


# ---- the parts, in one process -------------------------------------------------------------------------------
def test_random_states_come_back_exactly():
    import random

    state = checkpoints.random_states()
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    torch.rand(3), np.random.rand(3), random.random()  # move every generator on
    again = checkpoints.random_states()
    torch.save(state, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    checkpoints.set_random_states(torch.load(buffer, weights_only=True))  # through the file, as a resume
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(5), expected[1])
    assert [random.random() for _ in range(5)] == expected[2]
    checkpoints.set_random_states(again)


def test_a_costly_checkpoint_says_so_once_and_a_waiting_signal_is_delivered_after_the_write(caplog):
    from normbench.distributed import Dist

    writes = []

    def save(epoch, steps_done, partial):
        time.sleep(0.01)  # 10 ms of a 60 ms interval: over 5%
        writes.append((epoch, steps_done, partial()))
        return 1000

    saver = checkpoints.StepCheckpoints(0.001, save, Dist(), torch.device("cpu"))
    saver.last -= 1  # due
    with caplog.at_level(logging.INFO, logger="normbench"):
        saver.after_step(0, 3, 10, at_check=False, partial=lambda: {"loss_sum": 1.0})
        saver.last -= 1
        saver.after_step(0, 4, 10, at_check=False, partial=lambda: {"loss_sum": 2.0})
        saver.after_step(0, 5, 10, at_check=False, partial=lambda: {})  # not due: nothing written
    assert writes == [(0, 3, {"loss_sum": 1.0}), (0, 4, {"loss_sum": 2.0})]
    assert len([r for r in caplog.records if "raise checkpoint.every_minutes" in r.getMessage()]) == 1
    assert saver.written == (0, 4)

    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))  # a foreign handler
    try:
        with interrupts.holding_to_step_end():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert calls == [] and interrupts.held_signal() == signal.SIGUSR1  # waits for the step's end
            saver.after_step(0, 6, 10, at_check=False, partial=lambda: {})  # the signal: written, then delivered
            assert calls == [signal.SIGUSR1] and writes[-1][:2] == (0, 6)
    finally:
        signal.signal(signal.SIGUSR1, previous)
