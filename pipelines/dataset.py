"""The one place that turns a run's ``DataSpec`` into Ray Datasets of model inputs.

Everything a run needs to know about its data is settled on the driver, before any
worker starts: which files and whether their schema fits the config (``pipelines.spec``,
before Ray starts), then here which rows are bad (quarantined, counted, written down)
and how many good rows there are — the row count fixes ``steps_per_epoch``, which every
rank must agree on or the collectives hang.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clray.models.preprocess import NEGATIVE_PREFIX, ImageDecodeError, preprocess_view
from clray.pipelines.config import DataConfig
from clray.pipelines.duplicates import quarantine_duplicates
from clray.pipelines.errors import DataError
from clray.pipelines.reading import quiet_ray_data, read_shards
from clray.pipelines.spec import DataSpec, SplitSpec
from clray.pipelines.validate import (
    ROW_HASH_COLUMN,
    Tower,
    ValidationReport,
    id_keys,
    image_decodes,
    quarantine_pass,
    row_problems,
)

if TYPE_CHECKING:
    import ray.data

VIEWS = ("anchor", "positive")


def local_shuffle_buffer_size(data_cfg: DataConfig) -> int | None:
    """The ``local_shuffle_buffer_size`` the worker passes to ``iter_torch_batches``.

    With ``shuffle = "local"`` the dataset only shuffles file order; rows are mixed in
    each worker's buffer, which costs memory for ``shuffle_buffer`` rows and no
    all-to-all exchange.
    """
    return data_cfg.shuffle_buffer if data_cfg.shuffle == "local" else None


def steps_per_epoch(num_rows: int, global_batch_size: int) -> int:
    """Optimizer steps in one epoch: full global batches only.

    Every rank must run the same number of steps or a collective waits forever, so the
    driver fixes the count from the valid-row total and each worker takes exactly this
    many local batches; the remainder (fewer rows than one global batch) is skipped.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}")
    steps = num_rows // global_batch_size
    if steps < 1:
        raise DataError(
            f"only {num_rows} valid training row(s), fewer than one global batch of "
            f"{global_batch_size}: lower train.global_batch_size to at most {max(num_rows, 1)} "
            "or add training data (data.train)"
        )
    return steps


def _negative_arrays(table: pa.Table, data_cfg: DataConfig, tower: Tower) -> dict[str, np.ndarray]:
    """Hard-negative inputs shaped [rows, k, ...] (the first k of each row's list), plus
    their id keys and teacher scores when configured. Rows with fewer than k were
    quarantined before this runs."""
    assert data_cfg.negatives is not None
    k = data_cfg.num_negatives
    lists = table.column(data_cfg.negatives.column).to_pylist()
    flat = [value for row in lists for value in row[:k]]
    arrays = {
        key: value.reshape(len(lists), k, *value.shape[1:])
        for key, value in preprocess_view(tower, flat, NEGATIVE_PREFIX).items()
    }
    if data_cfg.negative_id_column is not None:
        ids = [value for row in table.column(data_cfg.negative_id_column).to_pylist() for value in row[:k]]
        arrays["negative_id_key"] = id_keys(ids).reshape(len(lists), k)
    if data_cfg.negative_score_column is not None:
        scores = [row[:k] for row in table.column(data_cfg.negative_score_column).to_pylist()]
        arrays["negative_score"] = np.asarray(scores, dtype=np.float32).reshape(len(lists), k)
    return arrays


def preprocess_rows(
    table: pa.Table, data_cfg: DataConfig, towers: dict[str, Tower], include_ids: bool
) -> dict[str, np.ndarray]:
    """Model input arrays ([rows, ...]) of already-validated rows; ``towers`` maps
    "anchor"/"positive" to their tower configs. Examples and packed batches both go
    through here, so a row becomes the same tensors either way."""
    arrays: dict[str, np.ndarray] = {}
    for view_name, tower in towers.items():
        values = table.column(getattr(data_cfg, view_name).column).to_pylist()
        arrays.update(preprocess_view(tower, values, view_name))
    ids = table.column(data_cfg.id_column).combine_chunks().cast(pa.string()).to_pylist()
    arrays["id_key"] = id_keys(ids)
    if include_ids:
        arrays["id"] = np.asarray(ids, dtype=object)
    if data_cfg.label_column is not None:
        labels = table.column(data_cfg.label_column).to_numpy(zero_copy_only=False)
        arrays["label"] = labels.astype(np.int64)
    if data_cfg.negatives is not None:
        arrays.update(_negative_arrays(table, data_cfg, towers["positive"]))
    return arrays


