"""Positive-aware filtering of in-batch false negatives (loss.in_batch_margin): the
teacher's in-batch scores that travel with a mined batch remove, from anchor i's loss,
the in-batch candidates the teacher scores above i's own positive less the margin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clray.models.config import LossConfig
from clray.models.losses import build_loss
from clray.models.losses.columns import in_batch_drop


def _pairs(b: int = 8, d: int = 16):
    torch.manual_seed(0)
    a = F.normalize(torch.randn(b, d), dim=1)
    p = F.normalize(a + 0.4 * torch.randn(b, d), dim=1)
    return a, p


def test_drop_flags_follow_the_positive_less_the_margin():
    scores = torch.tensor([[0.5, 0.49, 0.46, 0.1], [0.2, -0.5, -0.52, -0.6]])
    # row 0: positive 0.5, limit 0.45; row 1 (offset: its positive is column 1): -0.5 -> -0.525
    assert in_batch_drop(scores, 0, 0.1)[0].tolist() == [1, 1, 1, 0]  # the target is dropped later anyway
    assert in_batch_drop(scores[1:], 1, 0.05)[0].tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("mode", ["gather", "tiled"])
def test_masked_loss_equals_the_reference(mode):
    a, p = _pairs()
    scale = torch.tensor(10.0)
    scores = torch.full((8, 8), -1.0)
    scores.fill_diagonal_(0.5)
    scores[0, 3] = scores[5, 1] = 0.9  # likely false negatives
    loss = build_loss(LossConfig(type="infonce", mode=mode, block_size=3, in_batch_margin=0.05))
    out = loss(a, p, logit_scale=scale, in_batch_scores=scores)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0, 3] = mask[5, 1] = True
    logits = scale * a @ p.T
    target = torch.arange(8)
    reference = (F.cross_entropy(logits.masked_fill(mask, float("-inf")), target)
                 + F.cross_entropy(logits.T.masked_fill(mask, float("-inf")), target)) / 2
    torch.testing.assert_close(out.loss, reference)
    assert out.metrics["candidates"] == pytest.approx(8 - 2 / 8)
    unmasked = build_loss(LossConfig(type="infonce", mode=mode, block_size=3))(a, p, logit_scale=scale)
    assert unmasked.loss > out.loss


def test_missing_scores_name_the_key():
    a, p = _pairs()
    loss = build_loss(LossConfig(type="infonce", in_batch_margin=0.05))
    with pytest.raises(ValueError, match="data.in_batch_score_column"):
        loss(a, p, logit_scale=torch.tensor(10.0))
