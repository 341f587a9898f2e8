"""Training on mined, packed batches (``data.batches = "packed"``): the checked plan.

``clray mine`` writes a plan directory (format: ``pipelines.plan_format``) in which each
Parquet row is one whole local batch. This module is the driver's side of reading it:
before Ray starts, ``load_plan`` checks the plan against the training config (batch
size, column names and kinds, hard negatives, listed files and their footers) and
reports every problem at once, each naming the key to change. The checked ``PackedPlan``
goes into the run's ``pipelines.spec.DataSpec``, from which ``pipelines.unpack`` builds
one Ray Dataset per epoch plan and unpacks its batches on the workers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clray.pipelines import storage as st
from clray.pipelines.config import DataConfig
from clray.pipelines.errors import DataError
from clray.pipelines.plan_format import (
    BATCH_COLUMN,
    EPOCH_COLUMN,
    PlanColumns,
    PlanFormatError,
    plan_columns,
    read_manifest,
)
from clray.pipelines.sources import ColumnRule, list_of, missing_column_problem, required_columns
from clray.pipelines.storage import StorageConfig

KEY = "data.train"
QUARANTINE_NAME = "quarantine.parquet"


@dataclass(frozen=True)
class PlanEpoch:
    """One epoch's batches: its files (absolute paths) and how many batches they hold."""

    epoch: int
    num_batches: int
    files: tuple[str, ...]
    remainder_rows: int = 0
    """Rows of the corpus this plan left out because they did not fill a batch."""


@dataclass(frozen=True)
class PackedPlan:
    """A checked plan directory: what the driver needs to build the datasets."""

    directory: str
    batch_size: int
    """Rows per packed row: the global batch (``num_workers`` set), or one local batch."""
    num_negatives: int
    columns: PlanColumns
    epochs: tuple[PlanEpoch, ...]
    quarantine_path: str | None = None
    """The miner's quarantine file (rows it rejected), when it wrote one."""
    quarantined_rows: int = 0
    """Rows the miner rejected (the manifest's ``quarantined_rows``)."""
    num_workers: int | None = None
    """The worker count the plan was mined for: each packed row is one global batch that
    rank r trains rows ``[r*b, (r+1)*b)`` of in the same step. None: a plan of local
    batches (written before global batches), each rank taking rows of its own."""

    @property
    def num_plans(self) -> int:
        return len(self.epochs)

    @property
    def global_batches(self) -> bool:
        return self.num_workers is not None

    @property
    def rows_per_epoch(self) -> int:
        """Rows in the first epoch plan (every plan packs the same corpus)."""
        return self.epochs[0].num_batches * self.batch_size

    def local_batch_size(self, num_workers: int) -> int:
        return self.batch_size // num_workers if self.global_batches else self.batch_size

    def rows_per_step(self, num_workers: int) -> int:
        """Packed rows one step consumes: one global batch, or one local batch per rank."""
        return 1 if self.global_batches else num_workers

    def steps_per_epoch(self, num_workers: int) -> int:
        """Steps every rank runs in every epoch: the plan with the fewest batches decides
        (every epoch has the same length, which keeps the LR schedule and resume
        arithmetic of examples mode)."""
        return min(e.num_batches for e in self.epochs) // self.rows_per_step(num_workers)

    def skipped_batches(self, num_workers: int) -> list[int]:
        """Per plan, the batches no worker trains on (its last indices): a plan's batch
        count beyond ``steps_per_epoch * rows_per_step``. Reported, never silent."""
        keep = self.steps_per_epoch(num_workers) * self.rows_per_step(num_workers)
        return [e.num_batches - keep for e in self.epochs]


