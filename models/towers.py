"""Encoders ("towers") that turn one view's model inputs into one vector per example.

Every tower has the same small surface, ``output_dim`` and ``forward(inputs, prefix)``,
so the dual encoder, the export code and the training loop never branch on the tower
kind. A tower reads its inputs by the key names fixed in :mod:`models.preprocess`
(``{prefix}_input_ids``/``{prefix}_attention_mask`` or ``{prefix}_pixel_values``), which
lets one batch dict carry both views and lets a shared tower encode either of them.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import Tensor, nn

from clray.models.config import ConvTowerConfig, TextTowerConfig, VitTowerConfig
from clray.models.encoding import length_spans
from clray.models.preprocess import build_tokenizer, local_dir, tokenizer_source

IMAGE_CHANNELS = {"L": 1, "RGB": 3}


def _without_pooler(factory: Any, *args: Any, **kwargs: Any) -> Any:
    """Build a ``transformers`` model without its pooler head when the class has one.

    We pool token states ourselves, so a BERT/ViT pooler would be parameters that never
    receive a gradient: DDP then needs ``find_unused_parameters`` and optimizers carry
    dead state. Not every architecture accepts ``add_pooling_layer`` (DistilBERT does
    not), hence the fallback.
    """
    try:
        return factory(*args, add_pooling_layer=False, **kwargs)
    except TypeError as exc:
        if "add_pooling_layer" not in str(exc):
            raise
        return factory(*args, **kwargs)


def _load_without_pooler(model_class: Any, path: str) -> nn.Module:
    """``model_class.from_pretrained(path)`` without its pooler (see :func:`_without_pooler`).

    The checkpoint's pooler weights are left out on purpose, so ``transformers``' load
    report, which would call them unexpected, is kept back when they are all it names;
    anything else (weights missing or mismatched, other unused ones) is still reported.
    """
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        model, info = _without_pooler(model_class.from_pretrained, path, local_files_only=True,
                                      output_loading_info=True)
    finally:
        log.setLevel(level)
    unused = sorted(k for k in info["unexpected_keys"] if not k.startswith("pooler."))
    missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if unused or missing:
        log.warning("%s from %s: weights missing or mismatched (newly initialised): %s; in the checkpoint "
                    "but not used: %s", type(model).__name__, path, ", ".join(missing) or "none",
                    ", ".join(unused) or "none")
    return model


def _pool_tokens(hidden: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    # clamp: an all-padding row (never produced by our tokenizer, which always adds
    # [CLS]/[SEP]) would otherwise give 0/0.
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class TextTower(nn.Module):
    """A ``transformers`` encoder plus masked-mean or CLS pooling over its last hidden state.

    The pooling matches sentence-transformers' ``Pooling`` module exactly, which is what
    lets an exported tower reproduce our embeddings under ``SentenceTransformer``.
    """

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.cfg = cfg
        tokenizer = build_tokenizer(cfg)
        if cfg.pretrained is not None:
            path = str(local_dir(cfg.pretrained, "text tower `pretrained`"))
            self.model = _load_without_pooler(AutoModel, path)
            fix = "point `tokenizer` at the directory of the tokenizer this model was trained with"
        else:
            hf_kwargs = dict(cfg.config or {})
            # A randomly initialised embedding table must cover every id the tokenizer
            # can emit; defaulting to the tokenizer's size avoids a silent index error
            # (or a wasted 30k-row table) when the config dict leaves it out.
            hf_kwargs.setdefault("vocab_size", len(tokenizer))
            if tokenizer.pad_token_id is not None:
                hf_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
            self.model = _without_pooler(AutoModel.from_config, AutoConfig.for_model(**hf_kwargs))
            fix = "remove vocab_size from the tower's config to use the tokenizer's size"
        # An id past the table is an opaque IndexError mid-training (or a device assert on
        # GPU); catch the mismatch at build time instead.
        table = self.model.get_input_embeddings().num_embeddings
        if table < len(tokenizer):
            raise ValueError(
                f"text tower has {table} token embeddings (vocab_size) but its tokenizer "
                f"({tokenizer_source(cfg)!r}) has {len(tokenizer)} tokens: {fix}"
            )
        self.output_dim: int = int(self.model.config.hidden_size)
        self.cost_override: tuple[float, float] | None = None
        """(overhead, attention) for ``length_spans`` in place of ``split_costs``' estimate."""
        self.pad_multiple = 1
        """``split_by_length`` rounds each chunk's width up to this (the run's
        ``data.pad_to_multiple_of``, set by ``pad_chunks_to``), as the batch itself is."""
        self._takes_embeds = "inputs_embeds" in inspect.signature(self.model.forward).parameters

    def forward(self, inputs: dict[str, Tensor], prefix: str) -> Tensor:
        mask = inputs[f"{prefix}_attention_mask"]
        ids = inputs[f"{prefix}_input_ids"]
        spans = self._spans(mask)
        if spans is None:
            out = self.model(input_ids=ids, attention_mask=mask)
            return _pool_tokens(out.last_hidden_state, mask, self.cfg.pooling)
        order, cuts = spans
        ids, mask = ids[order], mask[order]
        # One table lookup for every chunk: each lookup's backward writes a gradient the
        # size of the whole vocabulary table, which on MiniLM costs more than a small chunk.
        embeds = self.model.get_input_embeddings()(ids)
        parts = []
        for start, stop, width in cuts:
            part_mask = mask[start:stop, :width]
            out = self.model(inputs_embeds=embeds[start:stop, :width], attention_mask=part_mask)
            parts.append(_pool_tokens(out.last_hidden_state, part_mask, self.cfg.pooling))
        pooled = torch.cat(parts)
        return pooled[torch.argsort(order)]

    def _spans(self, mask: Tensor) -> tuple[Tensor, list[tuple[int, int, int]]] | None:
        """``split_by_length``: the rows in length order and the chunks to encode them in
        (``models.encoding.length_spans``), or None to encode the batch in one call (the
        option is off, the padding is on the left, one chunk is cheapest)."""
        if not self.cfg.split_by_length or not self._takes_embeds or mask.shape[0] < 2 or not bool(mask[:, 0].all()):
            return None
        counts = mask.sum(dim=1)
        order = torch.argsort(counts, stable=True)
        device = mask.device.type
        overhead, attention = self.cost_override or split_costs(self.model.config, device)
        cuts = length_spans(counts[order].cpu().numpy(), overhead, attention, self.pad_multiple, mask.shape[1])
        return None if len(cuts) == 1 else (order, cuts)


