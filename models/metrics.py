"""Retrieval, zero-shot and embedding-geometry evaluation on embeddings, in bounded memory.

Evaluation sets reach tens of thousands of pairs, whose full N x N similarity matrix
would be gigabytes; every function here walks the query rows in chunks so peak memory
is ``chunk x N`` whatever N is. Retrieval scores are dot products: pass L2-normalised
embeddings (what :class:`models.dual_encoder.DualEncoder` returns) to rank by cosine.

Two families of retrieval figures, on purpose:

- :func:`retrieval_metrics`: ``a2p_R@k`` / ``p2a_R@k`` (and ``*_label_R@1``), exact-pair
  recall. Row i's match is row i and nothing else; a duplicate caption elsewhere in the
  split counts against it. Cheap, comparable across runs of the same split, and what
  earlier runs reported.
- :func:`ir_retrieval_metrics`: ``a2p_ir_*`` / ``p2a_ir_*``, the information-retrieval
  figures users know from sentence-transformers' ``InformationRetrievalEvaluator``
  (Recall@k, Accuracy@k, MRR@10,
  nDCG@10, MAP@100), with duplicates folded: equal keys (texts) are one candidate and one
  query, and a query counts every candidate paired with it in any row as relevant (see
  :func:`ir_metrics`). They match that evaluator on the same embeddings to float precision.

Without duplicate keys both give the same R@k (up to exact score ties, which exact-pair
recall resolves in the target's favour and the IR figures by candidate order). With
duplicates (the quickstart's repeated captions) they differ, which is why the IR figures
have their own names instead of changing what ``a2p_R@k`` has always meant.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from clray.models.metric_names import IR_RECALL_AT, MAP_AT, MRR_AT, NDCG_AT

# Similarity entries materialised at once (~64 MiB in fp32).
_MAX_CHUNK_ELEMENTS = 1 << 24


def _chunks(rows: int, columns: int) -> Iterator[slice]:
    step = max(1, _MAX_CHUNK_ELEMENTS // max(columns, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _as_label_ids(labels: Tensor | Sequence[Any], device: torch.device) -> Tensor:
    """Labels of any hashable kind (ints, strings) as an int tensor, so equality is one op."""
    if isinstance(labels, Tensor):
        return labels.to(device)
    ids: dict[Any, int] = {}
    return torch.tensor([ids.setdefault(label, len(ids)) for label in labels], device=device)


def _recalls(
    queries: Tensor, keys: Tensor, ks: Sequence[int], labels: Tensor | None
) -> tuple[dict[int, float], float | None]:
    """Recall@k of query i retrieving key i, and (with labels) top-1 label agreement."""
    n = queries.shape[0]
    hits = dict.fromkeys(ks, 0)
    label_hits = 0
    for rows in _chunks(n, keys.shape[0]):
        sims = queries[rows] @ keys.T
        idx = torch.arange(rows.start, rows.stop, device=sims.device)
        target = sims[torch.arange(len(idx), device=sims.device), idx]
        # Rank = number of keys scoring strictly higher than the true one (ties favour the
        # target, matching argmax/topk conventions closely enough for float embeddings).
        rank = (sims > target[:, None]).sum(dim=1)
        for k in ks:
            hits[k] += int((rank < k).sum())
        if labels is not None:
            top1 = sims.argmax(dim=1)
            label_hits += int((labels[top1] == labels[idx]).sum())
    recalls = {k: hits[k] / n for k in ks}
    return recalls, (label_hits / n if labels is not None else None)


# The cutoffs of the IR figures (Recall@k and Accuracy@k, MRR, nDCG, MAP): with the names
# of every figure, in models.metric_names, which needs no torch.


@dataclass(frozen=True)
class _Grouping:
    """Rows folded by key: ``ids[r]`` is row r's group, ``first[g]`` a row of group g."""

    ids: Tensor
    first: Tensor

    @property
    def size(self) -> int:
        return int(self.first.shape[0])


