"""A run's data, settled on the driver: the files (or the mined plan) checked before Ray
starts, then the Ray Datasets, the valid-row count and the schedule every rank follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clray.jobs.config import JobConfig
from clray.jobs.run.schedule import Schedule

if TYPE_CHECKING:
    from clray.pipelines.spec import DataSpec


def check_data(cfg: JobConfig) -> DataSpec:
    """The run's data facts, checked with plain pyarrow before Ray starts: the training
    files (examples) or the checked plan (packed), the eval files, the towers, the column
    tables, filesystems and data-task CPUs (``pipelines.spec.DataSpec``); every problem of
    both splits in one DataError. ``build_run_data`` builds the datasets from it without
    working any of it out again."""
    from clray.pipelines.spec import resolve_spec

    return resolve_spec(
        cfg.data, cfg.model.anchor, cfg.model.positive_tower, storage=cfg.storage,
        global_batch_size=cfg.train.global_batch_size, num_workers=cfg.scaling.num_workers,
    )


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
    packed_spec: Any = None
    """Packed plans of global batches: the checked ``DataSpec`` every rank builds its own
    datasets from (``pipelines.unpack.rank_dataset``)."""
    cached: Any = None
    """Examples mode with data.cache: the cached training set's blocks
    (``pipelines.cached.CachedSet``), which every rank reads itself, no split."""


def build_run_data(cfg: JobConfig, spec: DataSpec, quarantine_path: str) -> RunData:
    """Validate (examples: the quarantine pass), preprocess and wire up the datasets of
    ``spec`` (``check_data``). A Ray Data failure surfaces as the user's error, not Ray's."""
    from clray.jobs.runtime import describe_failure
    from clray.pipelines import DataError, build_datasets, steps_per_epoch
    from clray.pipelines.cached import cached_set
    from clray.pipelines.unpack import build_packed_datasets

    plan = spec.plan
    try:
        if plan is not None:
            # The miner validated and quarantined the rows it packed: no pass here.
            packed = build_packed_datasets(spec, num_workers=cfg.scaling.num_workers, quarantine_path=quarantine_path)
            datasets = {f"train_{i}": ds for i, ds in enumerate(packed.train)}
            out = RunData(datasets, packed.steps_per_epoch, plan.rows_per_epoch, packed.report,
                          packed.eval is not None, skipped_batches=packed.skipped_batches)
            out.packed = {"plan_dir": plan.directory, "num_plans": plan.num_plans,
                          "batches_per_plan": [e.num_batches for e in plan.epochs],
                          "skipped_batches": packed.skipped_batches,
                          "plan_quarantined_rows": plan.quarantined_rows, "num_workers": plan.num_workers}
            if plan.global_batches:
                out.packed_spec = spec
            eval_ds = packed.eval
        else:
            prepared = build_datasets(spec, quarantine_path=quarantine_path, seed=cfg.run.seed)
            out = RunData({"train": prepared.train}, steps_per_epoch(prepared.num_train_rows, cfg.train.global_batch_size),
                          prepared.num_train_rows, prepared.report, prepared.eval is not None)
            if prepared.cached is not None:
                out.cached = cached_set(prepared.cached)
            eval_ds = prepared.eval
    except DataError:
        raise
    except Exception as exc:  # a Ray Data task failed: surface the user's error, not Ray's
        raise DataError(unreadable_data(spec) or f"reading the corpus failed: {describe_failure(exc)}") from None
    if eval_ds is not None:
        out.datasets["eval"] = eval_ds
    return out


def unreadable_data(spec: DataSpec) -> list[str]:
    """After a failed read: the shards and row groups that cannot be decoded, found on the
    driver (``pipelines.integrity``), or [] when every page reads (another cause)."""
    from clray.pipelines.integrity import unreadable_row_groups

    splits = [s for s in (spec.train, *spec.plan_epochs, spec.eval) if s is not None]
    return [problem for split in splits for problem in unreadable_row_groups(split)]


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
        global_batches=data.packed_spec is not None,
        stop_step=stop_step,
        remainder_rows=0 if packed else data.num_rows - per_epoch * cfg.train.global_batch_size,
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
