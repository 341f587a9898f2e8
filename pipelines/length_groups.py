"""Length-grouped batches (``data.group_by_length``): rows of similar token length together.

With dynamic padding a batch costs what its longest row costs, so a batch of one long
and 31 short texts pays for 32 long ones. Sorting the rows of each shuffle window by
length and cutting the sorted run into batches makes the rows of a batch nearly equally
long, and the padding almost vanishes. The batch order is then shuffled within the
window, so training does not sweep from short to long texts.

What it costs: a batch is no longer a random sample of the corpus. Its in-batch
negatives are texts of about the anchor's own length, which removes length as a cue
that tells a positive from a negative (harder negatives), but also means an anchor never
meets negatives of other lengths in the same step: on a corpus where length correlates
with topic, the negatives are also more alike in topic. That is why it is opt-in.

Numpy only; the worker feeds it the numpy batches Ray hands over.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from clray.models.preprocess import MASK_SUFFIX, text_lengths


def row_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Tokens per row over all of the batch's text views (anchor, positive, hard
    negatives): what a row adds to the work of whichever batch it lands in."""
    rows = len(next(iter(batch.values())))
    total = np.zeros(rows, dtype=np.int64)
    for key in batch:
        if key.endswith(MASK_SUFFIX):
            total += text_lengths(batch, key[: -len(MASK_SUFFIX)])
    return total


def _take(batch: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {key: value[index] for key, value in batch.items()}


def _concat(first: dict[str, np.ndarray] | None, second: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if first is None:
        return second
    return {key: np.concatenate([first[key], second[key]]) for key in second}


def length_grouped_batches(
    windows: Iterable[dict[str, np.ndarray]], batch_size: int, rng: np.random.Generator
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of exactly ``batch_size`` rows from ``windows`` (numpy batches of any
    size, e.g. one shuffle window each), rows of similar length together.

    Per window: the rows that do not fill a whole batch are drawn at random and carried
    into the next window (so no row is lost but the last remainder, under one batch);
    the others are sorted by ``row_lengths`` (ties in random order), cut into batches,
    and the batches yielded in random order. Every row is yielded at most once, and all
    but fewer than ``batch_size`` of them exactly once: the same number of batches a
    plain ``drop_last`` iteration gives, which the run's step count relies on.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    carry: dict[str, np.ndarray] | None = None
    for window in windows:
        rows = _concat(carry, window)
        n = len(next(iter(rows.values())))
        spare = n % batch_size
        order = rng.permutation(n)
        carry = _take(rows, np.sort(order[:spare])) if spare else None
        kept = order[spare:]
        if kept.size == 0:
            continue
        lengths = row_lengths(rows)[kept]
        kept = kept[np.lexsort((rng.random(kept.size), lengths))]
        batches = kept.reshape(-1, batch_size)
        for index in rng.permutation(len(batches)):
            yield _take(rows, batches[index])
