"""Which plan each epoch trains on when re-mining runs beside the training
(``remine.overlap``; ``jobs.run.overlap`` is the driver's side), and the workers' side.

With ``remine.every_epochs = N`` the boundaries N, 2N, ... (the starts of those epochs)
are where the workers export a teacher and go on training; the plan mined with it is
trained from the next boundary. So the plan of every epoch is a function of the epoch
alone (``plan_source``): epochs 0 to 2N-1 train on the first plan, epochs kN to
(k+1)N-1 (k >= 2) on the plan mined at boundary (k-1)N, and a resumed or restarted run
trains the same batches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from clray.jobs import events
from clray.jobs.config import JobConfig
from clray.jobs.run.checkpoint import export
from clray.jobs.run.schedule import TrainState

if TYPE_CHECKING:
    from clray.pipelines.mining.config import MineConfig

STATE_FILE = "remine.json"
"""In the run directory: which plan is current from which epoch (sequential re-mining),
or the plans mined so far (overlapped)."""

POLL_WAIT_S = 0.5
"""How often the workers waiting for an epoch's plan ask the board again."""


def mining_boundaries(every: int, epochs: int) -> list[int]:
    """The boundaries (epochs) where the workers export a teacher to mine with: those
    whose plan some later epoch trains on."""
    return [b for b in range(every, epochs, every) if b + every < epochs]


def plan_source(epoch: int, every: int) -> int | None:
    """The boundary whose mined plan ``epoch`` trains on; None: the run's first plan."""
    period = epoch // every
    return (period - 1) * every if period >= 2 else None


def plan_index(epoch: int, every: int, num_plans: int) -> int:
    """The epoch plan of its plan that ``epoch`` reads: a mined plan holds every_epochs
    epoch plans, the first from the boundary after the one it was mined at; the run's
    first plan is cycled through from epoch 0."""
    source = plan_source(epoch, every)
    first = 0 if source is None else source + every
    return (epoch - first) % num_plans


def teacher_dir(run_dir: Path | str, boundary: int) -> Path:
    return Path(run_dir) / "remine" / f"teacher-epoch-{boundary:04d}"


def mined_dir(run_dir: Path | str, boundary: int) -> Path:
    return Path(run_dir) / "mined" / f"epoch-{boundary:04d}"


def mining_cpus(cfg: JobConfig) -> float:
    """Logical CPUs a local Ray adds for the mining beside the training: the teacher's
    actors, one search actor and the reading tasks (on a cluster, the mining goes where
    teacher.resources and mining.search_resources put it)."""
    teacher = cfg.remine.teacher
    return float(teacher.get("num_actors", 1)) * float(teacher.get("cpus_per_actor", 1.0)) + 1.5


def mine_config(cfg: JobConfig, first_manifest: dict[str, Any], teacher_dir: Path, epoch: int,
                out_dir: Path) -> MineConfig:
    """The mining job of a re-mining boundary (sequential or overlapped): the first plan's
    corpus and parameters with the run's remine.mining over them, the model exported at
    ``epoch`` as teacher, global batches for the run's workers."""
    from clray.pipelines.mining.config import MineConfig, MiningConfig, OutputConfig, TeacherConfig

    data = cfg.data.without_negatives().model_copy(
        update={"train": list(first_manifest["corpus"]["files"]), "batches": "examples", "eval": []}
    )
    parameters = {k: v for k, v in first_manifest["parameters"].items() if k in MiningConfig.model_fields}
    parameters.update(cfg.remine.mining)
    # A mined batch is the global batch, split over the run's workers in one step.
    parameters.update(batch_size=cfg.train.global_batch_size, num_workers=cfg.scaling.num_workers,
                      epochs=cfg.remine.every_epochs, seed=cfg.run.seed + epoch)
    return MineConfig(
        data=data,
        teacher=TeacherConfig(path=str(teacher_dir), **cfg.remine.teacher),
        mining=MiningConfig.model_validate(parameters),
        output=OutputConfig(dir=str(out_dir)),
        storage=cfg.storage,  # the corpus may be on S3
    )


