"""What a search (``clray tune``) is: the ``[search]`` table, the searched keys, and every check that can
fail before Ray starts (each problem named by its key, with the fix).

A search config is a training config plus a ``[search]`` table; ``search.base`` may name
the training config the other tables are laid over. ``TuneJob`` is the checked result:
the base config (raw and validated), the space, and where the search's files go.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from clray.jobs.config import (
    ConfigError,
    JobConfig,
    Strict,
    apply_overrides,
    format_pydantic,
    merge_tables,
    read_toml,
    validate,
)
from clray.jobs.config.checks import custom_resources
from clray.pipelines.staging import Staging

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "lograndint", "choice", "grid")
"""How a searched key is written: ``key = {loguniform = [0.01, 0.2]}``. ``randint`` and
``lograndint`` bounds are inclusive; ``grid`` tries every value (algorithm = "grid")."""

PBT_MUTABLE = ("optim.lr", "model.logit_scale.init_temperature")
"""The keys PBT may change mid-run: a restored checkpoint adopts them (jobs.worker.adopt_config).
Other searched keys are sampled once per trial and kept."""

TRAIN_METRICS = ("loss", "accuracy")


class AshaConfig(Strict):
    grace_period: int | None = Field(default=None, ge=1)
    """Steps every trial runs before it can be stopped (default: train.eval_every)."""
    reduction_factor: float = Field(default=2.0, gt=1)
    """At each rung, only the best 1/reduction_factor of trials go on."""
    max_t: int | None = Field(default=None, ge=1)
    """Steps of a full trial (default: train.max_steps, else counted from the corpus)."""


class PbtConfig(Strict):
    perturbation_interval: int | None = Field(default=None, ge=1)
    """Steps between exploit/explore decisions (default: train.eval_every). Trials
    checkpoint at every evaluation so there is always a state to copy."""
    quantile_fraction: float = Field(default=0.25, gt=0, le=0.5)
    """The bottom fraction of trials copy one of the top fraction."""
    resample_probability: float = Field(default=0.25, ge=0, le=1)
    """Chance a mutated key is drawn anew from its distribution instead of scaled by 0.8/1.2."""
    synch: bool = False
    """Decide at each perturbation_interval only once every trial reached it (Ray's
    synchronous PBT): every trial is compared at the same step and a decision never
    depends on which trial ran ahead, at the cost of pausing the trials that arrive
    first (each pause restarts its workers). Asynchronous (false, the default) compares
    a trial with the others' latest scores, whatever step they are at."""


class TrialResources(Strict):
    """What one trial asks Ray for; replaces [scaling] in every trial."""

    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    use_gpu: bool = False
    """One GPU per worker."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Custom resources per worker, as [scaling]'s key of that name."""

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        return custom_resources(value)


class SearchConfig(Strict):
    base: str | None = None
    """A training config (path relative to this file) the other tables are laid over."""
    metric: str = "eval/a2p_R@1"
    """The reported metric trials are compared on: an eval metric (eval/a2p_R@1,
    eval/p2a_R@5, eval/a2p_label_R@1, eval/zero_shot_accuracy, ...) or a training one
    (loss, accuracy)."""
    mode: Literal["max", "min"] = "max"
    num_trials: int | None = Field(default=None, ge=1)
    """Trials to run; with algorithm = "grid", leave unset (every grid point once)."""
    max_concurrent: int = Field(default=1, ge=1)
    """Trials running at once. Each asks Ray for exactly its workers' resources: on one
    machine the rest wait; on an autoscaling cluster they add nodes."""
    scheduler: Literal["asha", "pbt", "none"] = "asha"
    algorithm: Literal["random", "grid", "optuna"] = "random"
    """random: independent draws; grid: every combination of the grid values; optuna: TPE."""
    seed: int = 0
    max_failures: int = Field(default=1, ge=0)
    """Retries of a failed trial (each from its last checkpoint) before it counts as errored."""
    space: dict[str, Any] = Field(default_factory=dict)
    """The searched keys: dotted training-config keys (or nested tables) mapped to one
    distribution each, e.g. "model.logit_scale.init_temperature" = {loguniform = [0.01, 0.3]}."""
    resources: TrialResources | None = None
    """Per-trial workers and CPUs/GPUs; unset: the config's [scaling]."""
    asha: AshaConfig = Field(default_factory=AshaConfig)
    pbt: PbtConfig = Field(default_factory=PbtConfig)

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if not self.space:
            raise ValueError("search.space is empty: name at least one key to search, e.g. "
                             '"model.logit_scale.init_temperature" = {loguniform = [0.01, 0.3]}')
        return self


