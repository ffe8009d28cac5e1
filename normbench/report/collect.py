"""Read the runs' ``result.json`` files and put them into the cells of a layout."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from normbench.runs import identifying_config

from .layouts import CellKey, Layout

# "interrupted" runs stopped before their last epoch and resume on rerun: counted, never averaged.
STATUSES = ("completed", "diverged", "failed", "interrupted")
METRIC_FIELD = "top1_error_median_last5"
SHARES = ("in", "ln", "bn")
EVAL_MODES = ("ema", "precise_bn", "batch_stats")  # result.json["top1_error_by_eval"] keys


@dataclass
class Run:
    path: Path
    data: dict
    mtime: float

    @property
    def status(self) -> str:
        s = self.data.get("status")
        return s if s in STATUSES else "failed"

    @property
    def seed(self):
        return self.data.get("seed")

    @property
    def top1_error_median_last5(self) -> float | None:
        """The table's metric (the GN paper's: median top-1 error % of the last 5 epochs), if finite."""
        return _finite(self.data.get(METRIC_FIELD))

    def top1_error_by_eval(self, mode: str) -> float | None:
        """Final-model top-1 error % under one BN evaluation mode (EVAL_MODES); None for runs without it."""
        by_eval = self.data.get("top1_error_by_eval")
        return _finite(by_eval.get(mode)) if isinstance(by_eval, dict) else None

    def setting(self) -> dict:
        """The run's identifying config less its seed, flattened to dotted keys: runs averaged into one cell
        must agree on every key."""
        config = identifying_config(self.data.get("config") or {})
        config.pop("seed", None)
        return _flatten(config)

    def label(self) -> str:
        return str(self.data.get("run_dir") or self.data.get("run_id") or self.path)


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_ABSENT = object()


def first_difference(a: dict, b: dict) -> str | None:
    """The first dotted key (in sorted order) on which two flattened settings differ, or None."""
    for key in sorted(set(a) | set(b)):
        if a.get(key, _ABSENT) != b.get(key, _ABSENT):
            return key
    return None


def _shown(setting: dict, key: str) -> str:
    return json.dumps(setting[key]) if key in setting else "absent"


@dataclass(frozen=True)
class Stat:
    """Mean, sample std and count of one cell's per-seed values (std None below two seeds)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


