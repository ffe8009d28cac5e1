"""The paper layouts of each experiment: rows, columns, which result lands in which cell, paper values,
derived rows and trend lines.

A cell is identified from the fields of a ``result.json`` only (norm, norm_options, gpus, per_gpu_batch).
Runs of the experiment that fit no cell are reported as "outside the layout", never silently merged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from normbench.report import papers

CellKey = tuple[str, str]  # (row key, column key)
Values = dict[CellKey, float | None]


@dataclass(frozen=True)
class Derived:
    """A row computed from the table's means, applied identically to the reproduction and the paper."""

    key: str  # CSV row name
    label: str  # Markdown row label
    csv_metric: str
    fn: Callable[[Values, tuple[str, ...]], dict[str, float | None]]


@dataclass(frozen=True)
class Trend:
    """One line of the trend note: the same function computed on reproduced means and on paper values."""

    label: str
    # fn(values, cols): float, str or None (not computable, e.g. cells missing). cols = the columns in play:
    # all of them, less columns the runs' preset excluded (sweep.allowed); the paper is evaluated on the same.
    fn: Callable[[Values, tuple[str, ...]], object]
    fmt: str = "plain"  # "plain" | "signed" | "text"


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    metric: str  # "error" or "accuracy" (what the table prints; the runs always report error)
    csv_metric: str
    col_header: str
    rows: tuple[tuple[str, str], ...]  # (key, label)
    cols: tuple[tuple[str, str], ...]  # (key, label)
    cell_of: Callable[[dict], CellKey | None]
    layout_note: str  # which runs land in the table, in words
    paper: Values
    paper_source: str
    paper_caveat: str
    paper_notes: dict[CellKey, str] = field(default_factory=dict)  # shown beside the paper value
    single_sourced: frozenset = frozenset()  # CellKeys marked with "*"
    not_run: dict[CellKey, str] = field(default_factory=dict)  # cells deliberately not run
    derived: tuple[Derived, ...] = ()
    trends: tuple[Trend, ...] = ()
    figure: str = "xy"  # "xy" (numeric x, log2), "bars", "categorical"
    x_values: dict[str, float] = field(default_factory=dict)
    x_label: str = ""
    x_decreasing: bool = True
    importance: bool = False
    checks: Callable[[dict, CellKey], str | None] | None = None  # per-run sanity warning
    # The sweep axis the columns are drawn from, as named in the runs' config.sweep.allowed (presets restrict
    # it, e.g. G <= 16 for 16-channel models): excluded columns are "not run (preset)", not missing.
    sweep_axis: str | None = None
    # (large, small) per-GPU-batch columns between which BN's rise is measured under each evaluation mode
    # (result.json["top1_error_by_eval"]); None: the table has no BN-evaluation section.
    bn_eval: tuple[str, str] | None = None
    # True: the figure also draws the training curves (GN Figure 4: loss and validation error per epoch)
    training_curves: bool = False

    @property
    def row_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.rows)

    @property
    def col_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.cols)

    def row_label(self, key: str) -> str:
        return dict(self.rows)[key]

    def col_label(self, key: str) -> str:
        return dict(self.cols)[key]


# --------------------------------------------------------------------------------------------------
# helpers


def _opt(result: dict, name: str):
    opts = result.get("norm_options") or {}
    return opts.get(name)


def _row_values(values: Values, row: str, cols) -> list[float] | None:
    """All values of a row, or None if any is missing."""
    out = [values.get((row, c)) for c in cols]
    return None if any(v is None for v in out) else out


def _diff(values: Values, a: CellKey, b: CellKey) -> float | None:
    va, vb = values.get(a), values.get(b)
    return None if va is None or vb is None else va - vb


def _d(a: CellKey, b: CellKey):
    """values[a] - values[b], when both columns are in play."""

    def fn(values: Values, cols):
        return _diff(values, a, b) if a[1] in cols and b[1] in cols else None

    return fn


def _spread(row: str):
    def fn(values: Values, cols):
        vs = _row_values(values, row, cols)
        return None if vs is None else max(vs) - min(vs)

    return fn


def _best_col(row: str, lowest=True):
    def fn(values: Values, cols):
        vs = _row_values(values, row, cols)
        if vs is None:
            return None
        best = (min if lowest else max)(vs)
        return ", ".join(c for c, v in zip(cols, vs) if v == best)

    return fn


