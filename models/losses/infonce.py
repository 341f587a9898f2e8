"""InfoNCE: CLIP's softmax cross-entropy over candidates from every rank."""

from __future__ import annotations

import torch
from torch import Tensor

from clray.models.losses.softmax import SoftmaxObjective


class InfoNCE(SoftmaxObjective):
    """Softmax cross-entropy of the target among the row's candidates (CLIP, ``loss.type = "infonce"``).

    For row ``i`` with target logit ``t_i = scale * cos(q_i, p_i)`` and the logits ``l_ij``
    of its unmasked negatives (every other in-batch candidate plus every hard negative)::

        loss_i = -t_i + log(e^{t_i} + sum_j w_ij e^{l_ij})
               = logaddexp(t_i, A_i) - t_i,    A_i = log sum_j w_ij e^{l_ij}

    ``w_ij`` are the hardness weights of :class:`~models.losses.softmax.SoftmaxObjective`
    (all 1 with ``hardness_beta = 0``, the plain cross-entropy). Symmetric by default:
    the positive->anchor direction is the same formula with anchors as candidates.
    """

    objective = "infonce"

    def row_loss(self, target: Tensor, aggregates: list[Tensor], count: Tensor) -> Tensor:
        return torch.logaddexp(target, aggregates[0]) - target
