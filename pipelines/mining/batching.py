"""Communities of the filtered similarity graph and the batch plans packed from them,
with the statistics that compare plans (the kNN search, graph and negatives they build
on: ``pipelines.mining.core``, whose conventions hold here too).

Every function takes and returns numpy arrays, is deterministic given its ``seed`` and
raises ``ValueError`` naming the parameter on bad input.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from clray.pipelines.mining.core import check_embeddings, check_int

# ----------------------------------------------------------------------------- communities


def _leiden(graph, weights, resolution: float, seed: int, n_iterations: int, backend: str) -> np.ndarray:
    import igraph as ig

    if backend == "leidenalg":
        import leidenalg as la

        part = la.find_partition(graph, la.CPMVertexPartition, weights=weights, resolution_parameter=resolution,
                                 n_iterations=n_iterations, seed=seed)
        return np.asarray(part.membership, dtype=np.int64)
    rng = random.Random(seed)
    ig.set_random_number_generator(rng)
    try:
        part = graph.community_leiden(objective_function="CPM", weights=weights, resolution=resolution,
                                      n_iterations=n_iterations)
    finally:
        ig.set_random_number_generator(random)
    return np.asarray(part.membership, dtype=np.int64)


def _typical_size(labels: np.ndarray, connected: np.ndarray) -> float:
    """Size of the community of an average connected node (size-weighted mean size)."""
    sizes = np.bincount(labels)
    per_node = sizes[labels[connected]]
    return float(per_node.mean()) if len(per_node) else 1.0


def communities(
    n: int,
    edges: np.ndarray,
    weights: np.ndarray,
    target_size: int,
    seed: int = 0,
    *,
    resolution: float | None = None,
    tuning_rounds: int = 5,
    tolerance: float = 0.25,
    n_iterations: int = 2,
    backend: str = "igraph",
) -> tuple[np.ndarray, dict]:
    """Leiden communities (CPM objective) of the weighted graph, sized near ``target_size``.

    CPM's resolution is a density threshold: a community of size s whose members have
    about D weight of edges each holds together while s < D / resolution, so the first
    guess is ``mean weighted degree / target_size``; then up to ``tuning_rounds`` geometric
    bisection steps move it until the size-weighted mean community size of connected
    nodes is within ``tolerance`` (relative) of the target, or two successive sizes differ
    by under 2% (a plateau: the graph's clusters cap the size). A given ``resolution`` skips
    the tuning. ``backend``: "igraph" (igraph's C Leiden, fast) or "leidenalg".
    Returns ``(labels [n] int64 in 0..C-1, info)``; isolated nodes are singletons.
    """
    import igraph as ig

    n = check_int(n, "n", 1)
    target_size = check_int(target_size, "target_size", 1)
    if backend not in ("igraph", "leidenalg"):
        raise ValueError(f"backend must be 'igraph' or 'leidenalg', got {backend!r}")
    edges, weights = _check_graph(n, edges, weights)
    if resolution is not None and not (float(resolution) > 0):
        raise ValueError(f"resolution must be > 0, got {resolution!r}")
    check_int(tuning_rounds, "tuning_rounds", 0)
    # CPM needs non-negative weights; similarities below 0 are tiny positive weights
    w = np.maximum(weights, 1e-6)
    graph = ig.Graph(n=n, edges=edges.astype(np.int64))
    degree = np.bincount(edges.ravel(), minlength=n) if edges.size else np.zeros(n, dtype=np.int64)
    connected = degree > 0
    wdeg = np.bincount(edges.ravel(), weights=np.repeat(w, 2), minlength=n) if edges.size else np.zeros(n)
    history: list[tuple[float, float]] = []
    if not connected.any():
        return np.arange(n, dtype=np.int64), {"resolution": None, "history": history, "typical_size": 1.0}

    def run(res: float) -> tuple[np.ndarray, float]:
        labels = _leiden(graph, w.tolist(), res, seed, n_iterations, backend)
        size = _typical_size(labels, connected)
        history.append((res, size))
        return labels, size

    if resolution is not None:
        res = float(resolution)
        labels, size = run(res)
    else:
        res, labels, size = _tune_resolution(run, float(wdeg[connected].mean()) / target_size, target_size,
                                             tuning_rounds, tolerance)
    # renumber 0..C-1 in order of first appearance (deterministic)
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    labels = rank[inv]
    return labels, {"resolution": res, "history": history, "typical_size": size,
                    "num_communities": int(labels.max()) + 1}


def _check_graph(n: int, edges: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(edges, weights as float64)`` after checking the graph's shapes and node ids."""
    edges = np.asarray(edges)
    if edges.ndim != 2 or edges.shape[1] != 2 or (edges.size and not np.issubdtype(edges.dtype, np.integer)):
        raise ValueError(f"edges must be an int array [E, 2], got shape {edges.shape}")
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"edges must hold node ids in [0, {n}), got [{edges.min()}, {edges.max()}]")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (edges.shape[0],):
        raise ValueError(f"weights must have shape ({edges.shape[0]},), got {weights.shape}")
    return edges, weights


def _tune_resolution(
    run: Callable[[float], tuple[np.ndarray, float]], res: float, target_size: int, tuning_rounds: int,
    tolerance: float,
) -> tuple[float, np.ndarray, float]:
    """Geometric bisection of the CPM resolution from ``res`` (see ``communities``):
    ``run(resolution)`` gives the labels and typical size; returns the best
    ``(resolution, labels, size)`` tried."""
    labels, size = run(res)
    lo, hi = None, None  # lo: resolution giving too-large communities, hi: too small
    best = (abs(math.log(size / target_size)), res, labels, size)
    for _ in range(tuning_rounds):
        if abs(size / target_size - 1.0) <= tolerance:
            break
        if size > target_size:
            lo = res
            res = res * 4.0 if hi is None else math.sqrt(lo * hi)
        else:
            hi = res
            res = res / 4.0 if lo is None else math.sqrt(lo * hi)
        prev = size
        labels, size = run(res)
        score = abs(math.log(size / target_size))
        if score < best[0]:
            best = (score, res, labels, size)
        if abs(size / prev - 1.0) < 0.02:
            break  # a plateau (e.g. disconnected clusters smaller than the target)
    _, res, labels, size = best
    return res, labels, size


# ----------------------------------------------------------------------------- batch plans


@dataclass
class BatchPlan:
    """A batch plan: ``batches`` of exactly ``batch_size`` row ids each, and the
    ``remainder`` rows (fewer than ``batch_size``; n mod batch_size of them) that did not
    fill a batch. Together they hold every row exactly once."""

    batches: list[np.ndarray]
    remainder: np.ndarray
    batch_size: int
    info: dict = field(default_factory=dict)

    @property
    def num_remainder(self) -> int:
        return int(len(self.remainder))


def _chain_pieces(pieces: list[np.ndarray], piece_comm: list[int], labels: np.ndarray, edges: np.ndarray,
                  weights: np.ndarray | None) -> list[np.ndarray]:
    """Order pieces (already largest first) so that each is followed, where possible, by
    the unplaced piece whose community it has the most edge weight to."""
    comm_to_piece = {c: i for i, c in enumerate(piece_comm)}
    nc = int(labels.max()) + 1
    has_piece = np.zeros(nc, dtype=bool)
    has_piece[piece_comm] = True
    lu, lv = labels[edges[:, 0]], labels[edges[:, 1]]
    w = np.ones(len(edges)) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = (lu != lv) & has_piece[lu] & has_piece[lv]
    lu, lv, w = lu[keep], lv[keep], w[keep]
    key = np.concatenate([lu, lv]) * nc + np.concatenate([lv, lu])
    uniq, inv = np.unique(key, return_inverse=True)
    tot = np.bincount(inv, weights=np.concatenate([w, w]))
    src, dst = uniq // nc, uniq % nc
    order = np.lexsort((-tot, src))  # per community, strongest neighbour first
    adj: dict[int, list[int]] = {}
    for s_, d_ in zip(src[order].tolist(), dst[order].tolist(), strict=True):
        adj.setdefault(s_, []).append(comm_to_piece[d_])
    placed = np.zeros(len(pieces), dtype=bool)
    out: list[np.ndarray] = []
    largest = 0
    cur = None
    while len(out) < len(pieces):
        if cur is None:
            while placed[largest]:
                largest += 1
            cur = largest
        placed[cur] = True
        out.append(pieces[cur])
        cur = next((j for j in adj.get(piece_comm[cur], ()) if not placed[j]), None)
    return out


def plan_batches(labels: np.ndarray, batch_size: int, seed: int = 0, *, edges: np.ndarray | None = None,
                 weights: np.ndarray | None = None) -> BatchPlan:
    """Pack communities (``labels [n]``, e.g. from ``communities``) into batches of exactly
    ``batch_size`` so that members of a community share batches as much as possible.

    Each community's rows are shuffled (seeded) and cut into whole batches; what is left of
    each community (a piece smaller than a batch) is laid out largest piece first in one
    stream that is cut every ``batch_size`` rows, so a piece is split over at most two
    batches and small communities merge. With the graph (``edges [E, 2]``, optional
    ``weights``), each piece in the stream is followed by the unplaced piece of the
    community it is most connected to (else the next largest), so merged communities are
    graph-adjacent. The stream's last partial batch is the
    ``remainder``. Batch order is shuffled (seeded)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("labels must be a non-empty 1-d array of non-negative community ids")
    batch_size = check_int(batch_size, "batch_size", 1)
    rng = np.random.default_rng(seed)
    n = len(labels)
    # a random permutation, then stable sort by (community): rows grouped, shuffled within
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    sizes = np.bincount(labels)
    comm_ids = np.nonzero(sizes)[0]
    starts = np.concatenate([[0], np.cumsum(sizes[comm_ids])[:-1]])
    batches: list[np.ndarray] = []
    pieces: list[np.ndarray] = []
    piece_comm: list[int] = []
    if edges is not None:
        edges = np.asarray(edges)
        if edges.ndim != 2 or edges.shape[1] != 2 or (edges.size and (edges.min() < 0 or edges.max() >= n)):
            raise ValueError(f"edges must be an int array [E, 2] of row ids in [0, {n})")
        if weights is not None and np.shape(weights) != (len(edges),):
            raise ValueError(f"weights must have shape ({len(edges)},), got {np.shape(weights)}")
    comm_order = rng.permutation(len(comm_ids))
    for j in comm_order:
        s0, sz = starts[j], sizes[comm_ids[j]]
        rows = order[s0 : s0 + sz]
        full = sz // batch_size
        for b in range(full):
            batches.append(rows[b * batch_size : (b + 1) * batch_size])
        if sz - full * batch_size:
            pieces.append(rows[full * batch_size :])
            piece_comm.append(int(comm_ids[j]))
    whole = len(batches)
    by_size = sorted(range(len(pieces)), key=lambda i: -len(pieces[i]))  # stable: ties keep the shuffled order
    pieces, piece_comm = [pieces[i] for i in by_size], [piece_comm[i] for i in by_size]
    if edges is not None and len(edges) and pieces:
        pieces = _chain_pieces(pieces, piece_comm, labels, edges.astype(np.int64), weights)
    stream = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    nfull = len(stream) // batch_size
    for b in range(nfull):
        batches.append(stream[b * batch_size : (b + 1) * batch_size])
    remainder = stream[nfull * batch_size :]
    batches = [batches[i].astype(np.int64) for i in rng.permutation(len(batches))]
    return BatchPlan(batches=batches, remainder=remainder.astype(np.int64), batch_size=batch_size,
                     info={"whole_community_batches": whole, "packed_batches": nfull,
                           "communities": len(comm_ids), "remainder": int(len(remainder))})


def random_plan(n: int, batch_size: int, seed: int = 0) -> BatchPlan:
    """Batches of a seeded random permutation (the baseline); the last n mod batch_size
    rows are the remainder."""
    n = check_int(n, "n", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    nfull = n // batch_size
    return BatchPlan(batches=[perm[b * batch_size : (b + 1) * batch_size] for b in range(nfull)],
                     remainder=perm[nfull * batch_size :], batch_size=batch_size, info={"random": True})


# ----------------------------------------------------------------------------- statistics


def batch_stats(embeddings: np.ndarray, batches, labels: np.ndarray | None = None,
                positives: np.ndarray | None = None) -> dict:
    """Mean teacher similarity of in-batch negatives (all ordered pairs within a batch,
    self excluded) over a plan (a ``BatchPlan`` or a list of row-id arrays); with ``labels``,
    also the estimated false-negative rate: the fraction of those pairs sharing a label.

    With ``positives`` (the other view, row-aligned), a pair (i, j) scores anchor i
    against positive j, i.e. exactly the in-batch negatives a contrastive loss sees."""
    emb = check_embeddings(embeddings)
    pos = emb if positives is None else check_embeddings(positives, "positives")
    if pos.shape != emb.shape:
        raise ValueError(f"positives must have the shape of embeddings {emb.shape}, got {pos.shape}")
    if isinstance(batches, BatchPlan):
        batches = batches.batches
    total_sim, pairs, same = 0.0, 0, 0
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (emb.shape[0],):
            raise ValueError(f"labels must have shape ({emb.shape[0]},), got {labels.shape}")
    for b in batches:
        b = np.asarray(b)
        if len(b) < 2:
            continue
        x = emb[b].astype(np.float64)
        y = x if positives is None else pos[b].astype(np.float64)
        total_sim += float(x.sum(axis=0) @ y.sum(axis=0)) - float((x * y).sum())  # sum over i != j of x_i . y_j
        pairs += len(b) * (len(b) - 1)
        if labels is not None:
            _, c = np.unique(labels[b], return_counts=True)
            same += int((c * (c - 1)).sum())
    out = {"mean_negative_sim": total_sim / pairs if pairs else float("nan"), "pairs": pairs}
    if labels is not None:
        out["false_negative_rate"] = same / pairs if pairs else float("nan")
    return out
