"""``clray train``: the driver side of a training run.

Order matters: config and data problems are found on the driver, with plain pyarrow,
before Ray starts; then Ray Data counts and quarantines bad rows so the driver can fix
``steps_per_epoch`` for every rank; then the one place that builds the trainer does so.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clray.jobs.config import JobConfig, dump_toml
from clray.jobs.rundir import RunLocation
from clray.jobs.worker import RECORD_BATCHES_ENV, Plan, train_loop_per_worker


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


def worker_env(cfg: JobConfig) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if os.environ.get(RECORD_BATCHES_ENV):
        env[RECORD_BATCHES_ENV] = os.environ[RECORD_BATCHES_ENV]
    return env


def start_ray(needed_cpus: float, env_vars: dict[str, str], verbose: bool = False, dashboard: bool = False) -> None:
    """Connect to RAY_ADDRESS if set, else start a local Ray with at least ``needed_cpus``
    logical CPUs (the job's long-lived workers or actors plus room for Ray Data), so its
    tasks can always schedule; oversubscribing logical CPUs is fine here.

    ``dashboard``: also start Ray's dashboard, which serves the state API. A search needs
    it: Tune kills the trials it stops, and Ray Train's placement-group cleaner asks the
    state API whether the trial's controller died before it frees the trial's resources;
    without it every stopped trial keeps its workers' CPUs reserved for good. The local
    dashboard gets a free loopback port, and the job's processes are told it
    (RAY_API_SERVER_ADDRESS): left to find it themselves, they give up when another Ray
    runs on the machine ("Found multiple active Ray instances"), and the resources leak."""
    import logging

    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(
        include_dashboard=dashboard,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        runtime_env={"env_vars": env_vars},
    )
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        return
    if dashboard:
        from clray.jobs.submit import free_port

        port = free_port()
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
        kwargs["runtime_env"] = {"env_vars": {**env_vars, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed_cpus)), **kwargs)


def init_ray(cfg: JobConfig, verbose: bool = False) -> None:
    """Ray for a training run: training workers hold their CPUs for the whole run, so Ray
    Data needs its own on top or its tasks never schedule."""
    needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.num_cpus
    start_ray(needed, worker_env(cfg), verbose)


def _check_data(cfg: JobConfig) -> tuple[list[str], list[str], Any]:
    """Training files (examples) or the checked plan (packed), and the eval files; every
    problem of both splits in one DataError."""
    from clray.pipelines import DataError, check_schema, resolve_shards
    from clray.pipelines.packed import load_plan

    train_files: list[str] = []
    eval_files: list[str] = []
    packed_plan = None
    problems: list[str] = []
    try:
        if cfg.data.batches == "packed":
            packed_plan = load_plan(
                cfg.data, global_batch_size=cfg.train.global_batch_size, num_workers=cfg.scaling.num_workers,
                storage=cfg.storage,
            )
        else:
            train_files = resolve_shards(cfg.data.train, "data.train", cfg.storage)
            check_schema(train_files, cfg.data, "data.train", cfg.storage)
    except DataError as err:
        problems.extend(err.problems)
    try:
        eval_files = resolve_shards(cfg.data.eval, "data.eval", cfg.storage) if cfg.data.eval else []
        if eval_files:
            check_schema(eval_files, cfg.data.without_negatives(), "data.eval", cfg.storage)
    except DataError as err:
        problems.extend(err.problems)
    if problems:
        raise DataError(problems)
    return train_files, eval_files, packed_plan


def _dataset_config(cfg: JobConfig, names: list[str]) -> Any:
    """Ray Train's ingest settings. Train replaces each dataset's execution options with
    these when it splits it, so data.deterministic's ordered execution is set here."""
    from ray.train import DataConfig

    if not cfg.data.deterministic:
        return DataConfig(datasets_to_split=names)
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=names, execution_options=options)


