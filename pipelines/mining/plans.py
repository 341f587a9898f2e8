"""The batch plans of ``clray mine``, made between the search and the write stages: the
filtered graph, its communities, one batch plan (and mined negatives) per epoch, and the
statistics that say how much harder the mined batches are than random ones.

Pure numpy on the embed and search stages' results (``pipelines.mining.stages``; the
embeddings' row numbering, ``Embeddings``, is defined here because every plan is written
in it), seeded from ``mining.seed``: the same embeddings and neighbours always give the
same plans, which is what lets a resumed job write the plans an uninterrupted one would
have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clray.pipelines.mining.batching import (
    BatchPlan,
    communities,
    plan_batches,
    random_plan,
)
from clray.pipelines.mining.config import MiningConfig
from clray.pipelines.mining.core import (
    NegativeSample,
    candidate_mask,
    positive_limit,
    sample_negatives,
    similarity_graph,
)
from clray.pipelines.mining.partition import metis_plan, mutual_mask


@dataclass
class Embeddings:
    """Teacher embeddings of the valid rows, in id order (the row numbering of every
    later stage): ``ids [n]``, ``anchors``/``positives [n, d]`` unit norm, ``labels``."""

    ids: list[str]
    anchors: np.ndarray
    positives: np.ndarray
    labels: np.ndarray | None


@dataclass
class MinedEpoch:
    """One epoch's mining result before it is written: its batch plan (rows of the
    embeddings' numbering), the seed it was drawn with, its mined negatives and how many
    of them were topped up (``_top_up``), so the manifest can report each epoch."""

    epoch: int
    seed: int
    plan: BatchPlan
    negatives: NegativeSample | None
    topped_up: int
    least_similar: int


def _top_up(sample: NegativeSample, emb: Embeddings, pos_sims: np.ndarray, margin: float | None) -> tuple[int, int]:
    """Fill rows short of negatives (their window held too few candidates that pass the
    filter) so every packed row carries the same number: first with the most similar
    rows outside the window that still pass the positive-aware filter (an exact scan of
    those rows only); a row whose positive is so weak that too few rows pass (often a
    noisy pair) gets the least similar rows, which are safe negatives. Returns
    ``(added, added_least_similar)``; both are reported."""
    n, m = sample.idx.shape
    short = np.nonzero(sample.count < m)[0]
    added = fallback = 0
    for c0 in range(0, len(short), 1024):
        rows = short[c0 : c0 + 1024]
        raw = emb.anchors[rows] @ emb.positives.T
        raw[np.arange(len(rows)), rows] = np.nan  # never the row's own positive
        for r, row in enumerate(rows):
            have = sample.idx[row][sample.idx[row] >= 0]
            scores = raw[r].copy()
            scores[have] = np.nan
            free = ~np.isnan(scores)
            limit = positive_limit(pos_sims[row : row + 1], margin)[0] if margin is not None else np.inf
            passing = np.nonzero(free & (scores <= limit))[0]
            need = m - int(sample.count[row])
            best = passing[np.argsort(-scores[passing], kind="stable")[:need]]
            if len(best) < need:
                rest = np.nonzero(free)[0]
                rest = rest[~np.isin(rest, best)]
                extra = rest[np.argsort(scores[rest], kind="stable")[: need - len(best)]]
                fallback += len(extra)
                best = np.concatenate([best, extra])
            slots = slice(int(sample.count[row]), int(sample.count[row]) + len(best))
            sample.idx[row, slots], sample.sims[row, slots] = best, scores[best]
            sample.count[row] += len(best)
            added += len(best)
    return added, fallback


def _negatives(emb: Embeddings, nb: np.ndarray, sims: np.ndarray, mask: np.ndarray, pos_sims: np.ndarray,
               cfg: MiningConfig, seed: int) -> tuple[NegativeSample, tuple[int, int]]:
    sample = sample_negatives(nb, sims, mask, cfg.num_negatives, cfg.negative_strategy, seed=seed)
    return sample, _top_up(sample, emb, pos_sims, cfg.margin)


def _rate(values: np.ndarray) -> float:
    return round(float(values.mean()), 6) if values.size else float("nan")


STATS_MAX_BATCHES = 256
"""Batches per plan the per-plan statistics look at (seeded sample): enough for three
decimals, and bounded on a corpus of millions."""
MUTUAL_TOP = 30
"""A pair counts as mutual top neighbours when each is in the other's top 30 (B3's
skipped ranks: the likeliest false negatives)."""


def _in_batch_false_negatives(emb: Embeddings, plan: BatchPlan, pos_sims: np.ndarray) -> dict[str, float]:
    """Share of in-batch negative pairs (anchor i, positive j) that are likely false
    negatives: the teacher scores them at least as high as i's own positive, and (with
    labels) they share i's label."""
    above = same = pairs = 0
    for batch in plan.batches:
        scores = emb.anchors[batch] @ emb.positives[batch].T
        off = ~np.eye(len(batch), dtype=bool)
        above += int(((scores >= pos_sims[batch][:, None]) & off).sum())
        if emb.labels is not None:
            lab = emb.labels[batch]
            same += int(((lab[:, None] == lab[None, :]) & off).sum())
        pairs += int(off.sum())
    out = {"teacher_above_positive": round(above / max(pairs, 1), 6)}
    if emb.labels is not None:
        out["same_label"] = round(same / max(pairs, 1), 6)
    return out


