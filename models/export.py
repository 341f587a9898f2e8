"""Write a trained dual encoder as a directory other tools can load, and read it back.

Layout of an export directory::

    clray_model.json       ModelConfig + tower output dims (what load_exported rebuilds from)
    model.safetensors      the whole DualEncoder state dict (towers, heads, logit_scale)
    anchor_tower/          text towers only: a Hugging Face model + tokenizer directory
                           that is also a sentence-transformers model directory, with a
                           model card (README.md, see models.model_card)
    positive_tower/        the same for a separate positive text tower

The text tower directories are the hand-off to the wider ecosystem:
``transformers.AutoModel.from_pretrained(d)`` gives the encoder, and
``SentenceTransformer(d)`` gives our normalised embeddings end to end (encoder ->
pooling -> projection -> L2 norm). The sentence-transformers files are written by hand,
in the long-standing ``sentence_transformers.models.*`` format that every release from
2.x to 6.x reads, so exporting never needs sentence-transformers installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clray.models.config import ModelConfig, TextTowerConfig
from clray.models.dual_encoder import DualEncoder
from clray.models.model_card import check_card, model_card
from clray.models.preprocess import build_tokenizer

CONFIG_FILE = "clray_model.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    # Own CPU copies: safetensors refuses tensors that share storage (tied weights, views).
    save_file({name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}, str(path))


def _dense_module(dir_: Path, linear: nn.Linear, activation: str) -> None:
    _write_json(
        dir_ / "config.json",
        {
            "in_features": linear.in_features,
            "out_features": linear.out_features,
            "bias": linear.bias is not None,
            "activation_function": activation,
        },
    )
    tensors = {"linear.weight": linear.weight}
    if linear.bias is not None:
        tensors["linear.bias"] = linear.bias
    _save_tensors(dir_ / WEIGHTS_FILE, tensors)


def _projection_as_dense(projection: nn.Module) -> list[tuple[nn.Linear, str]]:
    """The projection head as sentence-transformers Dense layers (Linear + activation each).

    Dense applies its activation after its linear layer, so Linear-GELU-Linear is two
    Dense modules: (Linear1, GELU) then (Linear2, Identity). ``nn.GELU()``'s default
    (exact erf) is what sentence-transformers instantiates from the class name.
    """
    identity = "torch.nn.modules.linear.Identity"
    if isinstance(projection, nn.Identity):
        return []
    if isinstance(projection, nn.Linear):
        return [(projection, identity)]
    if isinstance(projection, nn.Sequential) and len(projection) == 3:
        first, act, second = projection
        if isinstance(first, nn.Linear) and isinstance(act, nn.GELU) and act.approximate == "none":
            return [(first, "torch.nn.modules.activation.GELU"), (second, identity)]
    raise TypeError(f"cannot express projection {projection} as sentence-transformers Dense modules")


def _base_pooler(cfg: TextTowerConfig, names: list[str], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor] | None:
    """The pooler weights of the pretrained base model, when its safetensors file has
    every one of ``names`` (possibly under a prefix such as ``bert.``) in the right shape."""
    weights = Path(cfg.pretrained or "") / WEIGHTS_FILE
    if cfg.pretrained is None or not weights.is_file():
        return None
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt") as checkpoint:
        keys = list(checkpoint.keys())
        for name in names:
            match = next((k for k in keys if k == name or k.endswith(f".{name}")), None)
            if match is None:
                return None
            tensor = checkpoint.get_tensor(match)
            if tensor.shape != shapes[name]:
                return None
            found[name] = tensor.float()
    return found


def _complete_encoder(encoder: nn.Module, cfg: TextTowerConfig) -> tuple[nn.Module, str]:
    """The encoder as ``AutoModel.from_pretrained`` rebuilds it, plus what its card says of
    the pooler head.

    clray trains without the architecture's pooler head (towers build the model with
    ``add_pooling_layer=False``), but AutoModel builds one, and a folder without its
    weights loads with a "missing weights, newly initialised" warning in every tool that
    opens it. So the export carries the head: the base model's own weights when it had
    them, else a fixed (seed 0) initialisation. Nothing of clray's embeddings depends on it.
    """
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = AutoModel.from_config(encoder.config)
    missing, unexpected = full.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise RuntimeError(f"cannot complete the {type(encoder).__name__} for export: missing {missing}, "
                           f"unexpected {unexpected}")
    if not missing:
        return encoder, "none in this architecture"
    shapes = {name: tensor.shape for name, tensor in full.state_dict().items()}
    pooler = _base_pooler(cfg, list(missing), shapes)
    if pooler is None:
        return full.eval(), "initialised with seed 0, untrained; present so the folder loads complete (unused by clray)"
    full.load_state_dict(pooler, strict=False)
    return full.eval(), "the base model's, unchanged; present so the folder loads complete (unused by clray)"


def _export_text_tower(
    dir_: Path, tower: nn.Module, projection: nn.Module, cfg: ModelConfig, tower_cfg: TextTowerConfig, views: str,
    temperature: float, card: dict[str, Any] | None,
) -> None:
    encoder, pooler_note = _complete_encoder(tower.model, tower_cfg)
    encoder.save_pretrained(str(dir_))
    build_tokenizer(tower_cfg).save_pretrained(str(dir_))

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    _write_json(dir_ / "sentence_bert_config.json", {"max_seq_length": tower_cfg.max_length, "do_lower_case": False})
    _write_json(
        dir_ / "config_sentence_transformers.json",
        {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )

    def add_module(kind: str) -> Path:
        idx = len(modules)
        modules.append(
            {"idx": idx, "name": str(idx), "path": f"{idx}_{kind}", "type": f"sentence_transformers.models.{kind}"}
        )
        return dir_ / f"{idx}_{kind}"

    _write_json(
        add_module("Pooling") / "config.json",
        {
            "word_embedding_dimension": tower.output_dim,
            "pooling_mode_cls_token": tower_cfg.pooling == "cls",
            "pooling_mode_mean_tokens": tower_cfg.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    for linear, activation in _projection_as_dense(projection):
        _dense_module(add_module("Dense"), linear, activation)
    _write_json(add_module("Normalize") / "config.json", {})
    _write_json(dir_ / "modules.json", modules)

    (dir_ / "README.md").write_text(
        model_card(cfg, tower_cfg, encoder.config, views, [m["path"] for m in modules[1:]], temperature, pooler_note, card)
    )


@contextmanager
def _weights_replaced_next() -> Iterator[None]:
    """Quiet transformers' load report while building a DualEncoder whose every weight
    the caller replaces right after with a strict ``load_state_dict``.

    Building a text tower from a directory whose checkpoint has a pooler head (a base
    model, or an export's tower folder) makes transformers report the head as unexpected
    weights, since clray's towers leave it out. Nothing that report could be about
    survives the strict load that follows, so it would only alarm the reader.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _plain_copy(model: DualEncoder, cfg: ModelConfig) -> DualEncoder:
    """A fresh fp32 CPU model holding ``model``'s current weights.

    Exporting from this copy, never from the live training module, keeps DeepSpeed out of
    the files: a ZeRO-3 module carries partitioning hooks and placeholder tensors that
    ``save_pretrained`` may read instead of the gathered weights (seen on GPU with
    transformers 5.17: size-0 tensors in the saved tower), and bf16 training weights
    become fp32 here so every loader can read them."""
    weights = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
        for k, v in model.state_dict().items()
    }
    with _weights_replaced_next():
        copy = DualEncoder(cfg)
    copy.load_state_dict(weights, strict=True)
    return copy.eval()


