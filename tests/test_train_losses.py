"""Loss settings flow from a TOML file through `clray train`: one short run per objective
family (softmax with hard negatives, sigmoid, supervised), each checking that what the
config asked for is what the workers trained with. The exactness of every objective and
mode is proven without Ray in test_loss_equivalence.py; these runs prove the wiring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomli_w
import tomllib

from clray.jobs.cli import QUICKSTART_CONFIG, main
from clray.pipelines.quickstart import write_quickstart_corpus

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quickstart-negatives")
    write_quickstart_corpus(out, bad_rows=0, hard_negatives=2)
    return out


def write_config(corpus: Path, out: Path, name: str, *, loss: dict, logit_scale: dict | None = None,
                 data: dict | None = None, train: dict | None = None) -> Path:
    raw = tomllib.loads(QUICKSTART_CONFIG.read_text())
    raw["run"].update(name=name, output_dir=str(out))
    raw["data"].update(train=str(corpus / "train"), eval=str(corpus / "eval"), **(data or {}))
    raw["loss"] = loss
    if logit_scale is not None:
        raw["model"]["logit_scale"] = logit_scale
    raw["train"].update(max_steps=STEPS, log_every=1, global_batch_size=64, **(train or {}))
    path = out / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def train_events(out: Path, name: str) -> list[dict]:
    lines = (out / name / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "train"]


def test_softmax_family_with_hard_negatives_and_scheduled_temperature(ray_session, corpus: Path, tmp_path: Path) -> None:
    path = write_config(
        corpus, tmp_path, "hardneg",
        loss={"type": "infonce", "mode": "tiled", "block_size": 24, "hardness_beta": 0.5,
              "mask_same_id": True, "teacher_threshold": 0.93},
        logit_scale={"mode": "scheduled", "init_temperature": 0.1, "final_temperature": 0.05, "schedule": "linear"},
        data={"negatives": {"column": "negative_captions", "kind": "text"}, "num_negatives": 2,
              "negative_id_column": "negative_ids", "negative_score_column": "negative_scores"},
    )
    assert main(["train", str(path)]) == 0
    events = train_events(tmp_path, "hardneg")
    assert [e["step"] for e in events] == list(range(1, STEPS + 1))
    # The temperature each step trained with is the configured linear schedule.
    for e in events:
        progress = (e["step"] - 1) / (STEPS - 1)
        assert e["temperature"] == pytest.approx(0.1 + (0.05 - 0.1) * progress, rel=1e-5)
    # Every anchor saw the 64 in-batch candidates plus the 128 gathered hard negatives,
    # minus those masked: duplicates of its own id and teacher scores over 0.93.
    candidates = [e["candidates"] for e in events]
    assert all(64 < c < 64 + 128 for c in candidates), candidates
    assert all(math.isfinite(e["loss"]) for e in events)


def test_sigmoid_family_ring_with_gradcache(ray_session, corpus: Path, tmp_path: Path) -> None:
    path = write_config(
        corpus, tmp_path, "siglip",
        loss={"type": "siglip", "mode": "ring", "block_size": 16, "gradcache": True, "chunk_size": 12},
        logit_scale={},  # unset: SigLIP's own initial temperature applies
        data={"negatives": {"column": "negative_captions", "kind": "text"}, "num_negatives": 1},
    )
    assert main(["train", str(path)]) == 0
    events = train_events(tmp_path, "siglip")
    # SigLIP's defaults reached the workers: temperature 0.1 (learnable) and bias -10.
    assert events[0]["temperature"] == pytest.approx(0.1, rel=0.05)
    assert events[0]["logit_bias"] == pytest.approx(-10.0, abs=0.05)
    assert events[-1]["logit_bias"] != events[0]["logit_bias"]  # the bias is trained
    assert events[-1]["loss"] < events[0]["loss"]
    assert events[0]["candidates"] == 64 + 64  # in-batch plus one hard negative per row
    # The trained bias is part of the export.
    from clray.models.export import load_exported

    exported = load_exported(tmp_path / "siglip" / "export")
    assert exported.bias().item() == pytest.approx(events[-1]["logit_bias"], abs=0.01)
    assert exported.bias().item() != -10.0


def test_supervised_family_under_zero3(ray_session, corpus: Path, tmp_path: Path) -> None:
    path = write_config(
        corpus, tmp_path, "supcon",
        loss={"type": "supcon", "mode": "gather"},
        logit_scale={"mode": "fixed", "init_temperature": 0.2},
        train={"zero_stage": 3},
    )
    assert main(["train", str(path)]) == 0
    events = train_events(tmp_path, "supcon")
    assert all(e["temperature"] == pytest.approx(0.2, rel=1e-6) for e in events)
    assert events[-1]["loss"] < events[0]["loss"]
    summary = json.loads((tmp_path / "supcon" / "summary.json").read_text())
    assert "eval/zero_shot_accuracy" in summary["eval"]
