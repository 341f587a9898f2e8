"""A worker's resumable state on disk: DeepSpeed's shards plus the train state and this
rank's RNG, saved through Ray Train (which merges the ranks' directories and keeps the
newest ``train.keep_checkpoints``); and the export rank 0 writes at the end.
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
from clray.jobs.run.location import checkpoint_name, checkpoint_step
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


def save_checkpoint(engine: Any, state: TrainState, rank: int, metrics: dict[str, Any]) -> None:
    """DeepSpeed writes its shards on every rank; Ray merges the ranks' directories."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="clray-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={"train_state": asdict(state)})
        torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
        ray.train.report(  # [ray]
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_name(state.step),
        )


def restore_checkpoint(engine: Any, checkpoint: Any, rank: int) -> TrainState:
    with checkpoint.as_directory() as path:
        _, client = engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
        rng_file = Path(path) / f"rng_rank{rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
    if not client or "train_state" not in client:
        raise RuntimeError(f"checkpoint {checkpoint.path} has no clray train state: was it written by clray?")
    return TrainState(**client["train_state"])


def checkpoint_to_restore(own: Any, start_from: str | None, cfg: JobConfig) -> tuple[Any, bool]:
    """(the checkpoint this start restores, whether it is another run's state to adopt).

    ``own`` is the run's latest checkpoint as Ray Train registered it. ``start_from`` wins
    when the run has nothing of its own at that step or later: a new run that starts from
    another run's checkpoint (a PBT exploit), or this run resumed at a checkpoint saved
    after the last one Ray Train registered. Once this run has a later checkpoint of its
    own, a restart resumes that instead."""
    if not start_from or (own is not None and checkpoint_step(own) >= checkpoint_step(start_from)):
        return own, False
    import ray.train

    from clray.pipelines import storage

    fs, inner = storage.filesystem(start_from, cfg.storage)
    return ray.train.Checkpoint(inner, filesystem=fs), True  # [ray]


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
