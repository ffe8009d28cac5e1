"""build_report: result.json files -> NAME.md, NAME.csv, NAME.png in the paper's layout. The orchestration:
the CSV is csv_table.py, the Markdown markdown.py, what both derive analysis.py, shared formats formatting.py."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from normbench.runs import sweep_group, write_bytes, write_text

from .analysis import bn_eval_stats, cols_in_play, missing_label, preset_excluded
from .claims import Judged, judge, load_claims
from .collect import (
    collect,
    importance_cells,
    load_runs,
    select_model_data,
)
from .csv_table import csv_from_rows, csv_rows
from .figures import render_png, training_curves
from .layouts import LAYOUTS
from .markdown import report_markdown


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
    group: str | None = None  # the runs' wandb group (runs.sweep_group); None without runs
    project: str | None = None  # their wandb project
    runs_log_to_tensorboard: bool = False  # whether any of the runs wrote TensorBoard event files

    @property
    def md_path(self) -> Path:
        return self.paths[0]

    @property
    def csv_path(self) -> Path:
        return self.paths[1]

    @property
    def png_path(self) -> Path:
        return self.paths[2]


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
    excluded = preset_excluded(layout, coll, runs, notes)
    if excluded:
        layout = dataclasses.replace(layout, not_run={**excluded, **layout.not_run})
    imp = importance_cells(layout, coll, notes) if layout.importance else None
    bn_eval = bn_eval_stats(layout, coll)
    judged = judge(layout, coll, load_claims(experiment), cols_in_play(layout))
    pairs = {(r.data.get("model"), r.data.get("data")) for r in runs}
    model_, data_ = next(iter(pairs)) if pairs else (model, data)

    missing = [
        missing_label(layout, r, c)
        for (r, c), cell in coll.cells.items()
        if not cell.runs and (r, c) not in layout.not_run
    ]
    png_name = f"{experiment}.png"
    markdown = report_markdown(layout, coll, imp, bn_eval, judged, results_dir, model_, data_, png_name, missing, notes)
    csv_text = csv_from_rows(csv_rows(layout, coll, imp, bn_eval))
    title = f"{experiment}" + (f": {model_} on {data_}" if pairs else ": no runs yet")
    curves = training_curves(layout, coll) if layout.training_curves else None
    png = render_png(layout, coll, title, imp, curves)

    paths = (out_dir / f"{experiment}.md", out_dir / f"{experiment}.csv", out_dir / png_name)
    write_bytes(paths[2], png)
    write_text(paths[1], csv_text)
    write_text(paths[0], markdown)

    status = Counter(r.status for r in coll.runs)
    configs = [r.data.get("config") or {} for r in coll.runs]
    logger = (configs[0].get("logger") or {}) if configs else {}
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
        group=sweep_group(experiment, model_, data_) if pairs else None,
        project=(logger.get("wandb") or {}).get("project", "normbench"),
        runs_log_to_tensorboard=any((c.get("logger") or {}).get("tensorboard") for c in configs),
    )
