"""Embedding many texts at once without paying for padding: sorted by length, in chunks.

The evaluation and the mining teacher embed whole blocks of rows with no gradient. A
block of 256 rows padded to its longest row costs 256 times that row; sorted by length
and cut into chunks, each chunk costs its own longest row, which on real text (a few
long rows, many short ones) is a fraction of the work. The rows come back in their
original order. This is what ``SentenceTransformer.encode`` does over all its input.
"""

from __future__ import annotations

from collections.abc import Callable

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
