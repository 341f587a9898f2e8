"""Re-mining every epoch, sequential against overlapped (``remine.overlap``), in one run.

1. writes the quickstart corpus and mines its first plan of global batches (64 rows, 32
   on each of 2 workers) with a teacher of random weights (the schedule, not the plan's
   quality, is under test);
2. trains the quickstart model on it for ``--epochs`` epochs with ``remine.every_epochs =
   --every``, twice, each with ``clray train`` in a process (and a local Ray) of its own:
   (a) sequential: at every boundary the fit stops, the teacher is exported, the worker
       group is torn down, the plan is mined, and a new fit starts;
   (b) ``remine.overlap = true``: one fit; at a boundary the workers export a teacher and
       train on, the plan is mined beside them (Ray actors on the same machine's CPUs),
       and the workers switch to it at the next boundary;
3. prints each run's wall time (the ``clray train`` command, start to exit), the idle
   time of the training workers at every epoch boundary (the time from the last step of
   one epoch to the first step of the next, less one typical step; from the run's
   metrics.jsonl, which the driver stamps as it hears each step), and the ratios.

    .venv/bin/python benchmarks/remine_overlap.py [--epochs 4] [--every 1] [--workdir DIR] [--tiny]

What the two modes train differs, and the figures say so: an overlapped plan is one
period staler (with every = 1 and 4 epochs, epochs 0-1 train on the first plan, epoch 2
on the plan mined at the start of epoch 1, epoch 3 on the one mined at epoch 2; the
sequential run trains epochs 1, 2, 3 on plans mined at 1, 2, 3), so the overlapped run
mines one plan fewer. On this 2-core machine the mining shares the cores with the
training, which slows the steps taken while it runs; on a cluster it runs on CPU nodes.

``--tiny`` trains 3 epochs overlapped (what overlap needs) and 2 sequential (one boundary
runs every step of sequential re-mining): for catching API changes only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def first_plan(work: Path) -> Path:
    """The quickstart corpus, a random-weight teacher, and the run's first plan."""
    import ray
    import torch

    from clray.jobs.cli import QUICKSTART_CONFIG
    from clray.jobs.config import load_config
    from clray.jobs.mine import run_mining, validate_mine_config
    from clray.models.dual_encoder import DualEncoder
    from clray.models.export import export_model
    from clray.pipelines.quickstart import write_quickstart_corpus

    corpus, teacher, plan = work / "corpus", work / "teacher", work / "plan"
    if plan.is_dir():
        return plan
    write_quickstart_corpus(corpus, bad_rows=0)
    torch.manual_seed(0)
    cfg = load_config(QUICKSTART_CONFIG)
    export_model(DualEncoder(cfg.model).eval(), cfg.model, teacher)
    raw = {
        "data": {"train": str(corpus / "train"), "id_column": "id", "label_column": "label",
                 "anchor": {"column": "image", "kind": "image"}, "positive": {"column": "caption", "kind": "text"}},
        "teacher": {"path": str(teacher), "batch_size": 512},
        "mining": {"batch_size": 64, "num_workers": 2, "epochs": 2, "rank_min": 2, "rank_max": 24},
        "output": {"dir": str(plan)},
    }
    run_mining(validate_mine_config(raw), overwrite=True)
    ray.shutdown()  # each training run below starts a Ray of its own
    return plan


def train(work: Path, plan: Path, name: str, epochs: int, every: int, overlap: bool) -> dict[str, Any]:
    from clray.jobs.cli import QUICKSTART_CONFIG

    overrides = [
        'data.batches="packed"', f'data.train="{plan}"', f'data.eval="{work / "corpus" / "eval"}"',
        f'run.output_dir="{work / "runs"}"', f'run.name="{name}"', "train.global_batch_size=64",
        f"train.epochs={epochs}", "train.log_every=1", f"remine.every_epochs={every}",
        f"remine.overlap={'true' if overlap else 'false'}", "remine.teacher={batch_size=512}",
    ]
    command = [sys.executable, "-m", "clray.jobs.cli", "train", str(QUICKSTART_CONFIG),
               *[a for o in overrides for a in ("--set", o)]]
    log = work / f"{name}.log"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a run directory left there would be resumed
    t0 = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, cwd=work).returncode
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"{name}: clray train exited {code}; see {log}")
    return {"seconds": seconds, **boundaries(work / "runs" / name, every)}


def boundaries(run_dir: Path, every: int) -> dict[str, Any]:
    """Idle time of the workers at each epoch boundary, from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps: dict[int, tuple[int, float]] = {}
    for r in records:
        if r["event"] == "train":
            steps.setdefault(r["step"], (r["epoch"], r["time"]))  # a resumed fit does not repeat steps
    ordered = [steps[s] for s in sorted(steps)]
    pairs = list(zip(ordered, ordered[1:], strict=False))  # consecutive steps: (epoch, time) of each
    typical = statistics.median(b[1] - a[1] for a, b in pairs if a[0] == b[0])
    idle = {b[0]: max(0.0, b[1] - a[1] - typical) for a, b in pairs if a[0] != b[0]}
    return {
        "steps": len(ordered),
        "train_s": ordered[-1][1] - ordered[0][1],
        "step_s": typical,
        "idle": idle,
        "mined": sorted(p.name for p in (run_dir / "mined").glob("epoch-*") if (p / "manifest.json").is_file()),
        "waits": {r["epoch"]: r["waited_s"] for r in records if r["event"] == "plan" and r["mined_at"] is not None},
        "plans": {r["epoch"]: r["mined_at"] for r in records if r["event"] == "plan"},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tiny", action="store_true", help="3 epochs overlapped, 2 sequential: a smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs = 3
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clray-remine-overlap-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = first_plan(work)
    sequential_epochs = 2 if args.tiny else args.epochs
    results = {
        "sequential": train(work, plan, "sequential", sequential_epochs, args.every, overlap=False),
        "overlapped": train(work, plan, "overlapped", args.epochs, args.every, overlap=True),
    }
    for name, r in results.items():
        print(f"== {name}: {json.dumps(r, default=lambda v: round(v, 2))}")
    print(f"\n{'run':<12}{'wall s':>9}{'first..last step s':>20}{'step s':>8}{'plans mined':>13}  idle s at epoch boundaries")
    for name, r in results.items():
        idle = "  ".join(f"{e}:{s:.1f}" for e, s in sorted(r["idle"].items()))
        print(f"{name:<12}{r['seconds']:>9.1f}{r['train_s']:>20.1f}{r['step_s']:>8.3f}{len(r['mined']):>13}  "
              f"{idle}  (sum {sum(r['idle'].values()):.1f})")
    seq, ovl = results["sequential"], results["overlapped"]
    print(f"\noverlapped vs sequential: wall time {ovl['seconds'] / seq['seconds']:.2f}x, "
          f"idle time {sum(ovl['idle'].values()) / max(sum(seq['idle'].values()), 1e-9):.2f}x; "
          f"overlapped plans (epoch: mined at) {ovl['plans']}, waited for (epoch: s) {ovl['waits']}")
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"workdir: {work}")


if __name__ == "__main__":
    main()
