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
from dataclasses import asdict, dataclass, field
from typing import Any

from clray.jobs import events
from clray.jobs.config import JobConfig, dump_toml
from clray.jobs.run.data import RunData, build_run_data, check_data, ingest_config, make_schedule
from clray.jobs.run.location import RunLocation
from clray.jobs.run.schedule import Schedule
from clray.jobs.run.worker import RECORD_BATCHES_ENV, SELECTED, WorkerSpec, train_loop_per_worker
from clray.jobs.runtime import describe_failure, start_ray, training_cpus, worker_env

OnEvent = Callable[[dict[str, Any]], None]


class TrainingError(Exception):
    """A run that failed after it started; the message is meant for the user as-is."""


@dataclass
class TrainSummary:
    run_dir: str
    steps: int
    epochs: int
    steps_per_epoch: int
    train_rows: int
    quarantined_rows: int
    quarantine_path: str | None
    quarantine_reasons: dict[str, int]
    checkpoints: list[str]
    export_dir: str | None
    final_train: dict[str, float] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    """The evaluation of the starting model (train.eval_at_start), what ``eval`` is
    compared with; empty when the run was not evaluated at step 0."""
    export_step: int | None = None
    """The step whose state the export holds (with train.select_by, the best one)."""
    report: str | None = None
    resumed_from_step: int | None = None
    wall_seconds: float = 0.0
    total_steps: int = 0
    """Steps of the whole run; ``steps`` is less when this start stopped early (stop_epoch)."""
    batches: str = "examples"
    plan_dir: str | None = None
    """Packed: the `clray mine` plan directory trained on."""
    num_plans: int = 0
    skipped_batches: list[int] = field(default_factory=list)
    """Packed: per epoch plan, the mined batches no worker trained on (so that every rank
    takes the same number of whole batches)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def run_worker_env(cfg: JobConfig) -> dict[str, str]:
    """The environment of a run's Ray processes (plus the batch recorder, when asked for)."""
    import os

    extra = {RECORD_BATCHES_ENV: os.environ[RECORD_BATCHES_ENV]} if os.environ.get(RECORD_BATCHES_ENV) else {}
    return worker_env(cfg.scaling.use_gpu, extra)


def init_ray(cfg: JobConfig, verbose: bool = False) -> None:
    start_ray(training_cpus(cfg), run_worker_env(cfg), verbose)


def run_training(
    cfg: JobConfig,
    *,
    verbose: bool = False,
    on_event: OnEvent | None = None,
    stop_epoch: int | None = None,
    start_from: str | None = None,
    adopt_config: bool = False,
) -> TrainSummary:
    """Validate data, start Ray, train on N workers, evaluate, export; returns the summary.

    ``stop_epoch``: run only up to the end of that epoch (epochs counted from 1, so
    ``stop_epoch=1`` trains epoch 0), save a checkpoint and the export there and return
    without evaluating. Calling again with the same run name resumes at that boundary
    (e.g. after mining a new plan with the exported model); the LR schedule always spans
    the whole run (``train.epochs``/``train.max_steps``). A stop at or past the run's end
    is a complete run.

    ``start_from``: a checkpoint directory (``checkpoint_<step>``) to start from when this
    run has no checkpoint of its own at that step or later: another run's (Tune's PBT hands
    a trial another trial's state this way), or one of this run's own that Ray Train had
    not yet registered when the run was stopped (a search resumes the state its scheduler
    saw). With ``adopt_config`` the learning rate and temperature of ``cfg`` replace the
    checkpoint's.
    """
    started = time.perf_counter()
    if stop_epoch is not None and stop_epoch < 1:
        raise ValueError(f"stop_epoch must be at least 1 (the epochs to train), got {stop_epoch}")
    checked = check_data(cfg)
    location = RunLocation(cfg)
    try:
        (location.local / "config.toml").write_text(dump_toml(cfg))
        location.sync()
        init_ray(cfg, verbose)
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
        if on_event:
            on_event(_data_event(data, schedule, location).record())
        spec = WorkerSpec(job=cfg, schedule=schedule, has_eval="eval" in data.datasets,
                          export_dir=location.path("export"), start_from=start_from, adopt_config=adopt_config,
                          packed=data.packed_spec)
        records = _fit(cfg, spec, data, location, on_event)
        summary = _summarize(cfg, location, data, schedule, records, started)
        (location.local / "summary.json").write_text(summary.to_json())
        summary.report = _report(location)  # the report reads summary.json
        (location.local / "summary.json").write_text(summary.to_json())
        location.sync()
        return summary
    finally:
        location.close()


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


