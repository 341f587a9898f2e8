"""A training run's directory, local or on S3: where the driver's files, the checkpoints
and the export go, how Ray Train is told, and what a checkpoint is called.

This is the only code that names checkpoints (``checkpoint_<step>``): the worker saves
them under ``checkpoint_name``, the driver lists them, a search points Tune at one with
``checkpoint_uri`` and reads a step back with ``checkpoint_step``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clray.jobs.config import JobConfig
from clray.jobs.run.errors import RunDirError
from clray.pipelines import storage
from clray.pipelines.staging import Staging

DRIVER_FILES = ("config.toml", "environment.json", "metrics.jsonl", "summary.json", "error.log", "report.html")
"""What the driver writes into a run directory (Ray Train writes the checkpoints, rank 0
the export), uploaded as they are."""
QUARANTINE_FILES = ("quarantine.parquet", "quarantine-eval.parquet")
"""Written by this start's validation pass or not at all: a remote copy this start did
not write is removed, so its presence always describes the latest pass (as locally)."""
CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(checkpoint: Any) -> int:
    """The step a ``checkpoint_<step>`` directory (a path, URI or Ray Checkpoint) holds;
    -1 for none or a name without a step."""
    if checkpoint is None:
        return -1
    name = str(getattr(checkpoint, "path", checkpoint)).rstrip("/").rsplit("/", 1)[-1]
    prefix, _, step = name.rpartition("_")
    return int(step) if f"{prefix}_" == CHECKPOINT_PREFIX and step.isdigit() else -1


class RunLocation:
    """Where a run's files go. A local run directory is written in place. For a run
    directory on S3 (``run.output_dir = "s3://..."``) the driver writes its files into a
    local staging directory (removed when the run returns) and ``sync`` uploads them; Ray
    Train writes checkpoints straight to S3 and rank 0 uploads the export, so nothing of
    the run lives only on the driver's disk once it returns. The location is checked
    writable first, so a missing bucket, denied writes or a wrong endpoint fail before
    Ray starts, naming run.output_dir."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        if not storage.is_s3(cfg.run_uri):
            check_local_run_dir(Path(cfg.run_uri), cfg.run.output_dir)
        self.staging = Staging(cfg.run_uri, cfg.storage, "run.output_dir", name="run")
        self.uri = self.staging.uri
        self.remote = self.staging.remote
        self.local = self.staging.local
        # metrics.jsonl is appended to across starts of a run, as it is locally.
        self.staging.pull("metrics.jsonl")

    def path(self, name: str) -> str:
        """Where ``name`` ends up: the staged file's final location."""
        return self.staging.path(name)

    def final(self, local_path: str | None) -> str | None:
        """A staged path as its final location (other paths, e.g. a plan's, unchanged)."""
        return self.staging.final(local_path)

    def sync(self) -> None:
        """Upload the driver's files (no-op for a local run directory)."""
        self.staging.publish(*DRIVER_FILES)
        self.staging.publish(*QUARANTINE_FILES, mirror=True)

    def checkpoint_uri(self, step: int) -> str:
        return self.path(checkpoint_name(step))

    def remove(self, name: str) -> None:
        """Remove one of the driver's files from the run directory (and from S3)."""
        (self.local / name).unlink(missing_ok=True)
        self.staging.publish(name, mirror=True)

    def remote_has(self, name: str) -> bool:
        """Whether the run directory on S3 holds ``name`` (False for a local run)."""
        return self.remote and storage.is_file(self.path(name), self.cfg.storage)

    def export_dir(self) -> str | None:
        export = self.path("export")
        return export if storage.is_dir(export, self.cfg.storage) else None

    def run_config_storage(self) -> dict[str, Any]:
        """Ray Train ``RunConfig`` storage arguments (with ``name = run.name``): checkpoints
        live under ``output_dir/name``, on S3 through the same filesystem the data uses, so
        a rerun on any node resumes from them."""
        if not self.remote:
            return {"storage_path": str(self.cfg.run_dir.parent)}
        fs, inner = storage.filesystem(self.cfg.run.output_dir, self.cfg.storage)
        return {"storage_path": inner, "storage_filesystem": fs}

    def close(self) -> None:
        self.staging.close()


def check_local_run_dir(run_dir: Path, output_dir: str) -> None:
    """Create a local run directory and prove it writable, or raise ``RunDirError`` naming
    run.output_dir, the path and the fix (instead of a traceback from the first write)."""
    blocker = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise RunDirError(
            f"run.output_dir = {output_dir!r}: {blocker} is a file, not a directory, so the run directory {run_dir} "
            "cannot be created there. Set run.output_dir to a directory (or move the file away)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".clray-write-check-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or type(exc).__name__)
        raise RunDirError(
            f"run.output_dir = {output_dir!r}: cannot write the run directory {run_dir} ({reason}). Set "
            "run.output_dir to a directory you can write (e.g. --set run.output_dir=\"runs\"), or fix its "
            "permissions") from None