def _minus_best_at(row: str, col: str):
    def fn(values: Values, cols):
        vs = _row_values(values, row, cols)
        return None if vs is None or col not in cols else values[(row, col)] - min(vs)

    return fn


def _minus_best(row: str):
    def fn(values: Values, cols) -> dict[str, float | None]:
        present = [values.get((row, c)) for c in cols if values.get((row, c)) is not None]
        if not present:
            return {c: None for c in cols}
        best = min(present)
        return {c: (None if values.get((row, c)) is None else values[(row, c)] - best) for c in cols}

    return fn


# --------------------------------------------------------------------------------------------------
# gn_table1


def _t1_cell(r: dict) -> CellKey | None:
    # GN tables have one GPU count (8 in the paper); a small preset may emulate fewer -- the report says which.
    if r.get("per_gpu_batch") == 32 and r.get("norm") in ("bn", "ln", "in", "gn"):
        return ("error", r["norm"])
    return None


def _t1_vs_bn(values: Values, cols) -> dict[str, float | None]:
    return {c: _diff(values, ("error", c), ("error", "bn")) for c in cols}


def _t1_order(values: Values, cols):
    vs = [(values.get(("error", c)), c) for c in cols]
    if any(v is None for v, _ in vs):
        return None
    return " < ".join(c.upper() for v, c in sorted(vs))


_T1 = papers.GN_TABLE1
GN_TABLE1 = Layout(
    name="gn_table1",
    training_curves=True,
    title="GN paper Table 1: BN / LN / IN / GN at 32 images per GPU (top-1 error %, lower is better)",
    metric="error",
    csv_metric="top1_error_median_last5",
    col_header="",
    rows=(("error", "top-1 error"),),
    cols=(("bn", "BN"), ("ln", "LN"), ("in", "IN"), ("gn", "GN")),
    cell_of=_t1_cell,
    layout_note="runs with per_gpu_batch=32, norm in {bn, ln, in, gn}; column = norm",
    paper={("error", k): v for k, v in _T1["values"].items()},
    paper_source=_T1["source"],
    paper_caveat=_T1["caveat"],
    derived=(Derived("vs BN", "vs BN", "top1_error_diff", _t1_vs_bn),),
    trends=(
        Trend("Order by error", _t1_order, "text"),
        Trend("GN - BN", _d(("error", "gn"), ("error", "bn")), "signed"),
        Trend("IN - BN", _d(("error", "in"), ("error", "bn")), "signed"),
    ),
    figure="bars",
    sweep_axis="norm",
)

# --------------------------------------------------------------------------------------------------
# gn_table2

_T2 = papers.GN_TABLE2
_T2_COLS = tuple(str(b) for b in _T2["batches"])


def _t2_cell(r: dict) -> CellKey | None:
    b = r.get("per_gpu_batch")
    if r.get("norm") in ("bn", "gn") and str(b) in _T2_COLS and isinstance(b, int):
        return (r["norm"], str(b))
    return None


def _t2_bn_minus_gn(values: Values, cols) -> dict[str, float | None]:
    return {c: _diff(values, ("bn", c), ("gn", c)) for c in cols}


GN_TABLE2 = Layout(
    name="gn_table2",
    title="GN paper Table 2 / Figure 1: BN vs GN by images per GPU (top-1 error %, lower is better)",
    metric="error",
    csv_metric="top1_error_median_last5",
    col_header="images/GPU",
    rows=(("bn", "BN"), ("gn", "GN")),
    cols=tuple((c, c) for c in _T2_COLS),
    cell_of=_t2_cell,
    layout_note="runs with norm in {bn, gn}, per_gpu_batch in {32, 16, 8, 4, 2}; row = norm, column = per_gpu_batch",
    paper={(row, str(b)): v for row, d in _T2["values"].items() for b, v in d.items()},
    paper_source=_T2["source"],
    paper_caveat=_T2["caveat"],
    derived=(Derived("BN - GN", "BN - GN", "top1_error_diff", _t2_bn_minus_gn),),
    trends=(
        Trend("BN error rise from 32 to 2 images/GPU", _d(("bn", "2"), ("bn", "32")), "signed"),
        Trend("GN spread over images/GPU (max - min)", _spread("gn")),
        Trend("BN - GN at 2 images/GPU", _d(("bn", "2"), ("gn", "2")), "signed"),
        Trend("BN - GN at 32 images/GPU", _d(("bn", "32"), ("gn", "32")), "signed"),
    ),
    figure="xy",
    x_values={c: float(c) for c in _T2_COLS},
    x_label="images per GPU (log2 scale, decreasing to the right as in the paper's Figure 1)",
    sweep_axis="per_gpu_batch",
    bn_eval=("32", "2"),
)

