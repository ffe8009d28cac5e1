"""The number and text formats every output of a report shares: a cell, a paper value, a Markdown table."""

from __future__ import annotations

from .collect import (
    Cell,
)
from .layouts import Layout

NA = "–"
# ImageNet's colour augmentation as fb.resnet.torch trains (normbench.data.colour; docs/papers.md section 2)
OFFICIAL_COLOUR = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "lighting": 0.1}
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


def augmentation_label(data: dict) -> str | None:
    """The training augmentation a run's recorded ``config["data"]`` says it used, in words; None when the run
    recorded none. A colour key absent (a run from before it existed) is 0: it was not applied."""
    augment = data.get("augment") if isinstance(data, dict) else None
    if not isinstance(augment, dict):
        return None
    size = data.get("image_size", "")
    if "min_scale" in augment:  # ImageNet's loader
        parts = [f"random-resized crop {size} (area {augment['min_scale']:g}-1)"]
    elif augment.get("rrc_scale"):
        lo, hi = augment["rrc_scale"]
        parts = [f"random-resized crop {size} (area {lo:g}-{hi:g})"]
    elif augment.get("crop_padding"):
        parts = [f"random {size}x{size} crop of the {augment['crop_padding']}-pixel zero-padded image"]
    else:
        parts = []
    if augment.get("flip"):
        parts.append("flip")
    colour = {k: augment.get(k) or 0 for k in OFFICIAL_COLOUR}
    jitter = [f"{k} {colour[k]:g}" for k in ("brightness", "contrast", "saturation") if colour[k]]
    if jitter:
        parts.append(f"colour jitter ({', '.join(jitter)}; in a random order)")
    if colour["lighting"]:
        parts.append(f"PCA lighting {colour['lighting']:g}")
    text = " + ".join(parts) or "none"
    if colour == OFFICIAL_COLOUR:
        text += " (fb.resnet.torch's, as the official GN reproduction)"
    elif "min_scale" in augment and not jitter and not colour["lighting"]:
        text += " only: no colour jitter or lighting"
    return text
