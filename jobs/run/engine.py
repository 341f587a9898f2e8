"""The DeepSpeed engine of one training worker: building it, one optimizer step, and
adopting a new learning rate and temperature (no Ray in this module).

Why a client optimizer (torch AdamW) instead of DeepSpeed's config optimizer: the config
path selects FusedAdam, which JIT-compiles a C++ op on first use (minutes on a small CPU
box, and racy when several workers compile at once). torch's AdamW needs no build and is
what ZeRO partitions anyway.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from clray.jobs.config import JobConfig
from clray.jobs.run.reduction import own_reduction
from clray.jobs.runtime import own_op_builds


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
    # would not turn clipping off. 0 too where clray clips itself (own_clip).
    ds["gradient_clipping"] = 0.0 if own_clip(cfg) else cfg.optim.grad_clip
    return ds


def own_clip(cfg: JobConfig) -> float:
    """The norm clray clips gradients to itself, just before DeepSpeed's step (0: DeepSpeed
    clips, or nobody does).

    At ZeRO-0 in fp32 every rank holds the whole averaged gradient, so torch's
    ``clip_grad_norm_`` (one fused norm over all gradients) clips exactly as DeepSpeed
    would, without DeepSpeed's per-parameter loop and its all-reduce of a norm every rank
    already has: one more wait for the other ranks each step. ZeRO 1-3 partition the
    gradients and bf16 keeps fp32 master gradients inside DeepSpeed's optimizer: there
    DeepSpeed clips."""
    return cfg.optim.grad_clip if cfg.train.zero_stage == 0 and not use_bf16(cfg) else 0.0


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


def fused_adamw_supported(device_type: str) -> bool:
    """torch's fused AdamW: CUDA since 2.0, CPU since 2.4. On CPU it is about 5x faster
    than the default for-loop AdamW (0.05 s against 0.26 s a step for the 22.7M parameters
    of MiniLM-L6 on one core), which is most of the optimizer step clray adds to a step."""
    if device_type == "cuda":
        return True
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 4)


def build_engine(model: torch.nn.Module, cfg: JobConfig, total_steps: int, load_universal: bool = False):
    """Wrap the model in a DeepSpeed engine with AdamW + warmup/cosine; returns the engine.

    ``load_universal``: the engine will load a DeepSpeed universal checkpoint (one saved
    by another worker count and converted, ``jobs.run.resume.prepare_elastic``)."""
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    own_op_builds()  # the ninja the op was pre-built with; another one builds it again
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)

    device_type = next(model.parameters()).device.type
    optimizer = torch.optim.AdamW(
        model.param_groups(cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        fused=fused_adamw_supported(device_type) or None,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(total_steps, warmup_steps(cfg, total_steps), cfg.optim.min_lr_ratio),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config={**deepspeed_config(cfg), **({"checkpoint": {"load_universal": True}} if load_universal else {})},
        dist_init_required=False,
    )
    engine.clray_clip_norm = own_clip(cfg)  # read by train_step
    own_reduction(engine)  # ZeRO-0 fp32: the gradient all-reduce by rows of the vocabulary
    return engine


class PhaseTimes:
    """Seconds spent in each phase of the training steps since the last ``reset``: what
    the worker logs as ``time/<phase>`` (mean seconds per step) so a run says where its
    step time goes. perf_counter only: no synchronisation is added on CPU; on GPU the
    phases are as the host sees them (kernels run asynchronously)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.seconds.clear()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started


def watch_reduction(engine: Any, times: PhaseTimes) -> None:
    """Time DeepSpeed's gradient reduction (``allreduce_gradients``, which ``backward``
    calls at its end: the all-reduce at ZeRO 0, the reduce-scatter epilogue at ZeRO 1-3)
    into ``times["reduce"]``, by wrapping that method on this engine instance. DeepSpeed's
    own timers (``wall_clock_breakdown``) would do it too, but print a line every step."""
    original = engine.allreduce_gradients

    def timed(*args: Any, **kwargs: Any) -> Any:
        with times.phase("reduce"):
            return original(*args, **kwargs)

    engine.allreduce_gradients = timed


