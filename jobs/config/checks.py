"""Checks that span the sections of a training config, each message naming the key and
the fix; run once every section validated (``jobs.config.validate``), or on the sections
that did when the schema itself is broken, so every problem comes out at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from clray.jobs.config.errors import format_pydantic
from clray.models.config import DEFER_RULES
from clray.pipelines.storage import is_s3, normalize

if TYPE_CHECKING:
    from clray.jobs.config import JobConfig


def custom_resources(value: dict[str, float]) -> dict[str, float]:
    """A ``resources_per_worker`` table: custom resources only (CPUs and GPUs have their
    own keys), each a non-negative amount."""
    for name, amount in value.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} has its own key (cpus_per_worker, use_gpu); resources_per_worker "
                             "names custom resources only, e.g. {sim_gpu = 1}")
        if amount < 0:
            raise ValueError(f"{name} = {amount}: an amount of a resource is 0 or more")
    return value


def _batch_problems(cfg: JobConfig) -> list[str]:
    workers = cfg.scaling.num_workers
    if not cfg.train.global_batch_size % workers:
        return []
    lower = cfg.train.global_batch_size - cfg.train.global_batch_size % workers
    return [
        f"train.global_batch_size = {cfg.train.global_batch_size} is not divisible by "
        f"scaling.num_workers = {workers}: use a multiple of {workers}, e.g. {max(lower, workers)}"
    ]


def _view_problems(cfg: JobConfig) -> list[str]:
    """Each view's kind against the tower that encodes it."""
    problems: list[str] = []
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
    return problems


def _data_problems(cfg: JobConfig) -> list[str]:
    problems: list[str] = []
    if cfg.data.label_column is None and cfg.data.class_names:
        problems.append("data.class_names is set but data.label_column is not: name the label column or drop class_names")
    if cfg.data.class_names and not any("{}" in t for t in cfg.data.prompt_templates):
        problems.append("data.prompt_templates: every template needs a `{}` for the class name")
    if cfg.data.anchor.column == cfg.data.positive.column:
        problems.append(
            f"data.anchor.column and data.positive.column are both {cfg.data.anchor.column!r}: "
            "a pair needs two different columns"
        )
    return problems


def _model_path_problems(cfg: JobConfig) -> list[str]:
    problems: list[str] = []
    for key, tower in (("model.anchor", cfg.model.anchor), ("model.positive", cfg.model.positive)):
        for attr in ("pretrained", "tokenizer"):
            value = getattr(tower, attr, None) if tower is not None else None
            if value and value != "char" and not Path(value).expanduser().is_dir():
                problems.append(
                    f"{key}.{attr} = {value!r} is not a local directory: clray never downloads "
                    "models; save one with save_pretrained() and give its path"
                )
    return problems


def _tower_fact_problems(cfg: JobConfig) -> list[str]:
    """What the towers' own configs (config.json of a pretrained one) say against the
    model section: the width a projection-free model must have, the positions a
    max_length needs."""
    from clray.models.facts import tower_facts

    problems: list[str] = []
    towers = [("model.anchor", cfg.model.anchor)]
    if not cfg.model.shared_tower and cfg.model.positive is not None:
        towers.append(("model.positive", cfg.model.positive))
    for key, tower in towers:
        # A missing directory is reported by _model_path_problems; a directory without a
        # config.json leaves the facts unknown (the tower's own loading then says why).
        facts = tower_facts(tower)
        if cfg.model.projection == "none" and facts.width is not None and facts.width != cfg.model.embed_dim:
            problems.append(
                f"model.projection = \"none\" keeps {key}'s width {facts.width} ({facts.source}), but "
                f"model.embed_dim = {cfg.model.embed_dim}: set embed_dim = {facts.width} (or leave it unset), "
                "or use projection = \"linear\""
            )
        if tower.type == "text" and facts.max_positions is not None and tower.max_length > facts.max_positions:
            problems.append(
                f"{key}.max_length = {tower.max_length} exceeds the model's {facts.max_positions} positions "
                f"({facts.source}): set max_length to at most {facts.max_positions}"
            )
    return problems


def _packed_problems(cfg: JobConfig) -> list[str]:
    problems: list[str] = []
    if cfg.data.batches == "packed" and len(cfg.data.train) != 1:
        problems.append(
            f'data.batches = "packed" trains on one plan directory written by `clray mine`, but '
            f"data.train has {len(cfg.data.train)} entries: give exactly one (the plan directory)"
        )
    if cfg.data.batches == "packed" and cfg.data.group_by_length:
        problems.append(
            'data.group_by_length = true regroups rows into batches, but data.batches = "packed" trains '
            "each mined batch as mined: remove group_by_length (packed batches are padded to their "
            "longest row anyway)"
        )
    return problems


def _output_problems(cfg: JobConfig) -> list[str]:
    problems: list[str] = []
    if is_s3(cfg.run.output_dir) and not normalize(cfg.run.output_dir)[len("s3://"):].strip("/"):
        problems.append(f"run.output_dir = {cfg.run.output_dir!r} names no bucket: write s3://bucket/prefix")
    if is_s3(cfg.run.output_dir) and cfg.remine.every_epochs:
        problems.append(
            "remine.every_epochs with run.output_dir on S3 is not supported (the re-mining teacher is "
            "the run's export, read from a local directory): use a local run.output_dir, or re-mine "
            "between runs with `clray mine`"
        )
    return problems


