"""The job config: one typed section per component, composed here, loaded from TOML.

Loading reports every problem at once (schema errors from pydantic plus cross-field
checks, ``jobs.config.checks``), each naming the dotted key and what to change, before
Ray is touched. ``jobs.config.files`` reads and merges TOML; ``jobs.config.mine`` reads
a mining config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from clray.jobs.config.checks import (
    CHECKS,
    cross_field_problems,
    custom_resources,
    partial_problems,
    remine_problems,
)
from clray.jobs.config.errors import ConfigError, format_pydantic
from clray.jobs.config.files import (
    apply_overrides,
    dump_toml,
    merge_tables,
    parse_override,
    read_toml,
)
from clray.models.config import DEFER_RULES, LogitBiasConfig, LossConfig, ModelConfig, Strict
from clray.pipelines.config import DataConfig
from clray.pipelines.storage import StorageConfig, is_s3, join, normalize

__all__ = [
    "CHECKS", "ConfigError", "JobConfig", "OptimConfig", "RemineConfig", "RunConfig", "ScalingConfig",
    "Strict", "TrainConfig", "apply_overrides", "cross_field_problems", "dump_toml", "format_pydantic",
    "load_config", "merge_tables", "parse_override", "read_toml", "remine_problems", "validate",
]


class RunConfig(Strict):
    name: str = "run"
    """Run name; the run directory is output_dir/name. Starting a run again with the
    same name resumes from its latest checkpoint."""
    output_dir: str = "runs"
    """Where run directories live: a local directory (relative paths are taken from the
    working directory) or an s3://bucket/prefix URI (checkpoints, export, metrics and
    reports then all go there; see [storage])."""
    seed: int = 0
    """Seeds model init, shuffling and dropout."""


class OptimConfig(Strict):
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Applied to weight matrices only; biases, norms and the logit scale are excluded."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup steps; 0 uses warmup_fraction."""
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Warmup as a fraction of total steps when warmup_steps is 0."""
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Global gradient-norm clipping (0 disables)."""


class TrainConfig(Strict):
    global_batch_size: int = Field(default=128, ge=1)
    """Pairs per optimizer step over all workers; each worker takes global/num_workers."""
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    log_every: int = Field(default=10, ge=1)
    """Report training metrics every N steps."""
    report_every: int = Field(default=0, ge=0)
    """Also send metrics to Ray (ray.train.report, what Tune schedulers read) every N
    steps; 0: only with checkpoints and at the end. Ray Train's controller takes one
    report per worker per poll (every 0.5 s as clray sets it, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S),
    so reporting faster than that stalls training; progress and metrics.jsonl get every
    log_every step regardless."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Save a checkpoint every N steps (0: only at the end)."""
    eval_every: int = Field(default=0, ge=0)
    """Also evaluate on data.eval every N steps (0: only at the end). Each mid-run
    evaluation is sent to Ray with the step, so a Tune scheduler (ASHA, PBT) can compare
    trials on the eval metric while they run."""
    eval_at_start: bool = True
    """With data.eval, evaluate the starting model before the first step: the baseline the
    closing table and the report compare every later evaluation with. A resumed run keeps
    the baseline of its first start."""
    select_by: str | None = None
    """An eval metric (e.g. "eval/a2p_ir_MRR@10") that picks the exported model: the
    export is the best evaluated state (at train.eval_every steps and the end) instead of
    the last, and that state's checkpoint is kept beside the latest ones."""
    select_mode: Literal["max", "min"] = "max"
    """Whether select_by is better higher (recall, MRR, ...) or lower (alignment, ...)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """How many of the latest checkpoints to keep (with select_by, plus the best)."""
    max_failures: int = Field(default=3, ge=-1)
    """How often Ray Train restarts the workers from the last complete checkpoint after a
    worker fails while training (a killed or lost process, an error in a step); -1: no
    limit, 0: the first failure ends the run. A failure while the workers set up (building
    the model, restoring), or the same error twice in a row, ends the run at once."""
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    """DeepSpeed ZeRO stage. auto: 0 on CPU workers (fastest there: no all-gather of
    parameter partitions over gloo after every step, and the full optimizer state is
    memory a CPU host has), 2 on GPUs (optimizer state and gradients partitioned, NCCL's
    all-gather is cheap). Settled when the config loads, so every later reader sees a
    number."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    eval_batch_size: int = Field(default=256, ge=1)


