"""B3's batch construction (Breaking the Batch Barrier): mutual-neighbour edges, a
balanced partition of the graph into parts of exactly one batch (METIS), and the two
ways the literature keeps batches from being too pure: several groups per batch
(TAS-B's balanced sampling) and a share of random rows.

Why exact parts: a part is a batch. Leiden's communities come in whatever sizes the
graph has, so they must be cut and merged into batches, and most batches end up
spanning unrelated communities; METIS splits the graph into ``n // size`` parts of
(nearly) equal size while cutting as little edge weight as it can, and ``balanced_parts``
repairs METIS's small imbalance so every part holds exactly ``size`` rows.

Pure, seeded numpy in and out (``pymetis`` does the partitioning); errors name the
parameter.
"""

from __future__ import annotations

import numpy as np

from clray.pipelines.mining.batching import BatchPlan
from clray.pipelines.mining.core import check_int


def mutual_mask(neighbours: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask`` keeping only mutual candidates: j stays in row i's window only when i is
    in j's window too. One-directional neighbours include the hubs every row is close to;
    mutual ones are pairs that are specifically close to each other (the authors' edges)."""
    if mask.shape != neighbours.shape or mask.dtype != bool:
        raise ValueError(f"mask must be a bool array with the shape of neighbours {neighbours.shape}")
    n = neighbours.shape[0]
    rows, cols = np.nonzero(mask)
    dst = neighbours[rows, cols].astype(np.int64)
    ok = dst >= 0
    forward = rows[ok].astype(np.int64) * n + dst[ok]
    backward = dst[ok] * n + rows[ok].astype(np.int64)
    keys = np.sort(forward)
    pos = np.searchsorted(keys, backward)
    found = (pos < len(keys)) & (keys[np.minimum(pos, len(keys) - 1)] == backward)
    out = np.zeros_like(mask)
    out[rows[ok][found], cols[ok][found]] = True
    return out


def _csr(n: int, edges: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both directions of every undirected edge, grouped by source: (starts, adjacent, weight)."""
    src = np.concatenate([edges[:, 0], edges[:, 1]]).astype(np.int64)
    dst = np.concatenate([edges[:, 1], edges[:, 0]]).astype(np.int64)
    w = np.concatenate([weights, weights]).astype(np.float64)
    order = np.argsort(src, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=n))]).astype(np.int64)
    return starts, dst[order], w[order]


def _metis(n: int, nparts: int, starts: np.ndarray, adjacent: np.ndarray, weight: np.ndarray, seed: int) -> np.ndarray:
    import pymetis

    if nparts == 1:
        return np.zeros(n, dtype=np.int64)
    # METIS takes positive integer edge weights: similarities in (0, 1] scaled to 1..1000.
    eweights = np.clip(np.round(weight * 1000), 1, None).astype(np.int64)
    result = pymetis.part_graph(nparts, pymetis.CSRAdjacency(starts, adjacent), eweights=eweights,
                                options=pymetis.Options(seed=int(seed), ufactor=1))
    return np.asarray(result.vertex_part, dtype=np.int64)


def balanced_parts(n: int, edges: np.ndarray, weights: np.ndarray, size: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Labels ``[n]``: ``n // size`` parts of exactly ``size`` rows (0..parts-1) and the
    ``n % size`` remainder rows (-1), from METIS on the weighted graph.

    METIS balances to within a few percent; the repair moves each over-full part's rows
    with the least edge weight inside it to the under-full part they are most connected
    to (any under-full part when none), strongest ties first. What no part has room for
    is the remainder: the rows least tied to any part."""
    n = check_int(n, "n", 1)
    size = check_int(size, "size", 1, n)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(edges),):
        raise ValueError(f"weights must have shape ({len(edges)},), got {weights.shape}")
    nparts = n // size
    starts, adjacent, weight = _csr(n, edges, np.maximum(weights, 1e-3))
    labels = _metis(n, nparts, starts, adjacent, weight, seed)
    counts = np.bincount(labels, minlength=nparts)
    metis_sizes = (int(counts.min()), int(counts.max()))

    def ties(node: int) -> np.ndarray:
        """Edge weight from ``node`` into each part."""
        a, b = starts[node], starts[node + 1]
        where = labels[adjacent[a:b]]
        placed = where >= 0
        return np.bincount(where[placed], weights=weight[a:b][placed], minlength=nparts)

    pool: list[int] = []
    for part in np.nonzero(counts > size)[0]:
        members = np.nonzero(labels == part)[0]
        inside = np.array([ties(int(m))[part] for m in members])
        order = members[np.argsort(inside, kind="stable")]
        evicted = order[: counts[part] - size]
        labels[evicted] = -1
        pool.extend(int(e) for e in evicted)
        counts[part] = size
    rng = np.random.default_rng(seed)
    pool = [pool[i] for i in rng.permutation(len(pool))]
    wants = [(ties(node), node) for node in pool]
    moved = 0
    # strongest tie first; a node whose best parts are full goes to any part with room
    for _tie, node, part in sorted(((float(t[p]), node, int(p)) for t, node in wants for p in np.nonzero(t > 0)[0]),
                                   key=lambda x: -x[0]):
        if labels[node] < 0 and counts[part] < size:
            labels[node], counts[part] = part, counts[part] + 1
            moved += 1
    for node in pool:
        if labels[node] >= 0:
            continue
        open_parts = np.nonzero(counts < size)[0]
        if not len(open_parts):
            break
        part = int(open_parts[0])
        labels[node], counts[part] = part, counts[part] + 1
        moved += 1
    assert (counts == size).all() and int((labels < 0).sum()) == n - nparts * size
    return labels, {"parts": int(nparts), "metis_sizes": list(metis_sizes), "moved": int(moved)}


def _split_part(labels: np.ndarray, nparts: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    counts = np.bincount(labels[labels >= 0], minlength=nparts)
    start = int((labels < 0).sum())
    parts = []
    for c in counts:
        parts.append(order[start : start + c])
        start += c
    return parts


def metis_plan(n: int, edges: np.ndarray, weights: np.ndarray, batch_size: int, seed: int = 0, *,
               groups_per_batch: int = 1, random_fraction: float = 0.0) -> BatchPlan:
    """A batch plan of exactly ``batch_size`` rows per batch from ``balanced_parts``.

    ``groups_per_batch`` g > 1 (TAS-B's balanced sampling): parts of ``batch_size / g``
    rows, g of them drawn at random into each batch, so a batch holds g tight groups
    instead of one. ``random_fraction`` f: that share of each batch's rows (rounded) is
    swapped for rows drawn at random from the other batches, so every row is still used
    exactly once. Rows inside a batch are shuffled, so each worker's part of a global
    batch is a random share of it. Batch order is shuffled (seeded)."""
    batch_size = check_int(batch_size, "batch_size", 2)
    groups = check_int(groups_per_batch, "groups_per_batch", 1, batch_size)
    if batch_size % groups:
        raise ValueError(f"groups_per_batch = {groups} must divide batch_size = {batch_size}")
    if not 0.0 <= float(random_fraction) < 1.0:
        raise ValueError(f"random_fraction must be in [0, 1), got {random_fraction!r}")
    part_size = batch_size // groups
    labels, info = balanced_parts(n, edges, weights, part_size, seed)
    rng = np.random.default_rng(seed)
    parts = _split_part(labels, info["parts"], rng)
    usable = len(parts) // groups * groups
    parts = [parts[i] for i in rng.permutation(len(parts))]
    batches = [np.concatenate(parts[i : i + groups]) for i in range(0, usable, groups)]
    remainder = np.concatenate([np.nonzero(labels < 0)[0], *parts[usable:]]).astype(np.int64)
    swap = int(round(float(random_fraction) * batch_size))
    if swap and len(batches) > 1:
        picks = [rng.choice(batch_size, swap, replace=False) for _ in batches]
        pooled = np.concatenate([b[p] for b, p in zip(batches, picks, strict=True)])
        pooled = pooled[rng.permutation(len(pooled))]
        for i, (b, p) in enumerate(zip(batches, picks, strict=True)):
            b[p] = pooled[i * swap : (i + 1) * swap]
    batches = [b[rng.permutation(batch_size)].astype(np.int64) for b in batches]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    info.update(groups_per_batch=groups, random_rows_per_batch=swap, remainder=int(len(remainder)))
    return BatchPlan(batches=batches, remainder=remainder, batch_size=batch_size, info=info)
