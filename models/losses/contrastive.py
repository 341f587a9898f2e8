"""What every objective shares: candidates from every rank, masks, three memory modes.

The objectives themselves (InfoNCE, DCL, SupCon, SigLIP: one class per file, each with
its formula) only say what they compute per row; :class:`ContrastiveObjective` does the
rest for all of them, reading their traits (second direction, logit bias, label
positives, ...) and never their names.

Each rank scores its own ``b`` anchors (direction a2p) against the candidate columns:
every rank's positives followed by every rank's hard negatives (``negatives`` [b, k, d],
flattened; each belongs to one anchor but is a candidate for all). ``symmetric`` adds
the p2a direction (queries: this rank's positives; candidates: every rank's anchors)
and averages the two, for objectives that have a second direction (SigLIP scores each
pair once). The loss is the mean over this rank's rows, so averaging gradients over
ranks (DDP, DeepSpeed) gives exactly one process's gradient on the concatenated global
batch.

Modes (same loss and gradients, different memory):

- ``gather``: candidates are all-gathered with autograd and the ``[b, W*b(1+k)]``
  logits are materialised; plain autograd.
- ``tiled``: the same gathered candidates, but the blockwise engine
  (:mod:`models.losses.blockwise`) never materialises the logits.
- ``ring``: candidates are not gathered; blocks travel between ranks
  (:mod:`models.losses.ring`), scored tiled. Memory per rank does not grow with ``W``.

Masks (:mod:`models.losses.columns`) remove a column from a row's loss entirely:
``mask_same_id`` (same id hash: duplicates are not negatives), ``mask_same_label``
(same known label, in-batch columns only), ``teacher_threshold`` (an anchor's own hard
negative whose teacher score exceeds the threshold). A row's own target is never masked.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import Tensor

from clray.models.distributed import all_gather_no_grad, gather_with_grad, rank, world_size
from clray.models.losses.base import ContrastiveLoss, LossOutput
from clray.models.losses.blockwise import (
    BlockSource,
    Problem,
    blockwise_aggregates,
    full_aggregates,
)
from clray.models.losses.columns import (
    DROP,
    ID,
    LABEL,
    ROW,
    MaskSpec,
    in_batch_drop,
    negative_columns,
    pair_columns,
    row_meta,
)
from clray.models.losses.kernel import Kernel
from clray.models.losses.ring import RingBlocks

MODES = ("gather", "tiled", "ring")


class ContrastiveObjective(ContrastiveLoss, Kernel):
    """One objective in one mode; see the module docstring.

    A subclass is one objective: its kernel (:class:`~models.losses.kernel.Kernel`: the
    per-row statistics over candidate columns), its :meth:`row_loss` from the target
    logit and those statistics, the formula in its docstring, and the traits below. The
    mode machinery here reads the traits, never the objective's name.
    """

    objective: ClassVar[str] = ""
    """The ``loss.type`` that selects this class (the key of ``models.losses.LOSSES``)."""
    two_directions: ClassVar[bool] = True
    """Whether ``symmetric`` adds the positive->anchor direction. False for an objective
    that scores each pair once whichever side asks (SigLIP)."""
    uses_bias: ClassVar[bool] = False
    """Whether logits include the learned logit bias; such an objective needs one."""
    label_positives: ClassVar[bool] = False
    """Whether in-batch candidates with the row's label are extra positives (SupCon)."""
    needs_labels: ClassVar[bool] = False
    """Whether every batch must carry labels (``data.label_column``)."""
    accepts_hardness: ClassVar[bool] = False
    """Whether the objective has a softmax denominator that ``hardness_beta`` can weight."""
    accepts_mask_same_label: ClassVar[bool] = True
    """Whether ``mask_same_label`` makes sense: not where same-label columns are positives."""

    def __init__(
        self,
        *,
        symmetric: bool = True,
        gather: bool = True,
        mode: str = "gather",
        block_size: int = 1024,
        hardness_beta: float = 0.0,
        mask_same_id: bool = False,
        mask_same_label: bool = False,
        teacher_threshold: float | None = None,
        in_batch_margin: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown loss.mode {mode!r}; expected one of: {', '.join(MODES)}")
        if block_size < 1:
            raise ValueError(f"loss.block_size must be at least 1, got {block_size}")
        if hardness_beta < 0:
            raise ValueError(f"loss.hardness_beta must be >= 0, got {hardness_beta}")
        # The same rules as LossConfig's, from the traits: a class built directly (or from
        # a LossConfig made with model_construct) must not silently ignore a setting.
        if hardness_beta > 0 and not self.accepts_hardness:
            raise ValueError(
                f'loss.hardness_beta weights softmax negatives (infonce, dcl); loss.type = "{self.objective}" '
                "has no softmax denominator to weight: set hardness_beta = 0"
            )
        if mask_same_label and not self.accepts_mask_same_label:
            raise ValueError(
                f'loss.mask_same_label removes same-label candidates, but loss.type = "{self.objective}" counts '
                "them as positives: set mask_same_label = false"
            )
        self.symmetric = symmetric and self.two_directions
        self.gather = gather
        self.mode = mode
        self.block_size = block_size
        self.hardness_beta = float(hardness_beta)
        self.mask_same_id = mask_same_id
        self.mask_same_label = mask_same_label
        self.teacher_threshold = teacher_threshold
        self.in_batch_margin = in_batch_margin

    @abc.abstractmethod
    def row_loss(self, target: Tensor, aggregates: list[Tensor], count: Tensor) -> Tensor:
        """Per-row losses from the target logit ``t`` and the kernel's aggregates and count
        (plain autograd, the same in every mode)."""

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, symmetric={self.symmetric}, gather={self.gather}, block_size={self.block_size}, "
                f"hardness_beta={self.hardness_beta}, mask_same_id={self.mask_same_id}, "
                f"mask_same_label={self.mask_same_label}, teacher_threshold={self.teacher_threshold}, "
                f"in_batch_margin={self.in_batch_margin}")

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
        self._check(anchor, positive, negatives, labels, logit_bias, ids, negative_ids, negative_scores)
        # Softmax over thousands of columns in fp16/bf16 loses the target's probability
        # mass to rounding: score in (at least) fp32.
        dtype = torch.promote_types(anchor.dtype, torch.float32)
        anchor, positive = anchor.to(dtype), positive.to(dtype)
        scale = logit_scale.to(dtype)
        bias = logit_bias.to(dtype) if self.uses_bias and logit_bias is not None else None
        rows, device = anchor.shape[0], anchor.device

        distributed = self.gather and world_size() > 1
        offset = rank() * rows if distributed else 0
        queries_meta = row_meta(rows, offset, ids, labels, device)
        if self.in_batch_margin is not None:
            queries_meta = torch.cat([queries_meta, self._in_batch_flags(in_batch_scores, rows, offset, device)], dim=1)
        pairs_meta = pair_columns(rows, offset, ids, labels, device)
        cands, cands_meta = positive, pairs_meta
        if negatives is not None:
            k = negatives.shape[1]
            drop = None
            if self.teacher_threshold is not None:
                assert negative_scores is not None
                drop = negative_scores > self.teacher_threshold
            cands = torch.cat([positive, negatives.to(dtype).reshape(rows * k, -1)])
            cands_meta = torch.cat([pairs_meta, negative_columns(rows, k, offset, negative_ids, drop, device)])
        spec = MaskSpec(
            same_id=self.mask_same_id,
            same_label=self.mask_same_label,
            teacher=self.teacher_threshold is not None,
            label_positives=self.label_positives,
            in_batch=self.in_batch_margin is not None,
        )

        target_cos = (anchor * positive).sum(dim=1)
        target = scale * target_cos
        if bias is not None:
            target = target + bias
        a2p_cands, p2a_cands = (cands, cands_meta), (anchor, pairs_meta)
        if distributed and self.mode != "ring":
            a2p_cands, p2a_cands = self._gather(cands, cands_meta, anchor, spec)
        per_row, stats = self._direction(anchor, queries_meta, *a2p_cands, target, scale, bias, spec, distributed)
        if self.symmetric:
            p2a, _ = self._direction(positive, queries_meta, *p2a_cands, target, scale, bias, spec, distributed)
            per_row = (per_row + p2a) / 2
        return LossOutput(loss=per_row.mean(), metrics=_metrics(target_cos.detach(), stats))

    def _in_batch_flags(self, scores: Tensor | None, rows: int, offset: int, device: torch.device) -> Tensor:
        """Row metadata columns of positive-aware in-batch masking (``in_batch_drop``):
        scores are against the global batch; a loss that does not gather sees its own
        rank's columns only."""
        if scores is None:
            raise ValueError("loss.in_batch_margin needs the teacher's in-batch scores: set data.in_batch_score_column")
        if scores.ndim != 2 or scores.shape[0] != rows:
            raise ValueError(f"in_batch_scores must be [b, B] with b = {rows}, got {tuple(scores.shape)}")
        own = offset
        if offset == 0 and scores.shape[1] != rows and not (self.gather and world_size() > 1):
            start = rank() * rows
            scores, own = scores[:, start : start + rows], 0
        return in_batch_drop(scores.to(device), own, float(self.in_batch_margin))

    def _gather(
        self, cands: Tensor, cands_meta: Tensor, anchor: Tensor, spec: MaskSpec
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Every rank's candidates of both directions, (columns, metadata) each: a2p's (its
        positives, then its hard negatives, rank after rank) and p2a's (its anchors).

        One all-gather carries both directions' columns (and one all-to-all their
        gradients back in backward); the metadata takes a second one only when a mask
        reads ids, labels or teacher flags (``_all_meta``). So a step waits for the other
        ranks at two or three collectives instead of six (a gather and a metadata gather
        per direction, an all-reduce per direction in backward). p2a's metadata is a2p's
        in-batch part, which leads each rank's block."""
        world, n, rows = world_size(), cands.shape[0], anchor.shape[0]
        local = torch.cat([cands, anchor]) if self.symmetric else cands
        columns = gather_with_grad(local).view(world, local.shape[0], -1)
        meta = self._all_meta(cands_meta, rows, spec).view(world, n, -1)
        a2p = (columns[:, :n].reshape(world * n, -1), meta.reshape(world * n, -1))
        p2a = (columns[:, n:].reshape(world * rows, -1), meta[:, :rows].reshape(world * rows, -1))
        return a2p, p2a

    @staticmethod
    def _all_meta(cands_meta: Tensor, rows: int, spec: MaskSpec) -> Tensor:
        """Every rank's column metadata. Unless a mask reads ids, labels or teacher flags,
        only ``ROW`` and ``HARD`` matter, and another rank's block is this rank's with its
        pair indices shifted by whole local batches (every rank has ``rows`` pairs and the
        same hard negatives per pair): built here, not sent."""
        if spec.same_id or spec.same_label or spec.label_positives or spec.teacher:
            return all_gather_no_grad(cands_meta)
        world = world_size()
        own = cands_meta.clone()
        own[:, ID], own[:, LABEL], own[:, DROP] = 0, -1, 0  # unread: the values of rows without ids or labels
        shifts = (torch.arange(world, device=own.device) - rank()) * rows
        blocks = own.unsqueeze(0).repeat(world, 1, 1)
        blocks[:, :, ROW] += shifts[:, None]
        return blocks.reshape(-1, own.shape[1])

    def _direction(
        self, queries: Tensor, queries_meta: Tensor, cands: Tensor, cands_meta: Tensor, target: Tensor,
        scale: Tensor, bias: Tensor | None, spec: MaskSpec, distributed: bool,
    ) -> tuple[Tensor, Tensor]:
        """Per-row losses of one direction and its [rows, 3] metric statistics; outside
        ring mode, ``cands`` are already every rank's (``_gather``)."""
        if self.mode == "ring" and distributed:
            problem = Problem(self, spec, self.block_size, RingBlocks())
            aggregates, count, stats = blockwise_aggregates(
                problem, queries, queries_meta, cands, cands_meta, scale, bias
            )
        else:
            if self.mode == "gather":
                aggregates, count, stats = full_aggregates(
                    self, spec, queries, queries_meta, cands, cands_meta, scale, bias
                )
            else:  # tiled, and ring within one rank
                problem = Problem(self, spec, self.block_size, BlockSource())
                aggregates, count, stats = blockwise_aggregates(
                    problem, queries, queries_meta, cands, cands_meta, scale, bias
                )
        return self.row_loss(target, aggregates, count), stats

    def _check(
        self, anchor: Tensor, positive: Tensor, negatives: Tensor | None, labels: Tensor | None,
        logit_bias: Tensor | None, ids: Tensor | None, negative_ids: Tensor | None, negative_scores: Tensor | None,
    ) -> None:
        name = type(self).__name__
        if anchor.ndim != 2 or anchor.shape != positive.shape:
            raise ValueError(
                f"anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} must both be [b, d]: "
                "row i of each is one pair"
            )
        rows = anchor.shape[0]
        if negatives is not None and (negatives.ndim != 3 or negatives.shape[0] != rows
                                      or negatives.shape[2] != anchor.shape[1]):
            raise ValueError(
                f"negatives must be [b, k, d] = [{rows}, k, {anchor.shape[1]}] (k hard negatives per anchor), "
                f"got {tuple(negatives.shape)}"
            )
        if self.uses_bias and logit_bias is None:
            raise ValueError(
                f'{name} (loss.type = "{self.objective}") needs a logit bias: add [model.logit_bias] to the config'
            )
        if self.needs_labels and labels is None:
            raise ValueError(f'{name} (loss.type = "{self.objective}") needs labels: set data.label_column')
        if self.mask_same_label and labels is None:
            raise ValueError("loss.mask_same_label needs labels: set data.label_column")
        if self.mask_same_id:
            if ids is None:
                raise ValueError("loss.mask_same_id needs row ids: set data.id_column")
            if negatives is not None and negative_ids is None:
                raise ValueError("loss.mask_same_id with hard negatives needs their ids: set data.negative_id_column")
        if self.teacher_threshold is not None and negatives is not None and negative_scores is None:
            raise ValueError("loss.teacher_threshold needs teacher scores: set data.negative_score_column")
        for what, value in (("labels", labels), ("ids", ids)):
            if value is not None and value.shape != (rows,):
                raise ValueError(f"{what} must be [b] = [{rows}], got {tuple(value.shape)}")
        if negatives is not None:
            for what, value in (("negative_ids", negative_ids), ("negative_scores", negative_scores)):
                if value is not None and value.shape != negatives.shape[:2]:
                    raise ValueError(f"{what} must be [b, k] = {list(negatives.shape[:2])}, got {tuple(value.shape)}")


def _metrics(target_cos: Tensor, stats: Tensor) -> dict[str, float]:
    """pos_sim, neg_sim (mean cosine of unmasked non-target candidates), top-1 accuracy and
    candidates (unmasked columns per anchor, its target included: shows how many hard
    negatives and masks took effect), for the a2p direction; one device sync."""
    total, count, best = stats.unbind(dim=1)
    seen = count.sum()
    neg = torch.where(seen > 0, total.sum() / seen.clamp_min(1), float("nan"))
    accuracy = (target_cos > best).to(target_cos.dtype).mean()
    candidates = count.to(target_cos.dtype).mean() + 1
    pos_sim, neg_sim, acc, cands = torch.stack([target_cos.mean(), neg, accuracy, candidates]).tolist()
    return {"pos_sim": pos_sim, "neg_sim": neg_sim, "accuracy": acc, "candidates": cands}
