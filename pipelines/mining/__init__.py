"""Batch mining (issue 4, the B3 idea): teacher embeddings -> kNN graph -> communities ->
batches rich in hard negatives, plus mined hard negatives per anchor.

Pure, seeded numpy-in/numpy-out functions; the Ray job (``clray mine``) calls them.
"""

from clray.pipelines.mining.batching import (
    BatchPlan,
    batch_stats,
    communities,
    plan_batches,
    random_plan,
)
from clray.pipelines.mining.core import (
    DEFAULT_EXACT_THRESHOLD,
    NegativeSample,
    build_index,
    candidate_mask,
    false_negative_rate,
    knn,
    knn_range,
    sample_negatives,
    similarity_graph,
)

__all__ = [
    "DEFAULT_EXACT_THRESHOLD",
    "BatchPlan",
    "NegativeSample",
    "batch_stats",
    "build_index",
    "candidate_mask",
    "communities",
    "false_negative_rate",
    "knn",
    "knn_range",
    "plan_batches",
    "random_plan",
    "sample_negatives",
    "similarity_graph",
]
