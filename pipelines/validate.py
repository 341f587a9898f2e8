"""Row-level validation and the quarantine: bad rows are counted and kept, never lost.

A corpus at scale always has a few broken rows. Failing the run on the first one wastes
the cluster; dropping them quietly hides data problems and makes row counts lie. So one
streaming pass finds them, writes their ids and reasons to a Parquet file the user can
inspect, and training then skips exactly those rows.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from clray.models.config import ConvTowerConfig, TextTowerConfig, VitTowerConfig
from clray.models.preprocess import ImageDecodeError, decode_image
from clray.pipelines.config import DataConfig
from clray.pipelines.errors import DataError

if TYPE_CHECKING:
    import ray.data

Tower = TextTowerConfig | ConvTowerConfig | VitTowerConfig

PATH_COLUMN = "path"
"""The column ``read_parquet(include_paths=True)`` adds with each row's source file."""
ROW_HASH_COLUMN = "row_hash"
"""The column ``read_parquet(include_row_hash=True)`` adds: a hash of (file, row position)."""

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("file", pa.string()),
    ]
)

# What the quarantine map emits: bad rows (valid_count = 0, with their row hash) and,
# per batch, one row holding only the count of good rows (and, when asked, their id
# keys), so the driver never receives the corpus itself.
_PASS_SCHEMA = (QUARANTINE_SCHEMA.append(pa.field("valid_count", pa.int64()))
                .append(pa.field(ROW_HASH_COLUMN, pa.uint64())).append(pa.field("keys", pa.list_(pa.int64()))))


