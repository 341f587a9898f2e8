"""What a training run tells its driver, as one typed definition per event.

Rank 0 produces the events (``jobs.run.worker``), the driver stamps them with a time and
appends them to ``metrics.jsonl`` (``jobs.run.driver``), and the consumers read them
back: the CLI's progress view (``jobs.views``), a search trial (``jobs.tune``), the
run summary. On the wire and on disk an event is a flat JSON record,
``{"event": KIND, ...fields}``; ``record()`` writes it and ``parse()`` reads it, so a
field renamed here is renamed for producer and consumers at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(kw_only=True)
class Event:
    kind: ClassVar[str] = ""
    time: float | None = None
    """Seconds since the epoch, stamped by the driver when the event arrived."""

    def record(self) -> dict[str, Any]:
        """The flat JSON record (what ``on_event`` callbacks and metrics.jsonl get)."""
        out: dict[str, Any] = {} if self.time is None else {"time": self.time}
        out["event"] = self.kind
        for f in dataclasses.fields(self):
            if f.name == "time":
                continue
            value = getattr(self, f.name)
            if f.name == "metrics":
                out.update(value)
            elif not (f.name == "logit_bias" and value is None):
                out[f.name] = value
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Event:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in record.items() if k in names and k != "metrics"}
        if "metrics" in names:
            known["metrics"] = {k: v for k, v in record.items() if k not in names and k != "event"}
        return cls(**known)


@dataclass(kw_only=True)
class DataEvent(Event):
    """The driver settled the data: how many rows and steps, what was quarantined."""

    kind: ClassVar[str] = "data"
    plan: dict[str, Any]
    """The run's schedule (``Schedule`` as a dict): steps_per_epoch, total_steps, ..."""
    quarantined: int
    quarantine_path: str | None
    reasons: dict[str, int]
    packed: dict[str, Any] | None = None
    """Packed runs: the plan directory, its epoch plans and the batches skipped."""

    def record(self) -> dict[str, Any]:
        out = super().record()
        if self.packed is None:
            out.pop("packed")
        return out


@dataclass(kw_only=True)
class ResumedEvent(Event):
    kind: ClassVar[str] = "resumed"
    step: int
    epoch: int
    step_in_epoch: int
    dataset: str
    checkpoint: str = ""
    """The checkpoint restored (its directory name)."""


@dataclass(kw_only=True)
class AdoptedEvent(Event):
    """A run started from another run's checkpoint took its own lr and temperature."""

    kind: ClassVar[str] = "adopted"
    lr: float
    temperature: float


@dataclass(kw_only=True)
class TrainEvent(Event):
    """Training metrics of the steps since the last one, averaged over steps and ranks."""

    kind: ClassVar[str] = "train"
    metrics: dict[str, float]
    """loss, accuracy, pos_sim, neg_sim, samples_per_s, data_wait_fraction, ... (and the
    evaluation's figures when this step also evaluated)."""
    step: int
    epoch: int
    samples_seen: int
    temperature: float
    logit_bias: float | None = None
    lr: float


@dataclass(kw_only=True)
class EvalEvent(Event):
    """An evaluation on data.eval: ``metrics`` holds eval_rows and the eval/... figures."""

    kind: ClassVar[str] = "eval"
    step: int
    epoch: int
    metrics: dict[str, Any]
    histograms: dict[str, Any] | None = None
    """Cosine similarity histograms of the positive pairs and the negatives
    (``models.metrics.Geometry.histogram``: edges, positive, negative), which the run
    report compares between the first and the last evaluation."""

    def record(self) -> dict[str, Any]:
        out = {**({} if self.time is None else {"time": self.time}), "event": self.kind, "step": self.step,
               "epoch": self.epoch, **self.metrics}
        if self.histograms is not None:
            out["histograms"] = self.histograms
        return out

    @property
    def figures(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.items() if k.startswith("eval/")}


@dataclass(kw_only=True)
class CheckpointEvent(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int


@dataclass(kw_only=True)
class EndEvent(Event):
    """Training stopped at ``step``; ``complete`` when that is the run's last step."""

    kind: ClassVar[str] = "end"
    step: int
    epoch: int
    complete: bool
    stopped: bool = False
    """The run stopped on request (Ctrl-C, SIGTERM) after checkpointing ``step``."""


@dataclass(kw_only=True)
class FailureEvent(Event):
    """A worker failed and Ray Train handled it: ``retrying`` when it restarts the workers
    from the last complete checkpoint (the next ``resumed`` event says at which step)."""

    kind: ClassVar[str] = "failure"
    rank: int
    error: str
    died: bool
    """The worker process was lost (killed, out of memory, node gone), not an exception."""
    failures: int
    max_failures: int
    retrying: bool
    ranks: dict[str, str] | None = None
    """Every failed rank's error (the blamed one's and the collateral ones), for the log."""


@dataclass(kw_only=True)
class WarningEvent(Event):
    """Something the user should know that does not stop the run (a checkpoint skipped,
    files ignored in a shard directory, Ray's registry moved aside)."""

    kind: ClassVar[str] = "warning"
    message: str


@dataclass(kw_only=True)
class ExportedEvent(Event):
    kind: ClassVar[str] = "exported"
    path: str
    step: int | None = None
    """The state exported: the last step, or with train.select_by the best one."""


@dataclass(kw_only=True)
class RemineEvent(Event):
    """A re-mining run stopped after ``epoch`` epochs to mine a new plan (or, with
    ``overlap``, exported the teacher to mine with beside the training)."""

    kind: ClassVar[str] = "remine"
    epoch: int
    teacher: str
    overlap: bool = False
    """remine.overlap: the workers exported the teacher and train on; the mining runs beside."""


@dataclass(kw_only=True)
class ReminedEvent(Event):
    kind: ClassVar[str] = "remined"
    epoch: int
    plan: str
    statistics: dict[str, Any]
    overlap: bool = False
    """remine.overlap: mined beside the training, trained from ``epoch`` on."""


@dataclass(kw_only=True)
class PlanEvent(Event):
    """remine.overlap: the plan the workers train on from ``epoch`` (mined at boundary
    ``mined_at``; None: the run's first plan), and how long they waited for it."""

    kind: ClassVar[str] = "plan"
    epoch: int
    plan: str
    mined_at: int | None
    waited_s: float


EVENTS: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (DataEvent, ResumedEvent, AdoptedEvent, TrainEvent, EvalEvent, CheckpointEvent, EndEvent,
                FailureEvent, WarningEvent, ExportedEvent, RemineEvent, ReminedEvent, PlanEvent)
}


def parse(record: dict[str, Any]) -> Event:
    """A record (from metrics.jsonl or an ``on_event`` callback) as its typed event."""
    kind = record.get("event")
    if kind not in EVENTS:
        raise ValueError(f"unknown run event {kind!r}; known: {', '.join(EVENTS)}")
    return EVENTS[kind].from_record(record)
