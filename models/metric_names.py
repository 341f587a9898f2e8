"""The names of the figures an evaluation reports, without torch: a config that names
one (a search's metric, ``train.select_by``) is checked on the driver before anything
heavier is imported."""

from __future__ import annotations

IR_RECALL_AT: tuple[int, ...] = (1, 5, 10)
"""The cutoffs of the IR Recall@k and Accuracy@k figures."""
MRR_AT = 10
NDCG_AT = 10
MAP_AT = 100
GEOMETRY_NAMES = ("alignment", "uniformity", "uniformity_anchor", "uniformity_positive", "modality_gap",
                  "pos_sim", "neg_sim")


def evaluation_names(labels: bool, zero_shot: bool) -> list[str]:
    """The figures an evaluation reports (without the ``eval/`` prefix), for checking a
    metric a config names (a search's metric, ``train.select_by``) before any run."""
    names = [f"{d}_R@{k}" for d in ("a2p", "p2a") for k in (1, 5, 10)]
    if labels:
        names += ["a2p_label_R@1", "p2a_label_R@1"]
    ir = [f"R@{k}" for k in IR_RECALL_AT] + [f"Acc@{k}" for k in IR_RECALL_AT]
    ir += [f"MRR@{MRR_AT}", f"nDCG@{NDCG_AT}", f"MAP@{MAP_AT}"]
    names += [f"{d}_ir_{figure}" for d in ("a2p", "p2a") for figure in ir]
    names += list(GEOMETRY_NAMES)
    if labels and zero_shot:
        names.append("zero_shot_accuracy")
    return names