def _trainer(cfg: JobConfig, spec: WorkerSpec, data: RunData, location: RunLocation) -> Any:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.encode(),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        datasets=data.datasets,
        dataset_config=ingest_config(cfg, spec.schedule.dataset_names),
        run_config=RunConfig(
            name=cfg.run.name,
            **location.run_config_storage(),
            checkpoint_config=_checkpoint_config(cfg),
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


def _fit(cfg: JobConfig, spec: WorkerSpec, data: RunData, location: RunLocation,
         on_event: OnEvent | None) -> list[dict[str, Any]]:
    """Fit on a thread while relaying rank 0's events (stamped, to metrics.jsonl and
    ``on_event``); returns them. A failed fit becomes a TrainingError naming the rank."""
    from ray.util.queue import Queue

    spec.progress = Queue(actor_options={"num_cpus": 0})
    trainer = _trainer(cfg, spec, data, location)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = exc

    records: list[dict[str, Any]] = []
    with (location.local / "metrics.jsonl").open("a") as metrics_file:

        def drain(timeout: float) -> None:
            try:
                item = spec.progress.get(timeout=timeout)
            except Exception:  # ray.util.queue.Empty on timeout; progress is best-effort
                return
            item = {"time": time.time(), **item}
            records.append(item)
            metrics_file.write(json.dumps(item) + "\n")
            metrics_file.flush()
            if on_event:
                on_event(item)

        thread = threading.Thread(target=fit, name="clray-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            drain(0.5)
        while not spec.progress.empty():
            drain(0.1)

    if "error" in outcome:
        exc = outcome["error"]
        (location.local / "error.log").write_text("".join(traceback.format_exception(exc)))
        location.sync()
        raise TrainingError(failure_message(exc, location.path("error.log"))) from None
    return records


def failure_message(exc: BaseException, log_path: Any) -> str:
    """What the user reads when a fit failed: the rank and its own error, and where the
    whole traceback is."""
    failure = describe_failure(exc)
    where = f"worker rank {failure.rank}" if failure.rank is not None else "the trainer"
    return f"training failed on {where}: {failure}\n  full traceback: {log_path}"


def _baseline(location: RunLocation, evals: list[events.EvalEvent]) -> dict[str, float]:
    """The step-0 evaluation: this start's, or for a resumed run the first start's, from
    the run's metrics.jsonl (appended to by every start)."""
    if evals and evals[0].step == 0:
        return evals[0].figures
    path = location.local / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "eval" and record.get("step") == 0:
                return events.parse(record).figures
    return {}


def _summarize(cfg: JobConfig, location: RunLocation, data: RunData, schedule: Schedule,
               records: list[dict[str, Any]], started: float) -> TrainSummary:
    # Ray Train V2's Result carries the metrics of the latest *checkpoint* report, so the
    # end-of-run evaluation comes from rank 0's event stream instead.
    typed = [events.parse(r) for r in records]
    train = [e for e in typed if isinstance(e, events.TrainEvent)]
    evals = [e for e in typed if isinstance(e, events.EvalEvent)]
    ends = [e for e in typed if isinstance(e, events.EndEvent)]
    resumed = next((e.step for e in typed if isinstance(e, events.ResumedEvent)), None)
    exported = [e for e in typed if isinstance(e, events.ExportedEvent)]
    last = ends[-1] if ends else (train[-1] if train else None)
    report = data.report
    return TrainSummary(
        run_dir=location.uri,
        steps=int(last.step) if last else 0,
        epochs=int(last.epoch) if last else 0,
        steps_per_epoch=schedule.steps_per_epoch,
        train_rows=data.num_rows,
        quarantined_rows=report.quarantined_rows,
        quarantine_path=location.final(report.quarantine_path),
        quarantine_reasons=dict(report.reasons),
        checkpoints=location.checkpoints(),
        export_dir=location.export_dir(),
        final_train={k: v for k, v in (train[-1].record() if train else {}).items() if isinstance(v, (int, float))},
        eval=evals[-1].figures if evals else {},
        baseline=_baseline(location, evals),
        export_step=exported[-1].step if exported else None,
        resumed_from_step=resumed,
        wall_seconds=time.perf_counter() - started,
        total_steps=schedule.total_steps,
        batches=cfg.data.batches,
        plan_dir=data.packed["plan_dir"] if data.packed else None,
        num_plans=data.packed["num_plans"] if data.packed else 0,
        skipped_batches=data.skipped_batches,
    )
