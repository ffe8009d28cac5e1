"""python -m normbench.report EXPERIMENT RESULTS_DIR [--out OUT_DIR] [--model M] [--data D]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import EXPERIMENTS, build_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m normbench.report", description=__doc__)
    p.add_argument("experiment", help="one of: " + ", ".join(EXPERIMENTS) + ", or 'all'")
    p.add_argument("results_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output dir (default RESULTS_DIR/reports)")
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    a = p.parse_args(argv)
    names = EXPERIMENTS if a.experiment == "all" else (a.experiment,)
    try:
        for name in names:
            s = build_report(name, a.results_dir, a.out, model=a.model, data=a.data)
            print(f"{name}: {s.n_completed} completed, {s.n_diverged} diverged, {s.n_failed} failed, "
                  f"{s.n_missing_cells} missing cells -> {s.md_path}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
