"""Finding the shard and row group a failed read could not decode.

The checks before Ray read only footers (``pipelines.spec.check_schema``), so a shard
whose footer is intact but whose data pages are damaged (a disk error, a copy cut and
patched) passes them and fails inside a Ray Data read task, where the error names
neither file nor row group and comes wrapped in Ray's retry advice. Reading every page
on the driver up front would cost a second read of the corpus on every run; instead,
only when a read has failed, ``unreadable_row_groups`` reads the split's row groups one
by one (the columns the run reads, nothing else) and names each one that fails.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from clray.pipelines.spec import SplitSpec


def unreadable_row_groups(split: SplitSpec, limit: int = 20) -> list[str]:
    """One line per shard of ``split`` with a row group that cannot be decoded (its first
    such row group, the rows it holds and the reader's error), at most ``limit``."""
    problems: list[str] = []
    columns = list(split.columns)
    for file, path in zip(split.files, split.paths, strict=True):
        try:
            shard = pq.ParquetFile(path, filesystem=split.filesystem)
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{split.key}: {file}: cannot be opened as Parquet ({_first_line(exc)})")
            continue
        first_row = 0
        for index in range(shard.num_row_groups):
            rows = shard.metadata.row_group(index).num_rows
            try:
                shard.read_row_group(index, columns=[c for c in columns if c in shard.schema_arrow.names])
            except (OSError, pa.ArrowException) as exc:
                problems.append(
                    f"{split.key}: {file}: row group {index} of {shard.num_row_groups} (rows {first_row}-"
                    f"{first_row + rows - 1}) cannot be decoded ({_first_line(exc)}); the footer is intact but the "
                    "data is damaged: rewrite the shard from its source, or remove it from the split")
                break
            first_row += rows
        if len(problems) >= limit:
            break
    return problems


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