def pad_chunks_to(model: nn.Module, multiple: int) -> nn.Module:
    """Every text tower in ``model`` rounds its ``split_by_length`` chunks up to
    ``multiple`` tokens wide (``data.pad_to_multiple_of``: 8 suits GPU tensor cores), as
    the batches it is given are; returns ``model``."""
    if multiple < 1:
        raise ValueError(f"pad_to_multiple_of must be at least 1, got {multiple}")
    for module in model.modules():
        if isinstance(module, TextTower):
            module.pad_multiple = multiple
    return model


# The cost model behind split_by_length, measured on all-MiniLM-L6-v2 (hidden 384,
# intermediate 1536, 12 heads) on one CPU thread, forward and backward in train mode:
# 0.72 ms a token, 2.7 us a token per token of width (attention: it equals the per-token
# work at a width of 265), and 35 ms a call without the vocabulary table's gradient
# (48 tokens' worth). Other shapes scale by their per-token work and per-head attention.
_CPU_OVERHEAD_TOKENS = 48.0
_CUDA_OVERHEAD_TOKENS = 4096.0  # not measured: kernel launches outweigh thousands of tokens on a GPU
_ATTENTION_WIDTH = 265.0
_MINILM_TOKEN_WORK = 384 * (4 * 384 + 2 * 1536)


