"""Duplicate row ids: found by the quarantine pass, all but the first quarantined.

Rows are quarantined, compared across workers (id masking) and left out of a resumed
epoch by their id, so two valid rows with one id would be trained as if they were one
row's two copies, and a resume that leaves out "the rows already trained" would leave
out both. The quarantine pass therefore sends the driver the id key of every valid row
(8 bytes a row; ``validate.quarantine_pass(collect_keys=True)``); when a key occurs more
than once, the driver reads the id column of the split's files (only then) to find the
rows and their order: the first in file order (files sorted, then row position) stays,
every later one is quarantined with the reason naming where the first is, and training
leaves those rows out by Ray Data's per-row hash of (file, position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clray.pipelines._compat import row_hashes
from clray.pipelines.validate import QUARANTINE_SCHEMA, ValidationReport, id_keys, write_atomic


@dataclass
class Duplicates:
    """The rows quarantined as duplicates and what training leaves out for them."""

    rows: pa.Table = field(default_factory=QUARANTINE_SCHEMA.empty_table)
    """Quarantine rows (id, reason, file), one per duplicate left out."""
    drop_hashes: frozenset[int] = frozenset()
    """Ray Data ``row_hash`` of each of those rows (``read_parquet(include_row_hash=True)``)."""


def duplicate_keys(keys: np.ndarray) -> np.ndarray:
    """The id keys that occur more than once."""
    if keys.size == 0:
        return keys
    values, counts = np.unique(keys, return_counts=True)
    return values[counts > 1]


def locate(files: Sequence[str], paths: Sequence[str], filesystem: Any, id_column: str, dup_keys: np.ndarray,
           bad_hashes: frozenset[int]) -> Duplicates:
    """Find the valid rows whose id key is in ``dup_keys`` (``bad_hashes``: rows already
    quarantined for another reason) and keep the first of each id."""
    wanted = set(int(k) for k in dup_keys)
    found: dict[int, list[tuple[str, int, str, int]]] = {}
    for file, path in sorted(zip(files, paths, strict=True)):
        ids = pq.ParquetFile(path, filesystem=filesystem).read(columns=[id_column]).column(0)
        texts = ids.cast(pa.string()).to_pylist()
        keys = id_keys(texts)
        for position in np.flatnonzero(np.isin(keys, list(wanted))):
            row_hash = int(row_hashes(path, int(position), 1)[0])
            if row_hash in bad_hashes:
                continue
            found.setdefault(int(keys[position]), []).append((texts[position], int(position), file, row_hash))
    ids, reasons, where, drop = [], [], [], []
    for rows in found.values():
        first_id, first_pos, first_file, _ = rows[0]
        for row_id, _, file, row_hash in rows[1:]:
            ids.append(row_id)
            reasons.append(f"{id_column}: duplicate id (the first row with it, kept, is row {first_pos} of "
                           f"{Path(first_file).name})")
            where.append(file)
            drop.append(row_hash)
    table = pa.table([pa.array(ids, pa.string()), pa.array(reasons, pa.string()), pa.array(where, pa.string())],
                     schema=QUARANTINE_SCHEMA)
    return Duplicates(rows=table, drop_hashes=frozenset(drop))


def quarantine_duplicates(report: ValidationReport, files: Sequence[str], paths: Sequence[str], filesystem: Any,
                          id_column: str, quarantine_path: str | Path) -> ValidationReport:
    """``report`` with the duplicate-id rows quarantined: counted, added to the quarantine
    file, and their row hashes in ``report.drop_hashes`` for the training read."""
    if report.valid_keys is None:
        return report
    dups = duplicate_keys(report.valid_keys)
    report.valid_keys = None  # the driver keeps no per-row state beyond this pass
    if dups.size == 0:
        return report
    found = locate(files, paths, filesystem, id_column, dups, report.bad_hashes)
    if found.rows.num_rows == 0:
        return report
    path = Path(quarantine_path)
    earlier = pq.read_table(path) if report.quarantine_path and path.exists() else QUARANTINE_SCHEMA.empty_table()
    merged = pa.concat_tables([earlier, found.rows]).sort_by([("file", "ascending"), ("id", "ascending")])
    write_atomic(merged, path)
    reasons = dict(report.reasons)
    for reason in found.rows.column("reason").to_pylist():
        key = reason.split(" (", 1)[0]
        reasons[key] = reasons.get(key, 0) + 1
    report.valid_rows -= found.rows.num_rows
    report.quarantined_rows += found.rows.num_rows
    report.reasons = dict(sorted(reasons.items()))
    report.quarantine_path = str(path)
    report.drop_hashes = found.drop_hashes
    return report
