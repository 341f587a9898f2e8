"""The mining command: config from TOML, Ray for the job, the job's failures as MineError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from clray.jobs.config import ConfigError, apply_overrides, format_pydantic, read_toml
from clray.jobs.runtime import describe_failure, start_ray, worker_env
from clray.pipelines.errors import MineError
from clray.pipelines.mining.config import MineConfig
from clray.pipelines.mining.job import MineSummary, error_log, mine_plans, mining_cpus


def load_mine_config(path: str | Path, overrides: list[str] | None = None) -> MineConfig:
    return validate_mine_config(apply_overrides(read_toml(path), overrides or []), str(path))


def validate_mine_config(raw: dict[str, Any], source: str = "config") -> MineConfig:
    try:
        return MineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, format_pydantic(err)) from None


def run_mining(cfg: MineConfig, *, verbose: bool = False, overwrite: bool = False,
         on_event: Callable[[dict[str, Any]], None] | None = None) -> MineSummary:
    """Run (or resume, or confirm) the mining job on a local Ray or the RAY_ADDRESS cluster."""
    import ray

    def ray_for_mining() -> None:
        start_ray(mining_cpus(cfg), worker_env(use_gpu=True), verbose)

    try:
        return mine_plans(cfg, start_ray=ray_for_mining, overwrite=overwrite, on_event=on_event)
    except ray.exceptions.RayError as exc:
        raise MineError(f"mining failed: {describe_failure(exc)}\n  details: {error_log(cfg)}") from None
