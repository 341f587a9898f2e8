"""Contrastive objectives behind one interface, chosen by ``LossConfig.type`` and ``mode``."""

from __future__ import annotations

from clray.models.config import LossConfig
from clray.models.losses.base import ContrastiveLoss, LossOutput, apply_loss, loss_side_inputs
from clray.models.losses.contrastive import (
    DCL,
    LOSSES,
    MODES,
    ContrastiveObjective,
    InfoNCE,
    SigLIP,
    SupCon,
)

__all__ = [
    "DCL",
    "MODES",
    "ContrastiveLoss",
    "ContrastiveObjective",
    "InfoNCE",
    "LossOutput",
    "SigLIP",
    "SupCon",
    "apply_loss",
    "build_loss",
    "loss_side_inputs",
]


def build_loss(cfg: LossConfig) -> ContrastiveObjective:
    """The loss object a config describes; the training step never names a concrete class.

    Raises ValueError, naming the ``loss.<key>``, for combinations that make no sense
    (e.g. ``hardness_beta`` with siglip or supcon, ``mask_same_label`` with supcon).
    ``gradcache`` and ``chunk_size`` are not the loss's business: the training step wraps
    any loss in :func:`models.gradcache.gradcache_step`.
    """
    if cfg.type not in LOSSES:
        raise ValueError(f"unknown loss.type {cfg.type!r}; expected one of: {', '.join(LOSSES)}")
    return LOSSES[cfg.type](
        symmetric=cfg.symmetric,
        gather=cfg.gather,
        mode=cfg.mode,
        block_size=cfg.block_size,
        hardness_beta=cfg.hardness_beta,
        mask_same_id=cfg.mask_same_id,
        mask_same_label=cfg.mask_same_label,
        teacher_threshold=cfg.teacher_threshold,
    )
