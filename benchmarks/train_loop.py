"""Quickstart step loop, two ways in one run: clray vs a plain single-process torch loop.

clray: `run_training` on a local Ray, N workers running DeepSpeed (ZeRO from the config),
batches streamed by Ray Data, negatives gathered across workers. Its samples/s is the
steady state: the mean over reports after the first (which includes worker start-up).

Reference: one process, the same model, loss, optimizer, global batch and
steps, on tensors preprocessed up front (no data loading at all), using every core
(torch threads = cores). The ratio says what the distributed machinery costs (or wins)
on this machine; on one 2-core box the reference has the advantage of zero
communication and zero data wait.

    .venv/bin/python benchmarks/train_loop.py [--epochs 6] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clray.jobs.config import JobConfig, load_config  # noqa: E402
from clray.jobs.run.engine import warmup_cosine, warmup_steps  # noqa: E402


def plain_loop(cfg: JobConfig, corpus: Path, steps: int) -> dict[str, float]:
    import pyarrow.parquet as pq

    from clray.models.dual_encoder import DualEncoder
    from clray.models.losses import build_loss
    from clray.models.preprocess import preprocess_view

    torch.set_num_threads(os.cpu_count() or 1)
    rows = pq.read_table(sorted((corpus / "train").glob("*.parquet"))).to_pylist()
    rows = [r for r in rows if not r["id"].startswith("bad-")]
    inputs = {
        **preprocess_view(cfg.model.anchor, [r[cfg.data.anchor.column] for r in rows], "anchor"),
        **preprocess_view(cfg.model.positive_tower, [r[cfg.data.positive.column] for r in rows], "positive"),
    }
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    torch.manual_seed(cfg.run.seed)
    model = DualEncoder(cfg.model)
    loss_fn = build_loss(cfg.loss)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps, warmup_steps(cfg, steps), cfg.optim.min_lr_ratio))
    batch_size = cfg.train.global_batch_size
    n = len(rows)

    def step(i: int) -> None:
        idx = torch.randint(0, n, (batch_size,))
        batch = {k: v[idx] for k, v in tensors.items()}
        anchor, positive, scale = model(batch)
        out = loss_fn(anchor, positive, logit_scale=scale)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        schedule.step()

    warm = min(5, steps // 5)
    for i in range(warm):
        step(i)
    started = time.perf_counter()
    for i in range(warm, steps):
        step(i)
    elapsed = time.perf_counter() - started
    return {"samples_per_s": batch_size * (steps - warm) / elapsed, "steps": steps}


def clray_loop(cfg: JobConfig) -> dict[str, float]:
    from clray.jobs.run import run_training

    summary = run_training(cfg)
    events = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"][1:]  # the first window holds start-up
    return {
        "samples_per_s": sum(e["samples_per_s"] for e in train) / len(train),
        "data_wait_fraction": sum(e["data_wait_fraction"] for e in train) / len(train),
        "steps": summary.steps,
        "wall_seconds": summary.wall_seconds,
        "zero_shot_accuracy": summary.eval.get("eval/zero_shot_accuracy", float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    args = parser.parse_args()

    from clray.pipelines.quickstart import write_quickstart_corpus

    with tempfile.TemporaryDirectory(prefix="clray-bench-") as tmp:
        corpus = Path(tmp) / "data"
        write_quickstart_corpus(corpus)
        cfg = load_config(REPO / "configs" / "quickstart.toml", [
            f'data.train="{corpus / "train"}"', f'data.eval="{corpus / "eval"}"',
            f'run.output_dir="{Path(tmp) / "runs"}"', f"train.epochs={args.epochs}",
            f"scaling.num_workers={args.workers}", f"train.zero_stage={args.zero_stage}",
            "train.log_every=5",
        ])
        clray = clray_loop(cfg)
        plain = plain_loop(cfg, corpus, clray["steps"])

    print()
    print(f"quickstart step loop, global batch {cfg.train.global_batch_size}, {clray['steps']} steps, "
          f"{os.cpu_count()} cores")
    print(f"{'':34}{'samples/s':>12}")
    print(f"{'plain torch, 1 process (reference)':34}{plain['samples_per_s']:>12.0f}")
    print(f"{f'clray, {args.workers} Ray Train workers + ZeRO-{args.zero_stage}':34}{clray['samples_per_s']:>12.0f}")
    print(f"ratio clray / reference: {clray['samples_per_s'] / plain['samples_per_s']:.2f}x")
    print(f"clray data-wait fraction of step time: {clray['data_wait_fraction']:.3f}")
    print(f"clray wall time incl. Ray start, data validation, eval, export: {clray['wall_seconds']:.1f} s "
          f"(zero-shot accuracy {clray['zero_shot_accuracy']:.3f})")


if __name__ == "__main__":
    main()
