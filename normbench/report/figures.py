"""The report's figure (matplotlib, Agg canvas; pyplot's global state is never touched).

Byte-reproducible: matplotlib's default style whatever the user's matplotlibrc, and no version/date metadata.
"""

from __future__ import annotations

import io
import statistics

import matplotlib.style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from normbench.runs import read_metrics

from .collect import Collection, ImportanceCell
from .layouts import SN_PAPER_BN_SHARE, Layout

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
SHARE_COLORS = {"bn": "tab:blue", "ln": "tab:orange", "in": "tab:green"}


def _series(layout: Layout, coll: Collection, row: str):
    means, stds, paper, bad = [], [], [], []
    for col in layout.col_keys:
        cell = coll.cells[(row, col)]
        means.append(cell.mean)
        stds.append(float("nan") if cell.std is None else cell.std)
        paper.append(layout.paper.get((row, col)))
        bad.append(cell.mean is None and (cell.n_diverged + cell.n_failed) > 0)
    return means, stds, paper, bad


def _nan(vs):
    return [float("nan") if v is None else v for v in vs]


def _lines(ax, layout: Layout, coll: Collection, xs, ylabel: str):
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for i, (row, label) in enumerate(layout.rows):
        color = COLORS[i % len(COLORS)]
        means, stds, paper, bad = _series(layout, coll, row)
        ax.errorbar(
            xs,
            _nan(means),
            yerr=stds,
            color=color,
            marker="o",
            linestyle="-",
            capsize=3,
            label=f"{label} (reproduced, mean ± std)",
        )
        if any(p is not None for p in paper):
            ax.plot(
                xs,
                _nan(paper),
                color=color,
                marker="s",
                markerfacecolor="none",
                linestyle="--",
                label=f"{label} (paper)",
            )
        for x, b in zip(xs, bad):
            if b:  # diverged/failed with no completed seed: an x at the top of the axes
                ax.plot([x], [0.97], marker="x", color=color, markersize=9, transform=top, clip_on=False)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _importance(ax, layout: Layout, imp: dict[str, ImportanceCell]):
    n = len(layout.col_keys)
    width = 0.38
    for j, kind in enumerate(("mean", "var")):
        xs = [i + (j - 0.5) * width for i in range(n)]
        bottom = [0.0] * n
        for share in ("bn", "ln", "in"):
            vals = [imp[c].mean(kind, share) or 0.0 for c in layout.col_keys]
            ax.bar(
                xs,
                vals,
                width=width * 0.95,
                bottom=bottom,
                color=SHARE_COLORS[share],
                alpha=1.0 if kind == "mean" else 0.55,
                edgecolor="black",
                linewidth=0.4,
                label=f"{share.upper()} ({'means' if kind == 'mean' else 'variances'})",
            )
            bottom = [b + v for b, v in zip(bottom, vals)]
    first = True
    for i, c in enumerate(layout.col_keys):
        if c in SN_PAPER_BN_SHARE:
            ax.plot(
                [i - width, i + width],
                [SN_PAPER_BN_SHARE[c]] * 2,
                color="black",
                linestyle="--",
                linewidth=2,
                label="paper BN share (chart)" if first else None,
            )
            first = False
        if imp[c].n == 0:
            ax.text(i, 0.5, "no SN\nrun", ha="center", va="center", fontsize=7, color="gray")
    ax.set_xticks(range(n), layout.col_keys)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("importance share (BN at the bottom)")
    ax.set_xlabel("(GPUs, images/GPU); left bar of each pair: means, right bar: variances")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))


def _relative(values, lowest: bool):
    """Each value minus the best of its own series (None kept as NaN)."""
    present = [v for v in values if v is not None]
    if not present:
        return [float("nan")] * len(values)
    best = min(present) if lowest else max(present)
    return [float("nan") if v is None else v - best for v in values]


