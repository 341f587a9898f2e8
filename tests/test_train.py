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

from clray.jobs.cli import QUICKSTART_CONFIG, main
from clray.jobs.config import load_config
from clray.jobs.run import TrainingError, run_training
from clray.jobs.run.engine import warmup_cosine
from clray.pipelines.quickstart import write_quickstart_corpus

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


@pytest.fixture(scope="module")
def quickstart_run(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The README's first command, run once for the tests that read what it did."""
    import contextlib
    import io
    import os

    tmp_path = tmp_path_factory.mktemp("qs-cli")
    out = io.StringIO()
    here = os.getcwd()
    os.chdir(tmp_path)
    builds_before = _op_builds()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["quickstart"])
    finally:
        os.chdir(here)
    return {"code": code, "out": out.getvalue(), "tmp_path": tmp_path, "op_builds": (builds_before, _op_builds())}


def _op_builds() -> list[str]:
    """The build log of DeepSpeed's CPU comm op in torch's extension cache (one line per
    compiled file)."""
    from torch.utils.cpp_extension import get_default_build_root

    logs = Path(get_default_build_root()).glob("*/deepspeed_shm_comm/.ninja_log")
    return "".join(log.read_text() for log in logs).splitlines()


def test_quickstart_command_reaches_target(quickstart_run: dict) -> None:
    """The README's first command, as a user runs it: corpus, 2 workers, eval, summary."""
    assert quickstart_run["code"] == 0
    out, tmp_path = quickstart_run["out"], quickstart_run["tmp_path"]
    run_dir = tmp_path / "runs" / "quickstart"
    summary = json.loads((run_dir / "summary.json").read_text())

    assert summary["eval"]["eval/zero_shot_accuracy"] >= 0.80  # chance is 0.10
    assert "eval/zero_shot_accuracy" in out and "quarantine" in out
    # Quarantined exactly the 4 deliberately broken rows, with their ids and reasons.
    assert summary["quarantined_rows"] == 4
    quarantine = pq.read_table(summary["quarantine_path"]).to_pylist()
    assert sorted(r["id"] for r in quarantine) == [f"bad-{i:04d}" for i in range(4)]
    assert all(r["reason"] and r["file"].endswith(".parquet") for r in quarantine)
    # Every rank ran the same planned number of steps.
    assert summary["steps"] == summary["steps_per_epoch"] * 15 == (summary["train_rows"] // 128) * 15
    events = [e for e in read_events(run_dir) if e["event"] == "train"]
    assert [e["step"] for e in events][-1] == summary["steps"]
    for key in ("loss", "temperature", "pos_sim", "neg_sim", "accuracy", "samples_per_s", "data_wait_fraction"):
        assert math.isfinite(events[-1][key]), key
    assert 0.0 <= events[-1]["data_wait_fraction"] <= 1.0
    assert events[-1]["loss"] < events[0]["loss"] - 1.0
    assert events[-1]["pos_sim"] > events[-1]["neg_sim"] + 0.3
    for key in ("eval/a2p_R@1", "eval/a2p_R@5", "eval/a2p_R@10", "eval/p2a_R@1", "eval/p2a_R@10"):
        assert 0.0 <= summary["eval"][key] <= 1.0, key
    assert [Path(p).name for p in summary["checkpoints"]] == [f"checkpoint_{summary['steps']:08d}"]
    # The workers loaded DeepSpeed's CPU comm op as .ci/bootstrap built it; none compiled it.
    before, after = quickstart_run["op_builds"]
    assert before and after == before, after[len(before):]

    # The export loads without Ray and classifies digits like the trained model did.
    from clray.models.export import load_exported

    model = load_exported(summary["export_dir"])
    with torch.no_grad():
        texts = model.encode_positive(_text_batch(model, ["the digit 3", "a handwritten seven"]))
    assert texts.shape == (2, 64)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_same_run_name_resumes_model_optimizer_scheduler_and_counters(ray_session, corpus: Path, tmp_path: Path) -> None:
    common = ['run.name="digits"', "train.checkpoint_every=4", "train.log_every=2", "optim.warmup_steps=0",
              "optim.warmup_fraction=0.0", "train.keep_checkpoints=2"]
    first = run_training(load_config(QUICKSTART_CONFIG, quickstart_overrides(corpus, tmp_path, *common, "train.max_steps=8")))
    assert first.steps == 8 and first.resumed_from_step is None
    assert [Path(p).name for p in first.checkpoints] == ["checkpoint_00000004", "checkpoint_00000008"]
    exported = _state(first.export_dir)

    # Started again with the same name and nothing left to do: the trained weights come
    # back from the checkpoint (a fresh init with the same seed would differ).
    again = run_training(load_config(QUICKSTART_CONFIG, quickstart_overrides(corpus, tmp_path, *common, "train.max_steps=8")))
    assert again.resumed_from_step == 8 and again.steps == 8
    assert again.final_train == first.final_train and "loss" in again.final_train  # kept, not emptied
    for key, value in _state(again.export_dir).items():
        torch.testing.assert_close(value, exported[key], rtol=0, atol=0, msg=key)

    # With a longer budget it continues at step 9 and crosses the epoch boundary (11 steps).
    cfg = load_config(QUICKSTART_CONFIG, quickstart_overrides(corpus, tmp_path, *common, "train.max_steps=14"))
    second = run_training(cfg)
    assert second.resumed_from_step == 8 and second.steps == 14 and second.epochs == 1
    assert [Path(p).name for p in second.checkpoints] == ["checkpoint_00000012", "checkpoint_00000014"]
    events = [e for e in read_events(Path(second.run_dir)) if e["event"] == "train"]
    resumed = [e for e in events if e["time"] > max(e2["time"] for e2 in events if e2["step"] == 8)]
    assert [e["step"] for e in resumed] == [10, 12, 14]
    assert resumed[-1]["samples_seen"] == 14 * 128
    # The LR scheduler resumed at step 8, not 0: step 10's lr is the cosine at 10/14.
    expected_lr = cfg.optim.lr * warmup_cosine(14, 0, cfg.optim.min_lr_ratio)(10)
    assert resumed[0]["lr"] == pytest.approx(expected_lr, rel=1e-6)


def _state(export_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(export_dir) / "model.safetensors"))


