"""The dashboards (normbench/tracking.py) read back with their own readers: TensorBoard's EventAccumulator for
the event files, wandb's protobuf records for the offline run (tests/wandb_offline.py). Per-step curves at the
global step, each epoch's row at the step that ends it, SN's importance weights, the environment, the HParams
record of a sweep's table, a resumed run whose curves equal an uninterrupted run's with every step once, and the
report's table and figure logged beside the runs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from wandb_offline import offline_runs, read_run

from conftest import REPO, TINY, cli, start_train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

WANDB_OFFLINE = {"WANDB_MODE": "offline"}


def _events(run_dir: Path):
    reader = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    reader.Reload()
    return reader


def _run_dir(root: Path) -> Path:
    (result,) = root.rglob("result.json")
    return result.parent


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_logs_step_curves_epoch_rows_sn_weights_and_its_environment_to_both_dashboards(tmp_path):
    done = cli(
        "train", *TINY, "logger.every_steps=2", "norm=sn", "logger.wandb.mode=offline", f"results_dir={tmp_path}",
        env=WANDB_OFFLINE,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run = _run_dir(tmp_path)
    rows, steps = _jsonl(run / "metrics.jsonl"), _jsonl(run / "steps.jsonl")
    result = json.loads((run / "result.json").read_text())
    steps_per_epoch = 256 // 32  # TINY: 256 images, 4 GPUs x 8 per step
    assert [r["step"] for r in steps] == list(range(2, 2 * steps_per_epoch + 1, 2))

    # SN's importance weights per epoch: the softmax of each layer's logits, averaged over the layers
    # (recomputed here from the final checkpoint's parameters)
    weights = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    for statistic in ("mean", "var"):
        logits = [v for k, v in weights.items() if k.endswith(f"{statistic}_weight")]
        assert logits, "no SN layer in the checkpoint"
        shares = torch.stack([torch.softmax(v.double(), 0) for v in logits]).mean(0)
        for kind, share in zip(("in", "ln", "bn"), shares.tolist(), strict=True):
            assert rows[-1][f"sn_{statistic}_{kind}"] == pytest.approx(share, rel=1e-6)

    events = _events(run)
    losses = events.Scalars("step/train_loss")
    assert [e.step for e in losses] == [r["step"] for r in steps]
    assert [e.value for e in losses] == pytest.approx([r["train_loss"] for r in steps], rel=1e-6)  # float32 there
    assert [e.step for e in events.Scalars("step/lr")] == [r["step"] for r in steps]
    for key in ("top1_error", "train_loss", "eval_loss", "sn_mean_bn", "sn_var_in"):
        curve = events.Scalars(f"epoch/{key}")
        assert [e.step for e in curve] == [steps_per_epoch * r["epoch"] for r in rows]
        assert [e.value for e in curve] == pytest.approx([r[key] for r in rows], rel=1e-6)
    # an epoch's loss is the mean of its step losses: the per-step curve's intervals average to it
    per_epoch = [sum(e.value for e in losses[i : i + 4]) / 4 for i in (0, 4)]
    assert per_epoch == pytest.approx([r["train_loss"] for r in rows], rel=1e-5)

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    assert content, "no HParams record"
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["norm.name"].string_value == "sn"
    assert session.hparams["per_gpu_batch"].number_value == 8 and session.hparams["gpus"].number_value == 4
    assert session.hparams["env.torch"].string_value == torch.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert session.hparams["env.commit"].string_value.startswith(head[:10])
    final = events.Scalars("final/top1_error_final")
    assert final[-1].value == pytest.approx(result["top1_error_final"], rel=1e-6)
    assert final[-1].step == 2 * steps_per_epoch

    (run_file,) = offline_runs(run)
    logged = read_run(run_file)
    config = result["config"]
    assert logged.run_id == f"{config['experiment']}-{result['run_id']}"
    assert logged.group == f"{config['experiment']}-{config['model']['id']}-{config['data']['name']}"
    assert logged.config["norm"]["name"] == "sn" and logged.config["env"]["versions"]["torch"] == torch.__version__
    by_step = [h for h in logged.history if "step/train_loss" in h]
    assert [h["_step"] for h in by_step] == [r["step"] for r in steps]
    assert [h["step/train_loss"] for h in by_step] == [r["train_loss"] for r in steps]  # exact: JSON both ways
    by_epoch = [h for h in logged.history if "epoch/top1_error" in h]
    assert [h["_step"] for h in by_epoch] == [steps_per_epoch * r["epoch"] for r in rows]
    assert [h["epoch/sn_mean_bn"] for h in by_epoch] == [r["sn_mean_bn"] for r in rows]
    assert logged.summary["top1_error_final"] == result["top1_error_final"]


# A resumed run against an uninterrupted one (the same settings: checkpoint.every_minutes is not in the run id).
# Logging every 7 steps: a resume inside an epoch mostly lands inside an interval.
RESUMABLE = [*TINY, "data.num_train=4096", "logger.every_steps=7", "logger.wandb.mode=offline"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    done = cli("train", *RESUMABLE, "checkpoint.every_minutes=0", f"results_dir={root}", env=WANDB_OFFLINE)
    assert done.returncode == 0, done.stderr
    return _run_dir(root)


def _kill_in_epoch_2(args: list[str], root: Path, sig: int) -> list[Path]:
    """Start a run, send ``sig`` in its second epoch; returns the event files it left."""
    proc = start_train(*args, env=WANDB_OFFLINE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not any(p.read_text().strip() for p in root.rglob("metrics.jsonl")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first epoch was recorded"
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2: steps past the epoch checkpoint reach steps.jsonl and the event file
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return sorted(root.rglob("events.out.tfevents.*"))


def _assert_same_curves(run: Path, reference: Path) -> list[dict]:
    steps, expected = _jsonl(run / "steps.jsonl"), _jsonl(reference / "steps.jsonl")
    assert [r["step"] for r in steps] == [r["step"] for r in expected]  # each step once, none missing
    for key in ("train_loss", "lr"):  # the resume is exact: so are the curves
        assert [r[key] for r in steps] == [r[key] for r in expected], key
    reference_events = _events(reference).Scalars("step/train_loss")
    curve = _events(run).Scalars("step/train_loss")  # the legacy loader: it applies no purge
    assert [(e.step, e.value) for e in curve] == [(e.step, e.value) for e in reference_events]
    attempts = offline_runs(run)
    assert len(attempts) == 2
    newest = [h for h in read_run(attempts[-1]).history if "step/train_loss" in h]
    assert [(h["_step"], h["step/train_loss"]) for h in newest] == [(r["step"], r["train_loss"]) for r in expected]
    return steps


def test_a_run_resumed_inside_an_epoch_draws_the_uninterrupted_curves(tmp_path, uninterrupted):
    args = [*RESUMABLE, "checkpoint.every_minutes=10", f"results_dir={tmp_path}"]
    left = _kill_in_epoch_2(args, tmp_path, signal.SIGTERM)  # waits for the step's end: a step checkpoint
    rerun = cli("train", *args, env=WANDB_OFFLINE)
    assert rerun.returncode == 0, rerun.stderr
    step = int(re.search(r"from epoch 2 step (\d+)", rerun.stdout + rerun.stderr).group(1))
    run = _run_dir(tmp_path)
    assert not set(left) & set(run.rglob("events.out.tfevents.*")), "the killed attempt's event file is still read"
    steps = _assert_same_curves(run, uninterrupted)
    # the interval that spans the resume has no images/s (its time is split between two processes)
    spanning = [r for r in steps if r["step"] > 128 + step][0] if step % 7 else None
    assert [r["step"] for r in steps if "images_per_s" not in r] == ([spanning["step"]] if spanning else [])


def test_a_run_killed_without_a_step_checkpoint_logs_the_lost_steps_again_once(tmp_path, uninterrupted):
    args = [*RESUMABLE, "checkpoint.every_minutes=0", f"results_dir={tmp_path}"]
    _kill_in_epoch_2(args, tmp_path, signal.SIGKILL)
    run = _run_dir(tmp_path) if list(tmp_path.rglob("result.json")) else next(tmp_path.rglob("steps.jsonl")).parent
    assert max(r["step"] for r in _jsonl(run / "steps.jsonl")) > 128, "killed before epoch 2 logged a step"
    rerun = cli("train", *args, env=WANDB_OFFLINE)
    assert rerun.returncode == 0, rerun.stderr
    assert "from epoch 1" in rerun.stdout + rerun.stderr
    _assert_same_curves(run, uninterrupted)


def test_the_report_logs_its_table_and_figure_to_tensorboard_and_the_runs_wandb_group(tmp_path):
    import csv
    import io

    from PIL import Image
    from test_report import make_table2

    root = tmp_path / "results"
    make_table2(root)
    args = ["report", "experiment=gn_table2", f"results_dir={root}", "wandb=offline", "tensorboard=true"]
    done = cli(*args, env=WANDB_OFFLINE)
    assert done.returncode == 0, done.stderr
    assert "logged to TensorBoard" in done.stdout and "logged to wandb (offline)" in done.stdout
    report_dir = root / "gn_table2" / "report"
    png = Image.open(root / "reports" / "gn_table2.png")
    markdown = (root / "reports" / "gn_table2.md").read_text()
    rows = list(csv.reader(io.StringIO((root / "reports" / "gn_table2.csv").read_text())))

    events = _events(report_dir)
    (image,) = events.Images("report/figure")
    assert (image.width, image.height) == png.size
    assert Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB").tobytes() == png.convert("RGB").tobytes()
    (text,) = events.Tensors("report/markdown/text_summary")
    assert text.tensor_proto.string_val[0].decode() == markdown

    (run_file,) = offline_runs(report_dir)
    logged = read_run(run_file)
    assert logged.group == "gn_table2-cifar_resnet20-fashion_mnist"  # the runs' group: experiment-model-data
    assert logged.job_type == "report"
    (entry,) = [h for h in logged.history if "report/table" in h]
    assert entry["report/table"]["_type"] == "table-file" and entry["report/figure"]["_type"] == "image-file"
    table = json.loads((run_file.parent / "files" / entry["report/table"]["path"]).read_text())
    assert table["columns"] == rows[0]
    assert len(table["data"]) == len(rows) - 1
    for logged_row, csv_row in zip(table["data"], rows[1:], strict=True):  # numbers as numbers, blanks as None
        assert ["" if v is None else v for v in logged_row] == [
            float(v) if k in ("mean", "std", "paper") and v else int(v) if k.startswith("n_") and v else v
            for k, v in zip(rows[0], csv_row, strict=True)
        ]

    again = cli(*args[:-2], "tensorboard=true")  # a second publication replaces the first in TensorBoard
    assert again.returncode == 0, again.stderr
    assert len(list((report_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_bad_dashboard_option_of_the_report_is_one_line_naming_the_choices(tmp_path):
    done = cli("report", "experiment=gn_table2", f"results_dir={tmp_path}", "wandb=yes")
    assert done.returncode == 2
    assert done.stderr.strip() == "normbench report: error: wandb='yes'; use one of disabled, offline, online"


class _Batches:
    """Ten one-image steps whose losses are 1, 2, ..., 10 (step s: loss s + 1): the curve's values are known."""

    def __init__(self):
        self.start = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.start = start_step

    def __len__(self) -> int:
        return 10

    def __iter__(self):
        return ((torch.zeros(1, 1), torch.tensor([s + 1.0])) for s in range(self.start, 10))


