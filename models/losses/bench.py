"""SigLIP ring vs gather on W ranks: one call inside each already-started rank.

For benchmarks (and quick checks on a cluster): every rank of an initialised process
group (gloo or nccl, any launcher) calls :func:`siglip_ring_vs_gather` with the same
arguments; each gets its own timings and peak memory for one forward+backward of the
sigmoid loss in both modes on the same random embeddings, plus how far the two modes'
losses and gradients are apart (they should agree to rounding).

    import torch.distributed as dist
    from clray.models.losses.bench import siglip_ring_vs_gather
    dist.init_process_group(...)
    print(dist.get_rank(), siglip_ring_vs_gather(local_batch=8192, dim=256, block_size=2048))
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
import torch.nn.functional as F

from clray.models.config import LossConfig
from clray.models.distributed import is_distributed, rank, world_size
from clray.models.losses import build_loss
from clray.models.losses.ring import ring_memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if is_distributed():
        torch.distributed.barrier()


def siglip_step(
    mode: str,
    anchor: torch.Tensor,
    positive: torch.Tensor,
    block_size: int = 1024,
    negatives: torch.Tensor | None = None,
) -> dict[str, Any]:
    """One timed SigLIP forward+backward in ``mode`` on fresh leaves of the given embeddings."""
    device = anchor.device
    leaves = [t.detach().clone().requires_grad_() for t in (anchor, positive)]
    neg = None if negatives is None else negatives.detach().clone().requires_grad_()
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    loss_fn = build_loss(LossConfig(type="siglip", mode=mode, block_size=block_size))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    ring_memory.reset()
    _sync(device)
    started = time.perf_counter()
    out = loss_fn(*leaves, neg, logit_scale=scale, logit_bias=bias)
    out.loss.backward()
    _sync(device)
    seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "seconds": seconds,
        "loss": float(out.loss.detach()),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None,
        "peak_ring_bytes": ring_memory.peak,
        "grads": [t.grad for t in leaves] + [scale.grad, bias.grad],
    }


def siglip_ring_vs_gather(
    local_batch: int,
    dim: int = 256,
    block_size: int = 1024,
    hard_negatives: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    warmup: int = 256,
) -> dict[str, Any]:
    """This rank's numbers for SigLIP gather vs ring at ``local_batch`` pairs per rank.

    Call on every rank with the same arguments. Returns ``world``, ``rank``, per mode
    ``seconds``, ``loss``, ``peak_cuda_bytes`` (on CUDA: above what was allocated before
    the step) and ``peak_ring_bytes`` (blocks the ring held), and ``max_grad_diff``: the
    largest absolute difference between the two modes' gradients on this rank.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank())

    def embeddings(rows: int) -> tuple[torch.Tensor, ...]:
        shapes = [(rows, dim), (rows, dim)] + ([(rows, hard_negatives, dim)] if hard_negatives else [])
        return tuple(F.normalize(torch.randn(*s, generator=gen), dim=-1).to(device=device, dtype=dtype) for s in shapes)

    if warmup:
        small = embeddings(min(warmup, local_batch))
        for mode in ("gather", "ring"):
            siglip_step(mode, small[0], small[1], block_size, *small[2:])
    data = embeddings(local_batch)
    results = {mode: siglip_step(mode, data[0], data[1], block_size, *data[2:]) for mode in ("gather", "ring")}
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(results["gather"].pop("grads"), results["ring"].pop("grads"), strict=True)
    )
    return {"world": world_size(), "rank": rank(), **results, "max_grad_diff": diff}
