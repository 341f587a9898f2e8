"""``report.html`` for a ``clray tune`` search: the trials side by side, then each trial.

Reads the search directory's own files (``summary.json``, ``results.parquet``,
``best.toml``, ``plots/``) and each trial's run directory under ``trials/``. A trial may
have several run directories (PBT starts a new generation, ``ID-N``, from another
trial's checkpoint); its curves join them by step. Each trial run also gets its own run
report, linked from here.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

from clray.jobs.report import html
from clray.jobs.report.plots import Panel, panels_png
from clray.jobs.report.read import METRICS_FILE, ReportError, RunRecord, read_json, read_run
from clray.jobs.report.run import (
    REPORT_FILE,
    build_report,
    environment_section,
    train_value,
    write_page,
)

TRIALS_DIR = "trials"
TRIAL_COLUMNS = ("trial_id", "status", "steps", "metric_last", "metric_best", "evaluations", "error")
"""The results.parquet columns every search writes; any other column is a searched key."""


def _read_results(search_dir: Path) -> list[dict[str, Any]]:
    path = search_dir / "results.parquet"
    if not path.is_file():
        return []
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise ReportError(f"{path} is not a readable Parquet file ({exc}); `clray tune --resume` on the "
                          "search rewrites it") from None


def _trial_runs(search_dir: Path, trial_ids: list[str]) -> dict[str, list[RunRecord]]:
    """Each trial's run directories (its generations), read; run directories that match no
    trial id (a search interrupted before results.parquet) become trials of their own."""
    runs: dict[str, list[RunRecord]] = {t: [] for t in trial_ids}
    base = search_dir / TRIALS_DIR
    run_dirs = sorted(p for p in base.iterdir() if (p / METRICS_FILE).is_file()) if base.is_dir() else []
    for run_dir in run_dirs:
        owner = next((t for t in trial_ids if run_dir.name == t or run_dir.name.startswith(f"{t}-")), run_dir.name)
        runs.setdefault(owner, []).append(read_run(run_dir))
    return runs


def _generation(record: RunRecord) -> int:
    tail = record.name.rsplit("-", 1)[-1]
    return int(tail) if "-" in record.name and tail.isdigit() else 0


def _joined(records: list[RunRecord], metric: str | None) -> dict[str, tuple[list[float], list[float]]]:
    """A trial's curves over its generations: loss, lr, temperature and the search metric,
    the later generation's value winning where two logged the same step."""
    curves: dict[str, dict[int, float]] = {"loss": {}, "lr": {}, "temperature": {}}
    if metric:
        curves[metric] = {}
    for record in sorted(records, key=_generation):
        for event in record.train:
            for key in ("loss", "lr", "temperature"):
                value = train_value(event, key)
                if value is not None:
                    curves[key][event.step] = value
        if metric and metric.startswith("eval/"):
            for event in record.evals:
                if metric in event.figures:
                    curves[metric][event.step] = event.figures[metric]
        elif metric:
            for event in record.train:
                value = train_value(event, metric)
                if value is not None:
                    curves[metric][event.step] = value
    return {key: ([float(s) for s in sorted(v)], [v[s] for s in sorted(v)]) for key, v in curves.items()}


def _label(row: dict[str, Any], keys: list[str]) -> str:
    searched = ", ".join(f"{k.rsplit('.', 1)[-1]}={html.fmt(row.get(k))}" for k in keys)
    return f"{row['trial_id']} ({searched})" if searched else str(row["trial_id"])


