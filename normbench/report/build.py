"""build_report: result.json files -> NAME.md, NAME.csv, NAME.png in the paper's layout."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from normbench.runs import write_bytes, write_text

from .claims import Judged, judge, load_claims
from .collect import (
    EVAL_MODES,
    SHARES,
    Cell,
    Collection,
    ImportanceCell,
    Stat,
    collect,
    importance_cells,
    load_runs,
    select_model_data,
)
from .figures import render_png, training_curves
from .layouts import LAYOUTS, SN_PAPER_BN_SHARE, Layout, Values

CSV_FIELDS = (
    "experiment",
    "row",
    "column",
    "metric",
    "mean",
    "std",
    "n_seeds",
    "n_diverged",
    "n_failed",
    "n_interrupted",
    "paper",
    "note",
)
NA = "–"
EVAL_LABELS = {"ema": "EMA statistics", "precise_bn": "PreciseBN", "batch_stats": "test-batch statistics"}
FIGURE_RELATIVE = {  # the second panel: trends a reader can hold against the paper's despite the offset
    "xy": "Second panel: each curve minus its own best (lowest error) over the columns, reproduced and paper alike, "
    "so the shapes compare directly although the small-scale errors sit far from the paper's.",
    "categorical": "Second panel: each curve minus its own best (highest accuracy) over the settings, reproduced "
    "and paper alike, so the shapes compare directly.",
    "bars": "Second panel: each norm's error minus BN's, reproduced and paper side by side.",
}


@dataclass
class ReportSummary:
    experiment: str
    paths: tuple[Path, ...]  # files written: (NAME.md, NAME.csv, NAME.png)
    n_completed: int  # runs placed in the table, by status
    n_diverged: int
    n_failed: int
    n_missing_cells: int  # cells with no run at all (cells not run by design excluded)
    missing_cells: list[str]
    n_unmatched: int  # runs of this experiment that fit no cell of the layout
    notes: list[str]
    markdown: str
    model: str | None = None
    data: str | None = None
    n_superseded: int = 0
    n_interrupted: int = 0
    claims: list[Judged] = field(default_factory=list)

    @property
    def md_path(self) -> Path:
        return self.paths[0]

    @property
    def csv_path(self) -> Path:
        return self.paths[1]

    @property
    def png_path(self) -> Path:
        return self.paths[2]


# --------------------------------------------------------------------------------------------------
# formatting


def _num(v: float | None, digits: int = 2, signed: bool = False) -> str:
    if v is None:
        return NA
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _csv_num(v: float | None) -> str:
    return "" if v is None else repr(round(v, 6))


def cell_text(layout: Layout, cell: Cell) -> str:
    total = len(cell.runs)
    parts = []
    if cell.n:
        s = f"{cell.mean:.2f}"
        if cell.std is not None:
            s += f" ± {cell.std:.2f}"
        parts.append(s + f" (n={cell.n})")
    if cell.n_diverged:
        parts.append(f"diverged ({cell.n_diverged}/{total} seeds)")
    if cell.n_failed:
        parts.append(f"failed ({cell.n_failed}/{total} seeds)")
    if cell.n_interrupted:
        parts.append(f"interrupted ({cell.n_interrupted}/{total} seeds)")
    n_nometric = sum(r.status == "completed" and r.top1_error_median_last5 is None for r in cell.runs)
    if n_nometric:
        parts.append(f"no metric ({n_nometric}/{total} seeds)")
    if not parts:
        return layout.not_run.get((cell.row, cell.col), "missing")
    return "; ".join(parts)


def paper_text(layout: Layout, key) -> str:
    v = layout.paper.get(key)
    note = layout.paper_notes.get(key)
    if v is None:
        return f"- ({note})" if note else NA
    s = f"{v:.1f}" + ("*" if key in layout.single_sourced else "")
    return s + (f" ({note})" if note else "")


def _md_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Markdown table; the first ``left`` columns left-aligned (labels, text), the rest right-aligned (numbers)."""
    esc = [[c.replace("|", "\\|") for c in r] for r in [header] + rows]
    align = ["---"] * left + ["---:"] * (len(header) - left)
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _trend_value(v, fmt: str, digits: int) -> str:
    if v is None:
        return "n/a (cells without numbers)"
    if fmt == "text":
        return str(v)
    return _num(v, digits, signed=(fmt == "signed"))


