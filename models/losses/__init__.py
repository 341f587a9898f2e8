"""Contrastive objectives behind one interface, chosen by ``LossConfig.type``."""

from __future__ import annotations

from models.config import LossConfig
from models.losses.base import ContrastiveLoss, LossOutput, apply_loss, loss_side_inputs
from models.losses.infonce import InfoNCE

__all__ = ["ContrastiveLoss", "InfoNCE", "LossOutput", "apply_loss", "build_loss", "loss_side_inputs"]


def build_loss(cfg: LossConfig) -> ContrastiveLoss:
    """The loss object a config describes; the training step never names a concrete class."""
    if cfg.type == "infonce":
        return InfoNCE(
            symmetric=cfg.symmetric, gather=cfg.gather, tiled=cfg.mode == "tiled", block_size=cfg.block_size
        )
    raise ValueError(f"unknown loss.type {cfg.type!r}; expected one of: infonce")
