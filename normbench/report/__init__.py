"""Report generator: turns the runs' ``result.json`` files into the papers' tables (Markdown, CSV, PNG).

    from normbench.report import build_report
    summary = build_report("gn_table2", "results/")   # -> results/reports/gn_table2.{md,csv,png}

Experiments: gn_table1, gn_table2, gn_groups, gn_channels_per_group, sn_table, pono_ms (see ``layouts.LAYOUTS``).
"""

from .build import ReportSummary, build_report
from .layouts import LAYOUTS

EXPERIMENTS = tuple(LAYOUTS)

__all__ = ["ReportSummary", "build_report", "EXPERIMENTS", "LAYOUTS"]
