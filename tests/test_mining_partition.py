"""B3's batch construction (pipelines/mining/partition.py): mutual edges, METIS parts of
exactly one batch, TAS-B groups and random-row mixing, and the per-plan statistics of
the global batch (pipelines/mining/plans.py), on a synthetic clustered corpus."""

from __future__ import annotations

import numpy as np
import pytest

from clray.pipelines.mining import knn, random_plan, similarity_graph
from clray.pipelines.mining.config import MiningConfig
from clray.pipelines.mining.core import candidate_mask
from clray.pipelines.mining.partition import balanced_parts, metis_plan, mutual_mask
from clray.pipelines.mining.plans import Embeddings, make_plans, plan_statistics, top_pairs

N, D, C = 1500, 64, 30


def _normalise(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    centres = _normalise(rng.standard_normal((C, D)))
    labels = rng.integers(0, C, N)
    anchors = _normalise(centres[labels] + 0.15 * rng.standard_normal((N, D)))
    positives = _normalise(anchors + 0.05 * rng.standard_normal((N, D)))
    nb, sims = knn(positives, 130, queries=anchors)
    return Embeddings(ids=[f"{i:05d}" for i in range(N)], anchors=anchors, positives=positives, labels=labels), nb, sims


def _graph(nb, sims, mutual=True):
    mask = candidate_mask(nb, sims, None, 30, 130)
    if mutual:
        mask = mutual_mask(nb, mask)
    return similarity_graph(nb, sims, mask=mask)


def _covers(plan, n, batch_size):
    assert all(len(b) == batch_size for b in plan.batches)
    ids = np.concatenate(plan.batches + [plan.remainder])
    assert np.array_equal(np.sort(ids), np.arange(n))


def test_mutual_mask_keeps_only_pairs_each_in_the_others_window():
    nb = np.array([[1, 2], [0, 2], [1, 0]])
    mask = np.ones_like(nb, dtype=bool)
    mask[2, 1] = False  # 2 does not keep 0, so 0 -> 2 is not mutual
    out = mutual_mask(nb, mask)
    assert out.tolist() == [[True, False], [True, True], [True, False]]


def test_balanced_parts_are_exactly_one_batch_and_follow_the_clusters(corpus):
    emb, nb, sims = corpus
    edges, weights = _graph(nb, sims)
    labels, info = balanced_parts(N, edges, weights, 64, seed=0)
    assert info["parts"] == N // 64
    assert np.bincount(labels[labels >= 0]).tolist() == [64] * (N // 64)
    assert int((labels < 0).sum()) == N % 64
    # parts are far purer than random batches of the same size
    same = np.mean([np.mean(emb.labels[labels == p][:, None] == emb.labels[labels == p][None, :])
                    for p in range(info["parts"])])
    assert same > 3 / C  # random batches: about 1 / C


@pytest.mark.parametrize("groups,fraction", [(1, 0.0), (4, 0.0), (1, 0.25)])
def test_metis_plans_cover_every_row_once(corpus, groups, fraction):
    _, nb, sims = corpus
    edges, weights = _graph(nb, sims)
    plan = metis_plan(N, edges, weights, 64, seed=3, groups_per_batch=groups, random_fraction=fraction)
    _covers(plan, N, 64)
    assert plan.info["groups_per_batch"] == groups and plan.info["random_rows_per_batch"] == round(fraction * 64)
    again = metis_plan(N, edges, weights, 64, seed=3, groups_per_batch=groups, random_fraction=fraction)
    assert all(np.array_equal(a, b) for a, b in zip(plan.batches, again.batches, strict=True))


def test_groups_and_random_rows_make_batches_less_pure(corpus):
    emb, nb, sims = corpus
    edges, weights = _graph(nb, sims)
    keys = top_pairs(nb)
    pos = np.einsum("ij,ij->i", emb.anchors, emb.positives)

    def sim(**options):
        return plan_statistics(emb, metis_plan(N, edges, weights, 64, seed=0, **options), pos, keys)

    one, four, mixed = sim(), sim(groups_per_batch=4), sim(random_fraction=0.5)
    rand = plan_statistics(emb, random_plan(N, 64, seed=0), pos, keys)
    assert rand["negative_similarity"] < four["negative_similarity"] < one["negative_similarity"]
    assert rand["negative_similarity"] < mixed["negative_similarity"] < one["negative_similarity"]
    assert rand["mutual_top30"] < one["mutual_top30"]


def test_make_plans_reports_each_plan_for_the_global_batch(corpus):
    emb, nb, sims = corpus
    cfg = MiningConfig(batch_size=64, num_workers=2, epochs=2)
    plans, stats = make_plans(emb, nb, sims, cfg, 130)
    assert stats["partition"]["method"] == "metis" and stats["graph"]["window"] == [30, 130]
    assert stats["global_batch"] == {"rows": 64, "num_workers": 2, "local_batch_size": 32}
    assert len(stats["plans"]) == 2
    for entry, plan in zip(stats["plans"], plans, strict=True):
        _covers(plan.plan, N, 64)
        assert set(entry["mined"]) == {"negative_similarity", "teacher_above_positive", "mutual_top30"}
        assert entry["similarity_ratio"] > 1.5
        assert entry["mined"]["mutual_top30"] > entry["random"]["mutual_top30"]


def test_mining_config_checks_the_global_batch():
    with pytest.raises(ValueError, match="not a multiple of num_workers = 3"):
        MiningConfig(batch_size=64, num_workers=3)
    with pytest.raises(ValueError, match='need partition = "metis"'):
        MiningConfig(batch_size=64, partition="leiden", groups_per_batch=2)
    assert MiningConfig(batch_size=64, num_workers=2).local_batch_size == 32
