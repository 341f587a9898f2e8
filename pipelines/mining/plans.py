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
    batch_stats,
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


def make_plans(emb: Embeddings, nb: np.ndarray, sims: np.ndarray, cfg: MiningConfig, k: int) -> tuple[list[MinedEpoch], dict]:
    """Graph, communities, one batch plan (and negatives) per epoch, and the statistics
    that say how much harder the mined batches are than random ones."""
    n = len(emb.ids)
    pos_sims = np.einsum("ij,ij->i", emb.anchors, emb.positives)
    rank_min, rank_max = min(cfg.rank_min, k - 1), min(cfg.rank_max, k)
    mask = candidate_mask(nb, sims, pos_sims if cfg.margin is not None else None, rank_min, rank_max,
                          cfg.margin or 0.0)
    edges, weights = similarity_graph(nb, sims, mask=mask)
    labels, comm = communities(n, edges, weights, cfg.target_community_size, seed=cfg.seed)
    plans = []
    for epoch in range(cfg.epochs):
        seed = cfg.seed + epoch
        plan = plan_batches(labels, cfg.batch_size, seed=seed, edges=edges, weights=weights)
        negatives, (topped, least) = None, (0, 0)
        if cfg.num_negatives:
            negatives, (topped, least) = _negatives(emb, nb, sims, mask, pos_sims, cfg, seed)
        plans.append(MinedEpoch(epoch=epoch, seed=seed, plan=plan, negatives=negatives, topped_up=topped,
                                least_similar=least))

    first = plans[0].plan
    baseline = random_plan(n, cfg.batch_size, seed=cfg.seed)
    mined_stats = batch_stats(emb.anchors, first, emb.labels, positives=emb.positives)
    random_stats = batch_stats(emb.anchors, baseline, emb.labels, positives=emb.positives)
    mined_sim, random_sim = mined_stats["mean_negative_sim"], random_stats["mean_negative_sim"]
    stats: dict[str, Any] = {
        "graph": {"edges": int(len(edges)), "mean_degree": round(2 * len(edges) / n, 3),
                  "kept_candidates": int(mask.sum()), "window": [rank_min, rank_max], "margin": cfg.margin},
        "communities": {"count": int(comm.get("num_communities", labels.max() + 1)),
                        "typical_size": round(float(comm["typical_size"]), 3),
                        "resolution": None if comm["resolution"] is None else float(f"{comm['resolution']:.6g}"),
                        "leiden_runs": len(comm["history"])},
        "in_batch_negative_similarity": {
            "mined": round(mined_sim, 6), "random": round(random_sim, 6),
            "ratio": round(mined_sim / random_sim, 3) if random_sim > 0 else None,
        },
        "positive_similarity": round(float(pos_sims.mean()), 6),
    }
    # Estimated false negatives among in-batch pairs: the mined plan, the plan the same
    # graph gives without the filter (rank window from 0, no margin), and random batches.
    unfiltered_mask = candidate_mask(nb, sims, None, 0, rank_max)
    u_edges, u_weights = similarity_graph(nb, sims, mask=unfiltered_mask)
    u_labels, _ = communities(n, u_edges, u_weights, cfg.target_community_size, seed=cfg.seed)
    unfiltered_plan = plan_batches(u_labels, cfg.batch_size, seed=cfg.seed, edges=u_edges, weights=u_weights)
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
