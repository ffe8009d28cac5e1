"""build_report: result.json files -> NAME.md, NAME.csv, NAME.png in the paper's layout."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .collect import SHARES, Cell, Collection, ImportanceCell, collect, importance_cells, load_runs, select_model_data
from .figures import render_png
from .layouts import LAYOUTS, SN_PAPER_BN_SHARE, Layout, Values

CSV_FIELDS = ("experiment", "row", "column", "metric", "mean", "std", "n_seeds", "n_diverged", "n_failed",
              "paper", "note")
NA = "–"


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
    model: Optional[str] = None
    data: Optional[str] = None
    n_superseded: int = 0

    @property
    def md_path(self) -> Path:
        return self.paths[0]

    @property
    def csv_path(self) -> Path:
        return self.paths[1]

    @property
    def png_path(self) -> Path:
        return self.paths[2]


# --------------------------------------------------------------------------------------------------
# formatting


def _num(v: Optional[float], digits: int = 2, signed: bool = False) -> str:
    if v is None:
        return NA
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _csv_num(v: Optional[float]) -> str:
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
    n_nometric = sum(r.status == "completed" and r.error is None for r in cell.runs)
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


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _trend_value(v, fmt: str, digits: int) -> str:
    if v is None:
        return "n/a (cells without numbers)"
    if fmt == "text":
        return str(v)
    return _num(v, digits, signed=(fmt == "signed"))


def _find_key(d, key: str, depth: int = 2):
    if not isinstance(d, dict) or depth < 0:
        return None
    if key in d and not isinstance(d[key], dict):
        return d[key]
    if key in d and isinstance(d[key], dict) and "name" in d[key]:
        return d[key]["name"]
    for v in d.values():
        found = _find_key(v, key, depth - 1)
        if found is not None:
            return found
    return None


def _preset_excluded(layout: Layout, coll: Collection, runs, notes: list[str]) -> dict:
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


def _cols_in_play(layout: Layout) -> tuple[str, ...]:
    return tuple(c for c in layout.col_keys if any((r, c) not in layout.not_run for r in layout.row_keys))


def _missing_label(layout: Layout, row: str, col: str) -> str:
    head = layout.col_header or "norm"
    return f"{layout.row_label(row)}, {head} {layout.col_label(col)}"


# --------------------------------------------------------------------------------------------------
# building blocks


def _means(coll: Collection) -> Values:
    return {k: c.mean for k, c in coll.cells.items()}


def _csv_rows(layout: Layout, coll: Collection, imp: Optional[dict[str, ImportanceCell]]) -> list[dict]:
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
            rows.append({
                "experiment": layout.name, "row": rl, "column": ck, "metric": layout.csv_metric,
                "mean": _csv_num(cell.mean), "std": _csv_num(cell.std), "n_seeds": cell.n,
                "n_diverged": cell.n_diverged, "n_failed": cell.n_failed,
                "paper": _csv_num(layout.paper.get((rk, ck))), "note": "; ".join(notes),
            })
    means = _means(coll)
    for d in layout.derived:
        rep, pap = d.fn(means, layout.col_keys), d.fn(layout.paper, layout.col_keys)
        for ck in layout.col_keys:
            rows.append({
                "experiment": layout.name, "row": d.key, "column": ck, "metric": d.csv_metric,
                "mean": _csv_num(rep[ck]), "std": "", "n_seeds": "", "n_diverged": "", "n_failed": "",
                "paper": _csv_num(pap[ck]), "note": "derived from the means",
            })
    if imp is not None:
        for kind, kl in (("mean", "means"), ("var", "variances")):
            for ck in layout.col_keys:
                for share in SHARES:
                    ic = imp[ck]
                    paper = SN_PAPER_BN_SHARE.get(ck) if share == "bn" else None
                    rows.append({
                        "experiment": layout.name, "row": f"SN importance ({kl})", "column": ck,
                        "metric": f"{share}_share", "mean": _csv_num(ic.mean(kind, share)),
                        "std": _csv_num(ic.std(kind, share)), "n_seeds": ic.n, "n_diverged": "", "n_failed": "",
                        "paper": _csv_num(paper),
                        "note": ("paper: read off a chart, not split into means/variances" if paper is not None else "")
                        + ("" if ic.n else ("; " if paper is not None else "") + "no SN run with importance"),
                    })
    return rows


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _importance_md(layout: Layout, imp: dict[str, ImportanceCell]) -> list[str]:
    header = [layout.col_header] + list(layout.col_keys)
    rows = []
    for kind, kl in (("mean", "means"), ("var", "variances")):
        for share in SHARES:
            r = [f"{kl}: {share.upper()}"]
            for ck in layout.col_keys:
                ic = imp[ck]
                if not ic.n:
                    r.append("no run")
                    continue
                s = f"{ic.mean(kind, share):.2f}"
                sd = ic.std(kind, share)
                r.append(s + (f" ± {sd:.2f}" if sd is not None else "") + f" (n={ic.n})")
            rows.append(r)
    rows.append(["paper BN share (chart)"] + [_num(SN_PAPER_BN_SHARE.get(ck)) for ck in layout.col_keys])
    out = ["## SN learned importance weights", "",
           "Per run, the softmax importance shares of each SN layer are averaged over layers; cells give the mean "
           "over seeds ± sample std (n = seeds). A share absent from a layer (BN with use_bn=false) counts as 0. "
           "The paper's BN share is read off a chart and is not split into means and variances.", "",
           _md_table(header, rows), ""]
    a, b = imp.get("(8,32)"), imp.get("(8,2)")
    if a is not None and b is not None:
        def pair(kind):
            if not (a.n and b.n):
                return "n/a (cells without numbers)"
            return f"{a.mean(kind, 'bn'):.2f} → {b.mean(kind, 'bn'):.2f}"
        out += [f"- BN share from (8,32) to (8,2): means {pair('mean')}, variances {pair('var')} "
                f"(paper {SN_PAPER_BN_SHARE['(8,32)']:.2f} → {SN_PAPER_BN_SHARE['(8,2)']:.2f})", ""]
    return out


def _markdown(layout: Layout, coll: Collection, imp, results_dir: Path, model, data, png_name: str,
              missing: list[str], notes: list[str]) -> str:
    cells = coll.cells
    placed = coll.runs
    status = Counter(r.status for r in placed)
    n_cells = len(cells) - sum(1 for k, c in cells.items() if not c.runs and k in layout.not_run)

    md = [f"# {layout.name}: {layout.title}", ""]
    md += ["## What was run", ""]
    if placed or coll.unmatched:
        md.append(f"- Model / data: `{model}` on `{data}`")
        epochs = Counter(r.data.get("epochs") for r in placed)
        presets = Counter(_find_key(r.data.get("config") or {}, "preset_name")
                          or _find_key(r.data.get("config") or {}, "preset") for r in placed)
        presets.pop(None, None)
        ep = ", ".join(f"{e}" + (f" ({k} run{'s' * (k != 1)})" if len(epochs) > 1 else "") for e, k in sorted(epochs.items(), key=str))
        md.append(f"- Epochs: {ep or NA}" + (f"; preset: {', '.join(f'`{p}`' for p in sorted(map(str, presets)))}"
                                            if presets else ""))
        gpus = sorted({r.data.get("gpus") for r in placed} - {None})
        totals = {r.data.get("gpus", 0) * r.data.get("per_gpu_batch", 0) for r in placed}
        if gpus and layout.name != "sn_table":  # the SN table has GPUs as an axis
            if len(gpus) > 1 and len(totals) == 1:  # a small preset's fixed total batch
                md.append(f"- GPUs per step (emulated): {', '.join(map(str, gpus))} -- a fixed total of "
                          f"{totals.pop()} images per step split into GPUs of per_gpu_batch images, so every "
                          "setting gets the same steps and lr (the paper: 8 GPUs x per_gpu_batch)")
            else:
                md.append(f"- GPUs per step (emulated): {', '.join(map(str, gpus))} (the paper: 8)"
                          + (" -- mixed: cells pool runs of different GPU counts" if len(gpus) > 1 else ""))
    else:
        md.append(f"- No `result.json` for experiment `{layout.name}` under `{results_dir}` yet.")
    md.append(f"- Runs in the table: {status['completed']} completed, {status['diverged']} diverged, "
              f"{status['failed']} failed; missing cells: {len(missing)} of {n_cells}"
              + (f"; runs outside the layout: {len(coll.unmatched)}" if coll.unmatched else "")
              + (f"; superseded reruns: {len(coll.superseded)}" if coll.superseded else ""))
    commits = Counter(((r.data.get("git") or {}).get("commit"), bool((r.data.get("git") or {}).get("dirty")))
                      for r in placed)
    if commits:
        md.append("- Git commits: " + ", ".join(
            f"`{(c or 'unknown')[:10]}`" + (" (dirty)" if d else "") + f" ({k} run{'s' * (k != 1)})"
            for (c, d), k in sorted(commits.items(), key=str)))
    metric = ("top-1 accuracy = 100 - median top-1 error of the last 5 epochs" if layout.metric == "accuracy"
              else "median top-1 error of the last 5 epochs")
    md.append(f"- Metric: {metric} (`top1_error_median_last5`); cell = mean ± sample std over seeds (n = completed "
              "seeds; n=1 has no std). Diverged/failed runs are shown and counted, never filled in.")
    short = sorted({e for e in (r.data.get("epochs") for r in placed) if isinstance(e, int) and e < 5})
    if short:
        md.append(f"- Runs of {', '.join(map(str, short))} epoch(s) have fewer than 5 epochs: their \"median of the "
                  "last 5\" is the median over all their epochs.")
    md.append(f"- Cells: {layout.layout_note}.")
    md.append(f"- Results: `{results_dir}`")
    md.append("")

    md += ["## Table", ""]
    if layout.metric == "accuracy":
        md += ["Top-1 **accuracy** % (higher is better). Each row: reproduced, then the paper.", ""]
    else:
        md += ["Top-1 **error** % (lower is better). Each row: reproduced, then the paper.", ""]
    header = [layout.col_header or "norm"] + [layout.col_label(c) for c in layout.col_keys]
    rows = []
    for rk, rl in layout.rows:
        rows.append([f"**{rl}**"] + [cell_text(layout, cells[(rk, ck)]) for ck in layout.col_keys])
        rows.append([f"{rl} (paper)"] + [paper_text(layout, (rk, ck)) for ck in layout.col_keys])
    means = _means(coll)
    for d in layout.derived:
        rep, pap = d.fn(means, layout.col_keys), d.fn(layout.paper, layout.col_keys)
        rows.append([f"**{d.label}**"] + [_num(rep[c], 2, signed=True) for c in layout.col_keys])
        rows.append([f"{d.label} (paper)"] + [_num(pap[c], 1, signed=True) for c in layout.col_keys])
    md += [_md_table(header, rows), ""]
    md.append(f"Paper: {layout.paper_source}. {layout.paper_caveat}"
              + (" `*` = single-sourced cell." if layout.single_sourced else ""))
    md.append("")

    md += ["## Trend", ""]
    if not placed:
        pass
    elif str(data).lower().startswith("imagenet"):
        md += [f"Run on `{data}`: absolute numbers are comparable with the paper (same data), "
               "within the limits of the recipe actually used.", ""]
    else:
        md += [f"> **Small-scale reproduction** (`{model}` on `{data}`, not ResNet-50 on ImageNet): absolute numbers "
               "are not comparable with the paper's. The TREND is what is held against the paper.", ""]
    cols = _cols_in_play(layout)
    if cols != layout.col_keys:
        md += [f"Trends over the columns run ({', '.join(layout.col_label(c) for c in cols)}); "
               "the paper's numbers are taken over the same columns.", ""]
    for t in layout.trends:
        rep, pap = t.fn(means, cols), t.fn(layout.paper, cols)
        md.append(f"- {t.label}: {_trend_value(rep, t.fmt, 2)} (paper {_trend_value(pap, t.fmt, 1)})")
    md.append("")

    if imp is not None:
        md += _importance_md(layout, imp)

    md += ["## Figure", "", f"![{layout.name}]({png_name})", ""]
    if layout.figure == "xy":
        md += [f"Solid: reproduced mean ± std; dashed: paper, same color. x: {layout.x_label}.", ""]
    elif layout.figure == "categorical":
        md += ["Solid: reproduced mean ± std; dashed: paper, same color; x marks a cell with only diverged/failed "
               "runs." + (" Below: importance shares as stacked bars per setting." if imp is not None else ""), ""]
    else:
        md += ["Filled bars: reproduced mean ± std; hatched: paper.", ""]

    md += ["## Missing cells", ""]
    md += [f"- {m}" for m in missing] if missing else ["None."]
    not_run = [f"- {_missing_label(layout, r, c)}: {t}" for (r, c), t in layout.not_run.items() if not cells[(r, c)].runs]
    if not_run:
        md += ["", "Not run by design:"] + not_run
    md.append("")

    if coll.unmatched:
        md += ["## Runs outside this table's layout", "",
               f"These runs carry `experiment: {layout.name}` but fit no cell ({layout.layout_note}); "
               "they are not in the table.", ""]
        for r in coll.unmatched[:30]:
            d = r.data
            md.append(f"- `{r.label()}`: norm={d.get('norm')} norm_options={d.get('norm_options')} "
                      f"gpus={d.get('gpus')} per_gpu_batch={d.get('per_gpu_batch')} status={d.get('status')}")
        if len(coll.unmatched) > 30:
            md.append(f"- ... and {len(coll.unmatched) - 30} more")
        md.append("")

    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(md)


# --------------------------------------------------------------------------------------------------
# atomic output


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then os.replace (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------


def build_report(experiment: str, results_dir, out_dir: Optional[Path] = None, *,
                 model: Optional[str] = None, data: Optional[str] = None) -> ReportSummary:
    """Build NAME.md, NAME.csv and NAME.png for one experiment from ``results_dir/**/result.json``.

    Only runs whose ``experiment`` field equals ``experiment`` are read. Runs of several (model, data)
    pairs are refused (ValueError) unless ``model``/``data`` select one. Never trains anything.
    """
    if experiment not in LAYOUTS:
        raise ValueError(f"unknown experiment {experiment!r}; known: {', '.join(LAYOUTS)}")
    layout = LAYOUTS[experiment]
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir / "reports"

    notes: list[str] = []
    if not results_dir.is_dir():
        notes.append(f"results_dir `{results_dir}` does not exist: no runs yet (or a wrong path).")
    runs = load_runs(results_dir, experiment, notes)
    runs = select_model_data(runs, experiment, model, data)
    coll = collect(layout, runs, notes)
    excluded = _preset_excluded(layout, coll, runs, notes)
    if excluded:
        layout = dataclasses.replace(layout, not_run={**excluded, **layout.not_run})
    imp = importance_cells(layout, coll, notes) if layout.importance else None
    pairs = {(r.data.get("model"), r.data.get("data")) for r in runs}
    model_, data_ = next(iter(pairs)) if pairs else (model, data)

    missing = [_missing_label(layout, r, c) for (r, c), cell in coll.cells.items()
               if not cell.runs and (r, c) not in layout.not_run]
    png_name = f"{experiment}.png"
    markdown = _markdown(layout, coll, imp, results_dir, model_, data_, png_name, missing, notes)
    csv_text = _csv_text(_csv_rows(layout, coll, imp))
    title = f"{experiment}" + (f": {model_} on {data_}" if pairs else ": no runs yet")
    png = render_png(layout, coll, title, imp)

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{experiment}.md", out_dir / f"{experiment}.csv", out_dir / png_name)
    atomic_write(paths[2], png)
    atomic_write(paths[1], csv_text.encode())
    atomic_write(paths[0], markdown.encode())

    status = Counter(r.status for r in coll.runs)
    return ReportSummary(
        experiment=experiment, paths=paths, n_completed=status["completed"], n_diverged=status["diverged"],
        n_failed=status["failed"], n_missing_cells=len(missing), missing_cells=missing,
        n_unmatched=len(coll.unmatched), notes=list(notes), markdown=markdown, model=model_, data=data_,
        n_superseded=len(coll.superseded),
    )
