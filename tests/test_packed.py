"""Training on mined packed batches (data.batches = "packed"): plan checks and batch
unpacking without Ray, then one run started twice (stopped at an epoch boundary, then
resumed) proving every step trains exactly one whole mined batch of the right epoch plan.

Plan directories are written here with pyarrow in the format of pipelines.plan_format,
independently of the miner, so these tests pin the format the two sides share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clray.jobs.config import ConfigError, JobConfig, load_config, validate
from clray.jobs.run.worker import RECORD_BATCHES_ENV
from clray.models.config import ConvTowerConfig, TextTowerConfig
from clray.pipelines.config import DataConfig
from clray.pipelines.dataset import id_keys, preprocess_rows
from clray.pipelines.errors import DataError
from clray.pipelines.packed import load_plan
from clray.pipelines.plan_format import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    PlanColumns,
    columns_dict,
    epoch_dir,
    write_json_atomic,
)
from clray.pipelines.quickstart import CLASS_NAMES, write_quickstart_corpus
from clray.pipelines.unpack import unpack_batches

QUICKSTART_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.toml"
BATCH = 32  # local batch: global 64 over 2 workers
NUM_BATCHES = (7, 6)  # epoch plans of different lengths: 3 steps per epoch, plan 0 skips 1
NEGATIVE_COLUMNS = ("negative_captions", "negative_ids", "negative_scores")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits-negatives")
    write_quickstart_corpus(out, bad_rows=0, hard_negatives=2)
    return out


def read_train(corpus: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted((corpus / "train").glob("*.parquet")))


def packed_type(dtype: pa.DataType) -> pa.DataType:
    return pa.list_(dtype)


def write_plan(
    out: Path,
    rows: pa.Table,
    *,
    num_batches: tuple[int, ...] = NUM_BATCHES,
    batch_size: int = BATCH,
    negatives: bool = True,
    label: bool = True,
) -> dict[int, list[list[str]]]:
    """A plan directory as `clray mine` writes it; returns each epoch's batches (ids)."""
    columns = ["id", "image", "caption", *(["label"] if label else []), *(NEGATIVE_COLUMNS if negatives else ())]
    epochs, plans = [], {}
    for epoch, count in enumerate(num_batches):
        order = np.random.default_rng(100 + epoch).permutation(rows.num_rows)
        used = order[: count * batch_size].reshape(count, batch_size)
        records = []
        for index, members in enumerate(used):
            batch = rows.take(pa.array(members))
            records.append({"epoch": epoch, "batch": index, **{c: batch.column(c).to_pylist() for c in columns}})
        schema = pa.schema(
            [pa.field("epoch", pa.int32()), pa.field("batch", pa.int32())]
            + [pa.field(c, packed_type(rows.schema.field(c).type)) for c in columns]
        )
        directory = epoch_dir(out, epoch)
        directory.mkdir(parents=True)
        half = (count + 1) // 2
        files = []
        for part, chunk in enumerate((records[:half], records[half:])):
            path = directory / f"part-{part:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(chunk, schema=schema), path)
            files.append(str(path.relative_to(out)))
        remainder = rows.take(pa.array(order[count * batch_size:])).column("id").to_pylist()
        epochs.append({"epoch": epoch, "seed": 100 + epoch, "num_batches": count, "files": files, "remainder_ids": remainder})
        plans[epoch] = [r["id"] for r in records]
    plan_cols = PlanColumns(
        id="id", anchor="image", anchor_kind="image", positive="caption", positive_kind="text",
        label="label" if label else None,
        **(dict(zip(("negatives", "negative_ids", "negative_scores"), NEGATIVE_COLUMNS, strict=True)) if negatives else {}),
    )
    write_json_atomic(out / MANIFEST_NAME, {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "batch_size": batch_size,
        "num_negatives": 2 if negatives else 0, "columns": columns_dict(plan_cols), "epochs": epochs,
    })
    return plans


@pytest.fixture(scope="module")
def plan(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[list[str]]]]:
    out = tmp_path_factory.mktemp("plan")
    return out, write_plan(out, read_train(corpus))


