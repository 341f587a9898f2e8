"""The training data of each start of the workers, resumed at the right place.

Ray Data shuffles an epoch with a seed made of ``run.seed`` and how many times the
dataset has been executed (its context's ``_execution_idx``; see ``jobs.runtime.
RAY_KNOBS``), a counter that starts at 0 in every new driver and every new split
coordinator. Left alone, a run resumed in epoch e would shuffle like epoch 0. So the
training dataset is handed to Ray Train as a callable (Ray calls it in its controller
each time it starts the worker group, the first time and after every failure): it finds
the checkpoint the workers are about to restore (``jobs.run.resume.resume_point``) and
sets the counter to that epoch, so every epoch is ordered as a function of (seed,
epoch) alone.

Where the order of the resumed epoch is not reproducible (without
``data.deterministic``, or with another worker count), skipping the epoch's first
batches would train different rows; instead the checkpoint records the ids of the rows
each rank trained in the epoch (``commit.read_consumed``), and the resumed epoch reads
``train_resume``: the same rows without those, with its own remaining step count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clray.jobs.run.commit import read_consumed
from clray.jobs.run.resume import ResumePoint, resume_point
from clray.pipelines.storage import StorageConfig

if TYPE_CHECKING:
    import ray.data

TRAIN = "train"
RESUME = "train_resume"
"""The rows of a resumed epoch that its first part did not train (examples mode)."""


def reads_remainder(point: ResumePoint | None, world_size: int, deterministic: bool) -> bool:
    """Whether the epoch a start resumes in reads ``RESUME`` (the rows not yet trained)
    instead of skipping the batches it already trained: when the epoch is resumed in its
    middle and its order cannot be replayed (no ``data.deterministic``, or another worker
    count, which splits the rows differently)."""
    if point is None:
        return False
    _, step_in_epoch = point.position()
    return step_in_epoch > 0 and (not deterministic or point.commit.world_size != world_size)


def drop_rows(batch: dict[str, np.ndarray], consumed: np.ndarray) -> dict[str, np.ndarray]:
    """A batch without the rows whose ``id_key`` is in ``consumed`` (sorted)."""
    keep = ~np.isin(batch["id_key"], consumed, assume_unique=False)
    return {key: value[keep] for key, value in batch.items()}


@dataclass
class ResumableTrain:
    """Everything the controller needs to place the training data where the workers resume."""

    dataset: Any
    """The examples-mode training dataset as the driver built it."""
    base_index: int
    """Its execution counter as built: epoch 0 runs with this value, epoch e with base + e."""
    run_uri: str
    start_from: str | None
    storage: StorageConfig | None
    world_size: int
    deterministic: bool
    task_cpus: float

    @classmethod
    def of(cls, dataset: ray.data.Dataset, **kwargs: Any) -> ResumableTrain:
        return cls(dataset=dataset, base_index=dataset.context._execution_idx, **kwargs)  # [ray] private, see RAY_KNOBS

    def _point(self) -> ResumePoint | None:
        return resume_point(self.run_uri, self.start_from, self.storage)

    def train(self) -> ray.data.Dataset:
        """``TRAIN``, positioned so that its next execution is the resumed epoch's (or the
        next epoch's, when the resumed epoch reads ``RESUME``)."""
        point = self._point()
        epoch = 0
        if point is not None:
            epoch, _ = point.position()
            if reads_remainder(point, self.world_size, self.deterministic):
                epoch += 1
        self.dataset.context._execution_idx = self.base_index + epoch  # [ray] private, see RAY_KNOBS
        return self.dataset

    def remainder(self) -> ray.data.Dataset:
        """``RESUME``: the resumed epoch's rows that its trained part did not take."""
        point = self._point()
        if not reads_remainder(point, self.world_size, self.deterministic):
            return self.dataset  # never read: the workers skip instead, or start an epoch afresh
        assert point is not None
        consumed = read_consumed(point.uri, point.commit, self.storage)
        epoch, _ = point.position()
        self.dataset.context._execution_idx = self.base_index + epoch  # [ray] private, see RAY_KNOBS
        return self.dataset.map_batches(drop_rows, fn_kwargs={"consumed": consumed}, batch_format="numpy",
                                        num_cpus=self.task_cpus)


class TrainData:
    """Ray Train's ``datasets[TRAIN]``: called by its controller at every worker-group start."""

    def __init__(self, source: ResumableTrain) -> None:
        self.source = source

    def __call__(self) -> ray.data.Dataset:
        return self.source.train()


class RemainderData:
    """Ray Train's ``datasets[RESUME]``: called by its controller at every worker-group start."""

    def __init__(self, source: ResumableTrain) -> None:
        self.source = source

    def __call__(self) -> ray.data.Dataset:
        return self.source.remainder()
