"""Finding the shards a config names, and the table of the columns a run reads from them.

Both serve the checks that run on the driver before Ray (``pipelines.spec``: resolve each
split, then check every shard's footer against the table) and read only file listings
and Parquet footers, so a mistyped path or a renamed column fails in a second with a
message naming the config key, instead of minutes later inside a Ray task with a stack
trace.
"""

from __future__ import annotations

import difflib
import glob
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from pyarrow.fs import FileType

from clray.pipelines import storage as storage_mod
from clray.pipelines.config import DataConfig
from clray.pipelines.errors import DataError
from clray.pipelines.storage import StorageConfig

_GLOB_CHARS = set("*?[")

ColumnRule = tuple[str, Callable[[pa.DataType], bool], str]
"""What a run needs of one column: the config key naming it, a test of its Arrow type,
and how to fix a column of the wrong type."""


def _is_uri(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def _resolve_remote(spec: str, key: str, storage: StorageConfig | None = None) -> list[str]:
    """``s3://`` prefixes, globs and objects -> the ``s3://`` URIs of their Parquet files,
    with the same rules as local paths (hidden ``_``/``.`` names skipped under a prefix, an
    explicit object taken as named). A missing bucket, denied listing or unreachable
    endpoint is reported here, naming the key and the URI, before anything else runs."""
    scheme = spec.split("://", 1)[0]
    if scheme != "s3":
        raise DataError(
            f"{key}: {spec!r}: unsupported URI scheme {scheme!r}; give an s3:// URI or a local "
            "directory, glob or .parquet file"
        )
    bucket, prefix = storage_mod.split_s3(spec)
    if not bucket:
        raise DataError(f"{key}: {spec!r} names no bucket: write s3://bucket/prefix")

    def parquet_under(uri: str) -> list[str]:
        base = storage_mod.split_s3(uri)[1]
        found = []
        for file in storage_mod.list_files(uri, storage, key):
            relative = storage_mod.split_s3(file)[1][len(base):].lstrip("/")
            if file.endswith(".parquet") and not _hidden(Path(relative)):
                found.append(file)
        return found

    if _GLOB_CHARS & set(prefix):
        matches = storage_mod.glob_s3(spec, storage, key)
        if not matches:
            storage_mod.require_bucket(spec, storage, key)
            raise DataError(f"{key}: the glob {spec!r} matches no objects")
        found = [m for m in matches if m.endswith(".parquet")]
        if not found:
            raise DataError(
                f"{key}: the glob {spec!r} matches {len(matches)} object(s) but no .parquet files "
                f"(e.g. {matches[0]!r})"
            )
        return found
    kind = storage_mod.file_type(spec, storage, key)
    if kind == FileType.File:
        return [storage_mod.normalize(spec)]
    if kind == FileType.Directory:
        found = parquet_under(storage_mod.normalize(spec))
        if not found:
            raise DataError(f"{key}: the prefix {spec!r} holds no .parquet files")
        return found
    raise DataError(f"{key}: {spec!r} does not exist (no object or prefix of that name in bucket {bucket!r})")


def _hidden(relative: Path) -> bool:
    # Writers leave markers such as _SUCCESS, _metadata or .crc files next to shards.
    return any(part.startswith((".", "_")) for part in relative.parts)


def _parquet_in_dir(directory: Path) -> list[str]:
    return [
        os.path.abspath(path)
        for path in directory.rglob("*.parquet")
        if path.is_file() and not _hidden(path.relative_to(directory))
    ]


def _resolve_local(spec: str, key: str) -> list[str]:
    path_text = os.path.expanduser(spec.removeprefix("file://"))
    if _GLOB_CHARS & set(path_text):
        matches = sorted(glob.glob(path_text, recursive=True))
        if not matches:
            raise DataError(f"{key}: the glob {spec!r} matches no files")
        found: list[str] = []
        for match in matches:
            if os.path.isdir(match):
                found.extend(_parquet_in_dir(Path(match)))
            elif match.endswith(".parquet"):
                found.append(os.path.abspath(match))
        if not found:
            raise DataError(
                f"{key}: the glob {spec!r} matches {len(matches)} path(s) but no .parquet "
                f"files (e.g. {matches[0]!r})"
            )
        return found
    path = Path(path_text)
    if path.is_dir():
        found = _parquet_in_dir(path)
        if not found:
            raise DataError(f"{key}: the directory {spec!r} contains no .parquet files")
        return found
    if path.is_file():
        # An explicit file is taken as named, whatever its extension.
        return [os.path.abspath(path)]
    raise DataError(f"{key}: {spec!r} does not exist (no such file, directory or glob match)")


def ignored_files(specs: list[str], key: str, storage: StorageConfig | None = None) -> list[str]:
    """Files in the directories (or S3 prefixes) that ``specs`` name which are not read: not
    Parquet, and not a writer's marker (names starting with ``_`` or ``.`` are skipped
    silently). A CSV or JSON file left among the shards is usually data meant for training,
    so a run lists them in a warning instead of ignoring them without a word."""
    out: list[str] = []
    for spec in specs:
        if _GLOB_CHARS & set(spec):
            continue
        if _is_uri(spec):
            if not spec.startswith(storage_mod.SCHEME) or storage_mod.file_type(spec, storage, key) != FileType.Directory:
                continue
            base = storage_mod.normalize(spec)
            prefix = storage_mod.split_s3(base)[1]
            for file in storage_mod.list_files(base, storage, key):
                relative = Path(storage_mod.split_s3(file)[1][len(prefix):].lstrip("/"))
                if not file.endswith(".parquet") and not _hidden(relative):
                    out.append(file)
            continue
        directory = Path(os.path.expanduser(spec.removeprefix("file://")))
        if directory.is_dir():
            out.extend(os.path.abspath(p) for p in directory.rglob("*")
                       if p.is_file() and p.suffix != ".parquet" and not _hidden(p.relative_to(directory)))
    return sorted(set(out))


def ignored_warning(files: list[str], key: str) -> str | None:
    """One line naming the files ``ignored_files`` found (the first few), or None."""
    if not files:
        return None
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return (f"{key}: {len(files)} file(s) in its shard directories are not Parquet and are not read: {shown}. "
            "Convert them to Parquet to train on them, or move them out (names starting with _ or . are "
            "skipped without a warning)")


def resolve_shards(specs: list[str], key: str, storage: StorageConfig | None = None) -> list[str]:
    """Expand directories, globs and files into one sorted, de-duplicated file list.

    Ray Data could expand paths itself, but resolving on the driver lets an empty match
    fail with the config key that named it, and gives the row count, the schema check
    and the quarantine report one exact list of files to talk about. ``s3://`` specs come
    back as ``s3://`` URIs (``storage``: how to reach the store); a split must not mix
    them with local paths, since Ray Data reads one filesystem per dataset.
    """
    files: set[str] = set()
    for spec in specs:
        resolved = _resolve_remote(spec, key, storage) if _is_uri(spec) else _resolve_local(spec, key)
        files.update(resolved)
    if files and any(storage_mod.is_s3(f) for f in files) and not all(storage_mod.is_s3(f) for f in files):
        raise DataError(
            f"{key} mixes local paths and s3:// URIs: Ray Data reads one filesystem per split, so put "
            "all of its shards on S3 or all locally"
        )
    return sorted(files)


def _is_text(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _is_binary(dtype: pa.DataType) -> bool:
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)


def _is_id(dtype: pa.DataType) -> bool:
    return _is_text(dtype) or pa.types.is_integer(dtype)


def list_of(item_ok: Callable[[pa.DataType], bool]) -> Callable[[pa.DataType], bool]:
    """A type test for list columns whose items pass ``item_ok``: hard negatives here, and
    every packed column of a mined plan (one list per batch) in ``pipelines.packed``."""

    def ok(dtype: pa.DataType) -> bool:
        return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and item_ok(dtype.value_type)

    return ok


def required_columns(data_cfg: DataConfig) -> dict[str, ColumnRule]:
    """Each column the run reads: its config key, a type test, and how to fix a bad type.

    One table drives the schema check, the reads and the validation, so they cannot
    disagree about which columns a run needs.
    """
    wanted: dict[str, ColumnRule] = {}
    for view_name in ("anchor", "positive"):
        view = getattr(data_cfg, view_name)
        view_key = f"data.{view_name}.column"
        if view.kind == "text":
            fix = (
                "text views need a UTF-8 string column: cast it to string when writing the "
                f"shards, or set data.{view_name}.kind = \"image\" if it holds encoded image bytes"
            )
            wanted[view.column] = (view_key, _is_text, fix)
        else:
            fix = (
                "image views need the encoded PNG/JPEG bytes in a binary column: store the "
                f"file contents, not a path, or set data.{view_name}.kind = \"text\""
            )
            wanted[view.column] = (view_key, _is_binary, fix)
    wanted.setdefault(
        data_cfg.id_column,
        ("data.id_column", _is_id, "row ids must be a string or integer column"),
    )
    if data_cfg.negatives is not None:
        item = "string" if data_cfg.negatives.kind == "text" else "binary (encoded image bytes)"
        wanted.setdefault(
            data_cfg.negatives.column,
            (
                "data.negatives.column",
                list_of(_is_text if data_cfg.negatives.kind == "text" else _is_binary),
                f"hard negatives need a list<{item}> column, one list per row",
            ),
        )
    if data_cfg.negative_id_column is not None:
        wanted.setdefault(
            data_cfg.negative_id_column,
            ("data.negative_id_column", list_of(_is_id), "hard-negative ids need a list<string> or list<int64> column"),
        )
    if data_cfg.negative_score_column is not None:
        wanted.setdefault(
            data_cfg.negative_score_column,
            (
                "data.negative_score_column",
                list_of(pa.types.is_floating),
                "teacher scores need a list<float> column, aligned with data.negatives",
            ),
        )
    if data_cfg.in_batch_score_column is not None:
        wanted.setdefault(
            data_cfg.in_batch_score_column,
            (
                "data.in_batch_score_column",
                list_of(pa.types.is_floating),
                "in-batch teacher scores need a list<float> column per row (one score per in-batch positive)",
            ),
        )
    if data_cfg.label_column is not None:
        wanted.setdefault(
            data_cfg.label_column,
            (
                "data.label_column",
                pa.types.is_integer,
                "cast the labels to int64 when writing the shards, or unset data.label_column",
            ),
        )
    return wanted


def missing_column_problem(file: str, column: str, key: str, have: list[str]) -> str:
    """The message for a shard that lacks a configured column: the key that named it and
    the file's columns, with the closest one as a guess at a typo."""
    close = difflib.get_close_matches(column, have, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"{file}: no column {column!r} (named by {key}); the file has columns "
        f"{', '.join(repr(c) for c in have) or '(none)'}{hint}"
    )