def top_pairs(nb: np.ndarray, top: int = MUTUAL_TOP) -> np.ndarray:
    """Sorted keys ``i * n + j`` of the pairs that are in each other's top ``top`` neighbours."""
    n = nb.shape[0]
    t = min(top, nb.shape[1])
    rows = np.repeat(np.arange(n, dtype=np.int64), t)
    cols = nb[:, :t].reshape(-1).astype(np.int64)
    ok = cols >= 0
    keys = np.unique(rows[ok] * n + cols[ok])
    reverse = (keys % n) * n + keys // n
    return keys[np.isin(reverse, keys, assume_unique=False)]


def plan_statistics(emb: Embeddings, plan: BatchPlan, pos_sims: np.ndarray, mutual_keys: np.ndarray,
                    seed: int = 0) -> dict[str, float]:
    """What predicts whether a plan trains well, over its global batches (the candidates
    each anchor is scored against): the mean teacher similarity of in-batch negatives,
    the share of in-batch pairs the teacher scores at least as high as the anchor's own
    positive (estimated false negatives) and the share that are mutual top-30 neighbours.
    On at most ``STATS_MAX_BATCHES`` batches (seeded)."""
    batches = plan.batches
    if len(batches) > STATS_MAX_BATCHES:
        pick = np.random.default_rng(seed).choice(len(batches), STATS_MAX_BATCHES, replace=False)
        batches = [batches[i] for i in np.sort(pick)]
    n = len(emb.ids)
    total = above = mutual = pairs = 0.0
    for batch in batches:
        scores = emb.anchors[batch] @ emb.positives[batch].T
        off = ~np.eye(len(batch), dtype=bool)
        total += float(scores[off].sum())
        above += float(((scores >= pos_sims[batch][:, None]) & off).sum())
        keys = (batch[:, None].astype(np.int64) * n + batch[None, :])[off]
        mutual += float(np.isin(keys, mutual_keys).sum())
        pairs += float(off.sum())
    pairs = max(pairs, 1.0)
    return {"negative_similarity": round(total / pairs, 6), "teacher_above_positive": round(above / pairs, 6),
            "mutual_top30": round(mutual / pairs, 6)}


def compare_plans(emb: Embeddings, plan: BatchPlan, baseline: BatchPlan, pos_sims: np.ndarray,
                  mutual_keys: np.ndarray, seed: int) -> dict[str, Any]:
    """``plan_statistics`` of a mined plan beside random batches of the same size."""
    mined = plan_statistics(emb, plan, pos_sims, mutual_keys, seed)
    rand = plan_statistics(emb, baseline, pos_sims, mutual_keys, seed)
    ratio = mined["negative_similarity"] / rand["negative_similarity"] if rand["negative_similarity"] > 0 else None
    return {"mined": mined, "random": rand, "similarity_ratio": None if ratio is None else round(ratio, 3)}


def graph_mask(nb: np.ndarray, sims: np.ndarray, pos_sims: np.ndarray | None, rank_min: int, rank_max: int,
               margin: float, mutual: bool) -> np.ndarray:
    """The kept candidates: rank window, positive-aware margin and (``mutual``) mutual neighbours."""
    mask = candidate_mask(nb, sims, pos_sims, rank_min, rank_max, margin)
    return mutual_mask(nb, mask) if mutual else mask


def _epoch_plans(n: int, edges: np.ndarray, weights: np.ndarray, cfg: MiningConfig) -> tuple[list[BatchPlan], dict]:
    """One batch plan per epoch (seed + epoch) from the graph, by the configured partition."""
    if cfg.partition == "metis":
        plans = [metis_plan(n, edges, weights, cfg.batch_size, cfg.seed + e, groups_per_batch=cfg.groups_per_batch,
                            random_fraction=cfg.random_fraction) for e in range(cfg.epochs)]
        return plans, {"method": "metis", "parts": plans[0].info["parts"],
                       "metis_sizes": plans[0].info["metis_sizes"], "moved": plans[0].info["moved"]}
    labels, comm = communities(n, edges, weights, cfg.target_community_size, seed=cfg.seed)
    plans = [plan_batches(labels, cfg.batch_size, seed=cfg.seed + e, edges=edges, weights=weights)
             for e in range(cfg.epochs)]
    return plans, {"method": "leiden", "count": int(comm.get("num_communities", labels.max() + 1)),
                   "typical_size": round(float(comm["typical_size"]), 3),
                   "resolution": None if comm["resolution"] is None else float(f"{comm['resolution']:.6g}"),
                   "leiden_runs": len(comm["history"])}


