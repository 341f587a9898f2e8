"""The softmax denominator InfoNCE and DCL share, with optional hardness weighting."""

from __future__ import annotations

import torch
from torch import Tensor

from clray.models.losses.contrastive import ContrastiveObjective
from clray.models.losses.kernel import NEG_INF, masked_lse, tile_lse


class SoftmaxObjective(ContrastiveObjective):
    """Objectives whose per-row statistic is one weighted log-sum-exp over the negatives:

    ``A_i = log sum_j w_ij exp(x_ij)`` over the row's valid (unmasked, non-target) columns.

    Hardness weights ``w_ij = M_i exp(beta x_ij) / sum_m exp(beta x_im)`` (``M_i`` the
    row's valid-column count, ``beta`` = ``hardness_beta``) are constants for the
    gradient, so ``A_i = log M_i + LSE_j((1 + beta) x_ij) - LSE_j(beta x_ij)`` in value
    and ``dA_i/dx_ij = softmax_j((1 + beta) x_ij)`` in gradient. beta = 0 gives ``w = 1``.
    Streaming state: LSE of (1+beta) x, LSE of beta x, count.

    Subclasses say how ``A_i`` and the target logit make the row's loss.
    """

    accepts_hardness = True

    def full(self, x: Tensor, valid: Tensor, label_pos: Tensor | None) -> tuple[list[Tensor], Tensor]:
        beta = self.hardness_beta
        count = valid.sum(dim=1).to(x.dtype)
        if beta == 0:
            return [masked_lse(x, valid)], count
        with torch.no_grad():  # log w_ij, a constant
            log_w = torch.log(count)[:, None] + beta * x - masked_lse(beta * x, valid)[:, None]
        return [masked_lse(x + log_w, valid)], count

    def init(self, rows: int, like: Tensor) -> list[Tensor]:
        empty = like.new_full((rows,), NEG_INF)
        return [empty, empty.clone(), like.new_zeros(rows)]

    def update(self, state: list[Tensor], x: Tensor, valid: Tensor, label_pos: Tensor | None) -> list[Tensor]:
        beta = self.hardness_beta
        lse_hard, lse_beta, count = state
        lse_hard = torch.logaddexp(lse_hard, tile_lse((1 + beta) * x, valid))
        if beta != 0:
            lse_beta = torch.logaddexp(lse_beta, tile_lse(beta * x, valid))
        return [lse_hard, lse_beta, count + valid.sum(dim=1)]

    def finish(self, state: list[Tensor]) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        lse_hard, lse_beta, count = state
        if self.hardness_beta == 0:
            agg = lse_hard
        else:
            agg = torch.where(count > 0, torch.log(count) + lse_hard - lse_beta, NEG_INF)
        return [agg], count, [lse_hard]

    def dlogits(
        self, x: Tensor, valid: Tensor, label_pos: Tensor | None, saved: list[Tensor], grads: list[Tensor]
    ) -> Tensor:
        (lse_hard,), (grad,) = saved, grads
        probs = torch.exp((1 + self.hardness_beta) * x - lse_hard[:, None])
        return torch.where(valid, grad[:, None] * probs, 0.0)
