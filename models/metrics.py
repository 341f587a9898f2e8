"""Retrieval and zero-shot evaluation on embeddings, in bounded memory.

Evaluation sets reach tens of thousands of pairs, whose full N x N similarity matrix
would be gigabytes; every function here walks the query rows in chunks so peak memory
is ``chunk x N`` whatever N is. Scores are dot products: pass L2-normalised embeddings
(what :class:`models.dual_encoder.DualEncoder` returns) to rank by cosine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

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


@torch.no_grad()
def retrieval_metrics(
    anchor_emb: Tensor,
    positive_emb: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    labels: Tensor | Sequence[Any] | None = None,
) -> dict[str, float]:
    """Recall@k in both directions for paired rows (row i's match is row i).

    ``a2p_R@k``: an anchor finds its own positive among all positives in the top k;
    ``p2a_R@k`` the reverse. With ``labels`` (one per pair) also ``a2p_label_R@1`` /
    ``p2a_label_R@1``: the top hit has the query's label, the number that matters when
    several items legitimately match (same class, duplicate captions).
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
