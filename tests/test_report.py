"""Report generator on synthetic result.json files, checked against hand-computed numbers.

Paper numbers are typed in here from docs/papers.md section 1 (not read from normbench.report.papers),
so a transcription slip in papers.py fails these tests.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest

from normbench.report import EXPERIMENTS, build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# docs/papers.md section 1, GN Table 2 (top-1 error %)
PAPER_T2 = {
    "BN": {"32": 23.6, "16": 23.7, "8": 24.8, "4": 27.3, "2": 34.7},
    "GN": {"32": 24.1, "16": 24.2, "8": 24.0, "4": 24.2, "2": 24.1},
}
PAPER_T2_BN_MINUS_GN = {"32": -0.5, "16": -0.5, "8": 0.8, "4": 3.1, "2": 10.6}
PAPER_T1 = {"bn": 23.6, "ln": 25.3, "in": 28.4, "gn": 24.1}
PAPER_GROUPS = {"64": 24.6, "32": 24.1, "16": 24.6, "8": 24.4, "4": 24.6, "2": 24.7, "1": 25.3}
PAPER_CPG = {"64": 24.4, "32": 24.5, "16": 24.2, "8": 24.3, "4": 24.8, "2": 25.6, "1": 28.4}

_counter = [0]


def write_result(
    root: Path,
    *,
    experiment="gn_table2",
    norm="gn",
    gpus=8,
    per_gpu_batch=32,
    seed=0,
    error=None,
    status="completed",
    groups=None,
    cpg=None,
    model="cifar_resnet20",
    data="fashion_mnist",
    commit="abc1234def5678",
    mtime=None,
    **extra,
) -> Path:
    _counter[0] += 1
    run_id = extra.pop("run_id", f"{_counter[0]:012x}")
    opts = extra.pop("norm_options", {"groups": groups, "channels_per_group": cpg})
    run_dir = f"{experiment}/{model}-{data}-{norm}-{gpus}x{per_gpu_batch}-s{seed}-{run_id[-8:]}"
    res = {
        "status": status,
        "experiment": experiment,
        "run_id": run_id,
        "run_dir": run_dir,
        "model": model,
        "data": data,
        "norm": norm,
        "norm_options": opts,
        "gpus": gpus,
        "per_gpu_batch": per_gpu_batch,
        "seed": seed,
        "epochs": 10,
        "epochs_completed": 10 if status == "completed" else 3,
        "top1_error_final": error,
        "top1_error_median_last5": error,
        "top5_error_final": None if error is None else 0.5,
        "diverged_epoch": 3 if status == "diverged" else None,
        "error_message": "boom" if status == "failed" else None,
        "wall_time_s": 1.0,
        "sn_importance": None,
        "git": {"commit": commit, "dirty": False},
        "config": {"preset_name": "smoke", "epochs": 10, "seed": seed},
    }
    res.update(extra)
    path = root / run_dir / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def read_csv(path: Path) -> dict[tuple[str, str, str], dict]:
    with open(path, newline="") as f:
        return {(r["row"], r["column"], r["metric"]): r for r in csv.DictReader(f)}


def fl(s: str):
    return None if s == "" else float(s)


def make_table2(root: Path) -> None:
    """Hand-designed gn_table2 results (top-1 error %)."""
    w = lambda **k: write_result(root, experiment="gn_table2", **k)  # noqa: E731
    w(norm="bn", per_gpu_batch=32, seed=0, error=10.0)
    w(norm="bn", per_gpu_batch=32, seed=1, error=12.0)  # BN@32 = 11.0 ± 1.41421 (n=2)
    w(norm="bn", per_gpu_batch=16, seed=0, error=11.0)  # n=1
    w(norm="bn", per_gpu_batch=8, seed=0, error=13.0)
    w(norm="bn", per_gpu_batch=8, seed=1, error=14.0)  # 13.5 ± 0.70711
    w(norm="bn", per_gpu_batch=4, seed=0, error=16.0)
    w(norm="bn", per_gpu_batch=4, seed=1, status="failed")  # 16.0 (n=1); failed 1/2
    w(norm="bn", per_gpu_batch=2, seed=0, error=30.0)
    w(norm="bn", per_gpu_batch=2, seed=1, status="diverged")  # 30.0 (n=1); diverged 1/2
    w(norm="gn", groups=32, per_gpu_batch=32, seed=0, error=9.0)
    w(norm="gn", groups=32, per_gpu_batch=32, seed=1, error=10.0)  # 9.5 ± 0.70711
    w(norm="gn", groups=32, per_gpu_batch=16, seed=0, error=9.5)
    w(norm="gn", groups=32, per_gpu_batch=8, seed=0, error=10.0)
    # GN@4 missing
    w(norm="gn", groups=32, per_gpu_batch=2, seed=0, error=10.5)
    # noise: other experiment, and a gn_table2 run that fits no cell (64 images per GPU is not a column)
    write_result(root, experiment="gn_table1", norm="bn", error=99.0)
    w(norm="bn", per_gpu_batch=64, seed=0, error=50.0)


# --------------------------------------------------------------------------------------------------


def test_gn_table2_cells_paper_and_derived(tmp_path):
    make_table2(tmp_path / "results")
    s = build_report("gn_table2", tmp_path / "results")
    out = tmp_path / "results" / "reports"
    assert s.paths == (out / "gn_table2.md", out / "gn_table2.csv", out / "gn_table2.png")
    assert (s.md_path, s.csv_path, s.png_path) == s.paths
    assert (s.n_completed, s.n_diverged, s.n_failed, s.n_missing_cells, s.n_unmatched) == (12, 1, 1, 1, 1)
    assert s.missing_cells == ["GN, images/GPU 4"]

    rows = read_csv(s.csv_path)
    m = "top1_error_median_last5"
    expect = {  # (row, col): (mean, std, n, n_div, n_failed)
        ("BN", "32"): (11.0, 2**0.5, 2, 0, 0),
        ("BN", "16"): (11.0, None, 1, 0, 0),
        ("BN", "8"): (13.5, 0.5**0.5, 2, 0, 0),
        ("BN", "4"): (16.0, None, 1, 0, 1),
        ("BN", "2"): (30.0, None, 1, 1, 0),
        ("GN", "32"): (9.5, 0.5**0.5, 2, 0, 0),
        ("GN", "16"): (9.5, None, 1, 0, 0),
        ("GN", "8"): (10.0, None, 1, 0, 0),
        ("GN", "4"): (None, None, 0, 0, 0),
        ("GN", "2"): (10.5, None, 1, 0, 0),
    }
    for (row, col), (mean, std, n, nd, nf) in expect.items():
        r = rows[(row, col, m)]
        assert fl(r["mean"]) == pytest.approx(mean) if mean is not None else r["mean"] == ""
        assert fl(r["std"]) == pytest.approx(std, rel=1e-5) if std is not None else r["std"] == ""
        assert (int(r["n_seeds"]), int(r["n_diverged"]), int(r["n_failed"])) == (n, nd, nf)
        assert float(r["paper"]) == pytest.approx(PAPER_T2[row][col])
        assert r["experiment"] == "gn_table2"
    assert rows[("GN", "4", m)]["note"] == "missing"

    derived = {"32": 1.5, "16": 1.5, "8": 3.5, "4": None, "2": 19.5}
    for col, v in derived.items():
        r = rows[("BN - GN", col, "top1_error_diff")]
        assert (fl(r["mean"]) == pytest.approx(v)) if v is not None else r["mean"] == ""
        assert float(r["paper"]) == pytest.approx(PAPER_T2_BN_MINUS_GN[col], abs=1e-6)
    assert len(rows) == 10 + 5


def test_gn_table2_markdown(tmp_path):
    make_table2(tmp_path / "r")
    md = build_report("gn_table2", tmp_path / "r", tmp_path / "out").markdown
    assert md == (tmp_path / "out" / "gn_table2.md").read_text()
    assert "11.00 ± 1.41 (n=2)" in md
    assert "11.00 (n=1)" in md and "± 0.00" not in md  # n=1: no std
    assert "30.00 (n=1); diverged (1/2 seeds)" in md
    assert "16.00 (n=1); failed (1/2 seeds)" in md
    assert "| missing |" in md
    assert "| BN - GN (paper) | -0.5 | -0.5 | +0.8 | +3.1 | +10.6 |" in md
    assert "| **BN - GN** | +1.50 | +1.50 | +3.50 | – | +19.50 |" in md
    assert "| BN (paper) | 23.6 | 23.7 | 24.8 | 27.3 | 34.7 |" in md
    assert "BN error rise from 32 to 2 images/GPU: +19.00 (paper +11.1)" in md
    assert "GN spread over images/GPU (max - min): n/a (cells without numbers) (paper 0.2)" in md
    assert "Small-scale reproduction" in md and "fashion_mnist" in md
    assert "12 completed, 1 diverged, 1 failed; missing cells: 1 of 10" in md
    assert "`abc1234def` (14 runs)" in md
    assert "- GN, images/GPU 4" in md
    assert "per_gpu_batch=64" in md  # the run outside the layout is listed
    assert "99.0" not in md  # the other experiment's run is ignored
    assert "preset: `smoke`" in md


def test_outputs_atomic_and_png_valid(tmp_path):
    make_table2(tmp_path / "r")
    out = tmp_path / "out"
    build_report("gn_table2", tmp_path / "r", out)
    build_report("gn_table2", tmp_path / "r", out)  # overwrite in place
    assert sorted(p.name for p in out.iterdir()) == ["gn_table2.csv", "gn_table2.md", "gn_table2.png"]
    png = (out / "gn_table2.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_failed_write_leaves_no_temp_and_keeps_old_file(tmp_path, monkeypatch):
    make_table2(tmp_path / "r")
    out = tmp_path / "out"
    build_report("gn_table2", tmp_path / "r", out)
    before = (out / "gn_table2.md").read_bytes()
    import normbench.runs

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(normbench.runs.files.os, "replace", boom)
    write_result(tmp_path / "r", norm="gn", groups=32, per_gpu_batch=4, seed=0, error=11.0)
    with pytest.raises(OSError):
        build_report("gn_table2", tmp_path / "r", out)
    assert sorted(p.name for p in out.iterdir()) == ["gn_table2.csv", "gn_table2.md", "gn_table2.png"]
    assert (out / "gn_table2.md").read_bytes() == before


def test_empty_results_all_missing(tmp_path):
    (tmp_path / "r").mkdir()
    for exp, n_cells in (("gn_table1", 4), ("gn_table2", 10), ("gn_groups", 7), ("gn_channels_per_group", 7)):
        s = build_report(exp, tmp_path / "r")
        assert (s.n_completed, s.n_diverged, s.n_failed, s.n_missing_cells) == (0, 0, 0, n_cells)
        rows = read_csv(s.csv_path)
        assert all(r["note"].startswith("missing") for r in rows.values() if r["metric"] == "top1_error_median_last5")
        assert s.png_path.read_bytes().startswith(PNG_MAGIC)
        assert "No `result.json`" in s.markdown


def test_unknown_experiment(tmp_path):
    with pytest.raises(ValueError) as e:
        build_report("gn_table9", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "gn_table9" in msg
    for name in ("gn_table1", "gn_table2", "gn_groups", "gn_channels_per_group", "sn_table"):
        assert name in msg
    assert set(EXPERIMENTS) == {"gn_table1", "gn_table2", "gn_groups", "gn_channels_per_group", "sn_table", "pono_ms"}


def test_missing_results_dir_refused_and_nothing_created(tmp_path):
    with pytest.raises(ValueError) as e:
        build_report("gn_table2", tmp_path / "typo", tmp_path / "out")
    assert "\n" not in str(e.value) and "typo" in str(e.value) and "results_dir" in str(e.value)
    assert sorted(tmp_path.iterdir()) == []  # neither the results dir nor the output dir


def test_mixed_model_data_refused_unless_selected(tmp_path):
    r = tmp_path / "r"
    write_result(r, norm="bn", per_gpu_batch=32, error=10.0)
    write_result(r, norm="bn", per_gpu_batch=32, error=30.0, model="resnet50", data="imagenet")
    with pytest.raises(ValueError, match="mix 2 .model, data. pairs"):
        build_report("gn_table2", r)
    s = build_report("gn_table2", r, model="resnet50")
    rows = read_csv(s.csv_path)
    assert float(rows[("BN", "32", "top1_error_median_last5")]["mean"]) == 30.0
    assert "Small-scale" not in s.markdown and "`resnet50` on `imagenet`" in s.markdown


def test_rerun_same_seed_newest_wins(tmp_path):
    r = tmp_path / "r"
    now = time.time()
    write_result(r, norm="bn", per_gpu_batch=32, seed=0, status="failed", mtime=now - 100)
    write_result(r, norm="bn", per_gpu_batch=32, seed=0, error=12.0, mtime=now)
    s = build_report("gn_table2", r)
    row = read_csv(s.csv_path)[("BN", "32", "top1_error_median_last5")]
    assert (row["mean"], row["n_seeds"], row["n_failed"]) == ("12.0", "1", "0")
    assert s.n_superseded == 1 and any("superseded" in n for n in s.notes)


def test_gn_table1_vs_bn(tmp_path):
    r = tmp_path / "r"
    for norm, errs in {"bn": (10.0, 11.0), "ln": (13.0,), "in": (16.0, 18.0), "gn": (10.0, 12.0)}.items():
        for seed, e in enumerate(errs):
            write_result(r, experiment="gn_table1", norm=norm, seed=seed, error=e)
    write_result(r, experiment="gn_table1", norm="gn", per_gpu_batch=16, error=1.0)  # not batch 32: outside
    s = build_report("gn_table1", r)
    rows = read_csv(s.csv_path)
    means = {"bn": 10.5, "ln": 13.0, "in": 17.0, "gn": 11.0}
    for c, v in means.items():
        row = rows[("top-1 error", c, "top1_error_median_last5")]
        assert float(row["mean"]) == pytest.approx(v)
        assert float(row["paper"]) == pytest.approx(PAPER_T1[c])
        d = rows[("vs BN", c, "top1_error_diff")]
        assert float(d["mean"]) == pytest.approx(v - 10.5)
        assert float(d["paper"]) == pytest.approx(PAPER_T1[c] - 23.6)
    assert s.n_unmatched == 1
    assert "Order by error: BN < GN < LN < IN (paper BN < GN < LN < IN)" in s.markdown


def test_gn_groups_and_channels_minus_best(tmp_path):
    r = tmp_path / "r"
    errs = {"64": 12.0, "32": 10.0, "16": 11.0, "8": 10.5, "4": 11.5, "2": 12.5, "1": 14.0}
    for k, e in errs.items():
        write_result(r, experiment="gn_groups", norm="gn", groups=int(k), error=e)
        write_result(r, experiment="gn_channels_per_group", norm="gn", cpg=int(k), error=e + 1)
    s = build_report("gn_groups", r)
    rows = read_csv(s.csv_path)
    for k, e in errs.items():
        assert float(rows[("GN", k, "top1_error_median_last5")]["mean"]) == pytest.approx(e)
        assert float(rows[("GN", k, "top1_error_median_last5")]["paper"]) == pytest.approx(PAPER_GROUPS[k])
        assert float(rows[("minus best", k, "top1_error_diff")]["mean"]) == pytest.approx(e - 10.0)
        assert float(rows[("minus best", k, "top1_error_diff")]["paper"]) == pytest.approx(PAPER_GROUPS[k] - 24.1)
    assert "Best G: 32 (paper 32)" in s.markdown
    assert "LN (G=1) minus best: 4.00 (paper 1.2)" in s.markdown
    assert "single-sourced" in rows[("GN", "8", "top1_error_median_last5")]["note"]
    assert "single-sourced" not in rows[("GN", "32", "top1_error_median_last5")]["note"]
    assert s.n_missing_cells == 0

    s = build_report("gn_channels_per_group", r)
    rows = read_csv(s.csv_path)
    for k, e in errs.items():
        assert float(rows[("GN", k, "top1_error_median_last5")]["mean"]) == pytest.approx(e + 1)
        assert float(rows[("GN", k, "top1_error_median_last5")]["paper"]) == pytest.approx(PAPER_CPG[k])
        assert float(rows[("minus best", k, "top1_error_diff")]["paper"]) == pytest.approx(PAPER_CPG[k] - 24.2)
    assert "Best channels per group: 32 (paper 16)" in s.markdown
    assert "IN (1 channel/group) minus best: 4.00 (paper 4.2)" in s.markdown
    # a groups run does not land in the channels-per-group table and vice versa
    assert s.n_unmatched == 0 and s.n_completed == 7


def test_cli(tmp_path, capsys):
    from normbench.cli import main

    make_table2(tmp_path / "r")
    assert main(["report", "experiment=gn_table2", f"results_dir={tmp_path / 'r'}"]) == 0
    out = capsys.readouterr().out
    assert "12 completed, 1 diverged, 1 failed; missing cells: 1 of 10" in out
    assert f"wrote {tmp_path / 'r' / 'reports' / 'gn_table2.md'}" in out
    assert main(["report", "experiment=nope", f"results_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown experiment 'nope'" in err


def test_cli_missing_results_dir_one_line_nothing_created(tmp_path, capsys):
    from normbench.cli import main

    assert main(["report", "experiment=gn_table2", f"results_dir={tmp_path / 'typo'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("normbench report: error:") and "typo" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_model_and_data_select_a_pair(tmp_path, capsys):
    """The mixed-pairs error tells the user to pass model=/data=; the command accepts them."""
    from normbench.cli import main

    r = tmp_path / "r"
    write_result(r, norm="bn", per_gpu_batch=32, error=10.0)
    write_result(r, norm="bn", per_gpu_batch=32, error=30.0, model="resnet50", data="imagenet")
    assert main(["report", "experiment=gn_table2", f"results_dir={r}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model=" in err and "data=" in err
    assert not (r / "reports").exists()
    assert main(["report", "experiment=gn_table2", f"results_dir={r}", "model=resnet50", "data=imagenet"]) == 0
    rows = read_csv(r / "reports" / "gn_table2.csv")
    assert float(rows[("BN", "32", "top1_error_median_last5")]["mean"]) == 30.0
    assert main(["report", "experiment=gn_table2", f"results_dir={r}", "data=fashion_mnist"]) == 0
    rows = read_csv(r / "reports" / "gn_table2.csv")
    assert float(rows[("BN", "32", "top1_error_median_last5")]["mean"]) == 10.0


def test_columns_left_out_by_the_preset_are_not_missing(tmp_path):
    """Small presets run G <= 16 only (config.sweep.allowed): G=64, 32 are 'not run', and trends use G <= 16."""
    r = tmp_path / "r"
    cfg = {"preset_name": "fashion_mnist", "sweep": {"allowed": {"norm.groups": [16, 8, 4, 2, 1]}}}
    errs = {"16": 11.0, "8": 10.0, "4": 10.5, "2": 12.0, "1": 13.0}
    for k, e in errs.items():
        write_result(r, experiment="gn_groups", norm="gn", groups=int(k), error=e, config=cfg, epochs=2)
    s = build_report("gn_groups", r)
    assert s.n_missing_cells == 0 and s.missing_cells == []
    rows = read_csv(s.csv_path)
    assert rows[("GN", "64", "top1_error_median_last5")]["note"].startswith("not run: preset allows norm.groups")
    md = s.markdown
    assert "- (not run: preset allows norm.groups in 16, 8, 4, 2, 1)" in md
    assert "preset: `fashion_mnist`" in md
    assert "fewer than 5 epochs" in md
    # paper over the same columns (16..1): best 24.4 at G=8, LN 25.3 -> 0.9
    assert "Best G: 8 (paper 8)" in md
    assert "LN (G=1) minus best: 3.00 (paper 0.9)" in md
    assert "Spread over G (max - min): 3.00 (paper 0.9)" in md
    # the paper's own derived row stays as printed (minus its best, G=32)
    assert float(rows[("minus best", "64", "top1_error_diff")]["paper"]) == pytest.approx(0.5)


def test_pono_ms_layout_places_the_three_norms_and_has_no_paper_numbers(tmp_path):
    r = tmp_path / "r"
    errors = {
        ("bn", 32): (10.0, 12.0),
        ("bn", 2): (15.0,),
        ("gn", 32): (11.0,),
        ("gn", 2): (11.5,),
        ("gn+pono_ms", 32): (9.0, 10.0),
        ("gn+pono_ms", 2): (10.5,),
    }
    for (norm, batch), errs in errors.items():
        for seed, e in enumerate(errs):
            write_result(r, experiment="pono_ms", norm=norm, per_gpu_batch=batch, seed=seed, error=e)
    s = build_report("pono_ms", r)
    rows = read_csv(s.csv_path)
    for (norm, batch), errs in errors.items():
        label = {"bn": "BN", "gn": "GN", "gn+pono_ms": "GN + PONO-MS"}[norm]
        row = rows[(label, str(batch), "top1_error_median_last5")]
        assert float(row["mean"]) == pytest.approx(sum(errs) / len(errs)) and row["paper"] == ""
    assert "PONO-MS - GN at 32 images/GPU: -1.50" in s.markdown
    assert "PONO-MS - GN at 2 images/GPU: -1.00" in s.markdown


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("gpus", "8", "`gpus`"),
        ("per_gpu_batch", None, "`per_gpu_batch`"),
        ("per_gpu_batch", True, "`per_gpu_batch`"),
        ("norm", 5, "`norm`"),
        ("norm_options", [32], "`norm_options`"),
        ("git", {"commit": 1234, "dirty": False}, "`git.commit`"),
        ("git", {"commit": "abc", "dirty": "no"}, "`git.dirty`"),
        ("config", "preset", "`config`"),
        ("top1_error_by_eval", 3.0, "`top1_error_by_eval`"),
    ],
)
def test_a_damaged_field_is_named_and_its_run_left_out(tmp_path, capsys, field, value, named):
    """Every field the report reads, damaged in a real result.json: the command exits 0, the report says which
    file and field, and the table is built from the other runs (no TypeError)."""
    from normbench.cli import main

    root = tmp_path / "r"
    write_result(root, norm="bn", per_gpu_batch=32, error=23.0)
    damaged = write_result(root, norm="gn", per_gpu_batch=32, error=24.0)
    data = json.loads(damaged.read_text())
    data[field] = value
    damaged.write_text(json.dumps(data))
    assert main(["report", "experiment=gn_table2", f"results_dir={root}"]) == 0
    out = capsys.readouterr().out
    assert "1 completed" in out, out
    md = (root / "reports" / "gn_table2.md").read_text()
    assert f"Damaged result file skipped: `{damaged}`: {named} is" in md
    cells = read_csv(root / "reports" / "gn_table2.csv")
    assert fl(cells[("BN", "32", "top1_error_median_last5")]["mean"]) == 23.0
    assert fl(cells[("GN", "32", "top1_error_median_last5")]["mean"]) is None  # its one run was left out


def _imagenet_config(seed: int, **colour) -> dict:
    augment = {"min_scale": 0.08, "flip": True, **colour}
    return {"seed": seed, "epochs": 10, "data": {"name": "imagenet", "image_size": 224, "augment": augment}}


OFFICIAL_COLOUR = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "lighting": 0.1}


def test_what_was_run_names_the_augmentation_and_never_averages_across_it(tmp_path):
    r = tmp_path / "r"
    w = lambda **k: write_result(r, data="imagenet", model="resnet50", **k)  # noqa: E731
    w(norm="bn", per_gpu_batch=32, seed=0, error=23.0, config=_imagenet_config(0, **OFFICIAL_COLOUR))
    w(norm="bn", per_gpu_batch=32, seed=1, error=23.4, config=_imagenet_config(1, **OFFICIAL_COLOUR))
    # recorded before the colour keys existed: crop and flip only
    w(norm="gn", groups=32, per_gpu_batch=32, seed=0, error=24.2, config=_imagenet_config(0))
    md = build_report("gn_table2", r).markdown
    line = next(s for s in md.splitlines() if s.startswith("- Training augmentation: "))
    official = (
        "random-resized crop 224 (area 0.08-1) + flip + colour jitter (brightness 0.4, contrast 0.4, saturation "
        "0.4; in a random order) + PCA lighting 0.1 (fb.resnet.torch's, as the official GN reproduction)"
    )
    assert f"{official} (2 runs)" in line, line
    assert "random-resized crop 224 (area 0.08-1) + flip only: no colour jitter or lighting (1 run)" in line, line
    assert "mixed: a cell never averages runs that differ in it" in line
    # a crop-and-flip seed in the official recipe's cell: refused, the key named
    w(norm="bn", per_gpu_batch=32, seed=2, error=24.0, config=_imagenet_config(2, brightness=0, lighting=0))
    with pytest.raises(ValueError) as e:
        build_report("gn_table2", r)
    msg = str(e.value)
    assert "\n" not in msg and "differ in data.augment.brightness (0.4 in" in msg and "absent in" in msg, msg


def test_one_augmentation_is_named_without_counts(tmp_path):
    r = tmp_path / "r"
    write_result(
        r,
        norm="bn",
        seed=0,
        error=10.0,
        config={"seed": 0, "data": {"image_size": 28, "augment": {"crop_padding": 2, "rrc_scale": None, "flip": True}}},
    )
    md = build_report("gn_table2", r).markdown
    assert "- Training augmentation: random 28x28 crop of the 2-pixel zero-padded image + flip\n" in md
