"""The number and text formats every output of a report shares: a cell, a paper value, a Markdown table."""

from __future__ import annotations

from .collect import (
    Cell,
)
from .layouts import Layout

NA = "–"
EVAL_LABELS = {"ema": "EMA statistics", "precise_bn": "PreciseBN", "batch_stats": "test-batch statistics"}


def num(v: float | None, digits: int = 2, signed: bool = False) -> str:
    if v is None:
        return NA
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def csv_num(v: float | None) -> str:
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


def md_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Markdown table; the first ``left`` columns left-aligned (labels, text), the rest right-aligned (numbers)."""
    esc = [[c.replace("|", "\\|") for c in r] for r in [header] + rows]
    align = ["---"] * left + ["---:"] * (len(header) - left)
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def trend_value(v, fmt: str, digits: int) -> str:
    if v is None:
        return "n/a (cells without numbers)"
    if fmt == "text":
        return str(v)
    return num(v, digits, signed=(fmt == "signed"))
