"""The job config: one typed section per component, composed here, loaded from TOML.

Loading reports every problem at once (schema errors from pydantic plus cross-field
checks), each naming the dotted key and what to change, before Ray is touched.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import Field, ValidationError, model_validator

from clray.models.config import DEFER_RULES, LogitBiasConfig, LossConfig, ModelConfig, Strict
from clray.pipelines.config import DataConfig
from clray.pipelines.storage import StorageConfig, is_s3, join, normalize


class ConfigError(Exception):
    """A config that cannot run; ``problems`` holds one line per offending key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


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
    report per worker per poll (2 s), so reporting faster than that stalls training;
    progress and metrics.jsonl get every log_every step regardless."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Save a checkpoint every N steps (0: only at the end)."""
    eval_every: int = Field(default=0, ge=0)
    """Also evaluate on data.eval every N steps (0: only at the end). Each mid-run
    evaluation is sent to Ray with the step, so a Tune scheduler (ASHA, PBT) can compare
    trials on the eval metric while they run."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """How many of the latest checkpoints to keep."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
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


def cross_field_problems(cfg: JobConfig) -> list[str]:
    """Checks that span sections; each message names the key and the fix."""
    problems: list[str] = []
    workers = cfg.scaling.num_workers
    if cfg.train.global_batch_size % workers:
        lower = cfg.train.global_batch_size - cfg.train.global_batch_size % workers
        problems.append(
            f"train.global_batch_size = {cfg.train.global_batch_size} is not divisible by "
            f"scaling.num_workers = {workers}: use a multiple of {workers}, e.g. {max(lower, workers)}"
        )
    towers = {"anchor": cfg.model.anchor, "positive": cfg.model.positive_tower}
    for view_name, tower in towers.items():
        view = getattr(cfg.data, view_name)
        tower_key = "model.anchor" if cfg.model.shared_tower else f"model.{view_name}"
        if view.kind == "text" and tower.type != "text":
            problems.append(
                f"data.{view_name}.kind = \"text\" (column {view.column!r}) but {tower_key}.type = "
                f"\"{tower.type}\" is an image tower: set {tower_key}.type = \"text\" or point "
                f"data.{view_name} at an image column"
            )
        if view.kind == "image" and tower.type == "text":
            problems.append(
                f"data.{view_name}.kind = \"image\" (column {view.column!r}) but {tower_key}.type = "
                f"\"text\": use an image tower (type = \"conv\" or \"vit\") or a text column"
            )
    if cfg.model.shared_tower and cfg.data.anchor.kind != cfg.data.positive.kind:
        problems.append(
            "model.shared_tower = true needs both views of one kind, but data.anchor.kind = "
            f"{cfg.data.anchor.kind!r} and data.positive.kind = {cfg.data.positive.kind!r}: "
            "set shared_tower = false and give [model.positive]"
        )
    if cfg.data.label_column is None and cfg.data.class_names:
        problems.append("data.class_names is set but data.label_column is not: name the label column or drop class_names")
    if cfg.data.class_names and not any("{}" in t for t in cfg.data.prompt_templates):
        problems.append("data.prompt_templates: every template needs a `{}` for the class name")
    if cfg.data.anchor.column == cfg.data.positive.column:
        problems.append(
            f"data.anchor.column and data.positive.column are both {cfg.data.anchor.column!r}: "
            "a pair needs two different columns"
        )
    for key, tower in (("model.anchor", cfg.model.anchor), ("model.positive", cfg.model.positive)):
        for attr in ("pretrained", "tokenizer"):
            value = getattr(tower, attr, None) if tower is not None else None
            if value and value != "char" and not Path(value).expanduser().is_dir():
                problems.append(
                    f"{key}.{attr} = {value!r} is not a local directory: clray never downloads "
                    "models; save one with save_pretrained() and give its path"
                )
    if cfg.data.batches == "packed" and len(cfg.data.train) != 1:
        problems.append(
            f'data.batches = "packed" trains on one plan directory written by `clray mine`, but '
            f"data.train has {len(cfg.data.train)} entries: give exactly one (the plan directory)"
        )
    if is_s3(cfg.run.output_dir) and not normalize(cfg.run.output_dir)[len("s3://"):].strip("/"):
        problems.append(f"run.output_dir = {cfg.run.output_dir!r} names no bucket: write s3://bucket/prefix")
    if is_s3(cfg.run.output_dir) and cfg.remine.every_epochs:
        problems.append(
            "remine.every_epochs with run.output_dir on S3 is not supported (the re-mining teacher is "
            "the run's export, read from a local directory): use a local run.output_dir, or re-mine "
            "between runs with `clray mine`"
        )
    problems.extend(_loss_problems(cfg))
    problems.extend(remine_problems(cfg))
    if cfg.train.precision == "bf16" and not cfg.scaling.use_gpu:
        problems.append("train.precision = \"bf16\" needs scaling.use_gpu = true: use \"auto\" or \"fp32\" on CPU")
    return problems


