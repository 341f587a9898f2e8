"""Cross-entropy over ``scale * queries @ keys.T`` without ever holding that matrix.

The forward pass walks the logits in [block x block] tiles, keeping a running max and
sum of exponentials per row (a streaming log-sum-exp); backward recomputes each tile
and turns it into softmax probabilities from the saved per-row log-sum-exp. Peak extra
memory is one tile instead of the [n, m] logits (and their gradient), which is what
lets a global batch grow far past what the full matrix allows. The arithmetic is the
same as ``F.cross_entropy(scale * q @ k.T, targets)``; only the order of summation
differs.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _TiledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, scale: Tensor, targets: Tensor, block: int):
        rows, cols = queries.shape[0], keys.shape[0]
        lse = queries.new_empty(rows)
        row_argmax = torch.empty(rows, dtype=torch.long, device=queries.device)
        sim_total = queries.new_zeros(())
        for r0 in range(0, rows, block):
            q = queries[r0 : r0 + block]
            run_max = q.new_full((q.shape[0],), float("-inf"))
            run_sum = q.new_zeros(q.shape[0])
            best = q.new_full((q.shape[0],), float("-inf"))
            best_col = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            for c0 in range(0, cols, block):
                sims = q @ keys[c0 : c0 + block].T
                sim_total += sims.sum()
                tile_best, tile_col = sims.max(dim=1)
                better = tile_best > best  # strict: the first maximum wins, as in argmax
                best = torch.where(better, tile_best, best)
                best_col = torch.where(better, tile_col + c0, best_col)
                logits = scale * sims
                new_max = torch.maximum(run_max, logits.max(dim=1).values)
                run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
                run_max = new_max
            lse[r0 : r0 + block] = run_max + torch.log(run_sum)
            row_argmax[r0 : r0 + block] = best_col
        target_sims = (queries * keys[targets]).sum(dim=1)
        loss = (lse - scale * target_sims).mean()
        ctx.save_for_backward(queries, keys, scale, targets, lse)
        ctx.block = block
        # Side outputs for metrics, computed in the same pass (no gradient flows through them).
        stats = torch.stack([target_sims.mean(), (sim_total - target_sims.sum()) / max(1, rows * cols - rows),
                             (row_argmax == targets).to(queries.dtype).mean()]).detach()
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_stats: Tensor):
        queries, keys, scale, targets, lse = ctx.saved_tensors
        block = ctx.block
        rows, cols = queries.shape[0], keys.shape[0]
        g = grad_loss / rows
        d_queries = torch.zeros_like(queries)
        d_keys = torch.zeros_like(keys)
        d_scale = queries.new_zeros(())
        for r0 in range(0, rows, block):
            q = queries[r0 : r0 + block]
            row_lse = lse[r0 : r0 + block, None]
            for c0 in range(0, cols, block):
                k = keys[c0 : c0 + block]
                sims = q @ k.T
                probs = torch.exp(scale * sims - row_lse)  # softmax, recomputed per tile
                d_queries[r0 : r0 + block] += (g * scale) * (probs @ k)
                d_keys[c0 : c0 + block] += (g * scale) * (probs.T @ q)
                d_scale += g * (probs * sims).sum()
        # The target term: loss_i contains -scale * q_i . k_{t_i}.
        target_keys = keys[targets]
        d_queries -= (g * scale) * target_keys
        d_keys.index_add_(0, targets, -(g * scale) * queries)
        d_scale -= g * (queries * target_keys).sum()
        return d_queries, d_keys, d_scale.reshape(scale.shape), None, None


def tiled_cross_entropy(
    queries: Tensor, keys: Tensor, scale: Tensor, targets: Tensor, block: int = 1024
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy of ``scale * queries @ keys.T`` against ``targets``, tiled.

    Returns the loss and detached metrics of the cosine matrix: mean positive and
    negative similarity and top-1 accuracy.
    """
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    loss, stats = _TiledCrossEntropy.apply(queries, keys, scale, targets, block)
    return loss, {"pos_sim": stats[0], "neg_sim": stats[1], "accuracy": stats[2]}
