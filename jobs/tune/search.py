"""``clray tune``: a Ray Tune search over training-config keys.

A search config is a training config plus a ``[search]`` table. Each trial is a whole
``clray train`` run (``run_training``: a ``TorchTrainer`` built and fitted inside a Tune
function trainable, the Ray Train V2 pattern) with its own run directory under
``SEARCH_DIR/trials/``. Trials report their mid-run evaluations (``train.eval_every``) to
Tune, so ASHA can stop weak trials and PBT can copy strong ones.

Why the trial's Train run, not Tune, owns the checkpoints: Ray Train V2 already resumes
a run from its own storage when it is started again under the same name, which is what a
retried or resumed trial needs. Tune only gets a small pointer (run name and checkpoint
path) with each checkpointed report; PBT hands a trial another trial's pointer, and the
trial then starts a new Train run from that checkpoint with its own, perturbed, learning
rate and temperature (``run_training(start_from=..., adopt_config=True)``).

Layout of a search directory (``run.output_dir/run.name``):

    tune/            Ray Tune's experiment state (what --resume restores)
    trials/ID/       one clray run per trial (checkpoints, metrics.jsonl, export, summary)
    trial_starts.jsonl  one line per start of a trial (what a resumed search reran)
    best.toml        the best trial's config, ready for `clray train`
    results.parquet, results.csv   one row per trial
    plots/           the metric against each searched key, and per-trial curves
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

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

CRASH_ENV = "CLRAY_TUNE_CRASH_AFTER"
"""Fault injection for tests: the driver exits hard (no clean-up) once this many trials
have finished and Tune has saved its state since, as a killed driver would."""

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


class TrialResources(Strict):
    """What one trial asks Ray for; replaces [scaling] in every trial."""

    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    use_gpu: bool = False
    """One GPU per worker."""


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

    @property
    def remote(self) -> bool:
        from clray.pipelines import storage

        return storage.is_s3(self.search_uri)

    @property
    def search_dir(self) -> Path:
        """Where the driver writes the search's own files: the search directory itself, or
        for a search on S3 a local staging directory that ``publish`` uploads from."""
        if not self.remote:
            return self.base.run_dir
        import hashlib
        import tempfile

        digest = hashlib.sha256(self.search_uri.encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"clray-tune-{digest}"

    def publish(self, *names: str) -> None:
        """Upload staged files (or directories) of a search on S3; no-op locally."""
        if not self.remote:
            return
        from clray.pipelines import storage

        for name in names:
            local = self.search_dir / name
            if local.exists():
                storage.upload(local, storage.join(self.search_uri, name), self.base.storage)

    def trial_raw(self, params: dict[str, Any]) -> dict[str, Any]:
        """The training config of one trial: base + sampled keys + per-trial resources."""
        raw = copy.deepcopy(self.raw_base)
        for key, value in params.items():
            _set_path(raw, key.split("."), value)
        if self.search.resources is not None:
            raw["scaling"] = {**raw.get("scaling", {}), **self.search.resources.model_dump()}
        return raw


@dataclass
class TuneSummary:
    search_dir: str
    metric: str
    mode: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best_trial: str | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_config: str | None = None
    results_parquet: str | None = None
    results_csv: str | None = None
    plots: list[str] = field(default_factory=list)
    total_trial_steps: int = 0
    stopped_early: int = 0
    errored: int = 0
    wall_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


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
    known = [f"eval/{d}_R@{k}" for d in ("a2p", "p2a") for k in (1, 5, 10)]
    if base.data.label_column:
        known += ["eval/a2p_label_R@1", "eval/p2a_label_R@1"]
        if base.data.class_names:
            known.append("eval/zero_shot_accuracy")
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


def _trial_steps(job: TuneJob) -> int | None:
    """Steps of one full trial, for ASHA's max_t and for telling stopped trials from
    finished ones: from the corpus's Parquet footers (examples mode), capped by max_steps."""
    cfg = validate(job.trial_raw({}), job.source)
    total = None
    if cfg.data.batches == "examples":
        from clray.pipelines import resolve_shards

        rows = _count_rows(resolve_shards(cfg.data.train, "data.train", cfg.storage), cfg)
        total = max(1, rows // cfg.train.global_batch_size) * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = cfg.train.max_steps if total is None else min(total, cfg.train.max_steps)
    return total


def _count_rows(files: list[str], cfg: JobConfig) -> int:
    import pyarrow.parquet as pq

    from clray.pipelines import storage

    fs, paths = storage.filesystem_for(files, cfg.storage)
    return sum(pq.read_metadata(p, filesystem=fs).num_rows for p in paths)


def _pointer(run_name: str, trial_id: str, checkpoint: str, step: int) -> Any:
    """Tune's checkpoint for a trial: where its Train checkpoint is, not a copy of it."""
    import tempfile

    from ray import tune

    directory = tempfile.mkdtemp(prefix="clray-tune-ptr-")
    Path(directory, "pointer.json").write_text(json.dumps(
        {"run_name": run_name, "trial_id": trial_id, "checkpoint": checkpoint, "step": step}
    ))
    return tune.Checkpoint.from_directory(directory)


def _read_pointer(checkpoint: Any) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory, "pointer.json")
        return json.loads(path.read_text()) if path.exists() else None