def _model_inputs(
    table: pa.Table,
    data_cfg: DataConfig,
    anchor_tower: Tower,
    positive_tower: Tower,
    include_ids: bool,
    drop_hashes: frozenset[int] = frozenset(),
) -> Iterator[dict[str, np.ndarray]]:
    # Drops exactly the rows the quarantine pass recorded, but decodes each image only
    # once in the common case: cheap checks first, then preprocess, and only a batch
    # that holds an undecodable image pays for a per-row decode check. Duplicate-id rows
    # are dropped by their row hash (``pipelines.duplicates``).
    towers = {"anchor": anchor_tower, "positive": positive_tower}
    problems = row_problems(table, data_cfg, anchor_tower, positive_tower, decode_images=False)
    if drop_hashes and ROW_HASH_COLUMN in table.column_names:
        hashes = table.column(ROW_HASH_COLUMN).to_pylist()
        problems = [p if p is not None or hashes[i] not in drop_hashes else "duplicate id"
                    for i, p in enumerate(problems)]
    keep = [i for i, problem in enumerate(problems) if problem is None]
    if len(keep) < table.num_rows:
        table = table.take(pa.array(keep, pa.int64()))
    if table.num_rows == 0:
        return
    try:
        arrays = preprocess_rows(table, data_cfg, towers, include_ids)
    except ImageDecodeError:
        decodable = np.ones(table.num_rows, dtype=bool)
        for view_name, tower in towers.items():
            view = getattr(data_cfg, view_name)
            if view.kind == "image":
                images = table.column(view.column).to_pylist()
                decodable &= np.array([image_decodes(image, tower) for image in images], dtype=bool)
        if data_cfg.negatives is not None and data_cfg.negatives.kind == "image":
            k = data_cfg.num_negatives
            lists = table.column(data_cfg.negatives.column).to_pylist()
            decodable &= np.array(
                [all(image_decodes(image, towers["positive"]) for image in row[:k]) for row in lists], dtype=bool
            )
        table = table.filter(pa.array(decodable))
        if table.num_rows == 0:
            return
        arrays = preprocess_rows(table, data_cfg, towers, include_ids)
    yield arrays


def model_inputs(
    ds: ray.data.Dataset, spec: DataSpec, split: SplitSpec, *, include_ids: bool = False,
    drop_hashes: frozenset[int] = frozenset(),
) -> ray.data.Dataset:
    """Validate, drop bad rows and preprocess both views of ``split`` (one of ``spec``'s)
    into model input arrays, with the run's checked towers and data-task CPUs.

    Output columns follow ``models.preprocess`` (``anchor_*``, ``positive_*``) plus
    ``label`` (int64, when ``data.label_column`` is set) and, with ``include_ids``,
    ``id`` (strings). Ids are off by default because Ray's default collate cannot turn
    strings into tensors; with them on, pass ``collate_fn=pipelines.collate.TorchCollate()``
    to ``iter_torch_batches``.
    """
    return ds.map_batches(
        _model_inputs,
        batch_format="pyarrow",
        batch_size=split.data.preprocess_batch_size,
        fn_kwargs={
            "data_cfg": split.data,
            "anchor_tower": spec.towers["anchor"],
            "positive_tower": spec.towers["positive"],
            "include_ids": include_ids,
            **({"drop_hashes": drop_hashes} if drop_hashes else {}),
        },
        num_cpus=spec.task_cpus,
    )


def sibling_quarantine_path(quarantine_path: str | os.PathLike[str], split: str) -> Path:
    """Where another split's quarantine goes: ``quarantine.parquet`` -> ``quarantine-eval.parquet``."""
    path = Path(quarantine_path)
    return path.with_name(f"{path.stem}-{split}{path.suffix or '.parquet'}")