def make_plans(emb: Embeddings, nb: np.ndarray, sims: np.ndarray, cfg: MiningConfig, k: int) -> tuple[list[MinedEpoch], dict]:
    """Graph, partition, one batch plan (and negatives) per epoch, and the statistics
    that say how much harder the mined batches are than random ones."""
    n = len(emb.ids)
    pos_sims = np.einsum("ij,ij->i", emb.anchors, emb.positives)
    rank_min, rank_max = min(cfg.rank_min, k - 1), min(cfg.rank_max, k)
    margin_sims = pos_sims if cfg.margin is not None else None
    mask = candidate_mask(nb, sims, margin_sims, rank_min, rank_max, cfg.margin or 0.0)
    graph = mutual_mask(nb, mask) if cfg.mutual else mask
    edges, weights = similarity_graph(nb, sims, mask=graph)
    batch_plans, partition = _epoch_plans(n, edges, weights, cfg)
    plans = []
    for epoch, plan in enumerate(batch_plans):
        seed = cfg.seed + epoch
        negatives, (topped, least) = None, (0, 0)
        if cfg.num_negatives:
            negatives, (topped, least) = _negatives(emb, nb, sims, mask, pos_sims, cfg, seed)
        plans.append(MinedEpoch(epoch=epoch, seed=seed, plan=plan, negatives=negatives, topped_up=topped,
                                least_similar=least))

    mutual_keys = top_pairs(nb)
    per_plan = [compare_plans(emb, p.plan, random_plan(n, cfg.batch_size, seed=p.seed), pos_sims, mutual_keys, p.seed)
                for p in plans]
    first = plans[0].plan
    baseline = random_plan(n, cfg.batch_size, seed=cfg.seed)
    mined_sim = per_plan[0]["mined"]["negative_similarity"]
    random_sim = per_plan[0]["random"]["negative_similarity"]
    stats: dict[str, Any] = {
        "graph": {"edges": int(len(edges)), "mean_degree": round(2 * len(edges) / n, 3),
                  "kept_candidates": int(mask.sum()), "mutual_candidates": int(graph.sum()),
                  "isolated_rows": int(n - len(np.unique(edges))), "window": [rank_min, rank_max],
                  "margin": cfg.margin, "mutual": cfg.mutual},
        "partition": partition,
        "global_batch": {"rows": cfg.batch_size, "num_workers": cfg.num_workers,
                         "local_batch_size": cfg.local_batch_size},
        "plans": per_plan,
        "in_batch_negative_similarity": {
            "mined": round(mined_sim, 6), "random": round(random_sim, 6),
            "ratio": round(mined_sim / random_sim, 3) if random_sim > 0 else None,
        },
        "positive_similarity": round(float(pos_sims.mean()), 6),
    }
    if partition["method"] == "leiden":
        stats["communities"] = {key: v for key, v in partition.items() if key != "method"}
    # Estimated false negatives among in-batch pairs: the mined plan, the plan the same
    # recipe gives without the filter (rank window from 0, no margin), and random batches.
    unfiltered = cfg.model_copy(update={"epochs": 1})
    u_graph = graph_mask(nb, sims, None, 0, rank_max, 0.0, cfg.mutual)
    u_edges, u_weights = similarity_graph(nb, sims, mask=u_graph)
    unfiltered_plan = _epoch_plans(n, u_edges, u_weights, unfiltered)[0][0]
    fn: dict[str, Any] = {"in_batch": {
        "with_filter": _in_batch_false_negatives(emb, first, pos_sims),
        "without_filter": _in_batch_false_negatives(emb, unfiltered_plan, pos_sims),
        "random": _in_batch_false_negatives(emb, baseline, pos_sims),
    }}
    if cfg.num_negatives:
        # The same draw without the filter: rank window from 0 and no positive-aware margin.
        unfiltered = sample_negatives(nb, sims, candidate_mask(nb, sims, None, 0, rank_max), cfg.num_negatives,
                                      cfg.negative_strategy, seed=cfg.seed)
        filtered = plans[0].negatives
        for name, sample in (("with_filter", filtered), ("without_filter", unfiltered)):
            ok = sample.idx >= 0
            rows = np.broadcast_to(np.arange(n)[:, None], sample.idx.shape)[ok]
            entry = {"teacher_above_positive": _rate(sample.sims[ok] >= pos_sims[rows])}
            if emb.labels is not None:
                entry["same_label"] = _rate(emb.labels[sample.idx[ok]] == emb.labels[rows])
            fn[name] = entry
        stats["negatives"] = {"per_row": cfg.num_negatives, "strategy": cfg.negative_strategy,
                              "mean_similarity": round(float(np.nanmean(filtered.sims)), 6),
                              "topped_up": sum(p.topped_up for p in plans),
                              "least_similar_fallback": sum(p.least_similar for p in plans)}
    stats["false_negatives"] = fn
    return plans, stats
