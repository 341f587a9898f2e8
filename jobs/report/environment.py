"""What a run ran on, recorded once by the driver so its report can say it later.

A report is often read on another machine, weeks later, after upgrades; versions read at
report time would describe the reader's machine, not the run's. So the driver writes
``environment.json`` (``environment(cfg)``) into the run directory when the run starts,
and the report only reads it.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ENVIRONMENT_FILE = "environment.json"
PACKAGES = ("clray", "torch", "ray", "deepspeed", "transformers", "pyarrow", "numpy", "pydantic",
            "sentence-transformers")
"""Distributions whose versions a run records (absent ones are recorded as null)."""


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _clray_commit() -> str | None:
    """The commit of the clray checkout, when clray runs from one (a wheel has none)."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _torch_devices() -> dict[str, Any]:
    """The driver's view of accelerators; workers on other nodes may differ, which is why
    the Ray cluster's resources are recorded too."""
    import torch

    out: dict[str, Any] = {"torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if out["cuda_available"]:
        out["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def _ray_cluster() -> dict[str, Any] | None:
    """The cluster's resources, when this process is connected to Ray (never starts it)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    resources = ray.cluster_resources()
    return {
        "nodes": sum(1 for node in ray.nodes() if node.get("Alive")),
        "CPU": resources.get("CPU", 0.0),
        "GPU": resources.get("GPU", 0.0),
        "memory_gib": round(resources.get("memory", 0.0) / 2**30, 1),
    }


def environment(cfg: Any) -> dict[str, Any]:
    """A JSON-ready record of versions, workers and devices for ``cfg`` (a ``JobConfig``).

    Call it on the driver after Ray is up (so the cluster is recorded) and write it to
    ``RUN_DIR/environment.json``; :func:`clray.jobs.report.build_report` shows it.
    """
    scaling = cfg.scaling
    return {
        "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": socket.gethostname(),
        "working_dir": os.getcwd(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {name: _version(name) for name in PACKAGES},
        "clray_commit": _clray_commit(),
        "workers": {
            "num_workers": scaling.num_workers,
            "cpus_per_worker": scaling.cpus_per_worker,
            "use_gpu": scaling.use_gpu,
            "device": "cuda" if scaling.use_gpu else "cpu",
            "zero_stage": cfg.train.zero_stage,
            "precision": cfg.train.precision,
        },
        "driver_devices": _torch_devices(),
        "ray_cluster": _ray_cluster(),
    }
