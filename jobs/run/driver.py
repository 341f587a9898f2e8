"""The driver side of a training run.

Order matters: config and data problems are found on the driver, with plain pyarrow,
before Ray starts; then Ray Data counts and quarantines bad rows so the driver can fix
``steps_per_epoch`` for every rank; then the one place that builds the trainer does so,
and the driver relays the workers' events until the fit returns.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from clray.jobs import events
from clray.jobs.config import JobConfig, dump_toml
from clray.jobs.run.commit import prune
from clray.jobs.run.data import RunData, build_run_data, check_data, ingest_config, make_schedule
from clray.jobs.run.errors import CheckpointDamagedError, RunStopped, TrainingError
from clray.jobs.run.ingest import RESUME, TRAIN, RemainderData, ResumableTrain, TrainData
from clray.jobs.run.location import RunLocation
from clray.jobs.run.lock import RunLock
from clray.jobs.run.recovery import FailureRelay, blame
from clray.jobs.run.resume import (
    check_ray_registry,
    check_resumable,
    prepare_elastic,
    resume_point,
    skipped_warnings,
)
from clray.jobs.run.schedule import Schedule
from clray.jobs.run.stop import StopRequests
from clray.jobs.run.summary import TrainSummary, checkpoints_of, summarize
from clray.jobs.run.worker import RECORD_BATCHES_ENV, SELECTED, WorkerSpec, train_loop_per_worker
from clray.jobs.runtime import describe_failure, run_channel, start_ray, training_cpus, worker_env

if TYPE_CHECKING:
    from clray.jobs.run.overlap import OverlapMiner
    from clray.pipelines.spec import DataSpec

OnEvent = Callable[[dict[str, Any]], None]

__all__ = ["OnEvent", "TrainSummary", "TrainingError", "failure_message", "init_ray", "run_training",
           "run_worker_env"]


def run_worker_env(cfg: JobConfig) -> dict[str, str]:
    """The environment of a run's Ray processes (plus the batch recorder, when asked for)."""
    import os

    extra = {RECORD_BATCHES_ENV: os.environ[RECORD_BATCHES_ENV]} if os.environ.get(RECORD_BATCHES_ENV) else {}
    return worker_env(cfg.scaling.use_gpu, extra)


def init_ray(cfg: JobConfig, verbose: bool = False) -> None:
    """A local Ray for the run (or the cluster of RAY_ADDRESS): the training's CPUs and
    custom resources, and with remine.overlap those of the mining beside it."""
    from clray.jobs.run.replan import mining_cpus

    resources = {k: v * cfg.scaling.num_workers for k, v in cfg.scaling.resources_per_worker.items()}
    cpus = training_cpus(cfg)
    if cfg.remine.every_epochs and cfg.remine.overlap:
        cpus += mining_cpus(cfg)
        for key, value in cfg.remine.teacher.get("resources", {}).items():
            resources[key] = resources.get(key, 0) + value * cfg.remine.teacher.get("num_actors", 1)
        for key, value in cfg.remine.mining.get("search_resources", {}).items():
            resources[key] = resources.get(key, 0) + value
    start_ray(cpus, run_worker_env(cfg), verbose, resources=resources)


def run_training(
    cfg: JobConfig,
    *,
    verbose: bool = False,
    on_event: OnEvent | None = None,
    stop_epoch: int | None = None,
    start_from: str | None = None,
    adopt_config: bool = False,
    lock: bool = True,
    overlap: OverlapMiner | None = None,
) -> TrainSummary:
    """Validate data, start Ray, train on N workers, evaluate, export; returns the summary.

    ``stop_epoch``: run only up to the end of that epoch (epochs counted from 1, so
    ``stop_epoch=1`` trains epoch 0), save a checkpoint and the export there and return
    without evaluating. Calling again with the same run name resumes at that boundary
    (e.g. after mining a new plan with the exported model); the LR schedule always spans
    the whole run (``train.epochs``/``train.max_steps``). A stop at or past the run's end
    is a complete run.

    ``start_from``: a checkpoint directory (``checkpoint_<step>``) to start from when this
    run has no complete checkpoint of its own at that step or later: another run's (Tune's
    PBT hands a trial another trial's state this way). With ``adopt_config`` the learning
    rate and temperature of ``cfg`` replace the checkpoint's.

    ``lock``: take the run directory's lock (``jobs.run.lock``) so that a second start of
    the same run is refused while this one runs; a search's trials, which Tune alone
    starts, go without.

    ``overlap``: re-mine beside this fit (``jobs.run.overlap``; remine.overlap).

    Raises ``RunStopped`` when Ctrl-C or SIGTERM stopped the run (with a checkpoint where
    it stopped), ``TrainingError`` when it failed, and another ``RunError`` when it cannot
    start (the run directory, its lock, a checkpoint this config cannot resume).
    """
    started = time.perf_counter()
    if stop_epoch is not None and stop_epoch < 1:
        raise ValueError(f"stop_epoch must be at least 1 (the epochs to train), got {stop_epoch}")
    checked = check_data(cfg)
    location = RunLocation(cfg)
    run_lock = RunLock(location.uri, cfg.storage).acquire() if lock else None
    try:
        with StopRequests() as stops:
            start = _Start(cfg, location, stops, on_event, started, overlap)
            if run_lock is not None and run_lock.warning:
                start.warn(run_lock.warning)
            return start.run(checked, verbose, stop_epoch, start_from, adopt_config)
    finally:
        if overlap is not None:
            overlap.close()
        if run_lock is not None:
            run_lock.release()
        location.close()