def split_costs(config: Any, device: str = "cpu") -> tuple[float, float]:
    """(overhead of one encoder call, in tokens; width at which attention doubles a
    token's cost) for a ``transformers`` config, scaled from the MiniLM measurement."""
    hidden = int(getattr(config, "hidden_size", 384))
    inner = int(getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * hidden)
    heads = max(1, int(getattr(config, "num_attention_heads", 12)))
    work = hidden * (4 * hidden + 2 * inner)
    # on CPU the per-token work is shared among the threads, the per-call cost is not
    base = _CUDA_OVERHEAD_TOKENS if device == "cuda" else _CPU_OVERHEAD_TOKENS * torch.get_num_threads()
    return base * _MINILM_TOKEN_WORK / work, _ATTENTION_WIDTH * (work / heads) / (_MINILM_TOKEN_WORK / 12)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm, not BatchNorm: it needs no batch statistics, so an embedding does not
    depend on which rank or batch its image landed in, W workers compute exactly what one
    process would, and train and eval behave the same."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ConvTower(nn.Module):
    """A small VGG-style CNN: cheap enough that the CPU quickstart trains in minutes."""

    def __init__(self, cfg: ConvTowerConfig) -> None:
        super().__init__()
        if not cfg.channels:
            raise ValueError("conv tower `channels` must list at least one block width, e.g. [32, 64]")
        if cfg.image_size >> (len(cfg.channels) - 1) < 1:
            raise ValueError(
                f"conv tower: {len(cfg.channels)} blocks halve a {cfg.image_size}px image below 1px; "
                "use fewer `channels` entries or a larger `image_size`"
            )
        self.cfg = cfg
        layers: list[nn.Module] = []
        in_ch = IMAGE_CHANNELS[cfg.image_mode]
        for i, out_ch in enumerate(cfg.channels):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [
                # No conv bias: the norm that follows has its own shift.
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                _group_norm(out_ch),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
                _group_norm(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.output_dim: int = cfg.channels[-1]

    def forward(self, inputs: dict[str, Tensor], prefix: str) -> Tensor:
        return self.net(inputs[f"{prefix}_pixel_values"])


class VitTower(nn.Module):
    """A ``transformers`` ViT with CLS or mean-of-patches pooling."""

    def __init__(self, cfg: VitTowerConfig) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        self.cfg = cfg
        num_channels = IMAGE_CHANNELS[cfg.image_mode]
        if cfg.pretrained is not None:
            path = str(local_dir(cfg.pretrained, "vit tower `pretrained`"))
            self.model = _load_without_pooler(ViTModel, path)
            got = (self.model.config.image_size, self.model.config.num_channels)
            if got != (cfg.image_size, num_channels):
                raise ValueError(
                    f"pretrained ViT at {cfg.pretrained!r} expects image_size={got[0]}, "
                    f"num_channels={got[1]}; set the tower's image_size = {got[0]} and "
                    f"image_mode = {'L' if got[1] == 1 else 'RGB'!r}"
                )
        else:
            vit_kwargs = dict(cfg.config)
            for key, value in (("image_size", cfg.image_size), ("num_channels", num_channels)):
                if key in vit_kwargs and vit_kwargs[key] != value:
                    raise ValueError(
                        f"vit tower: set image size / channels with the section's `image_size` and "
                        f"`image_mode`, not `config.{key}` (the decoder resizes to those)"
                    )
                vit_kwargs[key] = value
            self.model = ViTModel(ViTConfig(**vit_kwargs), add_pooling_layer=False)
        self.output_dim: int = int(self.model.config.hidden_size)

    def forward(self, inputs: dict[str, Tensor], prefix: str) -> Tensor:
        hidden = self.model(pixel_values=inputs[f"{prefix}_pixel_values"]).last_hidden_state
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        return hidden[:, 1:].mean(dim=1)  # patch tokens only; CLS is not an image region


Tower = TextTower | ConvTower | VitTower


def build_tower(cfg: TextTowerConfig | ConvTowerConfig | VitTowerConfig) -> nn.Module:
    """The tower a config section describes (one entry point, so callers never switch on type)."""
    if isinstance(cfg, TextTowerConfig):
        return TextTower(cfg)
    if isinstance(cfg, ConvTowerConfig):
        return ConvTower(cfg)
    if isinstance(cfg, VitTowerConfig):
        return VitTower(cfg)
    raise TypeError(f"unknown tower config type {type(cfg).__name__}")

