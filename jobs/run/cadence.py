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
from clray.jobs.run.schedule import Schedule


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

    def after(self, step: int, stop: bool = False) -> StepActions:
        """``stop``: a stop request every rank has agreed on for this step (an all-reduced
        flag, so no rank checkpoints or leaves the loop alone)."""
        final = step == self.schedule.end_step or stop
        # The final step of a complete run is evaluated once, after the loop (end()).
        evaluate = (self.has_eval and every(step, self.train.eval_every)
                    and not (final and step >= self.schedule.total_steps))
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
        return self.has_eval and step >= self.schedule.total_steps
