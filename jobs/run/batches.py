"""How a training worker reads its batches, epoch by epoch (``Worker`` is one of these):
its shard of Ray Train's split, the cached training set it reads itself
(``pipelines.cached``), the rows a resumed epoch has left (``ingest.RESUME``), or its
part of each mined global batch; the first batch of an epoch may be fetched ahead
(``start_early``). Every rank takes exactly ``steps_per_epoch`` batches of an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from clray.jobs.run.early import EarlyStart
from clray.jobs.run.engine import cast_batch
from clray.jobs.run.ingest import RESUME, TRAIN
from clray.jobs.run.schedule import TrainState


class ShardExhaustedError(RuntimeError):
    pass


class PlanOrderError(RuntimeError):
    """A rank's packed batch is not the step's global batch: training it would mix batches."""


class EpochBatches:
    """The batch-reading half of ``Worker``; it relies on the worker's ``spec``, ``cfg``,
    ``schedule``, ``rank``, ``world``, ``device``, ``bf16``, ``shards``, ``plans``,
    ``remainder_epoch``, ``early`` and ``cached``."""

    spec: Any
    cfg: Any
    schedule: Any
    rank: int
    world: int
    device: torch.device
    bf16: bool
    shards: dict[str, Any]
    plans: Any
    remainder_epoch: int | None
    early: EarlyStart | None
    cached: Any

    def start_early(self, state: TrainState) -> None:
        """Start the epoch ``state`` is in now, on a thread: the first ``next`` of an epoch
        waits for Ray Data's split to start (its coordinator, the first blocks read and
        preprocessed, the first batch collated), 3-4 s on a 2-core machine, which then
        overlaps the engine's build and the baseline evaluation instead of following
        them. Not with remine.overlap, whose epoch plan is chosen at the epoch's start."""
        if self.spec.board is None and self.early is None and state.step < self.schedule.end_step:
            self.early = EarlyStart(self.epoch_batches(state), state)

    def batches(self, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
        """``epoch_batches``, taking the ones ``start_early`` started when they are this
        epoch's (a started iterator is never re-read: the shard's epoch is one pass)."""
        early, self.early = self.early, None
        if early is not None and early.state is state:
            return iter(early)
        return self.epoch_batches(state)

    def epoch_batches(self, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
        """This epoch's remaining local batches, exactly ``steps_per_epoch - step_in_epoch``
        of them; after the last, the shard's remainder (under one batch) is drained so
        the next epoch starts clean."""
        if self.spec.packed is not None:
            yield from self._global_batches(state)
            return
        remainder = state.epoch == self.remainder_epoch
        self.remainder_epoch = None
        name = RESUME if remainder else self.schedule.train_dataset(state.epoch)
        if name == TRAIN and self.spec.cached is not None:
            batches, skip = self._cached(state)
        else:
            if name not in self.shards:
                import ray.train

                self.shards[name] = ray.train.get_dataset_shard(name)  # [ray]
            batches = self._iterate(self.shards[name], state.epoch)
            # A mid-epoch resume: the epoch's first batches were trained. The remainder dataset
            # holds only the rows they did not take; the full one replays the same order
            # (data.deterministic) and skips them.
            skip = 0 if remainder else state.step_in_epoch
        for _ in range(skip):
            self._next(batches, state)
        while state.step_in_epoch < self.schedule.steps_per_epoch and state.step < self.schedule.end_step:
            yield cast_batch(self._next(batches, state), self.bf16)
        if state.step_in_epoch >= self.schedule.steps_per_epoch:
            for _ in batches:
                pass

    def _global_batches(self, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's part of each remaining global batch of the epoch's plan, in step
        order: read from ``step_in_epoch`` on (a mid-epoch resume reads no trained batch),
        and each batch's plan index checked against the step, so a rank can never train
        a part of another step's batch."""
        import ray.data

        from clray.pipelines.collate import training_collate
        from clray.pipelines.unpack import rank_dataset

        spec = self.plans.current
        workers = self.cfg.scaling.num_workers
        plan_index = self.plans.index(state.epoch)
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # [ray]
        dataset = rank_dataset(spec, plan_index, self.rank, workers, start_step=state.step_in_epoch)
        rows = dataset.iter_torch_batches(batch_size=1, prefetch_batches=self.cfg.data.prefetch_batches,
                                          device=self.device, collate_fn=training_collate(self.cfg.data))  # [ray]
        batches = ({key: value[0] for key, value in batch.items()} for batch in rows)
        while state.step_in_epoch < self.schedule.steps_per_epoch and state.step < self.schedule.end_step:
            batch = self._next(batches, state)
            index = int(batch.pop("plan_batch"))
            if index != state.step_in_epoch:
                raise PlanOrderError(
                    f"rank {self.rank}: step {state.step_in_epoch} of epoch {state.epoch} got batch {index} of plan "
                    f"{plan_index} ({spec.plan.directory}); every rank must train part {self.rank} of batch "
                    f"{state.step_in_epoch} in this step. The plan's files are out of batch order: mine again"
                )
            yield cast_batch(batch, self.bf16)

    def _iterate(self, shard: Any, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        from clray.pipelines.collate import training_collate  # imports Ray Data

        data = self.cfg.data
        if self.schedule.packed:
            # One row per mined batch: taken whole, never re-batched or shuffled here; each
            # torch batch is [1, B, ...], the 1 dropped.
            rows = shard.iter_torch_batches(batch_size=1, drop_last=True, prefetch_batches=data.prefetch_batches,
                                            device=self.device, collate_fn=training_collate(data))  # [ray]
            return ({key: value[0] for key, value in batch.items()} for batch in rows)
        if data.group_by_length:
            return self._length_grouped(shard, epoch)
        return iter(shard.iter_torch_batches(  # [ray]
            batch_size=self.cfg.local_batch_size,
            drop_last=True,
            local_shuffle_buffer_size=self.schedule.local_shuffle_buffer,
            # data.deterministic: the same buffer order every run, a new one each epoch
            local_shuffle_seed=self._epoch_seed(epoch) if data.deterministic else None,
            prefetch_batches=data.prefetch_batches,
            device=self.device,
            collate_fn=training_collate(data),  # dynamic padding: each batch cut to its longest row
        ))

    def _cached(self, state: TrainState) -> tuple[Iterator[dict[str, torch.Tensor]], int]:
        """The epoch's batches from the cached training set (``pipelines.cached``), and how
        many of them the caller still skips (a mid-epoch resume replays the same order:
        plain batches start at the resumed step, length-grouped ones are skipped)."""
        from clray.pipelines.cached import CachedEpochs
        from clray.pipelines.collate import training_collate

        data = self.cfg.data
        if self.cached is None:
            self.cached = CachedEpochs(self.spec.cached, shuffle=data.shuffle, shuffle_buffer=data.shuffle_buffer,
                                       seed=self.cfg.run.seed, steps_per_epoch=self.schedule.steps_per_epoch,
                                       local_batch=self.cfg.local_batch_size, world=self.world, rank=self.rank)
        if data.group_by_length:
            windows = self.cached.windows(state.epoch, self._group_window())
            return self._grouped(windows, state.epoch, deterministic=True), state.step_in_epoch
        collate = training_collate(data)
        batches = self.cached.batches(state.epoch, collate, start_step=state.step_in_epoch)
        return (self._to_device(batch) for batch in batches), 0

    def _epoch_seed(self, epoch: int) -> int:
        """This rank's seed for epoch ``epoch``: its shuffle buffer and length groups."""
        return self.cfg.run.seed * 100_003 + epoch * 101 + self.rank

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {key: value.to(self.device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}

    def _group_window(self) -> int:
        size = self.cfg.local_batch_size
        return max(size, self.cfg.data.shuffle_buffer // size * size)

    def _length_grouped(self, shard: Any, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """data.group_by_length: whole shuffle windows (data.shuffle_buffer rows, shuffled
        as usual) are taken from Ray and cut into batches of similar-length rows here
        (``pipelines.length_groups``), then padded to each batch's longest row."""
        data = self.cfg.data
        windows = shard.iter_batches(  # [ray]
            batch_size=self._group_window(), batch_format="numpy", drop_last=False,
            local_shuffle_buffer_size=self.schedule.local_shuffle_buffer,
            local_shuffle_seed=self._epoch_seed(epoch) if data.deterministic else None,
            prefetch_batches=1,
        )
        return self._grouped(windows, epoch, deterministic=data.deterministic)

    def _grouped(self, windows: Iterator[dict[str, np.ndarray]], epoch: int,
                 deterministic: bool) -> Iterator[dict[str, torch.Tensor]]:
        from clray.pipelines.collate import training_collate
        from clray.pipelines.length_groups import length_grouped_batches

        collate = training_collate(self.cfg.data)
        rng = np.random.default_rng(self._epoch_seed(epoch) if deterministic else None)
        for batch in length_grouped_batches(windows, self.cfg.local_batch_size, rng):
            yield self._to_device(collate(batch))

    def _next(self, batches: Iterator[dict[str, torch.Tensor]], state: TrainState) -> dict[str, torch.Tensor]:
        try:
            return next(batches)
        except StopIteration:
            raise ShardExhaustedError(
                f"rank {self.rank}: the data shard ran out after {state.step_in_epoch} of "
                f"{self.schedule.steps_per_epoch} batches in epoch {state.epoch}; the corpus changed since "
                "the driver counted it, or rows were lost in preprocessing"
            ) from None