@dataclass
class Dimension:
    key: str
    """Dotted training-config key."""
    kind: str
    values: list[Any]
    """[low, high] for ranges, the options for choice/grid."""

    @property
    def log(self) -> bool:
        return self.kind in ("loguniform", "lograndint")

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)
        if self.kind == "lograndint":
            return tune.lograndint(self.values[0], self.values[1] + 1)
        if self.kind == "choice":
            return tune.choice(self.values)
        return tune.grid_search(self.values)

    def probes(self) -> list[Any]:
        """Values whose configs must validate: both bounds of a range, every option."""
        return list(self.values)



@dataclass
class TuneJob:
    """A checked search: the base training config (raw and validated) and the space."""

    raw_base: dict[str, Any]
    base: JobConfig
    search: SearchConfig
    dimensions: list[Dimension]
    source: str

    @property
    def search_uri(self) -> str:
        """Where the search lives: a local directory or ``s3://bucket/prefix/NAME``."""
        return self.base.run_uri

    @functools.cached_property
    def staging(self) -> Staging:
        """The search's own files (search.json, trial_starts.jsonl, results, best.toml,
        plots) as one ``pipelines.staging`` location: written into the search directory
        itself, or for a search on S3 into a local directory that is the same on every
        start on this machine (kept, so a killed driver's files are found on --resume) and
        published from. Made on first use, which for S3 checks the destination is
        writable, naming run.output_dir."""
        return Staging(self.search_uri, self.base.storage, "run.output_dir", name="tune", keep=True)

    @property
    def search_dir(self) -> Path:
        """Where the driver writes the search's own files (``staging.local``)."""
        return self.staging.local

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the job with its callbacks and trials; the staging directory belongs to
        # the machine that made it, so a search resumed elsewhere makes its own.
        return {k: v for k, v in self.__dict__.items() if k != "staging"}

    def trial_raw(self, params: dict[str, Any]) -> dict[str, Any]:
        """The training config of one trial: base + sampled keys + per-trial resources."""
        raw = copy.deepcopy(self.raw_base)
        for key, value in params.items():
            _set_path(raw, key.split("."), value)
        if self.search.resources is not None:
            raw["scaling"] = {**raw.get("scaling", {}), **self.search.resources.model_dump()}
        return raw


def _set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables and quoted dotted keys both name config keys; a leaf is the
    one-entry table holding the distribution."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        # {kind = [...]} is a leaf (checked later, so an unknown kind is named as such).
        if isinstance(value, dict) and len(value) == 1 and (
            next(iter(value)) in DISTRIBUTIONS or isinstance(next(iter(value.values())), list)
        ):
            out[name] = value
        elif isinstance(value, dict) and value and not (set(value) & set(DISTRIBUTIONS)):
            out.update(_flatten_space(value, f"{name}."))
        else:
            out[name] = value
    return out


def _parse_dimension(key: str, spec: Any) -> tuple[Dimension | None, list[str]]:
    where = f"search.space.{key}"
    forms = ", ".join(f"{{{d} = [...]}}" for d in DISTRIBUTIONS)
    if not isinstance(spec, dict) or len(spec) != 1:
        return None, [f"{where}: give exactly one distribution as a table, one of {forms}"]
    kind, values = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        return None, [f"{where}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}"]
    if not isinstance(values, list):
        return None, [f"{where}: {kind} takes a list, e.g. {{{kind} = [...]}}"]
    problems: list[str] = []
    if kind in ("choice", "grid"):
        if not values:
            problems.append(f"{where}: {kind} = [] is empty: give at least one value")
        return (None if problems else Dimension(key, kind, values)), problems
    if len(values) != 2:
        return None, [f"{where}: {kind} takes [low, high], got {len(values)} value(s)"]
    low, high = values
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric:
        return None, [f"{where}: {kind} bounds must be numbers, got {values!r}"]
    if kind in ("randint", "lograndint") and not all(isinstance(v, int) for v in values):
        problems.append(f"{where}: {kind} bounds must be integers, got {values!r}")
    if kind in ("loguniform", "lograndint") and low <= 0:
        problems.append(f"{where}: {kind} needs a positive low bound (log of {low} is undefined); "
                        "use uniform or a bound > 0")
    if (kind in ("randint", "lograndint") and low > high) or (kind not in ("randint", "lograndint") and low >= high):
        problems.append(f"{where}: the range [{low}, {high}] is empty: low must be below high")
    return (None if problems else Dimension(key, kind, list(values))), problems