def _precision_problems(cfg: JobConfig) -> list[str]:
    if cfg.train.precision == "bf16" and not cfg.scaling.use_gpu:
        return ["train.precision = \"bf16\" needs scaling.use_gpu = true: use \"auto\" or \"fp32\" on CPU"]
    return []


def _selection_problems(cfg: JobConfig) -> list[str]:
    """train.select_by names a figure this config's evaluations report, and there are
    evaluations to choose between."""
    from clray.models.metric_names import evaluation_names

    metric = cfg.train.select_by
    if metric is None:
        return []
    known = [f"eval/{n}" for n in evaluation_names(cfg.data.label_column is not None, bool(cfg.data.class_names))]
    if metric not in known:
        return [f"train.select_by = {metric!r} is not an evaluation figure of this config; choose one of "
                f"{', '.join(known)}"]
    if not cfg.data.eval:
        return [f"train.select_by = {metric!r} picks the export by its evaluations, but data.eval is not set: "
                "add a held-out split"]
    if not cfg.train.eval_every:
        return [f"train.select_by = {metric!r} needs evaluations during the run to choose from: set "
                "train.eval_every (steps between evaluations)"]
    return []


CHECKS: list[tuple[tuple[str, ...], Callable[[Any], list[str]]]] = [
    (("train", "scaling"), _batch_problems),
    (("data", "model"), _view_problems),
    (("data",), _data_problems),
    (("model",), _model_path_problems),
    (("model",), _tower_fact_problems),
    (("data",), _packed_problems),
    (("run", "remine"), _output_problems),
    (("loss", "data", "model"), lambda cfg: _loss_problems(cfg)),
    (("remine", "data", "train", "scaling"), lambda cfg: remine_problems(cfg)),
    (("train", "scaling"), _precision_problems),
    (("train", "data"), _selection_problems),
]
"""Checks that span sections: (the sections each reads, the check). Each message names the
key and the fix. A config whose schema is broken still gets every check whose sections
validated on their own, so all of its problems come out in one message."""


def cross_field_problems(cfg: JobConfig) -> list[str]:
    """Checks that span sections; each message names the key and the fix."""
    return [problem for _, check in CHECKS for problem in check(cfg)]


class _Sections:
    """The sections of a config that validated on their own (see partial_problems)."""

    def __init__(self, sections: dict[str, Any]) -> None:
        self.__dict__.update(sections)

    @property
    def local_batch_size(self) -> int:
        return self.train.global_batch_size // self.scaling.num_workers


def _valid_part(annotation: Any, raw: Any) -> Any:
    """A section as validated, or (when some of its keys are wrong) without those keys, so
    the checks across sections still see its other keys: an unknown key in [train] must
    not hide that train.global_batch_size does not divide by the workers."""
    try:
        return annotation.model_validate(raw, context={DEFER_RULES: True})
    except ValidationError as err:
        if not isinstance(raw, dict):
            raise
        wrong = {item["loc"][0] for item in err.errors() if item["loc"]}
        return annotation.model_validate({k: v for k, v in raw.items() if k not in wrong},
                                         context={DEFER_RULES: True})


def partial_problems(raw: dict[str, Any], model: Any) -> list[str]:
    """The cross-section problems of a config that failed schema validation, from the
    sections that are valid by themselves or without their wrong keys (a section left out
    takes its default)."""
    sections: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        try:
            if isinstance(raw, dict) and name in raw:
                sections[name] = _valid_part(field.annotation, raw[name])
            elif not field.is_required():
                sections[name] = field.get_default(call_default_factory=True)
        except (ValidationError, AttributeError, TypeError):
            continue
    cfg = _Sections(sections)
    problems: list[str] = []
    for needs, check in CHECKS:
        if all(name in sections for name in needs):
            try:
                problems.extend(check(cfg))
            except Exception:  # noqa: BLE001 - a partial config may not support every check
                continue
    return problems


def _loss_problems(cfg: JobConfig) -> list[str]:
    """The loss section's own rules (deferred by ``validate`` so they come out with the
    rest), then the loss keys that need data columns or other sections."""
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
    if loss.in_batch_margin is not None and (data.in_batch_score_column is None or data.batches != "packed"):
        problems.append(
            "loss.in_batch_margin needs the teacher's in-batch scores: a packed plan mined with "
            "mining.in_batch_scores = true, data.batches = \"packed\" and data.in_batch_score_column set"
        )
    if data.in_batch_score_column is not None and data.batches != "packed":
        problems.append("data.in_batch_score_column names a column of packed plans: set data.batches = \"packed\"")
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
        return ["remine.overlap needs remine.every_epochs (the epochs between two plans): set it or remove overlap"] \
            if remine.overlap else []
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
    elif remine.overlap and 2 * remine.every_epochs >= cfg.train.epochs:
        problems.append(
            f"remine.overlap with every_epochs = {remine.every_epochs} and train.epochs = {cfg.train.epochs}: an "
            f"overlapped plan is trained from the boundary after the one it was mined at (epoch "
            f"{2 * remine.every_epochs}), so no epoch would use one; train at least {2 * remine.every_epochs + 1} "
            "epochs, lower every_epochs, or remove overlap"
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
