"""End-to-end `clray train` on a local Ray: DeepSpeed workers, gathered negatives,
quarantine, checkpoints, resume, evaluation and export. Few and small: each fit costs
worker start-up, so one test covers several claims."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import QUICKSTART_CONFIG, main
from jobs.config import load_config
from jobs.engine import warmup_cosine
from jobs.train import TrainingError, run_training
from pipelines.quickstart import write_quickstart_corpus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quickstart")
    write_quickstart_corpus(out, bad_rows=4)
    return out


def quickstart_overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        f'data.train="{corpus / "train"}"',
        f'data.eval="{corpus / "eval"}"',
        f'run.output_dir="{out}"',
        *extra,
    ]


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_image_text_run_checkpoints_resumes_evaluates_and_exports(ray_session, corpus: Path, tmp_path: Path) -> None:
    common = ["run.name=\"digits\"", "train.checkpoint_every=4", "train.log_every=2", "optim.warmup_steps=0",
              "optim.warmup_fraction=0.0"]
    cfg = load_config(QUICKSTART_CONFIG, quickstart_overrides(corpus, tmp_path, *common, "train.max_steps=8"))
    first = run_training(cfg)

    # Ran the planned steps on 2 workers, quarantined exactly the 4 broken rows.
    assert first.steps == 8
    assert first.quarantined_rows == 4
    quarantine = pq.read_table(first.quarantine_path).to_pylist()
    assert sorted(r["id"] for r in quarantine) == [f"bad-{i:04d}" for i in range(4)]
    assert all(r["reason"] for r in quarantine)
    assert first.steps_per_epoch == first.train_rows // 128
    assert [Path(p).name for p in first.checkpoints] == ["checkpoint_00000004", "checkpoint_00000008"]
    events = [e for e in read_events(Path(first.run_dir)) if e["event"] == "train"]
    assert [e["step"] for e in events] == [2, 4, 6, 8]
    for key in ("loss", "temperature", "pos_sim", "neg_sim", "accuracy", "samples_per_s", "data_wait_fraction"):
        assert math.isfinite(events[-1][key]), key
    assert 0.0 <= events[-1]["data_wait_fraction"] <= 1.0
    assert events[-1]["loss"] < events[0]["loss"]
    # Evaluation on the held-out split.
    for key in ("eval/a2p_R@1", "eval/a2p_R@5", "eval/a2p_R@10", "eval/p2a_R@1", "eval/zero_shot_accuracy"):
        assert key in first.eval, key
    assert first.eval["eval/zero_shot_accuracy"] > 0.2  # chance is 0.1; 8 steps already learn

    # Same name again with a longer budget: resumes at step 9, keeping optimizer, scheduler,
    # step and samples seen; keeps only the last 2 checkpoints.
    cfg2 = load_config(QUICKSTART_CONFIG, quickstart_overrides(corpus, tmp_path, *common, "train.max_steps=14"))
    second = run_training(cfg2)
    assert second.resumed_from_step == 8
    assert second.steps == 14
    assert [Path(p).name for p in second.checkpoints] == ["checkpoint_00000012", "checkpoint_00000014"]
    events = [e for e in read_events(Path(second.run_dir)) if e["event"] == "train"]
    resumed = [e for e in events if e["step"] > 8]
    assert [e["step"] for e in resumed] == [10, 12, 14]
    assert resumed[-1]["samples_seen"] == 14 * 128
    # The LR scheduler resumed at step 8, not 0: step 10's lr is the cosine at 10/14.
    expected_lr = cfg2.optim.lr * warmup_cosine(14, 0, cfg2.optim.min_lr_ratio)(10)
    assert resumed[0]["lr"] == pytest.approx(expected_lr, rel=1e-6)
    # The model resumed too: its loss continues from where run one ended, far below a fresh start.
    assert resumed[0]["loss"] < events[0]["loss"]

    # The export loads without Ray and embeds like the trained model.
    from models.export import load_exported

    model = load_exported(second.export_dir)
    with torch.no_grad():
        texts = model.encode_positive(_text_batch(model, ["the digit 3", "a handwritten seven"]))
    assert texts.shape == (2, cfg.model.embed_dim)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)


def _text_batch(model, texts: list[str]) -> dict[str, torch.Tensor]:
    from models.preprocess import preprocess_view

    tower = model.config.positive_tower
    return {k: torch.from_numpy(v) for k, v in preprocess_view(tower, texts, "positive").items()}


def write_text_pairs(root: Path, rows: int = 512, seed: int = 0) -> Path:
    """Queries and passages about random 'entities': a text-text retrieval corpus."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ten", "sar", "vu", "rel", "po", "zin", "dah", "qu", "ebb"]
    names = sorted({"".join(rng.choice(syllables, size=3)) for _ in range(rows * 2)})[:rows]
    queries = [f"what is {n}?" for n in names]
    passages = [f"{n} is a thing; {n} appears here." for n in names]
    table = pa.table({"id": [f"q{i:05d}" for i in range(len(names))], "query": queries, "passage": passages})
    (root / "train").mkdir(parents=True)
    (root / "eval").mkdir()
    pq.write_table(table.slice(0, len(names) - 64), root / "train" / "part-0.parquet")
    pq.write_table(table.slice(len(names) - 64), root / "eval" / "part-0.parquet")
    return root


