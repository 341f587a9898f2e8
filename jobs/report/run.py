"""``report.html`` for one training run: what the run bought, on one self-contained page.

Built only from files the run leaves in its directory (``metrics.jsonl``, ``summary.json``,
``config.toml``, ``environment.json``, the quarantine files), so it can be rebuilt any time
(``clray report RUN``) and describes a failed or interrupted run as well as a finished one.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from clray.jobs import events
from clray.jobs.report import html
from clray.jobs.report.plots import Panel, histograms_png, panels_png
from clray.jobs.report.read import RunRecord, read_run

REPORT_FILE = "report.html"
TRAIN_PANELS = (
    ("loss", "training loss", True),
    ("temperature", "temperature", False),
    ("lr", "learning rate", False),
    ("accuracy", "in-batch top-1 accuracy", False),
    ("samples_per_s", "samples / s", False),
    ("data_wait_fraction", "data wait (fraction of step time)", False),
    ("pos_sim", "in-batch positive similarity", False),
    ("neg_sim", "in-batch negative similarity", False),
)
"""(TrainEvent value, panel title, log scale): the training curves, in reading order."""
GEOMETRY_SPREAD = ("alignment", "uniformity", "uniformity_anchor", "uniformity_positive")
GEOMETRY_SIMILARITY = ("pos_sim", "neg_sim", "modality_gap")


def train_value(event: events.TrainEvent, key: str) -> float | None:
    if key in ("temperature", "lr"):
        return float(getattr(event, key))
    value = event.metrics.get(key)
    return None if value is None else float(value)


def train_panels(train: list[events.TrainEvent], marks: list[float]) -> list[Panel]:
    steps = [e.step for e in train]
    panels = []
    for key, title, log in TRAIN_PANELS:
        values = [train_value(e, key) for e in train]
        if any(v is not None for v in values):
            kept = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
            panels.append(Panel(title, [(key, [s for s, _ in kept], [v for _, v in kept])], log_y=log, marks=marks))
    return panels


def eval_group(name: str) -> str:
    """The panel an eval figure (without its ``eval/`` prefix) is drawn in."""
    if "_ir_" in name:
        return f"IR retrieval, {name.split('_', 1)[0]} (duplicates folded)"
    if "_R@" in name:
        return "exact-pair recall"
    if name in GEOMETRY_SPREAD:
        return "geometry: alignment and uniformity"
    if name in GEOMETRY_SIMILARITY:
        return "geometry: similarities and modality gap"
    if "zero_shot" in name:
        return "zero-shot accuracy"
    return "other evaluation figures"


def eval_panels(evals: list[events.EvalEvent], marks: list[float]) -> list[Panel]:
    names = list(dict.fromkeys(name for e in evals for name in e.figures))
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(eval_group(name.removeprefix("eval/")), []).append(name)
    panels = []
    for title, members in groups.items():
        series = []
        for name in members:
            points = [(e.step, e.figures[name]) for e in evals if name in e.figures]
            series.append((name.removeprefix("eval/"), [p[0] for p in points], [p[1] for p in points]))
        panels.append(Panel(title, series, marks=marks))
    return panels


def _status(record: RunRecord) -> str:
    summary = record.summary or {}
    total = summary.get("total_steps") or (record.data.plan.get("total_steps") if record.data else None)
    if record.end is not None and record.end.complete:
        return f"complete: {record.end.step:,} steps"
    last = record.end.step if record.end else (record.train[-1].step if record.train else 0)
    of = f" of {total:,}" if total else ""
    if record.error_log is not None and record.end is None:
        return f"failed after step {last:,}{of} (see the error log below)"
    return f"stopped at step {last:,}{of} (resume by starting the same run again)"


def overview(record: RunRecord) -> str:
    summary = record.summary or {}
    rows: list[tuple[str, Any]] = [("run directory", str(record.run_dir)), ("status", _status(record))]
    plan = record.data.plan if record.data else {}
    for label, value in (
        ("training rows", summary.get("train_rows")),
        ("steps per epoch", summary.get("steps_per_epoch", plan.get("steps_per_epoch"))),
        ("epochs", summary.get("epochs")),
        ("eval rows", record.evals[-1].metrics.get("eval_rows") if record.evals else None),
        ("wall time (s)", summary.get("wall_seconds")),
        ("batches", summary.get("batches")),
        ("resumed starts", len(record.resumed) or None),
        ("checkpoints", len(summary["checkpoints"]) if summary.get("checkpoints") else None),
        ("export", summary.get("export_dir") or record.exported),
    ):
        if value is not None:
            rows.append((label, value))
    notes = "".join(html.paragraph(note, "note") for note in record.notes)
    return html.key_values(rows) + notes


def evaluation_table(evals: list[events.EvalEvent]) -> str:
    first, last = evals[0], evals[-1]
    names = list(dict.fromkeys([*first.figures, *last.figures]))
    header = ("figure", f"step {first.step:,}", f"step {last.step:,}") if first is not last else ("figure", f"step {last.step:,}")
    rows = []
    for name in names:
        values = [first.figures.get(name), last.figures.get(name)] if first is not last else [last.figures.get(name)]
        rows.append((name.removeprefix("eval/"), *values))
    return html.table(header, rows)


def histogram_section(evals: list[events.EvalEvent]) -> str:
    with_hist = [e for e in evals if e.histograms]
    if not with_hist:
        return html.paragraph("No evaluation recorded similarity histograms.", "note")
    first, last = with_hist[0], with_hist[-1]
    snapshots = [(f"first evaluation (step {first.step:,})", first.histograms)]
    if last is not first:
        snapshots.append((f"last evaluation (step {last.step:,})", last.histograms))
    return html.paragraph("Cosine similarity of each eval pair (positive) and of every anchor with the "
                          "other rows' positives (negative); fixed bins over [-1, 1].") + \
        html.figure(histograms_png(snapshots), "similarity histograms")


def quarantine_section(record: RunRecord) -> str:
    if not record.quarantine:
        reasons = record.data.reasons if record.data else {}
        if reasons:
            return html.table(("reason", "rows"), sorted(reasons.items()))
        return html.paragraph("No rows were quarantined." if record.data else "No data event was recorded.")
    parts = []
    for split, q in record.quarantine.items():
        parts.append(html.paragraph(f"{split}: {q.rows:,} quarantined rows in {q.path.name}"))
        parts.append(html.table(("reason", "rows"), sorted(q.reasons.items(), key=lambda kv: -kv[1])))
        if q.sample:
            columns = list(q.sample[0])
            note = f" (first {len(q.sample)} of {q.rows:,})" if q.rows > len(q.sample) else ""
            parts.append(html.paragraph(f"rows{note}:"))
            parts.append(html.table(columns, ([row.get(c) for c in columns] for row in q.sample)))
    return "".join(parts)


def environment_section(env: dict[str, Any] | None) -> str:
    if env is None:
        return html.paragraph("This run recorded no environment.json (written by the training driver when "
                              "the run starts).", "note")
    rows: list[tuple[str, Any]] = [(k, env[k]) for k in ("recorded_at", "host", "python", "platform", "cpu_count",
                                                         "clray_commit")
                                   if k in env]
    rows += [(f"{name} version", version or "not installed") for name, version in (env.get("versions") or {}).items()]
    rows += [(k.replace("_", " "), v) for k, v in (env.get("workers") or {}).items()]
    rows += [(k.replace("_", " "), v) for k, v in (env.get("driver_devices") or {}).items()]
    rows += [(f"ray cluster {k}", v) for k, v in (env.get("ray_cluster") or {}).items()]
    return html.key_values(rows)


def run_sections(record: RunRecord) -> list[tuple[str, str, str]]:
    """The report's sections, (anchor, title, html) each; also what a search report embeds."""
    marks = [float(e.step) for e in record.resumed if e.step > 0]
    sections = [("overview", "Overview", overview(record))]
    panels = train_panels(record.train, marks)
    sections.append(("training", "Training curves", html.figure(panels_png(panels), "training curves") if panels
                     else html.paragraph("No training steps were logged.", "note")))
    if record.evals:
        figures = eval_panels(record.evals, marks)
        plot = html.figure(panels_png(figures, columns=2, panel_size=(6.0, 3.2)), "evaluation figures") if figures else ""
        sections.append(("evaluation", "Evaluation", plot + evaluation_table(record.evals)))
    else:
        sections.append(("evaluation", "Evaluation", html.paragraph("No evaluation was recorded.", "note")))
    sections.append(("similarity", "Similarity histograms", histogram_section(record.evals)))
    sections.append(("config", "Resolved config", html.pre(record.config_text) if record.config_text
                     else html.paragraph("No config.toml in the run directory.", "note")))
    sections.append(("data", "Data and quarantine", quarantine_section(record)))
    sections.append(("environment", "Environment", environment_section(record.environment)))
    if record.error_log:
        sections.append(("error", "Error log", html.pre(record.error_log)))
    return sections


def write_page(path: Path, text: str) -> Path:
    """Write atomically: a report being rebuilt is never seen half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def build_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``run_dir/report.html`` from what the run left there, and return its path.

    Raises ``ReportError`` (naming the file and the fix) for a directory that is not a
    run or holds a file it cannot read.
    """
    record = read_run(run_dir)
    subtitle = f"clray run report, built {time.strftime('%Y-%m-%d %H:%M:%S')} from {record.run_dir}"
    text = html.page(f"Run {record.name}", subtitle, run_sections(record))
    return write_page(record.run_dir / REPORT_FILE, text)