def _metric_problems(search: SearchConfig, base: JobConfig) -> list[str]:
    metric = search.metric
    if metric in TRAIN_METRICS:
        return []
    from clray.models.metric_names import evaluation_names

    known = [f"eval/{n}" for n in evaluation_names(base.data.label_column is not None, bool(base.data.class_names))]
    if metric not in known:
        return [f"search.metric = {metric!r} is not reported by this config; choose one of "
                f"{', '.join(known + list(TRAIN_METRICS))}"]
    if not base.data.eval:
        return [f"search.metric = {metric!r} is an eval metric but data.eval is not set: add a held-out split"]
    return []


def check_tune_config(raw: dict[str, Any], source: str) -> TuneJob:
    """Every problem of the search, named by key, before Ray starts."""
    raw = copy.deepcopy(raw)
    search_raw = raw.pop("search", None)
    if search_raw is None:
        raise ConfigError(source, ["[search] is missing: a tune config is a training config plus a "
                                   "[search] table (metric, mode, num_trials, space, ...)"])
    base = validate(raw, source)
    problems: list[str] = []
    try:
        search = SearchConfig.model_validate(search_raw)
    except ValidationError as err:
        raise ConfigError(source, [f"search.{p}" for p in format_pydantic(err)]) from None

    dimensions: list[Dimension] = []
    for key, spec in _flatten_space(search.space).items():
        dim, found = _parse_dimension(key, spec)
        problems.extend(found)
        if dim is None:
            continue
        dimensions.append(dim)
        # Each bound/option must make a valid training config: catches unknown keys and
        # values the key cannot take (a negative temperature) before any trial starts.
        for value in dim.probes():
            probe = copy.deepcopy(raw)
            _set_path(probe, key.split("."), value)
            try:
                validate(probe, source)
            except ConfigError as err:
                for problem in err.problems:
                    problems.append(f"search.space.{key} = {value!r}: {problem}")
                break
    problems.extend(_metric_problems(search, base))

    kinds = {d.kind for d in dimensions}
    if search.algorithm == "grid":
        if kinds - {"grid", "choice"}:
            problems.append('search.algorithm = "grid" needs every key as {grid = [...]} (or choice); '
                            f"found {', '.join(sorted(kinds - {'grid', 'choice'}))}")
        size = math.prod(len(d.values) for d in dimensions) if dimensions else 0
        if search.num_trials is not None and size and search.num_trials != size:
            problems.append(f"search.num_trials = {search.num_trials} but the grid has {size} points: "
                            "leave num_trials unset to run each once")
    else:
        if "grid" in kinds:
            problems.append(f'search.space: grid values need search.algorithm = "grid" (it is "{search.algorithm}"); '
                            "use choice to sample from a list")
        if search.num_trials is None:
            problems.append(f'search.num_trials: required with search.algorithm = "{search.algorithm}"')
    if search.scheduler in ("asha", "pbt") and search.metric not in TRAIN_METRICS and base.train.eval_every == 0:
        problems.append(f'search.scheduler = "{search.scheduler}" compares trials on mid-run evaluations: '
                        "set train.eval_every (steps between evaluations), e.g. train.eval_every = 20")
    if search.scheduler == "pbt":
        mutable = [d.key for d in dimensions if d.key in PBT_MUTABLE]
        if not mutable:
            problems.append(f"search.scheduler = \"pbt\" perturbs {' and '.join(PBT_MUTABLE)} mid-run; "
                            "search at least one of them")
        if search.algorithm == "optuna":
            problems.append('search.scheduler = "pbt" picks its own configs: use algorithm = "random"')
    if problems:
        raise ConfigError(source, problems)
    return TuneJob(raw_base=raw, base=base, search=search, dimensions=dimensions, source=source)


def load_tune_config(path: str | Path, overrides: list[str] | None = None) -> TuneJob:
    """Read a search config. ``search.base`` may name a training config (relative to this
    file) that the other tables of this file are laid over, so a search does not repeat
    the config it searches around."""
    raw = read_toml(path)
    base_name = raw.get("search", {}).pop("base", None) if isinstance(raw.get("search"), dict) else None
    if base_name is not None:
        base_path = Path(path).parent / str(base_name)
        if not base_path.is_file():
            raise ConfigError(str(path), [f"search.base = {base_name!r}: no such file {base_path}"])
        raw = merge_tables(read_toml(base_path), raw)
    return check_tune_config(apply_overrides(raw, overrides or []), str(path))


# ---------------------------------------------------------------- the trial (runs in Ray)