def _preset_excluded(layout: Layout, coll: Collection, runs, notes: list[str]) -> dict:
    """Cells of columns that the runs' preset left out of the sweep (config.sweep.allowed), with no runs."""
    axis = layout.sweep_axis
    if not axis:
        return {}
    seen = set()
    for r in runs:
        allowed = ((r.data.get("config") or {}).get("sweep") or {}).get("allowed") or {}
        if isinstance(allowed, dict) and isinstance(allowed.get(axis), (list, tuple)):
            seen.add(tuple(str(v).lower() for v in allowed[axis]))
    if not seen:
        return {}
    if len(seen) > 1:
        notes.append(f"Runs disagree on sweep.allowed[{axis!r}]: {sorted(seen)}; their union is used.")
    ok = set().union(*seen)
    shown = ", ".join(sorted(ok, key=lambda v: (len(v), v), reverse=True))
    out = {}
    for ck in layout.col_keys:
        if ck.lower() in ok:
            continue
        for rk in layout.row_keys:
            if not coll.cells[(rk, ck)].runs:
                out[(rk, ck)] = f"- (not run: preset allows {axis} in {shown})"
    return out


def _cols_in_play(layout: Layout) -> tuple[str, ...]:
    return tuple(c for c in layout.col_keys if any((r, c) not in layout.not_run for r in layout.row_keys))


def _missing_label(layout: Layout, row: str, col: str) -> str:
    head = layout.col_header or "norm"
    return f"{layout.row_label(row)}, {head} {layout.col_label(col)}"


# --------------------------------------------------------------------------------------------------
# building blocks


def _means(coll: Collection) -> Values:
    return {k: c.mean for k, c in coll.cells.items()}


def _csv_rows(layout: Layout, coll: Collection, imp: dict[str, ImportanceCell] | None, bn_eval) -> list[dict]:
    rows = []
    for rk, rl in layout.rows:
        for ck in layout.col_keys:
            cell = coll.cells[(rk, ck)]
            notes = []
            if not cell.runs:
                text = layout.not_run.get((rk, ck), "missing").lstrip("- ").strip()
                notes.append(text[1:-1] if text.startswith("(") and text.endswith(")") else text)
            elif cell.n == 0:
                notes.append("no completed seed")
            if (rk, ck) in layout.paper_notes:
                notes.append("paper: " + layout.paper_notes[(rk, ck)])
            if (rk, ck) in layout.single_sourced:
                notes.append("paper: single-sourced")
            rows.append(
                {
                    "experiment": layout.name,
                    "row": rl,
                    "column": ck,
                    "metric": layout.csv_metric,
                    "mean": _csv_num(cell.mean),
                    "std": _csv_num(cell.std),
                    "n_seeds": cell.n,
                    "n_diverged": cell.n_diverged,
                    "n_failed": cell.n_failed,
                    "n_interrupted": cell.n_interrupted,
                    "paper": _csv_num(layout.paper.get((rk, ck))),
                    "note": "; ".join(notes),
                }
            )
    means = _means(coll)
    for d in layout.derived:
        rep, pap = d.fn(means, layout.col_keys), d.fn(layout.paper, layout.col_keys)
        for ck in layout.col_keys:
            rows.append(
                {
                    "experiment": layout.name,
                    "row": d.key,
                    "column": ck,
                    "metric": d.csv_metric,
                    "mean": _csv_num(rep[ck]),
                    "std": "",
                    "n_seeds": "",
                    "n_diverged": "",
                    "n_failed": "",
                    "n_interrupted": "",
                    "paper": _csv_num(pap[ck]),
                    "note": "derived from the means",
                }
            )
    if imp is not None:
        for kind, kl in (("mean", "means"), ("var", "variances")):
            for ck in layout.col_keys:
                for share in SHARES:
                    ic = imp[ck]
                    paper = SN_PAPER_BN_SHARE.get(ck) if share == "bn" else None
                    rows.append(
                        {
                            "experiment": layout.name,
                            "row": f"SN importance ({kl})",
                            "column": ck,
                            "metric": f"{share}_share",
                            "mean": _csv_num(ic.mean(kind, share)),
                            "std": _csv_num(ic.std(kind, share)),
                            "n_seeds": ic.n,
                            "n_diverged": "",
                            "n_failed": "",
                            "n_interrupted": "",
                            "paper": _csv_num(paper),
                            "note": (
                                "paper: read off a chart, not split into means/variances" if paper is not None else ""
                            )
                            + ("" if ic.n else ("; " if paper is not None else "") + "no SN run with importance"),
                        }
                    )
    if bn_eval is not None:
        rows += _bn_eval_csv_rows(layout, bn_eval)
    return rows