def _column_problems(cols: PlanColumns, data_cfg: DataConfig, num_negatives: int, out: str) -> list[str]:
    problems: list[str] = []

    def same(key: str, want: str | None, have: str | None, what: str) -> None:
        if want != have:
            problems.append(
                f"{key} = {want!r} but the plan at {out} has {what} {have!r}: set {key} = {have!r} "
                "(packed batches keep the corpus's column names)"
            )

    same("data.id_column", data_cfg.id_column, cols.id, "the id column")
    for view in ("anchor", "positive"):
        cfg_view = getattr(data_cfg, view)
        same(f"data.{view}.column", cfg_view.column, getattr(cols, view), f"the {view} column")
        same(f"data.{view}.kind", cfg_view.kind, getattr(cols, f"{view}_kind"), f"a {view} view of kind")
    if data_cfg.label_column is not None:
        if cols.label is None:
            problems.append(
                f"data.label_column = {data_cfg.label_column!r} but the plan at {out} has no label column "
                "(its corpus was mined without one): unset data.label_column or mine a labelled corpus"
            )
        else:
            same("data.label_column", data_cfg.label_column, cols.label, "the label column")
    if data_cfg.in_batch_score_column is not None:
        if cols.in_batch_scores is None:
            problems.append(
                f"data.in_batch_score_column = {data_cfg.in_batch_score_column!r} but the plan at {out} has no "
                "in-batch teacher scores: mine again with mining.in_batch_scores = true, or unset the key"
            )
        else:
            same("data.in_batch_score_column", data_cfg.in_batch_score_column, cols.in_batch_scores,
                 "the in-batch score column")
    if data_cfg.negatives is None:
        return problems
    if num_negatives < 1 or cols.negatives is None:
        problems.append(
            f"data.negatives is set but the plan at {out} was mined without hard negatives "
            f"(num_negatives = {num_negatives}): remove [data.negatives] or mine with hard negatives"
        )
        return problems
    same("data.negatives.column", data_cfg.negatives.column, cols.negatives, "the hard-negative column")
    if data_cfg.negatives.kind != cols.positive_kind:
        problems.append(
            f"data.negatives.kind = {data_cfg.negatives.kind!r} but the plan's hard negatives are "
            f"{cols.positive_kind!r} (the positive view of the negative rows): set "
            f"data.negatives.kind = {cols.positive_kind!r}"
        )
    if data_cfg.num_negatives > num_negatives:
        problems.append(
            f"data.num_negatives = {data_cfg.num_negatives} but the plan at {out} has {num_negatives} "
            f"hard negative(s) per row: set data.num_negatives to at most {num_negatives}"
        )
    for key, have, what in (
        ("data.negative_id_column", cols.negative_ids, "hard-negative id"),
        ("data.negative_score_column", cols.negative_scores, "teacher score"),
    ):
        want = getattr(data_cfg, key.removeprefix("data."))
        if want is None:
            continue
        if have is None:
            problems.append(f"{key} = {want!r} but the plan at {out} has no {what} column: unset {key}")
        else:
            same(key, want, have, f"the {what} column")
    return problems


def _quarantine_path(manifest: dict[str, Any], out: Path | str, storage: StorageConfig | None = None) -> str | None:
    """The miner's quarantine file: the manifest's ``quarantine_path`` (relative to the
    plan directory; null when the miner rejected no row), else ``OUT/quarantine.parquet``
    if it exists."""
    if "quarantine_path" in manifest:
        entry = manifest["quarantine_path"]
        if not entry:
            return None
    else:
        entry = QUARANTINE_NAME
    if st.is_s3(out):
        path = st.join(str(out), entry)
        return path if st.is_file(path, storage) else None
    local = Path(out) / entry
    return str(local) if local.is_file() else None