class ScalingConfig(Strict):
    num_workers: int = Field(default=2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker with NCCL; false runs on CPU with gloo."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs reserved per worker; also sets its torch thread count."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each worker asks for besides its CPUs (and GPU), e.g.
    {sim_gpu = 1} on the simulated cluster (`clray jobs up --simulate`) or a resource a
    node group declares, so the workers land on that group."""

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        return custom_resources(value)


class RemineConfig(Strict):
    every_epochs: int = Field(default=0, ge=0)
    """0: off. N: after every N epochs, mine a new plan with the run's current model as the
    teacher (its export) and train on it from the next epoch. Needs data.batches =
    "packed": data.train is the first plan, and its corpus is what gets re-mined."""
    mining: dict[str, Any] = Field(default_factory=dict)
    """Keys of a mining config's [mining] table for the new plans (rank_min, margin,
    num_negatives, ...); unset keys keep the first plan's values. batch_size and epochs
    are set by the run: the local batch size and every_epochs."""
    teacher: dict[str, Any] = Field(default_factory=dict)
    """Teacher settings other than path (batch_size, num_actors, cpus_per_actor, use_gpu)."""
    overlap: bool = False
    """Mine beside training instead of stopping it: the worker group is never torn down.
    At every every_epochs boundary the workers export a teacher and go on training; the
    plan mined with it (by Ray actors on CPU resources beside the trainer, in a process of
    its own) is trained from the next boundary. Each plan is one re-mining period later
    than without overlap (epochs 0 to 2N-1 train on the first plan), and the plan of every
    epoch is fixed, so a resumed run trains the same batches; when the plan is not mined
    by its boundary the workers wait for it (the wait is logged). Needs a plan of global
    batches (mined with mining.num_workers = scaling.num_workers)."""


class JobConfig(Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig
    model: ModelConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    remine: RemineConfig = Field(default_factory=RemineConfig)
    """Re-mine the packed plan between epochs with the current model as teacher."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """How to reach s3:// URIs (endpoint, region); credentials come from the AWS chain."""

    @model_validator(mode="after")
    def _siglip_defaults(self) -> JobConfig:
        """The sigmoid loss needs a logit bias and starts hotter than softmax losses
        (SigLIP: temperature 0.1, bias -10); fill in what the user left unset."""
        if self.loss.type == "siglip":
            if self.model.logit_bias is None:
                self.model.logit_bias = LogitBiasConfig()
            if "init_temperature" not in self.model.logit_scale.model_fields_set:
                self.model.logit_scale.init_temperature = 0.1
        return self

    @model_validator(mode="after")
    def _zero_stage(self) -> JobConfig:
        """train.zero_stage = "auto": 2 with scaling.use_gpu, else 0 (see TrainConfig)."""
        if self.train.zero_stage == "auto":
            self.train.zero_stage = 2 if self.scaling.use_gpu else 0
        return self

    @model_validator(mode="after")
    def _tower_defaults(self) -> JobConfig:
        """Settle what the towers imply: a pretrained text tower's tokenizer is its own
        (written out, so `clray config show` prints the tokenizer actually used), and
        with projection = "none" an unset embed_dim is the tower's width (from its
        config, or a pretrained model's config.json)."""
        from clray.models.facts import tower_facts
        from clray.models.preprocess import tokenizer_source

        towers = [self.model.anchor] + ([] if self.model.positive is None else [self.model.positive])
        for tower in towers:
            if tower.type == "text" and tower.pretrained and "tokenizer" not in tower.model_fields_set:
                source = tokenizer_source(tower)
                if source != tower.tokenizer:
                    tower.tokenizer = source
        if self.model.projection == "none" and "embed_dim" not in self.model.model_fields_set:
            width = tower_facts(self.model.anchor).width
            if width is not None and width != self.model.embed_dim:
                self.model.embed_dim = width
        return self

    @property
    def local_batch_size(self) -> int:
        return self.train.global_batch_size // self.scaling.num_workers

    @property
    def run_dir(self) -> Path:
        """The local run directory; for a run on S3 use ``run_uri``."""
        return Path(self.run.output_dir).expanduser().absolute() / self.run.name

    @property
    def run_uri(self) -> str:
        """The run directory as a location: an absolute local path or ``s3://bucket/prefix/name``."""
        if is_s3(self.run.output_dir):
            return join(normalize(self.run.output_dir), self.run.name)
        return str(self.run_dir)


def validate(raw: dict[str, Any], source: str = "config") -> JobConfig:
    try:
        # Sections' within-section rules are deferred to cross_field_problems: raised by
        # pydantic they would stop every cross-section check from being reported.
        cfg = JobConfig.model_validate(raw, context={DEFER_RULES: True})
    except ValidationError as err:
        raise ConfigError(source, format_pydantic(err) + partial_problems(raw, JobConfig)) from None
    problems = cross_field_problems(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    raw = apply_overrides(read_toml(path), overrides or [])
    return validate(raw, source=str(path))


