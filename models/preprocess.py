"""Turning raw view values (text, encoded image bytes) into model inputs.

This is the one contract between ``pipelines/`` (which runs it inside Ray Data
``map_batches``) and the model (which runs it at evaluation and after export), so both
sides preprocess identically. Numpy and Pillow only: it runs in CPU data workers.

Model input keys for a view named ``v`` (``anchor`` or ``positive``):
  text:  ``v_input_ids`` int64 [B, L], ``v_attention_mask`` int64 [B, L]
  image: ``v_pixel_values`` float32 [B, C, H, W], normalised to [-1, 1]

Text is stored padded to ``max_length`` (fixed shapes: Ray Data blocks concatenate, the
cache size is known before preprocessing, a mined batch is one [B, L] array) but is never
*encoded* at that width: ``trim_padding`` cuts every batch to its longest row just before
the model sees it (the collate step of training and evaluation, the mining teacher). A
padded position is masked out of attention and pooling, so the embeddings are the same;
only the work on padding is gone. ``max_length`` therefore only truncates.
"""

from __future__ import annotations

import io
import string
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from clray.models.config import ConvTowerConfig, TextTowerConfig, VitTowerConfig

NEGATIVE_PREFIX = "negative"
INPUT_SUFFIXES = ("input_ids", "attention_mask", "pixel_values")
"""Model-input keys are ``{view}_{suffix}``; other batch keys (``label``, ``id_key``,
``negative_score``, ...) are side information for the loss."""
"""Key prefix of hard-negative inputs (``negative_input_ids`` [b, k, L], ...), encoded by the
positive tower."""

CHAR_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Printable ASCII plus Latin-1 letters: enough for captions; anything else maps to [UNK].
CHAR_ALPHABET = sorted(set(string.printable) - set("\t\n\r\x0b\x0c") | {chr(c) for c in range(0xC0, 0x100)})


class ImageDecodeError(ValueError):
    """Raised for bytes Pillow cannot decode as an image."""


def build_char_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` built in code (no files, no download).

    Built from the ``tokenizers`` library so it saves and loads like any Hugging Face
    tokenizer (``save_pretrained``), which keeps exported models loadable by
    ``transformers`` and ``sentence-transformers``.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS + CHAR_ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def local_dir(path: str, what: str) -> Path:
    local = Path(path).expanduser()
    if not local.is_dir():
        raise FileNotFoundError(
            f"{what} {path!r} is not a local directory: clray never downloads models; "
            "save the model with save_pretrained() and point at that directory"
        )
    return local


@lru_cache(maxsize=8)
def _cached_tokenizer(source: str) -> Any:
    if source == "char":
        return build_char_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(local_dir(source, "tokenizer")), local_files_only=True)


def tokenizer_source(cfg: TextTowerConfig) -> str:
    """Where the tower's tokenizer comes from: an explicit path, the pretrained model, or char."""
    if cfg.tokenizer != "char":
        return cfg.tokenizer
    if cfg.pretrained is not None and (Path(cfg.pretrained).expanduser() / "tokenizer_config.json").exists():
        return cfg.pretrained
    return "char"


def build_tokenizer(cfg: TextTowerConfig) -> Any:
    """The tokenizer for a text tower (cached per process: Ray Data calls this per batch)."""
    return _cached_tokenizer(tokenizer_source(cfg))


def tokenize(cfg: TextTowerConfig, texts: list[str], prefix: str) -> dict[str, np.ndarray]:
    """Token ids and mask padded to ``max_length`` (the storage shape; see the module
    docstring and ``trim_padding``)."""
    enc = build_tokenizer(cfg)(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=cfg.max_length,
        return_tensors="np",
    )
    return {
        f"{prefix}_input_ids": enc["input_ids"].astype(np.int64),
        f"{prefix}_attention_mask": enc["attention_mask"].astype(np.int64),
    }


MASK_SUFFIX = "_attention_mask"


def text_lengths(arrays: dict[str, Any], prefix: str) -> np.ndarray:
    """Tokens per row of one text view (summed over a row's hard negatives, [B, k, L])."""
    mask = np.asarray(arrays[f"{prefix}{MASK_SUFFIX}"])
    return mask.reshape(mask.shape[0], -1).sum(axis=1)


def trim_padding(arrays: dict[str, Any], multiple: int = 1) -> dict[str, Any]:
    """Every text view of a batch cut to the width of its longest row, rounded up to a
    ``multiple`` (8 suits GPU kernels), never wider than stored: the batch a tokenizer
    with ``padding="longest"`` would give. Works on numpy arrays and torch tensors, on
    [B, L] views and [B, k, L] hard negatives, and for either padding side.

    Padded positions are masked out of attention and pooling, so the model's outputs do
    not change (tests/test_models.py checks it to 1e-5); on a batch whose longest text is
    a third of ``max_length`` the encoder does about a third of the work.
    """
    out = dict(arrays)
    for key, mask in arrays.items():
        if not key.endswith(MASK_SUFFIX):
            continue
        prefix = key[: -len(MASK_SUFFIX)]
        width = mask.shape[-1]
        flat = mask.reshape(-1, width)
        used = flat.any(0) if isinstance(flat, np.ndarray) else flat.any(0).cpu().numpy()
        cols = np.flatnonzero(used)
        if cols.size == 0:
            start, end = 0, min(width, multiple)
        else:
            start, end = int(cols[0]), int(cols[-1]) + 1
        keep = min(width, -(-(end - start) // multiple) * multiple)
        if start == 0:  # right padding (or none): keep the first columns
            start, end = 0, keep
        else:  # left padding: keep the last columns
            start, end = width - keep, width
        if (start, end) == (0, width):
            continue
        for suffix in ("input_ids", "attention_mask", "token_type_ids"):
            name = f"{prefix}_{suffix}"
            if name in out:
                out[name] = out[name][..., start:end]
    return out


def decode_image(data: bytes, cfg: ConvTowerConfig | VitTowerConfig) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> float32 [C, H, W] in [-1, 1]; ImageDecodeError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert(cfg.image_mode)
            if img.size != (cfg.image_size, cfg.image_size):
                img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"undecodable image: {type(exc).__name__}: {exc}") from None
    if arr.ndim == 2:
        arr = arr[None, :, :]
    else:
        arr = arr.transpose(2, 0, 1)
    return (arr / 127.5 - 1.0).astype(np.float32)


def decode_images(cfg: ConvTowerConfig | VitTowerConfig, images: list[bytes], prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}_pixel_values": np.stack([decode_image(b, cfg) for b in images])}


def preprocess_view(
    cfg: TextTowerConfig | ConvTowerConfig | VitTowerConfig, values: list[Any], prefix: str
) -> dict[str, np.ndarray]:
    """Raw values of one view -> the model input arrays for that view."""
    if cfg.type == "text":
        return tokenize(cfg, values, prefix)
    return decode_images(cfg, values, prefix)
