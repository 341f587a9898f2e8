"""One trial of a search, run inside Ray Tune: a whole ``clray train`` run whose
evaluations are reported to Tune, and what a trial's step count means.

Why the trial's Train run, not Tune, owns the checkpoints: Ray Train V2 already resumes
a run from its own storage when it is started again under the same name, which is what a
retried or resumed trial needs. Tune only gets a small pointer (run name and checkpoint
path) with each checkpointed report; PBT hands a trial another trial's pointer, and the
trial then starts a new Train run from that checkpoint with its own, perturbed, learning
rate and temperature (``run_training(start_from=..., adopt_config=True)``).

A trial's length is the one its run computed (``DataEvent.plan["total_steps"]``: rows
left after quarantine, capped by train.max_steps), sent to Tune with every result as
``TOTAL_STEPS``; whether a trial finished is judged against that (``trial_status``). The
driver's count from the corpus's Parquet footers (``trial_steps_bound``) counts raw rows,
so it can only bound a trial from above: it is ASHA's max_t and nothing else.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clray.jobs import events
from clray.jobs.config import JobConfig, validate
from clray.jobs.config.search import TRAIN_METRICS, TuneJob

TOTAL_STEPS = "total_steps"
"""The result key carrying the trial's own total steps, as its run computed them."""


def trial_status(error: str | None, step: int, total_steps: int | None) -> str:
    """ERROR, COMPLETE (the trial reached its own last step) or STOPPED (a scheduler ended
    it before). ``total_steps`` is what the trial reported (``TOTAL_STEPS``); a trial that
    reported none never got past its data, so it did not complete."""
    if error:
        return "ERROR"
    return "COMPLETE" if total_steps is not None and step >= total_steps else "STOPPED"


