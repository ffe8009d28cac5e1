"""The report's CSV: one row per (row, column, metric) with mean, std, seed counts and the paper's value."""

from __future__ import annotations

import csv
import io

from .analysis import cell_means, rise_removed
from .collect import (
    EVAL_MODES,
    SHARES,
    Collection,
    ImportanceCell,
)
from .formatting import EVAL_LABELS, csv_num
from .layouts import SN_PAPER_BN_SHARE, Layout

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


def csv_rows(layout: Layout, coll: Collection, imp: dict[str, ImportanceCell] | None, bn_eval) -> list[dict]:
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
                    "mean": csv_num(cell.mean),
                    "std": csv_num(cell.std),
                    "n_seeds": cell.n,
                    "n_diverged": cell.n_diverged,
                    "n_failed": cell.n_failed,
                    "n_interrupted": cell.n_interrupted,
                    "paper": csv_num(layout.paper.get((rk, ck))),
                    "note": "; ".join(notes),
                }
            )
    means = cell_means(coll)
    for d in layout.derived:
        rep, pap = d.fn(means, layout.col_keys), d.fn(layout.paper, layout.col_keys)
        for ck in layout.col_keys:
            rows.append(
                {
                    "experiment": layout.name,
                    "row": d.key,
                    "column": ck,
                    "metric": d.csv_metric,
                    "mean": csv_num(rep[ck]),
                    "std": "",
                    "n_seeds": "",
                    "n_diverged": "",
                    "n_failed": "",
                    "n_interrupted": "",
                    "paper": csv_num(pap[ck]),
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
                            "mean": csv_num(ic.mean(kind, share)),
                            "std": csv_num(ic.std(kind, share)),
                            "n_seeds": ic.n,
                            "n_diverged": "",
                            "n_failed": "",
                            "n_interrupted": "",
                            "paper": csv_num(paper),
                            "note": (
                                "paper: read off a chart, not split into means/variances" if paper is not None else ""
                            )
                            + ("" if ic.n else ("; " if paper is not None else "") + "no SN run with importance"),
                        }
                    )
    if bn_eval is not None:
        rows += bn_eval_csv_rows(layout, bn_eval)
    return rows


def bn_eval_csv_rows(layout: Layout, stats) -> list[dict]:
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
                    "mean": csv_num(mean),
                    "std": csv_num(st.std),
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
                "mean": csv_num(rise_removed(stats, layout, mode)),
                "std": "",
                "n_seeds": "",
                **empty,
                "note": f"rise = final-model BN error at {layout.bn_eval[1]} minus at {layout.bn_eval[0]}",
            }
        )
    return rows


CSV_NUMBERS = {"mean": float, "std": float, "paper": float, "n_seeds": int, "n_diverged": int, "n_failed": int,
               "n_interrupted": int}  # fmt: skip


def read_typed_csv(path) -> tuple[list[str], list[list]]:
    """A written report CSV back as (columns, rows) with numbers as numbers and blanks as None (a wandb Table's
    charts can plot them)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else list(CSV_FIELDS)

    def typed(key: str, text: str):
        if key not in CSV_NUMBERS:
            return text
        return CSV_NUMBERS[key](text) if text != "" else None

    return columns, [[typed(k, row[k]) for k in columns] for row in rows]


def csv_from_rows(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
