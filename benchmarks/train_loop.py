"""Quickstart step loop, two ways in one run: clray vs a plain single-process torch loop.

clray: `run_training` on a local Ray, N workers running DeepSpeed (ZeRO from the config),
batches streamed by Ray Data, negatives gathered across workers. Its samples/s is all
its training samples over its whole training loop (first batch to last step, from the
workers' logs: ``window_steps`` x ``time/wall`` of every train event), and where a step's
time goes (``time/<phase>``).

Reference: one process, the same model, loss, optimizer (fused AdamW where torch has it,
as clray), global batch and steps, on tensors preprocessed up front (no data loading at
all), each batch cut to its longest caption as clray's collate does, using every core
(torch threads = cores); its samples/s is likewise all samples over all steps' time.
Plain DDP: PyTorch's own data parallelism, N processes of one thread each on their share of
the batch, gradients all-reduced over gloo: what the communication alone costs with no
framework, data loading or Ray around it (negatives stay local to each process).
The references run after clray's fit, with its Ray shut down.
Ceiling: the same plain loop on one worker's share of the batch and one thread, times
the worker count: what N workers would reach with no data loading, communication or
framework cost at all (each timed alone; side by side they also share memory bandwidth). The
ratio says what the distributed machinery costs (or wins) on this machine; on one 2-core
box the reference has the advantage of zero communication and zero data wait.

    .venv/bin/python benchmarks/train_loop.py [--epochs 6] [--workers 2] [--repeats 3] [--tiny]

``--tiny`` runs a few steps (tests/test_benchmarks.py): for catching API changes only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clray.jobs.config import JobConfig, load_config  # noqa: E402
from clray.jobs.run.engine import warmup_cosine, warmup_steps  # noqa: E402


def plain_inputs(cfg: JobConfig, corpus: Path) -> dict[str, torch.Tensor]:
    """The corpus's training rows preprocessed up front, once for every reference."""
    import pyarrow.parquet as pq

    from clray.models.preprocess import preprocess_view

    rows = pq.read_table(sorted((corpus / "train").glob("*.parquet"))).to_pylist()
    rows = [r for r in rows if not r["id"].startswith("bad-")]
    inputs = {
        **preprocess_view(cfg.model.anchor, [r[cfg.data.anchor.column] for r in rows], "anchor"),
        **preprocess_view(cfg.model.positive_tower, [r[cfg.data.positive.column] for r in rows], "positive"),
    }
    return {k: torch.from_numpy(v) for k, v in inputs.items()}


