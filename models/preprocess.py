"""Turning raw view values (text, encoded image bytes) into model inputs.

This is the one contract between ``pipelines/`` (which runs it inside Ray Data
``map_batches``) and the model (which runs it at evaluation and after export), so both
sides preprocess identically. Numpy and Pillow only: it runs in CPU data workers.

Model input keys for a view named ``v`` (``anchor`` or ``positive``):
  text:  ``v_input_ids`` int64 [B, L], ``v_attention_mask`` int64 [B, L]
  image: ``v_pixel_values`` float32 [B, C, H, W], normalised to [-1, 1]
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