def _group(keys: Sequence[Hashable] | None, rows: int, what: str) -> _Grouping:
    """Distinct keys in first-seen order (no keys: every row is its own group)."""
    if keys is None:
        every = torch.arange(rows)
        return _Grouping(every, every)
    if len(keys) != rows:
        raise ValueError(f"{len(keys)} {what} for {rows} rows; pass one key (e.g. the text) per row")
    index: dict[Hashable, int] = {}
    first: list[int] = []
    ids = []
    for row, key in enumerate(keys):
        try:
            group = index.setdefault(key, len(index))
        except TypeError:
            raise TypeError(f"{what}[{row}] is {type(key).__name__}, which is not hashable; pass texts, "
                            "ids or bytes (see row_keys)") from None
        if group == len(first):
            first.append(row)
        ids.append(group)
    return _Grouping(torch.tensor(ids, dtype=torch.long), torch.tensor(first, dtype=torch.long))


def row_keys(values: Tensor, mask: Tensor | None = None) -> list[bytes]:
    """One hashable key per row from a tensor's contents: equal rows, equal keys.

    For when the eval loop has token ids or pixels but not the texts: identical texts
    tokenise to identical ids, so ``row_keys(batch["positive_input_ids"],
    batch["positive_attention_mask"])`` folds duplicate captions as their texts would.
    ``mask`` keeps only the masked-in entries of each row, so the same text padded to two
    different lengths (two batches) still gets one key.
    """
    values = values.detach().cpu().reshape(values.shape[0], -1)
    if mask is None:
        return [row.numpy().tobytes() for row in values.contiguous()]
    mask = mask.detach().cpu().reshape(mask.shape[0], -1).bool()
    if mask.shape != values.shape:
        raise ValueError(f"row_keys: mask {tuple(mask.shape)} does not match values {tuple(values.shape)}")
    return [row[keep].numpy().tobytes() for row, keep in zip(values, mask, strict=True)]


def _pair_ranks(queries: Tensor, corpus: Tensor, pair_query: Tensor, pair_candidate: Tensor) -> Tensor:
    """0-based rank of each relevant (query, candidate) pair in its query's ranking of the
    whole corpus, ordered by (-score, candidate): equal scores rank the earlier candidate
    first, the total order sentence-transformers' evaluator uses (with corpus ids sorting
    in candidate order). A rank is a count of better candidates, so no top-k list is
    materialised and a chunk's peak memory is ``chunk x corpus`` whatever the cut-offs."""
    ranks = torch.empty(pair_query.shape[0], dtype=torch.long)
    columns = torch.arange(corpus.shape[0], device=corpus.device)
    for chunk in _chunks(pair_query.shape[0], corpus.shape[0]):
        candidate = pair_candidate[chunk].to(corpus.device)
        sims = queries[pair_query[chunk].to(queries.device)] @ corpus.T
        target = sims.gather(1, candidate[:, None])
        # int32 sums: a third faster than the default int64 on these [chunk, corpus] masks.
        better = (sims > target).sum(dim=1, dtype=torch.int32)
        tied = ((sims == target).sum(dim=1, dtype=torch.int32) > 1).nonzero().squeeze(1)
        if tied.numel():  # rare with float scores: break ties by candidate order
            earlier = (sims[tied] == target[tied]) & (columns[None, :] < candidate[tied, None])
            better[tied] += earlier.sum(dim=1, dtype=torch.int32)
        ranks[chunk] = better.long().cpu()
    return ranks


