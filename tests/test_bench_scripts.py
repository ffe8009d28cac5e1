"""Smoke tests of the benchmark scripts: they run, print one table and write their files. BN's row is BN
against itself (1.00x by construction): these tests check the plumbing, never a speed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "bench_train.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_train(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """scripts/bench_train.py in a subprocess on the CPU (one thread); fails the test if it exits non-zero."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| norm "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_bench_train_ci_smoke_bn_against_itself_is_1x(tmp_path):
    proc = _bench_train("--ci", "--quiet", "--out", str(tmp_path / "bench"))
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("bench_train | device: cpu") and "torch " + _torch_version() in lines[0]
    assert "dtype float32" in lines[0]
    header = next(line for line in lines if line.startswith("| norm "))
    assert header == "| norm | 2x4 img/s | vs BN | 2x2 img/s | vs BN | per image vs 2x4 |"
    assert sum(line.startswith("| norm ") for line in lines) == 1  # ONE table
    rows = _table_rows(proc.stdout)
    assert list(rows) == ["bn", "gn", "sn", "plain_bn@8", "hand_loop bn", "trainer bn"]
    baselines = {k: rows.pop(k) for k in ("plain_bn@8", "hand_loop bn", "trainer bn")}
    for cells in baselines.values():  # measured at the reference batch only
        assert float(cells[0]) > 0 and float(cells[1]) > 0 and cells[2:] == ["-", "-", "-"]
    assert any(line.startswith("target: trainer bn >= 0.95x hand_loop bn at 2x4: ") for line in lines)
    bn = rows["bn"]
    assert bn[1] == "1.00" and bn[3] == "1.00"  # BN's ratio to BN at every batch
    for name, cells in rows.items():
        big, ratio_big, small, ratio_small, per_image = cells
        assert float(big) > 0 and float(small) > 0, name
        assert float(ratio_big) > 0 and float(ratio_small) > 0 and float(per_image) > 0, name
    assert any(line.startswith("target: bn at 2x2") for line in lines)

    md = (tmp_path / "bench.md").read_text()
    assert "| bn |" in md and lines[0] in md
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["torch"] == _torch_version() and data["device"] == "cpu" and "commit" in data["git"]
    assert data["args"]["ci"] is True and data["args"]["model"] == "cifar_resnet8"
    results = {(r["norm"], r["per_gpu_batch"]): r for r in data["results"]}
    assert set(results) == {(n, b) for n in ("bn", "gn", "sn") for b in (4, 2)} | {
        (n, 4) for n in ("plain_bn@8", "hand_loop bn", "trainer bn")
    }
    assert results[("plain_bn@8", 4)]["layer_options"] == {}  # nn.BatchNorm2d: no per-GPU statistics
    results = {k: r for k, r in results.items() if k[0] in ("bn", "gn", "sn")}
    for (name, b), r in results.items():
        assert len(r["samples"]) == 3 and r["images_per_step"] == 2 * b
        assert ("per_gpu_batch" in r["layer_options"]) == (name in ("bn", "sn"))  # only layers that take it
        assert r["layer_options"].get("per_gpu_batch", b) == b
    assert results[("bn", 2)]["vs_bn"] == 1.0


@pytest.mark.slow
def test_bench_train_compiled_mode_and_gpu_json_merge(tmp_path):
    """--mode compiled runs the trainer's compiled step (and compiles the hand loop's model); --json merges one
    model's section into the file and keeps the others (a GPU session's ResNet-50 and CIFAR runs)."""
    gpu_json = tmp_path / "gpu.json"
    gpu_json.write_text(json.dumps({"cifar_resnet20": {"epoch_s": {"bn@8x32": 1.0}}}))
    args = ["--ci", "--quiet", "--mode", "compiled", "--norms", "bn", "--per-gpu-batch", "4", "--repeats", "1"]
    proc = _bench_train(*args, "--json", str(gpu_json), timeout=300)
    assert "| mode compiled" in proc.stdout.splitlines()[0]
    data = json.loads(gpu_json.read_text())
    assert data["cifar_resnet20"] == {"epoch_s": {"bn@8x32": 1.0}}  # another model's section is kept
    section = data["cifar_resnet8"]
    assert section["compiled"] is True and section["cuda_graphs"] is False
    assert set(section["modes"].values()) == {"compiled"}
    assert set(section["img_per_s"]) == {"bn@2x4", "plain_bn@8", "hand_loop bn@2x4", "trainer bn@2x4"}
    assert all(v > 0 for v in section["img_per_s"].values())
    assert data["torch"] == _torch_version() and data["date"] and "device" in data


def test_bench_train_cuda_graphs_mode_needs_cuda():
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--mode", "cuda_graphs"])


def _torch_version() -> str:
    import torch

    return torch.__version__


