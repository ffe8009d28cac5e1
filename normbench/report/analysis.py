"""What a report derives from the collected runs: cells left out by the preset, the columns in play, cell
means, and the final-model BN evaluation (ema / PreciseBN / test-batch statistics) by column."""

from __future__ import annotations

from .collect import (
    EVAL_MODES,
    Collection,
    Stat,
)
from .layouts import Layout, Values


def preset_excluded(layout: Layout, coll: Collection, runs, notes: list[str]) -> dict:
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


def cols_in_play(layout: Layout) -> tuple[str, ...]:
    return tuple(c for c in layout.col_keys if any((r, c) not in layout.not_run for r in layout.row_keys))


def missing_label(layout: Layout, row: str, col: str) -> str:
    head = layout.col_header or "norm"
    return f"{layout.row_label(row)}, {head} {layout.col_label(col)}"


def cell_means(coll: Collection) -> Values:
    return {k: c.mean for k, c in coll.cells.items()}


def bn_eval_stats(layout: Layout, coll: Collection) -> dict[tuple[str, str], Stat] | None:
    """{(mode, column): final-model BN errors}, or None when no BN run recorded top1_error_by_eval."""
    if layout.bn_eval is None:
        return None
    stats = {(m, c): coll.cells[("bn", c)].errors_by_eval(m) for m in EVAL_MODES for c in layout.col_keys}
    return stats if any(st.n for st in stats.values()) else None


def bn_rise(stats: dict[tuple[str, str], Stat], layout: Layout, mode: str) -> float | None:
    """rise_mode = BN_mode(small) - BN_mode(large), on final-model error means."""
    large, small = layout.bn_eval
    a, b = stats[(mode, small)].mean, stats[(mode, large)].mean
    return None if a is None or b is None else a - b


def rise_removed(stats, layout: Layout, mode: str) -> float | None:
    """Share of the EMA rise that ``mode`` removes: 1 - rise_mode / rise_ema (None: no EMA rise to remove)."""
    rise, rise_ema = bn_rise(stats, layout, mode), bn_rise(stats, layout, "ema")
    return None if rise is None or rise_ema is None or rise_ema <= 0 else 1.0 - rise / rise_ema