def _ir_figures(ranks: Tensor, pair_query: Tensor, queries: int, ks: Sequence[int]) -> dict[str, float]:
    """The evaluator's per-query figures from the ranks of each query's relevant candidates,
    averaged over queries. ``pair_query`` is sorted, so a query's pairs are contiguous."""
    relevant = torch.bincount(pair_query, minlength=queries)
    per_pair = relevant[pair_query].double()
    rank = ranks.double()
    best = torch.full((queries,), float("inf"), dtype=torch.float64).scatter_reduce(
        0, pair_query, rank, reduce="amin")
    out: dict[str, float] = {}
    for k in ks:
        out[f"R@{k}"] = float(((rank < k) / per_pair).sum())
        out[f"Acc@{k}"] = float((best < k).sum())
    out[f"MRR@{MRR_AT}"] = float(torch.where(best < MRR_AT, 1.0 / (best + 1), 0.0).sum())
    discount = 1.0 / torch.log2(torch.arange(NDCG_AT, dtype=torch.float64) + 2)
    ideal = torch.cumsum(discount, 0)[relevant.clamp(max=NDCG_AT) - 1]
    gains = torch.where(rank < NDCG_AT, 1.0 / torch.log2(rank + 2), 0.0)
    out[f"nDCG@{NDCG_AT}"] = float((gains / ideal[pair_query]).sum())
    # Average precision needs each hit's position among its query's hits: sort the pairs
    # by (query, rank) and count from each query's first pair.
    order = torch.argsort(pair_query * (int(ranks.max()) + 1) + ranks)
    starts = torch.cumsum(relevant, 0) - relevant
    position = torch.empty_like(ranks)
    position[order] = torch.arange(ranks.shape[0]) - starts[pair_query[order]] + 1
    precision = torch.where(rank < MAP_AT, position.double() / (rank + 1), 0.0)
    out[f"MAP@{MAP_AT}"] = float((precision / per_pair.clamp(max=MAP_AT)).sum())
    return {name: value / queries for name, value in out.items()}


@torch.no_grad()
def ir_metrics(
    queries: Tensor,
    candidates: Tensor,
    candidate_keys: Sequence[Hashable] | None = None,
    query_keys: Sequence[Hashable] | None = None,
    ks: Sequence[int] = IR_RECALL_AT,
) -> dict[str, float]:
    """Recall@k, Accuracy@k, MRR@10, nDCG@10 and MAP@100 of one retrieval direction.

    Row r pairs ``queries[r]`` with ``candidates[r]``. The corpus is the distinct
    ``candidate_keys`` (e.g. the positives' texts): rows with equal keys are one candidate
    (the first such row's embedding), so a repeated caption is one document, not many
    near-identical competitors. Queries are folded the same way by ``query_keys``, and a
    query's relevant set is every candidate it is paired with in any row: a caption
    shared by five images has all five as relevant. Without keys every row is distinct.

    The figures are sentence-transformers' ``InformationRetrievalEvaluator``'s, given
    ``queries={query key: ...}``, ``corpus={candidate key: ...}`` and those relevant sets:
    ``R@k`` = relevant found in the top k / relevant (its Recall@k), ``Acc@k`` = at least
    one relevant in the top k (its Accuracy@k), MRR, nDCG (binary gains) and MAP as it
    defines them. Ties rank the earlier candidate first.
    """
    if queries.shape[0] != candidates.shape[0]:
        raise ValueError(f"retrieval needs paired rows: {queries.shape[0]} queries vs {candidates.shape[0]} candidates")
    if queries.shape[0] == 0:
        raise ValueError("ir_metrics needs at least one pair")
    rows = queries.shape[0]
    query_groups = _group(query_keys, rows, "query_keys")
    candidate_groups = _group(candidate_keys, rows, "candidate_keys")
    query_emb = queries.detach().float()[query_groups.first]
    corpus = candidates.detach().float().to(query_emb.device)[candidate_groups.first]
    pairs = torch.unique(torch.stack([query_groups.ids, candidate_groups.ids], dim=1), dim=0)  # sorted
    pair_query, pair_candidate = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    ranks = _pair_ranks(query_emb, corpus, pair_query, pair_candidate)
    return _ir_figures(ranks, pair_query, query_groups.size, tuple(ks))