def run_trial(params: dict[str, Any], job: TuneJob) -> None:
    """One trial: a whole clray training run, its evaluations reported to Tune."""
    from ray import tune

    from clray.jobs.run import run_training
    from clray.jobs.run.location import checkpoint_name

    trial_id = tune.get_context().get_trial_id()
    from clray.pipelines import storage

    # Tune moves each trial into a directory of its own; a trial is a `clray train`, whose
    # relative paths (data, pretrained towers, tokenizers) mean the working directory it
    # was started from, as the driver's checks read them. Tune records that directory.
    started_in = os.environ.get("TUNE_ORIG_WORKING_DIR")
    if started_in and os.path.isdir(started_in):
        os.chdir(started_in)

    trials_dir = storage.join(job.search_uri, "trials")
    raw = job.trial_raw(params)
    raw.setdefault("run", {})["output_dir"] = trials_dir
    if job.search.scheduler == "pbt":
        # PBT copies states at its decisions: checkpoint at every evaluation.
        raw.setdefault("train", {})["checkpoint_every"] = raw.get("train", {}).get("eval_every", 0)

    pointer = _read_pointer(tune.get_checkpoint())
    exploit = pointer is not None and pointer["trial_id"] != trial_id
    start_from = None
    if exploit:
        # PBT exploit: a new Train run of this trial starting from the donor's state.
        generation = 1
        while storage.exists(storage.join(trials_dir, f"{trial_id}-{generation}"), job.base.storage):
            generation += 1
        run_name, start_from = f"{trial_id}-{generation}", pointer["checkpoint"]
    elif pointer is not None:
        # Resume this trial's own run at the state the scheduler saw: Ray Train may not have
        # registered that checkpoint yet when Tune stopped the trial (a PBT pause).
        run_name, start_from = pointer["run_name"], pointer["checkpoint"]
    else:
        run_name = trial_id  # a fresh trial, or a restart that Train resumes from its own storage
    raw["run"]["name"] = run_name
    cfg = validate(raw, job.source)

    run_uri = cfg.run_uri
    every = cfg.train.checkpoint_every
    latest_train: dict[str, float] = {}
    pending: dict[int, dict[str, Any]] = {}
    checkpointed: set[int] = set()
    total_steps = {"value": None}
    metric_is_train = job.search.metric in TRAIN_METRICS

    final: dict[str, Any] = {}

    def send(step: int, metrics: dict[str, Any], done: bool = False) -> None:
        if not done and total_steps["value"] is not None and step >= total_steps["value"]:
            # The run's last result waits until the run has ended (export included) and goes
            # to Tune marked done: a scheduler acting on it could only stop or pause a trial
            # in its last seconds (PBT pauses a running trial whenever another waits), and
            # the restart would redo steps already trained.
            final.update(metrics, step=step)
            return
        result = {**latest_train, **metrics, "step": step, "run_name": run_name, **({"done": True} if done else {})}
        if step in checkpointed:
            path = storage.join(run_uri, checkpoint_name(step))
            tune.report(result, checkpoint=_pointer(run_name, trial_id, path, step))
        else:
            tune.report(result)

    def on_event(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "data":
            total_steps["value"] = event["plan"]["total_steps"]
        elif kind == "train":
            latest_train.update({k: v for k, v in event.items() if isinstance(v, (int, float)) and k != "time"})
            if metric_is_train:
                send(int(event["step"]), {})
        elif kind == "eval" and not metric_is_train:
            step = int(event["step"])
            metrics = {k: v for k, v in event.items() if k.startswith("eval/") or k == "epoch"}
            expected = (every and step % every == 0) or step == total_steps["value"]
            if expected and step not in checkpointed:
                pending[step] = metrics  # report once the checkpoint of this step is saved
            else:
                send(step, metrics)
        elif kind == "checkpoint":
            step = int(event["step"])
            checkpointed.add(step)
            if step in pending:
                send(step, pending.pop(step))

    run_training(cfg, on_event=on_event, start_from=start_from, adopt_config=exploit)
    for step, metrics in sorted(pending.items()):
        send(step, metrics)
    if final:
        step = final.pop("step")
        send(step, final, done=True)


# ---------------------------------------------------------------- the driver


class _LiveTable:
    """A Tune callback that prints the trials table whenever a trial changes state, and a
    line per result; plus the CRASH_ENV fault injection for tests."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from ray.tune import Callback

        class LiveTable(Callback):
            def __init__(self, job: TuneJob, max_t: int | None) -> None:
                self.job, self.max_t = job, max_t
                self._console: Any = None
                self.last: dict[str, dict[str, Any]] = {}
                self.finished = 0
                self.crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
                self.finished_at: float | None = None

            @property
            def console(self) -> Any:
                if self._console is None:
                    from rich.console import Console

                    self._console = Console()
                return self._console

            def __getstate__(self) -> dict[str, Any]:
                # Tune pickles its run config with the experiment state; a console is not picklable.
                return {**self.__dict__, "_console": None}

            def _table(self, trials: list[Any]) -> None:
                _print_table(self.console, self.job, trials, self.last, self.max_t)

            def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                # Written here, on the driver, not in the trial: trials may run on other nodes.
                with (self.job.search_dir / "trial_starts.jsonl").open("a") as fh:
                    fh.write(json.dumps({"trial_id": trial.trial_id, "time": time.time(),
                                         "params": {d.key: trial.config.get(d.key) for d in self.job.dimensions}},
                                        default=str) + "\n")
                self.job.publish("trial_starts.jsonl")
                self._table(trials)

            def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
                self.last[trial.trial_id] = result
                value = result.get(self.job.search.metric)
                shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
                self.console.print(f"  {trial.trial_id} step {result.get('step')}: {self.job.search.metric} {shown}",
                                   highlight=False)

            def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                self.finished += 1
                if self.crash_after and self.finished >= self.crash_after and self.finished_at is None:
                    self.finished_at = time.monotonic()
                self._table(trials)

            def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                self._table(trials)

            def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
                # Give Tune's periodic state save (TUNE_GLOBAL_CHECKPOINT_S) time to run.
                if self.finished_at is not None and time.monotonic() - self.finished_at > 4:
                    os._exit(3)

        return LiveTable(*args, **kwargs)


def _status(trial: Any, last: dict[str, Any], job: TuneJob, max_t: int | None) -> str:
    status = trial.status
    if status == "TERMINATED" and max_t:
        step = last.get(trial.trial_id, {}).get("step") or (trial.last_result or {}).get("step")
        if step is not None and step < max_t:
            return "STOPPED"
    return status


def _print_table(console: Any, job: TuneJob, trials: list[Any], last: dict[str, dict[str, Any]],
                 max_t: int | None = None) -> None:
    from rich.table import Table

    table = Table(title=f"clray tune: {job.search_dir.name}", header_style="bold")
    table.add_column("trial")
    table.add_column("status")
    for dim in job.dimensions:
        table.add_column(dim.key.split(".")[-1], justify="right")
    table.add_column("step", justify="right")
    table.add_column(job.search.metric, justify="right")
    for trial in trials:
        result = last.get(trial.trial_id) or trial.last_result or {}
        row = [trial.trial_id, _status(trial, last, job, max_t)]
        for dim in job.dimensions:
            value = trial.config.get(dim.key)
            row.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        metric = result.get(job.search.metric)
        row.append(str(result.get("step", "-")))
        row.append(f"{metric:.4f}" if isinstance(metric, (int, float)) else "-")
        table.add_row(*row)
    console.print(table)


def _scheduler(job: TuneJob, max_t: int | None) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    search, train = job.search, job.base.train
    if search.scheduler == "asha":
        grace = search.asha.grace_period or train.eval_every or train.log_every
        return ASHAScheduler(
            time_attr="step",
            grace_period=grace,
            reduction_factor=search.asha.reduction_factor,
            # ASHA stops a trial that reaches max_t; one past the last step lets a full trial
            # end by itself (final evaluation, checkpoint and export) instead of being killed.
            max_t=(search.asha.max_t or max_t or 10**9) + 1,
        )
    if search.scheduler == "pbt":
        mutations = {d.key: d.tune_domain() for d in job.dimensions if d.key in PBT_MUTABLE}
        if search.seed is not None:
            # PBT draws its exploit partners and perturbations from Python's global random.
            random.seed(search.seed)
        return PopulationBasedTraining(
            time_attr="step",
            perturbation_interval=search.pbt.perturbation_interval or train.eval_every,
            hyperparam_mutations=mutations,
            quantile_fraction=search.pbt.quantile_fraction,
            resample_probability=search.pbt.resample_probability,
        )
    return FIFOScheduler()


def _search_alg(job: TuneJob) -> Any:
    if job.search.algorithm != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Seeded: the same search config draws the same trial configs.
        return BasicVariantGenerator(max_concurrent=job.search.max_concurrent, random_state=job.search.seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=job.search.seed))


def _trial_cpus(job: TuneJob) -> float:
    from clray.jobs.runtime import training_cpus

    return training_cpus(validate(job.trial_raw({}), job.source))


def run_tune(job: TuneJob, *, resume: bool = False, verbose: bool = False, console: Any = None) -> TuneSummary:
    """Run (or resume) the search and write its outputs; returns the summary."""
    started = time.perf_counter()
    from rich.console import Console

    console = console or Console()
    from clray.pipelines import storage

    search_dir = job.search_dir
    experiment_uri = storage.join(job.search_uri, "tune")
    from clray.jobs.runtime import TUNE_DEFAULTS

    for name, value in TUNE_DEFAULTS.items():  # why each: jobs.runtime.RAY_KNOBS
        os.environ.setdefault(name, value)
    if job.remote:
        storage.check_writable(job.search_uri, job.base.storage, "run.output_dir")
    has_search = storage.is_file(storage.join(experiment_uri, "tuner.pkl"), job.base.storage)
    if resume and not has_search:
        raise ConfigError(job.source, [f"--resume: no search to resume in {experiment_uri} (start it without --resume)"])
    if not resume and has_search:
        raise ConfigError(job.source, [
            f"{job.search_uri} already holds a search: add --resume to continue it, or set run.name to start a new one"
        ])
    from clray.jobs.run.data import check_data
    from clray.jobs.run.driver import run_worker_env
    from clray.jobs.runtime import start_ray

    # Every trial checks its own data, but one check here fails a broken corpus in seconds.
    check_data(job.base)
    search_dir.mkdir(parents=True, exist_ok=True)
    starts = storage.join(job.search_uri, "trial_starts.jsonl")
    if job.remote and resume and storage.is_file(starts, job.base.storage):
        (search_dir / "trial_starts.jsonl").write_bytes(storage.read_bytes(starts, job.base.storage))
    (search_dir / "search.json").write_text(json.dumps(
        {"source": job.source, "base": job.raw_base, "search": job.search.model_dump(mode="json")},
        indent=2, default=str,
    ))
    job.publish("search.json")

    trial_cfg = validate(job.trial_raw({}), job.source)
    # Room for max_concurrent trials at once (their workers plus Ray Data), so they run
    # side by side here; on a cluster the autoscaler provides it.
    start_ray(job.search.max_concurrent * _trial_cpus(job), run_worker_env(trial_cfg), verbose, dashboard=True)
    from ray import tune

    from clray.pipelines import quiet_ray_data

    quiet_ray_data()
    max_t = _trial_steps(job)
    # The trial's own process only waits on its TorchTrainer, whose workers ask Ray for the
    # real resources (what an autoscaler sees); a token CPU keeps it schedulable anywhere.
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"CPU": 0.01})
    live = _LiveTable(job, max_t)
    # Tune's state next to the trials: on S3 through the filesystem the data uses, so a
    # search resumes from any machine.
    fs, inner = storage.filesystem(job.search_uri, job.base.storage)
    location = {"storage_path": inner, "storage_filesystem": fs} if job.remote else {"storage_path": str(search_dir)}
    run_config = tune.RunConfig(
        name="tune",
        **location,
        callbacks=[live],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=job.search.max_failures),
    )
    if resume:
        restore_path = storage.filesystem(experiment_uri, job.base.storage)[1] if job.remote else experiment_uri
        tuner = tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True, resume_unfinished=True,
                                   storage_filesystem=fs if job.remote else None)
        console.print(f"resuming the search in {job.search_uri}")
    else:
        param_space = {d.key: d.tune_domain() for d in job.dimensions}
        num_samples = 1 if job.search.algorithm == "grid" else job.search.num_trials
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=job.search.metric,
                mode=job.search.mode,
                num_samples=num_samples,
                # random/grid: the generator above limits concurrency itself
                max_concurrent_trials=job.search.max_concurrent if job.search.algorithm == "optuna" else None,
                scheduler=_scheduler(job, max_t),
                search_alg=_search_alg(job),
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=run_config,
        )
    grid = tuner.fit()
    summary = write_outputs(job, grid, max_t)
    summary.wall_seconds = time.perf_counter() - started
    (search_dir / "summary.json").write_text(summary.to_json())
    job.publish("summary.json", "results.parquet", "results.csv", "best.toml", "plots", "trial_starts.jsonl")
    if job.remote:
        summary = _as_uris(job, summary)
    _print_final(console, job, summary)
    return summary


def _as_uris(job: TuneJob, summary: TuneSummary) -> TuneSummary:
    """The summary of a search on S3 names the uploaded files, not the staging copies."""
    from clray.pipelines import storage

    def uri(path: str | None) -> str | None:
        if path is None:
            return None
        return storage.join(job.search_uri, str(Path(path).relative_to(job.search_dir)))

    summary.search_dir = job.search_uri
    summary.best_config = uri(summary.best_config)
    summary.results_parquet, summary.results_csv = uri(summary.results_parquet), uri(summary.results_csv)
    summary.plots = [uri(p) for p in summary.plots]
    return summary


def _trial_rows(job: TuneJob, grid: Any, max_t: int | None) -> list[dict[str, Any]]:
    rows = []
    sign = 1 if job.search.mode == "max" else -1
    for result in grid:
        path = Path(result.path) if result.path else None
        trial_id = path.name if path else "?"
        history = result.metrics_dataframe
        values: list[float] = []
        steps: list[int] = []
        if history is not None and job.search.metric in history:
            frame = history[[c for c in ("step", job.search.metric) if c in history]].dropna()
            values = [float(v) for v in frame[job.search.metric]]
            steps = [int(s) for s in frame["step"]] if "step" in frame else []
        last_step = int((result.metrics or {}).get("step") or (steps[-1] if steps else 0))
        error = str(result.error).strip().splitlines()[-1] if result.error else None
        status = "ERROR" if error else ("STOPPED" if max_t and last_step < max_t else "COMPLETE")
        row: dict[str, Any] = {
            "trial_id": trial_id,
            "status": status,
            "steps": last_step,
            "metric_last": values[-1] if values else None,
            "metric_best": (max(values, key=lambda v: sign * v) if values else None),
            "evaluations": len(values),
            "run_name": (result.metrics or {}).get("run_name"),
            "error": error,
            "curve": json.dumps([[s, v] for s, v in zip(steps, values, strict=False)]),
        }
        for dim in job.dimensions:
            row[dim.key] = (result.config or {}).get(dim.key)
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def write_outputs(job: TuneJob, grid: Any, max_t: int | None) -> TuneSummary:
    """best.toml, results.parquet/csv and plots from the finished search."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    import tomli_w

    search_dir = job.search_dir
    rows = _trial_rows(job, grid, max_t)
    sign = 1 if job.search.mode == "max" else -1
    ranked = [r for r in rows if r["metric_last"] is not None and r["status"] != "ERROR"]
    # The best trial by its last evaluation: a trial ASHA stopped early at a low rung is
    # judged on what it had reached, the others on their final evaluation.
    best = max(ranked, key=lambda r: sign * r["metric_last"]) if ranked else None
    summary = TuneSummary(
        search_dir=str(search_dir), metric=job.search.metric, mode=job.search.mode, trials=rows,
        total_trial_steps=sum(r["steps"] for r in rows),
        stopped_early=sum(r["status"] == "STOPPED" for r in rows),
        errored=sum(r["status"] == "ERROR" for r in rows),
    )
    table_rows = [{k: v for k, v in r.items()} for r in rows]
    columns = list(table_rows[0]) if table_rows else ["trial_id"]
    arrays = {}
    for column in columns:
        values = [r.get(column) for r in table_rows]
        if all(isinstance(v, (int, float)) or v is None for v in values) and any(v is not None for v in values):
            values = [None if v is None else float(v) for v in values] if any(
                isinstance(v, float) for v in values) else values
        else:
            values = [None if v is None else str(v) for v in values]
        arrays[column] = values
    table = pa.table(arrays)
    pq.write_table(table, search_dir / "results.parquet")
    pacsv.write_csv(table, search_dir / "results.csv")
    summary.results_parquet = str(search_dir / "results.parquet")
    summary.results_csv = str(search_dir / "results.csv")

    if best is not None:
        params = {d.key: best[d.key] for d in job.dimensions}
        raw = job.trial_raw(params)
        raw.setdefault("run", {})["name"] = f"{job.base.run.name}-best"
        validate(raw, "best config")  # what we write must load as a training config
        header = (f"# Best trial {best['trial_id']} of the search in {search_dir}\n"
                  f"# {job.search.metric} = {best['metric_last']:.6g} ({job.search.mode}) at step {best['steps']}\n"
                  f"# searched: {', '.join(f'{k} = {v!r}' for k, v in params.items())}\n"
                  "# Train it with: clray train THIS_FILE\n")
        (search_dir / "best.toml").write_text(header + tomli_w.dumps(raw))
        summary.best_trial, summary.best_value, summary.best_params = best["trial_id"], best["metric_last"], params
        summary.best_config = str(search_dir / "best.toml")
    summary.plots = _plot(job, rows)
    return summary


def _plot(job: TuneJob, rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = job.search_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    metric = job.search.metric
    colours = {"COMPLETE": "tab:blue", "STOPPED": "tab:orange", "ERROR": "tab:red"}
    for dim in job.dimensions:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for status, colour in colours.items():
            points = [(r[dim.key], r["metric_last"]) for r in rows
                      if r["status"] == status and r["metric_last"] is not None and r[dim.key] is not None]
            if points and all(isinstance(x, (int, float)) for x, _ in points):
                ax.scatter([p[0] for p in points], [p[1] for p in points], c=colour, label=status.lower())
            elif points:
                ax.scatter([str(p[0]) for p in points], [p[1] for p in points], c=colour, label=status.lower())
        if dim.log or (dim.kind in ("grid", "choice") and all(isinstance(v, (int, float)) and v > 0 for v in dim.values)
                       and max(dim.values) / min(dim.values) >= 10):
            ax.set_xscale("log")
        ax.set_xlabel(dim.key)
        ax.set_ylabel(f"{metric} (last evaluation)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"metric_vs_{dim.key.replace('.', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        curve = json.loads(row["curve"])
        if curve:
            label = ", ".join(f"{d.key.split('.')[-1]}={row[d.key]:.3g}" if isinstance(row[d.key], float)
                              else f"{d.key.split('.')[-1]}={row[d.key]}" for d in job.dimensions)
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(str(path))
    return written


def _print_final(console: Any, job: TuneJob, summary: TuneSummary) -> None:
    from rich.table import Table

    table = Table(title=f"clray tune: {summary.search_dir}", header_style="bold")
    for column in ("trial", "status", *[d.key for d in job.dimensions], "steps", job.search.metric):
        table.add_column(column)
    for row in summary.trials:
        marker = " *" if row["trial_id"] == summary.best_trial else ""
        values = [f"{row[d.key]:.4g}" if isinstance(row[d.key], float) else str(row[d.key]) for d in job.dimensions]
        metric = f"{row['metric_last']:.4f}" if row["metric_last"] is not None else "-"
        table.add_row(row["trial_id"] + marker, row["status"], *values, str(row["steps"]), metric)
    console.print(table)
    console.print(f"trial-steps in all: {summary.total_trial_steps}; stopped early: {summary.stopped_early}; "
                  f"errored: {summary.errored}")
    if summary.best_config:
        console.print(f"best: {summary.best_trial} ({job.search.metric} = {summary.best_value:.4f}) -> {summary.best_config}")
    console.print(f"results: {summary.results_parquet}, {summary.results_csv}")
    console.print(f"plots: {', '.join(summary.plots)}")
