"""Read what a run left in its directory into one object the report draws from.

A run directory is written by several starts of the same run (a resume appends to
``metrics.jsonl``), possibly killed mid-write, and by older or newer clray versions. The
reader keeps the latest record of each step (a resumed start re-trains the steps after
its checkpoint), skips a truncated last line, and names anything else it cannot read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clray.jobs import events
from clray.jobs.report.environment import ENVIRONMENT_FILE

METRICS_FILE = "metrics.jsonl"
QUARANTINE_FILES = {"train": "quarantine.parquet", "eval": "quarantine-eval.parquet"}
QUARANTINE_SAMPLE_ROWS = 20
"""Rows of each quarantine file shown in a report (the file itself has all of them)."""


class ReportError(Exception):
    """A directory a report cannot be built from; the message names the file and the fix."""


@dataclass
class Quarantine:
    path: Path
    rows: int
    reasons: dict[str, int]
    sample: list[dict[str, Any]]
    """The first QUARANTINE_SAMPLE_ROWS rows (id, reason, file)."""


@dataclass
class RunRecord:
    run_dir: Path
    train: list[events.TrainEvent] = field(default_factory=list)
    """One per logged step (the latest start's record of it), in step order."""
    evals: list[events.EvalEvent] = field(default_factory=list)
    resumed: list[events.ResumedEvent] = field(default_factory=list)
    data: events.DataEvent | None = None
    end: events.EndEvent | None = None
    exported: str | None = None
    summary: dict[str, Any] | None = None
    config_text: str | None = None
    environment: dict[str, Any] | None = None
    quarantine: dict[str, Quarantine] = field(default_factory=dict)
    error_log: str | None = None
    notes: list[str] = field(default_factory=list)
    """What the reader skipped (a truncated last line, events of unknown kinds)."""

    @property
    def name(self) -> str:
        return self.run_dir.name


def read_events(path: Path, notes: list[str]) -> list[events.Event]:
    """Every event of a metrics.jsonl, in file order."""
    lines = path.read_text().splitlines()
    out: list[events.Event] = []
    unknown: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # a run killed mid-write: the rest of the file is whole
                notes.append(f"{path.name}: skipped the truncated last line {number}")
                continue
            raise ReportError(f"{path}:{number} is not JSON ({exc.msg}); every line of {METRICS_FILE} is one "
                              "event record: remove or repair that line") from None
        if not isinstance(record, dict) or "event" not in record:
            raise ReportError(f"{path}:{number} is not an event record (a JSON object with an \"event\" key)")
        if record["event"] not in events.EVENTS:
            unknown[str(record["event"])] = unknown.get(str(record["event"]), 0) + 1
            continue
        try:
            out.append(events.parse(record))
        except TypeError as exc:
            raise ReportError(f"{path}:{number}: a {record['event']!r} record this clray cannot read ({exc}); "
                              "build the report with the clray version that wrote the run") from None
    if unknown:
        notes.append(f"{path.name}: skipped events of kinds this clray does not know: "
                     + ", ".join(f"{kind} x{count}" for kind, count in sorted(unknown.items())))
    return out


def _latest_per_step(items: list[Any]) -> list[Any]:
    by_step: dict[int, Any] = {}
    for item in items:
        by_step[int(item.step)] = item
    return [by_step[step] for step in sorted(by_step)]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); restore or delete it") from None


def read_quarantine(path: Path) -> Quarantine:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise ReportError(f"{path} is not a readable Parquet file ({exc}); delete it or re-run the "
                          "data validation") from None
    reasons: dict[str, int] = {}
    if "reason" in table.column_names:
        for reason in table.column("reason").to_pylist():
            reasons[str(reason)] = reasons.get(str(reason), 0) + 1
    columns = [c for c in ("id", "reason", "file") if c in table.column_names] or table.column_names[:3]
    sample = table.select(columns).slice(0, QUARANTINE_SAMPLE_ROWS).to_pylist()
    return Quarantine(path=path, rows=table.num_rows, reasons=reasons, sample=sample)


def read_run(run_dir: str | Path) -> RunRecord:
    """The run in ``run_dir`` (a local directory), for a report."""
    root = Path(run_dir)
    if str(run_dir).startswith(("s3://", "gs://")):
        raise ReportError(f"{run_dir}: reports are built from a local run directory; copy it first "
                          f"(e.g. aws s3 sync {run_dir} ./{Path(str(run_dir)).name})")
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory; pass a run directory (run.output_dir/run.name)")
    metrics = root / METRICS_FILE
    if not metrics.is_file():
        raise ReportError(f"{root} has no {METRICS_FILE}: not a clray run directory, or the run has not "
                          "started training yet")
    record = RunRecord(run_dir=root)
    typed = read_events(metrics, record.notes)
    record.train = _latest_per_step([e for e in typed if isinstance(e, events.TrainEvent)])
    record.evals = _latest_per_step([e for e in typed if isinstance(e, events.EvalEvent)])
    record.resumed = [e for e in typed if isinstance(e, events.ResumedEvent)]
    record.data = next((e for e in reversed(typed) if isinstance(e, events.DataEvent)), None)
    record.end = next((e for e in reversed(typed) if isinstance(e, events.EndEvent)), None)
    record.exported = next((e.path for e in reversed(typed) if isinstance(e, events.ExportedEvent)), None)
    if (root / "summary.json").is_file():
        record.summary = read_json(root / "summary.json")
    if (root / "config.toml").is_file():
        record.config_text = (root / "config.toml").read_text()
    if (root / ENVIRONMENT_FILE).is_file():
        record.environment = read_json(root / ENVIRONMENT_FILE)
    for split, name in QUARANTINE_FILES.items():
        if (root / name).is_file():
            record.quarantine[split] = read_quarantine(root / name)
    if (root / "error.log").is_file():
        record.error_log = (root / "error.log").read_text()[-4000:]
    return record
