"""A checkpoint is complete or it is not a checkpoint.

Ray Train writes each rank's files of ``checkpoint_<step>`` separately; a run killed
while they are written leaves a directory that looks like a checkpoint and is not one,
and Ray's own registry of checkpoints (``checkpoint_manager_snapshot.json``) lags the
writes by a checkpoint or more and can itself be cut short. So clray keeps its own
record: after every rank's files are in place, rank 0 writes ``clray-commit.json``
*last*, naming every file with its size and where the run stood (step, epoch, world
size, ...). A directory without that marker, or whose files no longer match it, is
skipped; the newest one that matches is where a run resumes (``complete_checkpoints``).
The same scan runs on the driver, in Ray Train's controller (which builds the resumed
epoch's data) and on the workers, so all three agree on the checkpoint without talking.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from clray.jobs.run.location import CHECKPOINT_PREFIX, checkpoint_step
from clray.pipelines import storage
from clray.pipelines.storage import StorageConfig

MARKER = "clray-commit.json"
"""The commit marker, written last into a checkpoint directory."""
DAMAGED = "clray-commit.damaged.json"
"""A marker set aside because the checkpoint failed its check when it was restored."""
FORMAT = 1
PARTITION_SUFFIX = "optim_states.pt"
"""How DeepSpeed names the files of optimizer state split by rank (ZeRO 1-3, bf16)."""


@dataclass
class Commit:
    """What a complete checkpoint holds, as its marker says."""

    step: int
    epoch: int
    step_in_epoch: int
    samples_seen: int
    world_size: int
    """Training workers that wrote it (DeepSpeed partitions ZeRO state by this count)."""
    zero_stage: int
    global_batch_size: int
    steps_per_epoch: int
    files: dict[str, int] = field(default_factory=dict)
    """Every file of the checkpoint (relative path -> bytes), the marker excluded."""
    time: float = 0.0
    format: int = FORMAT

    @property
    def partitioned(self) -> bool:
        """Whether its optimizer state is split by rank (ZeRO 1-3, and bf16 at ZeRO-0),
        so another worker count must load its universal form."""
        return any(name.endswith(PARTITION_SUFFIX) for name in self.files)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Commit:
        raw = json.loads(text)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in names})


def file_sizes(uri: str, cfg: StorageConfig | None = None) -> dict[str, int]:
    """Every file under a checkpoint directory (local or S3), relative path -> size."""
    fs, inner = storage.filesystem(uri, cfg)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    base = inner.rstrip("/") + "/"
    return {
        info.path[len(base):]: int(info.size)
        for info in infos
        if info.type == pafs.FileType.File and info.path.startswith(base)
        and info.path[len(base):] not in (MARKER, DAMAGED)
    }


def write_commit(uri: str, commit: Commit, cfg: StorageConfig | None = None) -> Commit:
    """Write ``uri``'s commit marker, listing the files that are there now. Call it once
    every rank's files are in place; the marker is written whole or not at all."""
    commit.files = file_sizes(uri, cfg)
    commit.time = time.time()
    storage.write_bytes(storage.join(uri, MARKER), commit.to_json().encode(), cfg)
    return commit


def read_commit(uri: str, cfg: StorageConfig | None = None) -> Commit | None:
    """The checkpoint's commit, or None when it has no marker (never completed)."""
    path = storage.join(uri, MARKER)
    fs, inner = storage.filesystem(path, cfg)
    try:
        with fs.open_input_stream(inner) as stream:
            data = stream.read()
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            return None
        raise storage.storage_error(path, "reading", exc) from None
    return Commit.from_json(data)


def commit_problem(uri: str, commit: Commit, cfg: StorageConfig | None = None) -> str | None:
    """Why the files of ``uri`` no longer match its commit (deleted, truncated), or None."""
    have = file_sizes(uri, cfg)
    for name, size in sorted(commit.files.items()):
        if name not in have:
            return f"{name} is missing"
        if have[name] != size:
            return f"{name} has {have[name]} bytes, {size} were written"
    return None


