"""When a training step is followed by an evaluation, a log line, a checkpoint or a
report to Ray.

Evaluation, checkpointing and (under ZeRO-3) even a metrics reduction are collectives:
if one rank took a branch another skipped, both would wait for ever. So the decision is
made here, from the step number and the schedule alone, which every rank has in common;
the worker loop only asks and does what it is told.
"""

from __future__ import annotations

from dataclasses import dataclass

from clray.jobs.config import TrainConfig
from clray.jobs.run.schedule import Schedule, TrainState


def every(step: int, interval: int) -> bool:
    """True on every ``interval``-th step; never when the interval is 0 (off)."""
    return bool(interval) and step % interval == 0


@dataclass(frozen=True)
class StepActions:
    """What the step just taken ends with, in this order."""

    evaluate: bool
    """Evaluate on data.eval now (a mid-run evaluation, train.eval_every)."""
    log: bool
    """Reduce and publish the training metrics of the steps since the last log."""
    checkpoint: bool
    """Save a checkpoint (and report it to Ray with the metrics)."""
    report: bool
    """Report the metrics to Ray without a checkpoint."""
    stop: bool = False
    """A stop was requested (Ctrl-C, SIGTERM): checkpoint here, then end this start."""


class Cadence:
    """The one place that decides, per step, what every rank does after it."""

    def __init__(self, train: TrainConfig, schedule: Schedule, has_eval: bool) -> None:
        self.train = train
        self.schedule = schedule
        self.has_eval = has_eval

    @property
    def selects(self) -> bool:
        """Whether evaluations pick the export (train.select_by)."""
        return self.has_eval and self.train.select_by is not None

    def evaluate_at_start(self, step: int) -> bool:
        """The baseline: the starting model of a fresh run (not a resumed one)."""
        return self.has_eval and self.train.eval_at_start and step == 0

    def after(self, step: int, stop: bool = False) -> StepActions:
        """``stop``: a stop request every rank has agreed on for this step (an all-reduced
        flag, so no rank checkpoints or leaves the loop alone)."""
        final = step == self.schedule.end_step or stop
        last = step == self.schedule.end_step and step >= self.schedule.total_steps
        # The last step of a complete run is evaluated once: after the loop
        # (evaluate_at_end), or, when evaluations pick the export, here, so its checkpoint
        # and the choice of the best state see it like any other evaluation.
        evaluate = self.has_eval and ((every(step, self.train.eval_every) and not last) or (last and self.selects))
        # The final step always checkpoints, so a finished run (or one resumed at its end,
        # which takes no step at all) always has its last state saved.
        checkpoint = final or every(step, self.train.checkpoint_every)
        return StepActions(
            evaluate=evaluate and not stop,
            log=final or step % self.train.log_every == 0,
            checkpoint=checkpoint,
            report=not checkpoint and (evaluate or every(step, self.train.report_every)),
            stop=stop,
        )

    def evaluate_at_end(self, step: int) -> bool:
        """A run that reached its last step is evaluated once more at the end; a start that
        stopped early (schedule.stop_step) is evaluated when a later start completes it."""
        return self.has_eval and step >= self.schedule.total_steps and not self.selects


class Selection:
    """The best evaluated state so far by train.select_by, kept in the train state (every
    rank computes the same figures from the same weights, so every rank agrees on it)."""

    def __init__(self, train: TrainConfig) -> None:
        self.metric = train.select_by
        self.sign = 1.0 if train.select_mode == "max" else -1.0

    def consider(self, state: TrainState, figures: dict[str, float]) -> bool:
        """Record an evaluation of the current state; True when it is the best so far."""
        if self.metric is None or self.metric not in figures:
            return False
        value = float(figures[self.metric])
        if state.best_value is not None and self.sign * value <= self.sign * state.best_value:
            return False
        state.best_value, state.best_step = value, state.step
        return True
