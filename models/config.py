"""Typed configs for everything in ``models/``: towers, the dual encoder and the loss.

They live here, not in ``jobs/``, so a plain torchrun script can build a model from a
dict without importing Ray or the job layer. ``jobs.config`` composes them into the
job config. Every model rejects unknown keys so a typo is an error, not a silent default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

DEFER_RULES = "clray.defer_section_rules"
"""Validation-context key. ``Model.model_validate(raw, context={DEFER_RULES: True})``
keeps a section from raising its within-section rules (``LossConfig.rule_problems``):
the caller reports them itself, next to the problems that span sections, so that one
error lists them all (``jobs.config.validate`` does). Anywhere else (a ``LossConfig``
built from a dict, an assignment) the rules raise as validation errors."""


class Strict(BaseModel):
    """Base for all config sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TextTowerConfig(Strict):
    """A Hugging Face ``transformers`` encoder for one text view."""

    type: Literal["text"] = "text"
    pretrained: str | None = None
    """Local directory of a saved ``transformers`` model (``save_pretrained`` layout).
    Nothing is downloaded: a hub id that is not a local directory is an error."""
    config: dict[str, Any] | None = None
    """A ``transformers`` config dict (must contain ``model_type``) for a randomly
    initialised encoder, e.g. ``{model_type="bert", hidden_size=64, ...}``."""
    tokenizer: str = "char"
    """``char`` (clray's built-in character tokenizer, needs no files) or a local
    directory with a saved tokenizer. Defaults to ``pretrained`` when that is set."""
    pooling: Literal["mean", "cls"] = "mean"
    """How token states become one vector: masked mean, or the first token."""
    max_length: int = Field(default=32, ge=2)
    """Tokens per text after truncation."""
    split_by_length: bool = True
    """Encode a batch's rows in a few groups of similar length, each padded to its own
    longest row, instead of all of them at the batch's longest row. The rows, their
    embeddings (to float rounding) and so the negatives are unchanged; only work on
    padding is saved. The groups are chosen by a cost model (``models.towers.split_costs``)
    that weighs the padding saved against the cost of one more encoder call, so a batch of
    even lengths, or a small model whose calls cost more than its tokens, stays whole."""

    @model_validator(mode="after")
    def _one_source(self) -> TextTowerConfig:
        if (self.pretrained is None) == (self.config is None):
            raise ValueError(
                "set exactly one of `pretrained` (a local model directory) or `config` "
                "(a transformers config dict with model_type) for a text tower"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("`config` needs a `model_type` key, e.g. model_type = \"bert\"")
        return self


class ConvTowerConfig(Strict):
    """A small convolutional image encoder (fast on CPU; the quickstart uses it)."""

    type: Literal["conv"] = "conv"
    channels: list[int] = Field(default_factory=lambda: [32, 64])
    """Output channels of each conv block (conv-BN-ReLU-conv-BN-ReLU)."""
    image_size: int = Field(default=32, ge=4)
    """Images are resized to image_size x image_size before encoding."""
    image_mode: Literal["L", "RGB"] = "RGB"
    """Pillow mode images are converted to: L (grayscale) or RGB."""


class VitTowerConfig(Strict):
    """A ViT image encoder built from a ``transformers`` ViTConfig (random init)."""

    type: Literal["vit"] = "vit"
    config: dict[str, Any] = Field(default_factory=dict)
    """ViTConfig keys (hidden_size, num_hidden_layers, patch_size, ...);
    image_size and num_channels are filled from this section."""
    pretrained: str | None = None
    """Local directory of a saved ViT model; overrides `config` when set."""
    image_size: int = Field(default=32, ge=4)
    image_mode: Literal["L", "RGB"] = "RGB"
    pooling: Literal["mean", "cls"] = "cls"


TowerConfig = Annotated[
    TextTowerConfig | ConvTowerConfig | VitTowerConfig, Field(discriminator="type")
]


class LogitScaleConfig(Strict):
    """The inverse temperature the loss multiplies cosine similarities by."""

    mode: Literal["learnable", "fixed", "scheduled"] = "learnable"
    """learnable: one global parameter, log(1/temperature), trained with the model (no
    weight decay, clamped at max_scale in the forward pass). fixed: init_temperature for
    the whole run. scheduled: moves from init_temperature to final_temperature over the
    run along `schedule` (not trained)."""
    init_temperature: float = Field(default=0.07, gt=0)
    """Initial softmax temperature (the one a Tune search usually varies)."""
    final_temperature: float | None = Field(default=None, gt=0)
    """Temperature at the last step when mode = "scheduled"."""
    schedule: Literal["cosine", "linear"] = "cosine"
    """Shape of the scheduled temperature's path from init to final."""
    max_scale: float = Field(default=100.0, gt=0)
    """The scale (1/temperature) is clamped to at most this in the forward pass."""

    @model_validator(mode="after")
    def _schedule(self) -> LogitScaleConfig:
        if self.mode == "scheduled" and self.final_temperature is None:
            raise ValueError('mode = "scheduled" needs final_temperature (the temperature at the last step)')
        if self.mode != "scheduled" and self.final_temperature is not None:
            raise ValueError('final_temperature only applies to mode = "scheduled"; remove it or set that mode')
        return self


class LogitBiasConfig(Strict):
    """The additive logit offset of the sigmoid loss (SigLIP); softmax losses ignore it."""

    init: float = -10.0
    """Initial bias. -10 (SigLIP's choice) starts every pair near "not a match", which
    keeps the many negatives from dominating the first steps."""
    learnable: bool = True


class ModelConfig(Strict):
    anchor: TowerConfig = Field(default_factory=lambda: ConvTowerConfig())
    """Tower that encodes the anchor view (`data.anchor`)."""
    positive: TowerConfig | None = None
    """Tower for the positive view; leave unset with shared_tower = true."""
    shared_tower: bool = False
    """One tower (and projection) for both views, e.g. symmetric text-text retrieval."""
    embed_dim: int = Field(default=128, ge=1)
    """Shared embedding dimension both projections map to."""
    projection: Literal["linear", "mlp", "none"] = "linear"
    """Head on top of each tower; `none` needs the tower width to equal embed_dim."""
    logit_scale: LogitScaleConfig = Field(default_factory=LogitScaleConfig)
    logit_bias: LogitBiasConfig | None = None
    """A learnable logit bias; the sigmoid loss (loss.type = "siglip") gets one by default."""

    @model_validator(mode="after")
    def _towers(self) -> ModelConfig:
        if self.shared_tower and self.positive is not None:
            raise ValueError("shared_tower = true uses the anchor tower for both views: remove [model.positive]")
        if not self.shared_tower and self.positive is None:
            raise ValueError("set [model.positive] (the positive view's tower) or shared_tower = true")
        return self

    @property
    def positive_tower(self) -> TextTowerConfig | ConvTowerConfig | VitTowerConfig:
        return self.anchor if self.shared_tower else self.positive  # type: ignore[return-value]


class LossConfig(Strict):
    """The training objective and how it is computed across workers (``models.losses``).

    Settings that rule each other out within this section (``rule_problems``) are
    refused by its own validation, so a plain script gets the same errors as ``clray``.
    """

    type: Literal["infonce", "siglip", "dcl", "supcon"] = "infonce"
    """The objective. infonce: CLIP's softmax loss over gathered candidates (plus optional
    hard-negative columns). siglip: pairwise sigmoid loss with a learnable bias. dcl:
    decoupled contrastive loss (the positive is left out of the denominator). supcon:
    supervised contrastive loss, every candidate with the anchor's label is a positive
    (needs data.label_column)."""
    symmetric: bool = True
    """Average anchor->positive and positive->anchor directions (CLIP); false keeps only
    anchor->positive. siglip scores each pair once, so it has no second direction."""
    gather: bool = True
    """Score local anchors against candidates from every worker (exact gradients through
    the gather). False restricts negatives to the worker's own batch."""
    mode: Literal["gather", "tiled", "ring"] = "gather"
    """gather: the [local rows x all candidates] logits are materialised (fastest while
    they fit). tiled: log-sum-exp is accumulated over block x block tiles and tiles are
    recomputed in backward, so that matrix never exists. ring: candidate blocks travel
    around the ring of workers instead of being gathered (no worker holds them all),
    tiled inside each block. All three give the same loss and gradients."""
    block_size: int = Field(default=1024, ge=1)
    """Rows and columns per tile in tiled and ring mode."""
    hardness_beta: float = Field(default=0.0, ge=0)
    """Hard-negative weighting (infonce, dcl): negatives are importance-weighted by
    exp(beta * logit), normalised to mean 1 per anchor, so harder negatives count more.
    0 turns it off."""
    mask_same_id: bool = False
    """Drop candidates whose id (data.id_column, or data.negative_id_column for hard
    negatives) equals the anchor's id from the denominator: duplicates are not negatives."""
    mask_same_label: bool = False
    """Drop candidates that share the anchor's label (data.label_column) from the
    denominator (infonce, dcl, siglip). supcon makes them positives instead."""
    teacher_threshold: float | None = None
    """Drop an anchor's hard negatives whose teacher similarity (data.negative_score_column)
    exceeds this: they are probably unlabelled positives."""
    in_batch_margin: float | None = Field(default=None, ge=0, lt=1)
    """Positive-aware filtering of in-batch candidates (NV-Retriever's TopK-PercPos): drop
    in-batch candidate j from anchor i's loss when the teacher scores it above
    ``pos_i - margin * |pos_i|``, pos_i the teacher's score of i's own positive. Needs a
    packed plan mined with mining.in_batch_scores and data.in_batch_score_column. Mined
    batches gather near-duplicates; this keeps them from being pushed apart. None: off."""
    gradcache: bool = False
    """Compute embeddings in chunks of `chunk_size` without a graph, run the loss on the
    whole global batch, then re-encode each chunk (same RNG) and backpropagate its cached
    gradient: the batch can be far larger than activation memory allows. Combines with
    every mode and ZeRO stage."""
    chunk_size: int = Field(default=32, ge=1)
    """Rows per re-encoded chunk with gradcache = true."""

    def rule_problems(self) -> list[str]:
        """Settings of this section that rule each other out, one line each naming the keys
        and the fix. They need nothing outside the section, so they are the section's
        own validation; rules that need ``data.*`` columns are the job config's
        (``jobs.config``). The loss classes refuse the first two once more through their
        traits; ring without gather is well defined for a loss (each rank's own block,
        tiled), only pointless to ask for in a config."""
        problems: list[str] = []
        if self.type == "supcon" and self.mask_same_label:
            problems.append(
                'loss.mask_same_label = true removes same-label candidates, but loss.type = "supcon" counts '
                "them as positives: set mask_same_label = false (or a type that masks them: infonce, dcl, siglip)"
            )
        if self.hardness_beta > 0 and self.type not in ("infonce", "dcl"):
            problems.append(
                f'loss.hardness_beta re-weights softmax negatives; loss.type = "{self.type}" has none: '
                "use infonce or dcl, or set hardness_beta = 0"
            )
        if self.mode == "ring" and not self.gather:
            problems.append(
                'loss.mode = "ring" exchanges candidates between workers, but loss.gather = false keeps '
                'them local: set gather = true or mode = "tiled"'
            )
        return problems

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> LossConfig:
        problems = self.rule_problems()
        if problems and not (info.context or {}).get(DEFER_RULES):
            raise ValueError("\n".join(problems))
        return self
