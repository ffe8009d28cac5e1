"""The report's Markdown: what was run, the table beside the paper, trends, the BN-evaluation analysis,
claims and their verdicts, figures, and what is missing or unmatched."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .analysis import bn_rise, cell_means, cols_in_play, missing_label, rise_removed
from .claims import Judged
from .collect import (
    EVAL_MODES,
    SHARES,
    Collection,
    ImportanceCell,
    Stat,
)
from .formatting import EVAL_LABELS, NA, augmentation_label, cell_text, md_table, num, paper_text, trend_value
from .layouts import SN_PAPER_BN_SHARE, Layout

FIGURE_RELATIVE = {  # the second panel: trends a reader can hold against the paper's despite the offset
    "xy": "Second panel: each curve minus its own best (lowest error) over the columns, reproduced and paper alike, "
    "so the shapes compare directly although the small-scale errors sit far from the paper's.",
    "categorical": "Second panel: each curve minus its own best (highest accuracy) over the settings, reproduced "
    "and paper alike, so the shapes compare directly.",
    "bars": "Second panel: each norm's error minus BN's, reproduced and paper side by side.",
}


def importance_md(layout: Layout, imp: dict[str, ImportanceCell]) -> list[str]:
    header = [layout.col_header] + list(layout.col_keys)
    rows = []
    for kind, kl in (("mean", "means"), ("var", "variances")):
        for share in SHARES:
            r = [f"{kl}: {share.upper()}"]
            for ck in layout.col_keys:
                ic = imp[ck]
                if not ic.n:
                    r.append("no run")
                    continue
                s = f"{ic.mean(kind, share):.2f}"
                sd = ic.std(kind, share)
                r.append(s + (f" ± {sd:.2f}" if sd is not None else "") + f" (n={ic.n})")
            rows.append(r)
    rows.append(["paper BN share (chart)"] + [num(SN_PAPER_BN_SHARE.get(ck)) for ck in layout.col_keys])
    out = [
        "## SN learned importance weights",
        "",
        "Per run, the softmax importance shares of each SN layer are averaged over layers; cells give the mean "
        "over seeds ± sample std (n = seeds). A share absent from a layer (BN with use_bn=false) counts as 0. "
        "The paper's BN share is read off a chart and is not split into means and variances.",
        "",
        md_table(header, rows),
        "",
    ]
    a, b = imp.get("(8,32)"), imp.get("(8,2)")
    if a is not None and b is not None:

        def pair(kind):
            if not (a.n and b.n):
                return "n/a (cells without numbers)"
            return f"{a.mean(kind, 'bn'):.2f} → {b.mean(kind, 'bn'):.2f}"

        out += [
            f"- BN share from (8,32) to (8,2): means {pair('mean')}, variances {pair('var')} "
            f"(paper {SN_PAPER_BN_SHARE['(8,32)']:.2f} → {SN_PAPER_BN_SHARE['(8,2)']:.2f})",
            "",
        ]
    return out


def what_was_run(layout: Layout, coll: Collection, results_dir: Path, model, data, missing: list[str]) -> list[str]:
    placed = coll.runs
    status = Counter(r.status for r in placed)
    n_cells = len(coll.cells) - sum(1 for k, c in coll.cells.items() if not c.runs and k in layout.not_run)
    md = ["## What was run", ""]
    if placed or coll.unmatched:
        md.append(f"- Model / data: `{model}` on `{data}`")
        epochs = Counter(r.data.get("epochs") for r in placed)
        presets = Counter((r.data.get("config") or {}).get("preset_name") for r in placed)
        presets.pop(None, None)  # runs from before preset_name was recorded
        ep = ", ".join(
            f"{e}" + (f" ({k} run{'s' * (k != 1)})" if len(epochs) > 1 else "")
            for e, k in sorted(epochs.items(), key=str)
        )
        md.append(
            f"- Epochs: {ep or NA}"
            + (f"; preset: {', '.join(f'`{p}`' for p in sorted(map(str, presets)))}" if presets else "")
        )
        augment = Counter(augmentation_label((r.data.get("config") or {}).get("data")) for r in placed)
        augment.pop(None, None)  # runs that recorded no data config
        if augment:
            md.append(
                "- Training augmentation: "
                + "; ".join(
                    f"{a}" + (f" ({k} run{'s' * (k != 1)})" if len(augment) > 1 else "")
                    for a, k in sorted(augment.items())
                )
                + (" -- mixed: a cell never averages runs that differ in it" if len(augment) > 1 else "")
            )
        gpus = sorted({r.data.get("gpus") for r in placed} - {None})
        totals = {r.data.get("gpus", 0) * r.data.get("per_gpu_batch", 0) for r in placed}
        if gpus and layout.name != "sn_table":  # the SN table has GPUs as an axis
            if len(gpus) > 1 and len(totals) == 1:  # a small preset's fixed total batch
                md.append(
                    f"- GPUs per step (emulated): {', '.join(map(str, gpus))} -- a fixed total of "
                    f"{totals.pop()} images per step split into GPUs of per_gpu_batch images, so every "
                    "setting gets the same steps and lr (the paper: 8 GPUs x per_gpu_batch)"
                )
            else:
                md.append(
                    f"- GPUs per step (emulated): {', '.join(map(str, gpus))} (the paper: 8)"
                    + (" -- mixed: cells pool runs of different GPU counts" if len(gpus) > 1 else "")
                )
    else:
        md.append(f"- No `result.json` for experiment `{layout.name}` under `{results_dir}` yet.")
    md.append(
        f"- Runs in the table: {status['completed']} completed, {status['diverged']} diverged, "
        f"{status['failed']} failed"
        + (
            f", {status['interrupted']} interrupted (unfinished: counted, not averaged; rerunning the sweep "
            "resumes them)"
            if status["interrupted"]
            else ""
        )
        + f"; missing cells: {len(missing)} of {n_cells}"
        + (f"; runs outside the layout: {len(coll.unmatched)}" if coll.unmatched else "")
        + (f"; superseded reruns: {len(coll.superseded)}" if coll.superseded else "")
    )
    commits = Counter(
        ((r.data.get("git") or {}).get("commit"), bool((r.data.get("git") or {}).get("dirty"))) for r in placed
    )
    if commits:
        md.append(
            "- Git commits: "
            + ", ".join(
                f"`{(c or 'unknown')[:10]}`" + (" (dirty)" if d else "") + f" ({k} run{'s' * (k != 1)})"
                for (c, d), k in sorted(commits.items(), key=str)
            )
        )
    metric = (
        "top-1 accuracy = 100 - median top-1 error of the last 5 epochs"
        if layout.metric == "accuracy"
        else "median top-1 error of the last 5 epochs"
    )
    md.append(
        f"- Metric: {metric} (`top1_error_median_last5`); cell = mean ± sample std over seeds (n = completed "
        "seeds; n=1 has no std). Diverged/failed/interrupted runs are shown and counted, never filled in; "
        "a cell only averages runs whose settings agree in everything but the seed."
    )
    short = sorted({e for e in (r.data.get("epochs") for r in placed) if isinstance(e, int) and e < 5})
    if short:
        md.append(
            f'- Runs of {", ".join(map(str, short))} epoch(s) have fewer than 5 epochs: their "median of the '
            'last 5" is the median over all their epochs.'
        )
    md.append(f"- Cells: {layout.layout_note}.")
    md.append(f"- Results: `{results_dir}`")
    return md + [""]


def table_section(layout: Layout, coll: Collection) -> list[str]:
    better = "**accuracy** % (higher is better)" if layout.metric == "accuracy" else "**error** % (lower is better)"
    md = ["## Table", "", f"Top-1 {better}. Each row: reproduced, then the paper.", ""]
    header = [layout.col_header or "norm"] + [layout.col_label(c) for c in layout.col_keys]
    rows = []
    for rk, rl in layout.rows:
        rows.append([f"**{rl}**"] + [cell_text(layout, coll.cells[(rk, ck)]) for ck in layout.col_keys])
        rows.append([f"{rl} (paper)"] + [paper_text(layout, (rk, ck)) for ck in layout.col_keys])
    means = cell_means(coll)
    for d in layout.derived:
        rep, pap = d.fn(means, layout.col_keys), d.fn(layout.paper, layout.col_keys)
        rows.append([f"**{d.label}**"] + [num(rep[c], 2, signed=True) for c in layout.col_keys])
        rows.append([f"{d.label} (paper)"] + [num(pap[c], 1, signed=True) for c in layout.col_keys])
    md += [md_table(header, rows), ""]
    md.append(
        f"Paper: {layout.paper_source}. {layout.paper_caveat}"
        + (" `*` = single-sourced cell." if layout.single_sourced else "")
    )
    return md + [""]


def trend_section(layout: Layout, coll: Collection, model, data) -> list[str]:
    md = ["## Trend", ""]
    if coll.runs and str(data).lower().startswith("imagenet"):
        md += [
            f"Run on `{data}`: absolute numbers are comparable with the paper (same data), "
            "within the limits of the recipe actually used.",
            "",
        ]
    elif coll.runs:
        md += [
            f"> **Small-scale reproduction** (`{model}` on `{data}`, not ResNet-50 on ImageNet): absolute numbers "
            "are not comparable with the paper's. The TREND is what is held against the paper.",
            "",
        ]
    cols = cols_in_play(layout)
    if cols != layout.col_keys:
        md += [
            f"Trends over the columns run ({', '.join(layout.col_label(c) for c in cols)}); "
            "the paper's numbers are taken over the same columns.",
            "",
        ]
    means = cell_means(coll)
    for t in layout.trends:
        rep, pap = t.fn(means, cols), t.fn(layout.paper, cols)
        md.append(f"- {t.label}: {trend_value(rep, t.fmt, 2)} (paper {trend_value(pap, t.fmt, 1)})")
    return md + [""]


def bn_eval_section(layout: Layout, stats) -> list[str]:
    if stats is None:
        return []
    accuracy = layout.metric == "accuracy"

    def shown(st: Stat) -> str:
        if not st.n:
            return NA
        mean = 100.0 - st.mean if accuracy else st.mean
        return f"{mean:.2f}" + (f" ± {st.std:.2f}" if st.std is not None else "") + f" (n={st.n})"

    header = [layout.col_header or "norm"] + [layout.col_label(c) for c in layout.col_keys]
    rows = [[f"BN, {EVAL_LABELS[m]}"] + [shown(stats[(m, c)]) for c in layout.col_keys] for m in EVAL_MODES]
    large, small = (layout.col_label(c) for c in layout.bn_eval)
    what = "accuracy" if accuracy else "error"

    def rise(mode):
        r, share = bn_rise(stats, layout, mode), rise_removed(stats, layout, mode)
        text = f"{EVAL_LABELS[mode]} {num(r, 2, signed=True)}"
        if mode != "ema":
            text += f", removing {share:.0%} of it" if share is not None else " (share n/a: no EMA rise to remove)"
        return text

    return [
        "## BN evaluation: running statistics, PreciseBN, test-batch statistics",
        "",
        f"Final-model top-1 {what} % of the BN runs (the last epoch, not the table's median of the last 5), "
        "evaluated three ways: the EMA running statistics kept in training (what the table's BN uses), statistics "
        "re-estimated over training batches with the final weights (PreciseBN), and each test batch's own "
        "statistics in groups of per_gpu_batch images. Mean ± std over seeds; – where runs did not record it "
        "(`top1_error_by_eval`). No paper numbers exist for these rows.",
        "",
        md_table(header, rows),
        "",
        f"- BN's final-model error rise from {large} to {small} images/GPU, rise_x = BN_x({small}) - BN_x({large}) "
        f'on the error means: {"; ".join(rise(m) for m in EVAL_MODES)}. "Removing s of it": '
        "s = 1 - rise_x / rise_EMA (100%: no rise left; negative: a larger rise than EMA's).",
        "",
    ]


def claims_section(layout: Layout, judged: list[Judged]) -> list[str]:
    if not judged:
        return []
    rows = [[j.text, f"**{j.verdict}**", j.numbers, j.paper] for j in judged]
    return [
        "## Claims",
        "",
        "The paper's claims (configs/experiment), judged on top-1 **error** % cell means"
        + (" (accuracy = 100 - error)" if layout.metric == "accuracy" else "")
        + ". A difference counts when it exceeds two standard errors, SE = sqrt(s_a^2/n_a + s_b^2/n_b + ...) "
        "over the cells involved (s: sample std over seeds, n: seeds): holds / does not hold when the margin "
        'is beyond +-2 SE, inconclusive within it, inconclusive (n=1) with a single seed. "By construction": '
        "the protocol makes the runs identical, so the claim is no evidence. The paper's numbers go through "
        "the same test with SE = 0.",
        "",
        md_table(["claim", "verdict", "reproduced (error %)", "paper"], rows, left=4),
        "",
    ]


def figure_section(layout: Layout, imp, png_name: str) -> list[str]:
    md = ["## Figure", "", f"![{layout.name}]({png_name})", ""]
    if layout.figure == "xy":
        md.append(f"Solid: reproduced mean ± std; dashed: paper, same color. x: {layout.x_label}.")
    elif layout.figure == "categorical":
        md.append(
            "Solid: reproduced mean ± std; dashed: paper, same color; x marks a cell with only "
            "diverged/failed runs."
            + (" Below: importance shares as stacked bars per setting." if imp is not None else "")
        )
    else:
        md.append("Filled bars: reproduced mean ± std; hatched: paper.")
    md.append(FIGURE_RELATIVE[layout.figure])
    if layout.training_curves:
        md.append(
            "Training curves (bottom): mean training loss per epoch and validation top-1 error after each "
            "epoch, mean over seeds (`metrics.jsonl`; per-epoch training error is not recorded, so training "
            "loss stands in for the paper's training error)."
        )
    return md + [""]


def missing_section(layout: Layout, coll: Collection, missing: list[str]) -> list[str]:
    md = ["## Missing cells", ""]
    md += [f"- {m}" for m in missing] if missing else ["None."]
    not_run = [
        f"- {missing_label(layout, r, c)}: {t}" for (r, c), t in layout.not_run.items() if not coll.cells[(r, c)].runs
    ]
    if not_run:
        md += ["", "Not run by design:"] + not_run
    return md + [""]


def unmatched_section(layout: Layout, coll: Collection) -> list[str]:
    if not coll.unmatched:
        return []
    md = [
        "## Runs outside this table's layout",
        "",
        f"These runs carry `experiment: {layout.name}` but fit no cell ({layout.layout_note}); "
        "they are not in the table.",
        "",
    ]
    for r in coll.unmatched[:30]:
        d = r.data
        md.append(
            f"- `{r.label()}`: norm={d.get('norm')} norm_options={d.get('norm_options')} "
            f"gpus={d.get('gpus')} per_gpu_batch={d.get('per_gpu_batch')} status={d.get('status')}"
        )
    if len(coll.unmatched) > 30:
        md.append(f"- ... and {len(coll.unmatched) - 30} more")
    return md + [""]


def report_markdown(
    layout: Layout,
    coll: Collection,
    imp,
    bn_eval,
    judged: list[Judged],
    results_dir: Path,
    model,
    data,
    png_name: str,
    missing: list[str],
    notes: list[str],
) -> str:
    md = [f"# {layout.name}: {layout.title}", ""]
    md += what_was_run(layout, coll, results_dir, model, data, missing)
    md += table_section(layout, coll)
    md += trend_section(layout, coll, model, data)
    md += claims_section(layout, judged)
    md += bn_eval_section(layout, bn_eval)
    if imp is not None:
        md += importance_md(layout, imp)
    md += figure_section(layout, imp, png_name)
    md += missing_section(layout, coll, missing)
    md += unmatched_section(layout, coll)
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(md)
