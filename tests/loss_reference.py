"""Plain full-matrix contrastive losses, straight from their definitions, for tests only.

Deliberately shares no code with ``models.losses``: one process, the whole global
batch, every logit materialised, masks as explicit boolean matrices and the textbook
``F.cross_entropy`` / ``logsumexp`` / ``logsigmoid`` formulas. The equivalence suite
compares every library mode on every world size against this, so a bug the library's
modes share cannot pass.

Definitions (``l_ij = scale * cos(q_i, c_j)``, plus the bias for siglip):

- a2p: queries = anchors; columns = all positives (pair i's target is column i), then
  all hard negatives flattened row-major (negative m of anchor o is column N + o*k + m).
- p2a (symmetric, not siglip): queries = positives; columns = all anchors.
- masks remove a column from a row's loss entirely; the target is never masked:
  same id (column id = pair id, or the hard negative's own id); same known label
  (in-batch columns only); teacher (the row's own hard negatives scored above the
  threshold).
- infonce: ``-l_t + log(e^{l_t} + sum_neg w e^{l})``, ``w = M softmax(beta l)`` over the
  row's M unmasked negatives, without gradient; beta = 0 is plain cross-entropy.
- dcl: ``-l_t + log(sum_neg w e^{l})``.
- supcon: ``log sum_unmasked e^{l} - mean_{P} l``, P = target plus unmasked in-batch
  columns with the row's (known) label.
- siglip: ``-sum_unmasked log sigmoid(z l)``, z = +1 on the target, -1 elsewhere.
- loss = mean over rows; symmetric averages the two directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _row_loss(objective: str, logits: Tensor, target: Tensor, masked: Tensor, candidate_labels: Tensor | None,
              labels: Tensor | None, beta: float) -> Tensor:
    """Per-row losses of one direction. ``target`` [n, cols] bool, ``masked`` [n, cols] bool."""
    n = logits.shape[0]
    inf = torch.tensor(float("-inf"), dtype=logits.dtype)
    target_logit = logits[target]  # exactly one per row
    assert target_logit.shape == (n,)
    kept = ~masked
    negative = kept & ~target
    if objective == "infonce" and beta == 0:
        return F.cross_entropy(torch.where(kept, logits, inf), target.float().argmax(dim=1), reduction="none")
    if objective in ("infonce", "dcl"):
        count = negative.sum(dim=1, keepdim=True).to(logits.dtype)
        weights = (count * torch.softmax(torch.where(negative, beta * logits, inf), dim=1)).detach()
        weighted = torch.where(negative, torch.exp(logits) * weights, torch.zeros_like(logits)).sum(dim=1)
        if objective == "infonce":
            weighted = weighted + torch.exp(target_logit)
        return torch.log(weighted) - target_logit
    if objective == "supcon":
        assert labels is not None and candidate_labels is not None
        same = (labels[:, None] >= 0) & (labels[:, None] == candidate_labels[None, :])
        positives = target | (same & kept)
        mean_positive = (logits * positives).sum(dim=1) / positives.sum(dim=1)
        return torch.logsumexp(torch.where(kept, logits, inf), dim=1) - mean_positive
    if objective == "siglip":
        sign = torch.where(target, 1.0, -1.0).to(logits.dtype)
        return -(F.logsigmoid(sign * logits) * kept).sum(dim=1)
    raise ValueError(objective)


def reference_loss(
    objective: str,
    anchor: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    scale: Tensor,
    bias: Tensor | None = None,
    symmetric: bool = True,
    labels: Tensor | None = None,
    ids: Tensor | None = None,
    negative_ids: Tensor | None = None,
    negative_scores: Tensor | None = None,
    hardness_beta: float = 0.0,
    mask_same_id: bool = False,
    mask_same_label: bool = False,
    teacher_threshold: float | None = None,
) -> Tensor:
    """The mean loss over all ``N`` rows of a global batch (see the module docstring)."""
    n = anchor.shape[0]
    k = 0 if negatives is None else negatives.shape[1]
    columns = positive if negatives is None else torch.cat([positive, negatives.reshape(n * k, -1)])
    logits = scale * anchor @ columns.T
    if objective == "siglip":
        assert bias is not None
        logits = logits + bias
    target = torch.zeros(n, n + n * k, dtype=torch.bool)
    target[torch.arange(n), torch.arange(n)] = True
    is_negative_column = torch.arange(n + n * k) >= n
    owner = torch.cat([torch.arange(n), torch.arange(n).repeat_interleave(k)])

    masked = torch.zeros_like(target)
    if mask_same_id:
        column_ids = ids if negatives is None else torch.cat([ids, negative_ids.reshape(-1)])
        masked |= ids[:, None] == column_ids[None, :]
    column_labels = None
    if labels is not None:
        column_labels = torch.cat([labels, torch.full((n * k,), -1, dtype=labels.dtype)])
    if mask_same_label:
        masked |= (labels[:, None] >= 0) & (labels[:, None] == column_labels[None, :]) & ~is_negative_column
    if teacher_threshold is not None and negatives is not None:
        flagged = torch.cat([torch.zeros(n, dtype=torch.bool), negative_scores.reshape(-1) > teacher_threshold])
        masked |= (owner[None, :] == torch.arange(n)[:, None]) & flagged[None, :]
    masked &= ~target
    per_row = _row_loss(objective, logits, target, masked, column_labels, labels, hardness_beta)
    if not symmetric or objective == "siglip":
        return per_row.mean()

    logits_p2a = scale * positive @ anchor.T
    target_p2a = torch.eye(n, dtype=torch.bool)
    masked_p2a = torch.zeros_like(target_p2a)
    if mask_same_id:
        masked_p2a |= ids[:, None] == ids[None, :]
    if mask_same_label:
        masked_p2a |= (labels[:, None] >= 0) & (labels[:, None] == labels[None, :])
    masked_p2a &= ~target_p2a
    per_row_p2a = _row_loss(objective, logits_p2a, target_p2a, masked_p2a, labels, labels, hardness_beta)
    return (per_row.mean() + per_row_p2a.mean()) / 2