@torch.no_grad()
def retrieval_metrics(
    anchor_emb: Tensor,
    positive_emb: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    labels: Tensor | Sequence[Any] | None = None,
) -> dict[str, float]:
    """Exact-pair recall@k in both directions for paired rows (row i's match is row i).

    ``a2p_R@k``: an anchor finds its own positive among all positives in the top k;
    ``p2a_R@k`` the reverse. With ``labels`` (one per pair) also ``a2p_label_R@1`` /
    ``p2a_label_R@1``: the top hit has the query's label, the number that matters when
    several items legitimately match (same class, duplicate captions). For the figures
    users know from sentence-transformers, with duplicates folded, see
    :func:`ir_retrieval_metrics`.
    """
    if anchor_emb.shape[0] != positive_emb.shape[0]:
        raise ValueError(
            f"retrieval needs paired rows: {anchor_emb.shape[0]} anchors vs {positive_emb.shape[0]} positives"
        )
    if anchor_emb.shape[0] == 0:
        raise ValueError("retrieval_metrics needs at least one pair")
    anchor = anchor_emb.detach().float()
    positive = positive_emb.detach().float().to(anchor.device)
    label_ids = None if labels is None else _as_label_ids(labels, anchor.device)
    if label_ids is not None and label_ids.shape[0] != anchor.shape[0]:
        raise ValueError(f"{label_ids.shape[0]} labels for {anchor.shape[0]} pairs")

    out: dict[str, float] = {}
    for name, queries, keys in (("a2p", anchor, positive), ("p2a", positive, anchor)):
        recalls, label_recall = _recalls(queries, keys, tuple(ks), label_ids)
        out.update({f"{name}_R@{k}": value for k, value in recalls.items()})
        if label_recall is not None:
            out[f"{name}_label_R@1"] = label_recall
    return out