def id_keys(values: list[Any]) -> np.ndarray:
    """Stable int64 keys of row ids (as strings), so ids can travel as tensors and be
    compared across workers (id masking): 8 bytes of BLAKE2b, the same on every host."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little", signed=True) for v in values),
        dtype=np.int64,
        count=len(values),
    )


def image_tower(tower: Tower, view_key: str) -> ConvTowerConfig | VitTowerConfig:
    """The tower that decodes an image view; a text tower here is a config mistake."""
    if isinstance(tower, TextTowerConfig):
        raise DataError(
            f"{view_key} is an image view but its tower is a text tower: use an image tower "
            "(type = \"conv\" or \"vit\") or a text column"
        )
    return tower


def _text_problems(values: list[Any], column: str) -> list[str | None]:
    out: list[str | None] = []
    for value in values:
        if value is None:
            out.append(f"{column}: null text")
        elif not isinstance(value, str):
            out.append(f"{column}: not a string ({type(value).__name__})")
        elif not value.strip():
            out.append(f"{column}: empty text")
        else:
            out.append(None)
    return out


def _image_problems(
    values: list[Any], column: str, tower: ConvTowerConfig | VitTowerConfig, decode: bool
) -> list[str | None]:
    out: list[str | None] = []
    for value in values:
        if value is None:
            out.append(f"{column}: null image")
        elif not isinstance(value, bytes):
            out.append(f"{column}: not image bytes ({type(value).__name__})")
        elif not value:
            out.append(f"{column}: empty image bytes")
        elif decode and not image_decodes(value, tower):
            out.append(f"{column}: undecodable image")
        else:
            out.append(None)
    return out


def image_decodes(data: bytes, tower: ConvTowerConfig | VitTowerConfig) -> bool:
    """Decode exactly as training will, so the check and the training step agree."""
    try:
        decode_image(data, tower)
    except ImageDecodeError:
        return False
    return True


def _list_problem(value: Any, column: str, k: int) -> str | None:
    if value is None:
        return f"{column}: null list"
    if len(value) < k:
        return f"{column}: fewer than data.num_negatives = {k} entries"
    return None


def _negative_problems(table: pa.Table, data_cfg: DataConfig, tower: Tower, decode: bool) -> list[str | None]:
    """Hard-negative lists: at least k usable entries (the first k are trained on), and
    aligned id / score lists at least as long."""
    assert data_cfg.negatives is not None
    k = data_cfg.num_negatives
    column = data_cfg.negatives.column
    out: list[str | None] = []
    for value in table.column(column).to_pylist():
        problem = _list_problem(value, column, k)
        if problem is None:
            if data_cfg.negatives.kind == "text":
                items = _text_problems(value[:k], column)
            else:
                items = _image_problems(value[:k], column, image_tower(tower, "data.negatives"), decode)
            problem = next((p for p in items if p is not None), None)
        out.append(problem)
    if data_cfg.negative_id_column is not None:
        column = data_cfg.negative_id_column
        for i, value in enumerate(table.column(column).to_pylist()):
            problem = _list_problem(value, column, k)
            if problem is None and any(v is None for v in value[:k]):
                problem = f"{column}: null id"
            out[i] = out[i] or problem
    if data_cfg.negative_score_column is not None:
        column = data_cfg.negative_score_column
        for i, value in enumerate(table.column(column).to_pylist()):
            problem = _list_problem(value, column, k)
            if problem is None and any(v is None or v != v for v in value[:k]):
                problem = f"{column}: null or NaN score"
            out[i] = out[i] or problem
    return out


def row_problems(
    table: pa.Table,
    data_cfg: DataConfig,
    anchor_tower: Tower,
    positive_tower: Tower,
    *,
    decode_images: bool = True,
) -> list[str | None]:
    """One entry per row: None when the row can be trained on, else why not.

    Reasons are short fixed phrases ("caption: empty text"), not exception messages, so
    the report's per-reason counts stay readable on millions of rows. Several problems
    in one row are joined with "; ". ``decode_images=False`` skips the costly decode for
    callers that decode anyway and handle the failure themselves.
    """
    per_check: list[list[str | None]] = []
    id_values = table.column(data_cfg.id_column).to_pylist()
    per_check.append([f"{data_cfg.id_column}: null id" if v is None else None for v in id_values])
    towers = {"anchor": anchor_tower, "positive": positive_tower}
    for view_name, tower in towers.items():
        view = getattr(data_cfg, view_name)
        values = table.column(view.column).to_pylist()
        if view.kind == "text":
            per_check.append(_text_problems(values, view.column))
        else:
            decoder = image_tower(tower, f"data.{view_name}")
            per_check.append(_image_problems(values, view.column, decoder, decode_images))
    if data_cfg.negatives is not None:
        per_check.append(_negative_problems(table, data_cfg, positive_tower, decode_images))
    if data_cfg.label_column is not None:
        labels = table.column(data_cfg.label_column).to_pylist()
        num_classes = len(data_cfg.class_names)
        label_checks: list[str | None] = []
        for label in labels:
            if label is None:
                label_checks.append(f"{data_cfg.label_column}: null label")
            elif label < 0 or (num_classes and label >= num_classes):
                # Zero-shot evaluation indexes class_names by label.
                label_checks.append(f"{data_cfg.label_column}: label out of range")
            else:
                label_checks.append(None)
        per_check.append(label_checks)
    problems: list[str | None] = []
    for row in zip(*per_check, strict=True):
        found = [p for p in row if p is not None]
        problems.append("; ".join(found) if found else None)
    return problems


@dataclass
class ValidationReport:
    """What the quarantine pass found in one split."""

    total_rows: int
    valid_rows: int
    quarantined_rows: int
    reasons: dict[str, int] = field(default_factory=dict)
    quarantine_path: str | None = None
    """The quarantine Parquet file (id, reason, file), or None when no row was bad."""
    valid_keys: np.ndarray | None = field(default=None, repr=False)
    """With ``collect_keys``: every valid row's id key, until duplicates are resolved."""
    bad_hashes: frozenset[int] = field(default=frozenset(), repr=False)
    """Row hashes of the rows quarantined by the pass (when the read carried them)."""
    drop_hashes: frozenset[int] = field(default=frozenset(), repr=False)
    """Row hashes of the duplicate-id rows training leaves out (``pipelines.duplicates``)."""

    def describe(self) -> str:
        """One line for logs, so every run says how much of its data it trained on."""
        line = f"{self.valid_rows}/{self.total_rows} rows valid"
        if self.quarantined_rows:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.reasons.items()))
            line += f"; {self.quarantined_rows} quarantined to {self.quarantine_path} ({reasons})"
        return line


def _id_strings(table: pa.Table, id_column: str) -> pa.Array:
    return table.column(id_column).combine_chunks().cast(pa.string())


