"""The mining command: Ray for the job, and the job's failures as MineError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clray.jobs.config.mine import load_mine_config, validate_mine_config
from clray.jobs.runtime import describe_failure, start_ray, worker_env
from clray.pipelines.errors import MineError
from clray.pipelines.mining.config import MineConfig
from clray.pipelines.mining.job import MineSummary, error_log, mine_plans, mining_cpus

__all__ = ["load_mine_config", "run_mining", "validate_mine_config"]


def run_mining(cfg: MineConfig, *, verbose: bool = False, overwrite: bool = False,
               on_event: Callable[[dict[str, Any]], None] | None = None) -> MineSummary:
    """Run (or resume, or confirm) the mining job on a local Ray or the RAY_ADDRESS cluster."""
    import ray

    def ray_for_mining() -> None:
        # a local Ray declares the custom resources the actors ask for; a cluster's nodes do
        wanted: dict[str, float] = {}
        for name, amount in cfg.teacher.resources.items():
            wanted[name] = wanted.get(name, 0) + amount * cfg.teacher.num_actors
        for name, amount in cfg.mining.search_resources.items():
            wanted[name] = wanted.get(name, 0) + amount * (cfg.mining.search_actors or 8)
        start_ray(mining_cpus(cfg), worker_env(use_gpu=True), verbose, resources=wanted)

    try:
        return mine_plans(cfg, start_ray=ray_for_mining, overwrite=overwrite, on_event=on_event)
    except ray.exceptions.RayError as exc:
        raise MineError(f"mining failed: {describe_failure(exc)}\n  details: {error_log(cfg)}") from None
