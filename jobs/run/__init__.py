"""One training run: the driver (``run_training``), the loop every worker runs, its
engine, evaluation, checkpoints and the run directory, and re-mining between epochs.

Commands (train, tune, submit, eval) build on this package; it builds on the ground
floor (``jobs.config``, ``jobs.runtime``) and on ``pipelines`` and ``models``.
"""

from clray.jobs.run.driver import TrainSummary, run_training
from clray.jobs.run.errors import RunError, RunStopped, TrainingError
from clray.jobs.run.remine import run_with_remining

__all__ = ["RunError", "RunStopped", "TrainSummary", "TrainingError", "run_training", "run_with_remining", "train"]


def train(cfg, *, verbose: bool = False, on_event=None) -> TrainSummary:  # noqa: ANN001
    """What ``clray train`` runs: one run, re-mining between epochs when the config asks."""
    runner = run_with_remining if cfg.remine.every_epochs else run_training
    return runner(cfg, verbose=verbose, on_event=on_event)
