"""The four objectives as per-row statistics over candidate columns.

Each objective splits its per-row loss into the row's target logit ``t_i`` (always
known locally: it is the row's own pair) and a few per-row *aggregates* over every
other unmasked column, e.g. a log-sum-exp. The aggregates are what the modes compute
differently:

- :meth:`Kernel.full` computes them from a materialised ``[rows, cols]`` logit matrix
  with plain autograd (gather mode);
- :meth:`Kernel.init` / :meth:`Kernel.update` / :meth:`Kernel.finish` stream them over
  tiles, and :meth:`Kernel.dlogits` turns a recomputed tile plus the saved per-row
  results and their incoming gradients into that tile's logit gradient (tiled and
  ring modes, :mod:`models.losses.blockwise`).

:func:`finalize` then turns ``t`` and the aggregates into per-row losses with plain
autograd, the same code in every mode.

Notation: ``x`` is a tile of logits (``scale * cos``, plus the bias for SigLIP),
``valid`` the unmasked non-target columns, ``label_pos`` supcon's extra positives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


def masked_lse(x: Tensor, valid: Tensor) -> Tensor:
    """Row-wise log-sum-exp over ``valid`` entries; -inf (with finite gradients) for empty rows."""
    any_valid = valid.any(dim=1, keepdim=True)
    # An all-masked row would be logsumexp(-inf...), whose gradient is nan even when unused.
    safe = torch.where(valid, x, torch.where(any_valid, NEG_INF, 0.0))
    return torch.where(any_valid.squeeze(1), torch.logsumexp(safe, dim=1), NEG_INF)


def _tile_lse(x: Tensor, valid: Tensor) -> Tensor:
    """Like :func:`masked_lse` without autograd concerns (blockwise forward runs under no_grad)."""
    return torch.logsumexp(torch.where(valid, x, NEG_INF), dim=1)


class Kernel:
    """Per-row aggregates of one objective (see the module docstring)."""

    uses_bias = False
    """Whether logits include the logit bias (only SigLIP's do; softmax is shift-invariant)."""

    def full(self, x: Tensor, valid: Tensor, label_pos: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """(differentiable aggregates, count) from a whole ``[rows, cols]`` logit matrix."""
        raise NotImplementedError

    def init(self, rows: int, like: Tensor) -> list[Tensor]:
        """Running per-row state before any column."""
        raise NotImplementedError

    def update(self, state: list[Tensor], x: Tensor, valid: Tensor, label_pos: Tensor | None) -> list[Tensor]:
        """The state after one more tile of columns (state rows = tile rows)."""
        raise NotImplementedError

    def finish(self, state: list[Tensor]) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(aggregates, count, per-row tensors backward needs)."""
        raise NotImplementedError

    def dlogits(
        self, x: Tensor, valid: Tensor, label_pos: Tensor | None, saved: list[Tensor], grads: list[Tensor]
    ) -> Tensor:
        """d(sum_i grad_i . aggregate_i) / dx for one recomputed tile."""
        raise NotImplementedError


class SoftmaxKernel(Kernel):
    """``A_i = log sum_j w_ij exp(x_ij)`` over the valid columns, for InfoNCE and DCL.

    Hardness weights ``w_ij = M_i exp(beta x_ij) / sum_m exp(beta x_im)`` (``M_i`` the
    row's valid-column count) are constants for the gradient, so
    ``A_i = log M_i + LSE_j((1 + beta) x_ij) - LSE_j(beta x_ij)`` in value and
    ``dA_i/dx_ij = softmax_j((1 + beta) x_ij)`` in gradient. beta = 0 gives ``w = 1``.
    State: LSE of (1+beta) x, LSE of beta x, count.
    """

    def __init__(self, beta: float = 0.0) -> None:
        self.beta = float(beta)

    def full(self, x, valid, label_pos):
        count = valid.sum(dim=1).to(x.dtype)
        if self.beta == 0:
            return [masked_lse(x, valid)], count
        with torch.no_grad():  # log w_ij, a constant
            log_w = torch.log(count)[:, None] + self.beta * x - masked_lse(self.beta * x, valid)[:, None]
        return [masked_lse(x + log_w, valid)], count

    def init(self, rows, like):
        empty = like.new_full((rows,), NEG_INF)
        return [empty, empty.clone(), like.new_zeros(rows)]

    def update(self, state, x, valid, label_pos):
        lse_hard, lse_beta, count = state
        lse_hard = torch.logaddexp(lse_hard, _tile_lse((1 + self.beta) * x, valid))
        if self.beta != 0:
            lse_beta = torch.logaddexp(lse_beta, _tile_lse(self.beta * x, valid))
        return [lse_hard, lse_beta, count + valid.sum(dim=1)]

    def finish(self, state):
        lse_hard, lse_beta, count = state
        if self.beta == 0:
            agg = lse_hard
        else:
            agg = torch.where(count > 0, torch.log(count) + lse_hard - lse_beta, NEG_INF)
        return [agg], count, [lse_hard]

    def dlogits(self, x, valid, label_pos, saved, grads):
        (lse_hard,), (grad,) = saved, grads
        probs = torch.exp((1 + self.beta) * x - lse_hard[:, None])
        return torch.where(valid, grad[:, None] * probs, 0.0)


class SupConKernel(Kernel):
    """``B_i = LSE_j x_ij`` over valid columns, ``S_i = sum`` of label-positive logits and
    their count (a constant). State: LSE, positive sum, positive count."""

    def full(self, x, valid, label_pos):
        assert label_pos is not None
        pos = torch.where(label_pos, x, 0.0).sum(dim=1)
        return [masked_lse(x, valid), pos], label_pos.sum(dim=1).to(x.dtype)

    def init(self, rows, like):
        return [like.new_full((rows,), NEG_INF), like.new_zeros(rows), like.new_zeros(rows)]

    def update(self, state, x, valid, label_pos):
        assert label_pos is not None
        lse, pos, count = state
        return [
            torch.logaddexp(lse, _tile_lse(x, valid)),
            pos + torch.where(label_pos, x, 0.0).sum(dim=1),
            count + label_pos.sum(dim=1),
        ]

    def finish(self, state):
        lse, pos, count = state
        return [lse, pos], count, [lse]

    def dlogits(self, x, valid, label_pos, saved, grads):
        assert label_pos is not None
        (lse,), (grad_lse, grad_pos) = saved, grads
        probs = torch.where(valid, grad_lse[:, None] * torch.exp(x - lse[:, None]), 0.0)
        return probs + torch.where(label_pos, grad_pos[:, None], 0.0)


class SigmoidKernel(Kernel):
    """``C_i = sum_j softplus(x_ij)`` over valid columns: each is ``-log sigmoid(-x)``, a
    negative pair's SigLIP term. State: sum, count."""

    uses_bias = True

    def full(self, x, valid, label_pos):
        return [torch.where(valid, F.softplus(x), 0.0).sum(dim=1)], valid.sum(dim=1).to(x.dtype)

    def init(self, rows, like):
        return [like.new_zeros(rows), like.new_zeros(rows)]

    def update(self, state, x, valid, label_pos):
        total, count = state
        return [total + torch.where(valid, F.softplus(x), 0.0).sum(dim=1), count + valid.sum(dim=1)]

    def finish(self, state):
        total, count = state
        return [total], count, []

    def dlogits(self, x, valid, label_pos, saved, grads):
        (grad,) = grads
        return torch.where(valid, grad[:, None] * torch.sigmoid(x), 0.0)


OBJECTIVES = ("infonce", "dcl", "supcon", "siglip")


def make_kernel(objective: str, hardness_beta: float = 0.0) -> Kernel:
    if objective in ("infonce", "dcl"):
        return SoftmaxKernel(hardness_beta)
    if objective == "supcon":
        return SupConKernel()
    if objective == "siglip":
        return SigmoidKernel()
    raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")


def finalize(objective: str, target: Tensor, aggregates: list[Tensor], count: Tensor) -> Tensor:
    """Per-row losses from the target logit and the kernel's aggregates (plain autograd).

    - infonce: ``-t + log(e^t + e^A)``;
    - dcl: ``-t + A`` (the target is not in the denominator); 0 for a row left with no
      negative at all (its loss would be -inf);
    - supcon: ``log(e^t + e^B) - (t + S) / (1 + n)``;
    - siglip: ``softplus(-t) + C`` (``-log sigmoid(t)`` for the matching pair).
    """
    if objective == "infonce":
        return torch.logaddexp(target, aggregates[0]) - target
    if objective == "dcl":
        return torch.where(count > 0, aggregates[0] - target, 0.0)
    if objective == "supcon":
        lse, pos = aggregates
        return torch.logaddexp(target, lse) - (target + pos) / (1 + count)
    if objective == "siglip":
        return F.softplus(-target) + aggregates[0]
    raise ValueError(f"unknown objective {objective!r}")