def _bn_eval_csv_rows(layout: Layout, stats) -> list[dict]:
    accuracy = layout.metric == "accuracy"
    empty = {"n_diverged": "", "n_failed": "", "n_interrupted": "", "paper": ""}
    rows = []
    for mode in EVAL_MODES:
        for ck in layout.col_keys:
            st = stats[(mode, ck)]
            mean = None if st.mean is None else (100.0 - st.mean if accuracy else st.mean)
            rows.append(
                {
                    "experiment": layout.name,
                    "row": f"BN, {EVAL_LABELS[mode]} (final model)",
                    "column": ck,
                    "metric": "top1_accuracy_final" if accuracy else "top1_error_final",
                    "mean": _csv_num(mean),
                    "std": _csv_num(st.std),
                    "n_seeds": st.n,
                    **empty,
                    "note": "" if st.n else "no run recorded top1_error_by_eval",
                }
            )
    for mode in EVAL_MODES[1:]:
        rows.append(
            {
                "experiment": layout.name,
                "row": "BN rise removed",
                "column": mode,
                "metric": "1 - rise/rise_ema",
                "mean": _csv_num(_rise_removed(stats, layout, mode)),
                "std": "",
                "n_seeds": "",
                **empty,
                "note": f"rise = final-model BN error at {layout.bn_eval[1]} minus at {layout.bn_eval[0]}",
            }
        )
    return rows


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _importance_md(layout: Layout, imp: dict[str, ImportanceCell]) -> list[str]:
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
    rows.append(["paper BN share (chart)"] + [_num(SN_PAPER_BN_SHARE.get(ck)) for ck in layout.col_keys])
    out = [
        "## SN learned importance weights",
        "",
        "Per run, the softmax importance shares of each SN layer are averaged over layers; cells give the mean "
        "over seeds ± sample std (n = seeds). A share absent from a layer (BN with use_bn=false) counts as 0. "
        "The paper's BN share is read off a chart and is not split into means and variances.",
        "",
        _md_table(header, rows),
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


def _what_was_run(layout: Layout, coll: Collection, results_dir: Path, model, data, missing: list[str]) -> list[str]:
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


def _table_section(layout: Layout, coll: Collection) -> list[str]:
    better = "**accuracy** % (higher is better)" if layout.metric == "accuracy" else "**error** % (lower is better)"
    md = ["## Table", "", f"Top-1 {better}. Each row: reproduced, then the paper.", ""]
    header = [layout.col_header or "norm"] + [layout.col_label(c) for c in layout.col_keys]
    rows = []
    for rk, rl in layout.rows:
        rows.append([f"**{rl}**"] + [cell_text(layout, coll.cells[(rk, ck)]) for ck in layout.col_keys])
        rows.append([f"{rl} (paper)"] + [paper_text(layout, (rk, ck)) for ck in layout.col_keys])
    means = _means(coll)
    for d in layout.derived:
        rep, pap = d.fn(means, layout.col_keys), d.fn(layout.paper, layout.col_keys)
        rows.append([f"**{d.label}**"] + [_num(rep[c], 2, signed=True) for c in layout.col_keys])
        rows.append([f"{d.label} (paper)"] + [_num(pap[c], 1, signed=True) for c in layout.col_keys])
    md += [_md_table(header, rows), ""]
    md.append(
        f"Paper: {layout.paper_source}. {layout.paper_caveat}"
        + (" `*` = single-sourced cell." if layout.single_sourced else "")
    )
    return md + [""]


def _trend_section(layout: Layout, coll: Collection, model, data) -> list[str]:
    md = ["## Trend", ""]
    if not coll.runs:
        pass
    elif str(data).lower().startswith("imagenet"):
        md += [
            f"Run on `{data}`: absolute numbers are comparable with the paper (same data), "
            "within the limits of the recipe actually used.",
            "",
        ]
    else:
        md += [
            f"> **Small-scale reproduction** (`{model}` on `{data}`, not ResNet-50 on ImageNet): absolute numbers "
            "are not comparable with the paper's. The TREND is what is held against the paper.",
            "",
        ]
    cols = _cols_in_play(layout)
    if cols != layout.col_keys:
        md += [
            f"Trends over the columns run ({', '.join(layout.col_label(c) for c in cols)}); "
            "the paper's numbers are taken over the same columns.",
            "",
        ]
    means = _means(coll)
    for t in layout.trends:
        rep, pap = t.fn(means, cols), t.fn(layout.paper, cols)
        md.append(f"- {t.label}: {_trend_value(rep, t.fmt, 2)} (paper {_trend_value(pap, t.fmt, 1)})")
    return md + [""]


def _bn_eval_stats(layout: Layout, coll: Collection) -> dict[tuple[str, str], Stat] | None:
    """{(mode, column): final-model BN errors}, or None when no BN run recorded top1_error_by_eval."""
    if layout.bn_eval is None:
        return None
    stats = {(m, c): coll.cells[("bn", c)].errors_by_eval(m) for m in EVAL_MODES for c in layout.col_keys}
    return stats if any(st.n for st in stats.values()) else None


def _bn_rise(stats: dict[tuple[str, str], Stat], layout: Layout, mode: str) -> float | None:
    """rise_mode = BN_mode(small) - BN_mode(large), on final-model error means."""
    large, small = layout.bn_eval
    a, b = stats[(mode, small)].mean, stats[(mode, large)].mean
    return None if a is None or b is None else a - b


def _rise_removed(stats, layout: Layout, mode: str) -> float | None:
    """Share of the EMA rise that ``mode`` removes: 1 - rise_mode / rise_ema (None: no EMA rise to remove)."""
    rise, rise_ema = _bn_rise(stats, layout, mode), _bn_rise(stats, layout, "ema")
    return None if rise is None or rise_ema is None or rise_ema <= 0 else 1.0 - rise / rise_ema


def _bn_eval_section(layout: Layout, stats) -> list[str]:
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
        r, share = _bn_rise(stats, layout, mode), _rise_removed(stats, layout, mode)
        text = f"{EVAL_LABELS[mode]} {_num(r, 2, signed=True)}"
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
        _md_table(header, rows),
        "",
        f"- BN's final-model error rise from {large} to {small} images/GPU, rise_x = BN_x({small}) - BN_x({large}) "
        f'on the error means: {"; ".join(rise(m) for m in EVAL_MODES)}. "Removing s of it": '
        "s = 1 - rise_x / rise_EMA (100%: no rise left; negative: a larger rise than EMA's).",
        "",
    ]


