"""The facts one run's data is built from, worked out once on the driver.

Building a run's datasets needs the same few facts again and again: the columns each
split reads (with their type tests), the filesystem its shards live on, the checked tower
of each view and the CPUs one data task asks for. Worked out anew by every builder they
were derived several times per run, each time a chance for two places to disagree (the
eval split, for one, reads without hard negatives). ``resolve_spec`` settles them once,
before Ray starts, into a frozen ``DataSpec``; the schema check, ``read_shards`` and the
dataset builders take it, or one of its ``SplitSpec``s, and derive nothing themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from clray.pipelines.config import DataConfig
from clray.pipelines.errors import DataError
from clray.pipelines.packed import PackedPlan, load_plan
from clray.pipelines.sources import (
    ColumnRule,
    ignored_files,
    ignored_warning,
    missing_column_problem,
    required_columns,
    resolve_shards,
)
from clray.pipelines.storage import SCHEME, StorageConfig, explain, filesystem_for, is_s3
from clray.pipelines.validate import Tower, image_tower

if TYPE_CHECKING:
    import pyarrow.fs as pafs

Split = Literal["train", "eval"]

MAX_DATA_TASK_CPUS = 0.5
"""Largest logical-CPU request of one data task (read + validate + preprocess)."""


def data_task_cpus(data_cfg: DataConfig) -> float:
    """Logical CPUs each Ray Data task asks for: at most half a CPU.

    The job starts Ray with ``data.num_cpus`` logical CPUs beyond the training
    workers', and Ray Train keeps Ray Data within that spare budget. Asking for half a
    CPU lets two data tasks run per spare CPU (one decoding while the other's output is
    being shipped), and a budget below one CPU (e.g. ``num_cpus = 0.5``) still fits a
    task; asking for a whole CPU would leave a fractional budget unable to run any.
    Read, validate and preprocess use the same request so Ray can fuse them into one
    task (it only fuses operators whose requests match; it still keeps them apart when
    it splits a file's blocks to raise parallelism, as with a few small files).
    """
    return min(MAX_DATA_TASK_CPUS, data_cfg.num_cpus)


def check_towers(data_cfg: DataConfig, anchor_tower: Tower, positive_tower: Tower) -> dict[str, Tower]:
    """The tower of each view ("anchor", "positive"), checked against the view's kind:
    an image view needs an image tower and a text view a text tower, or preprocessing
    would fail inside a Ray task instead of here with the key to change."""
    towers = {"anchor": anchor_tower, "positive": positive_tower}
    for view_name, tower in towers.items():
        view = getattr(data_cfg, view_name)
        if view.kind == "image":
            image_tower(tower, f"data.{view_name}")
        elif tower.type != "text":
            raise DataError(
                f"data.{view_name} is a text view but its tower is an image tower "
                f"(type = \"{tower.type}\"): use a text tower or an image column"
            )
    return towers


@dataclass(frozen=True)
class SplitSpec:
    """One split's shards and how to read them, worked out once: what the schema check,
    ``read_shards`` and the quarantine pass of that split all need."""

    key: str
    """The config key naming the split's shards ("data.train", "data.eval"), for messages."""
    data: DataConfig
    """The config the split is read and validated with (the eval split's has no hard
    negatives: evaluation scores pairs)."""
    columns: Mapping[str, ColumnRule]
    """``required_columns(data)``: each column read, its config key, type test and fix."""
    files: tuple[str, ...]
    """The shards as ``resolve_shards`` returned them (absolute paths or ``s3://`` URIs)."""
    filesystem: pafs.FileSystem | None
    """The one filesystem of all ``files``; None for local files, which Ray Data reads
    without one."""
    paths: tuple[str, ...]
    """``files`` as paths inside ``filesystem`` (``bucket/key`` on S3), in the same order."""
    ignored: tuple[str, ...] = ()
    """Files in the split's shard directories that are not read (``sources.ignored_files``)."""

    @property
    def file_scheme(self) -> str:
        """"s3://" for shards on S3, else "": Ray reports file names inside their filesystem
        ("bucket/key"), and the quarantine puts the scheme back in front of them."""
        return SCHEME if self.files and is_s3(self.files[0]) else ""


def split_spec(
    data_cfg: DataConfig,
    split: Split,
    files: Iterable[str],
    storage: StorageConfig | None = None,
    *,
    columns: Mapping[str, ColumnRule] | None = None,
) -> SplitSpec:
    """The ``SplitSpec`` of already-resolved ``files`` as ``split`` of ``data_cfg``: the
    eval split reads without hard negatives. ``columns``: the split's column table when
    the caller derived it already (every epoch plan of a packed run shares one)."""
    files = tuple(files)
    split_cfg = data_cfg if split == "train" else data_cfg.without_negatives()
    fs, paths = filesystem_for(list(files), storage)
    return SplitSpec(
        key=f"data.{split}",
        data=split_cfg,
        columns=required_columns(split_cfg) if columns is None else columns,
        files=files,
        filesystem=fs,
        paths=tuple(paths),
    )


def check_schema(split: SplitSpec) -> None:
    """Check every shard's footer of one split for the columns and types it reads.

    Reading footers is cheap even for thousands of shards, and finding every problem
    up front (not one per attempt) is what makes a broken corpus quick to fix. The split
    (``split_spec``) carries its column table and filesystem, so this check and the reads
    that follow cannot disagree about either.
    """
    problems: list[str] = []
    for file, path in zip(split.files, split.paths, strict=True):
        try:
            schema = pq.read_schema(path, filesystem=split.filesystem)
        except (OSError, pa.ArrowException) as exc:
            if is_s3(file):
                problems.append(f"{split.key}: cannot read {file} as Parquet ({explain(exc)})")
            else:
                problems.append(f"{split.key}: cannot read {file} as Parquet ({type(exc).__name__}: {exc})")
            continue
        have = list(schema.names)
        for column, (column_key, type_ok, fix) in split.columns.items():
            if column not in have:
                problems.append(missing_column_problem(file, column, column_key, have))
                continue
            dtype = schema.field(column).type
            if not type_ok(dtype):
                problems.append(f"{file}: column {column!r} ({column_key}) has type {dtype}: {fix}")
    if problems:
        raise DataError(problems)


def resolve_split(data_cfg: DataConfig, split: Split, storage: StorageConfig | None = None) -> SplitSpec | None:
    """Resolve the shards ``data.<split>`` names and check their footers; None when the
    config names none (no ``data.eval``). ``DataError`` lists every problem of the split."""
    specs = getattr(data_cfg, split)
    if not specs:
        return None
    key = f"data.{split}"
    out = split_spec(data_cfg, split, resolve_shards(specs, key, storage), storage)
    check_schema(out)
    return dataclasses.replace(out, ignored=tuple(ignored_files(list(specs), key, storage)))


@dataclass(frozen=True)
class DataSpec:
    """Everything the dataset builders need to know about one run's data, resolved once
    on the driver before Ray starts (``resolve_spec``). Frozen, and its mappings are only
    read: the builders take it as it is, so every dataset of a run is built from the same
    facts. Examples mode has ``train``; packed mode has ``plan`` and ``plan_epochs``."""

    data: DataConfig
    """The run's data config (the training split's)."""
    towers: Mapping[str, Tower]
    """The checked tower of each view ("anchor", "positive"); hard negatives use the
    positive view's."""
    task_cpus: float
    """``data_task_cpus(data)``: the logical CPUs of every Ray Data task of the run."""
    train: SplitSpec | None
    """Examples mode: the training shards, checked. None in packed mode."""
    eval: SplitSpec | None
    """The held-out shards, checked; None without ``data.eval``."""
    plan: PackedPlan | None = None
    """Packed mode: the checked plan directory."""
    plan_epochs: tuple[SplitSpec, ...] = ()
    """Packed mode: each epoch plan's files as a training split, in plan order, all with
    one column table."""

    @property
    def warnings(self) -> list[str]:
        """What the checks found that does not stop a run: files in a shard directory that
        are not read, one line per split."""
        splits = [s for s in (self.train, self.eval) if s is not None]
        return [w for s in splits if (w := ignored_warning(list(s.ignored), s.key)) is not None]


def resolve_spec(
    data_cfg: DataConfig,
    anchor_tower: Tower,
    positive_tower: Tower,
    *,
    storage: StorageConfig | None = None,
    global_batch_size: int | None = None,
    num_workers: int = 1,
) -> DataSpec:
    """Check one run's data on the driver, before Ray starts, and resolve its ``DataSpec``.

    Examples mode (``data.batches = "examples"``): the training and eval shards are
    resolved and their footers checked. Packed mode: the plan ``data.train`` names is
    loaded and checked (``load_plan``) for ``num_workers`` workers taking
    ``global_batch_size`` rows per step, and the eval shards as in examples mode. Every
    problem of both splits comes in one ``DataError``, so a broken corpus is fixed in one
    round trip. ``storage``: how to reach ``s3://`` locations.
    """
    towers = check_towers(data_cfg, anchor_tower, positive_tower)
    problems: list[str] = []
    train = plan = eval_split = None
    plan_epochs: tuple[SplitSpec, ...] = ()
    try:
        if data_cfg.batches == "packed":
            if global_batch_size is None:
                raise ValueError("resolve_spec: a packed run needs global_batch_size to check the plan's batches")
            columns = required_columns(data_cfg)
            plan = load_plan(data_cfg, global_batch_size=global_batch_size, num_workers=num_workers,
                             storage=storage, columns=columns)
            plan_epochs = tuple(split_spec(data_cfg, "train", e.files, storage, columns=columns) for e in plan.epochs)
        else:
            train = resolve_split(data_cfg, "train", storage)
    except DataError as err:
        problems.extend(err.problems)
    try:
        eval_split = resolve_split(data_cfg, "eval", storage)
    except DataError as err:
        problems.extend(err.problems)
    if problems:
        raise DataError(problems)
    return DataSpec(data=data_cfg, towers=towers, task_cpus=data_task_cpus(data_cfg), train=train,
                    eval=eval_split, plan=plan, plan_epochs=plan_epochs)
