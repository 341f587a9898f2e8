"""Ray Data side of clray: find shards, check them, quarantine bad rows, build datasets.

Importing this package does not import Ray; the functions that need it import it
when called, so config loading stays fast and Ray-free.
"""

from clray.pipelines.dataset import (
    PreparedData,
    build_datasets,
    local_shuffle_buffer_size,
    model_inputs,
    steps_per_epoch,
)
from clray.pipelines.errors import DataError
from clray.pipelines.quickstart import CLASS_NAMES, write_quickstart_corpus
from clray.pipelines.reading import quiet_ray_data, read_shards
from clray.pipelines.sources import resolve_shards
from clray.pipelines.spec import (
    DataSpec,
    SplitSpec,
    check_schema,
    data_task_cpus,
    resolve_spec,
    split_spec,
)
from clray.pipelines.validate import ValidationReport, quarantine_pass, row_problems

__all__ = [
    "CLASS_NAMES",
    "DataError",
    "DataSpec",
    "PreparedData",
    "SplitSpec",
    "ValidationReport",
    "build_datasets",
    "check_schema",
    "data_task_cpus",
    "local_shuffle_buffer_size",
    "model_inputs",
    "quarantine_pass",
    "quiet_ray_data",
    "read_shards",
    "resolve_shards",
    "resolve_spec",
    "row_problems",
    "split_spec",
    "steps_per_epoch",
    "write_quickstart_corpus",
]