# --------------------------------------------------------------------------------------------------
# gn_groups / gn_channels_per_group

_T3G = papers.GN_TABLE3_GROUPS
_T3C = papers.GN_TABLE3_CHANNELS
_T3_KEYS = ("64", "32", "16", "8", "4", "2", "1")


def _t3_cell(option: str, other: str):
    def cell_of(r: dict) -> CellKey | None:
        if r.get("norm") != "gn" or r.get("per_gpu_batch") != 32:
            return None
        v, o = _opt(r, option), _opt(r, other)
        if o is not None or not isinstance(v, int) or str(v) not in _T3_KEYS:
            return None
        return ("gn", str(v))

    return cell_of


def _table3_layout(
    name: str,
    option: str,
    other: str,
    title: str,
    what: str,
    short: str,
    end_label: str,
    end_trend: str,
    paper_table: dict,
) -> Layout:
    """GN Table 3, either half: GN at 32 images/GPU over `option` (groups or channels per group), 64 .. 1,
    where the value 1 is `end_label` (LN for groups, IN for channels per group)."""
    return Layout(
        name=name,
        title=f"GN paper Table 3 ({title}): {what} at 32 images per GPU (top-1 error %, lower is better)",
        metric="error",
        csv_metric="top1_error_median_last5",
        col_header=what,
        rows=(("gn", "GN"),),
        cols=tuple((k, k + (f" (={end_label})" if k == "1" else "")) for k in _T3_KEYS),
        cell_of=_t3_cell(option, other),
        layout_note=f"runs with norm=gn, per_gpu_batch=32, norm_options.{option} in {{64..1}} and "
        f"{other} null; column = {option}",
        paper={("gn", str(k)): v for k, v in paper_table["values"].items()},
        paper_source=paper_table["source"],
        paper_caveat=paper_table["caveat"],
        single_sourced=frozenset(("gn", str(k)) for k in paper_table["single_sourced"]),
        derived=(Derived("minus best", "minus best", "top1_error_diff", _minus_best("gn")),),
        trends=(
            Trend(f"Best {short}", _best_col("gn"), "text"),
            Trend(f"{end_trend} minus best", _minus_best_at("gn", "1")),
            Trend(f"Spread over {short} (max - min)", _spread("gn")),
        ),
        figure="xy",
        x_values={k: float(k) for k in _T3_KEYS},
        x_label=f"{what} (log2 scale)",
        sweep_axis=f"norm.{option}",
    )


GN_GROUPS = _table3_layout("gn_groups", "groups", "channels_per_group", "top", "groups G", "G", "LN", "LN (G=1)", _T3G)
GN_CHANNELS = _table3_layout(
    "gn_channels_per_group",
    "channels_per_group",
    "groups",
    "bottom",
    "channels per group",
    "channels per group",
    "IN",
    "IN (1 channel/group)",
    _T3C,
)

# --------------------------------------------------------------------------------------------------
# sn_table

_SN = papers.SN_TABLE


def sn_col(setting: tuple[int, int]) -> str:
    return f"({setting[0]},{setting[1]})"


_SN_COLS = tuple(sn_col(s) for s in _SN["settings"])


def _sn_cell(r: dict) -> CellKey | None:
    if r.get("norm") not in ("bn", "gn", "sn"):
        return None
    g, b = r.get("gpus"), r.get("per_gpu_batch")
    if not (isinstance(g, int) and isinstance(b, int)) or (g, b) not in _SN["settings"]:
        return None
    return (r["norm"], sn_col((g, b)))


def _sn_check(r: dict, cell: CellKey) -> str | None:
    if cell == ("sn", "(8,1)") and _opt(r, "use_bn") is not False:
        return "SN at (8,1) should run with norm_options.use_bn=false (BN equals IN at one image per GPU)"
    return None