def data_cfg(plan_dir: Path, **overrides: object) -> DataConfig:
    fields: dict[str, object] = {
        "train": str(plan_dir),
        "batches": "packed",
        "anchor": {"column": "image", "kind": "image"},
        "positive": {"column": "caption", "kind": "text"},
        "label_column": "label",
        "class_names": CLASS_NAMES,
        "negatives": {"column": "negative_captions", "kind": "text"},
        "num_negatives": 2,
        "negative_id_column": "negative_ids",
        "negative_score_column": "negative_scores",
    }
    fields.update(overrides)
    return DataConfig.model_validate(fields)


def plan_error(cfg: DataConfig, global_batch_size: int = 64, num_workers: int = 2) -> str:
    with pytest.raises(DataError) as info:
        load_plan(cfg, global_batch_size=global_batch_size, num_workers=num_workers)
    return str(info.value)


# --- the plan against the config (no Ray) -----------------------------------------


def test_matching_plan_loads_with_steps_and_skipped_batches(plan) -> None:
    plan_dir, batches = plan
    loaded = load_plan(data_cfg(plan_dir), global_batch_size=64, num_workers=2)
    assert loaded.batch_size == BATCH and loaded.num_negatives == 2 and loaded.num_plans == 2
    assert [e.num_batches for e in loaded.epochs] == list(NUM_BATCHES)
    assert all(Path(f).is_absolute() and Path(f).is_file() for e in loaded.epochs for f in e.files)
    assert loaded.steps_per_epoch(2) == 3 and loaded.skipped_batches(2) == [1, 0]
    assert loaded.steps_per_epoch(1) == 6 and loaded.skipped_batches(1) == [1, 0]
    assert loaded.rows_per_epoch == NUM_BATCHES[0] * BATCH
    assert loaded.quarantine_path is None
    # Without hard negatives in the config the same plan serves plain pairs.
    plain = data_cfg(plan_dir, negatives=None, negative_id_column=None, negative_score_column=None)
    assert load_plan(plain, global_batch_size=64, num_workers=2).num_plans == 2


def test_batch_size_mismatch_says_which_global_batch_matches(plan) -> None:
    message = plan_error(data_cfg(plan[0]), global_batch_size=128)
    assert "train.global_batch_size = 64" in message and "packs 32 rows" in message
    message = plan_error(data_cfg(plan[0]), global_batch_size=64, num_workers=4)
    assert "scaling.num_workers = 4" in message and "train.global_batch_size = 128" in message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"id_column": "uid"}, "data.id_column = 'uid'"),
        ({"positive": {"column": "text", "kind": "text"}}, "data.positive.column = 'text'"),
        ({"anchor": {"column": "image", "kind": "text"}}, "data.anchor.kind = 'text'"),
        ({"label_column": "digit"}, "data.label_column = 'digit'"),
        ({"negatives": {"column": "negs", "kind": "text"}}, "data.negatives.column = 'negs'"),
        ({"num_negatives": 3}, "data.num_negatives = 3"),
        ({"negative_score_column": "scores"}, "data.negative_score_column = 'scores'"),
    ],
)
def test_config_columns_must_match_the_plan(plan, overrides: dict, key: str) -> None:
    message = plan_error(data_cfg(plan[0], **overrides))
    assert key in message and "set " in message


def test_plan_without_labels_or_negatives(corpus: Path, tmp_path: Path) -> None:
    write_plan(tmp_path, read_train(corpus), negatives=False, label=False)
    message = plan_error(data_cfg(tmp_path))
    assert "data.label_column = 'label'" in message and "no label column" in message
    assert "data.negatives is set" in message and "without hard negatives" in message


def test_incomplete_plan_directory(corpus: Path, tmp_path: Path) -> None:
    write_plan(tmp_path, read_train(corpus))
    missing = epoch_dir(tmp_path, 1) / "part-00001.parquet"
    missing.unlink()
    message = plan_error(data_cfg(tmp_path))
    assert "data.train" in message and str(missing) in message and "epoch 1" in message
    (tmp_path / MANIFEST_NAME).unlink()
    message = plan_error(data_cfg(tmp_path))
    assert message.startswith("data.train") and "manifest.json" in message and "clray mine" in message
    message = plan_error(data_cfg(tmp_path / "nowhere"))
    assert message.startswith("data.train") and "no such directory" in message


def test_manifest_batch_count_must_match_the_files(corpus: Path, tmp_path: Path) -> None:
    write_plan(tmp_path, read_train(corpus))
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["epochs"][0]["num_batches"] = 9
    write_json_atomic(tmp_path / MANIFEST_NAME, manifest)
    assert "files hold 7 batches but the manifest says 9" in plan_error(data_cfg(tmp_path))


