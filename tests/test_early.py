"""The first epoch's batches started ahead (jobs.run.early.EarlyStart): the first batch is
fetched at once on a thread, the batches come out unchanged and in order, and an error of
the data path is raised on the iterating thread with its own type."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from clray.jobs.run.early import EarlyStart
from clray.jobs.run.schedule import TrainState


def test_first_batch_is_fetched_before_iteration_then_all_follow_in_order() -> None:
    fetched = threading.Event()
    threads: list[str] = []

    def batches() -> Iterator[dict[str, int]]:
        for i in range(4):
            threads.append(threading.current_thread().name)
            fetched.set()
            yield {"i": i}

    early = EarlyStart(batches(), TrainState())
    assert fetched.wait(10), "the first batch was not fetched before anyone iterated"
    assert [b["i"] for b in early] == [0, 1, 2, 3]
    assert threads[0] == "clray-first-batch"
    assert set(threads[1:]) == {threading.current_thread().name}


def test_an_error_of_the_first_fetch_is_raised_when_iterating() -> None:
    class ShardBroken(RuntimeError):
        pass

    def batches() -> Iterator[dict[str, int]]:
        raise ShardBroken("rank 0: the shard ran out")
        yield {}

    early = EarlyStart(batches(), TrainState())
    with pytest.raises(ShardBroken, match="ran out"):
        list(early)


def test_an_empty_epoch_yields_nothing() -> None:
    assert list(EarlyStart(iter([]), TrainState())) == []
