"""SigLIP across workers: ring exchange vs all-gather, per-worker peak memory and step time.

Each configuration runs W fresh gloo processes on this machine (so each rank's peak
resident memory is its own). Every rank holds a fixed local batch of ``--local-batch``
pairs (dim 256, float32) and runs one forward+backward of the sigmoid loss with hard
negatives off, after an untimed warm-up at a small size:

- gather: every rank all-gathers the positives (with gradients) and materialises its
  [local x global] logits, so its memory grows with the number of workers;
- ring: positive blocks travel around the ring of workers by point-to-point exchange,
  tiled inside each block; no rank ever holds more than a few blocks.

    .venv/bin/python benchmarks/siglip_ring.py [--worlds 2 4] [--local-batch 4096] [--block 1024] [--tiny]

On a 2-core machine W=4 oversubscribes the cores, so step times are comparable between
the two modes at one W, not across W.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIM = 256


def _rank(rank: int, world: int, port: int, mode: str, local_batch: int, block: int, out_dir: str) -> None:
    import gc
    import resource
    import time

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from clray.models.config import LossConfig
    from clray.models.losses import build_loss

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    loss_fn = build_loss(LossConfig(type="siglip", mode=mode, block_size=block))
    gen = torch.Generator().manual_seed(1000 + rank)

    def step(n: int) -> float:
        anchor = F.normalize(torch.randn(n, DIM, generator=gen), dim=-1).requires_grad_()
        positive = F.normalize(torch.randn(n, DIM, generator=gen), dim=-1).requires_grad_()
        scale = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        out = loss_fn(anchor, positive, logit_scale=scale, logit_bias=bias)
        out.loss.backward()
        return out.loss.item()

    step(min(256, local_batch))
    gc.collect()
    dist.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    loss = step(local_batch)
    dist.barrier()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"seconds": seconds, "peak_bytes": max(0, peak - before), "loss": loss})
    )
    dist.destroy_process_group()


def measure(mode: str, world: int, local_batch: int, block: int) -> dict[str, float]:
    """Max over ranks of per-rank peak memory growth and step time."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(REPO))
    from clray.jobs.runtime import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank, args=(world, free_port(), mode, local_batch, block, out_dir), nprocs=world, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    return {
        "peak_bytes": max(r["peak_bytes"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
        "loss": sum(r["loss"] for r in ranks) / world,
    }


def run(worlds: list[int], local_batch: int, block: int) -> list[dict[str, float]]:
    rows = []
    for world in worlds:
        gather = measure("gather", world, local_batch, block)
        ring = measure("ring", world, local_batch, block)
        assert abs(gather["loss"] - ring["loss"]) <= 1e-4 * abs(gather["loss"]), (gather, ring)
        rows.append({"world": world, "gather": gather, "ring": ring})
    return rows


def print_table(rows: list[dict], local_batch: int, block: int) -> None:
    mib = 2**20
    print(f"SigLIP forward+backward, {local_batch} pairs per worker, dim {DIM}, float32, "
          f"tile {block}, gloo on {os.cpu_count()} CPU cores; per-worker figures (max over ranks)")
    print(f"{'W':>3} {'global':>7} {'gather peak':>12} {'gather s':>9} {'ring peak':>10} {'ring s':>7} "
          f"{'memory ratio':>13} {'time ratio':>11}")
    for row in rows:
        g, r = row["gather"], row["ring"]
        print(f"{row['world']:>3} {row['world'] * local_batch:>7} {g['peak_bytes'] / mib:>10.0f}M {g['seconds']:>9.2f} "
              f"{r['peak_bytes'] / mib:>8.0f}M {r['seconds']:>7.2f} "
              f"{g['peak_bytes'] / max(r['peak_bytes'], 1):>12.1f}x {r['seconds'] / g['seconds']:>10.2f}x")
    print("memory ratio = gather peak / ring peak; time ratio = ring time / gather time")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--local-batch", type=int, default=4096)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="2 workers, 64 rows each: a smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.worlds, args.local_batch, args.block = [2], 64, 32
    print_table(run(args.worlds, args.local_batch, args.block), args.local_batch, args.block)


if __name__ == "__main__":
    main()