def test_the_miners_quarantine_is_reported(corpus: Path, tmp_path: Path) -> None:
    write_plan(tmp_path, read_train(corpus))
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    write_json_atomic(tmp_path / MANIFEST_NAME, {**manifest, "quarantine_path": "quarantine.parquet", "quarantined_rows": 2})
    pq.write_table(pa.table({"id": ["a", "b"], "reason": ["caption: empty text"] * 2, "file": ["x", "x"]}),
                   tmp_path / "quarantine.parquet")
    loaded = load_plan(data_cfg(tmp_path), global_batch_size=64, num_workers=2)
    assert loaded.quarantine_path == str(tmp_path / "quarantine.parquet") and loaded.quarantined_rows == 2


def test_fewer_batches_than_workers(plan) -> None:
    message = plan_error(data_cfg(plan[0]), global_batch_size=8 * BATCH, num_workers=8)
    assert "scaling.num_workers = 8" in message and "has 6 batch(es)" in message


def test_ordinary_shards_are_not_a_plan(corpus: Path) -> None:
    message = plan_error(data_cfg(corpus / "train"))
    assert "no manifest.json" in message


def test_packed_takes_exactly_one_train_entry(plan) -> None:
    message = plan_error(data_cfg(plan[0], train=[str(plan[0]), str(plan[0])]))
    assert "data.train" in message and "exactly one plan directory" in message
    raw = {
        "data": {**data_cfg(plan[0]).model_dump(mode="json"), "train": ["a", "b"], "shuffle": "global", "cache": "always"},
        "model": {"anchor": {"type": "conv", "image_size": 8, "image_mode": "L"},
                  "positive": {"type": "text", "config": {"model_type": "bert"}}},
    }
    with pytest.raises(ConfigError) as info:
        validate(raw)
    assert len(info.value.problems) == 1  # shuffle and cache are ignored in packed mode
    assert info.value.problems[0].startswith('data.batches = "packed"') and "data.train has 2 entries" in str(info.value)
    raw["data"]["train"] = ["a"]
    assert isinstance(validate(raw), JobConfig)


# --- unpacking one mined batch (no Ray) ----------------------------------------------

IMAGE_TOWER = ConvTowerConfig(image_size=8, image_mode="L", channels=[4])
TEXT_TOWER = TextTowerConfig(config={"model_type": "bert"}, max_length=24)


def packed_rows(plan_dir: Path, epoch: int = 0) -> pa.Table:
    return pq.read_table(epoch_dir(plan_dir, epoch) / "part-00000.parquet")


def test_unpacked_batch_equals_examples_mode_inputs(corpus: Path, plan) -> None:
    plan_dir, batches = plan
    cfg = data_cfg(plan_dir)
    packed = packed_rows(plan_dir).slice(2, 1)
    arrays = unpack_batches(packed, cfg, IMAGE_TOWER, TEXT_TOWER, BATCH, epoch=0)

    rows = read_train(corpus)
    by_id = {v: i for i, v in enumerate(rows.column("id").to_pylist())}
    ids = batches[0][2]
    expected = preprocess_rows(
        rows.take(pa.array([by_id[i] for i in ids])), cfg, {"anchor": IMAGE_TOWER, "positive": TEXT_TOWER},
        include_ids=False,
    )
    assert set(arrays) == set(expected) >= {"anchor_pixel_values", "positive_input_ids", "id_key", "label",
                                            "negative_id_key", "negative_score"}
    for key, value in expected.items():
        assert arrays[key].shape == (1, *value.shape), key
        np.testing.assert_array_equal(arrays[key][0], value, err_msg=key)
    assert arrays["positive_input_ids"].shape[:2] == (1, BATCH)
    assert arrays["negative_id_key"].shape == (1, BATCH, 2)
    np.testing.assert_array_equal(arrays["id_key"][0], id_keys(ids))


