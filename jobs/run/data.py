"""A run's data, settled on the driver: the files (or the mined plan) checked before Ray
starts, then the Ray Datasets, the valid-row count and the schedule every rank follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from clray.jobs.config import JobConfig
from clray.jobs.run.schedule import Schedule


@dataclass
class CheckedData:
    """What the driver found before Ray started: the shard lists, or the packed plan."""

    train_files: list[str]
    eval_files: list[str]
    packed_plan: Any = None
    """A ``pipelines.packed.PackedPlan`` in packed mode, else None."""


def check_data(cfg: JobConfig) -> CheckedData:
    """Training files (examples) or the checked plan (packed), and the eval files; every
    problem of both splits in one DataError, with plain pyarrow, before Ray starts."""
    from clray.pipelines import DataError, check_schema, resolve_shards
    from clray.pipelines.packed import load_plan

    checked = CheckedData([], [])
    problems: list[str] = []
    try:
        if cfg.data.batches == "packed":
            checked.packed_plan = load_plan(
                cfg.data, global_batch_size=cfg.train.global_batch_size, num_workers=cfg.scaling.num_workers,
                storage=cfg.storage,
            )
        else:
            checked.train_files = resolve_shards(cfg.data.train, "data.train", cfg.storage)
            check_schema(checked.train_files, cfg.data, "data.train", cfg.storage)
    except DataError as err:
        problems.extend(err.problems)
    try:
        checked.eval_files = resolve_shards(cfg.data.eval, "data.eval", cfg.storage) if cfg.data.eval else []
        if checked.eval_files:
            check_schema(checked.eval_files, cfg.data.without_negatives(), "data.eval", cfg.storage)
    except DataError as err:
        problems.extend(err.problems)
    if problems:
        raise DataError(problems)
    return checked


@dataclass
class RunData:
    """The datasets of one start of a run and the counts the schedule is made from."""

    datasets: dict[str, Any]
    """Ray Datasets by the name the workers read them under ("train" or "train_<plan>", "eval")."""
    steps_per_epoch: int
    num_rows: int
    report: Any
    """The training split's ``ValidationReport`` (quarantine)."""
    has_eval: bool
    packed: dict[str, Any] | None = None
    """Packed: the plan's facts for the data event and the summary."""
    skipped_batches: list[int] = field(default_factory=list)


def build_run_data(cfg: JobConfig, checked: CheckedData, quarantine_path: str) -> RunData:
    """Validate (examples: the quarantine pass), preprocess and wire up the datasets. A
    Ray Data failure surfaces as the user's error, not Ray's."""
    from clray.jobs.runtime import describe_failure
    from clray.pipelines import DataError, build_datasets, steps_per_epoch
    from clray.pipelines.packed import build_packed_datasets

    plan = checked.packed_plan
    try:
        if plan is not None:
            # The miner validated and quarantined the rows it packed: no pass here.
            packed = build_packed_datasets(
                plan, cfg.data, cfg.model.anchor, cfg.model.positive_tower, num_workers=cfg.scaling.num_workers,
                quarantine_path=quarantine_path, eval_files=checked.eval_files, storage=cfg.storage,
            )
            datasets = {f"train_{i}": ds for i, ds in enumerate(packed.train)}
            out = RunData(datasets, packed.steps_per_epoch, plan.rows_per_epoch, packed.report,
                          packed.eval is not None, skipped_batches=packed.skipped_batches)
            out.packed = {"plan_dir": plan.directory, "num_plans": plan.num_plans,
                          "batches_per_plan": [e.num_batches for e in plan.epochs],
                          "skipped_batches": packed.skipped_batches,
                          "plan_quarantined_rows": plan.quarantined_rows}
            eval_ds = packed.eval
        else:
            prepared = build_datasets(
                cfg.data, cfg.model.anchor, cfg.model.positive_tower, quarantine_path=quarantine_path,
                seed=cfg.run.seed, train_files=checked.train_files, eval_files=checked.eval_files, storage=cfg.storage,
            )
            out = RunData({"train": prepared.train}, steps_per_epoch(prepared.num_train_rows, cfg.train.global_batch_size),
                          prepared.num_train_rows, prepared.report, prepared.eval is not None)
            eval_ds = prepared.eval
    except DataError:
        raise
    except Exception as exc:  # a Ray Data task failed: surface the user's error, not Ray's
        raise DataError(f"reading the corpus failed: {describe_failure(exc)}") from None
    if eval_ds is not None:
        out.datasets["eval"] = eval_ds
    return out


def make_schedule(cfg: JobConfig, data: RunData, stop_epoch: int | None) -> Schedule:
    """The schedule every rank follows: total steps from epochs (capped by max_steps), and
    where this start stops (``stop_epoch``) when that is before the end."""
    from clray.pipelines import local_shuffle_buffer_size

    per_epoch = data.steps_per_epoch
    total = per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    stop_step = stop_epoch * per_epoch if stop_epoch is not None and stop_epoch * per_epoch < total else None
    packed = data.packed is not None
    schedule = Schedule(
        steps_per_epoch=per_epoch,
        total_steps=total,
        local_shuffle_buffer=None if packed else local_shuffle_buffer_size(cfg.data),
        num_train_rows=data.num_rows,
        packed=packed,
        num_plans=data.packed["num_plans"] if packed else 1,
        stop_step=stop_step,
    )
    if packed:
        # More epochs than plans: epoch e trains on plan e % num_plans.
        data.packed["cycles_plans"] = math.ceil(total / per_epoch) > data.packed["num_plans"]
    return schedule


def ingest_config(cfg: JobConfig, names: list[str]) -> Any:
    """Ray Train's ingest settings. Train replaces each dataset's execution options with
    these when it splits it, so data.deterministic's ordered execution is set here."""
    from ray.train import DataConfig

    if not cfg.data.deterministic:
        return DataConfig(datasets_to_split=names)
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=names, execution_options=options)
