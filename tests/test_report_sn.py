"""SN table report: accuracy = 100 - error, the not-run BN (8,1) cell, importance-weight averaging.

Paper numbers typed from docs/papers.md section 1, not read from normbench.report.papers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from normbench.report import build_report

SETTINGS = ["(8,32)", "(8,16)", "(8,8)", "(8,4)", "(8,2)", "(1,16)", "(1,32)", "(8,1)", "(1,8)"]
PAPER_SN = {  # top-1 accuracy %
    "BN": [76.4, 76.3, 75.2, 72.7, 65.3, 76.2, 76.5, None, 75.4],
    "GN": [75.9, 75.8, 76.0, 75.8, 75.9, 75.9, 75.8, 75.5, 75.5],
    "SN": [76.9, 76.7, 76.7, 75.9, 75.6, 76.3, 76.6, 75.0, 75.9],
}
PAPER_BN_SHARE = {"(8,32)": 0.58, "(8,2)": 0.15, "(8,1)": 0.0}

_n = [0]


def write(root: Path, norm, gpus, b, seed=0, error=None, status="completed", importance=None, opts=None):
    _n[0] += 1
    run_dir = f"sn_table/{norm}-{gpus}x{b}-s{seed}-{_n[0]}"
    res = {
        "status": status,
        "experiment": "sn_table",
        "run_id": f"sn{_n[0]:010d}",
        "run_dir": run_dir,
        "model": "cifar_resnet20",
        "data": "fashion_mnist",
        "norm": norm,
        "norm_options": opts or {},
        "gpus": gpus,
        "per_gpu_batch": b,
        "seed": seed,
        "epochs": 4,
        "epochs_completed": 4,
        "top1_error_final": error,
        "top1_error_median_last5": error,
        "top5_error_final": None,
        "diverged_epoch": None,
        "error_message": None,
        "wall_time_s": 1.0,
        "sn_importance": importance,
        "git": {"commit": "feedbeef00", "dirty": True},
        "config": {},
    }
    p = root / run_dir / "result.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(res))


def layer(mean, var):
    return {"mean": dict(zip(("in", "ln", "bn"), mean)), "var": dict(zip(("in", "ln", "bn"), var))}


def make_sn(root: Path):
    write(root, "bn", 8, 32, 0, 24.0)
    write(root, "bn", 8, 32, 1, 26.0)  # acc 75.0 ± 1.41421
    write(root, "gn", 8, 32, 0, 25.0, opts={"groups": 32})  # acc 75.0 (n=1)
    write(
        root,
        "sn",
        8,
        32,
        0,
        22.0,
        importance={
            "layer1.0.bn1": layer((0.2, 0.3, 0.5), (0.1, 0.1, 0.8)),
            "layer1.0.bn2": layer((0.4, 0.4, 0.2), (0.3, 0.3, 0.4)),
        },
    )  # run means: in .30 ln .35 bn .35 ; vars: in .2 ln .2 bn .6
    write(
        root,
        "sn",
        8,
        32,
        1,
        23.0,
        importance={
            "layer1.0.bn1": layer((0.1, 0.1, 0.8), (0.5, 0.5, 0.0)),
            "layer1.0.bn2": layer((0.1, 0.3, 0.6), (0.5, 0.3, 0.2)),
        },
    )  # run means: in .10 ln .20 bn .70 ; vars: in .5 ln .4 bn .1   -> SN acc 77.5 ± 0.70711
    one = {"in": 0.6, "ln": 0.4}
    two = {"in": 0.2, "ln": 0.8}
    write(
        root,
        "sn",
        8,
        1,
        0,
        30.0,
        opts={"use_bn": False},
        importance={
            "a": {"mean": one, "var": two},
            "b": {"mean": two, "var": one},
        },
    )  # no bn share -> 0; in .4 ln .6 for both
    write(root, "bn", 8, 2, 0, status="diverged")


def rows_of(path):
    with open(path, newline="") as f:
        return {(r["row"], r["column"], r["metric"]): r for r in csv.DictReader(f)}


def test_sn_accuracy_cells_and_paper(tmp_path):
    make_sn(tmp_path)
    s = build_report("sn_table", tmp_path, tmp_path / "rep")
    rows = rows_of(s.csv_path)
    acc = lambda row, col: rows[(row, col, "top1_accuracy")]  # noqa: E731
    assert float(acc("BN", "(8,32)")["mean"]) == pytest.approx(75.0)
    assert float(acc("BN", "(8,32)")["std"]) == pytest.approx(2**0.5, rel=1e-5)
    assert float(acc("GN", "(8,32)")["mean"]) == pytest.approx(75.0) and acc("GN", "(8,32)")["std"] == ""
    assert float(acc("SN", "(8,32)")["mean"]) == pytest.approx(77.5)
    assert float(acc("SN", "(8,32)")["std"]) == pytest.approx(0.5**0.5, rel=1e-5)
    assert float(acc("SN", "(8,1)")["mean"]) == pytest.approx(70.0)
    assert (acc("BN", "(8,2)")["mean"], acc("BN", "(8,2)")["n_diverged"]) == ("", "1")
    for row, vals in PAPER_SN.items():
        for col, v in zip(SETTINGS, vals):
            got = acc(row, col)["paper"]
            assert (got == "") if v is None else float(got) == pytest.approx(v)
    assert "not run" in acc("BN", "(8,1)")["note"] and "diverges" in acc("BN", "(8,1)")["note"]
    # 27 cells, BN (8,1) not run by design, 5 cells with runs -> 21 missing
    assert (s.n_completed, s.n_diverged, s.n_failed, s.n_missing_cells) == (6, 1, 0, 21)
    assert "BN, (GPUs, images/GPU) (8,1)" not in s.missing_cells

    md = s.markdown
    assert "ACCURACY" in md
    assert "75.00 ± 1.41 (n=2)" in md and "77.50 ± 0.71 (n=2)" in md
    assert "- (not run: one image per GPU)" in md and "- (diverges)" in md
    assert "diverged (1/1 seeds)" in md
    assert "| BN (paper) | 76.4 | 76.3 | 75.2 | 72.7 | 65.3 | 76.2 | 76.5 | - (diverges) | 75.4 |" in md


def test_sn_importance_averaging(tmp_path):
    make_sn(tmp_path)
    s = build_report("sn_table", tmp_path, tmp_path / "rep")
    rows = rows_of(s.csv_path)
    imp = lambda kind, col, share: rows[(f"SN importance ({kind})", col, f"{share}_share")]  # noqa: E731
    expect_means = {"in": 0.2, "ln": 0.275, "bn": 0.525}
    expect_vars = {"in": 0.35, "ln": 0.3, "bn": 0.35}
    for share in ("in", "ln", "bn"):
        assert float(imp("means", "(8,32)", share)["mean"]) == pytest.approx(expect_means[share])
        assert float(imp("variances", "(8,32)", share)["mean"]) == pytest.approx(expect_vars[share])
        assert imp("means", "(8,32)", share)["n_seeds"] == "2"
    assert float(imp("means", "(8,32)", "bn")["std"]) == pytest.approx(0.35 / 2**0.5, rel=1e-5)
    # (8,1): no bn key -> 0
    for kind in ("means", "variances"):
        assert float(imp(kind, "(8,1)", "in")["mean"]) == pytest.approx(0.4)
        assert float(imp(kind, "(8,1)", "ln")["mean"]) == pytest.approx(0.6)
        assert float(imp(kind, "(8,1)", "bn")["mean"]) == pytest.approx(0.0)
    for col, v in PAPER_BN_SHARE.items():
        assert float(imp("means", col, "bn")["paper"]) == pytest.approx(v)
    assert imp("means", "(8,16)", "bn")["paper"] == "" and imp("means", "(8,16)", "bn")["n_seeds"] == "0"
    md = s.markdown
    assert "## SN learned importance weights" in md
    assert "| means: IN | 0.20 ± 0.14 (n=2) |" in md  # (8,32): IN share of means over 2 seeds
    assert "| paper BN share (chart) | 0.58 |" in md
    png = s.png_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_sn_8x1_with_bn_is_flagged(tmp_path):
    write(tmp_path, "sn", 8, 1, 0, 30.0, opts={"use_bn": True})
    s = build_report("sn_table", tmp_path)
    assert any("use_bn=false" in n for n in s.notes)
    assert any("no sn_importance" in n for n in s.notes)


def test_sn_empty(tmp_path):
    s = build_report("sn_table", tmp_path)
    assert s.n_missing_cells == 26
    assert s.png_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
