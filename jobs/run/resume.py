"""Where a run resumes, decided the same way on the driver, in Ray Train's controller and
on every worker: the newest *complete* checkpoint on disk or S3 (``jobs.run.commit``),
or the checkpoint a search hands the run (``start_from``) when the run has nothing of
its own at that step or later.

Before Ray starts, the driver also checks that the checkpoint can be resumed with this
config (``check_resumable``: the same ZeRO stage and global batch; another worker count
is converted with DeepSpeed's universal checkpoint, ``prepare_elastic``) and that Ray
Train's own registry of checkpoints is readable (``check_ray_registry``): a registry
cut short by a kill, or naming a checkpoint that is gone, is moved aside with a warning
instead of failing the run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clray.jobs.run.commit import Candidate, Commit, check, complete_checkpoints
from clray.jobs.run.errors import ResumeError
from clray.jobs.run.location import checkpoint_step
from clray.pipelines import storage
from clray.pipelines.storage import StorageConfig

if TYPE_CHECKING:
    from clray.jobs.config import JobConfig

RAY_REGISTRY = "checkpoint_manager_snapshot.json"
"""Ray Train V2's record of the checkpoints it registered, in the run directory
(``ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME``; see
``jobs.runtime.RAY_KNOBS``)."""
UNIVERSAL_DIR = "universal"
"""Inside a checkpoint: its DeepSpeed universal form, for a resume with another worker count."""
UNIVERSAL_DONE = "clray-universal.json"


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a start restores and what its commit says."""

    uri: str
    commit: Commit
    foreign: bool = False
    """Another run's checkpoint (``start_from``), not this run's own."""

    def position(self) -> tuple[int, int]:
        """(epoch, step in epoch) training continues at: a checkpoint saved at an epoch's
        last step continues at the start of the next epoch."""
        c = self.commit
        if c.step_in_epoch >= c.steps_per_epoch:
            return c.epoch + 1, 0
        return c.epoch, c.step_in_epoch


def resume_point(run_uri: str, start_from: str | None, cfg: StorageConfig | None = None) -> ResumePoint | None:
    """The checkpoint a start of the run at ``run_uri`` resumes from, or None (a fresh
    start). The same disk state gives the same answer wherever it is asked."""
    complete, _ = complete_checkpoints(run_uri, cfg)
    own = complete[0] if complete else None
    if start_from and (own is None or own.step < checkpoint_step(start_from)):
        given = check(storage.normalize(start_from), cfg)
        if not given.complete or given.commit is None:
            raise ResumeError(f"cannot start from {start_from}: {given.problem}")
        return ResumePoint(given.uri, given.commit, foreign=True)
    return ResumePoint(own.uri, own.commit) if own is not None and own.commit is not None else None


def skipped_warnings(run_uri: str, cfg: StorageConfig | None = None) -> list[str]:
    """One line per checkpoint newer than the one a resume takes, saying why it is not used."""
    complete, skipped = complete_checkpoints(run_uri, cfg)
    target = complete[0].uri.rstrip("/").rsplit("/", 1)[-1] if complete else "the start (no complete checkpoint)"
    return [f"{_name(c)} is not used: {c.problem}; resuming from {target} instead" for c in skipped]


def _name(c: Candidate | str) -> str:
    uri = c.uri if isinstance(c, Candidate) else c
    return uri.rstrip("/").rsplit("/", 1)[-1]


def check_resumable(cfg: JobConfig, point: ResumePoint) -> bool:
    """Refuse, before Ray starts, a config its checkpoint cannot be resumed with; True when
    the worker count changed (an elastic resume: see ``prepare_elastic``)."""
    c = point.commit
    name = _name(point.uri)
    if c.zero_stage != cfg.train.zero_stage:
        raise ResumeError(
            f"{name} was written with train.zero_stage = {c.zero_stage}, this config has "
            f"{cfg.train.zero_stage}: set train.zero_stage = {c.zero_stage} to resume it, or start a new run "
            "(another run.name)")
    if c.global_batch_size != cfg.train.global_batch_size:
        raise ResumeError(
            f"{name} was trained with train.global_batch_size = {c.global_batch_size}, this config has "
            f"{cfg.train.global_batch_size}: the schedule (steps per epoch, the position in the epoch) depends "
            f"on it. Set train.global_batch_size = {c.global_batch_size} to resume (any scaling.num_workers "
            "that divides it works), or start a new run (another run.name)")
    return c.world_size != cfg.scaling.num_workers


