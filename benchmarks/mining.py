"""Batch mining cost (pipelines/mining): per-stage times of the whole core on synthetic
384-d teacher embeddings, against sentence-transformers' ``mine_hard_negatives`` itself.

For each size n: a clustered corpus (n/100 Gaussian clusters on the unit sphere), then
``knn`` with ``index="auto"`` (exact below 50k rows, IVF above, nprobe 32), the filtered
``similarity_graph`` (ranks [1, k)), Leiden ``communities`` tuned toward the batch size,
``plan_batches`` (leftover pieces merged with graph-adjacent communities) and
``sample_negatives`` (8 per row, "top"); it prints each stage's seconds, the 1-minute load
average before and after, the IVF recall@10 on 1,000 sampled queries and the mean in-batch
negative similarity of the plan vs a random plan.

Comparison (n <= 100k; its exact search is quadratic): ``sentence_transformers.util.
mine_hard_negatives`` is called on the same vectors. It takes a ``datasets.Dataset`` of
texts and a model, so the anchors are ``"a-<row>"``, the positives ``"p-<row>"`` and the
model is ``PrecomputedModel``, whose encode looks the row's vector up (timed, ~1s), so what
is timed is ST's mining. Settings mirror clray's: the row's own vector is its positive
(dropped like clray's self match), ``range_min=1, range_max=k`` (so it searches k + 1
like clray), ``num_negatives=8``, ``sampling_strategy="top"``, no margin / max_score,
``output_format="n-tuple"`` (one row per anchor), both ``use_faiss=True`` (exact
``IndexFlatIP``) and ``use_faiss=False`` (torch matmul + topk per 16384 queries). The
line ends with the share of ST's negatives that clray also picked. ST does no graph,
communities or batches; its time is ~87% the exact search (cProfile at 50k), the rest
its per-query positive masking and output building. Without ``datasets`` installed
(``pip install datasets``; not a clray dependency) the script says so and times only
ST's search, labelled as such.

    .venv/bin/python benchmarks/mining.py [--tiny] [--sizes 100000 1000000] [--k 32]
        [--batch-size 256] [--no-st]

Measured with the default arguments in ONE run on the 2-core CPU machine with the CPU to
itself (faiss-cpu 1.15.1, igraph 1.0.0, torch 2.13 CPU, sentence-transformers 6.2.0,
datasets 5.2.0), 19 minutes in all:

    == n=100,000 d=384 k=32 batch=256 (corpus made in 2.2s)
    clray mining: total 39.6s  [index build 8.7s  search 21.3s  graph 2.6s  communities 6.9s  batches 0.1s  negatives 0.1s]  (load 1.1 -> 1.3 on 2 cores)
      index IndexIVFFlat recall@10 1.000; 2,097,390 edges; 1,000 communities (typical size 101, 2 Leiden runs); remainder 160 rows; 0 rows short of 8 negatives
      in-batch negative similarity: mined 0.144 vs random 0.000 (356x)
    sentence-transformers mine_hard_negatives (range_min=1 range_max=32 num_negatives=8 top, n-tuple; precomputed embeddings), same k:
      use_faiss=True (IndexFlatIP): 78.7s (of which encode lookup 1.2s; load 1.3 -> 1.6)  clray/ST 0.50; 100,000 rows out, 1.000 of its negatives are among clray's
      use_faiss=False (torch matmul+topk): 102.7s (of which encode lookup 1.1s; load 1.6 -> 1.8)  clray/ST 0.39; 100,000 rows out, 1.000 of its negatives are among clray's

    == n=1,000,000 d=384 k=32 batch=256 (corpus made in 15.1s)
    clray mining: total 743.3s  [index build 77.3s  search 553.1s  graph 28.2s  communities 81.7s  batches 2.2s  negatives 0.8s]  (load 1.6 -> 1.2 on 2 cores)
      index IndexIVFFlat recall@10 0.943; 21,611,621 edges; 10,202 communities (typical size 101, 2 Leiden runs); remainder 64 rows; 0 rows short of 8 negatives
      in-batch negative similarity: mined 0.150 vs random 0.000 (3914x)
    sentence-transformers mine_hard_negatives: not run above 100,000 rows (its exact n x n search grows with n^2: ~100x the 100,000-row time)

Goals: at 100k clray's whole pipeline takes 0.50x the time of mine_hard_negatives with
faiss (0.39x without) and picks the same negatives; 1M finishes in 12.4 min (< 15).
A run while other jobs shared the two cores (load 5 to 14) took 104.6s / 215.7s at 100k
and 34.6 min at 1M: faiss's OpenMP stages suffer most from oversubscription. Both sizes
have natural clusters of ~100 rows with no edges between them, so Leiden stops at that
size (a plateau) below the target 256 and packing merges clusters; 'mined vs random'
similarity is huge because random pairs of 384-d points are near-orthogonal. Search
dominates at 1M (nprobe 32, recall 0.943); `clray mine` splits it over Ray actors
(`mining.search_actors`), and a lower nprobe trades recall for time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

# mine_hard_negatives draws tqdm bars even with verbose=False; keep the report readable
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clray.pipelines.mining import (  # noqa: E402
    batch_stats,
    build_index,
    candidate_mask,
    communities,
    knn_range,
    plan_batches,
    random_plan,
    sample_negatives,
    similarity_graph,
)

DIM = 384
ST_MAX_ROWS = 100_000
"""mine_hard_negatives runs up to this size (exact search: quadratic)."""
NUM_NEGATIVES = 8
"""Mined negatives per row, in clray's run and in mine_hard_negatives'."""


def load() -> str:
    """The 1-minute load average: other processes on this machine slow every timing."""
    return f"{os.getloadavg()[0]:.1f}"


def corpus(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.empty((n, DIM), dtype=np.float32)
    step = 100_000
    for a in range(0, n, step):
        b = min(n, a + step)
        x = centres[rng.integers(0, len(centres), b - a)] + 0.06 * rng.standard_normal((b - a, DIM), dtype=np.float32)
        emb[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return emb


def mine(emb: np.ndarray, k: int, batch_size: int) -> dict:
    n = len(emb)
    t = {}
    t0 = time.perf_counter()
    index = build_index(emb, index="auto")
    t["index build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    nb, sims = knn_range(index, emb, 0, n, k, nprobe=32)
    t["search"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mask = candidate_mask(nb, sims, rank_min=1)
    edges, w = similarity_graph(nb, sims, mask=mask)
    t["graph"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels, info = communities(n, edges, w, target_size=batch_size, seed=0)
    t["communities"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = plan_batches(labels, batch_size, seed=0, edges=edges, weights=w)
    t["batches"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    neg = sample_negatives(nb, sims, mask, NUM_NEGATIVES, "top")
    t["negatives"] = time.perf_counter() - t0
    total = sum(t.values())
    # quality: recall@10 of the index on 1000 queries, in-batch negative similarity
    import faiss

    q = np.random.default_rng(1).choice(n, 1000, replace=False)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(emb)
    _, ref = flat.search(emb[q], 11)
    recall = np.mean([len(np.intersect1d(nb[i, :10], [x for x in r if x != i][:10])) / 10 for i, r in zip(q, ref, strict=True)])
    mined = batch_stats(emb, plan)["mean_negative_sim"]
    rand = batch_stats(emb, random_plan(n, batch_size, seed=0))["mean_negative_sim"]
    return {"times": t, "total": total, "index": type(index).__name__, "recall": recall, "edges": len(edges),
            "communities": info["num_communities"], "typical_size": info["typical_size"],
            "tuning": len(info["history"]), "remainder": plan.num_remainder, "shortfall": neg.shortfall_rows,
            "mined_sim": mined, "random_sim": rand, "negatives": neg.idx}


class PrecomputedModel:
    """Stands in for a SentenceTransformer in ``mine_hard_negatives``: texts are ``"a-<row>"``
    (anchors) and ``"p-<row>"`` (positives) and "encoding" looks the row up in precomputed
    embeddings, so ST's encode cost is a table lookup and what is timed is its mining.
    Provides exactly what the function uses: ``device``, ``encode_query``,
    ``encode_document``, ``get_embedding_dimension`` (faiss path), ``similarity`` (torch
    path) and ``similarity_pairwise`` (positive scores), the last two being ST's cosine
    functions, as a SentenceTransformer with the default ``similarity_fn_name`` has."""

    def __init__(self, emb: np.ndarray):
        import torch
        from sentence_transformers.util import cos_sim, pairwise_cos_sim

        self.emb = emb
        self.device = torch.device("cpu")
        self.similarity = cos_sim
        self.similarity_pairwise = pairwise_cos_sim
        self.encode_seconds = 0.0

    def get_embedding_dimension(self) -> int:
        return self.emb.shape[1]

    def _encode(self, texts, **_kwargs) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.emb[np.fromiter((int(t[2:]) for t in texts), dtype=np.int64, count=len(texts))]
        self.encode_seconds += time.perf_counter() - t0
        return out

    encode_query = _encode
    encode_document = _encode


def st_mine(emb: np.ndarray, k: int, use_faiss: bool, clray_neg: np.ndarray) -> dict:
    """``mine_hard_negatives`` itself on the same rows, with clray's settings: the row's own
    pair is the positive (anchor and positive are the same embedding, so it is ranked first
    and dropped like clray's self match), ranks [1, k) of the rest are the window
    (``range_min=1, range_max=k``: the search asks for k + 1 like clray's), the top
    ``NUM_NEGATIVES`` are taken (``sampling_strategy="top"``), no margin or max_score
    (clray's run has no positive-aware filter), one row per anchor out
    (``output_format="n-tuple"``, like clray's [n, m] array)."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    n = len(emb)
    data = Dataset.from_dict({"anchor": [f"a-{i}" for i in range(n)], "positive": [f"p-{i}" for i in range(n)]})
    model = PrecomputedModel(emb)
    t0 = time.perf_counter()
    out = mine_hard_negatives(data, model, range_min=1, range_max=k, num_negatives=NUM_NEGATIVES,
                              sampling_strategy="top", output_format="n-tuple", use_faiss=use_faiss,
                              faiss_batch_size=16384, batch_size=1024, verbose=False)
    total = time.perf_counter() - t0
    # agreement with clray's negatives (anchors are in row order: all are unique)
    def ids(column: str) -> np.ndarray:  # the Arrow column: iterating the Dataset is slow
        return np.array([int(t[2:]) for t in out.data.column(column).to_pylist()], dtype=np.int64)

    rows = ids("anchor")
    neg = np.stack([ids(f"negative_{j}") for j in range(1, NUM_NEGATIVES + 1)], axis=1)
    same = (neg[:, :, None] == clray_neg[rows][:, None, :]).any(axis=2).mean()
    return {"total": total, "encode": model.encode_seconds, "rows": len(out), "agreement": float(same)}


def st_search(emb: np.ndarray, k: int) -> dict:
    """Fallback without ``datasets``: mine_hard_negatives' top-k search, both of its paths,
    as it runs them (its post-processing is not timed, which favours it)."""
    import faiss
    import torch

    out = {}
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(DIM)
    index.add(emb)
    for i in range(0, len(emb), 16384):
        index.search(emb[i : i + 16384], k + 1)
    out["use_faiss=True (IndexFlatIP)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = torch.from_numpy(emb)
    with torch.no_grad():
        for i in range(0, len(emb), 16384):
            s = x[i : i + 16384] @ x.T  # model.similarity = cosine on normalised vectors
            torch.topk(s, k=k + 1, dim=1)
            del s
    out["use_faiss=False (torch matmul+topk)"] = time.perf_counter() - t0
    return out


def compare_st(emb: np.ndarray, k: int, clray_total: float, clray_neg: np.ndarray) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        print("sentence-transformers mine_hard_negatives: NOT RUN, the `datasets` package is missing "
              "(`pip install datasets` to run it); timing only its top-k search instead, same k:")
        for name, sec in st_search(emb, k).items():
            print(f"  {name}: {sec:.1f}s (SEARCH ONLY, a lower bound)  clray/ST {clray_total / sec:.2f}")
        return
    print(f"sentence-transformers mine_hard_negatives (range_min=1 range_max={k} num_negatives={NUM_NEGATIVES} "
          f"top, n-tuple; precomputed embeddings), same k:")
    for use_faiss, name in ((True, "use_faiss=True (IndexFlatIP)"), (False, "use_faiss=False (torch matmul+topk)")):
        load0 = load()
        r = st_mine(emb, k, use_faiss, clray_neg)
        print(f"  {name}: {r['total']:.1f}s (of which encode lookup {r['encode']:.1f}s; load {load0} -> {load()})  "
              f"clray/ST {clray_total / r['total']:.2f}; {r['rows']:,} rows out, "
              f"{r['agreement']:.3f} of its negatives are among clray's")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--no-st", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="2,000 rows: a smoke test")
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes, args.k, args.batch_size = [2000], 16, 64
    for n in args.sizes:
        t0 = time.perf_counter()
        emb = corpus(n)
        print(f"\n== n={n:,} d={DIM} k={args.k} batch={args.batch_size} (corpus made in {time.perf_counter() - t0:.1f}s)")
        load0 = load()
        r = mine(emb, args.k, args.batch_size)
        stages = "  ".join(f"{name} {sec:.1f}s" for name, sec in r["times"].items())
        print(f"clray mining: total {r['total']:.1f}s  [{stages}]  (load {load0} -> {load()} on {os.cpu_count()} cores)")
        print(f"  index {r['index']} recall@10 {r['recall']:.3f}; {r['edges']:,} edges; {r['communities']:,} communities "
              f"(typical size {r['typical_size']:.0f}, {r['tuning']} Leiden runs); remainder {r['remainder']} rows; "
              f"{r['shortfall']} rows short of {NUM_NEGATIVES} negatives")
        print(f"  in-batch negative similarity: mined {r['mined_sim']:.3f} vs random {r['random_sim']:.3f} "
              f"({r['mined_sim'] / max(r['random_sim'], 1e-9):.0f}x)")
        if args.no_st:
            pass
        elif n <= ST_MAX_ROWS:
            compare_st(emb, args.k, r["total"], r["negatives"])
        else:
            print(f"sentence-transformers mine_hard_negatives: not run above {ST_MAX_ROWS:,} rows (its exact "
                  f"n x n search grows with n^2: ~{(n / ST_MAX_ROWS) ** 2:.0f}x the {ST_MAX_ROWS:,}-row time)")
        del emb


if __name__ == "__main__":
    main()