def _loss_problems(cfg: JobConfig) -> list[str]:
    """The loss section's own rules (deferred by :func:`validate` so they come out with
    the rest), then the loss keys that need data columns or other sections."""
    loss, data = cfg.loss, cfg.data
    problems = loss.rule_problems()
    if loss.type == "supcon" and data.label_column is None:
        problems.append('loss.type = "supcon" takes its positives from labels: set data.label_column')
    if loss.mask_same_label and data.label_column is None:
        problems.append("loss.mask_same_label = true needs data.label_column (the labels to compare)")
    if loss.teacher_threshold is not None and data.negative_score_column is None:
        problems.append(
            "loss.teacher_threshold needs data.negative_score_column (each hard negative's teacher "
            "similarity, as `clray mine` writes it) and data.negatives"
        )
    if cfg.model.logit_bias is not None and loss.type != "siglip":
        problems.append(
            f'model.logit_bias only affects loss.type = "siglip" (a softmax over candidates ignores '
            f'a shared offset): remove [model.logit_bias] for loss.type = "{loss.type}"'
        )
    for key in ("negative_id_column", "negative_score_column"):
        if getattr(data, key) is not None and data.negatives is None:
            problems.append(f"data.{key} describes hard negatives, but data.negatives is not set: set it or remove {key}")
    if data.negatives is not None and data.negatives.kind != data.positive.kind:
        problems.append(
            f"data.negatives.kind = {data.negatives.kind!r} but data.positive.kind = {data.positive.kind!r}: "
            "hard negatives are encoded by the positive tower, so they must be the positive view's kind"
        )
    return problems


def remine_problems(cfg: JobConfig) -> list[str]:
    """Cross-checks of the remine section against the rest of the config."""
    from clray.pipelines.mining.config import MiningConfig, TeacherConfig

    remine = cfg.remine
    if not remine.every_epochs:
        return []
    problems = []
    if cfg.data.batches != "packed":
        problems.append(
            "remine.every_epochs needs data.batches = \"packed\" and data.train = a plan from `clray mine` "
            "(the first plan; its corpus is re-mined)"
        )
    if remine.every_epochs >= cfg.train.epochs:
        problems.append(
            f"remine.every_epochs = {remine.every_epochs} but train.epochs = {cfg.train.epochs}: no epoch would "
            "use a new plan; lower every_epochs or train longer"
        )
    for key in ("batch_size", "epochs"):
        if key in remine.mining:
            problems.append(f"remine.mining.{key} is set by the run (local batch size, every_epochs): remove it")
    try:
        MiningConfig.model_validate({"batch_size": max(2, cfg.local_batch_size), **remine.mining,
                                     "epochs": max(1, remine.every_epochs)})
    except ValidationError as err:
        problems.extend(f"remine.mining.{line}" for line in format_pydantic(err))
    if "path" in remine.teacher:
        problems.append("remine.teacher.path is the run's own export: remove it")
    else:
        try:
            TeacherConfig.model_validate({"path": ".", **remine.teacher})
        except ValidationError as err:
            problems.extend(f"remine.teacher.{line}" for line in format_pydantic(err))
    return problems


_TOWER_TAGS = {"text", "conv", "vit"}


def format_pydantic(err: ValidationError) -> list[str]:
    """One line per pydantic error: the dotted key as the user writes it, then the fix."""
    problems = []
    for item in err.errors():
        # pydantic puts the union's discriminator tag (text/conv/vit) into the location;
        # users never write it, so drop it from the key we show.
        parts = [str(p) for p in item["loc"]]
        loc = ".".join(p for i, p in enumerate(parts) if not (i and p in _TOWER_TAGS))
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling against `clray config show`"
        elif item["type"] == "missing":
            msg = "required key is missing: add it"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        problems.append(f"{loc or '(top level)'}: {msg}")
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as a TOML value, else as a plain string."""
    if "=" not in text:
        raise ConfigError("--set", [f"{text!r}: write overrides as key=value, e.g. optim.lr=3e-4"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", [f"{text!r}: the key must be a dotted path like scaling.num_workers"])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError("--set", [f"{text!r}: {part!r} is a value, not a section"])
            node = child
        node[path[-1]] = value
    return out


def merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``, table by table (how a search config's ``search.base``
    and a run's overrides are applied)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"no such config file: {path}"])
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None


def validate(raw: dict[str, Any], source: str = "config") -> JobConfig:
    try:
        # Sections' within-section rules are deferred to cross_field_problems: raised by
        # pydantic they would stop every cross-section check from being reported.
        cfg = JobConfig.model_validate(raw, context={DEFER_RULES: True})
    except ValidationError as err:
        raise ConfigError(source, format_pydantic(err)) from None
    problems = cross_field_problems(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    raw = apply_overrides(read_toml(path), overrides or [])
    return validate(raw, source=str(path))


def dump_toml(cfg: JobConfig) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))
