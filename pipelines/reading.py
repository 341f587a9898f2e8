"""Reading shards with Ray Data: the quiet settings every process that builds datasets
applies, the Parquet reader clray uses and the one function that reads a split."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from clray.pipelines._compat import avoid_fsspec_http_import_race
from clray.pipelines.spec import SplitSpec, data_task_cpus
from clray.pipelines.validate import PATH_COLUMN, ROW_HASH_COLUMN

if TYPE_CHECKING:
    import ray.data


def quiet_ray_data() -> None:
    """Turn off Ray Data's progress bars, which garble logs and test output.

    A training run reports its own progress per step; per-operator bars from a driver,
    a split coordinator and several workers only interleave into noise. Also applies
    the fsspec import work-around on this process (see ``pipelines._compat``).
    """
    import ray.data

    avoid_fsspec_http_import_race()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    # Ray Data logs every execution plan at INFO on the driver; the full logs stay in
    # the Ray session's log directory.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ...and warns that bars are off, which is what we asked for.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


@contextlib.contextmanager
def legacy_parquet_reader() -> Iterator[None]:
    """Build the ``read_parquet`` plans made inside this block with Ray Data's V1 reader.

    Ray Data 2.60's default (V2) Parquet reader starts up to 32 footer-reading actors
    on every execution, i.e. every epoch: seconds of start-up per epoch on a laptop,
    and its threaded listing hits the fsspec import race in worker processes. For
    local shards the V1 reader is both faster and sufficient. read_parquet consults
    the flag only while building the plan, so it is restored right after.
    Revisit when s3:// sources land (V2's parallel footer reads pay off there).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = previous


def read_shards(
    split: SplitSpec,
    *,
    include_paths: bool = False,
    shuffle_files_seed: int | None = None,
    num_cpus: float | None = None,
    include_row_hash: bool = False,
) -> ray.data.Dataset:
    """Read only the columns the split reads, from its resolved files and filesystem.

    ``include_paths`` adds the source file as a ``path`` column for the quarantine
    report; it is skipped when a data column is itself called ``path`` (Ray would
    silently overwrite it). ``shuffle_files_seed`` shuffles file order with a
    different, reproducible order on every execution (epoch). ``s3://`` files are read
    through the split's S3 filesystem (pickled to the read tasks without keys; each
    task's process finds credentials in its own AWS environment). ``num_cpus``: each
    read task's request; the dataset builders pass their ``DataSpec.task_cpus``, and
    without one it is ``data_task_cpus`` of the split's config. ``include_row_hash`` adds
    Ray's ``row_hash`` of (file, row position), which names a row exactly (duplicate ids
    are quarantined by it); skipped, like ``path``, when a data column has its name.
    """
    import ray.data

    avoid_fsspec_http_import_race()
    columns = list(split.columns)
    shuffle = None
    if shuffle_files_seed is not None:
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_files_seed, reseed_after_execution=True)
    with legacy_parquet_reader():
        return ray.data.read_parquet(
            list(split.paths),
            filesystem=split.filesystem,
            columns=columns,
            include_paths=include_paths and PATH_COLUMN not in columns,
            **({"include_row_hash": True} if include_row_hash and ROW_HASH_COLUMN not in columns else {}),
            shuffle=shuffle,
            num_cpus=num_cpus if num_cpus is not None else data_task_cpus(split.data),
            file_extensions=None,
        )