def test_a_bad_row_fails_its_whole_batch_naming_it(plan) -> None:
    plan_dir, batches = plan
    cfg = data_cfg(plan_dir)
    row = packed_rows(plan_dir).slice(1, 1).to_pylist()[0]
    row["caption"][5] = "  "
    broken = pa.Table.from_pylist([row], schema=packed_rows(plan_dir).schema)
    with pytest.raises(DataError) as info:
        unpack_batches(broken, cfg, IMAGE_TOWER, TEXT_TOWER, BATCH, epoch=0)
    message = str(info.value)
    assert "epoch 0, batch 1" in message and repr(batches[0][1][5]) in message and "caption: empty text" in message

    row["caption"][5] = "fine"
    row["image"][7] = b"not an image"
    broken = pa.Table.from_pylist([row], schema=packed_rows(plan_dir).schema)
    with pytest.raises(DataError, match=f"{batches[0][1][7]!r} cannot be trained on \\(image: undecodable image\\)"):
        unpack_batches(broken, cfg, IMAGE_TOWER, TEXT_TOWER, BATCH, epoch=0)

    short = {**packed_rows(plan_dir).slice(1, 1).to_pylist()[0]}
    short["caption"] = short["caption"][:-1]
    broken = pa.Table.from_pylist([short], schema=packed_rows(plan_dir).schema)
    with pytest.raises(DataError, match="column 'caption' holds 31 values, not the plan's batch_size = 32"):
        unpack_batches(broken, cfg, IMAGE_TOWER, TEXT_TOWER, BATCH, epoch=0)
    with pytest.raises(DataError, match="listed under epoch 1"):
        unpack_batches(packed_rows(plan_dir).slice(0, 1), cfg, IMAGE_TOWER, TEXT_TOWER, BATCH, epoch=1)


# --- training on a plan (Ray) ----------------------------------------------------------


def packed_config(plan_dir: Path, corpus: Path, out: Path, *extra: str) -> JobConfig:
    return load_config(QUICKSTART_CONFIG, [
        'data.batches="packed"',
        f'data.train="{plan_dir}"',
        f'data.eval="{corpus / "eval"}"',
        f'run.output_dir="{out}"',
        "train.global_batch_size=64",
        "optim.warmup_fraction=0.0",
        *extra,
    ])


