"""Training on mined, packed batches: the datasets, and the unpacking on the workers.

From the run's ``DataSpec`` (its checked ``PackedPlan`` and each epoch plan's files),
``packed_datasets`` gives one Ray Dataset per epoch plan whose rows are the mined
batches, preprocessed exactly as examples mode preprocesses single rows, with a leading
dimension of 1 per batch.

A mined batch is trained whole or not at all, in one step: a plan mined for W workers
holds global batches, and rank r's dataset (``rank_dataset``, built by the rank itself)
reads every batch of the plan in order but decodes only its part ``[r*b, (r+1)*b)``, so
step s on every rank is global batch s whatever order Ray Data's tasks finish in (the
datasets preserve order, and the worker checks each batch's index). A plan of local
batches (no ``num_workers`` in its manifest, mined before global batches) is read by
``packed_datasets`` on the driver and split between the ranks, one row per rank and
step. A bad
row inside a batch stops the run with an error naming the file, epoch, batch and row id
instead of being dropped (the miner quarantines bad rows before packing them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clray.models.preprocess import ImageDecodeError
from clray.pipelines._compat import avoid_fsspec_http_import_race
from clray.pipelines.config import DataConfig
from clray.pipelines.dataset import build_eval_dataset, preprocess_rows
from clray.pipelines.errors import DataError
from clray.pipelines.packed import PackedPlan
from clray.pipelines.plan_format import BATCH_COLUMN, EPOCH_COLUMN
from clray.pipelines.reading import legacy_parquet_reader, quiet_ray_data
from clray.pipelines.sources import required_columns
from clray.pipelines.spec import DataSpec, SplitSpec
from clray.pipelines.validate import (
    PATH_COLUMN,
    Tower,
    ValidationReport,
    image_decodes,
    row_problems,
)

if TYPE_CHECKING:
    import ray.data


def _flatten(row: pa.Table, data_cfg: DataConfig, batch_size: int, where: str) -> pa.Table:
    """One packed row -> a table of ``batch_size`` ordinary rows with the same columns."""
    columns: dict[str, pa.Array] = {}
    for name in required_columns(data_cfg):
        lists = row.column(name).combine_chunks()
        length = pc.list_value_length(lists)[0].as_py()
        if length != batch_size:
            raise DataError(
                f"{where}: column {name!r} holds {length} values, not the plan's batch_size = "
                f"{batch_size}: the plan is damaged; mine again"
            )
        columns[name] = lists.flatten()
    return pa.table(columns)


def _undecodable(flat: pa.Table, data_cfg: DataConfig, towers: dict[str, Tower]) -> list[str | None]:
    problems: list[str | None] = [None] * flat.num_rows
    views = [(getattr(data_cfg, v).column, towers[v]) for v in ("anchor", "positive") if getattr(data_cfg, v).kind == "image"]
    for column, tower in views:
        for i, image in enumerate(flat.column(column).to_pylist()):
            if problems[i] is None and not image_decodes(image, tower):
                problems[i] = f"{column}: undecodable image"
    if data_cfg.negatives is not None and data_cfg.negatives.kind == "image":
        k, column = data_cfg.num_negatives, data_cfg.negatives.column
        for i, images in enumerate(flat.column(column).to_pylist()):
            if problems[i] is None and not all(image_decodes(im, towers["positive"]) for im in images[:k]):
                problems[i] = f"{column}: undecodable image"
    return problems


def _bad_rows_error(flat: pa.Table, problems: list[str | None], data_cfg: DataConfig, where: str) -> DataError:
    ids = flat.column(data_cfg.id_column).to_pylist()
    return DataError(
        [
            f"{where}: row {ids[i]!r} cannot be trained on ({problem}); a mined batch is trained whole "
            "or not at all: fix or drop the row in the corpus and mine again"
            for i, problem in enumerate(problems)
            if problem is not None
        ]
    )


def unpack_batches(
    table: pa.Table,
    data_cfg: DataConfig,
    anchor_tower: Tower,
    positive_tower: Tower,
    batch_size: int,
    epoch: int,
    part: tuple[int, int] | None = None,
    with_index: bool = False,
) -> dict[str, np.ndarray]:
    """Packed rows (one per mined batch) -> model inputs shaped [rows, batch_size, ...].

    Each packed row is flattened into ``batch_size`` ordinary rows, validated with the
    same checks as examples mode, and preprocessed by ``preprocess_rows``, so a row
    becomes the same tensors in both modes. Any bad row raises ``DataError``.

    ``part = (rank, num_workers)``: keep only that rank's share of each (global) batch,
    rows ``[rank*b, (rank+1)*b)`` with ``b = batch_size // num_workers``; only those are
    validated and preprocessed. With ``data_cfg.in_batch_score_column`` the rows' teacher
    scores against every in-batch positive come along as ``in_batch_score`` [b, batch_size].
    ``with_index``: add ``plan_batch`` [rows], each row's batch index in its plan.
    """
    towers = {"anchor": anchor_tower, "positive": positive_tower}
    paths = table.column(PATH_COLUMN).to_pylist() if PATH_COLUMN in table.column_names else [None] * table.num_rows
    epochs = table.column(EPOCH_COLUMN).to_pylist()
    indices = table.column(BATCH_COLUMN).to_pylist()
    outputs: list[dict[str, np.ndarray]] = []
    for i in range(table.num_rows):
        where = f"{paths[i] or 'plan'} (epoch {epochs[i]}, batch {indices[i]})"
        if epochs[i] != epoch:
            raise DataError(f"{where}: listed under epoch {epoch} in the manifest: the plan is damaged; mine again")
        flat = _flatten(table.slice(i, 1), data_cfg, batch_size, where)
        if part is not None:
            local = batch_size // part[1]
            flat = flat.slice(part[0] * local, local)
        problems = row_problems(flat, data_cfg, anchor_tower, positive_tower, decode_images=False)
        if any(p is not None for p in problems):
            raise _bad_rows_error(flat, problems, data_cfg, where)
        try:
            arrays = preprocess_rows(flat, data_cfg, towers, include_ids=False)
        except ImageDecodeError:
            raise _bad_rows_error(flat, _undecodable(flat, data_cfg, towers), data_cfg, where) from None
        if data_cfg.in_batch_score_column is not None:
            scores = flat.column(data_cfg.in_batch_score_column).combine_chunks()
            arrays["in_batch_score"] = np.asarray(scores.flatten().to_numpy(zero_copy_only=False),
                                                  dtype=np.float32).reshape(flat.num_rows, batch_size)
        if with_index:
            arrays["plan_batch"] = np.asarray(indices[i], dtype=np.int64)
        outputs.append(arrays)
    return {key: np.stack([o[key] for o in outputs]) for key in outputs[0]}


def _plan_of(spec: DataSpec, builder: str) -> PackedPlan:
    if spec.plan is None:
        raise ValueError(f"{builder} builds packed datasets but the spec is of examples mode: use build_datasets")
    return spec.plan


def _read_epoch(split: SplitSpec, task_cpus: float) -> ray.data.Dataset:
    """One epoch plan's rows: the columns the config names, the epoch and batch indices
    and (for error messages) the file path."""
    import ray.data

    columns = [EPOCH_COLUMN, BATCH_COLUMN, *split.columns]
    with legacy_parquet_reader():
        return ray.data.read_parquet(list(split.paths), filesystem=split.filesystem, columns=columns,
                                     include_paths=PATH_COLUMN not in columns, num_cpus=task_cpus,
                                     file_extensions=None)


def _unpacked(ds: ray.data.Dataset, spec: DataSpec, split: SplitSpec, plan: PackedPlan, epoch: int,
              **options: object) -> ray.data.Dataset:
    """Each mined batch of ``ds`` as model inputs (``unpack_batches``; ``options``: its
    ``part`` and ``with_index``)."""
    return ds.map_batches(
        unpack_batches,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"data_cfg": split.data, "anchor_tower": spec.towers["anchor"],
                   "positive_tower": spec.towers["positive"], "batch_size": plan.batch_size, "epoch": epoch,
                   **options},
        num_cpus=spec.task_cpus,
    )


def packed_datasets(spec: DataSpec, *, num_workers: int) -> list[ray.data.Dataset]:
    """One dataset per epoch plan of ``spec.plan``; each row is one mined batch as model
    inputs with a leading dimension of 1 (``iter_torch_batches(batch_size=1)`` then
    squeeze it).

    Each holds exactly ``steps_per_epoch * num_workers`` rows, so Ray Train's equal
    streaming split gives every rank ``steps_per_epoch`` whole batches; a plan's extra
    batches (``skipped_batches``: its last batch indices) are filtered out by index.
    Reads only the columns the config names, plus the epoch and batch indices and (for
    error messages) the file path.
    """
    from ray.data.expressions import col

    avoid_fsspec_http_import_race()
    plan = _plan_of(spec, "packed_datasets")
    keep = plan.steps_per_epoch(num_workers) * num_workers
    datasets = []
    for epoch, split in zip(plan.epochs, spec.plan_epochs, strict=True):
        ds = _read_epoch(split, spec.task_cpus)
        if epoch.num_batches > keep:
            # Deterministic: drop the plan's last batch indices (its order is shuffled);
            # the limit guarantees the exact count the equal split relies on.
            ds = ds.filter(expr=col(BATCH_COLUMN) < keep, num_cpus=spec.task_cpus).limit(keep)
        datasets.append(_unpacked(ds, spec, split, plan, epoch.epoch))
    return datasets


def rank_dataset(spec: DataSpec, plan_index: int, rank: int, num_workers: int, start_step: int = 0) -> ray.data.Dataset:
    """Rank ``rank``'s batches of epoch plan ``plan_index`` from step ``start_step`` on, in
    step order: model inputs with a leading dimension of 1 and ``plan_batch`` (the batch
    index the worker checks against its step). Built on the rank, so a run resumed
    mid-epoch filters on the batch index and never reads trained batches again.

    Execute it with ``preserve_order`` (``DataContext.execution_options``): the order of
    rows is the order of steps."""
    from ray.data.expressions import col

    avoid_fsspec_http_import_race()
    plan = _plan_of(spec, "rank_dataset")
    if not plan.global_batches:
        raise ValueError("rank_dataset reads plans of global batches; a plan of local batches uses packed_datasets")
    epoch, split = plan.epochs[plan_index], spec.plan_epochs[plan_index]
    keep = plan.steps_per_epoch(num_workers)
    chosen = (col(BATCH_COLUMN) >= start_step) & (col(BATCH_COLUMN) < keep)
    ds = _read_epoch(split, spec.task_cpus).filter(expr=chosen, num_cpus=spec.task_cpus)
    return _unpacked(ds, spec, split, plan, epoch.epoch, part=(rank, num_workers), with_index=True)


@dataclass
class PackedData:
    """What the driver needs from the data side in packed mode."""

    plan: PackedPlan
    train: list[ray.data.Dataset]
    """A plan of local batches: one dataset per epoch plan (epoch e trains on
    ``train[e % len(train)]``); empty for global batches, which each rank reads itself."""
    steps_per_epoch: int
    skipped_batches: list[int]
    report: ValidationReport
    """Training rows: nothing quarantined here (the miner did); its quarantine file."""
    eval: ray.data.Dataset | None = None
    eval_report: ValidationReport | None = None


def build_packed_datasets(
    spec: DataSpec, *, num_workers: int, quarantine_path: str | os.PathLike[str]
) -> PackedData:
    """The packed training datasets plus the ordinary eval split (``build_eval_dataset``,
    quarantined to ``sibling_quarantine_path(quarantine_path, "eval")``)."""
    plan = _plan_of(spec, "build_packed_datasets")
    quiet_ray_data()
    rows = plan.rows_per_epoch
    eval_ds, eval_report = build_eval_dataset(spec, quarantine_path=quarantine_path)
    return PackedData(
        plan=plan,
        # global batches: each rank builds its own (rank_dataset), from the spec
        train=[] if plan.global_batches else packed_datasets(spec, num_workers=num_workers),
        steps_per_epoch=plan.steps_per_epoch(num_workers),
        skipped_batches=plan.skipped_batches(num_workers),
        report=ValidationReport(
            total_rows=rows, valid_rows=rows, quarantined_rows=0, quarantine_path=plan.quarantine_path
        ),
        eval=eval_ds,
        eval_report=eval_report,
    )