class _Start:
    """One start of a run on the driver: what it tells the user and writes, in order."""

    def __init__(self, cfg: JobConfig, location: RunLocation, stops: StopRequests, on_event: OnEvent | None,
                 started: float, overlap: OverlapMiner | None = None) -> None:
        self.cfg = cfg
        self.overlap = overlap
        self.location = location
        self.stops = stops
        self.on_event = on_event
        self.started = started
        self.config_written = False

    def emit(self, record: dict[str, Any]) -> None:
        if self.on_event:
            self.on_event(record)

    def warn(self, message: str) -> None:
        """Tell the user now, and keep it in metrics.jsonl with the run's events."""
        record = {"time": time.time(), **events.WarningEvent(message=message).record()}
        with (self.location.local / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.emit(record)

    def write_config(self) -> None:
        """config.toml is this run's resolved config: written by the first start, and by a
        later one only once it has trained (its first checkpoint or its end), so a start
        that failed never replaces the config the run's checkpoints were made with."""
        if not self.config_written:
            (self.location.local / "config.toml").write_text(dump_toml(self.cfg))
            self.config_written = True

    def prepare_resume(self, start_from: str | None) -> None:
        """Before Ray starts: the checkpoint to resume, refused when this config cannot
        resume it, converted when the worker count changed; and Ray's registry checked."""
        cfg, uri = self.cfg, self.location.uri
        for line in skipped_warnings(uri, cfg.storage):
            self.warn(line)
        point = resume_point(uri, start_from, cfg.storage)
        if point is not None and check_resumable(cfg, point):
            note = prepare_elastic(cfg, point)
            if note:
                self.warn(note)
        _, registry_warning = check_ray_registry(uri, cfg.storage)
        if registry_warning:
            self.warn(registry_warning)

    def run(self, checked: DataSpec, verbose: bool, stop_epoch: int | None, start_from: str | None,
            adopt_config: bool) -> TrainSummary:
        cfg, location = self.cfg, self.location
        self.prepare_resume(start_from)
        if not (location.local / "config.toml").exists() and not location.remote_has("config.toml"):
            self.write_config()
        for line in data_warnings(checked):
            self.warn(line)
        location.sync()
        init_ray(cfg, verbose)
        self.stops.reinstall()  # ray.init put its own SIGTERM handler (a crash dump) in their place
        from clray.jobs.report import ENVIRONMENT_FILE, environment

        (location.local / ENVIRONMENT_FILE).write_text(json.dumps(environment(cfg), indent=2, default=str))
        from clray.pipelines import DataError, quiet_ray_data

        quiet_ray_data()
        try:
            data = build_run_data(cfg, checked, str(location.local / "quarantine.parquet"))
        except DataError:
            location.sync()
            raise
        schedule = make_schedule(cfg, data, stop_epoch)
        self.emit(_data_event(data, schedule, location).record())
        spec = WorkerSpec(job=for_workers(cfg), schedule=schedule, has_eval="eval" in data.datasets,
                          export_dir=location.path("export"), start_from=start_from, adopt_config=adopt_config,
                          packed=data.packed_spec, cached=data.cached)
        if self.overlap is not None:
            spec.board = self.overlap.start(checked, schedule.steps_per_epoch)
        records = _Fit(self, spec, data, checked).run()
        self.write_config()
        end = next((e for e in map(events.parse, reversed(records)) if isinstance(e, events.EndEvent)), None)
        if end is not None and end.stopped:
            location.sync()
            raise RunStopped(self.stops.signal_name or "SIGINT", end.step, location.checkpoint_uri(end.step))
        summary = summarize(cfg, location, data, schedule, records, self.started)
        (location.local / "summary.json").write_text(summary.to_json())
        summary.report = _report(location)  # the report reads summary.json
        location.remove("error.log")  # this start succeeded: no stale failure
        location.sync()
        self.prune()
        summary.checkpoints = checkpoints_of(location)
        (location.local / "summary.json").write_text(summary.to_json())
        location.sync()
        return summary

    def prune(self) -> None:
        """Remove what killed starts left behind (checkpoints never completed or never
        registered by Ray) beyond the newest ``train.keep_checkpoints``."""
        protected, _ = check_ray_registry(self.location.uri, self.cfg.storage)
        prune(self.location.uri, self.cfg.train.keep_checkpoints, protected, self.cfg.storage)


def for_workers(cfg: JobConfig) -> JobConfig:
    """The config the workers get: a local run directory made absolute here, on the driver
    (a worker runs in a working directory of Ray's, where a relative run.output_dir would
    put its checkpoints' commit markers and find no checkpoint to resume)."""
    from pathlib import Path

    from clray.pipelines.storage import is_s3

    if is_s3(cfg.run.output_dir):
        return cfg
    absolute = str(Path(cfg.run.output_dir).expanduser().absolute())
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": absolute})})


def data_warnings(checked: DataSpec) -> list[str]:
    """What the data checks found that does not stop the run (files ignored in a shard
    directory), one line each."""
    return list(checked.warnings)


def _report(location: RunLocation) -> str | None:
    """The run's report.html (jobs.report), rebuilt at the end of every start; a report
    that cannot be built is a warning, never a failed run."""
    import logging

    from clray.jobs.report import build_report

    try:
        return location.final(str(build_report(location.local)))
    except Exception as exc:  # noqa: BLE001 - the run itself succeeded
        logging.getLogger("clray").warning("could not write the run's report.html: %s", exc)
        return None


def _data_event(data: RunData, schedule: Schedule, location: RunLocation) -> events.DataEvent:
    report = data.report
    return events.DataEvent(plan=asdict(schedule), quarantined=report.quarantined_rows,
                            quarantine_path=location.final(report.quarantine_path), reasons=dict(report.reasons),
                            packed=data.packed)


def _trainer(cfg: JobConfig, spec: WorkerSpec, data: RunData, checked: DataSpec, location: RunLocation) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    datasets = _datasets(cfg, spec, data, checked)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.encode(),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {}),
                                  **cfg.scaling.resources_per_worker},
        ),
        datasets=datasets,
        # Every training dataset is split between the ranks; each rank reads all of "eval".
        dataset_config=ingest_config(cfg, [name for name in datasets if name != "eval"]),
        run_config=RunConfig(
            name=cfg.run.name,
            **location.run_config_storage(),
            checkpoint_config=_checkpoint_config(cfg),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[FailureRelay(spec.progress, cfg.train.max_failures)],
            worker_runtime_env={"env_vars": run_worker_env(cfg)},
        ),
    )


