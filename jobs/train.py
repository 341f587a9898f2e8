"""``clray train``: the driver side of a training run.

Order matters: config and data problems are found on the driver, with plain pyarrow,
before Ray starts; then Ray Data counts and quarantines bad rows so the driver can fix
``steps_per_epoch`` for every rank; then the one place that builds the trainer does so.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.config import JobConfig, dump_toml
from jobs.worker import Plan, train_loop_per_worker


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def worker_env(cfg: JobConfig) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def init_ray(cfg: JobConfig, verbose: bool = False) -> None:
    """Connect to RAY_ADDRESS if set, else start a local Ray sized for workers + data."""
    import logging

    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        runtime_env={"env_vars": worker_env(cfg)},
    )
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        return
    # Logical CPUs: training workers hold theirs for the whole run, so Ray Data needs its
    # own on top or its tasks never schedule. Oversubscribing logical CPUs is fine here.
    needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.num_cpus
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), **kwargs)


def _check_data(cfg: JobConfig) -> tuple[list[str], list[str]]:
    from pipelines import check_schema, resolve_shards

    train_files = resolve_shards(cfg.data.train, "data.train")
    eval_files = resolve_shards(cfg.data.eval, "data.eval") if cfg.data.eval else []
    check_schema(train_files, cfg.data, "data.train")
    if eval_files:
        check_schema(eval_files, cfg.data.without_negatives(), "data.eval")
    return train_files, eval_files


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


def _failure_message(exc: BaseException, log_path: Path) -> str:
    rank = None
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank = min(failures)
    root = _root_cause(exc)
    text = str(root).strip().splitlines()
    # Ray prefixes remote errors with a traceback; keep the last line, the user's message.
    last = next((line for line in reversed(text) if line.strip()), type(root).__name__)
    where = f"worker rank {rank}" if rank is not None else "the trainer"
    return f"training failed on {where}: {type(root).__name__}: {last}\n  full traceback: {log_path}"


def _list_checkpoints(run_dir: Path) -> list[str]:
    return sorted(str(p) for p in run_dir.glob("checkpoint_*") if p.is_dir())


def run_training(
    cfg: JobConfig,
    *,
    verbose: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> TrainSummary:
    """Validate data, start Ray, train on N workers, evaluate, export; returns the summary."""
    started = time.perf_counter()
    train_files, eval_files = _check_data(cfg)

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(cfg))

    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from pipelines import (
        DataError,
        build_datasets,
        local_shuffle_buffer_size,
        quiet_ray_data,
        steps_per_epoch,
    )

    init_ray(cfg, verbose)
    quiet_ray_data()
    try:
        prepared = build_datasets(
            cfg.data,
            cfg.model.anchor,
            cfg.model.positive_tower,
            quarantine_path=str(run_dir / "quarantine.parquet"),
            seed=cfg.run.seed,
            train_files=train_files,
            eval_files=eval_files,
        )
    except DataError:
        raise
    except Exception as exc:  # a Ray Data task failed: surface the user's error, not Ray's
        root = _root_cause(exc)
        raise DataError(f"reading the corpus failed: {type(root).__name__}: {str(root).strip().splitlines()[-1]}") from None

    per_epoch = steps_per_epoch(prepared.num_train_rows, cfg.train.global_batch_size)
    total = per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    plan = Plan(
        steps_per_epoch=per_epoch,
        total_steps=total,
        local_shuffle_buffer=local_shuffle_buffer_size(cfg.data),
        num_train_rows=prepared.num_train_rows,
    )
    report = prepared.report
    if on_event:
        on_event({"event": "data", "plan": asdict(plan), "quarantined": report.quarantined_rows,
                  "quarantine_path": report.quarantine_path, "reasons": dict(report.reasons)})

    progress = Queue(actor_options={"num_cpus": 0})
    datasets = {"train": prepared.train}
    if prepared.eval is not None:
        datasets["eval"] = prepared.eval
    export_dir = run_dir / "export"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.model_dump(mode="json"),
            "plan": asdict(plan),
            "progress": progress,
            "has_eval": prepared.eval is not None,
            "export_dir": str(export_dir),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(run_dir.parent),
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
        log_path = run_dir / "error.log"
        exc = outcome["error"]
        log_path.write_text("".join(traceback.format_exception(exc)))
        raise TrainingError(_failure_message(exc, log_path)) from None

    # Ray Train V2's Result carries the metrics of the latest *checkpoint* report, so the
    # end-of-run evaluation comes from rank 0's event stream instead.
    train_events = [e for e in events if e.get("event") == "train"]
    eval_events = [e for e in events if e.get("event") == "eval"]
    final = {**(train_events[-1] if train_events else {}), **(eval_events[-1] if eval_events else {})}
    resumed = next((e["step"] for e in events if e.get("event") == "resumed"), None)
    summary = TrainSummary(
        run_dir=str(run_dir),
        steps=int(final.get("step", 0)),
        epochs=int(final.get("epoch", 0)),
        steps_per_epoch=per_epoch,
        train_rows=prepared.num_train_rows,
        quarantined_rows=report.quarantined_rows,
        quarantine_path=report.quarantine_path,
        quarantine_reasons=dict(report.reasons),
        checkpoints=_list_checkpoints(run_dir),
        export_dir=str(export_dir) if export_dir.exists() else None,
        final_train={k: v for k, v in (train_events[-1] if train_events else {}).items() if isinstance(v, (int, float))},
        eval={k: float(v) for k, v in final.items() if k.startswith("eval/")},
        resumed_from_step=resumed,
        wall_seconds=time.perf_counter() - started,
    )
    (run_dir / "summary.json").write_text(summary.to_json())
    return summary
