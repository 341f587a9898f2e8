"""Gradient caching: a contrastive loss over a batch far larger than activation memory.

The loss couples every row of the batch, so it cannot be split into independent
micro-batches. GradCache (Gao et al., 2021) splits the *encoder* instead:

1. encode the batch chunk by chunk without building a graph, recording the RNG state
   before each chunk;
2. run the loss on the concatenated, detached embeddings (any mode: gather, tiled, ring)
   and backpropagate it to the embeddings only: one small gradient per embedding;
3. re-encode each chunk with its recorded RNG state (so dropout draws the same masks)
   and backpropagate ``sum(embedding * cached_gradient)`` through the encoder.

Step 3 is a chain rule split at the embeddings, so parameter gradients equal those of
one graph over the whole batch, while only one chunk's activations are alive at a time.

This module is plain torch. The caller supplies ``backward(surrogate, last)``: plain
``surrogate.backward()`` in a notebook or test, or DeepSpeed's ``engine.backward`` with
the gradient-accumulation boundary set on the last chunk (see ``jobs.worker``), which is
what makes ZeRO 1-3 reduce and partition gradients once, after the last chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from clray.models.dual_encoder import Encoded
from clray.models.losses.base import LossOutput


def slice_batch(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every tensor (and list) in a batch dict."""
    return {key: value[start:stop] for key, value in batch.items()}


def batch_rows(batch: dict[str, Any]) -> int:
    sizes = {len(value) for value in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch columns have different row counts {sorted(sizes)}; cannot split it into chunks")
    return sizes.pop()


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _leaf(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.detach().requires_grad_(True)


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.cat(parts, dim=0)  # type: ignore[arg-type]


def _dot(value: Tensor | None, grad: Tensor | None) -> Tensor | None:
    if value is None or grad is None:
        return None
    return (value * grad.to(value.dtype)).sum()


def gradcache_step(
    encode: Callable[[dict[str, Any]], Encoded],
    batch: dict[str, Any],
    chunk_size: int,
    compute_loss: Callable[[Encoded], LossOutput],
    backward: Callable[[Tensor, bool], None],
    device: torch.device | None = None,
) -> LossOutput:
    """Forward and backward of ``compute_loss(encode(batch))`` in chunks of ``chunk_size`` rows.

    ``encode`` maps a batch dict to :class:`Encoded` (the model or engine forward);
    ``compute_loss`` runs the loss on the whole batch's embeddings (collectives inside it
    run once, on every rank); ``backward(surrogate, last)`` backpropagates one chunk's
    surrogate. Parameter gradients end up as after one ``backward(loss)`` over the whole
    batch. Returns the loss output (its ``loss`` detached from any encoder graph).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    rows = batch_rows(batch)
    device = device or torch.device("cpu")
    bounds = [(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]

    states = []
    parts: list[Encoded] = []
    with torch.no_grad():
        for start, stop in bounds:
            states.append(_rng_state(device))
            parts.append(encode(slice_batch(batch, start, stop)))
    after_pass = _rng_state(device)

    cached = Encoded(
        anchor=_leaf(torch.cat([p.anchor for p in parts])),
        positive=_leaf(torch.cat([p.positive for p in parts])),
        negatives=_leaf(_cat([p.negatives for p in parts])),
        scale=_leaf(parts[0].scale),
        bias=_leaf(parts[0].bias),
    )
    del parts
    out = compute_loss(cached)
    out.loss.backward()  # gradients w.r.t. the cached embeddings, scale and bias only

    for index, (start, stop) in enumerate(bounds):
        _set_rng_state(states[index], device)
        fresh = encode(slice_batch(batch, start, stop))
        terms = [
            _dot(fresh.anchor, cached.anchor.grad[start:stop]),
            _dot(fresh.positive, cached.positive.grad[start:stop]),
        ]
        if fresh.negatives is not None and cached.negatives is not None:
            terms.append(_dot(fresh.negatives, cached.negatives.grad[start:stop]))
        if index == 0:  # scale and bias are per-batch, not per-row: their gradient goes in once
            terms.append(_dot(fresh.scale, cached.scale.grad))
            terms.append(_dot(fresh.bias, cached.bias.grad if cached.bias is not None else None))
        surrogate = sum((t for t in terms if t is not None and t.requires_grad), start=torch.zeros((), device=device))
        backward(surrogate, index == len(bounds) - 1)
    _set_rng_state(after_pass, device)
    return LossOutput(loss=out.loss.detach(), metrics=out.metrics)
