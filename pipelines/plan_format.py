"""The on-disk format of a mined batch plan: what ``clray mine`` writes and what
``clray train`` with ``data.batches = "packed"`` reads. Both sides import this module, so
the format lives in one place.

Layout of a plan directory ``OUT``::

    OUT/manifest.json                    written last, atomically: its presence marks a
                                         complete plan (a killed job leaves none)
    OUT/plans/epoch-00000/part-00000.parquet, part-00001.parquet, ...
    OUT/plans/epoch-00001/...            one directory per epoch plan (its own seed)
    OUT/quarantine.parquet               rows the mining job rejected, with their reasons
    OUT/work/                            intermediate stages (embeddings, kNN parts)

A *packed* Parquet row is one mined batch of exactly ``batch_size`` rows: the *global*
batch of a training step when the manifest records ``num_workers`` (rank r trains rows
``[r * local_batch_size, (r + 1) * local_batch_size)`` of it, all ranks in the same
step); a plan without ``num_workers`` (written before global batches) holds one local
batch per row, and each rank takes its own rows. Its
columns carry the corpus's own column names (so the training TOML's ``[data]`` table names
them as usual), each holding a list of ``batch_size`` values:

* ``epoch`` (int32) and ``batch`` (int32): the plan and the batch's index in it;
* the id column: ``list<string>``; the anchor and positive columns: ``list<string>`` (text)
  or ``list<binary>`` (encoded images); the label column (if the corpus has one):
  ``list<int64>``;
* with mined hard negatives (``num_negatives > 0``): the negatives column
  ``list<list<string|binary>>`` (``[batch_size][num_negatives]``, the positive view of the
  negative rows), the negative-id column ``list<list<string>>`` and the negative-score
  column ``list<list<float32>>`` (teacher similarity of the anchor and each negative).

``manifest.json`` (``MANIFEST_FORMAT``, ``MANIFEST_VERSION``) holds, besides counts, seeds,
teacher, parameters and statistics, the keys readers rely on: ``batch_size``,
``num_workers`` and ``local_batch_size`` (global-batch plans),
``num_negatives``, ``columns`` (a ``PlanColumns``), and ``epochs``: one entry per plan with
``epoch``, ``seed``, ``num_batches``, ``files`` (paths relative to ``OUT``) and
``remainder_ids`` (rows that did not fill a batch in that plan: counted, never hidden).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clray.pipelines.storage import StorageConfig

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "clray-mined-plan"
MANIFEST_VERSION = 1
EPOCH_COLUMN = "epoch"
BATCH_COLUMN = "batch"


@dataclass(frozen=True)
class PlanColumns:
    """Column names inside the packed Parquet files (None: absent)."""

    id: str
    anchor: str
    anchor_kind: str
    positive: str
    positive_kind: str
    label: str | None = None
    negatives: str | None = None
    negative_ids: str | None = None
    negative_scores: str | None = None
    in_batch_scores: str | None = None
    """``list<list<float32>>`` [batch_size][batch_size]: teacher similarity of anchor i
    and in-batch positive j (mining.in_batch_scores), for the loss's in-batch filter."""


def epoch_dir(out_dir: str | os.PathLike[str], epoch: int) -> Path:
    return Path(out_dir) / "plans" / f"epoch-{epoch:05d}"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PlanFormatError(ValueError):
    """A directory that is not a complete mined plan; the message says what to do."""


def read_manifest(out_dir: str | os.PathLike[str], storage: StorageConfig | None = None) -> dict[str, Any]:
    """The manifest of a complete plan directory (local or ``s3://``), or
    ``PlanFormatError`` naming the path (and, on S3, what the store said)."""
    from clray.pipelines import storage as st
    from clray.pipelines.errors import DataError

    if st.is_s3(out_dir):
        out: Any = st.normalize(out_dir)
        path: Any = st.join(out, MANIFEST_NAME)
        try:
            found_dir, found_file = st.is_dir(out, storage), st.is_file(path, storage)
        except DataError as exc:
            raise PlanFormatError(str(exc)) from None
    else:
        out = Path(out_dir).expanduser()
        path = out / MANIFEST_NAME
        found_dir, found_file = out.is_dir(), path.is_file()
    if not found_dir:
        raise PlanFormatError(f"{out}: no such directory; point it at the output of `clray mine`")
    if not found_file:
        raise PlanFormatError(
            f"{out} has no {MANIFEST_NAME}: it is not a complete `clray mine` output (a job that was "
            "stopped writes none); run the same `clray mine` command again to finish it"
        )
    try:
        text = st.read_bytes(path, storage).decode() if st.is_s3(out_dir) else path.read_text()
    except DataError as exc:
        raise PlanFormatError(str(exc)) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFormatError(f"{path} is not valid JSON ({exc}); rerun `clray mine` to rewrite it") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise PlanFormatError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, expected "
            f"{MANIFEST_FORMAT!r} version {MANIFEST_VERSION}; mine the corpus again with this clray"
        )
    return manifest


def plan_columns(manifest: dict[str, Any]) -> PlanColumns:
    return PlanColumns(**manifest["columns"])


def columns_dict(columns: PlanColumns) -> dict[str, Any]:
    return asdict(columns)
