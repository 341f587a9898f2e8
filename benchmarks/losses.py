"""The loss library's memory modes, measured in one run: three tables.

1. Tiled vs full-matrix InfoNCE: peak memory and time of forward + backward of symmetric
   InfoNCE on one process (dim 256, float32, CPU) at global batch 4096, 16384 and 65536.
   Each measurement runs in a fresh subprocess so its peak resident memory (above the
   inputs) is its own. The full matrix is only attempted where its logits, softmax and
   their gradients fit in half the free memory; elsewhere it prints what it would need.
2. GradCache vs the uncached training step of the quickstart text tower at batch 64, 256
   and 1024, chunk 32, with the gather and the tiled loss (``benchmarks/gradcache.py``).
3. SigLIP ring vs all-gather at 2 and 4 workers: per-worker peak memory and step time
   (``benchmarks/siglip_ring.py``).

    .venv/bin/python benchmarks/losses.py [--sections tiled gradcache siglip]
        [--batches 4096 16384 65536] [--block 1024] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIM = 256


def _measure(mode: str, batch: int, block: int) -> dict[str, float]:
    """Runs in the child process: one untimed warm-up at a small size, then the real step."""
    import resource
    import time

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from clray.models.config import LossConfig
    from clray.models.losses import build_loss

    torch.set_num_threads(os.cpu_count() or 1)
    loss_fn = build_loss(LossConfig(symmetric=True, mode=mode, block_size=block))
    gen = torch.Generator().manual_seed(0)

    def step(n: int) -> float:
        anchor = F.normalize(torch.randn(n, DIM, generator=gen), dim=-1).requires_grad_()
        positive = F.normalize(torch.randn(n, DIM, generator=gen), dim=-1).requires_grad_()
        scale = torch.tensor(14.3, requires_grad=True)
        out = loss_fn(anchor.detach().requires_grad_(), positive.detach().requires_grad_(), logit_scale=scale)
        out.loss.backward()
        return float(out.loss)

    step(512)
    import gc

    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    loss = step(batch)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_bytes": max(0, peak - before), "loss": loss}


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _run(mode: str, batch: int, block: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(batch), str(block)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--block", type=int, default=1024, help="tile side (loss.block_size; its default)")
    parser.add_argument("--sections", nargs="+", default=["tiled", "gradcache", "siglip"],
                        choices=["tiled", "gradcache", "siglip"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="the smallest size of each section: a smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batches, args.block = [64], 32
    if args.child:
        mode, batch, block = args.child
        print(json.dumps(_measure(mode, int(batch), int(block))))
        return
    if "tiled" in args.sections:
        _tiled_table(args.batches, args.block)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if "gradcache" in args.sections:
        import gradcache

        sizes = {"batches": (8,), "chunk": 4, "repeats": 1} if args.tiny else {"repeats": 5}
        for loss_mode, block in (("gather", None),) if args.tiny else (("gather", None), ("tiled", 128)):
            print()
            print(gradcache.format_table(gradcache.measure(loss_mode=loss_mode, block_size=block, **sizes)), flush=True)
    if "siglip" in args.sections:
        import siglip_ring

        print()
        worlds, local, block = ([2], 64, 32) if args.tiny else ([2, 4], 4096, 1024)
        siglip_ring.print_table(siglip_ring.run(worlds, local, block), local, block)


def _tiled_table(batches: list[int], block: int) -> None:

    gib = 2**30
    print(f"symmetric InfoNCE forward+backward, dim {DIM}, float32, {os.cpu_count()} CPU cores, tile {block}")
    print(f"{'batch':>7} {'full peak':>10} {'full s':>8} {'tiled peak':>11} {'tiled s':>8} {'memory ratio':>13} {'time ratio':>11}")
    for batch in batches:
        tiled = _run("tiled", batch, block)
        # Full matrix: two [n, n] logits, their softmax and gradients, at 4 bytes each.
        full_need = 6 * batch * batch * 4
        if full_need < 0.5 * _available_bytes():
            full = _run("gather", batch, block)
            assert abs(full["loss"] - tiled["loss"]) < 1e-3 * abs(full["loss"]), (full, tiled)
            print(f"{batch:>7} {full['peak_bytes'] / gib:>9.2f}G {full['seconds']:>8.2f} "
                  f"{tiled['peak_bytes'] / gib:>10.3f}G {tiled['seconds']:>8.2f} "
                  f"{full['peak_bytes'] / max(tiled['peak_bytes'], 1):>12.1f}x "
                  f"{tiled['seconds'] / full['seconds']:>10.2f}x")
        else:
            print(f"{batch:>7} {'no fit':>10} {'-':>8} {tiled['peak_bytes'] / gib:>10.3f}G {tiled['seconds']:>8.2f} "
                  f"  (full matrix needs ~{full_need / gib:.0f}G; {_available_bytes() / gib:.0f}G free)")
    print("memory ratio = full peak / tiled peak; time ratio = tiled time / full time", flush=True)


if __name__ == "__main__":
    main()