def _text_batch(model, texts: list[str]) -> dict[str, torch.Tensor]:
    from clray.models.preprocess import preprocess_view

    tower = model.cfg.positive_tower
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


@pytest.fixture(scope="module")
def zero3_run(ray_session, tmp_path_factory: pytest.TempPathFactory):
    """A text-text run under ZeRO-3 that evaluates every 7 steps and exports its best
    evaluated state (train.select_by): the export is written mid-run, a collective."""
    tmp_path = tmp_path_factory.mktemp("zero3")
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
eval_every = 7
select_by = "eval/a2p_ir_MRR@10"
"""
    )
    cfg = load_config(config)
    return run_training(cfg)


def test_text_text_shared_tower_under_zero3(zero3_run) -> None:
    summary = zero3_run
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


def test_a_run_reports_what_it_bought(quickstart_run: dict) -> None:
    """Issue 13: the starting model is evaluated at step 0, the closing table shows every
    figure at the start and the end with the change, and the run leaves a report, its
    environment and an export that says what it is."""
    out, run_dir = quickstart_run["out"], quickstart_run["tmp_path"] / "runs" / "quickstart"
    summary = json.loads((run_dir / "summary.json").read_text())
    baseline, final = summary["baseline"], summary["eval"]
    assert set(baseline) == set(final) and len(final) > 20
    assert baseline["eval/zero_shot_accuracy"] < 0.4 < final["eval/zero_shot_accuracy"]
    assert final["eval/a2p_ir_MRR@10"] > baseline["eval/a2p_ir_MRR@10"]
    assert "evaluation: start -> end" in out and "change" in out
    evals = [e for e in read_events(run_dir) if e["event"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == summary["steps"]
    assert sum(evals[0]["histograms"]["positive"]) == evals[0]["eval_rows"]
    page = (run_dir / "report.html").read_text()
    assert summary["report"] == str(run_dir / "report.html")
    assert "<img" in page and "http://" not in page and "https://" not in page
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["versions"]["torch"] and env["versions"]["ray"] and env["workers"]["num_workers"] == 2
    card = (Path(summary["export_dir"]) / "positive_tower" / "README.md").read_text()
    assert "infonce" in card and "zero_shot_accuracy" in card and str(summary["train_rows"]) in card


def test_clray_eval_of_a_run_gives_the_runs_own_figures(quickstart_run: dict, capsys) -> None:
    """`clray eval RUN` consolidates the run's newest checkpoint (DeepSpeed's ZeRO shards
    into one fp32 model), embeds the run's eval split with Ray actors and reports what the
    run's own final evaluation did."""
    run_dir = quickstart_run["tmp_path"] / "runs" / "quickstart"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert main(["eval", str(run_dir)]) == 0, capsys.readouterr().err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["checkpoint"] == f"checkpoint_{summary['steps']:08d}"
    last_eval = [e for e in read_events(run_dir) if e["event"] == "eval"][-1]
    assert result["rows"] == last_eval["eval_rows"] and result["quarantined_rows"] == 0
    for key in ("eval/zero_shot_accuracy", "eval/a2p_ir_MRR@10", "eval/p2a_ir_nDCG@10", "eval/alignment"):
        assert result["figures"][key] == pytest.approx(summary["eval"][key], abs=0.01), key


