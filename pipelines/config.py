"""Typed config for the data section: where shards are and how columns map to views."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from clray.models.config import Strict


class ViewConfig(Strict):
    column: str
    """Parquet column holding this view."""
    kind: Literal["text", "image"]
    """text: a string column; image: encoded PNG/JPEG bytes (binary column)."""


class DataConfig(Strict):
    train: list[str]
    """Training shards: directories, globs or .parquet files (a single string is accepted)."""
    eval: list[str] = Field(default_factory=list)
    """Held-out shards for the end-of-run evaluation (empty: no evaluation)."""
    anchor: ViewConfig
    positive: ViewConfig
    id_column: str = "id"
    """Unique row id; quarantined rows are reported by it."""
    label_column: str | None = None
    """Optional integer class label; enables zero-shot accuracy on the eval split (and
    loss.type = "supcon", loss.mask_same_label)."""
    negatives: ViewConfig | None = None
    """Hard negatives: a list column per row (texts, or encoded images), of the positive
    view's kind, e.g. what `clray mine` writes. Encoded by the positive tower and added
    to every anchor's candidates. Training split only."""
    num_negatives: int = Field(default=1, ge=1)
    """Hard negatives used per row (the first ones of each list); rows with fewer are
    quarantined."""
    negative_id_column: str | None = None
    """List column of the hard negatives' ids (same order), for loss.mask_same_id."""
    negative_score_column: str | None = None
    """List column of the teacher's similarity between the anchor and each hard negative
    (same order), for loss.teacher_threshold."""
    in_batch_score_column: str | None = None
    """Packed plans mined with mining.in_batch_scores: the column holding each global
    batch's teacher similarities (anchor i against in-batch positive j), which
    loss.in_batch_margin uses to mask likely false negatives among in-batch candidates."""
    class_names: list[str] = Field(default_factory=list)
    """Name of each label value (index = label) for zero-shot prompts."""
    prompt_templates: list[str] = Field(default_factory=lambda: ["{}"])
    """Zero-shot prompts; `{}` is replaced by the class name; embeddings are averaged."""
    batches: Literal["examples", "packed"] = "examples"
    """examples: `data.train` holds ordinary shards; rows are validated, shuffled and
    batched here. packed: `data.train` is ONE plan directory written by `clray mine` (the
    directory holding its manifest.json); each Parquet row there is one whole local batch
    of train.global_batch_size / scaling.num_workers rows, trained as mined (never split,
    never merged), one epoch plan per epoch (cycling when train.epochs exceeds the
    plans). data.shuffle, data.shuffle_buffer and data.cache do not apply to packed
    batches: the miner already shuffled the batch order of each plan and quarantined bad
    rows. data.eval stays ordinary shards. A plan mined for scaling.num_workers workers
    holds global batches: every step trains one of them, split over the ranks."""
    shuffle: Literal["global", "local", "none"] = "local"
    """global: full random shuffle each epoch (all-to-all); local: shuffled block order
    plus a shuffle buffer on each worker; none: file order."""
    shuffle_buffer: int = Field(default=2048, ge=1)
    """Rows in each worker's local shuffle buffer (shuffle = local)."""
    deterministic: bool = False
    """Same config, same batches: Ray Data keeps block order (preserve_order) and each
    worker's shuffle buffer is seeded from run.seed and the epoch. Costs some streaming
    overlap; worth it when runs are compared, e.g. trials of a search, where data-order
    noise would otherwise blur the effect of the searched keys."""
    preprocess_batch_size: int = Field(default=256, ge=1)
    """Rows per map_batches call for validation, decoding and tokenization."""
    num_cpus: float = Field(default=1.0, gt=0)
    """CPUs Ray Data may use for preprocessing beside the training workers."""
    cache: Literal["auto", "always", "never"] = "auto"
    """Keep the preprocessed training set in Ray's object store after the first pass, so
    later epochs skip read, decode and tokenize, and likewise the eval split, so each
    evaluation skips them. auto: each split when it fits `cache_max_gb` (its size is
    exact: tokens are stored padded to max_length and pixels have fixed shapes; batches
    are cut to their longest row only when a worker takes them)."""
    cache_max_gb: float = Field(default=2.0, gt=0)
    """Largest preprocessed training set `cache = "auto"` keeps in memory."""
    prefetch_batches: int = Field(default=2, ge=0)
    """Batches each worker prefetches while the current step runs."""
    pad_to_multiple_of: int = Field(default=1, ge=1)
    """Text is padded to the longest row of each batch (never to a tower's max_length,
    which only truncates), rounded up to a multiple of this: 8 suits GPU tensor cores; on
    CPU 1 (no rounding) does the least work."""
    group_by_length: bool = False
    """Batch rows of similar token length together: each worker sorts the rows of its
    shuffle window (data.shuffle_buffer rows) by length, cuts them into batches and
    shuffles the batch order, so padding almost vanishes. The batches are then no longer
    random samples: a row's in-batch negatives are texts of about its own length, so
    length stops being a cue that tells them apart (harder negatives, but a biased
    sample; see the README). Examples mode only: mined batches (packed) are trained as
    mined."""

    def without_negatives(self) -> DataConfig:
        """This config for a split that has no hard negatives (evaluation)."""
        return self.model_copy(update={"negatives": None, "negative_id_column": None, "negative_score_column": None,
                                       "in_batch_score_column": None})

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _listify(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("train")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one training shard, directory or glob")
        return value
