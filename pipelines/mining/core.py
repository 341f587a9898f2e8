"""The algorithmic core of batch mining: kNN search, the filtered similarity graph,
communities, batch plans, mined hard negatives and the statistics that compare plans.

Every function takes and returns numpy arrays, is deterministic given its ``seed`` and
raises ``ValueError`` naming the parameter on bad input. Conventions:

* ``neighbours [n, k]`` int64 row ids sorted by decreasing similarity, self excluded;
  a missing neighbour (an approximate index found fewer than ``k``) is ``-1`` with
  similarity ``-inf``.
* The *window* is the ranks ``[rank_min, rank_max)`` of each row's neighbour list (the
  top ``rank_min`` are skipped as likely false negatives); the *margin filter* drops a
  candidate whose similarity exceeds ``positive_sim * (1 - margin)`` (positive-aware
  filtering, NV-Retriever). The graph and the mined negatives use the same mask
  (``candidate_mask``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

DEFAULT_EXACT_THRESHOLD = 50_000
"""Corpora with fewer rows than this are searched exactly (IndexFlatIP) by ``index="auto"``."""

_INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")


# ----------------------------------------------------------------------------- checks


def _check_embeddings(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2:
        raise ValueError(f"{name} must be a 2-d numpy array [n, d], got {type(embeddings).__name__}"
                         f"{'' if not isinstance(embeddings, np.ndarray) else f' with shape {embeddings.shape}'}")
    if embeddings.shape[0] < 2 or embeddings.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 rows and 1 column, got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {embeddings.dtype}")
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    sample = emb[:: max(1, emb.shape[0] // 1000)]
    norms = np.linalg.norm(sample, axis=1)
    if not np.all(np.isfinite(norms)) or np.max(np.abs(norms - 1.0)) > 1e-3:
        raise ValueError(f"{name} must be finite and L2-normalised (row norms 1), "
                         f"got norms in [{norms.min():.4g}, {norms.max():.4g}]")
    return emb


def _check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return int(value)


def _check_pair(neighbours: np.ndarray, sims: np.ndarray) -> None:
    if not isinstance(neighbours, np.ndarray) or neighbours.ndim != 2:
        raise ValueError("neighbours must be a 2-d int array [n, k]")
    if not np.issubdtype(neighbours.dtype, np.integer):
        raise ValueError(f"neighbours must be integer, got dtype {neighbours.dtype}")
    if not isinstance(sims, np.ndarray) or sims.shape != neighbours.shape:
        raise ValueError(f"sims must be an array with the shape of neighbours {neighbours.shape}, "
                         f"got {getattr(sims, 'shape', type(sims).__name__)}")


def _set_threads(num_threads: int | None) -> None:
    if num_threads is not None:
        import faiss

        faiss.omp_set_num_threads(_check_int(num_threads, "num_threads", 1))


# ----------------------------------------------------------------------------- kNN


def build_index(
    embeddings: np.ndarray,
    *,
    index: str = "auto",
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    nlist: int | None = None,
    train_size: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int = 80,
    seed: int = 0,
    num_threads: int | None = None,
):
    """A faiss inner-product index holding ``embeddings``.

    ``index="auto"``: exact ``IndexFlatIP`` below ``exact_threshold`` rows, else
    ``IndexIVFFlat`` (HNSW builds too slowly on few cores at a million rows).
    IVF: ``nlist`` defaults to ``4 * sqrt(n)``, trained with k-means on a seeded sample of
    ``train_size`` rows (default ``50 * nlist``, at most n).
    """
    import faiss

    emb = _check_embeddings(embeddings)
    if index not in _INDEX_KINDS:
        raise ValueError(f"index must be one of {_INDEX_KINDS}, got {index!r}")
    _check_int(exact_threshold, "exact_threshold", 0)
    _set_threads(num_threads)
    n, d = emb.shape
    kind = index
    if kind == "auto":
        kind = "flat" if n < exact_threshold else "ivf"
    if kind == "flat":
        idx = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, _check_int(hnsw_m, "hnsw_m", 2), faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = _check_int(ef_construction, "ef_construction", 1)
    else:
        nl = _check_int(nlist, "nlist", 1, n) if nlist is not None else max(1, min(n, int(4 * math.sqrt(n))))
        ts = _check_int(train_size, "train_size", nl) if train_size is not None else 50 * nl
        ts = min(ts, n)
        quantizer = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nl, faiss.METRIC_INNER_PRODUCT)
        idx.cp.seed = int(seed)
        sample = emb if ts >= n else emb[np.sort(np.random.default_rng(seed).choice(n, ts, replace=False))]
        idx.train(sample)
    idx.add(emb)
    return idx


def knn_range(
    index,
    embeddings: np.ndarray,
    start: int,
    stop: int,
    k: int,
    *,
    nprobe: int = 32,
    ef_search: int | None = None,
    batch_size: int = 16384,
    queries: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of rows ``[start, stop)`` (ids into ``embeddings``, which ``index``
    holds in the same order), self excluded: ``(neighbours [stop-start, k] int64,
    sims [stop-start, k] float32)``. Queries go in batches of ``batch_size``; callers split
    query ranges across workers with this function.

    ``queries [n, d]``: search with these vectors instead of ``embeddings`` (row i of both
    is the same corpus row, e.g. the anchor and the positive view); row i's own id is
    still the one excluded, so a row's own positive is never its negative."""
    import faiss

    n = embeddings.shape[0]
    if queries is not None and queries.shape != embeddings.shape:
        raise ValueError(f"queries must have the shape of embeddings {embeddings.shape}, got {queries.shape}")
    source = embeddings if queries is None else queries
    start = _check_int(start, "start", 0, n)
    stop = _check_int(stop, "stop", start, n)
    k = _check_int(k, "k", 1, n - 1)
    _check_int(batch_size, "batch_size", 1)
    if index.ntotal != n:
        raise ValueError(f"index holds {index.ntotal} vectors but embeddings has {n} rows")
    ivf = faiss.try_extract_index_ivf(index) if not isinstance(index, faiss.IndexFlat) else None
    if ivf is not None:
        ivf.nprobe = _check_int(nprobe, "nprobe", 1)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = _check_int(ef_search, "ef_search", 1) if ef_search is not None else max(64, 2 * (k + 1))
    out_i = np.empty((stop - start, k), dtype=np.int64)
    out_s = np.empty((stop - start, k), dtype=np.float32)
    for b0 in range(start, stop, batch_size):
        b1 = min(stop, b0 + batch_size)
        q = np.ascontiguousarray(source[b0:b1], dtype=np.float32)
        s, i = index.search(q, k + 1)
        rows = np.arange(b0, b1)[:, None]
        drop = i == rows
        # a row whose own id was not returned loses its last (weakest) result instead
        drop[:, -1] |= ~drop.any(axis=1)
        keep = ~drop
        i = i[keep].reshape(b1 - b0, k)
        s = s[keep].reshape(b1 - b0, k)
        s[i < 0] = -np.inf
        out_i[b0 - start : b1 - start] = i
        out_s[b0 - start : b1 - start] = s
    return out_i, out_s