def test_text_text_shared_tower_under_zero3(ray_session, tmp_path: Path) -> None:
    data = write_text_pairs(tmp_path / "pairs")
    config = tmp_path / "text.toml"
    config.write_text(
        f"""
[run]
name = "qp"
output_dir = "{tmp_path / 'runs'}"
[data]
train = "{data / 'train'}"
eval = "{data / 'eval'}"
[data.anchor]
column = "query"
kind = "text"
[data.positive]
column = "passage"
kind = "text"
[model]
shared_tower = true
embed_dim = 32
[model.anchor]
type = "text"
max_length = 40
config = {{ model_type = "bert", hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 2, intermediate_size = 64, max_position_embeddings = 64 }}
[optim]
lr = 3e-3
[train]
global_batch_size = 64
epochs = 4
log_every = 5
zero_stage = 3
"""
    )
    cfg = load_config(config)
    summary = run_training(cfg)
    assert summary.steps == 4 * (448 // 64)
    assert summary.quarantined_rows == 0 and summary.quarantine_path is None
    events = [e for e in read_events(Path(summary.run_dir)) if e["event"] == "train"]
    assert events[-1]["loss"] < events[0]["loss"]
    # 64 eval pairs: chance R@1 is 1/64.
    assert summary.eval["eval/a2p_R@1"] > 5 / 64
    assert "eval/zero_shot_accuracy" not in summary.eval
    # One shared tower exported once, loadable by transformers.
    from transformers import AutoModel

    assert (Path(summary.export_dir) / "anchor_tower").is_dir()
    assert not (Path(summary.export_dir) / "positive_tower").exists()
    AutoModel.from_pretrained(Path(summary.export_dir) / "anchor_tower")


def test_missing_column_stops_before_training(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", str(QUICKSTART_CONFIG), *sum((["--set", o] for o in quickstart_overrides(
        corpus, tmp_path, 'data.positive.column="text"')), [])])
    assert code == 2
    err = capsys.readouterr().err
    assert "part-00000.parquet" in err and "'text'" in err and "data.positive.column" in err
    assert "Traceback" not in err
    assert not (tmp_path / "quickstart").exists()  # nothing started, no run directory


def test_worker_failure_is_one_clear_message(ray_session, corpus: Path, tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART_CONFIG, quickstart_overrides(
        corpus, tmp_path, 'model.positive.config={model_type="no-such-architecture"}', "train.max_steps=2"))
    with pytest.raises(TrainingError) as info:
        run_training(cfg)
    message = str(info.value)
    assert message.startswith("training failed on worker rank")
    assert "no-such-architecture" in message
    assert (tmp_path / "quickstart" / "error.log").is_file()
