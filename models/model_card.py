"""The README.md (model card) of an exported text tower: what the model is, what it was
trained on and how, and what it scored.

An exported folder outlives its run directory: it is copied to a model store, pushed to
a hub, handed to another team. The card is what travels with it, so it says the base
model, the embedding it produces, the training data's shape, the loss and its settings
and the evaluation table, without the reader needing clray or the run.

What only the training driver knows (rows, steps, loss, eval figures) comes in the
optional ``card`` dict (keys: :data:`CARD_KEYS`); without it the card says "not
recorded", so ``export_model`` stays usable outside a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clray.models.config import ModelConfig, TextTowerConfig
from clray.models.preprocess import tokenizer_source

CARD_KEYS = {
    "run_name": "the training run's name",
    "train_rows": "training rows after quarantine",
    "eval_rows": "rows of the evaluation split",
    "steps": "optimizer steps trained",
    "epochs": "epochs trained",
    "global_batch_size": "examples per optimizer step over all workers",
    "data": "the training data: a path, a list of paths or a short description",
    "columns": "the views' source columns, e.g. {anchor: 'query', positive: 'code'}",
    "loss": "the loss settings (LossConfig as a dict)",
    "eval": "evaluation figures, name -> value (e.g. eval/a2p_ir_nDCG@10)",
}
"""What ``export_model(..., card=...)`` accepts, each key optional."""

GENERIC_DIR_NAMES = {"model", "models", "export", "anchor_tower", "positive_tower", "snapshot", "final", "hf"}
"""Directory names that say nothing about a model: named together with their parent."""


def check_card(card: dict[str, Any] | None) -> dict[str, Any]:
    """``card`` with its keys checked, so a typo is an error rather than a silent gap."""
    card = dict(card or {})
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ValueError(f"export_model card: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(CARD_KEYS)}")
    for key in ("loss", "eval", "columns"):
        if card.get(key) is not None and not isinstance(card[key], dict):
            raise ValueError(f"export_model card[{key!r}] must be a dict, got {type(card[key]).__name__}")
    return card


def base_model_name(tower: TextTowerConfig) -> str:
    """The base model as a reader knows it: the pretrained directory's name (with its
    parent when the name alone is generic), or "randomly initialised <model_type>"."""
    if tower.pretrained is None:
        return f"randomly initialised {(tower.config or {}).get('model_type', 'transformer')}"
    path = Path(tower.pretrained)
    if path.name.lower() in GENERIC_DIR_NAMES and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def _tokenizer_name(tower: TextTowerConfig) -> str:
    source = tokenizer_source(tower)
    if source == "char":
        return "clray's character tokenizer (saved in this folder)"
    if tower.pretrained is not None and Path(source) == Path(tower.pretrained):
        return "the base model's (saved in this folder)"
    return f"{Path(source).name} (saved in this folder)"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows if v is not None]
    return "\n".join(lines) + "\n"


def _model_rows(cfg: ModelConfig, tower: TextTowerConfig, encoder_config: Any, views: str,
                temperature: float, pooler_note: str) -> list[tuple[str, Any]]:
    architecture = (getattr(encoder_config, "architectures", None) or [type(encoder_config).__name__])[0]
    shape = ", ".join(f"{k.replace('num_hidden_layers', 'layers').replace('hidden_size', 'hidden size')} "
                      f"{getattr(encoder_config, k)}" for k in ("num_hidden_layers", "hidden_size")
                      if hasattr(encoder_config, k))
    other = ("none: one tower encodes both views" if cfg.shared_tower else
             f"{cfg.positive_tower.type if views.startswith('anchor') else cfg.anchor.type} tower, in the full "
             "export's model.safetensors (clray's `load_exported`)")
    return [
        ("base model", base_model_name(tower)),
        ("encoder", f"{architecture} ({shape})" if shape else architecture),
        ("views", views),
        ("pooling", f"{tower.pooling} over token states"),
        ("projection", f"{cfg.projection} to {cfg.embed_dim} dimensions"),
        ("embedding", f"{cfg.embed_dim} dimensions, L2-normalised; compare with cosine (= dot product)"),
        ("max sequence length", f"{tower.max_length} tokens (longer texts are truncated)"),
        ("tokenizer", _tokenizer_name(tower)),
        ("temperature at export", temperature),
        ("the other tower", other),
        ("pooler head", pooler_note),
    ]


def _training_section(card: dict[str, Any]) -> str:
    rows = [(CARD_KEYS[k], card.get(k)) for k in ("run_name", "data", "train_rows", "eval_rows", "steps", "epochs",
                                                   "global_batch_size")]
    if card.get("columns"):
        rows.append(("columns", ", ".join(f"{view}: {col}" for view, col in card["columns"].items())))
    if all(v is None for _, v in rows):
        return "Not recorded: this model was exported outside a training run.\n"
    return _table(rows)


def _loss_section(loss: dict[str, Any] | None) -> str:
    if not loss:
        return "Not recorded.\n"
    kind = loss.get("type", "?")
    return f"`{kind}`, with these settings:\n\n" + _table([(k, v) for k, v in loss.items() if k != "type"],
                                                          ("setting", "value"))


def _eval_section(figures: dict[str, Any] | None, eval_rows: Any) -> str:
    if not figures:
        return "Not recorded.\n"
    split = f" ({eval_rows} rows)" if eval_rows is not None else ""
    return (
        f"On the run's held-out evaluation split{split}. `a2p` is anchor to positive retrieval, `p2a` "
        "the reverse. `R@k` is exact-pair recall (a row's own positive in the top k); the `ir_` "
        "figures are sentence-transformers' InformationRetrievalEvaluator's (Recall@k, Accuracy@k, "
        "MRR@10, nDCG@10, MAP@100), with duplicate texts counted as one candidate that every row "
        "sharing the text finds relevant.\n\n"
        + _table([(name.removeprefix("eval/"), value) for name, value in figures.items()], ("figure", "value"))
    )


def model_card(cfg: ModelConfig, tower: TextTowerConfig, encoder_config: Any, views: str, modules: list[str],
               temperature: float, pooler_note: str, card: dict[str, Any] | None = None) -> str:
    """The README.md of one exported text tower directory (``card``: see :data:`CARD_KEYS`)."""
    card = check_card(card)
    title = f"{card['run_name']}: " if card.get("run_name") else ""
    front = ("---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\ntags:\n"
             "- sentence-transformers\n- sentence-similarity\n- feature-extraction\n- clray\n---\n\n")
    usage = (
        "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        "model = SentenceTransformer(\"path/to/this/folder\")\n"
        "embeddings = model.encode([\"a first text\", \"a second text\"])  # normalised\n"
        "scores = model.similarity(embeddings, embeddings)\n```\n\n"
        f"`SentenceTransformer` reproduces clray's embeddings end to end: encoder -> {tower.pooling} "
        f"pooling -> projection -> L2 norm (modules {', '.join(modules)}). "
        "`transformers.AutoModel.from_pretrained(folder)` gives the bare encoder (token states).\n"
    )
    return (
        front
        + f"# {title}clray text tower ({views})\n\n"
        + f"A contrastively trained text encoder exported by clray, the {views} of a dual encoder.\n\n"
        + "## Usage\n\n" + usage
        + "\n## Model\n\n" + _table(_model_rows(cfg, tower, encoder_config, views, temperature, pooler_note))
        + "\n## Training data\n\n" + _training_section(card)
        + "\n## Loss\n\n" + _loss_section(card.get("loss"))
        + "\n## Evaluation\n\n" + _eval_section(card.get("eval"), card.get("eval_rows"))
    )
