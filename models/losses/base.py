"""The contract every contrastive objective implements.

One object per objective, each owning its distributed strategy (what it gathers, how
it indexes targets), so the training step is the same few lines whatever the loss:
``out = loss(anchor, positive, negatives, logit_scale=scale, **loss_side_inputs(batch))``,
``backward(out.loss)``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

# Batch keys (written by the data pipeline) that carry per-row side information the
# losses use, mapped to the loss keyword they feed.
SIDE_INPUT_KEYS = {
    "label": "labels",  # [b] int64 class label (supcon positives, label masking)
    "id_key": "ids",  # [b] int64 hash of the row id (id masking)
    "negative_id_key": "negative_ids",  # [b, k] int64 hash of each hard negative's id
    "negative_score": "negative_scores",  # [b, k] teacher similarity of each hard negative
    "in_batch_score": "in_batch_scores",  # [b, B] teacher similarity to each in-batch positive
}


def loss_side_inputs(batch: dict[str, Any]) -> dict[str, Tensor]:
    """The keyword arguments a loss takes from a training batch, for the keys it has."""
    return {arg: batch[key] for key, arg in SIDE_INPUT_KEYS.items() if key in batch}


@dataclass
class LossOutput:
    """The scalar to backpropagate plus detached, already-python metrics.

    Metrics are floats (not tensors) so logging them never holds the graph alive or
    forces a device sync in the middle of the step by accident. They describe this
    rank's rows; average them across ranks for a global number.
    """

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class ContrastiveLoss(nn.Module, abc.ABC):
    """Scores anchors against candidates and returns a :class:`LossOutput`.

    Inputs describe this rank's local batch of ``b`` pairs, all embeddings L2-normalised:

    - ``anchor`` [b, d] and ``positive`` [b, d]: row i of each is a pair.
    - ``negatives`` [b, k, d]: k hard negatives per anchor (positive-side embeddings).
      Every rank's hard negatives join the candidate columns of every anchor.
    - ``labels`` [b] int64: class ids (supcon positives; label masking). Negative = none.
    - ``ids`` [b] int64: row id hashes (id masking). ``negative_ids`` [b, k] int64: the
      hard negatives' id hashes. ``negative_scores`` [b, k]: teacher similarity of each
      anchor's own hard negatives (teacher-threshold masking). ``in_batch_scores`` [b, B]:
      teacher similarity of each anchor to every positive of the global batch (B = W*b,
      in gathered order), for positive-aware in-batch masking.
    - ``logit_scale``: the multiplier on cosine similarities (inverse temperature, already
      exponentiated and clamped by the model); ``logit_bias`` an additive offset for
      objectives that learn one (SigLIP).

    The returned loss is the mean over this rank's rows of a per-row loss; data-parallel
    gradient averaging across ranks then gives exactly the single-process loss on the
    concatenated global batch.
    """

    @abc.abstractmethod
    def forward(
        self,
        anchor: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        ids: Tensor | None = None,
        negative_ids: Tensor | None = None,
        negative_scores: Tensor | None = None,
        in_batch_scores: Tensor | None = None,
    ) -> LossOutput:
        raise NotImplementedError


def apply_loss(loss_fn: ContrastiveLoss, encoded: Any, batch: dict[str, Any]) -> LossOutput:
    """Run ``loss_fn`` on a model's :class:`~models.dual_encoder.Encoded` output and the
    batch's side inputs (labels, ids, teacher scores): the one call every training step makes."""
    return loss_fn(
        encoded.anchor,
        encoded.positive,
        encoded.negatives,
        logit_scale=encoded.scale,
        logit_bias=encoded.bias,
        **loss_side_inputs(batch),
    )
