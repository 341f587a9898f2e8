"""A worker's resumable state on disk: DeepSpeed's shards plus the train state, this
rank's RNG and the ids of the rows it trained in the epoch so far, saved through Ray
Train (which merges the ranks' directories and keeps the newest
``train.keep_checkpoints``) and committed by rank 0 (``jobs.run.commit``); restoring it,
checked first; and the export rank 0 writes at the end.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from clray.jobs.config import JobConfig
from clray.jobs.run.location import checkpoint_name
from clray.jobs.run.schedule import TrainState

CHECKPOINT_TAG = "state"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine: Any, state: TrainState, rank: int, metrics: dict[str, Any], *, cfg: JobConfig,
                    steps_per_epoch: int, consumed: np.ndarray) -> str:
    """Save a checkpoint and commit it; returns its location.

    DeepSpeed writes its shards on every rank, each rank adds its RNG state and the ids
    of the rows it trained in this epoch (``consumed``), and Ray uploads each rank's
    directory into ``checkpoint_<step>``. Once every rank's upload is done (a barrier),
    rank 0 writes the commit marker (``jobs.run.commit``) last: a run killed anywhere
    before that leaves a directory no resume will take."""
    import ray.train

    from clray.jobs.run.commit import Commit, consumed_name, write_commit
    from clray.pipelines import storage

    name = checkpoint_name(state.step)
    with tempfile.TemporaryDirectory(prefix="clray-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={"train_state": asdict(state)})
        torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
        np.save(Path(tmp) / consumed_name(rank), np.asarray(consumed, dtype=np.int64))
        ray.train.report(  # [ray]
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=name,
        )
    uri = storage.join(cfg.run_uri, name)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_commit(uri, Commit(step=state.step, epoch=state.epoch, step_in_epoch=state.step_in_epoch,
                                 samples_seen=state.samples_seen, world_size=dist.get_world_size() if dist.is_initialized() else 1,
                                 zero_stage=cfg.train.zero_stage, global_batch_size=cfg.train.global_batch_size,
                                 steps_per_epoch=steps_per_epoch), cfg.storage)
    return uri


def _check_share(path: Path, commit: Any, rank: int, world: int) -> str | None:
    """Check this rank's share of a checkpoint's files (every world-th one): each torch
    file is a zip whose members carry CRCs, so a flipped or cut byte is found here,
    before any rank loads a thing. Returns the problem, or None."""
    import zipfile

    names = sorted(commit.files)
    for name in names[rank::world]:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != commit.files[name]:
            return f"{name} has {file.stat().st_size} bytes, {commit.files[name]} were written"
        if name.endswith(".pt"):
            try:
                with zipfile.ZipFile(file) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError) as exc:
                return f"{name} is not readable ({exc})"
            if bad is not None:
                return f"{name}: its member {bad} fails its CRC check"
    return None


def restore_checkpoint(engine: Any, point: Any, rank: int, cfg: JobConfig) -> tuple[TrainState, np.ndarray]:
    """(the train state, the ids of the rows trained in its epoch so far) of ``point``.

    Every rank first checks its share of the files and all ranks agree on the result; a
    checkpoint that fails is taken out of the running (``commit.mark_damaged``) and
    ``CheckpointDamagedError`` raised, so the next attempt restores the one before. A
    checkpoint written by another worker count is loaded from its universal form
    (``resume.prepare_elastic``)."""
    import ray.train

    from clray.jobs.run.commit import mark_damaged, read_consumed
    from clray.jobs.run.errors import CheckpointDamagedError
    from clray.jobs.run.resume import UNIVERSAL_DIR
    from clray.pipelines import storage

    world = dist.get_world_size() if dist.is_initialized() else 1
    fs, inner = storage.filesystem(point.uri, cfg.storage)
    checkpoint = ray.train.Checkpoint(inner, filesystem=fs)  # [ray]
    with checkpoint.as_directory() as path:
        problem = _check_share(Path(path), point.commit, rank, world)
        flag = torch.tensor([0.0 if problem is None else 1.0], device=_collective_device(engine))
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if float(flag.item()) > 0:
            if problem is not None:
                mark_damaged(point.uri, problem, cfg.storage)
            raise CheckpointDamagedError(
                f"{point.uri} fails its check ({problem or 'on another rank'}); it is set aside and the run "
                "resumes from the checkpoint before it")
        elastic = point.commit.world_size != world and point.commit.partitioned
        load_dir = Path(path) / UNIVERSAL_DIR if elastic else path
        _, client = engine.load_checkpoint(str(load_dir), tag=CHECKPOINT_TAG)
        rng_file = Path(path) / f"rng_rank{rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
    if not client or "train_state" not in client:
        raise RuntimeError(f"checkpoint {point.uri} has no clray train state: was it written by clray?")
    consumed = read_consumed(point.uri, point.commit, cfg.storage) if rank == 0 else np.zeros(0, np.int64)
    return TrainState(**client["train_state"]), consumed


def _collective_device(engine: Any) -> torch.device:
    """Where a tiny all-reduced flag must live: NCCL reduces CUDA tensors only."""
    return engine.device if getattr(engine, "device", None) is not None else torch.device("cpu")


def export(engine: Any, cfg: JobConfig, export_dir: str, rank: int, card: dict[str, Any] | None = None) -> None:
    """Rank 0 writes the HF-format export; under ZeRO-3 all ranks first gather the weights.
    An ``s3://`` export is written to a local temporary directory on rank 0's node and
    uploaded from there (the driver may be on another machine)."""
    from clray.models.export import export_model
    from clray.pipelines import storage

    def write() -> None:
        if not storage.is_s3(export_dir):
            export_model(engine.module, cfg.model, export_dir, card=card)
            return
        with tempfile.TemporaryDirectory(prefix="clray-export-") as tmp:
            local = export_model(engine.module, cfg.model, Path(tmp) / "export", card=card)
            storage.delete(export_dir, cfg.storage)  # no stale files from an earlier export
            storage.upload(local, export_dir, cfg.storage)

    if cfg.train.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                write()
    elif rank == 0:
        write()
    if dist.is_initialized():
        dist.barrier()
