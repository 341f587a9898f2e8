"""What a start of a run returns and writes to summary.json: ``TrainSummary``, built from
the events rank 0 sent (``summarize``) and, for what earlier starts did, the run's
metrics.jsonl."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from clray.jobs import events
from clray.jobs.config import JobConfig
from clray.jobs.run.commit import complete_checkpoints
from clray.jobs.run.data import RunData
from clray.jobs.run.location import RunLocation
from clray.jobs.run.schedule import Schedule


@dataclass
class TrainSummary:
    run_dir: str
    steps: int
    epochs: int
    steps_per_epoch: int
    train_rows: int
    quarantined_rows: int
    quarantine_path: str | None
    quarantine_reasons: dict[str, int]
    checkpoints: list[str]
    export_dir: str | None
    final_train: dict[str, float] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    """The evaluation of the starting model (train.eval_at_start), what ``eval`` is
    compared with; empty when the run was not evaluated at step 0."""
    export_step: int | None = None
    """The step whose state the export holds (with train.select_by, the best one)."""
    report: str | None = None
    resumed_from_step: int | None = None
    wall_seconds: float = 0.0
    total_steps: int = 0
    """Steps of the whole run; ``steps`` is less when this start stopped early (stop_epoch)."""
    batches: str = "examples"
    plan_dir: str | None = None
    """Packed: the `clray mine` plan directory trained on."""
    num_plans: int = 0
    skipped_batches: list[int] = field(default_factory=list)
    """Packed: per epoch plan, the mined batches no worker trained on (so that every rank
    takes the same number of whole batches)."""
    remainder_rows_per_epoch: int = 0
    """Examples: valid rows that do not fill a last global batch and sit out each epoch
    (which ones changes with the epoch's shuffle)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def _baseline(location: RunLocation, evals: list[events.EvalEvent]) -> dict[str, float]:
    """The step-0 evaluation: this start's, or for a resumed run the first start's, from
    the run's metrics.jsonl (appended to by every start)."""
    if evals and evals[0].step == 0:
        return evals[0].figures
    first = next((r for r in _logged(location, "eval") if r.get("step") == 0), None)
    return events.parse(first).figures if first else {}


def summarize(cfg: JobConfig, location: RunLocation, data: RunData, schedule: Schedule,
               records: list[dict[str, Any]], started: float) -> TrainSummary:
    # Ray Train V2's Result carries the metrics of the latest *checkpoint* report, so the
    # end-of-run evaluation comes from rank 0's event stream instead.
    typed = [events.parse(r) for r in records]
    train = [e for e in typed if isinstance(e, events.TrainEvent)]
    evals = [e for e in typed if isinstance(e, events.EvalEvent)]
    ends = [e for e in typed if isinstance(e, events.EndEvent)]
    resumed = next((e.step for e in typed if isinstance(e, events.ResumedEvent)), None)
    exported = [e for e in typed if isinstance(e, events.ExportedEvent)]
    last = ends[-1] if ends else (train[-1] if train else None)
    if not train and last is not None:
        # A start with nothing left to train (a finished run started again) reports the
        # training metrics the run ended with, from the events earlier starts logged.
        train = [e for e in _logged_train_events(location) if e.step <= last.step][-1:]
    report = data.report
    return TrainSummary(
        run_dir=location.uri,
        steps=int(last.step) if last else 0,
        epochs=int(last.epoch) if last else 0,
        steps_per_epoch=schedule.steps_per_epoch,
        train_rows=data.num_rows,
        quarantined_rows=report.quarantined_rows,
        quarantine_path=location.final(report.quarantine_path),
        quarantine_reasons=dict(report.reasons),
        checkpoints=checkpoints_of(location),
        export_dir=location.export_dir(),
        final_train={k: v for k, v in (train[-1].record() if train else {}).items() if isinstance(v, (int, float))},
        eval=evals[-1].figures if evals else {},
        baseline=_baseline(location, evals),
        export_step=exported[-1].step if exported else None,
        resumed_from_step=resumed,
        wall_seconds=time.perf_counter() - started,
        total_steps=schedule.total_steps,
        batches=cfg.data.batches,
        plan_dir=data.packed["plan_dir"] if data.packed else None,
        num_plans=data.packed["num_plans"] if data.packed else 0,
        skipped_batches=data.skipped_batches,
        remainder_rows_per_epoch=schedule.remainder_rows,
    )


def checkpoints_of(location: RunLocation) -> list[str]:
    """The run's complete checkpoints (``jobs.run.commit``), oldest first."""
    complete, _ = complete_checkpoints(location.uri, location.cfg.storage)
    return [c.uri for c in reversed(complete)]


def _logged_train_events(location: RunLocation) -> list[events.TrainEvent]:
    """The training events of every start of the run, from its metrics.jsonl."""
    return [events.TrainEvent.from_record(r) for r in _logged(location, "train")]


def _logged(location: RunLocation, kind: str) -> list[dict[str, Any]]:
    """The records of one event kind every start of the run appended to metrics.jsonl."""
    path = location.local / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short when a start was killed
        if record.get("event") == kind:
            out.append(record)
    return out
