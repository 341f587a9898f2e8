"""The algorithmic core of batch mining: kNN search, the filtered similarity graph and
mined hard negatives (communities and batch plans: ``pipelines.mining.batching``).

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
from dataclasses import dataclass

import numpy as np

DEFAULT_EXACT_THRESHOLD = 50_000
"""Corpora with fewer rows than this are searched exactly (IndexFlatIP) by ``index="auto"``."""

_INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")


# ----------------------------------------------------------------------------- checks


def check_embeddings(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """``embeddings`` as contiguous float32 after checking it is a 2-d array of at least
    two unit-norm rows (on a sample): every search and statistic assumes inner product
    is cosine similarity."""
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


def check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]``, else a ``ValueError`` naming the parameter."""
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

        faiss.omp_set_num_threads(check_int(num_threads, "num_threads", 1))


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

    emb = check_embeddings(embeddings)
    if index not in _INDEX_KINDS:
        raise ValueError(f"index must be one of {_INDEX_KINDS}, got {index!r}")
    check_int(exact_threshold, "exact_threshold", 0)
    _set_threads(num_threads)
    n, d = emb.shape
    kind = index
    if kind == "auto":
        kind = "flat" if n < exact_threshold else "ivf"
    if kind == "flat":
        idx = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, check_int(hnsw_m, "hnsw_m", 2), faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = check_int(ef_construction, "ef_construction", 1)
    else:
        nl = check_int(nlist, "nlist", 1, n) if nlist is not None else max(1, min(n, int(4 * math.sqrt(n))))
        ts = check_int(train_size, "train_size", nl) if train_size is not None else 50 * nl
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
    start = check_int(start, "start", 0, n)
    stop = check_int(stop, "stop", start, n)
    k = check_int(k, "k", 1, n - 1)
    check_int(batch_size, "batch_size", 1)
    if index.ntotal != n:
        raise ValueError(f"index holds {index.ntotal} vectors but embeddings has {n} rows")
    ivf = faiss.try_extract_index_ivf(index) if not isinstance(index, faiss.IndexFlat) else None
    if ivf is not None:
        ivf.nprobe = check_int(nprobe, "nprobe", 1)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = check_int(ef_search, "ef_search", 1) if ef_search is not None else max(64, 2 * (k + 1))
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
    emb = check_embeddings(embeddings)
    if queries is not None:
        queries = check_embeddings(queries, "queries")
    check_int(k, "k", 1, emb.shape[0] - 1)
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
    rank_min = check_int(rank_min, "rank_min", 0, k)
    rank_max = k if rank_max is None else check_int(rank_max, "rank_max", rank_min, k)
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
    m = check_int(num_negatives, "num_negatives", 1)
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
