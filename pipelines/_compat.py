"""Work-arounds for the installed library versions; each says when it can go.

Ray Data 2.60 asks, on every path it resolves, whether the filesystem is fsspec's
HTTPFileSystem, by importing ``fsspec.implementations.http`` inside a try that only
catches ``ModuleNotFoundError``. When ``fsspec`` is installed without ``aiohttp`` that
import fails, and Ray resolves several paths on parallel threads: a thread that finds
the half-imported module raises ``ImportError: cannot import name 'HTTPFileSystem'``,
which escapes and fails ``read_parquet`` (on the driver) or its ``ListFiles`` task (on
a worker) at random. Marking the module as absent makes every such import raise
``ModuleNotFoundError`` at once, which Ray treats as "not HTTP". Remove this once
``aiohttp`` is a dependency or Ray catches ``ImportError`` there.

pipelines reads through Ray's V1 Parquet reader, which resolves paths only on the
driver, so applying the fix there (``quiet_ray_data``, ``read_shards``) is enough. Code
that reads with the default V2 reader also needs it in the workers: ``WORKER_SETUP_HOOK``.
"""

from __future__ import annotations

import importlib.util
import sys

_FSSPEC_HTTP = "fsspec.implementations.http"

WORKER_SETUP_HOOK = "clray.pipelines._compat.setup_data_worker"
"""Pass as ``runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK}`` to
``ray.init`` so Ray's worker processes (which run the ``ListFiles`` tasks) get the fix."""


def avoid_fsspec_http_import_race() -> None:
    """Make the HTTP filesystem import fail fast and cleanly when it cannot succeed."""
    if _FSSPEC_HTTP in sys.modules:
        return
    try:
        aiohttp_missing = importlib.util.find_spec("aiohttp") is None
    except (ImportError, ValueError):
        aiohttp_missing = True
    if aiohttp_missing:
        # A None entry makes `import fsspec.implementations.http` raise ModuleNotFoundError.
        sys.modules[_FSSPEC_HTTP] = None  # type: ignore[assignment]


def setup_data_worker() -> None:
    """Ray ``worker_process_setup_hook``: apply the work-arounds in every worker."""
    avoid_fsspec_http_import_race()


def row_hashes(fs_path: str, start_row: int, num_rows: int) -> object:
    """Ray Data's ``row_hash`` values (``read_parquet(include_row_hash=True)``) of rows
    ``start_row ..`` of the file at ``fs_path`` (the path as the read was given it: an
    absolute local path, or ``bucket/key`` on S3), as a uint64 numpy array.

    Ray Data 2.60 computes the hash from the file path and the row's position with a
    private function; this calls that same function, so the driver can name a row the
    way the training read will see it. Checked against Ray 2.60.0
    (``ray.data._internal.datasource_v2.common.synthesized_columns._compute_row_hashes``);
    revisit when the Ray pin moves (``jobs.runtime.RAY_KNOBS``)."""
    from ray.data._internal.datasource_v2.common.synthesized_columns import _compute_row_hashes

    return _compute_row_hashes(fs_path, start_row, num_rows)
