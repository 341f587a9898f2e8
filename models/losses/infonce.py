"""CLIP's InfoNCE loss with exact cross-rank negatives ("local-loss rows").

Each rank scores only its own anchors, but against every rank's positives, gathered with
gradients. Compared with materialising the global [W*b, W*b] matrix on every rank, this
costs b x W*b per rank and still gives the same loss and gradients as one process on
the whole batch (see :func:`models.distributed.gather_with_grad`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.distributed import gather_with_grad, rank, world_size
from models.losses.base import ContrastiveLoss, LossOutput
from models.losses.tiled import tiled_cross_entropy


class InfoNCE(ContrastiveLoss):
    """Softmax cross-entropy of each anchor over all positives in the (global) batch.

    ``symmetric`` adds the positive->anchor direction and averages the two, as CLIP does;
    ``gather`` draws negatives from every rank (False keeps them rank-local, cheaper but
    a different, weaker objective whose value depends on the number of workers).
    """

    def __init__(self, symmetric: bool = True, gather: bool = True, tiled: bool = False, block_size: int = 1024) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.gather = gather
        self.tiled = tiled
        self.block_size = block_size

    def forward(
        self,
        anchor: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
    ) -> LossOutput:
        if negatives is not None:
            raise NotImplementedError(
                "InfoNCE does not take hard-negative columns yet; pass negatives=None "
                "(in-batch negatives from every rank are always used)"
            )
        if labels is not None:
            raise NotImplementedError(
                "InfoNCE treats row i's positive as its only match; labels (several positives "
                "per anchor) are not supported yet: pass labels=None"
            )
        if anchor.shape != positive.shape:
            raise ValueError(
                f"anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} must be the "
                "same shape: row i of each is one pair"
            )
        # Softmax over thousands of columns in fp16/bf16 loses the target's probability
        # mass to rounding; the [b, W*b] logits are small enough to do in (at least) fp32.
        dtype = torch.promote_types(anchor.dtype, torch.float32)
        anchor = anchor.to(dtype)
        positive = positive.to(dtype)
        scale = logit_scale.to(dtype)

        local_rows = anchor.shape[0]
        if self.gather and world_size() > 1:
            offset = rank() * local_rows
            all_positive = gather_with_grad(positive)
            all_anchor = gather_with_grad(anchor) if self.symmetric else None
        else:
            offset = 0
            all_positive, all_anchor = positive, anchor
        targets = torch.arange(local_rows, device=anchor.device) + offset

        if self.tiled:  # a logit bias is a shared offset: softmax ignores it
            loss, stats = tiled_cross_entropy(anchor, all_positive, scale, targets, self.block_size)
            if self.symmetric:
                assert all_anchor is not None
                loss_p2a, _ = tiled_cross_entropy(positive, all_anchor, scale, targets, self.block_size)
                loss = (loss + loss_p2a) / 2
            names = list(stats)
            values = torch.stack([stats[n] for n in names]).tolist()  # one device sync
            return LossOutput(loss=loss, metrics=dict(zip(names, values, strict=True)))

        sims = anchor @ all_positive.T  # [b, W*b] cosines of local anchors vs all positives
        logits = scale * sims
        if logit_bias is not None:  # a shared offset; softmax is invariant, kept for the interface
            logits = logits + logit_bias
        loss = F.cross_entropy(logits, targets)
        if self.symmetric:
            assert all_anchor is not None
            logits_p2a = scale * (positive @ all_anchor.T)
            if logit_bias is not None:
                logits_p2a = logits_p2a + logit_bias
            loss = (loss + F.cross_entropy(logits_p2a, targets)) / 2
        return LossOutput(loss=loss, metrics=_pair_metrics(sims.detach(), targets))


def _pair_metrics(sims: Tensor, targets: Tensor) -> dict[str, float]:
    rows = torch.arange(sims.shape[0], device=sims.device)
    is_target = torch.zeros_like(sims, dtype=torch.bool)
    is_target[rows, targets] = True
    pos = sims[rows, targets].mean()
    neg = sims[~is_target]
    neg = neg.mean() if neg.numel() else sims.new_tensor(float("nan"))
    accuracy = (sims.argmax(dim=1) == targets).float().mean()
    pos_sim, neg_sim, acc = torch.stack([pos, neg, accuracy]).tolist()  # one device sync
    return {"pos_sim": pos_sim, "neg_sim": neg_sim, "accuracy": acc}