def _quarantine_batch(
    table: pa.Table,
    data_cfg: DataConfig,
    anchor_tower: Tower,
    positive_tower: Tower,
    collect_keys: bool = False,
) -> pa.Table:
    problems = row_problems(table, data_cfg, anchor_tower, positive_tower)
    bad = [i for i, p in enumerate(problems) if p is not None]
    num_valid = len(problems) - len(bad)
    take = pa.array(bad, pa.int64())
    ids = _id_strings(table, data_cfg.id_column).take(take)
    if PATH_COLUMN in table.column_names:
        files = table.column(PATH_COLUMN).combine_chunks().cast(pa.string()).take(take)
    else:
        files = pa.nulls(len(bad), pa.string())
    if ROW_HASH_COLUMN in table.column_names:
        hashes = table.column(ROW_HASH_COLUMN).combine_chunks().cast(pa.uint64()).take(take)
    else:
        hashes = pa.nulls(len(bad), pa.uint64())
    reasons = pa.array([problems[i] for i in bad], pa.string())
    bad_rows = pa.table(
        [ids, reasons, files, pa.array([0] * len(bad), pa.int64()), hashes, pa.nulls(len(bad), pa.list_(pa.int64()))],
        schema=_PASS_SCHEMA,
    )
    keys = None
    if collect_keys:
        good = [i for i, p in enumerate(problems) if p is None]
        keys = [id_keys(_id_strings(table, data_cfg.id_column).take(pa.array(good, pa.int64())).to_pylist()).tolist()]
    count_row = pa.table(
        [pa.nulls(1, pa.string())] * 3 + [pa.array([num_valid], pa.int64()), pa.nulls(1, pa.uint64()),
                                          pa.array(keys if keys is not None else [None], pa.list_(pa.int64()))],
        schema=_PASS_SCHEMA,
    )
    return pa.concat_tables([bad_rows, count_row])


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file whole or not at all (a temporary name, then a rename), so a
    reader never finds a half-written quarantine; the miner writes its own this way too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def quarantine_pass(
    ds: ray.data.Dataset,
    data_cfg: DataConfig,
    anchor_tower: Tower,
    positive_tower: Tower,
    *,
    quarantine_path: str | os.PathLike[str],
    num_cpus: float | None = None,
    file_scheme: str = "",
    collect_keys: bool = False,
) -> ValidationReport:
    """Validate every row in one streaming pass and write the bad ones to a file.

    ``ds`` should come from ``read_parquet(..., include_paths=True)`` so each bad row
    names its shard. Only bad rows and one count per batch reach the driver, so the pass
    costs one read of the corpus and no driver memory proportional to it. A quarantine
    file left by an earlier run at the same path is removed when no row is bad, so the
    file's presence always describes this pass. ``file_scheme`` (e.g. "s3://") is put
    back in front of the file names, which Ray reports inside their filesystem
    ("bucket/key"), so the quarantine names a shard as the config does.

    ``collect_keys``: also bring every valid row's id key to the driver (8 bytes a row)
    in ``report.valid_keys``, for the duplicate-id check (``pipelines.duplicates``).
    """
    checked = ds.map_batches(
        _quarantine_batch,
        batch_format="pyarrow",
        batch_size=data_cfg.preprocess_batch_size,
        fn_kwargs={
            "data_cfg": data_cfg,
            "anchor_tower": anchor_tower,
            "positive_tower": positive_tower,
            "collect_keys": collect_keys,
        },
        num_cpus=num_cpus,
    )
    valid_rows = 0
    bad_parts: list[pa.Table] = []
    key_parts: list[np.ndarray] = []
    bad_hashes: set[int] = set()
    for batch in checked.iter_batches(batch_format="pyarrow", batch_size=None):
        # Bad rows carry valid_count = 0, so the sum counts only the good rows.
        valid_rows += sum(batch.column("valid_count").to_pylist())
        # A count row has no reason; a bad row always has one.
        is_bad = batch.column("reason").is_valid()
        bad = batch.filter(is_bad)
        if bad.num_rows:
            bad_parts.append(bad.select(QUARANTINE_SCHEMA.names))
            bad_hashes.update(h for h in bad.column(ROW_HASH_COLUMN).to_pylist() if h is not None)
        if collect_keys:
            counts = batch.filter(pa.compute.invert(is_bad)).column("keys").combine_chunks()
            key_parts.append(np.asarray(counts.flatten().to_numpy(zero_copy_only=False), dtype=np.int64))

    quarantined = pa.concat_tables(bad_parts) if bad_parts else QUARANTINE_SCHEMA.empty_table()
    if file_scheme and quarantined.num_rows:
        named = [None if f is None else file_scheme + f for f in quarantined.column("file").to_pylist()]
        quarantined = quarantined.set_column(2, "file", pa.array(named, pa.string()))
    quarantined = quarantined.sort_by([("file", "ascending"), ("id", "ascending")])
    path = Path(quarantine_path)
    written: str | None = None
    if quarantined.num_rows:
        write_atomic(quarantined, path)
        written = str(path)
    elif path.exists():
        path.unlink()
    reasons = Counter(quarantined.column("reason").to_pylist())
    return ValidationReport(
        total_rows=valid_rows + quarantined.num_rows,
        valid_rows=valid_rows,
        quarantined_rows=quarantined.num_rows,
        reasons=dict(sorted(reasons.items())),
        quarantine_path=written,
        valid_keys=np.concatenate(key_parts) if collect_keys and key_parts else (
            np.zeros(0, np.int64) if collect_keys else None),
        bad_hashes=frozenset(bad_hashes),
    )
