"""TensorBoard beside wandb (normbench/tracking.py), read back with TensorBoard's own reader: per-step curves at
the global step, each epoch's row at the step that ends it, the HParams record of a sweep's table, and a
resumed run whose curves hold every step once."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY, cli, start_train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(run_dir: Path):
    reader = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    reader.Reload()
    return reader


def _run_dir(root: Path) -> Path:
    (result,) = root.rglob("result.json")
    return result.parent


def test_event_files_hold_step_curves_epoch_rows_and_the_hparams_of_the_run(tmp_path):
    done = cli("train", *TINY, "logger.every_steps=2", "norm=gn", f"results_dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    run = _run_dir(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = _events(run)
    steps_per_epoch = 256 // 32  # TINY: 256 images, 4 GPUs x 8 per step
    losses = events.Scalars("step/train_loss")
    assert [e.step for e in losses] == list(range(2, 2 * steps_per_epoch + 1, 2))
    assert [e.step for e in events.Scalars("step/lr")] == [e.step for e in losses]
    for key in ("top1_error", "train_loss", "eval_loss"):
        curve = events.Scalars(f"epoch/{key}")
        assert [e.step for e in curve] == [steps_per_epoch * r["epoch"] for r in rows]
        assert [e.value for e in curve] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 in the file
    # an epoch's loss is the mean of its step losses: the per-step curve's intervals average to it
    per_epoch = [sum(e.value for e in losses[i : i + 4]) / 4 for i in (0, 4)]
    assert per_epoch == pytest.approx([r["train_loss"] for r in rows], rel=1e-5)

    result = json.loads((run / "result.json").read_text())
    content = events.PluginTagToContent("hparams")
    assert content, "no HParams record"
    from tensorboard.plugins.hparams import plugin_data_pb2

    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["norm.name"].string_value == "gn"
    assert session.hparams["per_gpu_batch"].number_value == 8 and session.hparams["gpus"].number_value == 4
    final = _events(run).Scalars("final/top1_error_final")
    assert final[-1].value == pytest.approx(result["top1_error_final"], rel=1e-6)


def test_a_resumed_run_continues_the_curves_with_every_step_once(tmp_path):
    args = [
        *TINY,
        "data.num_train=4096",
        "logger.every_steps=4",
        "checkpoint.every_minutes=0",
        f"results_dir={tmp_path}",
    ]
    proc = start_train(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not any(p.read_text().strip() for p in tmp_path.rglob("metrics.jsonl")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first epoch was recorded"
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2: steps past the checkpoint reach the event file, then the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = cli("train", *args)
    assert rerun.returncode == 0, rerun.stderr
    assert "from epoch 1" in rerun.stdout
    run = _run_dir(tmp_path)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # two attempts, two files
    steps = [e.step for e in _events(run).Scalars("step/train_loss")]
    assert steps == list(range(4, 2 * 128 + 1, 4))  # each once, none missing
