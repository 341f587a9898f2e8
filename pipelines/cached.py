"""A cached training set read by each worker straight from the object store.

With ``data.cache`` the preprocessed training set is materialised once on the driver
(``pipelines.dataset``). Streaming that set through Ray Train's split every epoch costs
a split coordinator restart per epoch (100-150 ms in which both ranks wait, on a 2-core
machine, where a quickstart epoch is 11 steps of about 110 ms) and an actor round trip
per block. A cached set needs neither: the driver hands every worker the object refs of
its blocks (``CachedSet``), every rank computes the same order of the epoch from
``(run.seed, epoch)`` and takes its own rows of it, with numpy.

The order of an epoch (``epoch_order``), by ``data.shuffle``:

- none: the blocks in the order they were materialised (file order with
  ``data.deterministic``), their rows in order;
- local: the blocks in a random order, and the rows shuffled within windows of
  ``data.shuffle_buffer`` rows per rank (every rank's shuffle buffer together);
- global: a random permutation of all rows.

Step ``s`` of the epoch trains rows ``order[s*G:(s+1)*G]`` (``G`` the global batch) and
rank ``r`` the ``r``-th local batch of them: a global batch is a run of the epoch's order,
as one process would read it. The rows after the last full global batch are not trained
in that epoch (which ones, changes with the shuffle), as with Ray's split.

The order depends on the seed, the epoch and the blocks' order only: with
``data.deterministic`` (blocks materialised in file order) a resumed run replays it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CachedSet:
    """What the driver hands the workers: the cached training set's blocks, by object ref,
    in the order they were materialised."""

    refs: list[Any]
    """``ObjectRef[pyarrow.Table]`` of every block (``Dataset.to_arrow_refs``)."""
    num_rows: int


def cached_set(dataset: Any) -> CachedSet:
    """The blocks of a materialised Ray Dataset (zero copy: they stay in the object store)."""
    return CachedSet(refs=dataset.to_arrow_refs(), num_rows=dataset.count())  # [ray]


@dataclass
class CachedRows:
    """A worker's view of a ``CachedSet``: each block's columns as numpy arrays (views of
    the object store where Arrow allows it) and where each block starts in the set."""

    blocks: list[dict[str, np.ndarray]]
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        sizes = [len(next(iter(block.values()))) if block else 0 for block in self.blocks]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    @classmethod
    def load(cls, cached: CachedSet) -> CachedRows:
        import ray
        from ray.data.block import BlockAccessor

        tables = ray.get(list(cached.refs))  # [ray]
        blocks = [BlockAccessor.for_block(table).to_numpy() for table in tables if table.num_rows]  # [ray]
        rows = cls(blocks)
        if rows.num_rows != cached.num_rows:
            raise RuntimeError(f"the cached training set holds {rows.num_rows} rows, the driver counted "
                               f"{cached.num_rows}: its blocks changed after the driver built them")
        return rows

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at positions ``rows`` of the set, in that order, as one numpy batch."""
        blocks = np.searchsorted(self.offsets, rows, side="right") - 1
        local = rows - self.offsets[blocks]
        first = int(blocks[0])
        if (blocks == first).all():
            return {key: value[local] for key, value in self.blocks[first].items()}
        order = np.argsort(blocks, kind="stable")
        present, starts = np.unique(blocks[order], return_index=True)
        groups = np.split(order, starts[1:])
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return {key: np.concatenate([self.blocks[b][key][local[g]] for b, g in zip(present, groups, strict=True)])[back]
                for key in self.blocks[first]}


def epoch_order(offsets: np.ndarray, shuffle: str, window: int, seed: int, epoch: int) -> np.ndarray:
    """Every row position of the set in the order epoch ``epoch`` reads them (see the
    module's doc); ``offsets``: where each block starts, the total last; ``window``: rows
    shuffled together under ``shuffle = "local"``."""
    num_rows = int(offsets[-1])
    rng = np.random.default_rng([seed, epoch])
    if shuffle == "global":
        return rng.permutation(num_rows)
    if shuffle == "none":
        return np.arange(num_rows)
    blocks = [np.arange(offsets[b], offsets[b + 1]) for b in rng.permutation(len(offsets) - 1)]
    order = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
    for start in range(0, num_rows, window):
        order[start:start + window] = rng.permutation(order[start:start + window])
    return order


def rank_rows(order: np.ndarray, steps: int, local_batch: int, world: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s rows of an epoch's ``order``, step by step: of each global batch
    (``world`` local batches in a row), the ``rank``-th local batch."""
    trained = order[:steps * local_batch * world].reshape(steps, world, local_batch)
    return trained[:, rank, :].reshape(-1)


class CachedEpochs:
    """The batches of each epoch for one rank (``Worker`` reads them as it reads a shard)."""

    def __init__(self, cached: CachedSet, *, shuffle: str, shuffle_buffer: int, seed: int, steps_per_epoch: int,
                 local_batch: int, world: int, rank: int) -> None:
        self.rows = CachedRows.load(cached)
        self.shuffle, self.seed = shuffle, seed
        self.window = shuffle_buffer * world
        self.steps, self.local_batch, self.world, self.rank = steps_per_epoch, local_batch, world, rank

    def rows_of(self, epoch: int) -> np.ndarray:
        order = epoch_order(self.rows.offsets, self.shuffle, self.window, self.seed, epoch)
        return rank_rows(order, self.steps, self.local_batch, self.world, self.rank)

    def batches(self, epoch: int, collate: Any, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's local batches of ``epoch`` from step ``start_step`` on, collated."""
        rows = self.rows_of(epoch)
        for step in range(start_step, self.steps):
            yield collate(self.rows.take(rows[step * self.local_batch:(step + 1) * self.local_batch]))

    def windows(self, epoch: int, window: int) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows of ``epoch`` as numpy batches of ``window`` rows
        (``data.group_by_length`` cuts them into batches)."""
        rows = self.rows_of(epoch)
        for start in range(0, len(rows), window):
            yield self.rows.take(rows[start:start + window])