def _root_cause(exc: BaseException) -> BaseException:
    """Unwrap Ray's wrappers down to the user's own exception."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if failures:
            exc = next(iter(sorted(failures.items())))[1]
            continue
        cause = getattr(exc, "cause", None) or exc.__cause__
        if cause is not None and cause is not exc:
            exc = cause
            continue
        break
    return exc


_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception)): (?P<message>\S.*)$")


def _remote_user_error(exc: BaseException) -> tuple[str, str] | None:
    """The user's exception inside a Ray Data UDF failure, from the remote tracebacks.

    Ray Data re-raises a failing map function as ``UserCodeException("UDF failed ...")``
    and ships the original (e.g. a ``DataError`` naming a bad row of a mined batch) only
    as traceback text, so the last non-Ray ``module.Type: message`` line there is the
    user's error."""
    found = None
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        for line in str(node).splitlines():
            match = _EXCEPTION_LINE.match(line.strip())
            if match and not match["type"].startswith("ray."):
                found = (match["type"].rsplit(".", 1)[-1], match["message"])
        failures = getattr(node, "worker_failures", None)
        node = next(iter(sorted(failures.items())))[1] if failures else getattr(node, "cause", None) or node.__cause__
    return found


def _failure_message(exc: BaseException, log_path: Path | str) -> str:
    rank = None
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank = min(failures)
    root = _root_cause(exc)
    text = str(root).strip().splitlines()
    # Ray prefixes remote errors with a traceback; keep the last line, the user's message.
    last = next((line for line in reversed(text) if line.strip()), type(root).__name__)
    name = type(root).__name__
    if type(root).__module__.startswith("ray.") and (remote := _remote_user_error(exc)) is not None:
        name, last = remote
    where = f"worker rank {rank}" if rank is not None else "the trainer"
    return f"training failed on {where}: {name}: {last}\n  full traceback: {log_path}"


