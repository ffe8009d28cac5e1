"""The report's figure (matplotlib, Agg canvas; pyplot's global state is never touched)."""

from __future__ import annotations

import io
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

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
        ax.errorbar(xs, _nan(means), yerr=stds, color=color, marker="o", linestyle="-", capsize=3,
                    label=f"{label} (reproduced, mean ± std)")
        if any(p is not None for p in paper):
            ax.plot(xs, _nan(paper), color=color, marker="s", markerfacecolor="none", linestyle="--",
                    label=f"{label} (paper)")
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
            ax.bar(xs, vals, width=width * 0.95, bottom=bottom, color=SHARE_COLORS[share],
                   alpha=1.0 if kind == "mean" else 0.55, edgecolor="black", linewidth=0.4,
                   label=f"{share.upper()} ({'means' if kind == 'mean' else 'variances'})")
            bottom = [b + v for b, v in zip(bottom, vals)]
    first = True
    for i, c in enumerate(layout.col_keys):
        if c in SN_PAPER_BN_SHARE:
            ax.plot([i - width, i + width], [SN_PAPER_BN_SHARE[c]] * 2, color="black", linestyle="--", linewidth=2,
                    label="paper BN share (chart)" if first else None)
            first = False
        if imp[c].n == 0:
            ax.text(i, 0.5, "no SN\nrun", ha="center", va="center", fontsize=7, color="gray")
    ax.set_xticks(range(n), layout.col_keys)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("importance share (BN at the bottom)")
    ax.set_xlabel("(GPUs, images/GPU); left bar of each pair: means, right bar: variances")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))


def render_png(layout: Layout, coll: Collection, title: str, imp: Optional[dict[str, ImportanceCell]] = None) -> bytes:
    ylabel = f"top-1 {layout.metric} (%)"
    if layout.importance:
        fig = Figure(figsize=(10, 9))
        ax, ax2 = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 1]})
    else:
        fig = Figure(figsize=(8, 5))
        ax, ax2 = fig.subplots(1, 1), None
    FigureCanvasAgg(fig)

    if layout.figure == "xy":
        xs = [layout.x_values[c] for c in layout.col_keys]
        _lines(ax, layout, coll, xs, ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [layout.col_label(c) for c in layout.col_keys])
        ax.minorticks_off()
        lo, hi = min(xs), max(xs)
        pad = 2 ** 0.3
        ax.set_xlim((hi * pad, lo / pad) if layout.x_decreasing else (lo / pad, hi * pad))
        ax.set_xlabel(layout.x_label)
    elif layout.figure == "categorical":
        xs = list(range(len(layout.col_keys)))
        _lines(ax, layout, coll, xs, ylabel)
        ax.set_xticks(xs, [layout.col_label(c) for c in layout.col_keys])
        ax.set_xlabel(layout.x_label)
    elif layout.figure == "bars":
        xs = list(range(len(layout.col_keys)))
        w = 0.38
        for row, _ in layout.rows:
            means, stds, paper, bad = _series(layout, coll, row)
            ax.bar([x - w / 2 for x in xs], [m or 0.0 for m in means], width=w, yerr=stds, capsize=3,
                   color="tab:blue", label="reproduced (mean ± std)")
            ax.bar([x + w / 2 for x in xs], [p or 0.0 for p in paper], width=w, color="none",
                   edgecolor="tab:gray", hatch="//", linestyle="--", label="paper")
            for x, m, b in zip(xs, means, bad):
                if m is None:
                    ax.text(x - w / 2, 0.5, "diverged/failed" if b else "missing", rotation=90,
                            ha="center", va="bottom", fontsize=8, color="gray")
        ax.set_xticks(xs, [layout.col_label(c) for c in layout.col_keys])
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    else:  # pragma: no cover - layouts are fixed
        raise ValueError(f"unknown figure kind {layout.figure!r}")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)

    if ax2 is not None and imp is not None:
        _importance(ax2, layout, imp)
        ax2.set_title("SN learned importance weights, averaged over layers and seeds", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