@dataclass
class PreparedData:
    """Everything the trainer needs from the data side, settled on the driver."""

    train: ray.data.Dataset
    """Model inputs for training (lazy; executes once per epoch)."""
    eval: ray.data.Dataset | None
    """Model inputs for the held-out split in file order, or None without data.eval."""
    report: ValidationReport
    """Quarantine report of the training split."""
    num_train_rows: int
    """Valid training rows: what steps_per_epoch is computed from."""
    eval_report: ValidationReport | None = None
    num_eval_rows: int = 0
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    cached: ray.data.Dataset | None = None
    """With data.cache: the materialised training set, unshuffled (``train`` is it with the
    epoch's shuffle applied), which workers may read block by block (``pipelines.cached``)."""


def _view_bytes(tower: Tower) -> int:
    if tower.type == "text":
        return 2 * 8 * tower.max_length  # input_ids + attention_mask, int64
    channels = 1 if tower.image_mode == "L" else 3
    return 4 * channels * tower.image_size**2  # float32 pixels


def preprocessed_row_bytes(towers: Mapping[str, Tower], data_cfg: DataConfig) -> int:
    """Bytes one training row occupies after preprocessing: exact, since token ids,
    masks and pixel tensors all have shapes fixed by the config."""
    total = 8  # id_key
    total += 8 if data_cfg.label_column else 0
    total += sum(_view_bytes(tower) for tower in towers.values())
    if data_cfg.negatives is not None:
        k = data_cfg.num_negatives
        total += k * _view_bytes(towers["positive"])
        total += 8 * k if data_cfg.negative_id_column else 0
        total += 4 * k if data_cfg.negative_score_column else 0
    return total


def should_cache(data_cfg: DataConfig, preprocessed_bytes: int) -> bool:
    if data_cfg.cache == "auto":
        return preprocessed_bytes <= data_cfg.cache_max_gb * 2**30
    return data_cfg.cache == "always"


def build_eval_dataset(
    spec: DataSpec, *, quarantine_path: str | os.PathLike[str], include_ids: bool = False
) -> tuple[ray.data.Dataset | None, ValidationReport | None]:
    """The held-out split's model inputs in file order and its quarantine report
    (written to ``sibling_quarantine_path(quarantine_path, "eval")``); (None, None)
    without ``spec.eval``. Evaluation scores pairs, so it reads no hard negatives."""
    split = spec.eval
    if split is None:
        return None, None
    eval_report = quarantine_pass(
        read_shards(split, include_paths=True, num_cpus=spec.task_cpus),
        split.data,
        spec.towers["anchor"],
        spec.towers["positive"],
        quarantine_path=sibling_quarantine_path(quarantine_path, "eval"),
        num_cpus=spec.task_cpus,
        file_scheme=split.file_scheme,
    )
    eval_ds = model_inputs(read_shards(split, num_cpus=spec.task_cpus), spec, split, include_ids=include_ids)
    if should_cache(split.data, eval_report.valid_rows * preprocessed_row_bytes(spec.towers, split.data)):
        # Every rank reads the whole split at every evaluation: preprocessed once and held
        # in the object store, an evaluation costs its forwards only, not a new read,
        # decode and tokenize in freshly started Ray Data tasks (seconds each time).
        eval_ds = eval_ds.materialize()
    return eval_ds, eval_report


