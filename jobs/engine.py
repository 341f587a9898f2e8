"""DeepSpeed engine construction for one training worker (no Ray in this module).

Why a client optimizer (torch AdamW) instead of DeepSpeed's config optimizer: the config
path selects FusedAdam, which JIT-compiles a C++ op on first use (minutes on a small CPU
box, and racy when several workers compile at once). torch's AdamW needs no build and is
what ZeRO partitions anyway.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from clray.jobs.config import JobConfig


def use_bf16(cfg: JobConfig) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cfg.scaling.use_gpu)


def cast_batch(batch: dict[str, torch.Tensor], bf16: bool) -> dict[str, torch.Tensor]:
    """Floating inputs (pixels) to bf16 when the engine runs in bf16; DeepSpeed casts the
    module, not its inputs. Token ids and masks stay integers."""
    if not bf16:
        return batch
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}


def deepspeed_config(cfg: JobConfig) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.local_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    # Always explicit: left out, DeepSpeed clips at its default of 1.0, so grad_clip = 0
    # would not turn clipping off.
    ds["gradient_clipping"] = cfg.optim.grad_clip
    return ds


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warmup from ~0, then cosine decay to min_lr_ratio."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warmup_steps(cfg: JobConfig, total_steps: int) -> int:
    if cfg.optim.warmup_steps:
        return min(cfg.optim.warmup_steps, total_steps)
    return int(cfg.optim.warmup_fraction * total_steps)


def build_engine(model: torch.nn.Module, cfg: JobConfig, total_steps: int):
    """Wrap the model in a DeepSpeed engine with AdamW + warmup/cosine; returns the engine."""
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)

    optimizer = torch.optim.AdamW(
        model.param_groups(cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(total_steps, warmup_steps(cfg, total_steps), cfg.optim.min_lr_ratio),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(cfg),
        dist_init_required=False,
    )
    return engine