def knn(
    embeddings: np.ndarray,
    k: int,
    *,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    index: str = "auto",
    nprobe: int = 32,
    ef_search: int | None = None,
    nlist: int | None = None,
    hnsw_m: int = 32,
    batch_size: int = 16384,
    num_threads: int | None = None,
    seed: int = 0,
    queries: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours by inner product of L2-normalised ``embeddings``, self
    excluded: ``(neighbours [n, k] int64, sims [n, k] float32)``, best first. With
    ``queries`` (row-aligned, e.g. anchors searching positives), see ``knn_range``."""
    emb = _check_embeddings(embeddings)
    if queries is not None:
        queries = _check_embeddings(queries, "queries")
    _check_int(k, "k", 1, emb.shape[0] - 1)
    idx = build_index(emb, index=index, exact_threshold=exact_threshold, nlist=nlist, hnsw_m=hnsw_m,
                      seed=seed, num_threads=num_threads)
    return knn_range(idx, emb, 0, emb.shape[0], k, nprobe=nprobe, ef_search=ef_search, batch_size=batch_size,
                     queries=queries)


# ----------------------------------------------------------------------------- graph


def positive_limit(positive_sims: np.ndarray, margin: float) -> np.ndarray:
    """The highest similarity a negative may have: ``margin`` (relative) below the
    positive's. For a positive similarity below 0 the limit is also below it (the plain
    product ``p * (1 - margin)`` would lift it above the positive)."""
    ps = np.asarray(positive_sims, dtype=np.float32)
    return ps - float(margin) * np.abs(ps)


def candidate_mask(
    neighbours: np.ndarray,
    sims: np.ndarray,
    positive_sims: np.ndarray | None = None,
    rank_min: int = 0,
    rank_max: int | None = None,
    margin: float = 0.0,
) -> np.ndarray:
    """Bool ``[n, k]``: the candidates kept as negatives. A candidate is kept when its rank
    is in ``[rank_min, rank_max)`` (``rank_max=None``: k), it exists (id >= 0) and, when
    ``positive_sims`` is given, its similarity is <= ``positive_limit(positive_sims, margin)[row]``
    (``positive_sims[row] * (1 - margin)`` for a positive similarity >= 0)."""
    _check_pair(neighbours, sims)
    n, k = neighbours.shape
    rank_min = _check_int(rank_min, "rank_min", 0, k)
    rank_max = k if rank_max is None else _check_int(rank_max, "rank_max", rank_min, k)
    if not isinstance(margin, (int, float, np.floating)) or not (0.0 <= float(margin) < 1.0):
        raise ValueError(f"margin must be a number in [0, 1), got {margin!r}")
    mask = np.zeros((n, k), dtype=bool)
    mask[:, rank_min:rank_max] = True
    mask &= neighbours >= 0
    if positive_sims is not None:
        ps = np.asarray(positive_sims, dtype=np.float32)
        if ps.shape != (n,):
            raise ValueError(f"positive_sims must have shape ({n},), got {ps.shape}")
        mask &= sims <= positive_limit(ps, margin)[:, None]
    return mask


def similarity_graph(
    neighbours: np.ndarray,
    sims: np.ndarray,
    positive_sims: np.ndarray | None = None,
    rank_min: int = 0,
    rank_max: int | None = None,
    margin: float = 0.0,
    *,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The symmetrised kNN graph over the kept candidates (``candidate_mask``, or ``mask``
    if given): ``(edges [E, 2] int64 with edges[:,0] < edges[:,1], unique, weights [E]
    float32)``; an edge seen from both ends keeps the larger similarity."""
    if mask is None:
        mask = candidate_mask(neighbours, sims, positive_sims, rank_min, rank_max, margin)
    else:
        _check_pair(neighbours, sims)
        if not isinstance(mask, np.ndarray) or mask.shape != neighbours.shape or mask.dtype != bool:
            raise ValueError(f"mask must be a bool array with the shape of neighbours {neighbours.shape}")
    n = neighbours.shape[0]
    if neighbours.size and neighbours.max() >= n:
        raise ValueError(f"neighbours must hold row ids < n = {n} (or -1), got {neighbours.max()}")
    rows, cols = np.nonzero(mask)
    dst = neighbours[rows, cols]
    w = sims[rows, cols].astype(np.float32)
    ok = (dst != rows) & (dst >= 0)
    src, dst, w = rows[ok].astype(np.int64), dst[ok].astype(np.int64), w[ok]
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    key = lo * n + hi
    order = np.lexsort((-w, key))  # by key, larger weight first
    key, w = key[order], w[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key, w = key[first], w[first]
    edges = np.stack([key // n, key % n], axis=1)
    return edges, w


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

    n = _check_int(n, "n", 1)
    target_size = _check_int(target_size, "target_size", 1)
    if backend not in ("igraph", "leidenalg"):
        raise ValueError(f"backend must be 'igraph' or 'leidenalg', got {backend!r}")
    edges = np.asarray(edges)
    if edges.ndim != 2 or edges.shape[1] != 2 or (edges.size and not np.issubdtype(edges.dtype, np.integer)):
        raise ValueError(f"edges must be an int array [E, 2], got shape {edges.shape}")
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"edges must hold node ids in [0, {n}), got [{edges.min()}, {edges.max()}]")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (edges.shape[0],):
        raise ValueError(f"weights must have shape ({edges.shape[0]},), got {weights.shape}")
    if resolution is not None and not (float(resolution) > 0):
        raise ValueError(f"resolution must be > 0, got {resolution!r}")
    _check_int(tuning_rounds, "tuning_rounds", 0)
    # CPM needs non-negative weights; similarities below 0 are tiny positive weights
    w = np.maximum(weights, 1e-6)
    graph = ig.Graph(n=n, edges=edges.astype(np.int64))
    degree = np.bincount(edges.ravel(), minlength=n) if edges.size else np.zeros(n, dtype=np.int64)
    connected = degree > 0
    wdeg = np.bincount(edges.ravel(), weights=np.repeat(w, 2), minlength=n) if edges.size else np.zeros(n)
    history = []
    if not connected.any():
        return np.arange(n, dtype=np.int64), {"resolution": None, "history": history, "typical_size": 1.0}
    res = float(resolution) if resolution is not None else float(wdeg[connected].mean()) / target_size
    labels = _leiden(graph, w.tolist(), res, seed, n_iterations, backend)
    size = _typical_size(labels, connected)
    history.append((res, size))
    if resolution is None:
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
            labels = _leiden(graph, w.tolist(), res, seed, n_iterations, backend)
            size = _typical_size(labels, connected)
            history.append((res, size))
            score = abs(math.log(size / target_size))
            if score < best[0]:
                best = (score, res, labels, size)
            if abs(size / prev - 1.0) < 0.02:
                break  # a plateau (e.g. disconnected clusters smaller than the target)
        _, res, labels, size = best
    # renumber 0..C-1 in order of first appearance (deterministic)
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    labels = rank[inv]
    return labels, {"resolution": res, "history": history, "typical_size": size,
                    "num_communities": int(labels.max()) + 1}


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
    batch_size = _check_int(batch_size, "batch_size", 1)
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
    n = _check_int(n, "n", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    nfull = n // batch_size
    return BatchPlan(batches=[perm[b * batch_size : (b + 1) * batch_size] for b in range(nfull)],
                     remainder=perm[nfull * batch_size :], batch_size=batch_size, info={"random": True})


# ----------------------------------------------------------------------------- negatives


@dataclass
class NegativeSample:
    """Mined negatives: ``idx [n, m]`` int64 (-1 where a row had fewer candidates),
    ``sims [n, m]`` float32 (NaN there), ``count [n]`` negatives found per row,
    ``shortfall_rows`` rows with fewer than m, ``missing`` negatives missing in all."""

    idx: np.ndarray
    sims: np.ndarray
    count: np.ndarray
    shortfall_rows: int
    missing: int


def sample_negatives(
    neighbours: np.ndarray,
    sims: np.ndarray,
    mask: np.ndarray,
    num_negatives: int,
    strategy: str = "top",
    seed: int = 0,
) -> NegativeSample:
    """``num_negatives`` negatives per row among the candidates ``mask`` keeps (the same
    window and filter as the graph: ``candidate_mask``). ``"top"``: the most similar kept
    ones, in rank order; ``"random"``: a seeded uniform draw among the kept ones, in rank
    order. Rows with fewer candidates get what exists; the shortfall is counted."""
    _check_pair(neighbours, sims)
    if not isinstance(mask, np.ndarray) or mask.shape != neighbours.shape or mask.dtype != bool:
        raise ValueError(f"mask must be a bool array with the shape of neighbours {neighbours.shape}")
    m = _check_int(num_negatives, "num_negatives", 1)
    if strategy not in ("top", "random"):
        raise ValueError(f"strategy must be 'top' or 'random', got {strategy!r}")
    n, k = neighbours.shape
    mask = mask & (neighbours >= 0)
    if strategy == "top":
        key = np.where(mask, np.arange(k)[None, :], k).astype(np.int64)
        pick = np.argsort(key, axis=1, kind="stable")[:, : min(m, k)]
    else:
        key = np.where(mask, np.random.default_rng(seed).random((n, k)), np.inf)
        pick = np.argsort(key, axis=1, kind="stable")[:, : min(m, k)]
        # keep chosen ones in rank order, the missing ones (key inf) last
        chosen_valid = np.take_along_axis(mask, pick, axis=1)
        pick = np.sort(np.where(chosen_valid, pick, k + pick), axis=1)
        pick = np.where(pick >= k, pick - k, pick)
    valid = np.take_along_axis(mask, pick, axis=1)
    idx = np.full((n, m), -1, dtype=np.int64)
    out_s = np.full((n, m), np.nan, dtype=np.float32)
    idx[:, : pick.shape[1]] = np.where(valid, np.take_along_axis(neighbours, pick, axis=1), -1)
    out_s[:, : pick.shape[1]] = np.where(valid, np.take_along_axis(sims, pick, axis=1), np.nan)
    count = valid.sum(axis=1).astype(np.int64)
    return NegativeSample(idx=idx, sims=out_s, count=count, shortfall_rows=int((count < m).sum()),
                          missing=int((m - count).sum()))


# ----------------------------------------------------------------------------- statistics


def batch_stats(embeddings: np.ndarray, batches, labels: np.ndarray | None = None,
                positives: np.ndarray | None = None) -> dict:
    """Mean teacher similarity of in-batch negatives (all ordered pairs within a batch,
    self excluded) over a plan (a ``BatchPlan`` or a list of row-id arrays); with ``labels``,
    also the estimated false-negative rate: the fraction of those pairs sharing a label.

    With ``positives`` (the other view, row-aligned), a pair (i, j) scores anchor i
    against positive j, i.e. exactly the in-batch negatives a contrastive loss sees."""
    emb = _check_embeddings(embeddings)
    pos = emb if positives is None else _check_embeddings(positives, "positives")
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


def false_negative_rate(labels: np.ndarray, neg_idx: np.ndarray) -> float:
    """Fraction of mined negatives (``neg_idx [n, m]``, -1 = none) sharing the anchor's label."""
    labels = np.asarray(labels)
    neg_idx = np.asarray(neg_idx)
    if neg_idx.ndim != 2 or neg_idx.shape[0] != labels.shape[0]:
        raise ValueError(f"neg_idx must have shape ({labels.shape[0]}, m), got {neg_idx.shape}")
    ok = neg_idx >= 0
    if not ok.any():
        return float("nan")
    anchors = np.broadcast_to(np.arange(len(labels))[:, None], neg_idx.shape)
    return float((labels[neg_idx[ok]] == labels[anchors[ok]]).mean())
