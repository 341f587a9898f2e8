"""One blockwise engine for every objective: the logits matrix never exists.

Forward walks the candidate columns block by block (one gathered block in tiled mode,
blocks arriving around the ring in ring mode, see :mod:`models.losses.ring`) and each
block in ``block_size x block_size`` tiles, folding every tile into per-row running
statistics with the objective's :class:`~models.losses.kernel.Kernel` (a streaming
log-sum-exp, sums, counts). Backward walks the same blocks again, recomputes each tile
and turns it into the tile's logit gradient from the saved per-row results
(``Kernel.dlogits``), then into gradients for the queries, that block's candidates,
the scale and the bias. Peak extra memory is a tile, not ``[rows, cols]`` logits and
their gradient.

Where the blocks come from is a :class:`BlockSource`: the engine never communicates
itself, so tiled and ring mode are the same arithmetic in a different order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from clray.models.losses.columns import MaskSpec, tile_masks
from clray.models.losses.kernel import NEG_INF, Kernel

BlockGrad = Callable[[Tensor, Tensor], Tensor]
"""(candidate embeddings, their metadata) -> gradient for those embeddings."""


class BlockSource:
    """Where the candidate blocks a rank scores come from: its own (gathered) block here."""

    def forward_blocks(self, emb: Tensor, meta: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        yield emb, meta

    def backward_blocks(self, emb: Tensor, meta: Tensor, block_grad: BlockGrad) -> Tensor:
        """Calls ``block_grad`` on every block forward saw; returns the gradient for ``emb``."""
        return block_grad(emb, meta)


@dataclass(frozen=True)
class Problem:
    """Everything about one direction except its tensors."""

    kernel: Kernel
    spec: MaskSpec
    block: int
    source: BlockSource


class RowStats:
    """Detached per-row side statistics for metrics: sum, count and max of valid cosines."""

    def __init__(self, rows: int, like: Tensor) -> None:
        self.total = like.new_zeros(rows)
        self.count = like.new_zeros(rows)
        self.best = like.new_full((rows,), NEG_INF)

    def update(self, r0: int, cos: Tensor, valid: Tensor) -> None:
        r1 = r0 + cos.shape[0]
        self.total[r0:r1] += torch.where(valid, cos, 0.0).sum(dim=1)
        self.count[r0:r1] += valid.sum(dim=1)
        best = torch.where(valid, cos, NEG_INF).amax(dim=1) if cos.shape[1] else self.best[r0:r1]
        self.best[r0:r1] = torch.maximum(self.best[r0:r1], best)

    def as_tensor(self) -> Tensor:
        """[rows, 3]: sum, count, max of the valid non-target cosines."""
        return torch.stack([self.total, self.count, self.best], dim=1)


def _logits(kernel: Kernel, cos: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    x = scale * cos
    return x + bias if kernel.uses_bias and bias is not None else x


def _scan(problem: Problem, queries: Tensor, rows_meta: Tensor, emb: Tensor, meta: Tensor, scale: Tensor,
          bias: Tensor | None, state: list[Tensor], stats: RowStats) -> None:
    """Fold one candidate block into the running per-row state, tile by tile."""
    block, kernel = problem.block, problem.kernel
    for r0 in range(0, queries.shape[0], block):
        q, rows = queries[r0 : r0 + block], rows_meta[r0 : r0 + block]
        part = [s[r0 : r0 + block] for s in state]
        for c0 in range(0, emb.shape[0], block):
            cos = q @ emb[c0 : c0 + block].T
            valid, label_pos = tile_masks(rows, meta[c0 : c0 + block], problem.spec)
            part = kernel.update(part, _logits(kernel, cos, scale, bias), valid, label_pos)
            stats.update(r0, cos, valid)
        for s, new in zip(state, part, strict=True):
            s[r0 : r0 + block] = new


class _Blockwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, problem: Problem, queries: Tensor, rows_meta: Tensor, cands: Tensor, cand_meta: Tensor,
                scale: Tensor, bias: Tensor | None) -> tuple[Tensor, ...]:
        kernel = problem.kernel
        state = kernel.init(queries.shape[0], queries)
        stats = RowStats(queries.shape[0], queries)
        for emb, meta in problem.source.forward_blocks(cands, cand_meta):
            _scan(problem, queries, rows_meta, emb, meta, scale, bias, state, stats)
        aggregates, count, saved = kernel.finish(state)
        ctx.problem = problem
        ctx.n_saved = len(saved)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(queries, rows_meta, cands, cand_meta, scale, *([bias] if bias is not None else []), *saved)
        stats_tensor = stats.as_tensor()
        ctx.mark_non_differentiable(count, stats_tensor)
        return (*aggregates, count, stats_tensor)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        problem: Problem = ctx.problem
        kernel, block = problem.kernel, problem.block
        queries, rows_meta, cands, cand_meta, scale, *rest = ctx.saved_tensors
        bias = rest.pop(0) if ctx.has_bias else None
        saved = rest
        out_grads = list(grads[: len(grads) - 2])  # not count and stats
        d_queries = torch.zeros_like(queries)
        d_scale = scale.new_zeros(())
        d_bias = scale.new_zeros(())

        def block_grad(emb: Tensor, meta: Tensor) -> Tensor:
            nonlocal d_scale, d_bias
            d_emb = torch.zeros_like(emb)
            for r0 in range(0, queries.shape[0], block):
                q, rows = queries[r0 : r0 + block], rows_meta[r0 : r0 + block]
                row_saved = [s[r0 : r0 + block] for s in saved]
                row_grads = [g[r0 : r0 + block] for g in out_grads]
                for c0 in range(0, emb.shape[0], block):
                    k = emb[c0 : c0 + block]
                    cos = q @ k.T
                    valid, label_pos = tile_masks(rows, meta[c0 : c0 + block], problem.spec)
                    dx = kernel.dlogits(_logits(kernel, cos, scale, bias), valid, label_pos, row_saved, row_grads)
                    d_queries[r0 : r0 + block] += scale * (dx @ k)
                    d_emb[c0 : c0 + block] += scale * (dx.T @ q)
                    d_scale = d_scale + (dx * cos).sum()
                    if kernel.uses_bias:
                        d_bias = d_bias + dx.sum()
            return d_emb

        d_cands = problem.source.backward_blocks(cands, cand_meta, block_grad)
        need = ctx.needs_input_grad
        return (
            None,
            d_queries if need[1] else None,
            None,
            d_cands if need[3] else None,
            None,
            d_scale.reshape(scale.shape) if need[5] else None,
            d_bias.reshape(bias.shape) if bias is not None and need[6] else None,
        )


def blockwise_aggregates(
    problem: Problem, queries: Tensor, rows_meta: Tensor, cands: Tensor, cand_meta: Tensor, scale: Tensor,
    bias: Tensor | None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The kernel's per-row aggregates of ``queries`` against every block ``problem.source``
    yields, starting from this rank's ``cands``; plus the count and ``[rows, 3]`` metric stats.

    Differentiable in ``queries``, ``cands``, ``scale`` and ``bias``.
    """
    if problem.block < 1:
        raise ValueError(f"block_size must be at least 1, got {problem.block}")
    out = _Blockwise.apply(problem, queries, rows_meta, cands, cand_meta, scale, bias)
    return list(out[:-2]), out[-2], out[-1]


def full_aggregates(
    kernel: Kernel, spec: MaskSpec, queries: Tensor, rows_meta: Tensor, cands: Tensor, cand_meta: Tensor,
    scale: Tensor, bias: Tensor | None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Same as :func:`blockwise_aggregates` from the materialised logits, with plain autograd."""
    cos = queries @ cands.T
    valid, label_pos = tile_masks(rows_meta, cand_meta, spec)
    aggregates, count = kernel.full(_logits(kernel, cos, scale, bias), valid, label_pos)
    stats = RowStats(queries.shape[0], queries)
    with torch.no_grad():
        stats.update(0, cos.detach(), valid)
    return aggregates, count, stats.as_tensor()