def recorded(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_whole_plan_batches(records: list[dict], batches: dict[int, list[list[str]]], epochs: list[int],
                              steps_per_epoch: int, num_workers: int = 2) -> None:
    """Each epoch's steps trained distinct, intact batches of that epoch's plan
    (epoch e -> plan e % 2), every rank one per step, the same count on every rank."""
    keys = {plan: {tuple(sorted(id_keys(ids).tolist())): i for i, ids in enumerate(b)} for plan, b in batches.items()}
    for epoch in epochs:
        mine = [r for r in records if r["epoch"] == epoch]
        plan = keys[epoch % 2]
        used = [plan.get(tuple(r["id_keys"])) for r in mine]
        assert None not in used, f"epoch {epoch}: a step trained something other than one whole plan batch"
        assert len(set(used)) == len(used) == steps_per_epoch * num_workers, epoch
        for rank in range(num_workers):
            assert sorted(r["step_in_epoch"] for r in mine if r["rank"] == rank) == list(range(steps_per_epoch))


def test_packed_training_takes_whole_plan_batches_and_resumes_at_an_epoch_stop(
    ray_session, plan, corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    """Two starts of one run (each Ray Train fit costs ~30 s here, so one test): the first
    trains epoch 0 and stops there (stop_epoch=1, as re-mining between epochs does); the
    second resumes at that boundary and trains epoch 1 on plan 1 and epoch 2 on plan 0
    again (3 epochs over 2 plans), with hard negatives and an ordinary eval split."""
    from clray.jobs.run import run_training
    from clray.jobs.run.engine import warmup_cosine

    plan_dir, batches = plan
    record = tmp_path / "batches.jsonl"
    monkeypatch.setenv(RECORD_BATCHES_ENV, str(record))
    cfg = packed_config(plan_dir, corpus, tmp_path, "train.epochs=3", "train.log_every=1",
                        'data.negatives={column="negative_captions", kind="text"}', "data.num_negatives=2",
                        'data.negative_id_column="negative_ids"', "loss.mask_same_id=true")
    events: list[dict] = []
    first = run_training(cfg, on_event=events.append, stop_epoch=1)

    assert first.steps == 3 and first.total_steps == 9 and first.steps_per_epoch == 3 and first.epochs == 1
    assert first.resumed_from_step is None
    assert first.batches == "packed" and first.num_plans == 2 and first.plan_dir == str(plan_dir)
    assert first.skipped_batches == [1, 0]  # plan 0's 7th batch: no worker could take it
    assert first.quarantined_rows == 0 and first.quarantine_path is None
    assert first.train_rows == NUM_BATCHES[0] * BATCH
    data = next(e for e in events if e["event"] == "data")
    assert data["packed"]["skipped_batches"] == [1, 0] and data["packed"]["batches_per_plan"] == list(NUM_BATCHES)
    assert data["packed"]["cycles_plans"] and data["plan"]["packed"] and data["plan"]["num_plans"] == 2
    assert data["plan"]["stop_step"] == 3
    # Stopped at the epoch boundary with a checkpoint and an export; evaluated only at
    # the start (the baseline), not at the stop: the run is not complete.
    assert [Path(p).name for p in first.checkpoints] == ["checkpoint_00000003"]
    baseline = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in baseline] == [0]
    assert first.export_dir is not None and first.eval == {k: v for k, v in baseline[0].items() if k.startswith("eval/")}
    assert_whole_plan_batches(recorded(record), batches, [0], steps_per_epoch=3)

    events.clear()
    second = run_training(cfg, on_event=events.append)
    assert second.resumed_from_step == 3 and second.steps == 9 and second.epochs == 3
    resumed = next(e for e in events if e["event"] == "resumed")
    assert resumed["epoch"] == 1 and resumed["step_in_epoch"] == 0 and resumed["dataset"] == "train_1"
    assert next(e for e in events if e["event"] == "data")["plan"]["stop_step"] is None
    records = recorded(record)
    assert sorted({r["step"] for r in records}) == list(range(1, 10)) and len(records) == 2 * 9
    assert_whole_plan_batches(records, batches, [0, 1, 2], steps_per_epoch=3)
    # The skipped batch is plan 0's last index, so which one is deterministic.
    assert tuple(sorted(id_keys(batches[0][6]).tolist())) not in {tuple(r["id_keys"]) for r in records}
    # The LR schedule spans all 9 steps in both starts (no warmup: the cosine at 4/9 after step 4).
    step4 = next(e for e in events if e["event"] == "train" and e["step"] == 4)
    assert step4["lr"] == pytest.approx(cfg.optim.lr * warmup_cosine(9, 0, cfg.optim.min_lr_ratio)(4), rel=1e-6)
    # Eval stays ordinary example shards; it runs once the run is complete.
    assert 0.0 <= second.eval["eval/zero_shot_accuracy"] <= 1.0
    assert np.isfinite(second.final_train["loss"]) and second.export_dir is not None


def test_a_bad_mined_row_reaches_the_user_as_its_data_error() -> None:
    """Ray Data ships a failing map function's exception only as traceback text inside
    UserCodeException; the run's message must still be the DataError naming the row."""
    from ray.exceptions import RayTaskError, UserCodeException

    from clray.jobs.run.driver import failure_message as _failure_message

    line = "plan/part-00000.parquet (epoch 0, batch 1): row 'digits-000152' cannot be trained on (caption: empty text)"
    remote = (f"Traceback (most recent call last):\n  File \"pipelines/packed.py\", line 1\n"
              f"pipelines.errors.DataError: {line}\n\nThe above exception was the direct cause of the following "
              "exception:\n\nray.exceptions.UserCodeException: UDF failed to process a data block.")
    udf = UserCodeException("UDF failed to process a data block.")
    inner = RayTaskError("MapBatches(unpack_batches)", remote, udf).as_instanceof_cause()
    outer = RayTaskError("SplitCoordinator.get", f"Traceback\n{inner}", inner).as_instanceof_cause()

    class TrainingFailed(Exception):
        worker_failures = {1: outer, 0: outer}

    message = _failure_message(TrainingFailed("failed"), Path("error.log"))
    assert message.startswith(f"training failed on worker rank 0: DataError: {line}")


# --- plans of global batches (issue 18) ------------------------------------------------

GLOBAL = 64  # a mined batch is the global batch: 2 workers x 32 rows


def write_global_plan(out: Path, rows: pa.Table, num_batches: tuple[int, ...] = (3, 2), num_workers: int = 2,
                      scores: bool = False) -> dict[int, list[list[str]]]:
    """A plan of global batches (its manifest records the worker count), optionally with
    the teacher's in-batch scores beside each batch."""
    plans = write_plan(out, rows, num_batches=num_batches, batch_size=GLOBAL)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest.update(num_workers=num_workers, local_batch_size=GLOBAL // num_workers)
    if scores:
        manifest["columns"]["in_batch_scores"] = "teacher_scores"
        for epoch in manifest["epochs"]:
            for f in epoch["files"]:
                table = pq.read_table(out / f)
                values = [[[float(i == j) + 0.01 * j for j in range(GLOBAL)] for i in range(GLOBAL)]] * table.num_rows
                table = table.append_column("teacher_scores", pa.array(values, pa.list_(pa.list_(pa.float32()))))
                pq.write_table(table, out / f)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return plans


def test_a_global_plan_trains_only_at_its_worker_count(corpus: Path, tmp_path: Path) -> None:
    write_global_plan(tmp_path, read_train(corpus))
    message = plan_error(data_cfg(tmp_path), global_batch_size=GLOBAL, num_workers=4)
    assert "mined for 2 worker(s)" in message and "scaling.num_workers = 4" in message
    assert "mining.num_workers = 4" in message
    message = plan_error(data_cfg(tmp_path), global_batch_size=128, num_workers=2)
    assert "global batches of 64 rows" in message and "train.global_batch_size = 128" in message
    loaded = load_plan(data_cfg(tmp_path), global_batch_size=GLOBAL, num_workers=2)
    assert loaded.global_batches and loaded.steps_per_epoch(2) == 2 and loaded.skipped_batches(2) == [1, 0]
    assert loaded.local_batch_size(2) == 32


def test_each_rank_unpacks_its_own_part_with_the_in_batch_scores(corpus: Path, tmp_path: Path) -> None:
    batches = write_global_plan(tmp_path, read_train(corpus), scores=True)
    cfg = data_cfg(tmp_path, in_batch_score_column="teacher_scores")
    row = packed_rows(tmp_path).slice(1, 1)
    parts = [unpack_batches(row, cfg, IMAGE_TOWER, TEXT_TOWER, GLOBAL, epoch=0, part=(r, 2), with_index=True)
             for r in range(2)]
    for r, arrays in enumerate(parts):
        np.testing.assert_array_equal(arrays["id_key"][0], id_keys(batches[0][1][32 * r : 32 * (r + 1)]))
        assert arrays["plan_batch"].tolist() == [1]
        scores = arrays["in_batch_score"][0]
        assert scores.shape == (32, GLOBAL)
        # row i of rank r is global row 32r + i: its own positive is column 32r + i
        assert np.argmax(scores, axis=1).tolist() == list(range(32 * r, 32 * (r + 1)))


def test_a_step_trains_exactly_one_mined_global_batch(ray_session, corpus: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    """The W parts of each step are together exactly one mined batch, the plan's batch s
    at step s, rank r taking rows [32r, 32r + 32): whatever order Ray Data delivers in."""
    from clray.jobs.run import run_training

    plan_dir = tmp_path / "plan"
    batches = write_global_plan(plan_dir, read_train(corpus))
    record = tmp_path / "batches.jsonl"
    monkeypatch.setenv(RECORD_BATCHES_ENV, str(record))
    cfg = packed_config(plan_dir, corpus, tmp_path, "train.epochs=2", "train.log_every=1",
                        f"train.global_batch_size={GLOBAL}", "data.eval=[]")
    summary = run_training(cfg)
    assert summary.steps == 4 and summary.steps_per_epoch == 2 and summary.skipped_batches == [1, 0]
    records = recorded(record)
    assert len(records) == 2 * 4
    for r in records:
        mined = batches[r["epoch"] % 2][r["step_in_epoch"]]
        part = mined[32 * r["rank"] : 32 * (r["rank"] + 1)]
        assert r["id_keys"] == sorted(id_keys(part).tolist()), r
    # dynamic padding: each part's captions padded to their longest, never to max_length
    # (the quickstart's captions are at most about 25 characters; max_length is 48)
    assert all(r["widths"]["positive_input_ids"] < cfg.model.positive_tower.max_length for r in records), records
    for step in range(1, 5):
        both = sorted(k for r in records if r["step"] == step for k in r["id_keys"])
        first = next(r for r in records if r["step"] == step)
        assert both == sorted(id_keys(batches[first["epoch"] % 2][first["step_in_epoch"]]).tolist())