def test_bench_train_arguments():
    bench = _load_script()
    args = bench.parse_args(["--device", "cpu", "--norms", "gn:groups=4,sn:use_bn=false", "--per-gpu-batch", "8,1"])
    assert args.model == "cifar_resnet8" and args.image_size == 28 and not args.channels_last
    assert args.norm_specs == [
        ("bn", "bn", {}),
        ("gn:groups=4", "gn", {"groups": 4}),
        ("sn:use_bn=false", "sn", {"use_bn": False}),
    ]  # bn added as the baseline
    assert args.batches == [8, 1] and args.num_classes == 10
    cfg = bench.model_config(args)
    # the layer options of `normbench train model=cifar_resnet8 norm=NAME per_gpu_batch=B` (configs/norm/*.yaml)
    assert bench.layer_options("gn", {}, 1, cfg) == {"groups": 8, "channels_per_group": None}  # model's norm_groups
    assert bench.layer_options("gn", {"channels_per_group": 4}, 1, cfg) == {"groups": None, "channels_per_group": 4}
    assert bench.layer_options("bn", {}, 1, cfg) == {"momentum": 0.1, "eps": 1e-5, "per_gpu_batch": 1}
    assert bench.layer_options("sn", {"use_bn": False}, 2, cfg) == {
        "use_bn": False,
        "inference": "moving_average",
        "momentum": 0.1,
        "per_gpu_batch": 2,
    }
    assert bench.layer_options("ln", {}, 2, cfg) == {}
    imagenet = bench.parse_args(["--device", "cpu", "--model", "resnet50"])
    assert imagenet.num_classes == 1000 and bench.model_config(imagenet).norm_groups == 32


@pytest.mark.slow
def test_bench_norms_smoke_prints_one_table_with_targets():
    """A tiny shape, one round: every layer row, the paired ratios of the baselines to themselves are 1.00."""
    script = REPO / "scripts" / "bench_norms.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--shapes", "16x32x4x4", "--device", "cpu", "--repeats", "2", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("normbench norm layers:") and sum("layer (vs baseline)" in x for x in lines) == 1
    assert re.search(r"numba \S+ \(serial\)", lines[0]), lines[0]  # what ran EvoNorm's kernels: one thread
    rows = {line.split("  ")[0]: line for line in lines[3:]}
    assert any(k.startswith("bn per_gpu_batch=2 (8 GPUs, default impl)") for k in rows)
    targets = [line for line in lines if "<= " in line]
    assert len(targets) == 7  # gn vs F.group_norm, per-GPU bn, sn, sn per-GPU, pono, evonorm_b0, evonorm_s0
    for line in lines[3:]:
        if "(vs " in line:
            assert float(line.split("x ")[0].split()[-1]) > 0, line


@pytest.mark.slow
def test_bench_data_smoke_one_table_and_files(tmp_path):
    """scripts/bench_data.py at toy size: the pil rows and the gpu row (decoding on the CPU), one table, its
    files; the fastest pil row is 1.00x itself by construction."""
    out = tmp_path / "bench"
    args = ["--images", "32", "--batch", "16", "--width", "64", "--height", "48", "--image-size", "32"]
    args += ["--workers", "0,1", "--gpu-workers", "0", "--repeats", "1", "--warmup", "1", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("bench_data | device: cpu") and "torchvision" in lines[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("| ")]
    header = ["pipeline", "workers", "augment", "img/s", "vs best pil", "vs crop_flip", "spread"]
    assert rows[0] == header and len(rows) == 7
    pipelines = [("pil", "0"), ("pil", "1"), ("gpu", "0")]
    assert [(r[0].split()[0], r[1], r[2]) for r in rows[1:]] == [
        (*p, a) for a in ("crop_flip", "official") for p in pipelines
    ]
    assert all(float(r[3]) > 0 for r in rows[1:])
    assert max(float(r[4]) for r in rows[1:3]) == 1.0 and max(float(r[4]) for r in rows[4:6]) == 1.0  # per augment
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["device"] == "cpu" and "commit" in data["git"] and len(data["results"]) == 6
    assert all(r["images_per_epoch"] == 32 and len(r["samples"]) == 1 for r in data["results"])
    plain, colour = data["results"][:3], data["results"][3:]
    for a, b, row in zip(plain, colour, rows[4:]):  # the cost column: official / crop_flip of the same pipeline
        assert a["vs_crop_flip"] is None and float(row[5]) == round(b["images_per_s"] / a["images_per_s"], 2)
    assert lines[0] in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_bench_sweep_smoke_times_one_and_two_workers(tmp_path):
    """scripts/bench_sweep.py on a tiny synthetic grid: one table, a row per worker count with every run of the
    grid trained, 1.00x for the baseline by construction, and its files."""
    from conftest import TINY

    extra = " ".join(a for a in TINY if not a.startswith(("per_gpu_batch=", "epochs="))) + " epochs=1"
    args = ["--preset", "none", "--grid", "per_gpu_batch=8,4", "--workers", "1,2", "--extra", extra]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_sweep.py"), *args, "--out", str(tmp_path / "sweep")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines() if line[:3] == "| 1"]
    rows += [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines() if line[:3] == "| 2"]
    assert [(r[0], r[1]) for r in rows] == [("1", "4"), ("2", "4")] and rows[0][4] == "1.00x", proc.stdout
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["workers"] for r in data["rows"]] == [1, 2] and all(r["runs"] == 4 for r in data["rows"])
