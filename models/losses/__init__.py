"""Contrastive objectives behind one interface, chosen by ``LossConfig.type`` and ``mode``.

One class per objective, each in its own module with its formula (:mod:`.infonce`,
:mod:`.dcl`, :mod:`.supcon`, :mod:`.siglip`); the machinery they share (modes, masks,
gathering) is :mod:`.contrastive`, and the blockwise engine :mod:`.blockwise` with
:mod:`.ring`. :data:`LOSSES` is the one place a ``loss.type`` name becomes a class.
"""

from __future__ import annotations

from clray.models.config import LossConfig
from clray.models.losses.base import ContrastiveLoss, LossOutput, apply_loss, loss_side_inputs
from clray.models.losses.contrastive import MODES, ContrastiveObjective
from clray.models.losses.dcl import DCL
from clray.models.losses.infonce import InfoNCE
from clray.models.losses.siglip import SigLIP
from clray.models.losses.supcon import SupCon

__all__ = [
    "DCL",
    "LOSSES",
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

LOSSES: dict[str, type[ContrastiveObjective]] = {cls.objective: cls for cls in (InfoNCE, DCL, SupCon, SigLIP)}
"""``loss.type`` -> the objective's class: the registry :func:`build_loss` picks from."""


def build_loss(cfg: LossConfig) -> ContrastiveObjective:
    """The loss object a config describes; the training step never names a concrete class.

    ``LossConfig`` validation already refuses combinations that make no sense (e.g.
    ``hardness_beta`` with siglip or supcon, ``mask_same_label`` with supcon); the class
    refuses those that its traits rule out once more, for a config built without
    validation (``model_construct``), with a ValueError naming the ``loss.<key>``.
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
        in_batch_margin=cfg.in_batch_margin,
    )
