"""Who each row and candidate column is, and which (row, column) pairs a loss may use.

Every mode (gather, tiled, ring) scores tiles of ``rows x columns``. Whether a pair is
the row's target, masked out, or (supcon) a label positive depends only on small
integer metadata that travels with the rows and columns, never on where a tile sits in
a gathered matrix. That is what lets the ring mode score a block it received from
another rank with the same code that scores a gathered matrix.

Row metadata, int64 ``[rows, 3]``: global pair index, id hash, label (-1: unknown);
with positive-aware in-batch masking, ``[rows, 3 + B]``: then column ``3 + j`` is 1 when
the teacher marked in-batch pair j a likely false negative of the row.
Column metadata, int64 ``[cols, 5]``:

- ``ROW``: global index of the pair the column belongs to (a positive's own pair, or
  the anchor that owns a hard negative);
- ``HARD``: 1 for a hard-negative column, 0 for an in-batch column;
- ``ID``: id hash (the pair's id, or the hard negative's own id);
- ``LABEL``: class label, -1 for unknown and for every hard negative;
- ``DROP``: 1 when the owner's teacher scored this hard negative above the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ROW, HARD, ID, LABEL, DROP = range(5)
META_COLUMNS = 5


@dataclass(frozen=True)
class MaskSpec:
    """Which masks are on (from the loss config) and whether same-label columns are positives."""

    same_id: bool = False
    same_label: bool = False
    teacher: bool = False
    label_positives: bool = False
    in_batch: bool = False
    """Row metadata carries per-pair drop flags (``in_batch_drop``)."""


def row_meta(rows: int, offset: int, ids: Tensor | None, labels: Tensor | None, device: torch.device) -> Tensor:
    """``[rows, 3]`` metadata of this rank's query rows (global pair index = offset + i)."""
    index = torch.arange(offset, offset + rows, device=device)
    return torch.stack([index, _or(ids, 0, rows, device), _or(labels, -1, rows, device)], dim=1)


def pair_columns(rows: int, offset: int, ids: Tensor | None, labels: Tensor | None, device: torch.device) -> Tensor:
    """``[rows, 5]`` metadata of in-batch candidate columns: one per pair of this rank."""
    index = torch.arange(offset, offset + rows, device=device)
    zeros = torch.zeros(rows, dtype=torch.long, device=device)
    return torch.stack([index, zeros, _or(ids, 0, rows, device), _or(labels, -1, rows, device), zeros], dim=1)


def negative_columns(
    rows: int, k: int, offset: int, negative_ids: Tensor | None, drop: Tensor | None, device: torch.device
) -> Tensor:
    """``[rows * k, 5]`` metadata of this rank's hard negatives, row-major (anchor i's k first)."""
    count = rows * k
    owner = torch.arange(offset, offset + rows, device=device).repeat_interleave(k)
    ones = torch.ones(count, dtype=torch.long, device=device)
    ids = _or(None if negative_ids is None else negative_ids.reshape(count), 0, count, device)
    dropped = torch.zeros(count, dtype=torch.long, device=device) if drop is None else drop.reshape(count).long()
    return torch.stack([owner, ones, ids, -ones, dropped], dim=1)


def tile_masks(rows: Tensor, cols: Tensor, spec: MaskSpec) -> tuple[Tensor, Tensor | None]:
    """``valid`` [R, C]: pairs the loss sums over besides the target (the target itself is
    never in a tile's ``valid``: objectives add it from the locally known pair), and for
    supcon ``label_pos`` [R, C]: valid columns that count as extra positives."""
    col_is_pair = cols[:, HARD] == 0
    same_pair = rows[:, 0, None] == cols[None, :, ROW]
    excluded = same_pair & col_is_pair  # the target column
    if spec.same_id:
        excluded |= rows[:, 1, None] == cols[None, :, ID]
    same_label = None
    if spec.same_label or spec.label_positives:
        known = rows[:, 2, None] >= 0
        same_label = known & col_is_pair & (rows[:, 2, None] == cols[None, :, LABEL])
        if spec.same_label:
            excluded |= same_label
    if spec.teacher:
        excluded |= same_pair & (cols[None, :, HARD] == 1) & (cols[None, :, DROP] != 0)
    if spec.in_batch and rows.shape[1] > 3:
        flags = rows[:, 3:]
        index = cols[:, ROW].clamp(0, flags.shape[1] - 1)
        excluded |= col_is_pair[None, :] & (flags[:, index] != 0)
    valid = ~excluded
    label_pos = valid & same_label if spec.label_positives and same_label is not None else None
    return valid, label_pos


def in_batch_drop(scores: Tensor, offset: int, margin: float) -> Tensor:
    """``[rows, B]`` 0/1: in-batch pairs the teacher scores above ``pos - margin * |pos|``,
    where ``pos`` is the row's own positive (column ``offset + i`` of ``scores`` [rows, B]).
    The same flags serve the positive->anchor direction: a near-duplicate pair is one
    whichever side asks."""
    rows = scores.shape[0]
    scores = scores.float()
    own = scores[torch.arange(rows, device=scores.device), offset + torch.arange(rows, device=scores.device)]
    limit = own - margin * own.abs()
    return (scores > limit[:, None]).long()


def _or(values: Tensor | None, fill: int, rows: int, device: torch.device) -> Tensor:
    if values is None:
        return torch.full((rows,), fill, dtype=torch.long, device=device)
    return values.reshape(rows).to(device=device, dtype=torch.long)
