"""Exported models load back identically, and load in transformers / sentence-transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_BERT

from clray.models.config import ModelConfig
from clray.models.dual_encoder import DualEncoder
from clray.models.export import export_model, load_exported
from clray.models.preprocess import tokenize

# The last text is longer than max_length: truncation must agree everywhere.
TEXTS = ["a small red boat", "Hello, World!", "x", "a considerably longer caption that gets truncated"]


def _inputs(tower_cfg, texts: list[str], prefix: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in tokenize(tower_cfg, texts, prefix).items()}


def _trained_looking(model: DualEncoder) -> DualEncoder:
    """Perturb every weight and buffer so a load that silently re-initialises anything fails."""
    torch.manual_seed(1)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.add_(0.01 * torch.randn_like(t))
    return model.eval()


def _shared_text(projection: str = "linear", pooling: str = "mean") -> tuple[ModelConfig, DualEncoder]:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {
            "anchor": {"type": "text", "config": TINY_BERT, "max_length": 16, "pooling": pooling},
            "shared_tower": True,
            "embed_dim": 32 if projection == "none" else 16,
            "projection": projection,
            "logit_scale": {"init_temperature": 0.05},
        }
    )
    return cfg, _trained_looking(DualEncoder(cfg))


@pytest.fixture(scope="module")
def exported_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelConfig, DualEncoder, Path]:
    cfg, model = _shared_text()
    return cfg, model, export_model(model, cfg, tmp_path_factory.mktemp("export") / "model")


def test_export_layout(exported_text) -> None:
    cfg, model, out = exported_text
    meta = json.loads((out / "clray_model.json").read_text())
    assert ModelConfig.model_validate(meta["model"]) == cfg
    assert meta["tower_output_dims"] == {"anchor": 32}
    assert (out / "model.safetensors").is_file()
    assert (out / "anchor_tower" / "modules.json").is_file()
    assert not (out / "positive_tower").exists()  # shared: one tower directory
    assert not list(out.parent.glob(".model.tmp-*"))  # the staging directory is gone


def test_load_exported_reproduces_embeddings(exported_text) -> None:
    cfg, model, out = exported_text
    loaded = load_exported(out)
    assert not loaded.training
    assert loaded.temperature == pytest.approx(model.temperature)
    batch = {**_inputs(cfg.anchor, TEXTS, "anchor"), **_inputs(cfg.anchor, TEXTS[::-1], "positive")}
    loaded_batch = {
        **_inputs(loaded.cfg.anchor, TEXTS, "anchor"),
        **_inputs(loaded.cfg.anchor, TEXTS[::-1], "positive"),
    }
    for key in batch:  # the exported tokenizer tokenizes identically
        assert torch.equal(batch[key], loaded_batch[key])
    with torch.no_grad():
        for got, want in zip(loaded(loaded_batch), model(batch), strict=True):
            if want is None:
                assert got is None
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_automodel_loads_text_tower(exported_text) -> None:
    from transformers import AutoModel, AutoTokenizer

    cfg, model, out = exported_text
    encoder = AutoModel.from_pretrained(out / "anchor_tower", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "anchor_tower", local_files_only=True)
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        by_hand = torch.nn.functional.normalize(pooled @ model.anchor_projection.weight.T, dim=-1)
        ours = model.encode_anchor(_inputs(cfg.anchor, TEXTS, "anchor"))
    torch.testing.assert_close(by_hand, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "projection,pooling", [("linear", "mean"), ("mlp", "cls"), ("none", "mean")]
)
def test_sentence_transformers_reproduces_embeddings(projection: str, pooling: str, tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    cfg, model = _shared_text(projection, pooling)
    out = export_model(model, cfg, tmp_path / "model")
    st_model = st.SentenceTransformer(str(out / "anchor_tower"), device="cpu")
    assert st_model.max_seq_length == 16
    got = st_model.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=False)
    with torch.no_grad():
        ours = model.encode_anchor(_inputs(cfg.anchor, TEXTS, "anchor"))
    torch.testing.assert_close(got.cpu(), ours, rtol=1e-5, atol=1e-5)


def test_image_text_export_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {
            "anchor": {"type": "conv", "channels": [4, 8], "image_size": 8, "image_mode": "L"},
            "positive": {"type": "text", "config": TINY_BERT, "max_length": 12, "pooling": "cls"},
            "embed_dim": 8,
            "projection": "mlp",
        }
    )
    model = _trained_looking(DualEncoder(cfg))
    out = export_model(model, cfg, tmp_path / "run" / "model")
    assert (out / "positive_tower" / "config.json").is_file()
    assert not (out / "anchor_tower").exists()  # image towers live only in model.safetensors

    # Exporting again replaces the previous export in place.
    out = export_model(model, cfg, out)
    loaded = load_exported(out)
    batch = {"anchor_pixel_values": torch.rand(3, 1, 8, 8) * 2 - 1, **_inputs(cfg.positive, TEXTS[:3], "positive")}
    with torch.no_grad():
        for got, want in zip(loaded(batch), model(batch), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Every tensor of the state dict (norm affine parameters included) travels.
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