@torch.no_grad()
def ir_retrieval_metrics(
    anchor_emb: Tensor,
    positive_emb: Tensor,
    anchor_keys: Sequence[Hashable] | None = None,
    positive_keys: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """:func:`ir_metrics` in both directions, named for an evaluation's metrics.

    ``a2p_ir_*``: anchors query the distinct positives (folded by ``positive_keys``, e.g.
    the caption texts); ``p2a_ir_*``: positives (folded by the same keys) query the
    distinct anchors (``anchor_keys``). Each direction gives ``R@1/5/10``, ``Acc@1/5/10``,
    ``MRR@10``, ``nDCG@10`` and ``MAP@100``, e.g. ``a2p_ir_nDCG@10``. A view without keys
    has every row distinct (right for images, and for text without repeats).

    Costs about twice :func:`retrieval_metrics` (each direction compares every relevant
    pair's score with the whole corpus twice, for exact tie-breaking).
    """
    if anchor_emb.shape[0] != positive_emb.shape[0]:
        raise ValueError(
            f"retrieval needs paired rows: {anchor_emb.shape[0]} anchors vs {positive_emb.shape[0]} positives"
        )
    for what, keys in (("anchor_keys", anchor_keys), ("positive_keys", positive_keys)):
        if keys is not None and len(keys) != anchor_emb.shape[0]:
            raise ValueError(f"{len(keys)} {what} for {anchor_emb.shape[0]} rows; pass one key (e.g. the text) per row")
    out: dict[str, float] = {}
    for name, queries, candidates, query_keys, candidate_keys in (
        ("a2p", anchor_emb, positive_emb, anchor_keys, positive_keys),
        ("p2a", positive_emb, anchor_emb, positive_keys, anchor_keys),
    ):
        ir = ir_metrics(queries, candidates, candidate_keys=candidate_keys, query_keys=query_keys)
        out.update({f"{name}_ir_{figure}": value for figure, value in ir.items()})
    return out


@torch.no_grad()
def zero_shot_accuracy(anchor_emb: Tensor, class_emb: Tensor, labels: Tensor | Sequence[int]) -> float:
    """Fraction of anchors whose most similar class embedding is their label's.

    ``class_emb`` [C, d] holds one embedding per class (e.g. the encoded prompt
    "a photo of a {name}"), and ``labels`` are class indices into it.
    """
    anchor = anchor_emb.detach().float()
    classes = class_emb.detach().float().to(anchor.device)
    label_ids = torch.as_tensor(labels, device=anchor.device)
    if label_ids.shape[0] != anchor.shape[0]:
        raise ValueError(f"{label_ids.shape[0]} labels for {anchor.shape[0]} anchors")
    if anchor.shape[0] == 0:
        raise ValueError("zero_shot_accuracy needs at least one anchor")
    correct = 0
    for rows in _chunks(anchor.shape[0], classes.shape[0]):
        predicted = (anchor[rows] @ classes.T).argmax(dim=1)
        correct += int((predicted == label_ids[rows]).sum())
    return correct / anchor.shape[0]


# --- embedding geometry -------------------------------------------------------------

HISTOGRAM_BINS = 40
"""Bins of the similarity histograms, fixed over [-1, 1] so any two evaluations (the
start and the end of a run, two runs) compare bin by bin."""
UNIFORMITY_T = 2.0


@dataclass(frozen=True)
class Geometry:
    """How a run's embeddings sit on the sphere (all on L2-normalised embeddings).

    - ``alignment``: E ||a_i - p_i||^2 over the pairs (Wang & Isola 2020, alpha = 2):
      0 when every positive lands on its anchor, 4 when opposite.
    - ``uniformity``: log E exp(-2 ||x - y||^2) over distinct pairs of one view (Wang &
      Isola, t = 2), per view and their mean (the paper's loss averages the two): lower is
      more spread out, 0 when everything collapsed to one point.
    - ``modality_gap``: ||mean(anchor) - mean(positive)|| (Liang et al. 2022): how far
      apart the two views' clouds sit, whatever the pairs.
    - ``pos_sim`` / ``neg_sim``: mean cosine of the pairs, and of every anchor with every
      other row's positive (pairs that share a key are neither, see ``embedding_geometry``).
    - ``histogram``: ``{"edges": [...], "positive": [...], "negative": [...]}``, counts of
      those cosines in :data:`HISTOGRAM_BINS` equal bins over [-1, 1].
    """

    alignment: float
    uniformity: float
    uniformity_anchor: float
    uniformity_positive: float
    modality_gap: float
    pos_sim: float
    neg_sim: float
    histogram: dict[str, list[float] | list[int]]

    def figures(self) -> dict[str, float]:
        """The scalar figures, e.g. for ``eval/alignment`` ... in an evaluation's metrics."""
        return {"alignment": self.alignment, "uniformity": self.uniformity,
                "uniformity_anchor": self.uniformity_anchor, "uniformity_positive": self.uniformity_positive,
                "modality_gap": self.modality_gap, "pos_sim": self.pos_sim, "neg_sim": self.neg_sim}


def _log_mean_exp_pairs(x: Tensor, t: float) -> float:
    """log E exp(-t ||x_i - x_j||^2) over i < j, as a running logsumexp (no underflow)."""
    n = x.shape[0]
    total = torch.tensor(float("-inf"), dtype=torch.float64)
    columns = torch.arange(n, device=x.device)
    for rows in _chunks(n, n):
        sq = (2.0 - 2.0 * (x[rows] @ x.T)).clamp(min=0).double()
        upper = columns[None, :] > torch.arange(rows.start, rows.stop, device=x.device)[:, None]
        if upper.any():
            total = torch.logaddexp(total, torch.logsumexp(-t * sq[upper], dim=0).cpu())
    return float(total - math.log(n * (n - 1) / 2))


@torch.no_grad()
def embedding_geometry(
    anchor_emb: Tensor,
    positive_emb: Tensor,
    anchor_keys: Sequence[Hashable] | None = None,
    positive_keys: Sequence[Hashable] | None = None,
    bins: int = HISTOGRAM_BINS,
) -> Geometry:
    """Alignment, uniformity, modality gap and the positive/negative similarity
    distributions of paired embeddings (see :class:`Geometry`), in bounded memory.

    Embeddings are L2-normalised here, so the figures mean the same whatever the caller
    passes. With keys (as for :func:`ir_retrieval_metrics`), anchor i and positive j of
    another row with the same anchor or positive key are left out of the negatives: a
    repeated caption is not a negative of its own image.
    """
    if anchor_emb.shape[0] != positive_emb.shape[0]:
        raise ValueError(f"geometry needs paired rows: {anchor_emb.shape[0]} anchors vs {positive_emb.shape[0]} positives")
    n = anchor_emb.shape[0]
    if n < 2:
        raise ValueError(f"embedding_geometry needs at least two pairs, got {n}")
    # float64 throughout: a float32 product of a chunk of rows need not round as the same
    # rows of the whole product do (BLAS picks kernels by shape and CPU), and the figures
    # must not depend on the chunking; an n x n similarity pass is cheap next to encoding
    anchor = torch.nn.functional.normalize(anchor_emb.detach().double(), dim=1)
    positive = torch.nn.functional.normalize(positive_emb.detach().double().to(anchor.device), dim=1)
    anchor_ids = _group(anchor_keys, n, "anchor_keys").ids.to(anchor.device)
    positive_ids = _group(positive_keys, n, "positive_keys").ids.to(anchor.device)

    pos = (anchor * positive).sum(dim=1).clamp(-1, 1)
    neg_counts = torch.zeros(bins, dtype=torch.float64)
    neg_sum, neg_n = 0.0, 0
    for rows in _chunks(n, n):
        sims = (anchor[rows] @ positive.T).clamp(-1, 1)
        negative = (anchor_ids[rows, None] != anchor_ids[None, :]) & (positive_ids[rows, None] != positive_ids[None, :])
        values = sims[negative]
        neg_sum += float(values.double().sum())
        neg_n += int(values.numel())
        neg_counts += torch.histc(values.double().cpu(), bins=bins, min=-1.0, max=1.0)
    u_anchor = _log_mean_exp_pairs(anchor, UNIFORMITY_T)
    u_positive = _log_mean_exp_pairs(positive, UNIFORMITY_T)
    return Geometry(
        alignment=float((anchor - positive).pow(2).sum(dim=1).double().mean()),
        uniformity=(u_anchor + u_positive) / 2,
        uniformity_anchor=u_anchor,
        uniformity_positive=u_positive,
        modality_gap=float((anchor.double().mean(dim=0) - positive.double().mean(dim=0)).norm()),
        pos_sim=float(pos.double().mean()),
        neg_sim=neg_sum / neg_n if neg_n else float("nan"),
        histogram={
            "edges": [-1.0 + 2.0 * i / bins for i in range(bins + 1)],
            "positive": [int(c) for c in torch.histc(pos.double().cpu(), bins=bins, min=-1.0, max=1.0).tolist()],
            "negative": [int(c) for c in neg_counts.tolist()],
        },
    )


@dataclass
class Evaluation:
    """Every figure of one evaluation of paired embeddings: ``figures`` (names as in
    ``evaluation_names``, without the ``eval/`` prefix) and the similarity histograms."""

    figures: dict[str, float]
    histograms: dict[str, list[float]]


def evaluate_embeddings(
    anchor: Tensor,
    positive: Tensor,
    *,
    labels: Tensor | None = None,
    anchor_keys: Sequence[Hashable] | None = None,
    positive_keys: Sequence[Hashable] | None = None,
    class_embeddings: Tensor | None = None,
    classified: str = "anchor",
) -> Evaluation:
    """What a run's evaluation and ``clray eval`` report for an eval split's embeddings:
    exact-pair recall (with labels: label recall), the IR figures with duplicates folded
    by the keys, the embedding geometry, and with class embeddings zero-shot accuracy of
    the ``classified`` view. One function, so training and ``clray eval`` agree."""
    figures = retrieval_metrics(anchor, positive, labels=labels)
    figures.update(ir_retrieval_metrics(anchor, positive, anchor_keys=anchor_keys, positive_keys=positive_keys))
    histograms: dict[str, list[float]] = {}
    if anchor.shape[0] >= 2:
        geometry = embedding_geometry(anchor, positive, anchor_keys=anchor_keys, positive_keys=positive_keys)
        figures.update(geometry.figures())
        histograms = geometry.histogram
    if class_embeddings is not None and labels is not None:
        figures["zero_shot_accuracy"] = zero_shot_accuracy(anchor if classified == "anchor" else positive,
                                                           class_embeddings, labels)
    return Evaluation(figures=figures, histograms=histograms)