def _relative_lines(ax, layout: Layout, coll: Collection, xs):
    lowest = layout.metric == "error"
    for i, (row, label) in enumerate(layout.rows):
        color = COLORS[i % len(COLORS)]
        means, _, paper, _ = _series(layout, coll, row)
        ax.plot(xs, _relative(means, lowest), color=color, marker="o", linestyle="-", label=f"{label} (reproduced)")
        if any(p is not None for p in paper):
            ax.plot(
                xs,
                _relative(paper, lowest),
                color=color,
                marker="s",
                markerfacecolor="none",
                linestyle="--",
                label=f"{label} (paper)",
            )
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_ylabel(f"{layout.metric} minus own best (points)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _relative_bars(ax, layout: Layout, coll: Collection):
    """Each column's error minus the BN column's (gn_table1)."""
    xs = list(range(len(layout.col_keys)))
    row = layout.row_keys[0]
    means, _, paper, _ = _series(layout, coll, row)
    base_rep, base_pap = coll.cells[(row, "bn")].mean, layout.paper.get((row, "bn"))
    rep = [0.0 if m is None or base_rep is None else m - base_rep for m in means]
    pap = [0.0 if p is None or base_pap is None else p - base_pap for p in paper]
    w = 0.38
    ax.bar([x - w / 2 for x in xs], rep, width=w, color="tab:blue", label="reproduced")
    ax.bar([x + w / 2 for x in xs], pap, width=w, color="none", edgecolor="tab:gray", hatch="//", label="paper")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xticks(xs, [layout.col_label(c) for c in layout.col_keys])
    ax.set_ylabel("error minus BN's (points)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def training_curves(layout: Layout, coll: Collection) -> dict[str, dict[str, list[float]]]:
    """Per column (norm), the mean over completed seeds of each epoch's train_loss and top1_error
    (metrics.jsonl beside each result.json): {col: {"epoch": [...], "train_loss": [...], "top1_error": [...]}}."""
    out = {}
    for (_row, col), cell in sorted(coll.cells.items()):
        per_epoch: dict[int, dict[str, list[float]]] = {}
        for run in cell.completed:
            for m in read_metrics(run.path.parent / "metrics.jsonl"):
                slot = per_epoch.setdefault(int(m["epoch"]), {"train_loss": [], "top1_error": []})
                for key in slot:
                    if isinstance(m.get(key), (int, float)):
                        slot[key].append(float(m[key]))
        if per_epoch:
            epochs = sorted(per_epoch)
            out[col] = {"epoch": [float(e) for e in epochs]} | {
                key: [statistics.fmean(per_epoch[e][key]) if per_epoch[e][key] else float("nan") for e in epochs]
                for key in ("train_loss", "top1_error")
            }
    return out


def _curves(ax_loss, ax_err, layout: Layout, curves: dict[str, dict[str, list[float]]]):
    for i, col in enumerate(layout.col_keys):
        if col not in curves:
            continue
        c = curves[col]
        color = COLORS[i % len(COLORS)]
        ax_loss.plot(c["epoch"], c["train_loss"], color=color, label=layout.col_label(col))
        ax_err.plot(c["epoch"], c["top1_error"], color=color, label=layout.col_label(col))
    for ax, ylabel in ((ax_loss, "training loss (mean over the epoch)"), (ax_err, "validation top-1 error (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no metrics.jsonl", ha="center", va="center", transform=ax.transAxes, color="gray")


def render_png(
    layout: Layout,
    coll: Collection,
    title: str,
    imp: dict[str, ImportanceCell] | None = None,
    curves: dict[str, dict[str, list[float]]] | None = None,
) -> bytes:
    with matplotlib.style.context("default"):
        return _render(layout, coll, title, imp, curves)


def _render(layout: Layout, coll: Collection, title: str, imp, curves) -> bytes:
    ylabel = f"top-1 {layout.metric} (%)"
    ax2 = ax_loss = ax_err = None
    if layout.importance:
        fig = Figure(figsize=(10, 13))
        ax, ax_rel, ax2 = fig.subplots(3, 1, gridspec_kw={"height_ratios": [1, 0.8, 1]})
    elif curves is not None:
        fig = Figure(figsize=(12, 9))
        (ax, ax_rel), (ax_loss, ax_err) = fig.subplots(2, 2)
    else:
        fig = Figure(figsize=(8, 8.5))
        ax, ax_rel = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 0.8]})
    FigureCanvasAgg(fig)

    if layout.figure == "xy":
        xs = [layout.x_values[c] for c in layout.col_keys]
        _lines(ax, layout, coll, xs, ylabel)
        _relative_lines(ax_rel, layout, coll, xs)
        lo, hi = min(xs), max(xs)
        pad = 2**0.3
        for a in (ax, ax_rel):
            a.set_xscale("log", base=2)
            a.set_xticks(xs, [layout.col_label(c) for c in layout.col_keys])
            a.minorticks_off()
            a.set_xlim((hi * pad, lo / pad) if layout.x_decreasing else (lo / pad, hi * pad))
            a.set_xlabel(layout.x_label)
    elif layout.figure == "categorical":
        xs = list(range(len(layout.col_keys)))
        _lines(ax, layout, coll, xs, ylabel)
        _relative_lines(ax_rel, layout, coll, xs)
        for a in (ax, ax_rel):
            a.set_xticks(xs, [layout.col_label(c) for c in layout.col_keys])
            a.set_xlabel(layout.x_label)
    elif layout.figure == "bars":
        xs = list(range(len(layout.col_keys)))
        w = 0.38
        for row, _ in layout.rows:
            means, stds, paper, bad = _series(layout, coll, row)
            ax.bar(
                [x - w / 2 for x in xs],
                [m or 0.0 for m in means],
                width=w,
                yerr=stds,
                capsize=3,
                color="tab:blue",
                label="reproduced (mean ± std)",
            )
            ax.bar(
                [x + w / 2 for x in xs],
                [p or 0.0 for p in paper],
                width=w,
                color="none",
                edgecolor="tab:gray",
                hatch="//",
                linestyle="--",
                label="paper",
            )
            for x, m, b in zip(xs, means, bad):
                if m is None:
                    ax.text(
                        x - w / 2,
                        0.5,
                        "diverged/failed" if b else "missing",
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=8,
                        color="gray",
                    )
        ax.set_xticks(xs, [layout.col_label(c) for c in layout.col_keys])
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        _relative_bars(ax_rel, layout, coll)
    else:  # pragma: no cover - layouts are fixed
        raise ValueError(f"unknown figure kind {layout.figure!r}")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax_rel.set_title(
        "trends compared directly: each series relative to " + ("BN" if layout.figure == "bars" else "its own best"),
        fontsize=10,
    )

    if ax_loss is not None:
        _curves(ax_loss, ax_err, layout, curves)
        ax_loss.set_title("training loss per epoch (per-epoch training error is not recorded)", fontsize=10)
        ax_err.set_title("validation top-1 error per epoch", fontsize=10)
    if ax2 is not None and imp is not None:
        _importance(ax2, layout, imp)
        ax2.set_title("SN learned importance weights, averaged over layers and seeds", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()
