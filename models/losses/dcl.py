"""DCL: decoupled contrastive loss, InfoNCE without the positive in the denominator."""

from __future__ import annotations

import torch
from torch import Tensor

from clray.models.losses.softmax import SoftmaxObjective


class DCL(SoftmaxObjective):
    """Decoupled contrastive loss (Yeh et al. 2022, ``loss.type = "dcl"``).

    InfoNCE with the target left out of the denominator, so a well-separated positive
    no longer shrinks its own gradient. For row ``i`` with target logit ``t_i`` and the
    logits ``l_ij`` of its unmasked negatives::

        loss_i = -t_i + log sum_j w_ij e^{l_ij} = A_i - t_i

    ``w_ij`` are the hardness weights of :class:`~models.losses.softmax.SoftmaxObjective`
    (all 1 with ``hardness_beta = 0``). A row left with no negative at all (every column
    masked) would have ``A_i = -inf``; its loss is 0 instead.
    """

    objective = "dcl"

    def row_loss(self, target: Tensor, aggregates: list[Tensor], count: Tensor) -> Tensor:
        return torch.where(count > 0, aggregates[0] - target, 0.0)
