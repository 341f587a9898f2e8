"""Real torch.distributed ranks for tests: loopback gloo groups in spawned processes.

Shared by the tests that compare several ranks against one process (loss equivalence,
GradCache under DeepSpeed). Each spawned worker writes its results to
``out_dir/rank{r}.pt``; :func:`spawn_ranks` waits for all of them, fails the test with
the rank's traceback if one raises, and kills them if a collective hangs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clray.jobs.runtime import free_port as free_port


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo group on loopback, one torch thread per rank (several ranks share the cores)."""
    torch.set_num_threads(1)
    # Pin gloo to loopback (the ranks only talk locally): left to pick an interface from
    # the hostname, connecting took ~10 s longer on the CI VM.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def spawn_ranks(worker: Callable[..., None], args: tuple[Any, ...], world: int, out_dir: Path,
                timeout_s: float) -> list[Any]:
    """Run ``worker(rank, *args)`` in ``world`` processes; return each rank's saved results."""
    ctx = mp.spawn(worker, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):  # raises if a rank failed, with its traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks did not finish within {timeout_s}s (a collective hang?)")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
