"""pipelines/synthetic.py: the clustered (query, passage) corpus (no Ray, no model)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clray.models.config import TextTowerConfig
from clray.models.preprocess import build_char_tokenizer
from clray.pipelines import row_problems
from clray.pipelines.config import DataConfig
from clray.pipelines.synthetic import (
    MAX_CHARS,
    SCHEMA,
    TOPICS,
    cluster_words,
    clustered_rows,
    write_clustered_corpus,
)

TEXT_TOWER = TextTowerConfig(config={"model_type": "bert"}, max_length=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clustered")
    info = write_clustered_corpus(out, num_rows=1000, num_clusters=16, eval_rows=160, num_shards=3, bad_rows=4)
    return out, info


def read(files: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in files])


def words(text: str) -> set[str]:
    for ch in ",:()":
        text = text.replace(ch, " ")
    return set(text.split())


def test_files_schema_and_counts(corpus: tuple[Path, dict]) -> None:
    out, info = corpus
    assert info["train_files"] == [str(out / "train" / f"part-{i:05d}.parquet") for i in range(3)]
    assert info["eval_files"] == [str(out / "eval" / "part-00000.parquet")]
    for f in info["train_files"] + info["eval_files"]:
        assert pq.read_schema(f).equals(SCHEMA)
    train, ev = read(info["train_files"]), read(info["eval_files"])
    assert (train.num_rows, ev.num_rows) == (1000 + 4, 160)
    assert (info["train_rows"], info["eval_rows"], info["bad_rows"]) == (1000, 160, 4)
    assert info["num_clusters"] == 16 and info["cluster_names"] == [name for name, _ in TOPICS[:16]]
    ids = train.column("id").to_pylist() + ev.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    # balanced clusters in both splits
    for table in (train, ev):
        good = [lab for i, lab in zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True)
                if not i.startswith("bad-")]
        counts = Counter(good)
        assert set(counts) == set(range(16)) and max(counts.values()) - min(counts.values()) <= 1


def test_bad_rows_are_quarantined(corpus: tuple[Path, dict]) -> None:
    out, info = corpus
    assert info["bad_row_kinds"] == {"bad-0000": "null passage", "bad-0001": "empty query",
                                     "bad-0002": "null query", "bad-0003": "empty passage"}
    cfg = DataConfig.model_validate({
        "train": str(out / "train"), "anchor": {"column": "query", "kind": "text"},
        "positive": {"column": "passage", "kind": "text"}, "label_column": "label",
        "class_names": info["cluster_names"],
    })
    train = read(info["train_files"])
    problems = dict(zip(train.column("id").to_pylist(), row_problems(train, cfg, TEXT_TOWER, TEXT_TOWER), strict=True))
    assert {i: p for i, p in problems.items() if p is not None} == {
        "bad-0000": "passage: null text", "bad-0001": "query: empty text",
        "bad-0002": "query: null text", "bad-0003": "passage: empty text",
    }
    # spread over the shards
    assert all(any(i.startswith("bad-") for i in pq.read_table(f).column("id").to_pylist())
               for f in info["train_files"])


def test_clusters_details_and_lengths() -> None:
    train, ev = clustered_rows(640, 64, 128, seed=5)
    assert [r["id"] for r in train[:2]] == ["train-000000", "train-000001"]
    details = []
    for row in train + ev:
        q, p = row["query"], row["passage"]
        assert 0 < len(q) <= MAX_CHARS < 64 and 0 < len(p) <= MAX_CHARS and q.isascii() and p.isascii()
        vocab = set(cluster_words(row["label"]))
        qw, pw = words(q) & vocab, words(p) & vocab
        # topic words of the row's own cluster only, disjoint between query and passage
        assert len(qw) == 3 and len(pw) == 3 and not qw & pw
        others = {w for c in range(len(TOPICS)) if c != row["label"] for w in cluster_words(c)}
        assert not (words(q) | words(p)) & others
        # the shared detail: one capitalised made-up name, in both texts
        names = [w for w in words(q) | words(p) if w[0].isupper()]
        assert len(names) == 1 and names[0] in words(q) and names[0] in words(p) and names[0].isalpha()
        details.append(names[0])
    assert len(set(details)) == len(details)  # unique across train and eval
    assert {r["label"] for r in ev} == set(range(64))


def test_char_tokenizer_sees_whole_texts() -> None:
    train, _ = clustered_rows(256, 64, 0, seed=1)
    tok = build_char_tokenizer()
    enc = tok([r["passage"] for r in train] + [r["query"] for r in train], truncation=True, max_length=64)
    assert all(tok.unk_token_id not in ids and len(ids) <= 64 for ids in enc["input_ids"])
    assert all(len(ids) == len(t) + 2 for ids, t in zip(enc["input_ids"], [r["passage"] for r in train], strict=False))


def test_deterministic(tmp_path: Path) -> None:
    a = write_clustered_corpus(tmp_path / "a", num_rows=300, num_clusters=8, eval_rows=40, seed=3)
    b = write_clustered_corpus(tmp_path / "b", num_rows=300, num_clusters=8, eval_rows=40, seed=3)
    c = write_clustered_corpus(tmp_path / "c", num_rows=300, num_clusters=8, eval_rows=40, seed=4)
    for fa, fb in zip(a["train_files"] + a["eval_files"], b["train_files"] + b["eval_files"], strict=True):
        assert pq.read_table(fa).equals(pq.read_table(fb))
    assert not read(a["train_files"]).equals(read(c["train_files"]))


def test_no_eval_and_bad_arguments(tmp_path: Path) -> None:
    info = write_clustered_corpus(tmp_path / "x", num_rows=10, num_clusters=3, eval_rows=0, num_shards=1, bad_rows=0)
    assert info["eval_files"] == [] and read(info["train_files"]).num_rows == 10
    for kwargs, word in (({"num_clusters": len(TOPICS) + 1}, "num_clusters"), ({"num_rows": 0}, "num_rows"),
                         ({"eval_rows": -1}, "eval_rows"), ({"num_shards": 0}, "num_shards"),
                         ({"bad_rows": -1}, "bad_rows")):
        with pytest.raises(ValueError, match=word):
            write_clustered_corpus(tmp_path / "y", **kwargs)
