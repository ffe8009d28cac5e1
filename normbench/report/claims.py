"""The papers' qualitative claims, judged against the runs.

Each experiment config lists its claims (``claims:`` in configs/experiment/NAME.yaml): a ``kind``, the cells
involved (``[row, column]`` keys of the report's layout), a threshold where the kind has one, and the sentence.
Every kind reduces to one or more comparisons "quantity > bound" (or "<") on top-1 **error** % cell means.

Verdict of one comparison, with SE = sqrt(sum of s_i^2 / n_i over the cells in the quantity) (s_i: sample std
over seeds, n_i: seeds): the margin (quantity - bound, sign-flipped for "<") counts when it exceeds 2 SE.
    holds: margin > 2 SE;  does not hold: margin < -2 SE;  inconclusive: otherwise;
    inconclusive (n=1): a cell has one seed (no spread to judge against).
A claim holds when all its comparisons hold, does not hold when any does not, else is inconclusive.
``flat_within`` is "by construction" when its row's runs cannot differ: a batch-independent layer (its
norm_options take no per_gpu_batch) with the same total batch (gpus x per_gpu_batch) in every column.
The paper's numbers go through the same comparisons with SE = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .collect import Collection, Stat, run_importance
from .layouts import SN_PAPER_BN_SHARE, CellKey, Layout

HOLDS, FAILS, INCONCLUSIVE, ONE_SEED, BY_CONSTRUCTION = (
    "holds",
    "does not hold",
    "inconclusive",
    "inconclusive (n=1)",
    "by construction",
)

# kind -> the fields it needs besides kind and text
KINDS = {
    "rises": ("row", "from", "to"),
    "less": ("a", "b"),
    "order": ("cells",),
    "flat_within": ("row", "threshold"),
    "at_most_better": ("better", "than", "threshold"),
    "worse_than_best": ("cell", "among"),
    "at_least_as_good": ("row", "than", "cols"),
    "rise_largest": ("row", "others", "from", "to"),
    "share_falls": ("from", "to"),
}


@dataclass(frozen=True)
class Comparison:
    label: str  # what the quantity is, e.g. "BN@2 - BN@32"
    value: float
    se: float | None  # None: a cell with one seed
    sense: str  # ">" or "<": the claim is value > bound or value < bound
    bound: float

    @property
    def margin(self) -> float:
        return self.value - self.bound if self.sense == ">" else self.bound - self.value

    def verdict(self) -> str:
        if self.se is None:
            return ONE_SEED
        if self.margin > 2 * self.se:
            return HOLDS
        if self.margin < -2 * self.se:
            return FAILS
        return INCONCLUSIVE

    def text(self, digits: int = 2) -> str:
        s = f"{self.label} = {self.value:+.{digits}f} {self.sense} {self.bound:g}"
        if self.se is None:
            return s + " (one seed)"
        return s + (f" (2 SE = {2 * self.se:.{digits}f})" if self.se > 0 else "")


@dataclass(frozen=True)
class Judged:
    text: str
    verdict: str
    numbers: str  # the reproduced comparisons, or why the claim was not judged
    paper: str  # the paper's comparisons and its verdict


def load_claims(experiment: str, config_dir: Path | None = None) -> list[dict]:
    """The ``claims:`` list of configs/experiment/EXPERIMENT.yaml ([] when it has none)."""
    if config_dir is None:
        from normbench.paths import CONFIG_DIR as config_dir
    path = Path(config_dir) / "experiment" / f"{experiment}.yaml"
    if not path.exists():
        return []
    claims = (yaml.safe_load(path.read_text()) or {}).get("claims") or []
    if not isinstance(claims, list):
        raise ValueError(f"{path}: claims must be a list of entries with kind and text")
    return claims


def validate(layout: Layout, claims: list[dict]) -> None:
    """One-line ValueError for a claim the report cannot evaluate (unknown kind, field or cell)."""
    for i, claim in enumerate(claims):
        where = f"{layout.name} claim {i + 1}"
        if not isinstance(claim, dict) or claim.get("kind") not in KINDS or not claim.get("text"):
            raise ValueError(f"{where}: needs kind (one of {', '.join(KINDS)}) and text; got {claim!r}")
        missing = [f for f in KINDS[claim["kind"]] if f not in claim]
        if missing:
            raise ValueError(f"{where} ({claim['kind']}): missing {', '.join(missing)}")
        for key in _cells_named(claim):
            if key[0] not in layout.row_keys or key[1] not in layout.col_keys:
                raise ValueError(
                    f"{where}: cell {list(key)} is not in the {layout.name} layout (rows "
                    f"{', '.join(layout.row_keys)}; columns {', '.join(layout.col_keys)})"
                )


def _cell(ref) -> CellKey:
    return (str(ref[0]), str(ref[1]))


def _cells_named(claim: dict) -> list[CellKey]:
    kind = claim["kind"]
    if kind in ("rises", "flat_within"):
        cols = claim.get("cols") or []
        return [(claim["row"], str(c)) for c in [*cols, claim.get("from"), claim.get("to")] if c is not None]
    if kind == "less":
        return [_cell(claim["a"]), _cell(claim["b"])]
    if kind == "order":
        return [_cell(c) for c in claim["cells"]]
    if kind == "at_most_better":
        return [_cell(claim["better"]), _cell(claim["than"])]
    if kind == "worse_than_best":
        return [_cell(claim["cell"])] + [_cell(c) for c in claim["among"]]
    if kind == "at_least_as_good":
        return [(r, str(c)) for r in [claim["row"], *claim["than"]] for c in claim["cols"]]
    if kind == "rise_largest":
        return [(r, str(c)) for r in [claim["row"], *claim["others"]] for c in (claim["from"], claim["to"])]
    return []  # share_falls: SN importance, not table cells


# --------------------------------------------------------------------------------------------------
# evaluation


class _NotJudged(Exception):
    """A cell the claim needs has no number (missing, not run, or only failed runs)."""


def _error_stats(layout: Layout, coll: Collection) -> dict[CellKey, Stat]:
    return {k: Stat(tuple(c.errors)) for k, c in coll.cells.items()}


def _paper_errors(layout: Layout) -> dict[CellKey, Stat]:
    flip = layout.metric == "accuracy"
    return {k: Stat((100.0 - v if flip else v,)) for k, v in layout.paper.items() if v is not None}


class _Values:
    """Cell statistics for one side (reproduced or paper); ``exact``: no sampling error (the paper)."""

    def __init__(self, layout: Layout, stats: dict[CellKey, Stat], exact: bool, cols_in_play):
        self.layout, self.stats, self.exact, self.cols = layout, stats, exact, cols_in_play

    def label(self, key: CellKey) -> str:
        lay = self.layout
        if len(lay.rows) == 1:
            return f"{lay.col_header} {lay.col_label(key[1])}".strip()
        return f"{lay.row_label(key[0])}@{lay.col_label(key[1])}"

    def get(self, key: CellKey) -> Stat:
        st = self.stats.get(key)
        if key[1] not in self.cols:
            raise _NotJudged(f"{self.label(key)} not run by the preset")
        if st is None or st.n == 0:
            raise _NotJudged(f"no number for {self.label(key)}")
        return st

    def has(self, key: CellKey) -> bool:
        st = self.stats.get(key)
        return key[1] in self.cols and st is not None and st.n > 0

    def se(self, *keys: CellKey) -> float | None:
        if self.exact:
            return 0.0
        stats = [self.get(k) for k in keys]
        if any(st.n < 2 for st in stats):
            return None
        return math.sqrt(sum(st.std**2 / st.n for st in stats))

    def diff(self, a: CellKey, b: CellKey, sense: str = ">", bound: float = 0.0) -> Comparison:
        """Comparison on mean(a) - mean(b)."""
        return Comparison(
            f"{self.label(a)} - {self.label(b)}", self.get(a).mean - self.get(b).mean, self.se(a, b), sense, bound
        )


def _comparisons(claim: dict, v: _Values, importance: dict[str, list[float]] | None) -> list[Comparison]:
    kind = claim["kind"]
    if kind == "rises":
        row = claim["row"]
        return [v.diff((row, str(claim["to"])), (row, str(claim["from"])))]
    if kind == "less":  # a < b
        return [v.diff(_cell(claim["b"]), _cell(claim["a"]))]
    if kind == "order":
        cells = [_cell(c) for c in claim["cells"]]
        return [v.diff(b, a) for a, b in zip(cells, cells[1:])]
    if kind == "flat_within":
        row = claim["row"]
        cols = [str(c) for c in claim.get("cols") or v.layout.col_keys if str(c) in v.cols]
        keys = [(row, c) for c in cols]
        means = [v.get(k).mean for k in keys]
        hi, lo = keys[means.index(max(means))], keys[means.index(min(means))]
        return [
            Comparison(
                f"{v.layout.row_label(row)} max - min",
                max(means) - min(means),
                v.se(hi, lo),
                "<",
                float(claim["threshold"]),
            )
        ]
    if kind == "at_most_better":  # than - better < threshold
        return [v.diff(_cell(claim["than"]), _cell(claim["better"]), "<", float(claim["threshold"]))]
    if kind == "worse_than_best":
        cell = _cell(claim["cell"])
        among = [k for k in (_cell(c) for c in claim["among"]) if v.has(k)]
        if not among:
            raise _NotJudged("no number for any cell it is compared with")
        best = min(among, key=lambda k: v.get(k).mean)
        return [v.diff(cell, best)]
    if kind == "at_least_as_good":  # error(other) - error(row) > -tolerance
        tol = float(claim.get("tolerance", 0.0))
        return [
            v.diff((other, str(c)), (claim["row"], str(c)), ">", -tol) for c in claim["cols"] for other in claim["than"]
        ]
    if kind == "rise_largest":
        lo, hi = str(claim["from"]), str(claim["to"])
        out = []
        row = claim["row"]
        for other in claim["others"]:
            keys = [(row, hi), (row, lo), (other, hi), (other, lo)]
            value = (v.get(keys[0]).mean - v.get(keys[1]).mean) - (v.get(keys[2]).mean - v.get(keys[3]).mean)
            label = (
                f"rise of {v.layout.row_label(row)} - rise of {v.layout.row_label(other)} "
                f"({v.layout.col_label(lo)} to {v.layout.col_label(hi)})"
            )
            out.append(Comparison(label, value, v.se(*keys), ">", 0.0))
        return out
    if kind == "share_falls":
        a, b = str(claim["from"]), str(claim["to"])
        if importance is None:
            raise _NotJudged("no SN importance weights")
        sa, sb = Stat(tuple(importance.get(a, ()))), Stat(tuple(importance.get(b, ())))
        if not (sa.n and sb.n):
            raise _NotJudged(f"no SN importance at {a if not sa.n else b}")
        se = 0.0 if v.exact else (None if min(sa.n, sb.n) < 2 else math.sqrt(sa.std**2 / sa.n + sb.std**2 / sb.n))
        return [Comparison(f"SN BN share {a} - {b}", sa.mean - sb.mean, se, ">", 0.0)]
    raise ValueError(f"unknown claim kind {kind!r}")  # validate() catches it first


def _combine(verdicts: list[str]) -> str:
    if FAILS in verdicts:
        return FAILS
    if all(x == HOLDS for x in verdicts):
        return HOLDS
    return ONE_SEED if ONE_SEED in verdicts else INCONCLUSIVE


def _by_construction(claim: dict, layout: Layout, coll: Collection, cols) -> str | None:
    """Why a flat_within claim cannot fail on these runs, or None."""
    if claim["kind"] != "flat_within":
        return None
    row = claim["row"]
    picked = [str(c) for c in claim.get("cols") or layout.col_keys if str(c) in cols]
    runs = [r for c in picked for r in coll.cells[(row, c)].completed]
    if len({r.data.get("per_gpu_batch") for r in runs}) < 2:
        return None
    if any("per_gpu_batch" in (r.data.get("norm_options") or {}) for r in runs):
        return None  # a batch-dependent layer: its numbers can change with the per-GPU batch
    totals = {(r.data.get("gpus") or 0) * (r.data.get("per_gpu_batch") or 0) for r in runs}
    if len(totals) != 1:
        return None
    return (
        f"{layout.row_label(row)} never looks across images and every column trains on the same "
        f"{totals.pop()} images per step, so the columns compute the same run"
    )


def _importance_shares(coll: Collection) -> dict[str, list[float]]:
    """Per SN run, its BN share averaged over means and variances (the paper's chart does not split them)."""
    out: dict[str, list[float]] = {}
    for (row, col), cell in coll.cells.items():
        if row != "sn":
            continue
        for r in cell.completed:
            imp = run_importance(r)
            if imp is not None:
                out.setdefault(col, []).append((imp["mean"]["bn"] + imp["var"]["bn"]) / 2)
    return out


def _judge_side(claim, values: _Values, importance) -> tuple[str, str]:
    try:
        comps = _comparisons(claim, values, importance)
    except _NotJudged as why:
        return f"not judged ({why})", "–"
    verdict = _combine([c.verdict() for c in comps])
    return verdict, "; ".join(c.text(1 if values.exact else 2) for c in comps)


def judge(layout: Layout, coll: Collection, claims: list[dict], cols_in_play) -> list[Judged]:
    validate(layout, claims)
    reproduced = _Values(layout, _error_stats(layout, coll), exact=False, cols_in_play=cols_in_play)
    paper = _Values(layout, _paper_errors(layout), exact=True, cols_in_play=cols_in_play)
    paper_importance = {c: [v] for c, v in SN_PAPER_BN_SHARE.items()}
    out = []
    for claim in claims:
        verdict, numbers = _judge_side(claim, reproduced, _importance_shares(coll))
        construction = _by_construction(claim, layout, coll, cols_in_play)
        if construction and not verdict.startswith("not judged"):
            verdict, numbers = BY_CONSTRUCTION, f"{numbers} -- {construction}"
        p_verdict, p_numbers = _judge_side(claim, paper, paper_importance)
        out.append(Judged(str(claim["text"]).strip(), verdict, numbers, f"{p_numbers} ({p_verdict})"))
    return out