def _overview(search_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[str(row.get("status"))] = statuses.get(str(row.get("status")), 0) + 1
    pairs: list[tuple[str, Any]] = [("search directory", str(search_dir))]
    if summary:
        pairs += [("metric", f"{summary.get('metric')} ({summary.get('mode')})"),
                  ("best trial", summary.get("best_trial") or "none finished"),
                  ("best value", summary.get("best_value")),
                  ("best parameters", json.dumps(summary.get("best_params") or {})),
                  ("best config", summary.get("best_config")),
                  ("trial steps in all", summary.get("total_trial_steps")),
                  ("wall time (s)", summary.get("wall_seconds"))]
    else:
        pairs.append(("summary", "no summary.json: the search has not finished (or was interrupted)"))
    pairs.append(("trials", ", ".join(f"{n} {s.lower()}" for s, n in sorted(statuses.items())) or "none"))
    return html.key_values([(k, v) for k, v in pairs if v is not None])


def _trials_table(rows: list[dict[str, Any]], keys: list[str], links: dict[str, list[str]]) -> str:
    header = ["trial", "status", *keys, "steps", "metric (last)", "metric (best)", "evaluations", "reports", "error"]
    body = []
    for row in rows:
        reports = html.Raw(" ".join(html.link(href, Path(href).parent.name) for href in links.get(row["trial_id"], [])))
        body.append([row["trial_id"], row.get("status"), *(row.get(k) for k in keys), row.get("steps"),
                     row.get("metric_last"), row.get("metric_best"), row.get("evaluations"), reports, row.get("error")])
    return html.table(header, body)


def _saved_plots(search_dir: Path) -> str:
    plots = sorted((search_dir / "plots").glob("*.png")) if (search_dir / "plots").is_dir() else []
    if not plots:
        return html.paragraph("The search wrote no plots (they are drawn when it finishes).", "note")
    return "".join(html.paragraph(p.name) + html.figure("data:image/png;base64," + base64.b64encode(p.read_bytes())
                                                        .decode("ascii"), p.stem) for p in plots)


def _comparison(curves: dict[str, dict[str, tuple[list[float], list[float]]]], metric: str | None) -> str:
    keys = ["loss", *([metric] if metric else []), "lr", "temperature"]
    panels = [Panel(key, [(label, *c[key]) for label, c in curves.items() if c.get(key) and c[key][0]],
                    log_y=key == "loss") for key in keys]
    panels = [p for p in panels if p.series]
    if not panels:
        return html.paragraph("No trial logged a training step yet.", "note")
    return html.figure(panels_png(panels, columns=2, panel_size=(6.0, 3.4)), "every trial's curves")


def _per_trial(curves: dict[str, dict[str, tuple[list[float], list[float]]]], metric: str | None) -> str:
    parts = []
    for label, trial in curves.items():
        keys = ["loss", *([metric] if metric else []), "lr", "temperature"]
        panels = [Panel(key, [(key, *trial[key])], log_y=key == "loss") for key in keys if trial.get(key)]
        panels = [p for p in panels if p.series[0][1]]
        parts.append(f"<h3>{html.esc(label)}</h3>")
        parts.append(html.figure(panels_png(panels, columns=4, panel_size=(3.3, 2.4)), f"curves of {label}")
                     if panels else html.paragraph("No steps logged.", "note"))
    return "".join(parts)


def build_search_report(search_dir: str | os.PathLike[str], trial_reports: bool = True) -> Path:
    """Write ``search_dir/report.html`` for a ``clray tune`` search, and return its path.

    With ``trial_reports`` each trial run also gets its own ``report.html`` (see
    :func:`build_report`), linked from the trials table.
    """
    root = Path(search_dir)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory; pass a search directory (run.output_dir/run.name of the "
                          "search config)")
    if not (root / TRIALS_DIR).is_dir() and not (root / "results.parquet").is_file():
        raise ReportError(f"{root} has neither {TRIALS_DIR}/ nor results.parquet: not a clray tune search "
                          "directory (for a training run directory use build_report)")
    summary = read_json(root / "summary.json") if (root / "summary.json").is_file() else {}
    metric = summary.get("metric")
    rows = _read_results(root)
    keys = [c for c in (rows[0] if rows else {}) if c not in TRIAL_COLUMNS and c not in ("run_name", "curve")]
    runs = _trial_runs(root, [str(r["trial_id"]) for r in rows])
    rows += [{"trial_id": t, "status": "UNKNOWN"} for t in runs if t not in {str(r["trial_id"]) for r in rows}]
    links: dict[str, list[str]] = {}
    if trial_reports:
        for trial, records in runs.items():
            links[trial] = [build_report(r.run_dir).relative_to(root).as_posix() for r in records]
    labels = {str(r["trial_id"]): _label(r, keys) for r in rows}
    curves = {labels[t]: _joined(records, metric) for t, records in runs.items() if records}
    environment = next((r.environment for records in runs.values() for r in records if r.environment), None)
    sections = [
        ("overview", "Overview", _overview(root, summary, rows)),
        ("trials", "Trials", _trials_table(rows, keys, links)),
        ("plots", "Search plots", _saved_plots(root)),
        ("curves", "Every trial's curves", _comparison(curves, metric)),
        ("each", "Each trial", _per_trial(curves, metric)),
        ("best", "Best config", html.pre((root / "best.toml").read_text()) if (root / "best.toml").is_file()
         else html.paragraph("No best.toml (no trial finished an evaluation).", "note")),
        ("environment", "Environment (first trial)", environment_section(environment)),
    ]
    subtitle = f"clray search report, built {time.strftime('%Y-%m-%d %H:%M:%S')} from {root}"
    return write_page(root / REPORT_FILE, html.page(f"Search {root.name}", subtitle, sections))
