"""``clray report``: one self-contained HTML page per run or search, of what it bought.

A run's ``report.html`` holds its training curves, its evaluation figures over steps, the
similarity histograms of its first and last evaluation, the resolved config, the
quarantine and the environment; a search's holds the trials side by side and each
trial's curves. Both are built from files already in the directory (so they can be
rebuilt at any time, also for failed or interrupted runs), with plots embedded as PNG
data and no scripts or external assets, so the page opens offline, anywhere.

- :func:`build_report` (run directory) and :func:`build_search_report` (search directory)
  write the page and return its path; :func:`build` picks the right one.
- :func:`environment` is the record the training driver writes as ``environment.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

from clray.jobs.report.environment import ENVIRONMENT_FILE, environment
from clray.jobs.report.read import ReportError
from clray.jobs.report.run import REPORT_FILE, build_report
from clray.jobs.report.search import TRIALS_DIR, build_search_report

__all__ = ["ENVIRONMENT_FILE", "REPORT_FILE", "ReportError", "build", "build_report", "build_search_report",
           "environment"]


def build(directory: str | os.PathLike[str]) -> Path:
    """The report of a run directory or of a search directory, whichever ``directory`` is."""
    root = Path(directory)
    if (root / TRIALS_DIR).is_dir() or (root / "results.parquet").is_file():
        return build_search_report(root)
    return build_report(root)