@dataclass
class Cell:
    row: str
    col: str
    runs: list[Run] = field(default_factory=list)
    metric: str = "error"  # "error" or "accuracy"

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.status == "completed" and r.top1_error_median_last5 is not None]

    @property
    def n_diverged(self) -> int:
        return sum(r.status == "diverged" for r in self.runs)

    @property
    def n_failed(self) -> int:
        return sum(r.status == "failed" for r in self.runs)

    @property
    def n_interrupted(self) -> int:
        return sum(r.status == "interrupted" for r in self.runs)

    @property
    def errors(self) -> list[float]:
        """Per-seed top-1 errors of the completed runs (the table's metric, before any accuracy flip)."""
        return [r.top1_error_median_last5 for r in self.completed]

    @property
    def values(self) -> list[float]:
        errs = self.errors
        return [100.0 - e for e in errs] if self.metric == "accuracy" else errs

    def errors_by_eval(self, mode: str) -> Stat:
        """Final-model top-1 errors of the completed runs that recorded ``mode``."""
        vals = (r.top1_error_by_eval(mode) for r in self.completed)
        return Stat(tuple(v for v in vals if v is not None))

    @property
    def n(self) -> int:
        return len(self.completed)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds; None with fewer than two seeds."""
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


@dataclass
class Collection:
    runs: list[Run]  # runs of this experiment (after model/data selection, dedup)
    cells: dict[CellKey, Cell]
    unmatched: list[Run]
    notes: list[str]
    superseded: list[Run]


# The fields of result.json the report reads, with the types it can use (None: the field may be null or absent).
# Metrics are read through _finite (a NaN or a string there is a missing number, not a crash).
_INT, _STR, _DICT = (int,), (str,), (dict,)
RESULT_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {  # field: (types, required)
    "status": (_STR, True),
    "model": (_STR, True),
    "data": (_STR, True),
    "norm": (_STR, True),
    "gpus": (_INT, True),
    "per_gpu_batch": (_INT, True),
    "seed": (_INT, False),
    "epochs": (_INT, False),
    "epochs_completed": (_INT, False),
    "run_id": (_STR, False),
    "run_dir": (_STR, False),
    "norm_options": (_DICT, False),
    "config": (_DICT, False),
    "git": (_DICT, False),
    "top1_error_by_eval": (_DICT, False),
    "sn_importance": (_DICT, False),
}
GIT_FIELDS = {"commit": _STR, "dirty": (bool,)}


def damaged_field(data: dict) -> str | None:
    """The first field whose value the report cannot use, as 'FIELD is VALUE (wants TYPE)', else None."""

    def wrong(value, types) -> bool:
        return isinstance(value, bool) and bool not in types or not isinstance(value, types)

    for name, (types, required) in RESULT_FIELDS.items():
        value = data.get(name)
        if value is None and not required:
            continue
        if wrong(value, types):
            return f"`{name}` is {json.dumps(value)[:40]} (wants {' or '.join(t.__name__ for t in types)})"
    for name, types in GIT_FIELDS.items():
        value = (data.get("git") or {}).get(name)
        if value is not None and wrong(value, types):
            return f"`git.{name}` is {json.dumps(value)[:40]} (wants {types[0].__name__})"
    return None


def load_runs(results_dir: Path, experiment: str, notes: list[str]) -> list[Run]:
    runs = []
    for path in sorted(results_dir.glob("**/result.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            notes.append(f"Unreadable result file skipped: `{path}` ({type(exc).__name__}: {exc})")
            continue
        if data.get("experiment") != experiment:
            continue
        if problem := damaged_field(data):
            notes.append(f"Damaged result file skipped: `{path}`: {problem}")
            continue
        runs.append(Run(path=path, data=data, mtime=path.stat().st_mtime))
    return runs


def select_model_data(runs: list[Run], experiment: str, model: str | None, data: str | None) -> list[Run]:
    """Keep the runs of one (model, data) pair; refuse to mix several."""
    if model is not None:
        runs = [r for r in runs if r.data.get("model") == model]
    if data is not None:
        runs = [r for r in runs if r.data.get("data") == data]
    pairs = Counter((r.data.get("model"), r.data.get("data")) for r in runs)
    if len(pairs) > 1:
        listing = ", ".join(f"{m}/{d} ({k} runs)" for (m, d), k in sorted(pairs.items(), key=str))
        raise ValueError(
            f"{experiment}: results mix {len(pairs)} (model, data) pairs: {listing}; "
            "a table compares one model on one data set: pass model=MODEL_ID and/or data=DATA_NAME "
            "(normbench report, or build_report's model/data), or keep each pair in its own results_dir"
        )
    return runs


def collect(layout: Layout, runs: list[Run], notes: list[str]) -> Collection:
    # Same run_id seen twice (e.g. a copied run dir): keep the newest file.
    by_id: dict[str, Run] = {}
    deduped: list[Run] = []
    for r in sorted(runs, key=lambda r: r.mtime):
        rid = r.data.get("run_id")
        if rid is None:
            deduped.append(r)
            continue
        if rid in by_id:
            notes.append(f"Duplicate run_id {rid}: `{by_id[rid].path}` ignored, `{r.path}` kept (newest).")
            deduped.remove(by_id[rid])
        by_id[rid] = r
        deduped.append(r)
    runs = deduped

    for r in runs:
        if r.data.get("status") not in STATUSES:
            notes.append(f"Run `{r.label()}` has status {r.data.get('status')!r}; counted as failed.")
        elif r.data.get("status") == "completed" and r.top1_error_median_last5 is None:
            notes.append(
                f"Run `{r.label()}` is completed but has no finite {METRIC_FIELD}; "
                "left out of the means (not counted as a seed)."
            )

    cells = {(row, col): Cell(row, col, metric=layout.metric) for row in layout.row_keys for col in layout.col_keys}
    unmatched: list[Run] = []
    per_seed: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        key = layout.cell_of(r.data)
        if key is None:
            unmatched.append(r)
            continue
        if layout.checks is not None:
            warn = layout.checks(r.data, key)
            if warn:
                notes.append(f"Run `{r.label()}`: {warn}.")
        per_seed[(key, r.seed)].append(r)

    _refuse_mixed_settings(layout, per_seed)

    superseded: list[Run] = []
    for (key, seed), rs in per_seed.items():
        rs.sort(key=lambda r: r.mtime)
        keep = rs[-1]
        if len(rs) > 1:
            superseded.extend(rs[:-1])
            notes.append(
                f"{len(rs)} runs for cell {key[0]} @ {key[1]}, seed {seed}: kept the newest `{keep.label()}` "
                f"({keep.status}); superseded: " + ", ".join(f"`{r.label()}` ({r.status})" for r in rs[:-1])
            )
        cells[key].runs.append(keep)
    for cell in cells.values():
        cell.runs.sort(key=lambda r: (str(r.seed), r.label()))

    placed = [r for c in cells.values() for r in c.runs]
    epochs = Counter(r.data.get("epochs") for r in placed)
    if len(epochs) > 1:
        notes.append(
            "Runs in the table were trained for different epochs: "
            + ", ".join(f"{e} ({k} runs)" for e, k in sorted(epochs.items(), key=str))
            + "; cells may not be comparable."
        )
    return Collection(runs=placed, cells=cells, unmatched=unmatched, notes=notes, superseded=superseded)


def _refuse_mixed_settings(layout: Layout, per_seed: dict[tuple, list[Run]]) -> None:
    """A cell averages seeds of one setting: runs of a cell whose identifying configs differ in anything but
    the seed (e.g. 1 and 2 epochs) are refused with the first differing key, never averaged."""
    by_cell: dict[CellKey, list[Run]] = defaultdict(list)
    for (key, _), rs in per_seed.items():
        by_cell[key].extend(rs)
    for key in sorted(by_cell):
        rs = sorted(by_cell[key], key=lambda r: r.label())
        first = rs[0].setting()
        for other in rs[1:]:
            diff = first_difference(first, other.setting())
            if diff is not None:
                raise ValueError(
                    f"{layout.name}: cell {layout.row_label(key[0])} @ {key[1]} has runs whose settings differ in "
                    f"{diff} ({_shown(first, diff)} in `{rs[0].label()}`, {_shown(other.setting(), diff)} in "
                    f"`{other.label()}`); a cell averages seeds of one setting: move or delete the runs of the "
                    "other setting, or give them their own results_dir"
                )


def run_importance(run: Run) -> dict[str, dict[str, float]] | None:
    """Layer-averaged SN importance shares of one run: {"mean": {in, ln, bn}, "var": {...}}.

    A share missing from a layer (e.g. ``bn`` when SN ran with use_bn=false) counts as 0.
    """
    imp = run.data.get("sn_importance")
    if not isinstance(imp, dict) or not imp:
        return None
    out = {}
    for kind in ("mean", "var"):
        per_layer = [layer.get(kind) or {} for layer in imp.values() if isinstance(layer, dict)]
        if not per_layer:
            return None
        out[kind] = {s: statistics.fmean(float(d.get(s, 0.0)) for d in per_layer) for s in SHARES}
    return out


@dataclass
class ImportanceCell:
    col: str
    per_run: list[dict[str, dict[str, float]]]
    n_layers: list[int]

    @property
    def n(self) -> int:
        return len(self.per_run)

    def mean(self, kind: str, share: str) -> float | None:
        return statistics.fmean(r[kind][share] for r in self.per_run) if self.per_run else None

    def std(self, kind: str, share: str) -> float | None:
        vals = [r[kind][share] for r in self.per_run]
        return statistics.stdev(vals) if len(vals) >= 2 else None


def importance_cells(layout: Layout, coll: Collection, notes: list[str]) -> dict[str, ImportanceCell]:
    out = {}
    for col in layout.col_keys:
        per_run, n_layers = [], []
        for r in coll.cells[("sn", col)].completed:
            imp = run_importance(r)
            if imp is None:
                notes.append(f"Completed SN run `{r.label()}` has no sn_importance; left out of the importance table.")
                continue
            per_run.append(imp)
            n_layers.append(len(r.data["sn_importance"]))
        out[col] = ImportanceCell(col, per_run, n_layers)
    return out
