"""SupCon: supervised contrastive loss, same-label candidates are positives too."""

from __future__ import annotations

import torch
from torch import Tensor

from clray.models.losses.contrastive import ContrastiveObjective
from clray.models.losses.kernel import NEG_INF, masked_lse, tile_lse


class SupCon(ContrastiveObjective):
    """Supervised contrastive loss (Khosla et al. 2020, ``loss.type = "supcon"``).

    Every in-batch candidate that shares row ``i``'s (known) label is a positive besides
    its own target; hard negatives never are. With target logit ``t_i``, the logits
    ``l_ij`` of the row's unmasked candidates and ``P(i)`` its ``n_i`` extra positives
    among them::

        loss_i = log(e^{t_i} + sum_j e^{l_ij}) - (t_i + sum_{p in P(i)} l_ip) / (1 + n_i)
               = logaddexp(t_i, B_i) - (t_i + S_i) / (1 + n_i)

    the log of the whole denominator minus the mean logit of all the row's positives.
    Per-row statistics: ``B_i = LSE_j l_ij`` (over valid columns), ``S_i`` the sum of the
    label-positive logits and ``n_i`` their count (a constant). Needs labels; there is
    no softmax weighting (``hardness_beta``) and no ``mask_same_label`` (same-label
    columns are the positives it learns from).
    """

    objective = "supcon"
    label_positives = True
    needs_labels = True
    accepts_mask_same_label = False

    def full(self, x: Tensor, valid: Tensor, label_pos: Tensor | None) -> tuple[list[Tensor], Tensor]:
        assert label_pos is not None
        pos = torch.where(label_pos, x, 0.0).sum(dim=1)
        return [masked_lse(x, valid), pos], label_pos.sum(dim=1).to(x.dtype)

    def init(self, rows: int, like: Tensor) -> list[Tensor]:
        return [like.new_full((rows,), NEG_INF), like.new_zeros(rows), like.new_zeros(rows)]

    def update(self, state: list[Tensor], x: Tensor, valid: Tensor, label_pos: Tensor | None) -> list[Tensor]:
        assert label_pos is not None
        lse, pos, count = state
        return [
            torch.logaddexp(lse, tile_lse(x, valid)),
            pos + torch.where(label_pos, x, 0.0).sum(dim=1),
            count + label_pos.sum(dim=1),
        ]

    def finish(self, state: list[Tensor]) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        lse, pos, count = state
        return [lse, pos], count, [lse]

    def dlogits(
        self, x: Tensor, valid: Tensor, label_pos: Tensor | None, saved: list[Tensor], grads: list[Tensor]
    ) -> Tensor:
        assert label_pos is not None
        (lse,), (grad_lse, grad_pos) = saved, grads
        probs = torch.where(valid, grad_lse[:, None] * torch.exp(x - lse[:, None]), 0.0)
        return probs + torch.where(label_pos, grad_pos[:, None], 0.0)

    def row_loss(self, target: Tensor, aggregates: list[Tensor], count: Tensor) -> Tensor:
        lse, pos = aggregates
        return torch.logaddexp(target, lse) - (target + pos) / (1 + count)