def _epoch_plans(
    manifest: dict[str, Any], out: Path | str, problems: list[str], storage: StorageConfig | None = None
) -> list[PlanEpoch]:
    entries = manifest.get("epochs")
    if not isinstance(entries, list) or not entries:
        problems.append(f"{KEY}: the manifest of {out} lists no epoch plans; run `clray mine` again")
        return []
    plans: list[PlanEpoch] = []
    for index, entry in enumerate(entries):
        try:
            epoch = int(entry["epoch"])
            num_batches = int(entry["num_batches"])
            if st.is_s3(out):
                files = tuple(st.join(str(out), f) for f in entry["files"])
            else:
                files = tuple(str((Path(out) / f).resolve()) for f in entry["files"])
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{KEY}: epoch entry {index} of {out}/manifest.json is malformed ({exc!r}); mine again")
            continue
        if not files:
            problems.append(f"{KEY}: epoch {epoch} of the plan at {out} lists no files; mine again")
        present = set(st.list_files(str(out), storage, KEY)) if st.is_s3(out) else None
        for path in files:
            if not (path in present if present is not None else Path(path).is_file()):
                problems.append(
                    f"{KEY}: {path} (epoch {epoch} of the plan) does not exist: the plan directory "
                    "is incomplete or was moved without its files; copy it whole or mine again"
                )
        plans.append(PlanEpoch(epoch, num_batches, files, len(entry.get("remainder_ids") or [])))
    return plans


def _footer_problems(
    plan: PlanEpoch, columns: Mapping[str, ColumnRule], storage: StorageConfig | None = None
) -> list[str]:
    """Columns, packed types, and the batch count each file's footer declares."""
    problems: list[str] = []
    wanted = {
        EPOCH_COLUMN: ("the plan format", pa.types.is_integer),
        BATCH_COLUMN: ("the plan format", pa.types.is_integer),
        **{name: (key, list_of(ok)) for name, (key, ok, _) in columns.items()},
    }
    rows = 0
    for path in plan.files:
        if not st.is_s3(path) and not Path(path).is_file():
            continue  # reported by _epoch_plans
        try:
            fs, inner = st.filesystem(path, storage) if st.is_s3(path) else (None, path)
            meta = pq.read_metadata(inner, filesystem=fs)
            schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{KEY}: cannot read {path} as Parquet ({type(exc).__name__}: {exc}); mine again")
            continue
        rows += meta.num_rows
        for name, (key, type_ok) in wanted.items():
            if name not in schema.names:
                problems.append(missing_column_problem(path, name, key, list(schema.names)))
            elif not type_ok(schema.field(name).type):
                packed = "an integer" if name in (EPOCH_COLUMN, BATCH_COLUMN) else "a list (one value per row of the batch)"
                problems.append(
                    f"{path}: column {name!r} ({key}) has type {schema.field(name).type}, expected {packed}: "
                    "is this a `clray mine` plan? For ordinary shards set data.batches = \"examples\""
                )
        if BATCH_COLUMN in schema.names:
            index = schema.names.index(BATCH_COLUMN)
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(index).statistics
                if stats is not None and stats.has_min_max and (stats.min < 0 or stats.max >= plan.num_batches):
                    problems.append(
                        f"{KEY}: {path} holds batch indices {stats.min}..{stats.max}, outside 0..{plan.num_batches - 1} "
                        f"of epoch {plan.epoch}'s {plan.num_batches} batches: the plan is damaged; mine again"
                    )
                    break
    if not problems and rows != plan.num_batches:
        problems.append(
            f"{KEY}: epoch {plan.epoch}'s files hold {rows} batches but the manifest says {plan.num_batches}: "
            "the plan is damaged or mixed with another; mine again"
        )
    return problems


