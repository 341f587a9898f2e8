"""The training loop that runs on every Ray Train worker.

Read ``train_loop_per_worker`` top to bottom: build the model and engine, restore, then
per epoch take exactly ``steps_per_epoch`` batches from this worker's shard and step;
after each step ``Cadence`` says whether to evaluate, log, checkpoint or report, the
same on every rank; at the end evaluate and export. Every place the worker touches Ray
is marked ``# [ray]``; everything else is plain torch + DeepSpeed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from clray.jobs import events
from clray.jobs.config import JobConfig
from clray.jobs.run.batches import EpochBatches
from clray.jobs.run.cadence import Cadence, Selection, StepActions
from clray.jobs.run.checkpoint import export, restore_checkpoint, save_checkpoint, seed_everything
from clray.jobs.run.early import EarlyStart
from clray.jobs.run.engine import (
    adopt_config,
    build_engine,
    train_step,
    use_bf16,
    watch_reduction,
)
from clray.jobs.run.errors import CheckpointDamagedError
from clray.jobs.run.ingest import RESUME, reads_remainder
from clray.jobs.run.recovery import SetupError, peer_processes, watching_peers
from clray.jobs.run.replan import EpochPlans
from clray.jobs.run.resume import ResumePoint, resume_point
from clray.jobs.run.schedule import Schedule, TrainState
from clray.jobs.run.stop import StopAgreement
from clray.jobs.run.window import MetricWindow

SELECTED = "clray_selected"
"""With train.select_by, each checkpoint's report carries 1.0 when it holds the best
evaluated state so far, else 0.0: Ray keeps the checkpoints that score highest (and the
latest), so the best state stays on disk."""

STOP_POLL_S = 0.25
"""How often rank 0 asks the driver's stop queue (one actor call): a SIGTERM stops the
run within about this long plus a step (once a second let a fast run train 6 more steps
past the signal; the poll costs about a millisecond)."""

RECORD_BATCHES_ENV = "CLRAY_RECORD_BATCHES"
"""Debugging aid: when this environment variable names a file, every worker appends one
JSON line per step there: rank, its process id, step, epoch, step_in_epoch, the sorted
``id_key``s of its local batch (the int64 keys of ``pipelines.dataset.id_keys``) and the
width each text view was padded to. Off by default."""


@dataclass
class WorkerSpec:
    """What the driver hands every worker (Ray Train's ``train_loop_config``): the resolved
    job config, the schedule all ranks share, and where the run's outputs go. ``encode``
    and ``decode`` are the only way across, so a config key cannot be dropped on the way."""

    job: JobConfig
    schedule: Schedule
    has_eval: bool
    export_dir: str | None
    start_from: str | None = None
    adopt_config: bool = False
    progress: Any = None
    """The run channel's progress queue (``jobs.runtime.Mailbox``) rank 0 publishes events to
    (None: events are dropped)."""
    stop: Any = None
    """The run channel's stop queue the driver puts a stop request into (None: no stops)."""
    packed: Any = None
    """Packed plans of global batches: the driver's checked ``DataSpec``, from which each
    rank builds its own part of every batch (None otherwise)."""
    board: Any = None
    """remine.overlap: the driver's ``overlap.PlanBoard`` actor, where the plans mined
    beside the run appear (None otherwise)."""
    cached: Any = None
    """Examples mode with data.cache: the cached training set's blocks
    (``pipelines.cached.CachedSet``), which every rank reads itself instead of a split."""

    def encode(self) -> dict[str, Any]:
        return {"job": self.job.model_dump(mode="json"), "plan": asdict(self.schedule), "progress": self.progress,
                "has_eval": self.has_eval, "export_dir": self.export_dir, "start_from": self.start_from,
                "adopt_config": self.adopt_config, "stop": self.stop, "packed": self.packed, "board": self.board,
                "cached": self.cached}

    @classmethod
    def decode(cls, config: dict[str, Any]) -> WorkerSpec:
        return cls(job=JobConfig.model_validate(config["job"]), schedule=Schedule(**config["plan"]),
                   has_eval=bool(config.get("has_eval")), export_dir=config.get("export_dir"),
                   start_from=config.get("start_from"), adopt_config=bool(config.get("adopt_config")),
                   progress=config.get("progress"), stop=config.get("stop"), packed=config.get("packed"),
                   board=config.get("board"), cached=config.get("cached"))


class Worker(EpochBatches):
    """One rank's view of the run: its config, schedule, device and event channel."""

    def __init__(self, spec: WorkerSpec) -> None:
        import ray.train  # [ray]

        self.spec = spec
        self.cfg = spec.job
        self.schedule = spec.schedule
        self.rank = ray.train.get_context().get_world_rank()  # [ray]
        torch.set_num_threads(max(1, int(self.cfg.scaling.cpus_per_worker)))
        if self.cfg.scaling.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()  # [ray]
        else:
            self.device = torch.device("cpu")
        self.bf16 = use_bf16(self.cfg)
        self.world = ray.train.get_context().get_world_size()  # [ray]
        self.eval_shard = ray.train.get_dataset_shard("eval") if spec.has_eval else None  # [ray]
        self.shards: dict[str, Any] = {}
        self.record_path = os.environ.get(RECORD_BATCHES_ENV)
        self.point: ResumePoint | None = resume_point(self.cfg.run_uri, spec.start_from, self.cfg.storage)
        """The checkpoint this start restores (the newest complete one; ``jobs.run.resume``)."""
        self.remainder_epoch: int | None = None
        """The resumed epoch when it reads the rows its first part did not train (``ingest.RESUME``)."""
        self.trained: list[np.ndarray] = []
        """The id keys this rank trained in the current epoch (saved with each checkpoint)."""
        self.carried = np.zeros(0, dtype=np.int64)
        """Rank 0: the epoch's rows trained before the checkpoint this start restored."""
        self.stops = StopAgreement(spec.stop, self.rank, self.device, poll_s=STOP_POLL_S)
        """Whether every rank stops after a step (a stop request from the driver, jobs.run.stop)."""
        self.plans = EpochPlans(self)
        """The plan each epoch reads (global batches; re-mined beside the run with remine.overlap)."""
        self.saved_step: int | None = None
        """The step of the newest checkpoint of this run (saved or restored by this start)."""
        self.initial = TrainState()
        """A fresh start's state (``restore`` returns it when there is no checkpoint), known
        before the engine is built, so the first epoch's data can start during the build."""
        self.early: EarlyStart | None = None
        """The first epoch's batches, started ahead (``start_early``)."""
        self.cached: Any = None
        """The cached training set's rows (``pipelines.cached.CachedEpochs``), loaded at first use."""

    def publish(self, event: events.Event) -> None:
        if self.rank == 0 and self.spec.progress is not None:
            self.spec.progress.put(event.record())

    def build(self) -> tuple[Any, torch.nn.Module]:
        """(DeepSpeed engine, loss): identical initial weights on every rank, then distinct
        dropout streams per rank."""
        from clray.models.dual_encoder import DualEncoder
        from clray.models.losses import build_loss
        from clray.models.towers import pad_chunks_to

        seed_everything(self.cfg.run.seed)
        model = pad_chunks_to(DualEncoder(self.cfg.model), self.cfg.data.pad_to_multiple_of).to(self.device)
        # A checkpoint of another worker count loads from its universal form (resume.prepare_elastic).
        universal = bool(self.point and self.point.commit.world_size != self.world and self.point.commit.partitioned)
        engine = build_engine(model, self.cfg, self.schedule.total_steps, load_universal=universal)
        seed_everything(self.cfg.run.seed + 7919 * (self.rank + 1))
        self.peers = peer_processes()
        return engine, build_loss(self.cfg.loss)

    def restore(self, engine: Any) -> TrainState:
        """The state this start begins at: the checkpoint ``jobs.run.resume`` chose (the
        run's newest complete one, or the one the driver named, ``start_from``), or a
        fresh start."""
        point = self.point
        state = self.initial
        if point is not None:
            state, carried = restore_checkpoint(engine, point, self.rank, self.cfg)
            self.saved_step = state.step
            if state.step_in_epoch >= self.schedule.steps_per_epoch:
                # Saved at an epoch's last step: start the next epoch instead of reading this
                # one again only to skip all of it.
                state.next_epoch()
            else:
                self.carried = carried
            if not self.schedule.packed and reads_remainder(point, self.world, self.cfg.data.deterministic):
                self.remainder_epoch = state.epoch
            self.publish(events.ResumedEvent(
                step=state.step, epoch=state.epoch, step_in_epoch=state.step_in_epoch,
                dataset=RESUME if self.remainder_epoch is not None else self.schedule.train_dataset(state.epoch),
                checkpoint=point.uri.rstrip("/").rsplit("/", 1)[-1]))
        # Only the start that restored the donor's checkpoint adopts; a later restart of this
        # run resumes its own checkpoints with what they hold.
        if point is not None and point.foreign and self.spec.adopt_config:
            adopt_config(engine, self.cfg)
            self.publish(events.AdoptedEvent(lr=self.cfg.optim.lr, temperature=self.cfg.model.logit_scale.init_temperature))
        return state

    def next_epoch(self, state: TrainState) -> None:
        state.next_epoch()
        self.trained = []
        self.carried = np.zeros(0, dtype=np.int64)

    def consumed(self) -> np.ndarray:
        """The id keys of this epoch's rows this rank trained (rank 0: with those trained
        before the restored checkpoint), saved with a checkpoint for ``ingest.RESUME``."""
        return np.concatenate([self.carried, *self.trained]) if self.trained else self.carried

    def note_trained(self, batch: dict[str, Any]) -> None:
        if "id_key" in batch:
            self.trained.append(batch["id_key"].reshape(-1).cpu().numpy().astype(np.int64))

    def record_batch(self, state: TrainState, batch: dict[str, Any]) -> None:
        if not self.record_path:
            return
        line = {"rank": self.rank, "pid": os.getpid(), "step": state.step + 1, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                "id_keys": sorted(int(k) for k in batch["id_key"].reshape(-1).tolist()),
                "widths": {k: int(v.shape[-1]) for k, v in batch.items() if k.endswith("_input_ids")}}
        # One short append per line: ranks writing the same file do not interleave lines.
        with open(self.record_path, "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def evaluate(self, engine: Any, state: TrainState) -> events.EvalEvent:
        """Every rank embeds the eval split (see jobs.run.evaluate): a collective step."""
        from clray.jobs.run.evaluate import evaluate

        figures, histograms = evaluate(engine.module, self.cfg, self.eval_shard, self.device, self.bf16)
        evaluation = events.EvalEvent(step=state.step, epoch=state.epoch, metrics=figures,
                                      histograms=histograms or None)
        self.publish(evaluation)
        return evaluation

    def export(self, engine: Any, state: TrainState, figures: dict[str, Any]) -> None:
        """The export (every rank takes part under ZeRO-3), with its model card."""
        if not self.spec.export_dir:
            return
        card = {"run_name": self.cfg.run.name, "train_rows": self.schedule.num_train_rows, "steps": state.step,
                "epochs": state.epoch, "global_batch_size": self.cfg.train.global_batch_size,
                "data": list(self.cfg.data.train),
                "columns": {"anchor": self.cfg.data.anchor.column, "positive": self.cfg.data.positive.column},
                "loss": self.cfg.loss.model_dump(mode="json"),
                "eval": {k: v for k, v in figures.items() if k.startswith("eval/")}}
        if "eval_rows" in figures:
            card["eval_rows"] = figures["eval_rows"]
        export(engine, self.cfg, self.spec.export_dir, self.rank, card=card)
        self.publish(events.ExportedEvent(path=self.spec.export_dir, step=state.step))

    def after_step(self, actions: StepActions, engine: Any, state: TrainState, window: MetricWindow,
                   scale: float, bias: float | None, selection: Selection) -> None:
        """Do what the cadence decided for the step just taken, in the same order on every rank."""
        import ray.train

        metrics: dict[str, Any] = {}
        best = False
        if actions.evaluate:
            evaluation = self.evaluate(engine, state)
            metrics.update(step=state.step, epoch=state.epoch, **evaluation.metrics)
            best = selection.consider(state, evaluation.metrics)
        if actions.log:
            metrics.update(window.reduce(self.cfg.train.global_batch_size))
            window.reset()
            train = events.TrainEvent(
                metrics={k: v for k, v in metrics.items() if k not in ("step", "epoch")},
                step=state.step, epoch=state.epoch, samples_seen=state.samples_seen, temperature=1.0 / scale,
                logit_bias=bias, lr=float(engine.get_lr()[0]))
            self.publish(train)
            metrics = train.record()
            del metrics["event"]
        if selection.metric is not None:
            # What Ray keeps checkpoints by (with the latest): the best states come first.
            metrics[SELECTED] = float(best)
        if actions.checkpoint or best:
            self.checkpoint(engine, state, metrics)
        elif actions.report:
            ray.train.report(metrics or {"step": state.step, "epoch": state.epoch})  # [ray]
        if best:
            self.export(engine, state, metrics)

    def checkpoint(self, engine: Any, state: TrainState, metrics: dict[str, Any] | None = None) -> None:
        save_checkpoint(engine, state, self.rank, metrics or {"step": state.step, "epoch": state.epoch},
                        cfg=self.cfg, steps_per_epoch=self.schedule.steps_per_epoch, consumed=self.consumed())
        self.saved_step = state.step
        self.publish(events.CheckpointEvent(step=state.step))

    def finish(self, engine: Any, state: TrainState, cadence: Cadence, stopped: bool = False) -> None:
        """The end of this start: the end event, a final evaluation when the run is
        complete, the export, and the last report to Ray. A start stopped on request has
        checkpointed where it stopped and leaves the rest (evaluation, export) to the
        start that completes the run."""
        import ray.train

        complete = state.step >= self.schedule.total_steps
        self.publish(events.EndEvent(step=state.step, epoch=state.epoch, complete=complete, stopped=stopped))
        final: dict[str, Any] = {"step": state.step, "epoch": state.epoch}
        if stopped:
            ray.train.report({**final, "final": False, "stopped": True})  # [ray]
            return
        if cadence.evaluate_at_end(state.step):
            final.update(self.evaluate(engine, state).metrics)
        # With select_by the export was written at the best evaluation (see after_step).
        if not cadence.selects or state.best_step is None:
            self.export(engine, state, final)
        ray.train.report({**final, "final": complete})  # [ray]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    try:
        worker = Worker(WorkerSpec.decode(config))
        if worker.point is None:
            worker.start_early(worker.initial)  # a fresh start: its first epoch is known now
        engine, loss_fn = worker.build()
        state = worker.restore(engine)
        worker.start_early(state)  # a resumed start: its epoch is known once restored
    except CheckpointDamagedError:
        raise  # worth a retry: the next attempt restores the checkpoint before
    except Exception as exc:
        # Ray Train's controller (recovery.FailureRelay) does not retry what fails here
        # unless a lost worker explains it: the same config fails the same way again.
        raise SetupError(f"{type(exc).__name__}: {exc}") from exc
    schedule, cfg = worker.schedule, worker.cfg
    cadence = Cadence(cfg.train, schedule, has_eval=worker.eval_shard is not None)
    selection = Selection(cfg.train)
    if cadence.evaluate_at_start(state.step):
        worker.evaluate(engine, state)  # the baseline (a state the run did not train: never selected)
    window = MetricWindow()
    watch_reduction(engine, window.times)
    with watching_peers(worker.peers, worker.rank):
        stopped = _train(worker, engine, loss_fn, state, cadence, selection, window)
    worker.stops.close()
    worker.finish(engine, state, cadence, stopped=stopped)


def _train(worker: Worker, engine: Any, loss_fn: Any, state: TrainState, cadence: Cadence, selection: Selection,
           window: MetricWindow) -> bool:
    """The epochs of this start; True when a stop request ended them early."""
    schedule, cfg = worker.schedule, worker.cfg
    gradcache_chunk = cfg.loss.chunk_size if cfg.loss.gradcache else None
    stopped = False
    while state.step < schedule.end_step and not stopped:
        if not worker.plans.begin(engine, state):
            # stopped while waiting for the epoch's plan: checkpoint here (unless this step has one)
            if worker.saved_step != state.step:
                worker.checkpoint(engine, state)
            return True
        window.reset()
        t0 = time.perf_counter()
        for batch in worker.batches(state):
            t1 = time.perf_counter()
            worker.record_batch(state, batch)
            worker.note_trained(batch)
            engine.module.set_progress(state.step / max(1, schedule.total_steps - 1))
            out, scale, bias = train_step(engine, loss_fn, batch, gradcache_chunk, window.times)
            t2 = time.perf_counter()
            state.advance(cfg.train.global_batch_size)
            window.add({"loss": out.loss.detach().float().item(), **out.metrics}, t1 - t0, t2 - t0)
            with window.times.phase("other"):
                actions = cadence.after(state.step, stop=worker.stops.after_step())
                worker.after_step(actions, engine, state, window, scale, bias, selection)
            if actions.stop and state.step < schedule.end_step:
                stopped = True
                break
            t0 = time.perf_counter()
        if state.step_in_epoch >= schedule.steps_per_epoch:
            worker.next_epoch(state)
    return stopped