def export_model(
    model: DualEncoder, cfg: ModelConfig, out_dir: str | os.PathLike[str], card: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` to ``out_dir`` (replacing it) and return the path.

    The directory is assembled next to its destination and renamed into place, so a
    crash mid-export never leaves a half-written model that looks complete. Pass the
    plain module (``engine.module`` under DeepSpeed), with ZeRO-3 parameters gathered.

    ``card``: what the training run knows for each text tower's model card (README.md):
    data rows, steps, loss settings, the eval table (keys: ``models.model_card.CARD_KEYS``).
    Without it the card still describes the model and says the rest was not recorded.
    """
    card = check_card(card)
    temperature = model.temperature  # before the copy, which resets a scheduled temperature to its start
    model = _plain_copy(model, cfg)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        towers = {"anchor": (model.anchor_tower, model.anchor_projection, cfg.anchor)}
        if not cfg.shared_tower:
            towers["positive"] = (model.positive_tower, model.positive_projection, cfg.positive_tower)
        _write_json(
            tmp / CONFIG_FILE,
            {
                "format": "clray-dual-encoder",
                "format_version": FORMAT_VERSION,
                "model": cfg.model_dump(mode="json"),
                "tower_output_dims": {view: tower.output_dim for view, (tower, _, _) in towers.items()},
            },
        )
        _save_tensors(tmp / WEIGHTS_FILE, model.state_dict())
        for view, (tower, projection, tower_cfg) in towers.items():
            if isinstance(tower_cfg, TextTowerConfig):
                views = "anchor and positive views" if cfg.shared_tower else f"{view} view"
                _export_text_tower(tmp / f"{view}_tower", tower, projection, cfg, tower_cfg, views, temperature, card)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _from_export_dir(tower_cfg: Any, tower_dir: Path) -> Any:
    """A text tower config pointing at the exported model and tokenizer instead of its origin."""
    if not isinstance(tower_cfg, TextTowerConfig):
        return tower_cfg
    data = tower_cfg.model_dump()
    data.update(pretrained=str(tower_dir), config=None, tokenizer=str(tower_dir))
    return TextTowerConfig.model_validate(data)


def load_exported(export_dir: str | os.PathLike[str]) -> DualEncoder:
    """Rebuild the DualEncoder an export holds, in eval mode, needing nothing but that directory."""
    from safetensors.torch import load_file

    root = Path(export_dir)
    meta = json.loads((root / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{root / CONFIG_FILE} has format_version {meta.get('format_version')!r}; this clray "
            f"reads version {FORMAT_VERSION}"
        )
    cfg = ModelConfig.model_validate(meta["model"])
    updates = {"anchor": _from_export_dir(cfg.anchor, root / "anchor_tower")}
    if not cfg.shared_tower:
        updates["positive"] = _from_export_dir(cfg.positive, root / "positive_tower")
    cfg = ModelConfig.model_validate({**cfg.model_dump(), **{k: v.model_dump() for k, v in updates.items()}})

    with _weights_replaced_next():
        model = DualEncoder(cfg)
    model.load_state_dict(load_file(str(root / WEIGHTS_FILE)), strict=True)
    return model.eval()