def _checkpoint_config(cfg: JobConfig) -> Any:
    """Ray keeps the latest ``keep_checkpoints``; with train.select_by it keeps the ones
    that held the best state (each checkpoint's report says so) beside the latest."""
    from ray.train import CheckpointConfig

    if cfg.train.select_by is None:
        return CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)
    return CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=SELECTED,
                            checkpoint_score_order="max")


def _datasets(cfg: JobConfig, spec: WorkerSpec, data: RunData, checked: DataSpec) -> dict[str, Any]:
    """The trainer's datasets. In examples mode the training data is built by Ray Train's
    controller at every worker-group start, positioned at the epoch the workers resume
    (``jobs.run.ingest``)."""
    datasets = dict(data.datasets)
    if spec.schedule.packed:
        return datasets
    source = ResumableTrain.of(datasets[TRAIN], run_uri=cfg.run_uri, start_from=spec.start_from,
                               storage=cfg.storage, world_size=cfg.scaling.num_workers,
                               deterministic=cfg.data.deterministic, task_cpus=checked.task_cpus)
    if spec.cached is None:
        datasets[TRAIN] = TrainData(source)
    else:
        del datasets[TRAIN]  # every rank reads the cached set itself (pipelines.cached)
    datasets[RESUME] = RemainderData(source)
    return datasets


