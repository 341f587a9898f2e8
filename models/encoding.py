"""Embedding many texts at once without paying for padding: sorted by length, in chunks.

The evaluation and the mining teacher embed whole blocks of rows with no gradient. A
block of 256 rows padded to its longest row costs 256 times that row; sorted by length
and cut into chunks, each chunk costs its own longest row, which on real text (a few
long rows, many short ones) is a fraction of the work. The rows come back in their
original order. This is what ``SentenceTransformer.encode`` does over all its input.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from clray.models.preprocess import MASK_SUFFIX, trim_padding


def encode_by_length(
    encode: Callable[[dict[str, Tensor]], Tensor],
    inputs: dict[str, Tensor],
    prefix: str,
    chunk_rows: int,
    multiple: int = 1,
) -> Tensor:
    """``encode`` (e.g. ``DualEncoder.encode_anchor``) over the ``{prefix}_*`` inputs of a
    block, ``chunk_rows`` rows at a time, the rows sorted by token length and each chunk
    cut to its longest row (rounded up to ``multiple``); returns the embeddings in the
    block's row order. Views without an attention mask (images) are encoded in chunks
    in their own order. Meant for inference (call it under ``torch.inference_mode``)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    own = {key: value for key, value in inputs.items() if key.startswith(f"{prefix}_")}
    rows = next(iter(own.values())).shape[0]
    mask = own.get(f"{prefix}{MASK_SUFFIX}")
    if mask is None:
        order = torch.arange(rows, device=next(iter(own.values())).device)
    else:
        # stable: equal lengths keep their order, so a block embeds the same way every run
        order = torch.argsort(mask.reshape(rows, -1).sum(dim=1), stable=True)
    parts = []
    for start in range(0, rows, chunk_rows):
        index = order[start:start + chunk_rows]
        chunk = {key: value[index] for key, value in own.items()}
        parts.append(encode(trim_padding(chunk, multiple) if mask is not None else chunk))
    if not parts:
        raise ValueError(f"no rows of {prefix!r} to encode")
    sorted_out = torch.cat(parts)
    out = torch.empty_like(sorted_out)
    out[order] = sorted_out
    return out


def length_spans(lengths: np.ndarray, overhead: float, attention: float, multiple: int = 1,
                 width: int | None = None) -> list[tuple[int, int, int]]:
    """How to cut rows sorted by token count (ascending ``lengths``) into consecutive
    chunks, each padded to its own longest row (rounded up to ``multiple``, never past
    ``width``), so that the encoder's estimated cost is least: ``(start, stop, width)``
    per chunk, covering every row once.

    A chunk of ``r`` rows at width ``w`` is taken to cost ``r * w * (1 + w / attention)``
    token-units (the per-token work of the layers, plus attention's part, which grows
    with the width and equals it at ``w = attention``) plus ``overhead`` units for the
    call itself (per-operator dispatch, kernel launches). Exact dynamic programming over
    the places where the length changes (a cut between equal lengths saves nothing), so
    at most one candidate per distinct length.
    """
    n = len(lengths)
    if n == 0:
        return []
    lengths = np.asarray(lengths, dtype=np.int64)
    cap = int(width) if width is not None else int(lengths[-1])
    padded = np.minimum(-(-np.maximum(lengths, 1) // multiple) * multiple, max(cap, 1))
    # candidate cut points: after the last row of each distinct padded width
    ends = np.flatnonzero(np.r_[padded[1:] != padded[:-1], True]) + 1  # exclusive ends, ascending
    widths = padded[ends - 1].astype(np.float64)
    per_row = widths * (1.0 + widths / attention)
    starts = np.r_[0, ends[:-1]]
    best = np.empty(len(ends))
    choice = np.empty(len(ends), dtype=np.int64)
    for j in range(len(ends)):
        # chunk = candidates i..j (rows starts[i]..ends[j]); the cost before it is best[i - 1]
        before = np.r_[0.0, best[:j]]
        rows = ends[j] - starts[: j + 1]
        total = before + rows * per_row[j] + overhead
        i = int(np.argmin(total))
        best[j], choice[j] = total[i], i
    spans = []
    j = len(ends) - 1
    while j >= 0:
        i = int(choice[j])
        spans.append((int(starts[i]), int(ends[j]), int(padded[ends[j] - 1])))
        j = i - 1
    return spans[::-1]
