"""What a tower will be, read without building it: its output width, vocabulary size and
maximum positions, from the config dict or a pretrained model's ``config.json``.

The driver checks a config against these before Ray starts (a ``projection = "none"``
whose ``embed_dim`` is not the tower's width, a ``max_length`` past the model's
positions), where building the tower would mean loading its weights; no torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clray.models.config import ConvTowerConfig, TextTowerConfig, VitTowerConfig

WIDTH_KEYS = ("hidden_size", "dim", "d_model", "n_embd")
"""Where transformers configs keep the width of the final hidden states (BERT-likes,
DistilBERT, T5/BART-likes, GPT-2-likes)."""
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")
VIT_DEFAULT_WIDTH = 768
"""transformers' ViTConfig default hidden_size, used when the config dict leaves it out."""


@dataclass(frozen=True)
class TowerFacts:
    width: int | None
    """Width of the tower's output (before the projection); None when unknown."""
    vocab_size: int | None = None
    max_positions: int | None = None
    source: str = ""
    """Where the facts were read: a config.json path, or "config" for an inline dict."""


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def read_model_config(directory: str) -> dict[str, Any] | None:
    """A saved model's config.json, or None when there is none to read."""
    path = Path(directory).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def tower_facts(tower: TextTowerConfig | ConvTowerConfig | VitTowerConfig) -> TowerFacts:
    if tower.type == "conv":
        return TowerFacts(width=tower.channels[-1], source="config")
    if tower.pretrained is not None:
        config = read_model_config(tower.pretrained)
        if config is None:
            return TowerFacts(width=None, source=str(Path(tower.pretrained) / "config.json"))
        return TowerFacts(width=_first(config, WIDTH_KEYS), vocab_size=_first(config, ("vocab_size",)),
                          max_positions=_first(config, POSITION_KEYS),
                          source=str(Path(tower.pretrained) / "config.json"))
    config = dict(tower.config or {})
    width = _first(config, WIDTH_KEYS)
    if tower.type == "vit" and width is None:
        width = VIT_DEFAULT_WIDTH
    return TowerFacts(width=width, vocab_size=_first(config, ("vocab_size",)),
                      max_positions=_first(config, POSITION_KEYS), source="config")
