"""Report: claims judged with the two-standard-error rule, BN evaluation modes, settings that may not be averaged,
interrupted runs, preset names, training curves, byte-reproducible output.

Every expected number is worked out by hand from the made-up result.json files below.
"""

from __future__ import annotations

import json
import math

import pytest
from test_report import read_csv, write_result

from normbench.report import build_report
from normbench.report.figures import training_curves

VERDICTS = ("holds", "does not hold", "inconclusive", "inconclusive (n=1)", "by construction")


def claims_of(summary) -> dict[str, object]:
    return {j.text: j for j in summary.claims}


def gn_table2_runs(root, gn_gpus=lambda b: 8, bn_errors=None, gn_errors=None):
    bn_errors = bn_errors or {
        "32": (10.0, 12.0),
        "16": (11.0, 11.5),
        "8": (12.0, 12.5),
        "4": (14.0, 14.5),
        "2": (20.0, 22.0, 24.0),
    }
    gn_errors = gn_errors or {
        "32": (10.0, 10.2),
        "16": (10.1, 10.3),
        "8": (10.0, 10.4),
        "4": (10.2, 10.2),
        "2": (10.3, 10.5),
    }
    for b, errs in bn_errors.items():
        for seed, e in enumerate(errs):
            write_result(
                root,
                norm="bn",
                per_gpu_batch=int(b),
                seed=seed,
                error=e,
                norm_options={"momentum": 0.1, "per_gpu_batch": int(b)},
            )
    for b, errs in gn_errors.items():
        for seed, e in enumerate(errs):
            write_result(
                root,
                norm="gn",
                per_gpu_batch=int(b),
                gpus=gn_gpus(int(b)),
                seed=seed,
                error=e,
                norm_options={"groups": 32, "channels_per_group": None},
            )


def test_gn_table2_claims_two_standard_errors(tmp_path):
    gn_table2_runs(tmp_path / "r")
    s = build_report("gn_table2", tmp_path / "r")
    c = claims_of(s)
    assert len(c) == 4 and all(j.verdict in VERDICTS for j in c.values())

    # BN rises: BN@2 = 22 (s^2 = 4, n = 3), BN@32 = 11 (s^2 = 2, n = 2): d = 11, SE = sqrt(2/2 + 4/3)
    rise = c["BN's error rises as the images per GPU fall (32 -> 2)."]
    se = math.sqrt(2 / 2 + 4 / 3)
    assert rise.verdict == "holds"
    assert rise.numbers == f"BN@2 - BN@32 = +11.00 > 0 (2 SE = {2 * se:.2f})"
    assert rise.paper == "BN@2 - BN@32 = +11.1 > 0 (holds)"

    # GN flat: max 10.4 (GN@2), min 10.1 (GN@32), each s^2 = 0.02, n = 2: margin 1 - 0.3 = 0.7 > 2 SE = 0.28.
    # Every GN run has 8 GPUs, so the total batch differs per column: judged, not "by construction".
    flat = c["GN's error stays within about a point across the images per GPU."]
    assert flat.verdict == "holds"
    assert flat.numbers == f"GN max - min = +0.30 < 1 (2 SE = {2 * math.sqrt(0.02 / 2 + 0.02 / 2):.2f})"

    assert c["GN beats BN at 2 images per GPU."].verdict == "holds"  # 22 - 10.4 = 11.6, SE ~ 1.16

    # BN better than GN at 32 by at most 1: GN@32 - BN@32 = 10.1 - 11 = -0.9; margin 1.9 vs 2 SE = 2 sqrt(1.01)
    at_most = c["At 32 images per GPU BN is better than GN by at most about a point."]
    assert 1.9 < 2 * math.sqrt(0.02 / 2 + 2 / 2) < 2.1
    assert at_most.verdict == "inconclusive"
    assert at_most.numbers.startswith("GN@32 - BN@32 = -0.90 < 1")

    md = s.markdown
    assert "## Claims" in md and "two standard errors" in md
    assert "| GN beats BN at 2 images per GPU. | **holds** |" in md


