"""A training run's directory, local or on S3: where the driver's files, the checkpoints
and the export go, and how Ray Train is told. Kept apart from ``jobs.train`` so the run
loop there reads the same for both kinds of location."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from clray.jobs.config import JobConfig
from clray.pipelines import storage

DRIVER_FILES = ("config.toml", "metrics.jsonl", "summary.json", "error.log", "quarantine.parquet",
                "quarantine-eval.parquet")
"""What the driver writes into a run directory (Ray Train writes the checkpoints, rank 0
the export)."""


class RunLocation:
    """Where a run's files go. A local run directory is written in place. For a run
    directory on S3 (``run.output_dir = "s3://..."``) the driver writes its files into a
    local staging directory (``$TMPDIR/clray-run-*``, removed when the run returns) and
    ``sync`` uploads them; Ray Train writes checkpoints straight to S3 and rank 0 uploads
    the export, so nothing of the run lives only on the driver's disk once it returns.
    Checking that the location is writable first makes a missing bucket, denied writes or
    a wrong endpoint fail before Ray starts, naming run.output_dir."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.uri = cfg.run_uri
        self.remote = storage.is_s3(self.uri)
        if not self.remote:
            self.local = cfg.run_dir
            self.local.mkdir(parents=True, exist_ok=True)
            return
        storage.check_writable(self.uri, cfg.storage, "run.output_dir")
        self.local = Path(tempfile.mkdtemp(prefix="clray-run-"))
        # metrics.jsonl is appended to across starts of a run, as it is locally.
        metrics = storage.join(self.uri, "metrics.jsonl")
        if storage.is_file(metrics, cfg.storage):
            (self.local / "metrics.jsonl").write_bytes(storage.read_bytes(metrics, cfg.storage))

    def path(self, name: str) -> str:
        """Where ``name`` ends up: the staged file's final location."""
        return storage.join(self.uri, name)

    def final(self, local_path: str | None) -> str | None:
        """A staged path as its final location (other paths, e.g. a plan's, unchanged)."""
        if not self.remote or local_path is None or Path(local_path).parent != self.local:
            return local_path
        return self.path(Path(local_path).name)

    def sync(self) -> None:
        """Upload the driver's files; a quarantine file this start did not write is removed
        remotely too, so its presence always describes the latest pass (as locally)."""
        if not self.remote:
            return
        for name in DRIVER_FILES:
            staged = self.local / name
            if staged.is_file():
                storage.upload(staged, self.path(name), self.cfg.storage)
            elif name.startswith("quarantine"):
                storage.delete(self.path(name), self.cfg.storage)

    def checkpoints(self) -> list[str]:
        if not self.remote:
            return sorted(str(p) for p in self.local.glob("checkpoint_*") if p.is_dir())
        return [d for d in storage.list_dirs(self.uri, self.cfg.storage) if d.rsplit("/", 1)[-1].startswith("checkpoint_")]

    def export_dir(self) -> str | None:
        export = self.path("export")
        return export if storage.is_dir(export, self.cfg.storage) else None

    def run_config_storage(self) -> dict[str, Any]:
        """Ray Train ``RunConfig`` storage arguments (with ``name = run.name``): checkpoints
        live under ``output_dir/name``, on S3 through the same filesystem the data uses, so
        a rerun on any node resumes from them. Tune can pass the same to its RunConfig."""
        if not self.remote:
            return {"storage_path": str(self.cfg.run_dir.parent)}
        fs, inner = storage.filesystem(self.cfg.run.output_dir, self.cfg.storage)
        return {"storage_path": inner, "storage_filesystem": fs}

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
