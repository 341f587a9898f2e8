"""What an objective must give the engine: per-row aggregates over candidate columns.

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

The objective's ``row_loss`` then turns ``t`` and the aggregates into per-row losses
with plain autograd, the same code in every mode. Each objective (one class per file:
:mod:`~models.losses.infonce`, :mod:`~models.losses.dcl`, :mod:`~models.losses.supcon`,
:mod:`~models.losses.siglip`) implements this interface next to its formula.

Notation: ``x`` is a tile of logits (``scale * cos``, plus the bias when the objective
uses one), ``valid`` the unmasked non-target columns, ``label_pos`` the extra positives
of an objective that takes same-label columns as positives.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

NEG_INF = float("-inf")


def masked_lse(x: Tensor, valid: Tensor) -> Tensor:
    """Row-wise log-sum-exp over ``valid`` entries; -inf (with finite gradients) for empty rows."""
    any_valid = valid.any(dim=1, keepdim=True)
    # An all-masked row would be logsumexp(-inf...), whose gradient is nan even when unused.
    safe = torch.where(valid, x, torch.where(any_valid, NEG_INF, 0.0))
    return torch.where(any_valid.squeeze(1), torch.logsumexp(safe, dim=1), NEG_INF)


def tile_lse(x: Tensor, valid: Tensor) -> Tensor:
    """Like :func:`masked_lse` without autograd concerns (blockwise forward runs under no_grad)."""
    return torch.logsumexp(torch.where(valid, x, NEG_INF), dim=1)


class Kernel(abc.ABC):
    """Per-row aggregates of one objective (see the module docstring)."""

    uses_bias = False
    """Whether logits include the logit bias (only SigLIP's do; softmax is shift-invariant)."""

    @abc.abstractmethod
    def full(self, x: Tensor, valid: Tensor, label_pos: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """(differentiable aggregates, count) from a whole ``[rows, cols]`` logit matrix."""

    @abc.abstractmethod
    def init(self, rows: int, like: Tensor) -> list[Tensor]:
        """Running per-row state before any column."""

    @abc.abstractmethod
    def update(self, state: list[Tensor], x: Tensor, valid: Tensor, label_pos: Tensor | None) -> list[Tensor]:
        """The state after one more tile of columns (state rows = tile rows)."""

    @abc.abstractmethod
    def finish(self, state: list[Tensor]) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(aggregates, count, per-row tensors backward needs)."""

    @abc.abstractmethod
    def dlogits(
        self, x: Tensor, valid: Tensor, label_pos: Tensor | None, saved: list[Tensor], grads: list[Tensor]
    ) -> Tensor:
        """d(sum_i grad_i . aggregate_i) / dx for one recomputed tile."""