def test_flatness_by_construction_with_a_fixed_total_batch(tmp_path):
    """GN (norm_options without per_gpu_batch) with gpus = 64 / per_gpu_batch: every column is the same run."""
    gn_table2_runs(tmp_path / "r", gn_gpus=lambda b: 64 // b)
    flat = claims_of(build_report("gn_table2", tmp_path / "r"))[
        "GN's error stays within about a point across the images per GPU."
    ]
    assert flat.verdict == "by construction"
    assert "64 images per step" in flat.numbers


def test_one_seed_is_inconclusive(tmp_path):
    gn_table2_runs(
        tmp_path / "r", bn_errors={b: (e,) for b, e in zip(("32", "16", "8", "4", "2"), (10.0, 11.0, 12.0, 13.0, 30.0))}
    )
    rise = claims_of(build_report("gn_table2", tmp_path / "r"))[
        "BN's error rises as the images per GPU fall (32 -> 2)."
    ]
    assert rise.verdict == "inconclusive (n=1)"
    assert rise.numbers == "BN@2 - BN@32 = +20.00 > 0 (one seed)"


def test_order_claim_does_not_hold_when_one_pair_is_reversed(tmp_path):
    r = tmp_path / "r"
    for norm, errs in {"bn": (10.0, 10.2), "gn": (11.0, 11.2), "ln": (14.0, 14.4), "in": (12.0, 12.2)}.items():
        for seed, e in enumerate(errs):
            write_result(r, experiment="gn_table1", norm=norm, seed=seed, error=e)
    (j,) = build_report("gn_table1", r).claims
    # in - ln = 12.1 - 14.2 = -2.1 with SE = sqrt(0.02/2 + 0.08/2): reversed beyond 2 SE
    assert j.verdict == "does not hold"
    assert f"IN - LN = -2.10 > 0 (2 SE = {2 * math.sqrt(0.02 / 2 + 0.08 / 2):.2f})" in j.numbers
    assert "GN - BN = +1.00 > 0" in j.numbers
    assert j.paper.endswith("(holds)")


def test_missing_cells_are_not_judged(tmp_path):
    (tmp_path / "r").mkdir()
    for j in build_report("gn_table2", tmp_path / "r").claims:
        assert j.verdict.startswith("not judged (no number for ")


@pytest.mark.parametrize("experiment", ["gn_table1", "gn_table2", "gn_groups", "gn_channels_per_group", "sn_table"])
def test_every_shipped_claim_holds_on_the_papers_numbers(tmp_path, experiment):
    """The claims in configs/experiment are the papers' own: with SE = 0 the published numbers satisfy them."""
    (tmp_path / "r").mkdir()
    s = build_report(experiment, tmp_path / "r")
    assert s.claims, f"{experiment} lists no claims"
    for j in s.claims:
        assert j.paper.endswith("(holds)"), (j.text, j.paper)


def test_sn_claims_and_learned_bn_share(tmp_path):
    r = tmp_path / "r"

    def imp(bn_mean, bn_var):
        layer = {
            "mean": {"in": 0.0, "ln": 1 - bn_mean, "bn": bn_mean},
            "var": {"in": 0.0, "ln": 1 - bn_var, "bn": bn_var},
        }
        return {"l1": layer, "l2": layer}

    # per-run BN share = (mean share + var share) / 2: (8,32): 0.6, 0.7; (8,2): 0.2, 0.3
    shares = {32: ((0.5, 0.7), (0.6, 0.8)), 2: ((0.1, 0.3), (0.2, 0.4))}
    for b, pairs in shares.items():
        for seed, (m, v) in enumerate(pairs):
            write_result(
                r,
                experiment="sn_table",
                norm="sn",
                per_gpu_batch=b,
                seed=seed,
                error=25.0 + seed,
                sn_importance=imp(m, v),
            )
    s = build_report("sn_table", r)
    c = claims_of(s)
    share = c["SN's learned BN share falls as the images per GPU fall (8 GPUs, 32 -> 2)."]
    se = math.sqrt(0.005 / 2 + 0.005 / 2)  # both cells: values a, a + 0.1 -> s^2 = 0.005
    assert share.verdict == "holds"
    assert share.numbers == f"SN BN share (8,32) - (8,2) = +0.40 > 0 (2 SE = {2 * se:.2f})"
    assert share.paper == "SN BN share (8,32) - (8,2) = +0.4 > 0 (holds)"  # 0.58 - 0.15, read off the chart
    assert c["BN loses the most accuracy going from 32 to 2 images per GPU (8 GPUs)."].verdict.startswith("not judged")


def bn_eval_runs(root, experiment="gn_table2", gpus=8, large=32, small=2):
    by_eval = {large: [(10.0, 9.0, 11.0), (12.0, 11.0, 13.0)], small: [(20.0, 13.0, 15.0), (22.0, 15.0, 15.0)]}
    for b, seeds in by_eval.items():
        for seed, (ema, pbn, batch) in enumerate(seeds):
            write_result(
                root,
                experiment=experiment,
                norm="bn",
                gpus=gpus,
                per_gpu_batch=b,
                seed=seed,
                error=ema,
                top1_error_by_eval={"ema": ema, "precise_bn": pbn, "batch_stats": batch},
            )
    write_result(root, experiment=experiment, norm="bn", gpus=gpus, per_gpu_batch=8, seed=0, error=14.0)  # old run
    write_result(
        root,
        experiment=experiment,
        norm="gn",
        gpus=gpus,
        per_gpu_batch=large,
        seed=0,
        error=12.0,
        top1_error_by_eval={"ema": 12.0},
    )


def test_bn_evaluation_rows_and_rise_removed(tmp_path):
    bn_eval_runs(tmp_path / "r")
    s = build_report("gn_table2", tmp_path / "r")
    # EMA: 11 -> 21 (rise 10); PreciseBN: 10 -> 14 (rise 4, removes 1 - 4/10 = 60%);
    # test-batch statistics: 12 -> 15 (rise 3, removes 70%)
    md = s.markdown
    assert "## BN evaluation" in md
    assert "| BN, EMA statistics | 11.00 ± 1.41 (n=2) | – | – | – | 21.00 ± 1.41 (n=2) |" in md
    assert "| BN, PreciseBN | 10.00 ± 1.41 (n=2) | – | – | – | 14.00 ± 1.41 (n=2) |" in md
    assert "| BN, test-batch statistics | 12.00 ± 1.41 (n=2) | – | – | – | 15.00 ± 0.00 (n=2) |" in md
    assert "EMA statistics +10.00; PreciseBN +4.00, removing 60% of it; test-batch statistics +3.00, removing 70%" in md
    rows = read_csv(s.csv_path)
    assert float(rows[("BN rise removed", "precise_bn", "1 - rise/rise_ema")]["mean"]) == pytest.approx(0.6)
    assert float(rows[("BN rise removed", "batch_stats", "1 - rise/rise_ema")]["mean"]) == pytest.approx(0.7)
    pbn = rows[("BN, PreciseBN (final model)", "2", "top1_error_final")]
    assert (float(pbn["mean"]), pbn["n_seeds"], pbn["paper"]) == (14.0, "2", "")
    assert rows[("BN, PreciseBN (final model)", "8", "top1_error_final")]["mean"] == ""


def test_bn_evaluation_in_accuracy_for_the_sn_table(tmp_path):
    r = tmp_path / "r"
    bn_eval_runs(r, experiment="sn_table")
    md = build_report("sn_table", r).markdown
    assert "| BN, PreciseBN | 90.00 ± 1.41 (n=2) |" in md  # accuracy = 100 - error, (8,32) first
    assert "removing 60% of it" in md


def test_runs_without_the_key_get_no_bn_evaluation_rows(tmp_path):
    gn_table2_runs(tmp_path / "r")
    s = build_report("gn_table2", tmp_path / "r")
    assert "BN evaluation" not in s.markdown
    assert not any(row.startswith("BN, ") or row == "BN rise removed" for row, _, _ in read_csv(s.csv_path))


def test_cell_refuses_runs_whose_settings_differ(tmp_path):
    """Seeds 0 and 1 of BN@32, one trained 1 epoch and one 2: never averaged; the first differing key is named."""
    r = tmp_path / "r"
    write_result(r, norm="bn", per_gpu_batch=32, seed=0, error=30.0, config={"epochs": 1, "seed": 0})
    write_result(r, norm="bn", per_gpu_batch=32, seed=1, error=20.0, config={"epochs": 2, "seed": 1})
    with pytest.raises(ValueError) as e:
        build_report("gn_table2", r)
    msg = str(e.value)
    assert "\n" not in msg and "differ in epochs (1 in" in msg and ", 2 in" in msg and "BN @ 32" in msg
    assert not (r / "reports").exists()


def test_cell_averages_runs_that_differ_only_in_keys_that_change_no_numbers(tmp_path):
    r = tmp_path / "r"
    write_result(
        r,
        norm="bn",
        per_gpu_batch=32,
        seed=0,
        error=30.0,
        config={"epochs": 2, "seed": 0, "results_dir": "a", "logger": {"progress": True}},
    )
    write_result(
        r,
        norm="bn",
        per_gpu_batch=32,
        seed=1,
        error=20.0,
        config={"epochs": 2, "seed": 1, "results_dir": "b", "logger": {"progress": False}},
    )
    row = read_csv(build_report("gn_table2", r).csv_path)[("BN", "32", "top1_error_median_last5")]
    assert (float(row["mean"]), row["n_seeds"]) == (25.0, "2")


def test_nested_setting_difference_is_named_by_its_dotted_key(tmp_path):
    r = tmp_path / "r"
    write_result(r, norm="gn", per_gpu_batch=32, seed=0, error=10.0, config={"norm": {"name": "gn", "groups": 32}})
    write_result(r, norm="gn", per_gpu_batch=32, seed=1, error=11.0, config={"norm": {"name": "gn", "groups": 16}})
    with pytest.raises(ValueError, match=r"differ in norm\.groups \(32 in .*, 16 in "):
        build_report("gn_table2", r)


def test_interrupted_runs_are_counted_never_averaged(tmp_path):
    r = tmp_path / "r"
    write_result(r, norm="bn", per_gpu_batch=32, seed=0, error=10.0)
    write_result(
        r,
        norm="bn",
        per_gpu_batch=32,
        seed=1,
        status="interrupted",
        interrupted_by="SIGTERM",
        top1_error_median_last5=50.0,
    )  # a number left by an unfinished run must not be averaged
    s = build_report("gn_table2", r)
    assert (s.n_completed, s.n_interrupted, s.n_failed) == (1, 1, 0)
    assert "10.00 (n=1); interrupted (1/2 seeds)" in s.markdown
    assert "1 completed, 0 diverged, 0 failed, 1 interrupted" in s.markdown
    row = read_csv(s.csv_path)[("BN", "32", "top1_error_median_last5")]
    assert (row["mean"], row["n_seeds"], row["n_interrupted"], row["n_failed"]) == ("10.0", "1", "1", "0")
    assert not any("counted as failed" in n for n in s.notes)


def test_presets_record_their_name():
    from hydra import compose, initialize_config_dir

    from normbench.train import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        assert compose(config_name="train").preset_name is None
        for preset in ("fashion_mnist", "local", "cifar10", "imagenet"):
            assert compose(config_name="train", overrides=[f"preset={preset}"]).preset_name == preset
        assert compose(config_name="train", overrides=["experiment=gn_table2"]).preset_name == "imagenet"


def test_gn_table1_training_curves_from_metrics(tmp_path):
    r = tmp_path / "r"
    metrics = {  # per seed: (train_loss, top1_error) for epochs 1, 2
        "bn": [((2.0, 50.0), (1.0, 30.0)), ((1.0, 40.0), (0.5, 20.0))],
        "gn": [((3.0, 60.0), (2.0, 35.0))],
    }
    for norm, seeds in metrics.items():
        for seed, epochs in enumerate(seeds):
            path = write_result(r, experiment="gn_table1", norm=norm, seed=seed, error=epochs[-1][1])
            path.with_name("metrics.jsonl").write_text(
                "".join(
                    json.dumps({"epoch": i + 1, "lr": 0.1, "train_loss": loss, "top1_error": err}) + "\n"
                    for i, (loss, err) in enumerate(epochs)
                )
            )
    write_result(r, experiment="gn_table1", norm="ln", seed=0, error=40.0)  # no metrics.jsonl
    from normbench.report.collect import collect, load_runs
    from normbench.report.layouts import LAYOUTS

    notes: list[str] = []
    coll = collect(LAYOUTS["gn_table1"], load_runs(r, "gn_table1", notes), notes)
    curves = training_curves(LAYOUTS["gn_table1"], coll)
    assert curves == {
        "bn": {"epoch": [1.0, 2.0], "train_loss": [1.5, 0.75], "top1_error": [45.0, 25.0]},
        "gn": {"epoch": [1.0, 2.0], "train_loss": [3.0, 2.0], "top1_error": [60.0, 35.0]},
    }
    s = build_report("gn_table1", r)
    assert "Training curves" in s.markdown and s.png_path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("experiment", ["gn_table1", "gn_table2", "sn_table"])
def test_report_is_byte_reproducible(tmp_path, experiment):
    gn_table2_runs(tmp_path / "r")
    for norm in ("bn", "ln"):
        write_result(tmp_path / "r", experiment="gn_table1", norm=norm, error=12.0)
    bn_eval_runs(tmp_path / "r", experiment="sn_table")
    a = build_report(experiment, tmp_path / "r", tmp_path / "a")
    b = build_report(experiment, tmp_path / "r", tmp_path / "b")
    for pa, pb in zip(a.paths, b.paths):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert b"Software" not in a.png_path.read_bytes()  # no matplotlib version stamped into the PNG


@pytest.mark.parametrize(
    "claim, words",
    [
        ({"kind": "grows", "text": "x"}, "needs kind (one of rises"),
        ({"kind": "rises", "row": "bn", "from": "32", "text": "x"}, "missing to"),
        (
            {"kind": "less", "a": ["bn", "64"], "b": ["gn", "2"], "text": "x"},
            "cell ['bn', '64'] is not in the gn_table2",
        ),
    ],
)
def test_a_claim_the_report_cannot_evaluate_is_refused_in_one_line(claim, words):
    from normbench.report.claims import validate
    from normbench.report.layouts import LAYOUTS

    with pytest.raises(ValueError) as e:
        validate(LAYOUTS["gn_table2"], [claim])
    assert "\n" not in str(e.value) and words in str(e.value) and "gn_table2 claim 1" in str(e.value)
