"""The cached training set every rank reads itself (pipelines.cached): each epoch's order,
each rank's rows of it, and batches gathered across blocks, against plain numpy; then
the blocks of a real materialised quickstart set, read as a worker reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clray.pipelines.cached import CachedEpochs, CachedRows, epoch_order, rank_rows

SIZES = [7, 0, 13, 5, 30, 1]


def blocks() -> list[dict[str, np.ndarray]]:
    out, start = [], 0
    for size in SIZES:
        ids = np.arange(start, start + size, dtype=np.int64)
        out.append({"id_key": ids, "tokens": np.stack([ids, ids * 10], axis=1)})
        start += size
    return out


@pytest.mark.parametrize("shuffle", ["none", "local", "global"])
def test_an_epoch_reads_every_row_once_the_same_on_every_rank_and_anew_each_epoch(shuffle: str) -> None:
    rows = CachedRows(blocks())
    assert rows.num_rows == sum(SIZES)
    first = epoch_order(rows.offsets, shuffle, 8, seed=3, epoch=0)
    assert sorted(first.tolist()) == list(range(rows.num_rows))
    # A function of (seed, epoch): every rank (and a resumed run) computes the same order.
    assert np.array_equal(first, epoch_order(rows.offsets, shuffle, 8, seed=3, epoch=0))
    second = epoch_order(rows.offsets, shuffle, 8, seed=3, epoch=1)
    other_seed = epoch_order(rows.offsets, shuffle, 8, seed=4, epoch=0)
    if shuffle == "none":
        assert np.array_equal(first, np.arange(rows.num_rows)) and np.array_equal(first, second)
    else:
        assert not np.array_equal(first, second) and not np.array_equal(first, other_seed)


def test_local_shuffle_mixes_rows_within_windows_of_whole_blocks() -> None:
    offsets = CachedRows(blocks()).offsets
    window = 8
    order = epoch_order(offsets, "local", window, seed=0, epoch=2)
    # The same blocks in the same (shuffled) order, then each window's rows permuted in place.
    rng = np.random.default_rng([0, 2])
    by_block = np.concatenate([np.arange(offsets[b], offsets[b + 1]) for b in rng.permutation(len(SIZES))])
    for start in range(0, len(order), window):
        assert sorted(order[start:start + window]) == sorted(by_block[start:start + window])
    assert not np.array_equal(order, by_block)


def test_ranks_take_disjoint_local_parts_of_each_global_batch() -> None:
    order = np.random.default_rng(0).permutation(53)
    steps, local, world = 3, 8, 2
    parts = [rank_rows(order, steps, local, world, rank) for rank in range(world)]
    for step in range(steps):
        global_batch = order[step * local * world:(step + 1) * local * world]
        together = np.concatenate([p[step * local:(step + 1) * local] for p in parts])
        assert np.array_equal(together, global_batch)  # rank 0's part, then rank 1's
    trained = np.concatenate(parts)
    assert len(trained) == len(set(trained.tolist())) == steps * local * world  # the 5 left over: not this epoch


def test_take_gathers_rows_across_blocks_in_the_order_asked() -> None:
    rows = CachedRows(blocks())
    want = np.array([50, 3, 7, 20, 21, 0, 55, 19, 35])
    got = rows.take(want)
    assert np.array_equal(got["id_key"], want)
    assert np.array_equal(got["tokens"], np.stack([want, want * 10], axis=1))
    one_block = rows.take(np.array([27, 25, 26]))
    assert np.array_equal(one_block["id_key"], [27, 25, 26])


def test_a_materialised_set_read_from_its_blocks(ray_session: None, tmp_path: Path) -> None:
    """The quickstart's preprocessed set as the driver caches it, read from its object refs
    as each worker reads it: both ranks' batches of an epoch together hold exactly the
    epoch's trained rows, and each batch is padded to its longest caption."""
    from clray.jobs.config import load_config
    from clray.jobs.run.data import build_run_data, check_data
    from clray.pipelines.collate import training_collate
    from clray.pipelines.quickstart import write_quickstart_corpus

    write_quickstart_corpus(tmp_path / "data")
    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / "configs" / "quickstart.toml",
                      [f'data.train="{tmp_path / "data" / "train"}"', "data.eval=[]"])
    data = build_run_data(cfg, check_data(cfg), str(tmp_path / "q.parquet"))
    assert data.cached is not None and data.cached.num_rows == data.num_rows
    steps = data.steps_per_epoch
    ranks = [CachedEpochs(data.cached, shuffle="local", shuffle_buffer=cfg.data.shuffle_buffer, seed=0,
                          steps_per_epoch=steps, local_batch=cfg.local_batch_size, world=2, rank=rank)
             for rank in range(2)]
    collate = training_collate(cfg.data)
    keys = {int(k) for block in ranks[0].rows.blocks for k in block["id_key"]}
    assert len(keys) == data.num_rows
    seen: list[int] = []
    for rank in ranks:
        batches = list(rank.batches(1, collate))
        assert len(batches) == steps
        for batch in batches:
            mask = batch["positive_attention_mask"]
            assert int(mask.sum(dim=1).max()) == mask.shape[1]  # cut to the batch's longest caption
            seen.extend(int(k) for k in batch["id_key"])
    assert len(seen) == len(set(seen)) == steps * cfg.train.global_batch_size and set(seen) <= keys
    # A resumed epoch starts at its step and reads what the first start would have read there.
    resumed = next(ranks[1].batches(1, collate, start_step=3))
    assert np.array_equal(resumed["id_key"].numpy(), list(ranks[1].batches(1, collate))[3]["id_key"].numpy())
