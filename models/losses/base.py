"""The contract every contrastive objective implements.

One object per objective, each owning its distributed strategy (what it gathers, how
it indexes targets), so the training step is the same few lines whatever the loss:
``out = loss(anchor, positive, logit_scale=scale)``, ``backward(out.loss)``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from torch import Tensor, nn


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

    Inputs are L2-normalised embeddings of this rank's local batch: ``anchor`` [b, d] and
    ``positive`` [b, d], row i of each being a pair. ``negatives`` (extra hard-negative
    candidates) and ``labels`` (class ids, for supervised objectives) are optional and
    objective-specific. ``logit_scale`` is the multiplier on cosine similarities (the
    inverse temperature, already exponentiated and clamped by the model), and
    ``logit_bias`` an additive offset for objectives that learn one (SigLIP).
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
    ) -> LossOutput:
        raise NotImplementedError