def train_step(
    engine: Any, loss_fn: torch.nn.Module, batch: dict[str, Any], gradcache_chunk: int | None = None,
    times: PhaseTimes | None = None,
) -> tuple[Any, float, float | None]:
    """One optimizer step: encode, loss over gathered candidates, backward, step.

    With ``gradcache_chunk`` the encoder runs in chunks of that many rows and their cached
    embedding gradients are backpropagated chunk by chunk (:mod:`models.gradcache`); the
    engine's gradient-accumulation boundary is set on the last chunk only, so ZeRO reduces
    and partitions the summed gradients once. That is not just cheaper: under ZeRO 1 and 2
    a parameter that gets no gradient in a boundary backward ends the step with a zero
    gradient, so a boundary on every chunk would silently drop the logit scale's gradient
    (it enters in the first chunk only). tests/test_gradcache_deepspeed.py checks the
    result equals the uncached step at ZeRO 0-3.

    Returns the loss output and the logit scale and bias the step used: under ZeRO-3
    those parameters are partitioned outside forward, so this is where they are readable.
    ``times`` gets the step's seconds in forward (encoders and loss), backward (with the
    gradient reduction inside it; ``watch_reduction`` books that part as "reduce") and
    the optimizer step; with gradcache, "forward" holds the chunks' re-encoding too."""
    from clray.models.gradcache import gradcache_step
    from clray.models.losses import apply_loss

    times = times if times is not None else PhaseTimes()
    used: dict[str, Any] = {}

    def compute(encoded: Any) -> Any:
        used["scale"], used["bias"] = encoded.scale, encoded.bias
        return apply_loss(loss_fn, encoded, batch)

    if gradcache_chunk:
        if engine.gradient_accumulation_steps() != 1:
            # The chunks *are* the accumulation: one train_step is one optimizer step.
            raise ValueError(
                "gradcache needs DeepSpeed gradient_accumulation_steps = 1 (it sets the "
                f"accumulation boundary itself), got {engine.gradient_accumulation_steps()}"
            )

        def backward(surrogate: torch.Tensor, last: bool) -> None:
            engine.set_gradient_accumulation_boundary(last)
            with times.phase("backward"):
                engine.backward(surrogate)

        device = next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).device
        started, before = time.perf_counter(), times.seconds["backward"]
        out = gradcache_step(engine, batch, gradcache_chunk, compute, backward, device=device)
        times.seconds["forward"] += time.perf_counter() - started - (times.seconds["backward"] - before)
    else:
        with times.phase("forward"):
            out = compute(engine(batch))
        with times.phase("backward"):
            engine.backward(out.loss)
    with times.phase("step"):
        clip = getattr(engine, "clray_clip_norm", 0.0)
        if clip:
            torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip)
        engine.step()
    bias = used["bias"]
    return out, float(used["scale"].detach().float()), None if bias is None else float(bias.detach().float())


def adopt_config(engine: Any, cfg: JobConfig) -> None:
    """After restoring another run's checkpoint (a PBT exploit), take this config's learning
    rate and temperature instead of the checkpoint's: that is the perturbation.

    The LR keeps its place on the schedule (warmup/cosine position from the checkpoint);
    only the peak it scales changes. The temperature restarts at init_temperature, and a
    learnable one trains on from there."""
    schedule = engine.lr_scheduler
    factor = schedule.lr_lambdas[0](schedule.last_epoch)
    schedule.base_lrs = [cfg.optim.lr for _ in schedule.base_lrs]
    for group in engine.optimizer.param_groups:
        group["lr"] = cfg.optim.lr * factor
    if cfg.model.logit_scale.mode == "scheduled":
        return  # the schedule sets it each step from the config
    value = math.log(1.0 / cfg.model.logit_scale.init_temperature)
    param = engine.module.logit_scale
    if param.requires_grad:
        # ZeRO keeps an fp32 master copy of trained parameters and writes it back into the
        # model after each step: set that copy too, or the next step undoes the change.
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, torch.full((1,), value, dtype=torch.float32, device=param.device))
    if cfg.train.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            with torch.no_grad():
                param.fill_(value)
    else:
        with torch.no_grad():
            param.fill_(value)