def _claims_section(layout: Layout, judged: list[Judged]) -> list[str]:
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
        _md_table(["claim", "verdict", "reproduced (error %)", "paper"], rows, left=4),
        "",
    ]


def _figure_section(layout: Layout, imp, png_name: str) -> list[str]:
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
    if layout.name == "gn_table1":
        md.append(
            "Training curves (bottom): mean training loss per epoch and validation top-1 error after each "
            "epoch, mean over seeds (`metrics.jsonl`; per-epoch training error is not recorded, so training "
            "loss stands in for the paper's training error)."
        )
    return md + [""]


def _missing_section(layout: Layout, coll: Collection, missing: list[str]) -> list[str]:
    md = ["## Missing cells", ""]
    md += [f"- {m}" for m in missing] if missing else ["None."]
    not_run = [
        f"- {_missing_label(layout, r, c)}: {t}" for (r, c), t in layout.not_run.items() if not coll.cells[(r, c)].runs
    ]
    if not_run:
        md += ["", "Not run by design:"] + not_run
    return md + [""]


def _unmatched_section(layout: Layout, coll: Collection) -> list[str]:
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


def _markdown(
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
    md += _what_was_run(layout, coll, results_dir, model, data, missing)
    md += _table_section(layout, coll)
    md += _trend_section(layout, coll, model, data)
    md += _claims_section(layout, judged)
    md += _bn_eval_section(layout, bn_eval)
    if imp is not None:
        md += _importance_md(layout, imp)
    md += _figure_section(layout, imp, png_name)
    md += _missing_section(layout, coll, missing)
    md += _unmatched_section(layout, coll)
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(md)


# --------------------------------------------------------------------------------------------------


def build_report(
    experiment: str, results_dir, out_dir: Path | None = None, *, model: str | None = None, data: str | None = None
) -> ReportSummary:
    """Build NAME.md, NAME.csv and NAME.png for one experiment from ``results_dir/**/result.json``.

    Only runs whose ``experiment`` field equals ``experiment`` are read. Refused with a one-line ValueError,
    before anything is written: an unknown experiment, a results_dir that does not exist, runs of several
    (model, data) pairs unless ``model``/``data`` select one, and a cell whose runs differ in a setting other
    than the seed. Never trains anything; the same runs give byte-identical files.
    """
    if experiment not in LAYOUTS:
        raise ValueError(f"unknown experiment {experiment!r}; known: {', '.join(LAYOUTS)}")
    layout = LAYOUTS[experiment]
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir / "reports"
    if not results_dir.is_dir():
        raise ValueError(
            f"results_dir {str(results_dir)!r} is not a directory; pass the results_dir the runs "
            "were trained into (e.g. results_dir=results/runs)"
        )

    notes: list[str] = []
    runs = load_runs(results_dir, experiment, notes)
    runs = select_model_data(runs, experiment, model, data)
    coll = collect(layout, runs, notes)
    excluded = _preset_excluded(layout, coll, runs, notes)
    if excluded:
        layout = dataclasses.replace(layout, not_run={**excluded, **layout.not_run})
    imp = importance_cells(layout, coll, notes) if layout.importance else None
    bn_eval = _bn_eval_stats(layout, coll)
    judged = judge(layout, coll, load_claims(experiment), _cols_in_play(layout))
    pairs = {(r.data.get("model"), r.data.get("data")) for r in runs}
    model_, data_ = next(iter(pairs)) if pairs else (model, data)

    missing = [
        _missing_label(layout, r, c)
        for (r, c), cell in coll.cells.items()
        if not cell.runs and (r, c) not in layout.not_run
    ]
    png_name = f"{experiment}.png"
    markdown = _markdown(layout, coll, imp, bn_eval, judged, results_dir, model_, data_, png_name, missing, notes)
    csv_text = _csv_text(_csv_rows(layout, coll, imp, bn_eval))
    title = f"{experiment}" + (f": {model_} on {data_}" if pairs else ": no runs yet")
    curves = training_curves(layout, coll) if layout.name == "gn_table1" else None
    png = render_png(layout, coll, title, imp, curves)

    paths = (out_dir / f"{experiment}.md", out_dir / f"{experiment}.csv", out_dir / png_name)
    write_bytes(paths[2], png)
    write_text(paths[1], csv_text)
    write_text(paths[0], markdown)

    status = Counter(r.status for r in coll.runs)
    return ReportSummary(
        experiment=experiment,
        paths=paths,
        n_completed=status["completed"],
        n_diverged=status["diverged"],
        n_failed=status["failed"],
        n_missing_cells=len(missing),
        missing_cells=missing,
        n_unmatched=len(coll.unmatched),
        notes=list(notes),
        markdown=markdown,
        model=model_,
        data=data_,
        n_superseded=len(coll.superseded),
        n_interrupted=status["interrupted"],
        claims=judged,
    )
