"""Towers, dual encoder, InfoNCE and metrics on tiny CPU models (no Ray, no distributed)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import TINY_BERT
from torch import nn

from clray.models.config import (
    ConvTowerConfig,
    LossConfig,
    ModelConfig,
    TextTowerConfig,
    VitTowerConfig,
)
from clray.models.dual_encoder import DualEncoder
from clray.models.losses import InfoNCE, LossOutput, build_loss
from clray.models.metrics import retrieval_metrics, zero_shot_accuracy
from clray.models.preprocess import build_tokenizer, tokenize
from clray.models.towers import build_tower

TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "patch_size": 4}


def text_cfg(**overrides) -> TextTowerConfig:
    return TextTowerConfig.model_validate({"config": TINY_BERT, "max_length": 16, **overrides})


def text_inputs(cfg: TextTowerConfig, texts: list[str], prefix: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in tokenize(cfg, texts, prefix).items()}


def shared_text_model(**overrides) -> ModelConfig:
    return ModelConfig.model_validate(
        {"anchor": {"type": "text", "config": TINY_BERT, "max_length": 16}, "shared_tower": True, "embed_dim": 16, **overrides}
    )


# --- towers -------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_tower_shape_and_vocab_default(pooling: str) -> None:
    cfg = text_cfg(pooling=pooling)
    tower = build_tower(cfg)
    assert tower.output_dim == 32
    assert tower.model.config.vocab_size == len(build_tokenizer(cfg))
    out = tower(text_inputs(cfg, ["a b c", "longer text here", "x"], "anchor"), "anchor")
    assert out.shape == (3, 32)


def test_text_tower_loads_a_local_pretrained_directory(tmp_path) -> None:
    """`pretrained` = a save_pretrained directory: weights and tokenizer come from disk."""
    source = build_tower(text_cfg())
    source.model.save_pretrained(tmp_path / "enc")
    build_tokenizer(text_cfg()).save_pretrained(tmp_path / "enc")

    cfg = TextTowerConfig.model_validate({"pretrained": str(tmp_path / "enc"), "max_length": 16})
    loaded = build_tower(cfg)
    for (name, want), (_, got) in zip(source.model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    from clray.models.preprocess import tokenizer_source

    assert tokenizer_source(cfg) == str(tmp_path / "enc")
    inputs = text_inputs(cfg, ["the digit 7", "a handwritten seven"], "anchor")
    source.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs, "anchor"), source(inputs, "anchor"))


def test_a_checkpoints_pooler_is_left_out_quietly_and_other_gaps_are_reported(tmp_path) -> None:
    """A BERT checkpoint saved with its pooler (all-MiniLM-L6-v2 is one) loads into the
    pooler-less tower without transformers' load report (the pooler is dropped on
    purpose); a checkpoint that lacks an encoder weight is still reported, by name.
    (transformers' loggers do not propagate to the root: the records are taken from its
    library logger, at its default verbosity, whatever an earlier test set.)"""
    import logging

    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    tokenizer = build_tokenizer(text_cfg())
    full = BertModel(BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"},
                                vocab_size=len(tokenizer)))
    folder = tmp_path / "with_pooler"
    full.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert any(k.startswith("pooler.") for k in full.state_dict())
    weights = load_file(folder / "model.safetensors")
    gone = next(k for k in weights if "layer.0.attention.self.query.weight" in k)

    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    library, verbosity = logging.getLogger("transformers"), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    library.addHandler(handler)
    try:
        build_tower(TextTowerConfig.model_validate({"pretrained": str(folder), "max_length": 16}))
        quiet = list(records)
        save_file({k: v for k, v in weights.items() if k != gone}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        build_tower(TextTowerConfig.model_validate({"pretrained": str(folder), "max_length": 16}))
    finally:
        library.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    assert not [r for r in quiet if "pooler" in r or "REPORT" in r], quiet
    reported = "\n".join(records[len(quiet):])
    assert "query.weight" in reported and "newly initialised" in reported, records
    assert "pooler" not in reported.split("not used:")[1], reported


def test_text_tower_pretrained_must_be_local() -> None:
    with pytest.raises(FileNotFoundError, match="clray never downloads"):
        build_tower(TextTowerConfig.model_validate({"pretrained": "sentence-transformers/all-MiniLM-L6-v2"}))


def test_text_tower_mean_pooling_ignores_padding() -> None:
    cfg = text_cfg()
    tower = build_tower(cfg).eval()
    short = text_inputs(cfg, ["hello"], "v")
    padded = {k: torch.cat([v, torch.zeros(1, 8, dtype=v.dtype)], dim=1) for k, v in short.items()}
    torch.testing.assert_close(tower(short, "v"), tower(padded, "v"), rtol=1e-5, atol=1e-6)


def test_text_tower_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_tower(text_cfg(config={**TINY_BERT, "vocab_size": 10}))


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_conv_tower_shape(mode: str, channels: int) -> None:
    cfg = ConvTowerConfig(channels=[8, 16], image_size=16, image_mode=mode)
    tower = build_tower(cfg)
    assert tower.output_dim == 16
    assert tower({"p_pixel_values": torch.randn(4, channels, 16, 16)}, "p").shape == (4, 16)


def test_conv_tower_too_many_blocks_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="fewer `channels`"):
        build_tower(ConvTowerConfig(channels=[4] * 5, image_size=8))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vit_tower_shape(pooling: str) -> None:
    cfg = VitTowerConfig(config=TINY_VIT, image_size=16, image_mode="L", pooling=pooling)
    tower = build_tower(cfg)
    assert tower.output_dim == 32
    assert tower.model.config.num_channels == 1
    assert tower({"a_pixel_values": torch.randn(2, 1, 16, 16)}, "a").shape == (2, 32)


def test_vit_tower_rejects_conflicting_image_size() -> None:
    with pytest.raises(ValueError, match="image_size"):
        build_tower(VitTowerConfig(config={**TINY_VIT, "image_size": 64}, image_size=16))


# --- dual encoder -------------------------------------------------------------------


def test_shared_tower_really_shares_parameters() -> None:
    cfg = shared_text_model()
    model = DualEncoder(cfg).eval()
    assert model.positive_tower is model.anchor_tower
    assert model.positive_projection is model.anchor_projection
    tower_params = sum(p.numel() for p in model.anchor_tower.parameters())
    head_params = sum(p.numel() for p in model.anchor_projection.parameters())
    assert sum(p.numel() for p in model.parameters()) == tower_params + head_params + 1
    assert not any(k.startswith("positive_") for k in model.state_dict())

    texts = ["same text", "other"]
    batch = {**text_inputs(cfg.anchor, texts, "anchor"), **text_inputs(cfg.anchor, texts, "positive")}
    anchor, positive, *_ = model(batch)
    torch.testing.assert_close(anchor, positive)
    # A gradient through the positive side alone lands on the (one) shared weights.
    model.encode_positive(batch).sum().backward()
    assert model.anchor_tower.model.embeddings.word_embeddings.weight.grad is not None


def test_separate_towers_are_distinct() -> None:
    cfg = ModelConfig.model_validate(
        {"anchor": {"type": "text", "config": TINY_BERT}, "positive": {"type": "text", "config": TINY_BERT}, "embed_dim": 16}
    )
    model = DualEncoder(cfg)
    assert model.positive_tower is not model.anchor_tower
    assert any(k.startswith("positive_tower.") for k in model.state_dict())


def test_projection_none_needs_matching_width() -> None:
    with pytest.raises(ValueError, match="model.projection"):
        DualEncoder(shared_text_model(projection="none", embed_dim=16))
    model = DualEncoder(shared_text_model(projection="none", embed_dim=32))
    assert isinstance(model.anchor_projection, nn.Identity)


def test_mlp_projection_shape() -> None:
    cfg = shared_text_model(projection="mlp")
    model = DualEncoder(cfg)
    emb = model.encode_anchor(text_inputs(cfg.anchor, ["abc", "de"], "anchor"))
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_temperature_init_and_clamp_in_forward() -> None:
    model = DualEncoder(shared_text_model())
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.temperature == pytest.approx(0.07)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)

    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))  # what an optimizer may do
    scale = model.scale()
    assert scale.item() == pytest.approx(100.0, rel=1e-6)
    assert model.temperature == pytest.approx(0.01, rel=1e-6)
    assert model.logit_scale.item() == pytest.approx(math.log(1000.0))  # the parameter is untouched
    scale.backward()
    assert model.logit_scale.grad.item() == 0.0  # at the cap the scale cannot grow further


def test_frozen_logit_scale_gets_no_grad() -> None:
    cfg = shared_text_model(logit_scale={"mode": "fixed", "init_temperature": 0.05})
    model = DualEncoder(cfg)
    assert not model.logit_scale.requires_grad
    batch = {**text_inputs(cfg.anchor, ["a", "b"], "anchor"), **text_inputs(cfg.anchor, ["a", "c"], "positive")}
    anchor, positive, _, scale, _ = model(batch)
    InfoNCE()(anchor, positive, logit_scale=scale).loss.backward()
    assert model.logit_scale.grad is None
    assert model.temperature == pytest.approx(0.05)
    assert all(p is not model.logit_scale for g in model.param_groups(0.1) for p in g["params"])


def test_param_groups_split() -> None:
    model = DualEncoder(shared_text_model(projection="mlp"))
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = dict(model.named_parameters())
    assert id(model.logit_scale) in no_decay_ids
    assert id(names["anchor_tower.model.embeddings.word_embeddings.weight"]) in decay_ids
    assert id(names["anchor_projection.0.bias"]) in no_decay_ids
    assert id(names["anchor_tower.model.embeddings.LayerNorm.weight"]) in no_decay_ids
    assert all(p.ndim >= 2 for p in decay["params"])
    assert not decay_ids & no_decay_ids
    assert decay_ids | no_decay_ids == {id(p) for p in model.parameters()}
    torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)  # accepted as-is


# --- loss ---------------------------------------------------------------------------


def test_infonce_matches_hand_computation() -> None:
    torch.manual_seed(0)
    a = nn.functional.normalize(torch.randn(5, 8), dim=1)
    p = nn.functional.normalize(torch.randn(5, 8), dim=1)
    scale = torch.tensor(10.0)
    logits = scale * a @ p.T
    ce = nn.functional.cross_entropy
    targets = torch.arange(5)
    one_way = build_loss(LossConfig(symmetric=False))(a, p, logit_scale=scale)
    both = build_loss(LossConfig())(a, p, logit_scale=scale)
    assert isinstance(one_way, LossOutput)
    torch.testing.assert_close(one_way.loss, ce(logits, targets))
    torch.testing.assert_close(both.loss, (ce(logits, targets) + ce(logits.T, targets)) / 2)
    sims = a @ p.T
    assert both.metrics["pos_sim"] == pytest.approx(sims.diag().mean().item(), abs=1e-6)
    off = sims[~torch.eye(5, dtype=torch.bool)]
    assert both.metrics["neg_sim"] == pytest.approx(off.mean().item(), abs=1e-6)
    assert both.metrics["accuracy"] == pytest.approx((sims.argmax(1) == targets).float().mean().item())


def test_infonce_perfect_pairs_and_bad_shapes() -> None:
    e = torch.eye(4)
    out = InfoNCE()(e, e, logit_scale=torch.tensor(100.0))
    assert out.metrics["accuracy"] == 1.0 and out.loss.item() < 1e-6
    assert out.metrics["candidates"] == 4.0
    with pytest.raises(ValueError, match=r"negatives must be \[b, k, d\]"):
        InfoNCE()(e, e, negatives=e, logit_scale=torch.tensor(1.0))
    # Labels are accepted (the pipeline always sends them) and unused unless asked for.
    labelled = InfoNCE()(e, e, labels=torch.arange(4), logit_scale=torch.tensor(100.0))
    torch.testing.assert_close(labelled.loss, out.loss)


# --- metrics ------------------------------------------------------------------------


def test_retrieval_metrics_known_case(monkeypatch: pytest.MonkeyPatch) -> None:
    e = torch.eye(4)
    # positive 0 and 1 swapped: anchors 0/1 retrieve the wrong item first, then the right one second
    p = e[[1, 0, 2, 3]] * 0.9 + e * 0.1
    m = retrieval_metrics(e, p, ks=(1, 2))
    assert m["a2p_R@1"] == 0.5 and m["a2p_R@2"] == 1.0
    assert m["p2a_R@1"] == 0.5 and m["p2a_R@2"] == 1.0
    labelled = retrieval_metrics(e, p, ks=(1,), labels=["x", "x", "y", "z"])
    assert labelled["a2p_label_R@1"] == 1.0 and labelled["p2a_label_R@1"] == 1.0

    import clray.models.metrics as metrics_module

    torch.manual_seed(0)
    a = nn.functional.normalize(torch.randn(50, 8), dim=1)
    b = nn.functional.normalize(a + 0.5 * torch.randn(50, 8), dim=1)
    labels = torch.randint(0, 5, (50,))
    whole = retrieval_metrics(a, b, labels=labels)
    monkeypatch.setattr(metrics_module, "_MAX_CHUNK_ELEMENTS", 64)  # ~1 row per chunk
    assert retrieval_metrics(a, b, labels=labels) == whole


def test_zero_shot_accuracy() -> None:
    classes = torch.eye(3)
    anchors = torch.tensor([[1.0, 0.1, 0], [0, 1.0, 0], [0, 0.9, 0.1], [0.2, 0, 1.0]])
    assert zero_shot_accuracy(anchors, classes, torch.tensor([0, 1, 2, 2])) == 0.75


# --- a test trains each --------------------------------------------------------------


def _train(model: DualEncoder, batch: dict[str, torch.Tensor], steps: int, lr: float) -> tuple[float, float]:
    torch.manual_seed(0)
    loss_fn = InfoNCE()
    opt = torch.optim.AdamW(model.param_groups(0.01), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        anchor, positive, _, scale, _ = model(batch)
        out = loss_fn(anchor, positive, logit_scale=scale)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses[0], min(losses[-3:])


def test_text_text_training_reduces_loss() -> None:
    torch.manual_seed(0)
    cfg = shared_text_model()
    model = DualEncoder(cfg)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "quartz"]
    anchors = [f"{w} {words[(i + 3) % 8]}" for i, w in enumerate(words)]
    positives = [f"the {w}" for w in words]
    batch = {**text_inputs(cfg.anchor, anchors, "anchor"), **text_inputs(cfg.anchor, positives, "positive")}
    first, last = _train(model, batch, steps=25, lr=3e-3)
    assert last < 0.5 * first, (first, last)


def test_image_text_training_reduces_loss() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {
            "anchor": {"type": "conv", "channels": [8, 16], "image_size": 16, "image_mode": "L"},
            "positive": {"type": "text", "config": TINY_BERT, "max_length": 12},
            "embed_dim": 16,
        }
    )
    model = DualEncoder(cfg)
    names = ["top left", "top right", "bottom left", "bottom right", "centre", "left bar", "top bar", "dots"]
    images = torch.full((8, 1, 16, 16), -1.0)
    images[0, :, :8, :8] = 1
    images[1, :, :8, 8:] = 1
    images[2, :, 8:, :8] = 1
    images[3, :, 8:, 8:] = 1
    images[4, :, 4:12, 4:12] = 1
    images[5, :, :, :3] = 1
    images[6, :, :3, :] = 1
    images[7, :, ::4, ::4] = 1
    batch = {"anchor_pixel_values": images, **text_inputs(cfg.positive, names, "positive")}
    first, last = _train(model, batch, steps=25, lr=3e-3)
    assert last < 0.5 * first, (first, last)


# --- temperature modes, logit bias, hard negatives ---------------------------------


def test_scheduled_temperature_follows_its_path_and_is_not_trained() -> None:
    cfg = shared_text_model(
        logit_scale={"mode": "scheduled", "init_temperature": 0.1, "final_temperature": 0.02, "schedule": "cosine"}
    )
    model = DualEncoder(cfg)
    assert not model.logit_scale.requires_grad
    assert model.temperature == pytest.approx(0.1)
    model.set_progress(0.5)
    assert model.temperature == pytest.approx(0.06, rel=1e-6)  # cosine midpoint
    model.set_progress(1.0)
    assert model.temperature == pytest.approx(0.02, rel=1e-6)
    linear = DualEncoder(shared_text_model(
        logit_scale={"mode": "scheduled", "init_temperature": 0.1, "final_temperature": 0.02, "schedule": "linear"}
    ))
    linear.set_progress(0.25)
    assert linear.temperature == pytest.approx(0.08, rel=1e-6)
    # Learnable and fixed temperatures ignore progress.
    learnable = DualEncoder(shared_text_model())
    learnable.set_progress(1.0)
    assert learnable.temperature == pytest.approx(0.07)


def test_logit_bias_is_a_parameter_without_weight_decay() -> None:
    model = DualEncoder(shared_text_model(logit_bias={"init": -10.0}))
    assert model.bias().item() == -10.0 and model.logit_bias.requires_grad
    decayed = {id(p) for p in model.param_groups(0.1)[0]["params"]}
    assert id(model.logit_bias) not in decayed and id(model.logit_scale) not in decayed
    assert DualEncoder(shared_text_model()).bias() is None


def test_hard_negatives_are_encoded_by_the_positive_tower() -> None:
    cfg = shared_text_model()
    model = DualEncoder(cfg).eval()
    texts = ["one", "two", "three"]
    negatives = ["x", "yy", "zzz", "one", "two", "three"]  # 3 rows x 2 negatives
    batch = {**text_inputs(cfg.anchor, texts, "anchor"), **text_inputs(cfg.anchor, texts, "positive")}
    neg = text_inputs(cfg.anchor, negatives, "negative")
    batch.update({k: v.reshape(3, 2, -1) for k, v in neg.items()})
    batch["negative_score"] = torch.zeros(3, 2)  # side inputs are not model inputs
    with torch.no_grad():
        out = model(batch)
        assert out.negatives is not None and out.negatives.shape == (3, 2, 16)
        # Row 2's second negative is the text "three": same embedding as that positive.
        torch.testing.assert_close(out.negatives[2, 1], out.positive[2])
        torch.testing.assert_close(out.negatives[0, 1], model.encode_positive(text_inputs(cfg.anchor, ["yy"], "positive"))[0])
    assert model({k: v for k, v in batch.items() if not k.startswith("negative")}).negatives is None