def _plain_setup(cfg: JobConfig, tensors: dict[str, torch.Tensor], steps: int, batch_size: int,
                 wrap: Any = None) -> Any:
    """One plain training step of the quickstart model (``wrap``: e.g. DDP around it) on
    batches drawn from ``tensors``; returns the step function."""
    from clray.jobs.run.engine import fused_adamw_supported
    from clray.models.dual_encoder import DualEncoder
    from clray.models.losses import apply_loss, build_loss
    from clray.models.preprocess import trim_padding

    torch.manual_seed(cfg.run.seed)
    model = DualEncoder(cfg.model)
    groups = model.param_groups(cfg.optim.weight_decay)
    model = wrap(model) if wrap else model
    loss_fn = build_loss(cfg.loss)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  fused=fused_adamw_supported("cpu") or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps, warmup_steps(cfg, steps), cfg.optim.min_lr_ratio))
    n = len(next(iter(tensors.values())))

    def step() -> None:
        idx = torch.randint(0, n, (batch_size,))
        batch = trim_padding({k: v[idx] for k, v in tensors.items()})
        out = apply_loss(loss_fn, model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        schedule.step()

    return step


def plain_loop(cfg: JobConfig, tensors: dict[str, torch.Tensor], steps: int, threads: int | None = None,
               batch_size: int | None = None) -> dict[str, float]:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    batch_size = batch_size or cfg.train.global_batch_size
    step = _plain_setup(cfg, tensors, steps, batch_size)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - started
    return {"samples_per_s": batch_size * steps / elapsed, "steps": steps, "seconds": elapsed}


def _ddp_rank(rank: int, world: int, port: int, cfg: JobConfig, tensors: dict[str, torch.Tensor], steps: int,
              out: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    step = _plain_setup(cfg, tensors, steps, cfg.train.global_batch_size // world,
                        wrap=torch.nn.parallel.DistributedDataParallel)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    if rank == 0:
        out.put(time.perf_counter() - started)
    dist.destroy_process_group()


def ddp_loop(cfg: JobConfig, tensors: dict[str, torch.Tensor], steps: int, workers: int) -> dict[str, float]:
    """Plain PyTorch data parallelism: ``workers`` processes of one thread each, each on its
    share of the global batch, gradients all-reduced by DDP over gloo. Negatives stay local
    to each process (clray gathers them across workers; that loss is a small part of a step)."""
    import torch.multiprocessing as mp

    from clray.jobs.runtime import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, workers, port, cfg, tensors, steps, out)) for r in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise SystemExit(f"the DDP reference failed: exit codes {[proc.exitcode for proc in procs]}")
    elapsed = out.get(timeout=10)
    return {"samples_per_s": cfg.train.global_batch_size * steps / elapsed, "steps": steps, "seconds": elapsed}


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    return sorted(runs, key=lambda run: run["samples_per_s"])[len(runs) // 2]


def spread(runs: list[dict[str, float]]) -> str:
    rates = sorted(run["samples_per_s"] for run in runs)
    return f"{len(runs)} runs ({rates[0]:.0f}-{rates[-1]:.0f})"


PHASES = ("data", "forward", "backward", "reduce", "optimizer", "other")


def clray_loop(cfg: JobConfig) -> dict[str, Any]:
    from clray.jobs.run import run_training

    summary = run_training(cfg)
    events = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    steps = sum(e["window_steps"] for e in train)
    seconds = sum(e["window_steps"] * e["time/wall"] for e in train)
    return {
        "samples_per_s": cfg.train.global_batch_size * steps / seconds,
        "seconds": seconds,
        "phases": {p: sum(e["window_steps"] * e[f"time/{p}"] for e in train) / steps for p in PHASES},
        # where the total goes beyond the steady state: the first logged window's data wait
        # (the epoch's Ray Data split starting) and the median window's rate
        "first_window_data_s": train[0]["window_steps"] * train[0]["time/data"],
        "median_window_samples_per_s": cfg.train.global_batch_size / statistics.median(e["time/wall"] for e in train),
        "steps": summary.steps,
        "wall_seconds": summary.wall_seconds,
        "zero_shot_accuracy": summary.eval.get("eval/zero_shot_accuracy", float("nan")),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=None, help="default: the quickstart config's")
    parser.add_argument("--tiny", action="store_true", help="3 steps, no evaluation: a smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each reference; the median counts")
    args = parser.parse_args(argv)

    from clray.pipelines.quickstart import write_quickstart_corpus

    with tempfile.TemporaryDirectory(prefix="clray-bench-") as tmp:
        corpus = Path(tmp) / "data"
        write_quickstart_corpus(corpus)
        overrides = [
            f'data.train="{corpus / "train"}"', f'data.eval="{corpus / "eval"}"',
            f'run.output_dir="{Path(tmp) / "runs"}"', f"train.epochs={args.epochs}",
            f"scaling.num_workers={args.workers}", "train.log_every=5",
        ]
        if args.zero_stage is not None:
            overrides.append(f"train.zero_stage={args.zero_stage}")
        if args.tiny:
            overrides += ["train.max_steps=3", "data.eval=[]"]
        cfg = load_config(REPO / "configs" / "quickstart.toml", overrides)
        clray = clray_loop(cfg)
        import ray

        ray.shutdown()  # the references get the machine to themselves, as they would without clray
        tensors = plain_inputs(cfg, corpus)
        # The references alternate, each run --repeats times, and the median counts: on a
        # 2-core machine one 5-second plain loop moved by a third between runs.
        plains, ddps = [], []
        for _ in range(1 if args.tiny else args.repeats):
            plains.append(plain_loop(cfg, tensors, clray["steps"]))
            ddps.append(ddp_loop(cfg, tensors, clray["steps"], args.workers))
        plain, ddp = median_run(plains), median_run(ddps)
        # One worker's share on one thread, as each clray worker computes it, with nothing
        # else to pay: N of these side by side are the best any N-worker trainer could do.
        share = plain_loop(cfg, tensors, clray["steps"], threads=1,
                           batch_size=cfg.train.global_batch_size // args.workers)
        torch.set_num_threads(os.cpu_count() or 1)

    print()
    print(f"quickstart step loop, global batch {cfg.train.global_batch_size}, {clray['steps']} steps, "
          f"{os.cpu_count()} cores (load {os.getloadavg()[0]:.1f})")
    print(f"{'':40}{'samples/s':>12}{'loop s':>9}")
    print(f"{'plain torch, 1 process (reference)':40}{plain['samples_per_s']:>12.0f}{plain['seconds']:>9.1f}"
          f"   median of {spread(plains)}")
    label = f"plain DDP, {args.workers} processes x 1 thread"
    print(f"{label:40}{ddp['samples_per_s']:>12.0f}{ddp['seconds']:>9.1f}   median of {spread(ddps)}")
    label = f"clray, {args.workers} Ray Train workers + ZeRO-{cfg.train.zero_stage}"
    print(f"{label:40}{clray['samples_per_s']:>12.0f}{clray['seconds']:>9.1f}")
    print(f"ratio clray / reference (total samples over total loop time): "
          f"{clray['samples_per_s'] / plain['samples_per_s']:.2f}x; plain DDP / reference "
          f"{ddp['samples_per_s'] / plain['samples_per_s']:.2f}x; clray / plain DDP "
          f"{clray['samples_per_s'] / ddp['samples_per_s']:.2f}x")
    bound = args.workers * share["samples_per_s"] / plain["samples_per_s"]
    print(f"ceiling: plain torch on one worker's {cfg.train.global_batch_size // args.workers} rows and one thread "
          f"{share['samples_per_s']:.0f} samples/s; {args.workers} such workers with no overhead at all would be "
          f"{bound:.2f}x the reference")
    print("clray step time, ms/step: " + "  ".join(f"{p} {1000 * v:.1f}" for p, v in clray["phases"].items()))
    print(f"clray's first logged window waited {clray['first_window_data_s']:.1f} s for data; its median window ran "
          f"at {clray['median_window_samples_per_s']:.0f} samples/s "
          f"({clray['median_window_samples_per_s'] / plain['samples_per_s']:.2f}x the reference)")
    print(f"clray wall time incl. Ray start, data validation, eval, export: {clray['wall_seconds']:.1f} s "
          f"(zero-shot accuracy {clray['zero_shot_accuracy']:.3f})")
    return {"clray": clray, "plain": plain, "ddp": ddp, "share": share, "bound": bound, "plains": plains, "ddps": ddps}


if __name__ == "__main__":
    main()