class RemineFailedError(RuntimeError):
    """remine.overlap: the plan an epoch needs could not be mined (the driver says why)."""


class EpochPlans:
    """A worker's view of the plans: the checked plan the current epoch reads (the run's
    first plan, or with a board the one ``plan_source`` names), exporting a teacher at
    every mining boundary and waiting on the board for a plan not mined yet."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        """The ``worker.Worker`` (rank, device, config, spec, publish) whose plans these are."""
        self.current: Any = worker.spec.packed
        """Global batches: the checked ``DataSpec`` whose plan the current epoch reads."""
        self.source: int | None = -1
        """The boundary the current plan was mined at (None: the first plan; -1: none yet)."""

    def index(self, epoch: int) -> int:
        """The epoch plan of ``current`` that ``epoch`` reads."""
        num_plans = self.current.plan.num_plans
        if self.worker.spec.board is None:
            return epoch % num_plans
        return plan_index(epoch, self.worker.cfg.remine.every_epochs, num_plans)

    def begin(self, engine: Any, state: TrainState) -> bool:
        """remine.overlap, before each epoch's first batch (or a resumed epoch's next): at a
        mining boundary export the teacher and tell the driver; then take the epoch's plan
        from the board, waiting for it when it is not mined yet. False: a stop was asked
        for while waiting."""
        if self.worker.spec.board is None:
            return True
        every = self.worker.cfg.remine.every_epochs
        if state.step_in_epoch == 0 and state.epoch in mining_boundaries(every, self.worker.cfg.train.epochs):
            self._export_teacher(engine, state)
        source = plan_source(state.epoch, every)
        if source == self.source:
            return True
        waited = 0.0
        if source is None:
            self.current = self.worker.spec.packed
        else:
            started = time.monotonic()
            plan = self._wait(source)
            if plan is None:
                return False
            self.current, waited = plan, time.monotonic() - started
        self.source = source
        self.worker.publish(events.PlanEvent(epoch=state.epoch, plan=str(self.current.plan.directory),
                                             mined_at=source, waited_s=round(waited, 2)))
        return True

    def _export_teacher(self, engine: Any, state: TrainState) -> None:
        """The model at this boundary, exported for the mining beside the run (kept when an
        earlier start of the run exported it: the same state, and a miner may be reading it)."""
        final = teacher_dir(self.worker.cfg.run_dir, state.epoch)
        exists = torch.tensor([float(self.worker.rank == 0 and final.is_dir())], device=self.worker.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(exists, op=dist.ReduceOp.MAX)  # every rank exports (a collective) or none
        if not exists.item():
            partial = final.with_name(final.name + ".partial")
            export(engine, self.worker.cfg, str(partial), self.worker.rank,
                   card={"run_name": self.worker.cfg.run.name, "steps": state.step, "epochs": state.epoch})
            if self.worker.rank == 0:
                partial.rename(final)
        self.worker.publish(events.RemineEvent(epoch=state.epoch, teacher=str(final), overlap=True))

    def _wait(self, boundary: int) -> Any:
        """The checked plan mined at ``boundary``, once the board has it; every rank agrees
        each poll on what rank 0 saw (ready, failed, a stop request), so no rank trains or
        checkpoints alone. None: stop."""
        import ray

        while True:
            flags = torch.zeros(3, device=self.worker.device)
            if self.worker.rank == 0:
                entry = ray.get(self.worker.spec.board.get.remote(boundary))  # [ray]
                flags[0] = float(entry is not None and entry[0] == "ready")
                flags[1] = float(entry is not None and entry[0] == "failed")
                flags[2] = float(self.worker.stops.requested)  # rank 0's watch of the stop queue
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0] > 0 or flags[1] > 0:
                status, value = ray.get(self.worker.spec.board.get.remote(boundary))  # [ray]
                if status == "failed":
                    raise RemineFailedError(value)
                return value
            if flags[2] > 0:
                return None
            time.sleep(POLL_WAIT_S)
