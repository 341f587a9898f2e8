"""pipelines/: the quickstart corpus, shard resolution, schema and row checks (no Ray),
then a few integration tests on one shared local Ray (``ray_session``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data.dataset import MaterializedDataset

from clray.models.config import ConvTowerConfig, TextTowerConfig
from clray.models.preprocess import ImageDecodeError, decode_image
from clray.pipelines import (
    CLASS_NAMES,
    DataError,
    build_datasets,
    check_schema,
    data_task_cpus,
    local_shuffle_buffer_size,
    quarantine_pass,
    read_shards,
    resolve_shards,
    resolve_spec,
    row_problems,
    split_spec,
    steps_per_epoch,
    write_quickstart_corpus,
)
from clray.pipelines.config import DataConfig
from clray.pipelines.dataset import sibling_quarantine_path
from clray.pipelines.quickstart import CAPTION_TEMPLATES

IMAGE_TOWER = ConvTowerConfig(image_size=8, image_mode="L", channels=[4])
TEXT_TOWER = TextTowerConfig(config={"model_type": "bert"}, max_length=24)
EXPECTED_BAD = {
    "bad-0000": "caption: null text",
    "bad-0001": "caption: empty text",
    "bad-0002": "image: undecodable image",
    "bad-0003": "image: null image",
}


def data_config(corpus: Path, **overrides: object) -> DataConfig:
    fields: dict[str, object] = {
        "train": str(corpus / "train"),
        "eval": str(corpus / "eval"),
        "anchor": {"column": "image", "kind": "image"},
        "positive": {"column": "caption", "kind": "text"},
        "label_column": "label",
        "class_names": CLASS_NAMES,
        "preprocess_batch_size": 128,
    }
    fields.update(overrides)
    return DataConfig.model_validate(fields)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_quickstart_corpus(out)
    return out


def read_dir(path: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted(path.glob("*.parquet")))


# --- quickstart corpus -------------------------------------------------------------


def test_quickstart_counts_split_and_bad_rows(corpus: Path) -> None:
    info = write_quickstart_corpus(corpus / "again")
    assert info["train_rows"] + info["eval_rows"] == 1797
    assert len(info["train_files"]) == 4 and len(info["eval_files"]) == 1
    assert info["class_names"] == CLASS_NAMES
    assert info["bad_rows"] == 4 and set(info["bad_row_kinds"]) == set(EXPECTED_BAD)

    train, held_out = read_dir(corpus / "train"), read_dir(corpus / "eval")
    assert train.schema.names == ["id", "image", "caption", "label"]
    assert train.schema.field("image").type == pa.binary()
    assert train.schema.field("label").type == pa.int64()
    assert train.num_rows == info["train_rows"] + 4
    assert held_out.num_rows == info["eval_rows"]
    # Bad rows are spread over the train shards, never in eval.
    ids = train.column("id").to_pylist()
    assert {i for i in ids if i.startswith("bad-")} == set(EXPECTED_BAD)
    assert not set(ids) & set(held_out.column("id").to_pylist())
    # Stratified: every class holds out round(20%) of its rows.
    good = train.filter(pa.compute.invert(pa.compute.starts_with(train.column("id"), "bad-")))
    for label in range(10):
        n_train = int(np.sum(good.column("label").to_numpy() == label))
        n_eval = int(np.sum(held_out.column("label").to_numpy() == label))
        assert n_eval == round((n_train + n_eval) * 0.2)


def test_quickstart_is_deterministic(tmp_path: Path) -> None:
    write_quickstart_corpus(tmp_path / "a", seed=3, num_shards=2, bad_rows=0)
    write_quickstart_corpus(tmp_path / "b", seed=3, num_shards=2, bad_rows=0)
    write_quickstart_corpus(tmp_path / "c", seed=4, num_shards=2, bad_rows=0)
    for split in ("train", "eval"):
        assert read_dir(tmp_path / "a" / split).equals(read_dir(tmp_path / "b" / split))
    assert not read_dir(tmp_path / "a" / "train").equals(read_dir(tmp_path / "c" / "train"))


def test_quickstart_images_decode_and_captions_vary(corpus: Path) -> None:
    table = read_dir(corpus / "eval")
    pixels = decode_image(table.column("image")[0].as_py(), IMAGE_TOWER)
    assert pixels.shape == (1, 8, 8) and pixels.max() == pytest.approx(1.0)
    for image in table.column("image").to_pylist():
        decode_image(image, IMAGE_TOWER)
    captions = table.column("caption").to_pylist()
    labels = table.column("label").to_pylist()
    for caption, label in zip(captions, labels, strict=True):
        assert CLASS_NAMES[label] in caption or str(label) in caption
    assert len(set(captions)) >= 10 * 10 // 2
    assert len(CAPTION_TEMPLATES) >= 10


def test_quickstart_bad_image_does_not_decode(corpus: Path) -> None:
    table = read_dir(corpus / "train")
    row = table.filter(pa.compute.equal(table.column("id"), "bad-0002")).to_pylist()[0]
    with pytest.raises(ImageDecodeError):
        decode_image(row["image"], IMAGE_TOWER)


# --- resolve_shards ----------------------------------------------------------------


def touch_parquet(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": [1]}), path)
    return path


def test_resolve_dir_glob_and_files(tmp_path: Path) -> None:
    a = touch_parquet(tmp_path / "d" / "b.parquet")
    b = touch_parquet(tmp_path / "d" / "sub" / "a.parquet")
    touch_parquet(tmp_path / "d" / "_tmp" / "junk.parquet")
    touch_parquet(tmp_path / "d" / ".hidden.parquet")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    (tmp_path / "d" / "notes.txt").write_text("")
    odd = tmp_path / "e" / "shard.pq"
    touch_parquet(odd)

    assert resolve_shards([str(tmp_path / "d")], "data.train") == sorted([str(a), str(b)])
    assert resolve_shards([str(tmp_path / "d" / "**" / "*.parquet")], "data.train") == sorted(
        [str(a), str(b), str(tmp_path / "d" / "_tmp" / "junk.parquet")]
    )
    # Explicit files are taken whatever their extension; duplicates collapse; sorted.
    got = resolve_shards([str(odd), str(a), str(tmp_path / "d")], "data.train")
    assert got == sorted({str(a), str(b), str(odd)})
    relative = os.path.relpath(a)
    assert resolve_shards([relative], "data.train") == [str(a)]


@pytest.mark.parametrize(
    "spec, phrase",
    [
        ("missing-dir", "does not exist"),
        ("empty", "contains no .parquet files"),
        ("*.nothing", "matches no files"),
        ("gs://bucket/train", "unsupported URI scheme"),
    ],
)
def test_resolve_errors_name_key_and_spec(tmp_path: Path, spec: str, phrase: str) -> None:
    (tmp_path / "empty").mkdir()
    full = spec if "://" in spec else str(tmp_path / spec)
    with pytest.raises(DataError) as err:
        resolve_shards([full], "data.eval")
    assert "data.eval" in str(err.value) and full in str(err.value) and phrase in str(err.value)


# --- check_schema ------------------------------------------------------------------


def test_check_schema_reports_every_problem_with_file_column_and_key(tmp_path: Path, corpus: Path) -> None:
    good = str(corpus / "eval" / "part-00000.parquet")
    renamed = tmp_path / "renamed.parquet"
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"], "text": ["hi"], "label": [1]}), renamed)
    wrong_types = tmp_path / "types.parquet"
    pq.write_table(
        pa.table({"id": ["a"], "image": ["/path/to.png"], "caption": [b"hi"], "label": [1.0]}),
        wrong_types,
    )
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really parquet")
    cfg = data_config(corpus)

    check_schema(split_spec(cfg, "train", [good]))  # a good file passes
    with pytest.raises(DataError) as err:
        check_schema(split_spec(cfg, "train", [good, str(renamed), str(wrong_types), str(corrupt)]))
    problems = err.value.problems
    assert len(problems) == 5, problems
    missing = next(p for p in problems if "no column" in p)
    for part in (str(renamed), "'caption'", "data.positive.column", "'text'", "'image'"):
        assert part in missing
    image_type = next(p for p in problems if "'image'" in p and "type" in p)
    assert str(wrong_types) in image_type and "data.anchor.column" in image_type
    assert "string" in image_type and "binary" in image_type
    text_type = next(p for p in problems if "'caption'" in p and "type" in p)
    assert "binary" in text_type and "string column" in text_type
    label_type = next(p for p in problems if "column 'label'" in p)
    assert "double" in label_type and "data.label_column" in label_type and "int64" in label_type
    corrupt_line = next(p for p in problems if str(corrupt) in p)
    assert "data.train" in corrupt_line and "cannot read" in corrupt_line


# --- row_problems ------------------------------------------------------------------


def test_row_problems_on_hand_built_table(corpus: Path) -> None:
    png = read_dir(corpus / "eval").column("image")[0].as_py()
    table = pa.table(
        {
            "id": ["ok", "a", "b", "c", "d", None, "f", "g", "h"],
            "image": [png, png, png, png[:20], None, png, png, b"", png],
            "caption": ["a two", None, " \t ", "fine", "fine", "fine", "fine", "fine", ""],
            "label": [2, 2, 2, 2, 2, 2, None, 12, 2],
        },
        schema=pa.schema(
            [("id", pa.string()), ("image", pa.binary()), ("caption", pa.string()), ("label", pa.int64())]
        ),
    )
    problems = row_problems(table, data_config(corpus), IMAGE_TOWER, TEXT_TOWER)
    assert problems == [
        None,
        "caption: null text",
        "caption: empty text",
        "image: undecodable image",
        "image: null image",
        "id: null id",
        "label: null label",
        "image: empty image bytes; label: label out of range",
        "caption: empty text",
    ]
    # Without decoding, only the truncated image passes the cheap checks.
    cheap = row_problems(table, data_config(corpus), IMAGE_TOWER, TEXT_TOWER, decode_images=False)
    assert cheap[3] is None and cheap[:3] == problems[:3] and cheap[4:] == problems[4:]


def test_row_problems_flags_non_string_text(corpus: Path) -> None:
    cfg = data_config(corpus, anchor={"column": "a", "kind": "text"}, label_column=None, class_names=[])
    table = pa.table({"id": [1, 2], "a": [5, None], "caption": ["x", "y"]})
    problems = row_problems(table, cfg, TEXT_TOWER, TEXT_TOWER)
    assert problems == ["a: not a string (int)", "a: null text"]


# --- planning helpers --------------------------------------------------------------


def test_steps_per_epoch_and_shuffle_settings(corpus: Path) -> None:
    assert steps_per_epoch(1438, 128) == 11
    assert steps_per_epoch(256, 128) == 2
    with pytest.raises(DataError, match="fewer than one global batch.*train.global_batch_size"):
        steps_per_epoch(100, 128)
    cfg = data_config(corpus, shuffle="local", shuffle_buffer=64)
    assert local_shuffle_buffer_size(cfg) == 64
    assert local_shuffle_buffer_size(data_config(corpus, shuffle="global")) is None
    assert data_task_cpus(cfg) == 0.5
    assert data_task_cpus(data_config(corpus, num_cpus=0.25)) == 0.25
    assert sibling_quarantine_path("/r/quarantine.parquet", "eval") == Path("/r/quarantine-eval.parquet")


# --- with Ray ----------------------------------------------------------------------


@pytest.mark.integration
def test_quarantine_pass_records_exactly_the_bad_rows(ray_session: None, corpus: Path, tmp_path: Path) -> None:
    cfg = data_config(corpus)
    files = resolve_shards(cfg.train, "data.train")
    out = tmp_path / "q" / "quarantine.parquet"
    report = quarantine_pass(
        read_shards(split_spec(cfg, "train", files), include_paths=True), cfg, IMAGE_TOWER, TEXT_TOWER, quarantine_path=out
    )
    assert report.total_rows == 1442 and report.valid_rows == 1438 and report.quarantined_rows == 4
    assert report.reasons == {reason: 1 for reason in EXPECTED_BAD.values()}
    assert report.quarantine_path == str(out)
    rows = pq.read_table(out).to_pylist()
    assert {r["id"]: r["reason"] for r in rows} == EXPECTED_BAD
    shard_of = {i: f for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()}
    assert all(r["file"] == shard_of[r["id"]] for r in rows)

    # A clean split writes no file and removes a stale one from an earlier run.
    clean = quarantine_pass(
        read_shards(split_spec(cfg, "eval", resolve_shards(cfg.eval, "data.eval")), include_paths=True),
        cfg,
        IMAGE_TOWER,
        TEXT_TOWER,
        quarantine_path=out,
    )
    assert clean.quarantined_rows == 0 and clean.quarantine_path is None and not out.exists()


@pytest.mark.integration
def test_build_datasets_yields_model_inputs(ray_session: None, corpus: Path, tmp_path: Path) -> None:
    from clray.pipelines.collate import TorchCollate

    cfg = data_config(corpus, shuffle="local")
    prepared = build_datasets(
        resolve_spec(cfg, IMAGE_TOWER, TEXT_TOWER),
        quarantine_path=tmp_path / "quarantine.parquet",
        seed=0,
        include_ids=True,
    )
    assert prepared.num_train_rows == 1438 and prepared.report.quarantined_rows == 4
    assert prepared.eval_report is not None and prepared.eval_report.quarantined_rows == 0
    assert prepared.num_eval_rows == 359

    ids: list[str] = []
    for batch in prepared.train.iter_torch_batches(batch_size=500, collate_fn=TorchCollate()):
        assert batch["anchor_pixel_values"].dtype == torch_dtype("float32")
        assert tuple(batch["anchor_pixel_values"].shape[1:]) == (1, 8, 8)
        assert tuple(batch["positive_input_ids"].shape[1:]) == (24,)
        assert batch["positive_input_ids"].dtype == torch_dtype("int64")
        assert batch["positive_attention_mask"].dtype == torch_dtype("int64")
        assert batch["label"].dtype == torch_dtype("int64")
        assert int(batch["label"].min()) >= 0 and int(batch["label"].max()) <= 9
        ids.extend(batch["id"])
    assert len(ids) == prepared.num_train_rows == len(set(ids))
    assert not set(ids) & set(EXPECTED_BAD)

    assert prepared.eval is not None
    # Small enough for data.cache = "auto": preprocessed once, not re-read at every evaluation.
    assert isinstance(prepared.eval, MaterializedDataset)
    eval_batch = prepared.eval.take_batch(batch_size=16)
    assert set(eval_batch) == {
        "anchor_pixel_values",
        "positive_input_ids",
        "positive_attention_mask",
        "id",
        "id_key",
        "label",
    }


def torch_dtype(name: str) -> object:
    import torch

    return getattr(torch, name)


# --- hard negatives ----------------------------------------------------------------


def negatives_config(corpus: Path, **overrides: object) -> DataConfig:
    return data_config(
        corpus,
        negatives={"column": "negative_captions", "kind": "text"},
        num_negatives=2,
        negative_id_column="negative_ids",
        negative_score_column="negative_scores",
        **overrides,
    )


@pytest.fixture(scope="module")
def negatives_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits-negatives")
    write_quickstart_corpus(out, hard_negatives=3)
    return out


def test_quickstart_hard_negatives(negatives_corpus: Path) -> None:
    train = read_dir(negatives_corpus / "train")
    assert train.schema.field("negative_captions").type == pa.list_(pa.string())
    labels = dict(zip(train.column("id").to_pylist(), train.column("label").to_pylist(), strict=True))
    for row in train.to_pylist()[:200]:
        assert len(row["negative_captions"]) == len(row["negative_ids"]) == len(row["negative_scores"]) == 3
        assert row["id"] not in row["negative_ids"]
        # The first two are other digits, the last a deliberate false negative of the same digit.
        assert [labels[i] == row["label"] for i in row["negative_ids"]] == [False, False, True]
    # Held-out rows carry no negatives: evaluation does not read them.
    assert "negative_captions" not in read_dir(negatives_corpus / "eval").schema.names


def test_row_problems_checks_hard_negative_lists(corpus: Path) -> None:
    cfg = negatives_config(corpus, anchor={"column": "a", "kind": "text"}, label_column=None, class_names=[])
    table = pa.table(
        {
            "id": ["ok", "null-list", "short", "empty-item", "null-id", "nan-score", "long"],
            "a": ["x"] * 7,
            "caption": ["y"] * 7,
            "negative_captions": [["n1", "n2"], None, ["n1"], ["n1", " "], ["n1", "n2"], ["n1", "n2"], ["a", "b", "c"]],
            "negative_ids": [["i1", "i2"], ["i1", "i2"], ["i1", "i2"], ["i1", "i2"], ["i1", None], ["i1", "i2"], ["1", "2"]],
            "negative_scores": [[0.1, 0.2], [0.1, 0.2], [0.1, 0.2], [0.1, 0.2], [0.1, 0.2], [0.1, float("nan")], [0.1, 0.2]],
        }
    )
    problems = row_problems(table, cfg, TEXT_TOWER, TEXT_TOWER)
    assert problems == [
        None,
        "negative_captions: null list",
        "negative_captions: fewer than data.num_negatives = 2 entries",
        "negative_captions: empty text",
        "negative_ids: null id",
        "negative_scores: null or NaN score",
        None,  # longer lists are fine: the first num_negatives are used
    ]


def test_check_schema_wants_list_columns_for_negatives(tmp_path: Path, corpus: Path) -> None:
    path = tmp_path / "flat.parquet"
    pq.write_table(
        pa.table({"id": ["a"], "image": [b"x"], "caption": ["c"], "label": [1],
                  "negative_captions": ["not a list"], "negative_ids": [["x"]], "negative_scores": [[1]]}),
        path,
    )
    with pytest.raises(DataError) as err:
        check_schema(split_spec(negatives_config(corpus), "train", [str(path)]))
    text = str(err.value)
    assert "'negative_captions' (data.negatives.column) has type string" in text and "list<string>" in text
    assert "'negative_scores' (data.negative_score_column) has type list<element: int64>" in text


@pytest.mark.integration
def test_build_datasets_with_hard_negatives(ray_session: None, negatives_corpus: Path, tmp_path: Path) -> None:
    # data.cache = "never": both splits stream from the files at every pass.
    cfg = negatives_config(negatives_corpus).model_copy(update={"cache": "never"})
    prepared = build_datasets(resolve_spec(cfg, IMAGE_TOWER, TEXT_TOWER), quarantine_path=tmp_path / "q.parquet", seed=0)
    assert not isinstance(prepared.train, MaterializedDataset)
    assert not isinstance(prepared.eval, MaterializedDataset)
    assert prepared.num_train_rows == 1438
    batch = prepared.train.take_batch(batch_size=32)
    assert batch["negative_input_ids"].shape == (32, 2, 24)
    assert batch["negative_attention_mask"].shape == (32, 2, 24)
    assert batch["negative_id_key"].shape == (32, 2) and batch["negative_id_key"].dtype == np.int64
    assert batch["negative_score"].shape == (32, 2) and batch["negative_score"].dtype == np.float32
    # A negative's id key equals the id key of the row it came from: id masking can match them.
    from clray.pipelines.dataset import id_keys

    table = read_dir(negatives_corpus / "train")
    by_key = dict(zip(id_keys(table.column("id").to_pylist()).tolist(), table.column("caption").to_pylist(), strict=True))
    assert all(int(k) in by_key for k in batch["negative_id_key"].ravel())
    assert prepared.eval is not None
    assert not any(key.startswith("negative") for key in prepared.eval.take_batch(batch_size=4))


def test_image_hard_negatives_preprocess_to_k_images_per_row(corpus: Path) -> None:
    """Text anchors with image positives: hard negatives are images, decoded like positives."""
    from clray.pipelines.dataset import preprocess_rows as _preprocess

    pngs = read_dir(corpus / "eval").column("image").to_pylist()[:6]
    cfg = data_config(
        corpus, anchor={"column": "caption", "kind": "text"}, positive={"column": "image", "kind": "image"},
        negatives={"column": "neg_images", "kind": "image"}, num_negatives=2,
    )
    table = pa.table({
        "id": ["a", "b"], "caption": ["x", "y"], "image": pngs[:2], "label": [1, 2],
        "neg_images": [pngs[2:5], [pngs[5], b"broken", pngs[2]]],
    })
    assert row_problems(table, cfg, TEXT_TOWER, IMAGE_TOWER) == [None, "neg_images: undecodable image"]
    arrays = _preprocess(table.slice(0, 1), cfg, {"anchor": TEXT_TOWER, "positive": IMAGE_TOWER}, include_ids=False)
    assert arrays["negative_pixel_values"].shape == (1, 2, 1, 8, 8)
    np.testing.assert_array_equal(arrays["negative_pixel_values"][0, 0], decode_image(pngs[2], IMAGE_TOWER))
