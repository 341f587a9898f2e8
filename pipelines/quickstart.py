"""A tiny image-caption corpus built from data that ships with scikit-learn.

The quickstart must run on a laptop with no network, so it cannot download a real
image-text dataset. scikit-learn bundles 1,797 8x8 handwritten digits; pairing each
with a caption drawn from many phrasings gives a real (if small) image-text retrieval
task where zero-shot classification over the ten digit names is meaningful. A few
deliberately broken rows are mixed into the training shards so every run shows the
quarantine at work.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Mixed words and numerals, so a text tower has to learn that "7" and "seven" mean the
# same thing instead of matching one surface form.
CAPTION_TEMPLATES = [
    "a handwritten {word}",
    "the digit {num}",
    "a scanned picture of the number {word}",
    "{num}, written by hand",
    "an image showing a handwritten {num}",
    "a low-resolution scan of a {word}",
    "the number {word} in someone's handwriting",
    "a pen-drawn {num}",
    "handwritten digit: {num}",
    "a small grayscale image of the digit {word}",
    "someone wrote the number {num}",
    "a blurry {word}, drawn by hand",
    "digit {num} from a scanned form",
    "{word} ({num}), handwritten",
    "a tiny black and white {word}",
    "the numeral {num} written in ink",
]

# Bad-row kinds, in the order they are appended; each breaks exactly one rule so the
# quarantine reason is unambiguous. Labels stay valid on purpose.
BAD_ROW_KINDS = ["null caption", "empty caption", "truncated png", "null image", "garbage bytes"]

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("caption", pa.string()),
        pa.field("label", pa.int64()),
    ]
)

NEGATIVE_FIELDS = [
    pa.field("negative_captions", pa.list_(pa.string())),
    pa.field("negative_ids", pa.list_(pa.string())),
    pa.field("negative_scores", pa.list_(pa.float32())),
]
"""Columns added to the training shards with ``hard_negatives > 0``."""

IMAGE_SIZE = 8
"""Images keep the native 8x8 resolution; towers resize them to their own image_size."""


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    # A 2-D uint8 array becomes a mode "L" (8-bit grayscale) image.
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _to_uint8(image: np.ndarray) -> np.ndarray:
    # load_digits counts ink in 0..16 per pixel; stretch to the full 8-bit range.
    return np.rint(image * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)


def _caption(label: int, rng: np.random.Generator) -> str:
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(word=CLASS_NAMES[label], num=label)


def _stratified_split(
    labels: np.ndarray, eval_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    train, held_out = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_eval = int(round(len(members) * eval_fraction))
        held_out.append(members[:n_eval])
        train.append(members[n_eval:])
    return np.concatenate(train), np.concatenate(held_out)


def _bad_row(index: int, good_png: bytes) -> dict[str, Any]:
    kind = BAD_ROW_KINDS[index % len(BAD_ROW_KINDS)]
    row: dict[str, Any] = {
        "id": f"bad-{index:04d}",
        "image": good_png,
        "caption": "a handwritten zero",
        "label": 0,
        "kind": kind,
    }
    if kind == "null caption":
        row["caption"] = None
    elif kind == "empty caption":
        row["caption"] = "   "
    elif kind == "truncated png":
        row["image"] = good_png[: len(good_png) // 2]
    elif kind == "null image":
        row["image"] = None
    elif kind == "garbage bytes":
        row["image"] = b"this is not an image"
    return row


def _write(rows: list[dict[str, Any]], path: Path, schema: pa.Schema = SCHEMA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)
    pq.write_table(table, path)


def write_splits(
    out: Path,
    shard_rows: list[list[dict[str, Any]]],
    eval_rows: list[dict[str, Any]],
    train_schema: pa.Schema,
    eval_schema: pa.Schema,
    bad: list[dict[str, Any]],
) -> dict[str, Any]:
    """Write ``out/train/part-NNNNN.parquet`` (one per shard) and, when there are eval rows,
    ``out/eval/part-00000.parquet``; returns what every corpus summary says of them: the
    files, directories and row counts, and the broken rows (``bad``, each with its
    ``kind``) that the shards hold besides the good ones. Shared by the corpora clray
    writes in code (the quickstart digits and the synthetic clustered texts)."""
    train_files = []
    for shard, rows in enumerate(shard_rows):
        path = out / "train" / f"part-{shard:05d}.parquet"
        _write(rows, path, train_schema)
        train_files.append(str(path))
    eval_files = []
    if eval_rows:
        path = out / "eval" / "part-00000.parquet"
        _write(eval_rows, path, eval_schema)
        eval_files.append(str(path))
    return {
        "out_dir": str(out),
        "train_files": train_files,
        "eval_files": eval_files,
        "train_dir": str(out / "train"),
        "eval_dir": str(out / "eval"),
        "train_rows": sum(map(len, shard_rows)) - len(bad),
        "eval_rows": len(eval_rows),
        "bad_rows": len(bad),
        "bad_row_kinds": {row["id"]: row["kind"] for row in bad},
    }


def _add_pixel_neighbours(rows: list[dict[str, Any]], pixels: np.ndarray, k: int) -> None:
    """Give each row ``k`` hard negatives scored by a pixel-cosine "teacher".

    The first ``k - 1`` are the most similar images of *other* digits (true hard
    negatives); the last is the most similar image of the *same* digit: a deliberate
    false negative, as an unfiltered miner would return, with a high teacher score for
    ``loss.teacher_threshold`` (or ``loss.mask_same_label``) to catch. With ``k = 1`` only
    the false negative is written."""
    flat = pixels.reshape(len(pixels), -1).astype(np.float64)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True).clip(min=1e-12)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    labels = np.array([row["label"] for row in rows])
    for i, row in enumerate(rows):
        same = labels == labels[i]
        other = np.flatnonzero(~same)
        hard = other[np.argsort(-sims[i, other], kind="stable")[: k - 1]]
        false_negative = int(np.argmax(np.where(same, sims[i], -np.inf)))
        chosen = [*hard.tolist(), false_negative]
        row["negative_captions"] = [rows[j]["caption"] for j in chosen]
        row["negative_ids"] = [rows[j]["id"] for j in chosen]
        row["negative_scores"] = [float(sims[i, j]) for j in chosen]


def _check_corpus_args(num_shards: int, eval_fraction: float, bad_rows: int, hard_negatives: int) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if bad_rows < 0:
        raise ValueError(f"bad_rows must be >= 0, got {bad_rows}")
    if hard_negatives < 0:
        raise ValueError(f"hard_negatives must be >= 0, got {hard_negatives}")


def _train_shards(
    train_rows: list[dict[str, Any]], num_shards: int, bad_rows: int, hard_negatives: int
) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """The training rows cut into ``num_shards`` shards with ``bad_rows`` broken rows
    dealt over them (so every shard's reads meet the quarantine), and the bad rows. With
    hard negatives a bad row carries a good row's lists, so only its one defect shows."""
    shards = [list(chunk) for chunk in np.array_split(np.arange(len(train_rows)), num_shards)]
    shard_rows = [[train_rows[i] for i in chunk] for chunk in shards]
    bad = [_bad_row(i, train_rows[i % len(train_rows)]["image"]) for i in range(bad_rows)]
    for i, row in enumerate(bad):
        if hard_negatives:
            source = train_rows[i % len(train_rows)]
            row.update({field.name: source[field.name] for field in NEGATIVE_FIELDS})
        shard_rows[i % num_shards].append(row)
    return shard_rows, bad


def write_quickstart_corpus(
    out_dir: str | Path,
    *,
    num_shards: int = 4,
    eval_fraction: float = 0.2,
    seed: int = 0,
    bad_rows: int = 4,
    hard_negatives: int = 0,
) -> dict[str, Any]:
    """Write the digits corpus as Parquet shards and say where everything went.

    Train rows are spread over ``num_shards`` files so a local run exercises the same
    multi-file read path as a cluster run; the split is stratified so every class is in
    the eval set for zero-shot accuracy. The same seed always writes the same rows.

    Returns the file lists, ``train_rows``/``eval_rows`` (good rows), ``bad_rows`` (how
    many broken rows were added to the train shards) and ``bad_row_kinds`` (id -> what
    is broken), ``class_names`` (index = label) and ``image_size`` (8: native size).

    ``hard_negatives = k > 0`` adds list columns to the training shards: for each row the
    captions and ids of k hard negatives and their pixel-cosine teacher scores, the last
    one a deliberate false negative (see ``_add_pixel_neighbours``).
    """
    from sklearn.datasets import load_digits

    _check_corpus_args(num_shards, eval_fraction, bad_rows, hard_negatives)
    digits = load_digits()
    images = digits.images
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)

    def good_row(index: int) -> dict[str, Any]:
        label = int(labels[index])
        return {
            "id": f"digits-{index:06d}",
            "image": _png_bytes(_to_uint8(images[index])),
            "caption": _caption(label, rng),
            "label": label,
        }

    train_idx, eval_idx = _stratified_split(labels, eval_fraction, rng)
    train_idx = rng.permutation(train_idx)
    eval_idx = np.sort(eval_idx)

    out = Path(out_dir)
    train_rows = [good_row(int(i)) for i in train_idx]
    eval_rows = [good_row(int(i)) for i in eval_idx]
    train_schema = SCHEMA
    if hard_negatives:
        _add_pixel_neighbours(train_rows, images[train_idx], hard_negatives)
        train_schema = pa.schema(list(SCHEMA) + NEGATIVE_FIELDS)

    shard_rows, bad = _train_shards(train_rows, num_shards, bad_rows, hard_negatives)
    return {
        **write_splits(out, shard_rows, eval_rows, train_schema, SCHEMA, bad),
        "class_names": list(CLASS_NAMES),
        "image_size": IMAGE_SIZE,
        "columns": {"id": "id", "image": "image", "caption": "caption", "label": "label"},
        "hard_negatives": hard_negatives,
    }