def trial_steps_bound(job: TuneJob) -> int | None:
    """An upper bound on one trial's steps, for ASHA's max_t, counted before any trial
    runs: raw rows from the corpus's Parquet footers (examples mode), capped by max_steps.
    Quarantined rows are still in it, so a trial may end below it and be complete."""
    cfg = validate(job.trial_raw({}), job.source)
    total = None
    if cfg.data.batches == "examples":
        from clray.pipelines import resolve_shards

        rows = _count_rows(resolve_shards(cfg.data.train, "data.train", cfg.storage), cfg)
        total = max(1, rows // cfg.train.global_batch_size) * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = cfg.train.max_steps if total is None else min(total, cfg.train.max_steps)
    return total


def _count_rows(files: list[str], cfg: JobConfig) -> int:
    import pyarrow.parquet as pq

    from clray.pipelines import storage

    fs, paths = storage.filesystem_for(files, cfg.storage)
    return sum(pq.read_metadata(p, filesystem=fs).num_rows for p in paths)


@contextmanager
def _pointer(run_name: str, trial_id: str, checkpoint: str, step: int) -> Iterator[Any]:
    """Tune's checkpoint for a trial: where its Train checkpoint is, not a copy of it. Its
    directory lasts while the block runs: ``tune.report`` persists a copy in the trial's
    storage before it returns (as ``jobs.run.checkpoint`` does for Train's checkpoints)."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="clray-tune-ptr-") as directory:
        Path(directory, "pointer.json").write_text(json.dumps(
            {"run_name": run_name, "trial_id": trial_id, "checkpoint": checkpoint, "step": step}
        ))
        yield tune.Checkpoint.from_directory(directory)


def _read_pointer(checkpoint: Any) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory, "pointer.json")
        return json.loads(path.read_text()) if path.exists() else None


class TrialReporter:
    """Turns a trial's run events into Tune results: every result carries the latest
    training figures, the step, the run name and the trial's own ``TOTAL_STEPS``; an
    evaluation at a checkpoint step waits for that checkpoint so its result can carry
    the pointer (what PBT copies and a retried trial resumes from)."""

    def __init__(self, job: TuneJob, run_uri: str, run_name: str, trial_id: str, checkpoint_every: int) -> None:
        self.run_uri, self.run_name, self.trial_id = run_uri, run_name, trial_id
        self.every = checkpoint_every
        self.metric_is_train = job.search.metric in TRAIN_METRICS
        self.latest_train: dict[str, float] = {}
        self.pending: dict[int, dict[str, Any]] = {}
        self.checkpointed: set[int] = set()
        self.total_steps: int | None = None
        self.final: dict[str, Any] = {}

    def send(self, step: int, metrics: dict[str, Any], done: bool = False) -> None:
        from ray import tune

        from clray.jobs.run.location import checkpoint_name  # imports the run package: torch
        from clray.pipelines import storage

        if not done and self.total_steps is not None and step >= self.total_steps:
            # The run's last result waits until the run has ended (export included) and goes
            # to Tune marked done: a scheduler acting on it could only stop or pause a trial
            # in its last seconds (PBT pauses a running trial whenever another waits), and
            # the restart would redo steps already trained.
            self.final.update(metrics, step=step)
            return
        result = {**self.latest_train, **metrics, "step": step, TOTAL_STEPS: self.total_steps,
                  "run_name": self.run_name, **({"done": True} if done else {})}
        if step in self.checkpointed:
            path = storage.join(self.run_uri, checkpoint_name(step))
            with _pointer(self.run_name, self.trial_id, path, step) as pointer:
                tune.report(result, checkpoint=pointer)
        else:
            tune.report(result)

    def on_event(self, record: dict[str, Any]) -> None:
        """The ``on_event`` callback of the trial's run."""
        event = events.parse(record)
        if isinstance(event, events.DataEvent):
            self.total_steps = int(event.plan["total_steps"])
        elif isinstance(event, events.TrainEvent):
            figures = {k: v for k, v in event.metrics.items() if isinstance(v, (int, float))}
            scalars = {"epoch": event.epoch, "samples_seen": event.samples_seen,
                       "temperature": event.temperature, "lr": event.lr}
            if event.logit_bias is not None:
                scalars["logit_bias"] = event.logit_bias
            self.latest_train.update(figures, **scalars)
            if self.metric_is_train:
                self.send(event.step, {})
        elif isinstance(event, events.EvalEvent) and not self.metric_is_train and event.step > 0:
            metrics: dict[str, Any] = {**event.figures, "epoch": event.epoch}
            expected = (self.every and event.step % self.every == 0) or event.step == self.total_steps
            if expected and event.step not in self.checkpointed:
                self.pending[event.step] = metrics  # report once the checkpoint of this step is saved
            else:
                self.send(event.step, metrics)
        elif isinstance(event, events.CheckpointEvent):
            self.checkpointed.add(event.step)
            if event.step in self.pending:
                self.send(event.step, self.pending.pop(event.step))

    def finish(self) -> None:
        """After the run returned: what still waits (the last result goes marked done)."""
        for step, metrics in sorted(self.pending.items()):
            self.send(step, metrics)
        if self.final:
            step = self.final.pop("step")
            self.send(step, self.final, done=True)


def _trial_config(job: TuneJob, params: dict[str, Any], trial_id: str) -> tuple[JobConfig, str | None, bool]:
    """The trial's training config, where its run starts from and whether it adopts its
    own lr and temperature there (a PBT exploit)."""
    from ray import tune

    from clray.pipelines import storage

    trials_dir = storage.join(job.search_uri, "trials")
    raw = job.trial_raw(params)
    raw.setdefault("run", {})["output_dir"] = trials_dir
    # Trials start from the same model: one baseline evaluation per trial would repeat it.
    raw.setdefault("train", {}).setdefault("eval_at_start", False)
    if job.search.scheduler == "pbt":
        # PBT copies states at its decisions: checkpoint at every evaluation.
        raw.setdefault("train", {})["checkpoint_every"] = raw.get("train", {}).get("eval_every", 0)

    pointer = _read_pointer(tune.get_checkpoint())
    exploit = pointer is not None and pointer["trial_id"] != trial_id
    start_from = None
    if exploit:
        # PBT exploit: a new Train run of this trial starting from the donor's state.
        generation = 1
        while storage.exists(storage.join(trials_dir, f"{trial_id}-{generation}"), job.base.storage):
            generation += 1
        run_name, start_from = f"{trial_id}-{generation}", pointer["checkpoint"]
    elif pointer is not None:
        # Resume this trial's own run at the state the scheduler saw: Ray Train may not have
        # registered that checkpoint yet when Tune stopped the trial (a PBT pause).
        run_name, start_from = pointer["run_name"], pointer["checkpoint"]
    else:
        run_name = trial_id  # a fresh trial, or a restart that Train resumes from its own storage
    raw["run"]["name"] = run_name
    return validate(raw, job.source), start_from, exploit


def run_trial(params: dict[str, Any], job: TuneJob) -> None:
    """One trial: a whole clray training run, its evaluations reported to Tune."""
    from ray import tune

    from clray.jobs.run import run_training

    trial_id = tune.get_context().get_trial_id()
    # Tune moves each trial into a directory of its own; a trial is a `clray train`, whose
    # relative paths (data, pretrained towers, tokenizers) mean the working directory it
    # was started from, as the driver's checks read them. Tune records that directory.
    started_in = os.environ.get("TUNE_ORIG_WORKING_DIR")
    if started_in and os.path.isdir(started_in):
        os.chdir(started_in)
    cfg, start_from, exploit = _trial_config(job, params, trial_id)
    reporter = TrialReporter(job, cfg.run_uri, cfg.run.name, trial_id, cfg.train.checkpoint_every)
    # No run lock: Tune alone starts a trial's run, and a trial it restarts on another
    # node could not tell whether the lock of the killed attempt is stale.
    run_training(cfg, on_event=reporter.on_event, start_from=start_from, adopt_config=exploit, lock=False)
    reporter.finish()