def build_datasets(
    spec: DataSpec,
    *,
    quarantine_path: str | os.PathLike[str],
    seed: int,
    include_ids: bool = False,
) -> PreparedData:
    """Validate and wire up the train and eval datasets of an examples-mode ``spec``.

    The quarantine pass reads the corpus once up front; it is what makes the row count
    (and so the step count) exact, and what guarantees no bad row disappears unrecorded.
    Eval rows are quarantined to ``sibling_quarantine_path(quarantine_path, "eval")``.
    ``include_ids`` adds the string ``id`` column (see ``model_inputs``).
    ``quarantine_path`` is a local file (a run on S3 stages it locally and uploads it
    with the run directory).

    Shuffling (``data.shuffle``), seeded from ``seed`` so a rerun sees the same orders,
    with a different order every epoch (Ray re-seeds per execution):
      - global: ``random_shuffle`` of the raw rows before decoding (moving encoded
        bytes is cheaper than decoded arrays);
      - local: file order shuffled per epoch while streaming, plus the worker's
        shuffle buffer (``local_shuffle_buffer_size``);
      - none: file order.
    With ``data.cache`` the preprocessed set is materialised once instead, and global /
    local shuffles reorder rows / blocks of that cached set each epoch.
    """
    import ray.data

    split = spec.train
    if split is None:
        raise ValueError("build_datasets builds examples-mode datasets but the spec is packed: "
                         "use pipelines.unpack.build_packed_datasets")
    quiet_ray_data()
    report = quarantine_pass(
        read_shards(split, include_paths=True, include_row_hash=True, num_cpus=spec.task_cpus),
        split.data,
        spec.towers["anchor"],
        spec.towers["positive"],
        quarantine_path=quarantine_path,
        num_cpus=spec.task_cpus,
        file_scheme=split.file_scheme,
        collect_keys=True,
    )
    report = quarantine_duplicates(report, split.files, split.paths, split.filesystem, split.data.id_column,
                                   quarantine_path)
    if report.valid_rows == 0:
        raise DataError(
            f"data.train: all {report.total_rows} row(s) failed validation; see "
            f"{report.quarantine_path} for each row's reason"
        )

    seed_config = ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)
    # data.deterministic: datasets copy the current context when created, so ordered
    # execution set here also covers the cached set's materialisation below.
    context = ray.data.DataContext.get_current()
    previous = context.execution_options.preserve_order
    context.execution_options.preserve_order = previous or split.data.deterministic
    try:
        train, cached = _train_dataset(spec, split, report, seed, seed_config, include_ids)
    finally:
        context.execution_options.preserve_order = previous

    eval_ds, eval_report = build_eval_dataset(spec, quarantine_path=quarantine_path, include_ids=include_ids)
    return PreparedData(
        train=train,
        cached=cached,
        eval=eval_ds,
        report=report,
        num_train_rows=report.valid_rows,
        eval_report=eval_report,
        num_eval_rows=eval_report.valid_rows if eval_report else 0,
        train_files=list(split.files),
        eval_files=list(spec.eval.files) if spec.eval else [],
    )


def _train_dataset(spec: DataSpec, split: SplitSpec, report: ValidationReport, seed: int, seed_config: Any,
                   include_ids: bool) -> tuple[ray.data.Dataset, ray.data.Dataset | None]:
    """The training dataset with data.shuffle applied (see build_datasets), and the
    materialised set under it when data.cache holds it (else None)."""
    data_cfg, task_cpus = split.data, spec.task_cpus
    drop = report.drop_hashes  # duplicate-id rows, named by Ray's row hash
    if should_cache(data_cfg, report.valid_rows * preprocessed_row_bytes(spec.towers, data_cfg)):
        # Preprocess once; each epoch then only reorders blocks held in memory.
        cached = model_inputs(read_shards(split, num_cpus=task_cpus, include_row_hash=bool(drop)), spec, split,
                              include_ids=include_ids, drop_hashes=drop).materialize()
        train = cached
        if data_cfg.shuffle == "global":
            train = cached.random_shuffle(seed=seed_config, num_cpus=task_cpus)
        elif data_cfg.shuffle == "local":
            train = cached.randomize_block_order(seed=seed_config)
        return train, cached
    if data_cfg.shuffle == "local":
        train_raw = read_shards(split, shuffle_files_seed=seed, num_cpus=task_cpus, include_row_hash=bool(drop))
    else:
        train_raw = read_shards(split, num_cpus=task_cpus, include_row_hash=bool(drop))
    if data_cfg.shuffle == "global":
        train_raw = train_raw.random_shuffle(seed=seed_config, num_cpus=task_cpus)
    return model_inputs(train_raw, spec, split, include_ids=include_ids, drop_hashes=drop), None