def universal_uri(checkpoint_uri: str) -> str:
    return storage.join(checkpoint_uri, UNIVERSAL_DIR)


def prepare_elastic(cfg: JobConfig, point: ResumePoint) -> str | None:
    """Make ``point`` loadable by ``scaling.num_workers`` workers: ZeRO-1/2/3 state is
    partitioned by the worker count it was saved with, so it is converted once to
    DeepSpeed's universal checkpoint (``<checkpoint>/universal``), which any worker
    count loads. A checkpoint with whole state on every rank (ZeRO-0 in fp32) needs
    nothing. Returns the line the user is told."""
    c = point.commit
    name = _name(point.uri)
    what = (f"resuming {name} (written by {c.world_size} worker(s)) with {cfg.scaling.num_workers}; the global "
            f"batch stays {cfg.train.global_batch_size}")
    if not c.partitioned:
        return what
    target = universal_uri(point.uri)
    if storage.exists(storage.join(target, UNIVERSAL_DONE), cfg.storage):
        return what + " (its universal form exists already)"
    started = time.perf_counter()
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="clray-universal-") as tmp:
        source = point.uri
        if storage.is_s3(point.uri):
            source = str(Path(tmp) / "source")
            storage.download_dir(storage.join(point.uri, "state"), Path(source) / "state", cfg.storage)
        out = Path(tmp) / "universal" if storage.is_s3(target) else Path(target)
        _convert(Path(source) / "state", out / "state", name)
        (out / UNIVERSAL_DONE).write_text(json.dumps({"from_world_size": c.world_size, "time": time.time()}))
        if storage.is_s3(target):
            storage.upload(out, target, cfg.storage)
    return what + f" (converted to DeepSpeed's universal checkpoint in {time.perf_counter() - started:.1f} s)"


def _convert(source: Path, out: Path, name: str) -> None:
    """DeepSpeed's ds_to_universal, in this process and quietly."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=str(source), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            ds_to_universal(args)
    except Exception as exc:  # noqa: BLE001 - reported with the way out
        raise ResumeError(
            f"{name} cannot be converted for another worker count ({type(exc).__name__}: {exc}): resume it with "
            "the worker count it was written by, or start a new run (another run.name)") from None


def check_ray_registry(run_uri: str, cfg: StorageConfig | None = None) -> tuple[set[str], str | None]:
    """(checkpoint names Ray Train's registry lists, a warning when it had to be moved aside).

    Ray Train reads its registry at every start and fails the run when the file is cut
    short (a bare JSON error) or names a checkpoint that is gone, advising to delete the
    run directory. clray resumes from its own scan, so such a registry is moved aside
    (``<name>.damaged-<time>``) and Ray starts a fresh one."""
    import ray

    path = storage.join(run_uri, RAY_REGISTRY)
    if not storage.is_file(path, cfg):
        return set(), None
    problem = None
    names: set[str] = set()
    try:
        state = json.loads(storage.read_bytes(path, cfg))
        names = {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])}
        if state.get("ray_version") != ray.__version__:
            problem = f"it was written by Ray {state.get('ray_version')}, this is Ray {ray.__version__}"
        else:
            gone = sorted(n for n in names if not storage.exists(storage.join(run_uri, n), cfg))
            if gone:
                problem = f"it lists {', '.join(gone)}, which no longer exist(s)"
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"it is unreadable ({type(exc).__name__}: {str(exc)[:80]}; cut short when a run was killed?)"
    if problem is None:
        return names, None
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    storage.write_bytes(aside, storage.read_bytes(path, cfg), cfg)
    storage.delete(path, cfg)
    return set(), (f"Ray Train's checkpoint registry {path} was moved aside to {aside}: {problem}. "
                   "clray resumes from its own record of complete checkpoints; nothing is lost")
