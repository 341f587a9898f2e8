"""Two towers, their projection heads and the learnable temperature: the model clray trains."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clray.models.config import ModelConfig
from clray.models.preprocess import INPUT_SUFFIXES, NEGATIVE_PREFIX
from clray.models.towers import build_tower


def build_projection(kind: str, tower_dim: int, embed_dim: int) -> nn.Module:
    """The head mapping a tower's width to the shared embedding space.

    ``linear`` has no bias because the output is L2-normalised: a bias would only shift
    every embedding the same way, which the normalisation turns into a data-independent
    distortion rather than useful capacity (CLIP drops it too). The ``mlp`` hidden
    width equals the tower width so the head cannot bottleneck below the tower.
    """
    if kind == "linear":
        return nn.Linear(tower_dim, embed_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(tower_dim, tower_dim), nn.GELU(), nn.Linear(tower_dim, embed_dim))
    if kind == "none":
        if tower_dim != embed_dim:
            raise ValueError(
                f"model.projection = \"none\" needs the tower width ({tower_dim}) to equal "
                f"model.embed_dim ({embed_dim}): set embed_dim = {tower_dim} or use "
                "projection = \"linear\""
            )
        return nn.Identity()
    raise ValueError(f"unknown model.projection {kind!r}; expected linear, mlp or none")


class Encoded(NamedTuple):
    """Everything a loss needs from one forward pass."""

    anchor: Tensor
    """[b, d] unit-norm anchor embeddings."""
    positive: Tensor
    """[b, d] unit-norm positive embeddings."""
    negatives: Tensor | None
    """[b, k, d] unit-norm hard-negative embeddings (positive tower), when the batch has
    ``negative_*`` inputs."""
    scale: Tensor
    """0-d logit scale (inverse temperature), clamped."""
    bias: Tensor | None
    """0-d logit bias, when the model has one (SigLIP)."""


def scheduled_temperature(init: float, final: float, progress: float, schedule: str) -> float:
    """Temperature at ``progress`` in [0, 1] of a run, from ``init`` to ``final``."""
    progress = min(1.0, max(0.0, progress))
    if schedule == "linear":
        weight = progress
    elif schedule == "cosine":
        weight = 0.5 * (1 - math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown temperature schedule {schedule!r}; expected cosine or linear")
    return init + (final - init) * weight


class DualEncoder(nn.Module):
    """Anchor and positive towers mapped into one normalised embedding space.

    With ``shared_tower`` the positive side *is* the anchor side (same module objects),
    but it is deliberately not registered a second time: ``state_dict`` then holds each
    weight once (safetensors refuses aliased tensors) and optimizers, DeepSpeed ZeRO
    partitioning and DDP see every parameter exactly once.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.anchor_tower = build_tower(cfg.anchor)
        self.anchor_projection = build_projection(cfg.projection, self.anchor_tower.output_dim, cfg.embed_dim)
        if cfg.shared_tower:
            # object.__setattr__ bypasses nn.Module registration: an alias, not a child.
            object.__setattr__(self, "positive_tower", self.anchor_tower)
            object.__setattr__(self, "positive_projection", self.anchor_projection)
        else:
            self.positive_tower = build_tower(cfg.positive_tower)
            self.positive_projection = build_projection(
                cfg.projection, self.positive_tower.output_dim, cfg.embed_dim
            )

        scale_cfg = cfg.logit_scale
        # Shape [1], not a 0-d scalar: DeepSpeed broadcasts parameters as byte views,
        # which 0-d tensors cannot take. Only mode = "learnable" trains it; "fixed" and
        # "scheduled" keep it frozen (no optimizer state) and "scheduled" overwrites the
        # value it uses through set_progress().
        self.logit_scale = nn.Parameter(
            torch.full((1,), math.log(1.0 / scale_cfg.init_temperature)),
            requires_grad=scale_cfg.mode == "learnable",
        )
        self.max_log_scale = math.log(scale_cfg.max_scale)
        # A buffer, not an attribute, so it follows .to(device) and dtype casts; not
        # persistent because it is a function of the step, which checkpoints already hold.
        self.register_buffer(
            "scheduled_log_scale", torch.full((1,), math.log(1.0 / scale_cfg.init_temperature)), persistent=False
        )
        if cfg.logit_bias is not None:
            self.logit_bias = nn.Parameter(
                torch.full((1,), float(cfg.logit_bias.init)), requires_grad=cfg.logit_bias.learnable
            )
        else:
            self.logit_bias = None

    def _encode(self, tower: nn.Module, projection: nn.Module, batch: dict[str, Tensor], prefix: str) -> Tensor:
        return F.normalize(projection(tower(batch, prefix)), dim=-1)

    def encode_anchor(self, batch: dict[str, Tensor]) -> Tensor:
        """Unit-norm embeddings of the ``anchor_*`` inputs (cosine = dot product downstream)."""
        return self._encode(self.anchor_tower, self.anchor_projection, batch, "anchor")

    def encode_positive(self, batch: dict[str, Tensor]) -> Tensor:
        """Unit-norm embeddings of the ``positive_*`` inputs."""
        return self._encode(self.positive_tower, self.positive_projection, batch, "positive")

    def has_negatives(self, batch: dict[str, Any]) -> bool:
        return any(f"{NEGATIVE_PREFIX}_{suffix}" in batch for suffix in INPUT_SUFFIXES)

    def encode_negatives(self, batch: dict[str, Tensor]) -> Tensor:
        """[b, k, d] unit-norm embeddings of the ``negative_*`` inputs ([b, k, ...] each),
        encoded by the positive tower: a hard negative is a wrong positive."""
        keys = [f"{NEGATIVE_PREFIX}_{suffix}" for suffix in INPUT_SUFFIXES]
        inputs = {key: batch[key] for key in keys if key in batch}
        b, k = next(iter(inputs.values())).shape[:2]
        flat = {key: value.reshape(b * k, *value.shape[2:]) for key, value in inputs.items()}
        return self._encode(self.positive_tower, self.positive_projection, flat, NEGATIVE_PREFIX).reshape(b, k, -1)

    def set_progress(self, progress: float) -> None:
        """Tell a scheduled temperature how far through the run training is (0 to 1)."""
        cfg = self.cfg.logit_scale
        if cfg.mode != "scheduled":
            return
        assert cfg.final_temperature is not None
        temperature = scheduled_temperature(cfg.init_temperature, cfg.final_temperature, progress, cfg.schedule)
        self.scheduled_log_scale.fill_(math.log(1.0 / temperature))

    def scale(self) -> Tensor:
        """The inverse temperature the loss multiplies cosines by, clamped at ``max_scale``.

        The clamp happens here, in the forward pass, rather than in place on the parameter
        after the optimizer step (as CLIP does): under DeepSpeed ZeRO the optimizer owns
        an fp32 master copy of every parameter and writes it back on the next step, so an
        in-place clamp of the module's (partitioned, possibly half-precision) copy would be
        silently undone. Clamping the value that is used is correct under any engine. The
        clamp also zeroes the gradient while the scale sits at the cap, so it cannot grow.
        """
        log_scale = self.scheduled_log_scale if self.cfg.logit_scale.mode == "scheduled" else self.logit_scale
        return log_scale.clamp(max=self.max_log_scale).exp().squeeze(0)

    def bias(self) -> Tensor | None:
        return None if self.logit_bias is None else self.logit_bias.squeeze(0)

    def forward(self, batch: dict[str, Tensor]) -> Encoded:
        """Embeddings of every view in the batch, logit scale and bias: everything a loss needs."""
        negatives = self.encode_negatives(batch) if self.has_negatives(batch) else None
        return Encoded(self.encode_anchor(batch), self.encode_positive(batch), negatives, self.scale(), self.bias())

    @property
    def temperature(self) -> float:
        """The effective softmax temperature (after the clamp), for logging and tuning reports.

        Under ZeRO-3 ``logit_scale`` is partitioned outside the forward pass: read this
        inside ``deepspeed.zero.GatheredParameters([model.logit_scale])``.
        """
        return 1.0 / float(self.scale().detach())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices and embeddings only.

        Decaying biases and norm gains pulls them toward zero for no regularisation
        benefit, and decaying ``logit_scale`` would drag the temperature back up toward 1
        throughout training (``logit_bias`` toward 0). Frozen parameters are left out so the optimizer holds no
        state for them.
        """
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim >= 2 and name not in ("logit_scale", "logit_bias"):
                decay.append(param)
            else:
                no_decay.append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
