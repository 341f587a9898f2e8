"""SigLIP: an independent sigmoid per pair, with a learned logit bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clray.models.losses.contrastive import ContrastiveObjective


class SigLIP(ContrastiveObjective):
    """Pairwise sigmoid loss (Zhai et al. 2023, ``loss.type = "siglip"``).

    Every (row, candidate) pair is its own binary "match or not" with logit
    ``l_ij = scale * cos + bias``; only the row's target is a match (``z = +1``), every
    unmasked other column is not (``z = -1``)::

        loss_i = -sum_j log sigmoid(z_ij l_ij) = softplus(-t_i) + C_i,
        C_i = sum_j softplus(l_ij)    (over the row's unmasked negatives)

    since ``-log sigmoid(-x) = softplus(x)``. Per-row statistic: ``C_i`` and the count.
    The loss uses the learned logit bias (and needs one: ``[model.logit_bias]``). A pair
    is scored once whichever side asks, so there is no positive->anchor direction
    (``symmetric`` has no effect), and there is no softmax denominator to weight
    (``hardness_beta``).
    """

    objective = "siglip"
    two_directions = False
    uses_bias = True

    def full(self, x: Tensor, valid: Tensor, label_pos: Tensor | None) -> tuple[list[Tensor], Tensor]:
        return [torch.where(valid, F.softplus(x), 0.0).sum(dim=1)], valid.sum(dim=1).to(x.dtype)

    def init(self, rows: int, like: Tensor) -> list[Tensor]:
        return [like.new_zeros(rows), like.new_zeros(rows)]

    def update(self, state: list[Tensor], x: Tensor, valid: Tensor, label_pos: Tensor | None) -> list[Tensor]:
        total, count = state
        return [total + torch.where(valid, F.softplus(x), 0.0).sum(dim=1), count + valid.sum(dim=1)]

    def finish(self, state: list[Tensor]) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        total, count = state
        return [total], count, []

    def dlogits(
        self, x: Tensor, valid: Tensor, label_pos: Tensor | None, saved: list[Tensor], grads: list[Tensor]
    ) -> Tensor:
        (grad,) = grads
        return torch.where(valid, grad[:, None] * torch.sigmoid(x), 0.0)

    def row_loss(self, target: Tensor, aggregates: list[Tensor], count: Tensor) -> Tensor:
        return F.softplus(-target) + aggregates[0]