DAMAGED_RETRIES = 3
"""Fits started again after a checkpoint failed its check on the workers."""


class _Fit:
    """The fit of one start: on a thread, while the main thread relays rank 0's events
    (stamped, to metrics.jsonl and ``on_event``) and forwards a stop request."""

    def __init__(self, start: _Start, spec: WorkerSpec, data: RunData, checked: DataSpec) -> None:
        self.start = start
        self.spec = spec
        self.data = data
        self.checked = checked
        self.records: list[dict[str, Any]] = []

    def run(self) -> list[dict[str, Any]]:
        """Fit; a checkpoint found damaged on the workers (set aside there) is followed by
        a new fit from the one before, a few times at most. A failed fit becomes a
        ``TrainingError`` naming the rank."""
        for _ in range(DAMAGED_RETRIES + 1):
            error = self.fit_once()
            if error is None:
                return self.records
            failure = describe_failure(_unwrap(error))
            if failure.kind != CheckpointDamagedError.__name__:
                break
            self.relay(events.WarningEvent(message=f"{failure.message}").record())
        self.fail(error)
        raise AssertionError("unreachable")

    def fit_once(self) -> BaseException | None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cfg, location, stops = self.start.cfg, self.start.location, self.start.stops
        # On the driver's node: the queues live as long as the run, and one on a worker node
        # would go down with that node, taking the run with it instead of a restart.
        here = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)}
        self.spec.progress, self.spec.stop = run_channel(here)
        overlap = self.start.overlap
        if overlap is not None:
            overlap.post = self.spec.progress.put
        trainer = _trainer(cfg, self.spec, self.data, self.checked, location)
        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                outcome["error"] = exc

        with (location.local / "metrics.jsonl").open("a") as self.metrics_file:
            thread = threading.Thread(target=fit, name="clray-fit", daemon=True)
            stops.training = True
            thread.start()
            try:
                while thread.is_alive():
                    self.drain(0.5)
                    if stops.forward(self.spec.stop):
                        self.relay(events.WarningEvent(
                            message=f"{stops.signal_name}: stopping after the current step and saving a checkpoint "
                            f"(send it again to stop at once)").record())
                while not self.spec.progress.empty():
                    self.drain(0.1)
            finally:
                stops.training = False
        return outcome.get("error")

    def drain(self, timeout: float) -> None:
        try:
            item = self.spec.progress.get(timeout=timeout)
        except Exception:  # queue.Empty on timeout; progress is best-effort
            return
        self.relay(item)

    def relay(self, item: dict[str, Any]) -> None:
        item = {"time": time.time(), **item}
        self.records.append(item)
        self.metrics_file.write(json.dumps(item) + "\n")
        self.metrics_file.flush()
        if item.get("event") in ("checkpoint", "end"):
            self.start.write_config()
        if self.start.overlap is not None:
            self.start.overlap.on_event(item)
        self.start.emit(item)

    def fail(self, exc: BaseException) -> None:
        location = self.start.location
        (location.local / "error.log").write_text("".join(traceback.format_exception(exc)))
        location.sync()
        raise TrainingError(failure_message(_unwrap(exc), location.path("error.log"))) from None


def _unwrap(exc: BaseException) -> BaseException:
    """Ray Train's ControllerError around the controller's own verdict (``GaveUp``)
    becomes that verdict, which carries the workers' errors like a WorkerGroupError."""
    inner = getattr(exc, "controller_failure", None)
    return inner if isinstance(inner, BaseException) and hasattr(inner, "worker_failures") else exc


def failure_message(exc: BaseException, log_path: Any) -> str:
    """What the user reads when a fit failed: the rank and its own error, and where the
    whole traceback is."""
    failures = getattr(exc, "worker_failures", None)
    failure = describe_failure(exc)
    rank = blame(failures)[0] if failures else failure.rank
    if failures and rank in failures:
        failure = describe_failure(_Single(rank, failures[rank]))
    where = f"worker rank {rank}" if rank is not None else "the trainer"
    return f"training failed on {where}: {failure}\n  full traceback: {log_path}"


class _Single(Exception):
    """One rank's failure, shaped as describe_failure reads Ray's worker-group errors."""

    def __init__(self, rank: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.worker_failures = {rank: error}