def run_training(
    cfg: JobConfig,
    *,
    verbose: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
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
    train_files, eval_files, packed_plan = _check_data(cfg)

    location = RunLocation(cfg)
    try:
        return _run(cfg, location, train_files, eval_files, packed_plan, started, verbose, on_event, stop_epoch,
                    start_from, adopt_config)
    finally:
        location.close()


def _run(
    cfg: JobConfig,
    location: RunLocation,
    train_files: list[str],
    eval_files: list[str],
    packed_plan: Any,
    started: float,
    verbose: bool,
    on_event: Callable[[dict[str, Any]], None] | None,
    stop_epoch: int | None,
    start_from: str | None = None,
    adopt_config: bool = False,
) -> TrainSummary:
    run_dir = location.local
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    location.sync()

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from clray.pipelines import (
        DataError,
        build_datasets,
        local_shuffle_buffer_size,
        quiet_ray_data,
        steps_per_epoch,
    )
    from clray.pipelines.packed import build_packed_datasets

    init_ray(cfg, verbose)
    quiet_ray_data()
    quarantine_path = str(run_dir / "quarantine.parquet")
    train_datasets: list[Any] = []
    skipped: list[int] = []
    try:
        if packed_plan is not None:
            # The miner validated and quarantined the rows it packed: no pass here.
            packed = build_packed_datasets(
                packed_plan,
                cfg.data,
                cfg.model.anchor,
                cfg.model.positive_tower,
                num_workers=cfg.scaling.num_workers,
                quarantine_path=quarantine_path,
                eval_files=eval_files,
                storage=cfg.storage,
            )
            per_epoch, skipped = packed.steps_per_epoch, packed.skipped_batches
            report, eval_ds, num_rows = packed.report, packed.eval, packed_plan.rows_per_epoch
            train_datasets = packed.train
        else:
            prepared = build_datasets(
                cfg.data,
                cfg.model.anchor,
                cfg.model.positive_tower,
                quarantine_path=quarantine_path,
                seed=cfg.run.seed,
                train_files=train_files,
                eval_files=eval_files,
                storage=cfg.storage,
            )
            per_epoch = steps_per_epoch(prepared.num_train_rows, cfg.train.global_batch_size)
            report, eval_ds, num_rows = prepared.report, prepared.eval, prepared.num_train_rows
            train_datasets = [prepared.train]
    except DataError:
        location.sync()
        raise
    except Exception as exc:  # a Ray Data task failed: surface the user's error, not Ray's
        root = _root_cause(exc)
        raise DataError(f"reading the corpus failed: {type(root).__name__}: {str(root).strip().splitlines()[-1]}") from None

    total = per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    stop_step = stop_epoch * per_epoch if stop_epoch is not None and stop_epoch * per_epoch < total else None
    plan = Plan(
        steps_per_epoch=per_epoch,
        total_steps=total,
        local_shuffle_buffer=None if packed_plan is not None else local_shuffle_buffer_size(cfg.data),
        num_train_rows=num_rows,
        packed=packed_plan is not None,
        num_plans=packed_plan.num_plans if packed_plan is not None else 1,
        stop_step=stop_step,
    )
    datasets = dict(zip(plan.dataset_names, train_datasets, strict=True))
    if on_event:
        event = {"event": "data", "plan": asdict(plan), "quarantined": report.quarantined_rows,
                 "quarantine_path": location.final(report.quarantine_path), "reasons": dict(report.reasons)}
        if packed_plan is not None:
            event["packed"] = {
                "plan_dir": packed_plan.directory,
                "num_plans": packed_plan.num_plans,
                "batches_per_plan": [e.num_batches for e in packed_plan.epochs],
                "skipped_batches": skipped,
                "plan_quarantined_rows": packed_plan.quarantined_rows,
                # More epochs than plans: epoch e trains on plan e % num_plans.
                "cycles_plans": math.ceil(total / per_epoch) > packed_plan.num_plans,
            }
        on_event(event)

    progress = Queue(actor_options={"num_cpus": 0})
    if eval_ds is not None:
        datasets["eval"] = eval_ds
    export_dir = location.path("export")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.model_dump(mode="json"),
            "plan": asdict(plan),
            "progress": progress,
            "has_eval": eval_ds is not None,
            "export_dir": export_dir,
            "start_from": start_from,
            "adopt_config": adopt_config,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        datasets=datasets,
        dataset_config=_dataset_config(cfg, plan.dataset_names),
        run_config=RunConfig(
            name=cfg.run.name,
            **location.run_config_storage(),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = exc

    events: list[dict[str, Any]] = []
    metrics_file = (run_dir / "metrics.jsonl").open("a")

    def drain(timeout: float) -> None:
        try:
            item = progress.get(timeout=timeout)
        except Exception:  # ray.util.queue.Empty on timeout; progress is best-effort
            return
        item = {"time": time.time(), **item}
        events.append(item)
        metrics_file.write(json.dumps(item) + "\n")
        metrics_file.flush()
        if on_event:
            on_event(item)

    thread = threading.Thread(target=fit, name="clray-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            drain(0.5)
        while not progress.empty():
            drain(0.1)
    finally:
        metrics_file.close()

    if "error" in outcome:
        exc = outcome["error"]
        (run_dir / "error.log").write_text("".join(traceback.format_exception(exc)))
        location.sync()
        raise TrainingError(_failure_message(exc, location.path("error.log"))) from None

    # Ray Train V2's Result carries the metrics of the latest *checkpoint* report, so the
    # end-of-run evaluation comes from rank 0's event stream instead.
    train_events = [e for e in events if e.get("event") == "train"]
    eval_events = [e for e in events if e.get("event") == "eval"]
    end_events = [e for e in events if e.get("event") == "end"]
    final = {
        **(train_events[-1] if train_events else {}),
        **(end_events[-1] if end_events else {}),
        **(eval_events[-1] if eval_events else {}),
    }
    resumed = next((e["step"] for e in events if e.get("event") == "resumed"), None)
    summary = TrainSummary(
        run_dir=location.uri,
        steps=int(final.get("step", 0)),
        epochs=int(final.get("epoch", 0)),
        steps_per_epoch=per_epoch,
        train_rows=num_rows,
        quarantined_rows=report.quarantined_rows,
        quarantine_path=location.final(report.quarantine_path),
        quarantine_reasons=dict(report.reasons),
        checkpoints=location.checkpoints(),
        export_dir=location.export_dir(),
        final_train={k: v for k, v in (train_events[-1] if train_events else {}).items() if isinstance(v, (int, float))},
        eval={k: float(v) for k, v in final.items() if k.startswith("eval/")},
        resumed_from_step=resumed,
        wall_seconds=time.perf_counter() - started,
        total_steps=total,
        batches=cfg.data.batches,
        plan_dir=packed_plan.directory if packed_plan is not None else None,
        num_plans=packed_plan.num_plans if packed_plan is not None else 0,
        skipped_batches=skipped,
    )
    (run_dir / "summary.json").write_text(summary.to_json())
    location.sync()
    return summary