def _batch_problems(out: Path | str, batch_size: int, plan_workers: Any, global_batch_size: int,
                    num_workers: int) -> list[str]:
    """The run's batch shape against the plan's: a global-batch plan trains only at the
    worker count it was mined for (its batches are split into exactly that many parts)."""
    if plan_workers is None:  # a plan of local batches
        local = global_batch_size // num_workers
        if batch_size == local:
            return []
        return [
            f"{KEY}: the plan at {out} packs {batch_size} rows per batch, but train.global_batch_size = "
            f"{global_batch_size} over scaling.num_workers = {num_workers} is {local} rows per worker: set "
            f"train.global_batch_size = {batch_size * num_workers} (or mine again with a batch size of {local})"
        ]
    plan_workers = int(plan_workers)
    if plan_workers != num_workers:
        return [
            f"{KEY}: the plan at {out} was mined for {plan_workers} worker(s) (global batches of {batch_size} rows, "
            f"{batch_size // plan_workers} per worker, trained in one step) but scaling.num_workers = {num_workers}: "
            f"train with scaling.num_workers = {plan_workers}, or mine again with mining.num_workers = {num_workers}"
        ]
    if batch_size != global_batch_size:
        return [
            f"{KEY}: the plan at {out} packs global batches of {batch_size} rows but train.global_batch_size = "
            f"{global_batch_size}: set train.global_batch_size = {batch_size} (or mine again with "
            f"mining.batch_size = {global_batch_size})"
        ]
    return []


def load_plan(
    data_cfg: DataConfig,
    *,
    global_batch_size: int,
    num_workers: int,
    storage: StorageConfig | None = None,
    columns: Mapping[str, ColumnRule] | None = None,
) -> PackedPlan:
    """Read and check the plan that ``data.train`` names (a local directory or an
    ``s3://`` prefix, reached through ``storage``), for a run of ``num_workers`` workers
    taking ``global_batch_size`` rows per step; ``DataError`` lists every problem.
    ``columns``: ``required_columns(data_cfg)`` when the caller derived it already
    (``pipelines.spec.resolve_spec`` keeps the one table for the run's reads).

    Reads only the manifest and Parquet footers, so it runs in a second before Ray starts.
    """
    if len(data_cfg.train) != 1:
        raise DataError(
            f"{KEY}: with data.batches = \"packed\" give exactly one plan directory (the output "
            f"of `clray mine`), not {len(data_cfg.train)} entries"
        )
    spec = data_cfg.train[0]
    out: Path | str = st.normalize(spec) if st.is_s3(spec) else Path(os.path.expanduser(spec.removeprefix("file://"))).absolute()
    try:
        manifest = read_manifest(out, storage)
    except PlanFormatError as exc:
        raise DataError(f"{KEY}: {exc}") from None
    problems: list[str] = []
    try:
        cols = plan_columns(manifest)
        batch_size = int(manifest["batch_size"])
        num_negatives = int(manifest.get("num_negatives") or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{KEY}: {out}/manifest.json lacks a readable columns/batch_size entry ({exc!r}); mine again") from None
    plan_workers = manifest.get("num_workers")
    problems.extend(_batch_problems(out, batch_size, plan_workers, global_batch_size, num_workers))
    problems.extend(_column_problems(cols, data_cfg, num_negatives, str(out)))
    epochs = _epoch_plans(manifest, out, problems, storage)
    if not problems:
        wanted = required_columns(data_cfg) if columns is None else columns
        for plan in epochs:
            problems.extend(_footer_problems(plan, wanted, storage))
    if problems:
        raise DataError(problems)
    packed = PackedPlan(
        directory=str(out),
        batch_size=batch_size,
        num_negatives=num_negatives,
        columns=cols,
        epochs=tuple(epochs),
        quarantine_path=_quarantine_path(manifest, out, storage),
        quarantined_rows=int(manifest.get("quarantined_rows") or 0),
        num_workers=None if plan_workers is None else int(plan_workers),
    )
    if packed.steps_per_epoch(num_workers) < 1:
        smallest = min(epochs, key=lambda e: e.num_batches)
        raise DataError(
            f"{KEY}: epoch {smallest.epoch} of the plan at {out} has {smallest.num_batches} batch(es), fewer "
            f"than scaling.num_workers = {num_workers}: every worker needs one whole batch per step; use "
            "fewer workers or mine more rows"
            if not packed.global_batches else
            f"{KEY}: epoch {smallest.epoch} of the plan at {out} has no batch: mine more rows"
        )
    return packed
