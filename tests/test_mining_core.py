"""The batch-mining core (pipelines/mining) on a synthetic clustered corpus and hand-built
edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from clray.pipelines.mining import (
    batch_stats,
    build_index,
    candidate_mask,
    communities,
    false_negative_rate,
    knn,
    knn_range,
    plan_batches,
    random_plan,
    sample_negatives,
    similarity_graph,
)

N, D, C = 2000, 384, 40


def _normalise(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    centres = _normalise(rng.standard_normal((C, D)))
    labels = rng.integers(0, C, N)
    emb = _normalise(centres[labels] + 0.06 * rng.standard_normal((N, D)))
    return emb, labels


@pytest.fixture(scope="module")
def exact(corpus):
    emb, _ = corpus
    return knn(emb, 30, index="flat")


def _check_plan(plan, n, batch_size):
    assert all(len(b) == batch_size for b in plan.batches)
    assert plan.num_remainder == n % batch_size
    ids = np.concatenate(plan.batches + [plan.remainder])
    assert np.array_equal(np.sort(ids), np.arange(n))


def test_knn_exact_matches_brute_force(corpus, exact):
    emb, _ = corpus
    nb, sims = exact
    s = emb @ emb.T
    np.fill_diagonal(s, -np.inf)
    ref = np.argsort(-s, axis=1, kind="stable")[:, :30]
    ref_s = np.take_along_axis(s, ref, axis=1)
    assert nb.dtype == np.int64 and nb.shape == (N, 30) and sims.dtype == np.float32
    assert not (nb == np.arange(N)[:, None]).any()
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    # ids may differ only between tied similarities
    assert (nb == ref).mean() > 0.999


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall(corpus, exact, kind):
    emb, _ = corpus
    nb, _ = knn(emb, 10, index=kind)
    ref = exact[0][:, :10]
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(nb, ref, strict=True)])
    assert recall >= 0.9, recall


def test_knn_range_splits_queries(corpus, exact):
    emb, _ = corpus
    idx = build_index(emb, index="flat")
    parts = [knn_range(idx, emb, a, b, 30, batch_size=128) for a, b in [(0, 700), (700, 1500), (1500, N)]]
    nb = np.concatenate([p[0] for p in parts])
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), exact[1], atol=1e-6)
    assert (nb == exact[0]).mean() > 0.999


def test_auto_index_choice(corpus):
    emb, _ = corpus
    import faiss

    assert isinstance(build_index(emb, exact_threshold=5000), faiss.IndexFlatIP)
    assert faiss.try_extract_index_ivf(build_index(emb, exact_threshold=1000)) is not None


def test_rank_window_and_margin_filter():
    nb = np.array([[1, 2, 3, 4, 5], [0, 2, 3, 4, -1]])
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.95, 0.85, 0.75, 0.65, -np.inf]], dtype=np.float32)
    m = candidate_mask(nb, sims, rank_min=1, rank_max=4)
    assert m.tolist() == [[False, True, True, True, False], [False, True, True, True, False]]
    # positive 0.8, margin 0.05 -> keep sims <= 0.76
    m = candidate_mask(nb, sims, positive_sims=np.array([0.8, 0.8]), margin=0.05)
    assert m.tolist() == [[False, False, True, True, True], [False, False, True, True, False]]
    # rows 2..5 (ids must be < n): every candidate above their positive, so all filtered
    nb6 = np.concatenate([nb, np.tile([0, 1, 2, 3, 4], (4, 1))])
    sims6 = np.concatenate([sims, np.full((4, 5), 0.5, np.float32)])
    pos6 = np.array([0.8, 0.8, 0.1, 0.1, 0.1, 0.1])
    edges, w = similarity_graph(nb6, sims6, positive_sims=pos6, margin=0.05)
    assert edges.tolist() == [[0, 3], [0, 4], [0, 5], [1, 3], [1, 4]]
    np.testing.assert_allclose(w, [0.7, 0.6, 0.5, 0.75, 0.65])


def test_graph_symmetrised_keeps_max():
    nb = np.array([[1], [0], [0]])
    sims = np.array([[0.5], [0.7], [0.2]], dtype=np.float32)
    edges, w = similarity_graph(nb, sims)
    assert edges.tolist() == [[0, 1], [0, 2]]
    np.testing.assert_allclose(w, [0.7, 0.2])


def test_mined_batches_are_harder_than_random(corpus, exact):
    emb, labels = corpus
    nb, sims = exact
    edges, w = similarity_graph(nb, sims, rank_min=0, rank_max=20)
    comm, info = communities(N, edges, w, target_size=64, seed=0)
    assert comm.shape == (N,) and info["num_communities"] >= 2
    plan = plan_batches(comm, 64, seed=0, edges=edges, weights=w)
    _check_plan(plan, N, 64)
    mined = batch_stats(emb, plan, labels)
    rand = batch_stats(emb, random_plan(N, 64, seed=0), labels)
    assert mined["mean_negative_sim"] >= 3 * rand["mean_negative_sim"], (mined, rand)
    assert mined["false_negative_rate"] > rand["false_negative_rate"]


def test_plans_cover_every_row_and_depend_on_seed():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 17, 1003)
    a, b, c = plan_batches(labels, 32, seed=0), plan_batches(labels, 32, seed=0), plan_batches(labels, 32, seed=1)
    for p in (a, b, c):
        _check_plan(p, 1003, 32)
    assert a.num_remainder == 1003 % 32
    assert all(np.array_equal(x, y) for x, y in zip(a.batches, b.batches, strict=True))
    assert np.array_equal(a.remainder, b.remainder)
    assert not all(np.array_equal(x, y) for x, y in zip(a.batches, c.batches, strict=True))
    _check_plan(random_plan(1003, 32, seed=3), 1003, 32)
    # a community larger than a batch is split, singletons merge; exact multiple: no remainder
    p = plan_batches(np.array([0] * 70 + list(range(1, 11))), 20, seed=0)
    _check_plan(p, 80, 20)
    assert p.num_remainder == 0 and p.info["whole_community_batches"] == 3


def test_leftover_pieces_merge_with_graph_neighbours():
    labels = np.repeat(np.arange(4), 5)
    # communities 0-2 and 1-3 are linked
    edges = np.array([[0, 10], [1, 11], [5, 15], [6, 16]])
    for seed in range(5):
        p = plan_batches(labels, 10, seed=seed, edges=edges, weights=np.ones(4))
        _check_plan(p, 20, 10)
        groups = sorted(sorted(set(labels[b].tolist())) for b in p.batches)
        assert groups == [[0, 2], [1, 3]], groups


def test_communities_isolated_nodes_are_singletons():
    labels, _ = communities(5, np.array([[0, 1]]), np.array([0.9]), target_size=2)
    assert labels[0] == labels[1] and len(set(labels.tolist())) == 4
    labels, _ = communities(3, np.empty((0, 2), dtype=np.int64), np.empty(0), target_size=2)
    assert sorted(labels.tolist()) == [0, 1, 2]


def test_sample_negatives_top_vs_random(corpus, exact):
    emb, labels = corpus
    nb, sims = exact
    mask = candidate_mask(nb, sims, rank_min=2, rank_max=30)
    top = sample_negatives(nb, sims, mask, 5, "top")
    assert np.array_equal(top.idx, nb[:, 2:7]) and top.shortfall_rows == 0
    r1 = sample_negatives(nb, sims, mask, 5, "random", seed=0)
    r2 = sample_negatives(nb, sims, mask, 5, "random", seed=0)
    r3 = sample_negatives(nb, sims, mask, 5, "random", seed=1)
    assert np.array_equal(r1.idx, r2.idx) and not np.array_equal(r1.idx, r3.idx)
    assert np.all(np.isin(r1.idx[0], nb[0, 2:30]))
    assert np.nanmean(r1.sims) < np.nanmean(top.sims)
    # each random row is in rank order (similarity non-increasing)
    assert np.all(np.diff(r1.sims, axis=1) <= 1e-6)
    assert 0 <= false_negative_rate(labels, top.idx) <= 1
    # a row with fewer candidates: what exists, the shortfall counted
    small = sample_negatives(np.array([[1, 2, -1], [0, 2, 1]]), np.zeros((2, 3), np.float32),
                             np.array([[True, True, True], [False, False, True]]), 3)
    assert small.idx.tolist() == [[1, 2, -1], [1, -1, -1]]
    assert small.count.tolist() == [2, 1] and small.shortfall_rows == 2 and small.missing == 3


def test_margin_filter_lowers_false_negatives(corpus, exact):
    emb, labels = corpus
    nb, sims = exact
    # pretend each row's positive is its nearest neighbour
    pos = sims[:, 0]
    plain = sample_negatives(nb, sims, candidate_mask(nb, sims, rank_min=1), 5)
    filt = sample_negatives(nb, sims, candidate_mask(nb, sims, pos, rank_min=1, margin=0.05), 5)
    assert np.all(filt.sims[np.isfinite(filt.sims)] <= np.repeat(pos * 0.95, 5).reshape(-1, 5)[np.isfinite(filt.sims)] + 1e-6)
    assert np.nanmean(filt.sims) < np.nanmean(plain.sims)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda e: knn(e, 0), "k"),
        (lambda e: knn(e, 5, index="kd"), "index"),
        (lambda e: knn(e * 2, 5), "embeddings"),
        (lambda e: knn(e[0], 5), "embeddings"),
        (lambda e: knn(e, 5, index="ivf", nprobe=0), "nprobe"),
        (lambda e: candidate_mask(np.zeros((2, 3), int), np.zeros((2, 3)), rank_min=4), "rank_min"),
        (lambda e: candidate_mask(np.zeros((2, 3), int), np.zeros((2, 3)), rank_min=2, rank_max=1), "rank_max"),
        (lambda e: candidate_mask(np.zeros((2, 3), int), np.zeros((2, 3)), margin=1.5), "margin"),
        (lambda e: candidate_mask(np.zeros((2, 3), int), np.zeros((2, 3)), positive_sims=np.zeros(3)), "positive_sims"),
        (lambda e: similarity_graph(np.zeros((2, 3), int), np.zeros((2, 2))), "sims"),
        (lambda e: similarity_graph(np.full((2, 3), 7), np.zeros((2, 3))), "neighbours"),
        (lambda e: communities(3, np.array([[0, 5]]), np.ones(1), 2), "edges"),
        (lambda e: communities(3, np.array([[0, 1]]), np.ones(1), 0), "target_size"),
        (lambda e: plan_batches(np.array([0, 1]), 0), "batch_size"),
        (lambda e: plan_batches(np.array([-1, 1]), 2), "labels"),
        (lambda e: random_plan(0, 2), "n"),
        (lambda e: plan_batches(np.array([0, 1]), 1, edges=np.array([[0, 9]])), "edges"),
        (lambda e: sample_negatives(np.zeros((2, 3), int), np.zeros((2, 3)), np.ones((2, 3), bool), 0), "num_negatives"),
        (lambda e: sample_negatives(np.zeros((2, 3), int), np.zeros((2, 3)), np.ones((2, 3), bool), 2, "best"), "strategy"),
    ],
)
def test_bad_arguments_name_the_parameter(corpus, call, name):
    emb, _ = corpus
    with pytest.raises(ValueError, match=name):
        call(emb[:100])