def _sn_wins(values: Values, cols):
    """In how many settings SN is strictly the most accurate row (needs every SN and GN cell)."""
    wins = 0
    for c in cols:
        sn, gn, bn = values.get(("sn", c)), values.get(("gn", c)), values.get(("bn", c))
        if sn is None or gn is None:
            return None
        wins += sn > max(v for v in (gn, bn) if v is not None)
    return f"{wins} of {len(cols)} settings"


SN_TABLE = Layout(
    name="sn_table",
    title="SN paper: BN / GN / SN by (GPUs, images per GPU) (top-1 ACCURACY %, higher is better)",
    metric="accuracy",
    csv_metric="top1_accuracy",
    col_header="(GPUs, images/GPU)",
    rows=(("bn", "BN"), ("gn", "GN"), ("sn", "SN")),
    cols=tuple((c, c) for c in _SN_COLS),
    cell_of=_sn_cell,
    layout_note="runs with norm in {bn, gn, sn} and (gpus, per_gpu_batch) one of the 9 SN settings; "
    "accuracy = 100 - top1_error_median_last5",
    paper={(row, sn_col(s)): v for row, d in _SN["values"].items() for s, v in d.items()},
    paper_source=_SN["source"],
    paper_caveat=_SN["caveat"],
    paper_notes={(row, sn_col(s)): note for (row, s), note in _SN["notes"].items()},
    not_run={("bn", "(8,1)"): "- (not run: one image per GPU)"},
    trends=(
        Trend("BN accuracy drop from (8,32) to (8,2)", _d(("bn", "(8,32)"), ("bn", "(8,2)"))),
        Trend("GN spread over settings (max - min)", _spread("gn")),
        Trend("SN spread over settings (max - min)", _spread("sn")),
        Trend("SN most accurate", _sn_wins, "text"),
    ),
    figure="categorical",
    x_label="(GPUs, images per GPU), the SN paper's order",
    importance=True,
    checks=_sn_check,
    bn_eval=("(8,32)", "(8,2)"),
)

# --------------------------------------------------------------------------------------------------
# pono_ms: PONO + Moment Shortcut in the residual blocks (GN as the block norm) beside GN and BN. Neither paper
# has this table: no published numbers, the layout only puts the runs side by side.

_PONO_COLS = ("32", "2")


def _pono_cell(r: dict) -> CellKey | None:
    b = r.get("per_gpu_batch")
    if r.get("norm") in ("bn", "gn", "gn+pono_ms") and isinstance(b, int) and str(b) in _PONO_COLS:
        return (r["norm"], str(b))
    return None


PONO_MS = Layout(
    name="pono_ms",
    title="PONO + Moment Shortcut in the residual blocks vs GN and BN (top-1 error %, lower is better)",
    metric="error",
    csv_metric="top1_error_median_last5",
    col_header="images/GPU",
    rows=(("bn", "BN"), ("gn", "GN"), ("gn+pono_ms", "GN + PONO-MS")),
    cols=tuple((c, c) for c in _PONO_COLS),
    cell_of=_pono_cell,
    layout_note="runs with norm in {bn, gn, gn+pono_ms}, per_gpu_batch in {32, 2}; row = norm, column = per_gpu_batch",
    paper={},
    paper_source="none: neither the GN nor the SN paper reports PONO-MS in ResNet blocks (the PONO paper "
    "studies it in generative models)",
    paper_caveat="",
    trends=(
        Trend("PONO-MS - GN at 32 images/GPU", _d(("gn+pono_ms", "32"), ("gn", "32")), "signed"),
        Trend("PONO-MS - GN at 2 images/GPU", _d(("gn+pono_ms", "2"), ("gn", "2")), "signed"),
    ),
    figure="xy",
    x_values={c: float(c) for c in _PONO_COLS},
    x_label="images per GPU (log2 scale, decreasing to the right)",
    sweep_axis="per_gpu_batch",
)

LAYOUTS: dict[str, Layout] = {
    lay.name: lay for lay in (GN_TABLE1, GN_TABLE2, GN_GROUPS, GN_CHANNELS, SN_TABLE, PONO_MS)
}

# Paper's BN importance share per SN column (read off a chart).
SN_PAPER_BN_SHARE = {sn_col(s): v for s, v in papers.SN_IMPORTANCE_BN_SHARE["values"].items()}