def _per_step_points(resume: dict | None = None, compile_pending: bool = False) -> list[tuple[int, float, bool]]:
    """(global step, train_loss, has images/s) of each point train_one_epoch logs every 3 steps."""
    from normbench.distributed import Dist
    from normbench.loop import Loop, train_one_epoch

    weight = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    points = []
    loop = Loop(
        device=torch.device("cpu"), dist=Dist(), raw_model=torch.nn.Module(), channels_last=False,
        sync_buffers_every_step=False, show_progress=False, amp_dtype=None,
        scaler=torch.amp.GradScaler("cpu", enabled=False), images_per_step=1, epochs=1, check_every=50,
        forward_loss=lambda images, labels: weight * 0 + labels.sum(), eval_forward=None, every_steps=3,
        compile_pending=compile_pending,
        log_steps=lambda scalars, step: points.append((step, scalars["train_loss"], "images_per_s" in scalars)),
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    train_one_epoch(torch.nn.Module(), _Batches(), optimizer, scheduler, 0, loop, resume)
    return points


def test_an_interval_has_a_rate_unless_it_spans_a_resume_or_holds_the_compiling_step():
    # losses 1..10; points at steps 3, 6, 9, each the mean of its interval's losses
    assert _per_step_points() == [(3, 2.0, True), (6, 5.0, True), (9, 8.0, True)]
    # resumed after step 4 (the last point at step 3): the interval 4-6 spans two processes: the same mean, no rate
    inside = {"step": 4, "loss_sum": torch.tensor(10.0), "logged_step": 3, "logged_loss_sum": 6.0}
    assert _per_step_points(inside) == [(6, 5.0, False), (9, 8.0, True)]
    # resumed exactly at a point: the next interval lies wholly in this process and has its rate
    at_point = {"step": 3, "loss_sum": torch.tensor(6.0), "logged_step": 3, "logged_loss_sum": 6.0}
    assert _per_step_points(at_point) == [(6, 5.0, True), (9, 8.0, True)]
    # the interval that holds the compiling step has no rate; the next ones do
    assert _per_step_points(compile_pending=True) == [(3, 2.0, False), (6, 5.0, True), (9, 8.0, True)]