def test_select_by_exports_the_best_evaluated_state(zero3_run) -> None:
    """train.select_by: the export is the best evaluated state (written mid-run, under
    ZeRO-3 a collective), its checkpoint is kept beside the latest, and its model card
    carries that state's figures; the summary's eval is still the run's last evaluation."""
    summary = zero3_run
    metric = "eval/a2p_ir_MRR@10"
    records = read_events(Path(summary.run_dir))
    evals = {e["step"]: e[metric] for e in records if e["event"] == "eval" and e["step"] > 0}
    assert sorted(evals) == [7, 14, 21, 28]
    best = max(evals, key=lambda step: (evals[step], -step))
    exported = [e["step"] for e in records if e["event"] == "exported"]
    assert exported[-1] == best == summary.export_step
    assert [evals[step] for step in exported] == sorted(evals[step] for step in exported)  # each a new best
    assert f"checkpoint_{best:08d}" in {Path(p).name for p in summary.checkpoints}
    assert f"checkpoint_{summary.steps:08d}" in {Path(p).name for p in summary.checkpoints}
    assert summary.eval[metric] == pytest.approx(evals[28])
    card = (Path(summary.export_dir) / "anchor_tower" / "README.md").read_text()
    assert f"{evals[best]:.4f}" in card


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


def test_deterministic_data_gives_the_same_run_twice(ray_session, corpus: Path, tmp_path: Path) -> None:
    """data.deterministic: two runs of one config see the same batches, so every logged
    loss matches exactly (the comparison tune trials and benchmarks rely on)."""
    losses = []
    for name in ("first", "second"):
        cfg = load_config(QUICKSTART_CONFIG, quickstart_overrides(
            corpus, tmp_path, f'run.name="{name}"', "data.deterministic=true", "data.eval=[]",
            "scaling.num_workers=1", "train.global_batch_size=64", "train.max_steps=6", "train.log_every=1",
        ))
        run_training(cfg)
        losses.append([e["loss"] for e in read_events(tmp_path / name) if e["event"] == "train"])
    assert len(losses[0]) == 6 and losses[0] == losses[1]