@dataclass
class Candidate:
    """One ``checkpoint_<step>`` directory and what the scan found in it."""

    uri: str
    step: int
    commit: Commit | None
    problem: str | None
    """None: complete. Else why it is not a checkpoint to resume from."""

    @property
    def complete(self) -> bool:
        return self.problem is None


def scan(run_uri: str, cfg: StorageConfig | None = None) -> list[Candidate]:
    """Every ``checkpoint_<step>`` directory of a run, newest first, each checked."""
    if not storage.exists(run_uri, cfg):
        return []
    dirs = [d for d in storage.list_dirs(run_uri, cfg) if d.rstrip("/").rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX)]
    out = []
    for uri in sorted(dirs, key=checkpoint_step, reverse=True):
        out.append(check(uri, cfg))
    return out


def check(uri: str, cfg: StorageConfig | None = None) -> Candidate:
    """One checkpoint directory, checked against its marker."""
    step = checkpoint_step(uri)
    try:
        commit = read_commit(uri, cfg)
    except (ValueError, TypeError) as exc:  # a marker that is not clray's JSON
        return Candidate(uri, step, None, f"its commit marker is unreadable ({exc})")
    if commit is None:
        damaged = storage.exists(storage.join(uri, DAMAGED), cfg)
        problem = ("it failed its check when it was last restored" if damaged
                   else "it has no commit marker (it was being written when the run stopped)")
        return Candidate(uri, step, None, problem)
    return Candidate(uri, step, commit, commit_problem(uri, commit, cfg))


def complete_checkpoints(run_uri: str, cfg: StorageConfig | None = None) -> tuple[list[Candidate], list[Candidate]]:
    """(complete checkpoints newest first, the newer-than-the-newest-complete ones that
    were skipped): what a resume chooses from, and what it warns about."""
    found = scan(run_uri, cfg)
    complete = [c for c in found if c.complete]
    newest = complete[0].step if complete else -1
    return complete, [c for c in found if not c.complete and c.step > newest]


def mark_damaged(uri: str, reason: str, cfg: StorageConfig | None = None) -> None:
    """Take a checkpoint out of the running: its marker becomes ``DAMAGED`` (with the
    reason), so every later scan skips it; its files stay for inspection."""
    path = storage.join(uri, MARKER)
    try:
        record: dict[str, Any] = json.loads(storage.read_bytes(path, cfg))
    except Exception:  # noqa: BLE001 - the marker itself may be what is broken
        record = {}
    record["damaged"] = reason
    storage.write_bytes(storage.join(uri, DAMAGED), json.dumps(record, indent=1).encode(), cfg)
    storage.delete(path, cfg)


def prune(run_uri: str, keep: int, protected: set[str], cfg: StorageConfig | None = None) -> list[str]:
    """Delete the checkpoint directories a finished start no longer needs: every one that
    is neither among the newest ``keep`` complete checkpoints nor in ``protected`` (the
    names Ray Train's registry still lists, which Ray deletes itself). These are
    the leftovers of killed starts: directories never completed, and complete ones Ray
    never registered. Returns the deleted locations."""
    found = scan(run_uri, cfg)
    kept = {c.uri for c in [c for c in found if c.complete][:keep]}
    gone = []
    for c in found:
        name = c.uri.rstrip("/").rsplit("/", 1)[-1]
        if c.uri in kept or name in protected:
            continue
        storage.delete(c.uri, cfg)
        gone.append(c.uri)
    return gone


CONSUMED = "consumed_rank{rank}.npy"
"""Per rank: the id keys (``pipelines.dataset.id_keys``) of the rows it trained on in the
checkpoint's epoch so far. Together they are the rows a resumed epoch leaves out."""


def consumed_name(rank: int) -> str:
    return CONSUMED.format(rank=rank)


def read_consumed(uri: str, commit: Commit, cfg: StorageConfig | None = None) -> Any:
    """The id keys of every row trained in the checkpoint's epoch before it was saved,
    gathered from all ranks' files (sorted, int64)."""
    import io

    import numpy as np

    parts = [np.load(io.BytesIO(storage.read_bytes(storage.join(uri, name), cfg)))
             for name in sorted(commit.files) if name.startswith("consumed_rank") and name.endswith(".npy")]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
