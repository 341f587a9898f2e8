"""Corpora, runs and mined plans on S3, against a real S3 API on loopback (moto's server,
started by this module): URI resolution, the error messages (no such bucket, nothing
matches, access denied, unreachable endpoint), and end to end: train from an S3 corpus
into an S3 run directory and resume from its S3 checkpoint; mine from S3 to S3 and
train packed from the S3 plan. No secret ever lands in what a run writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_AWS_ACCESS_KEY_ID, FAKE_AWS_SECRET_ACCESS_KEY

from clray.jobs.cli import QUICKSTART_CONFIG
from clray.jobs.config import ConfigError, load_config
from clray.jobs.runtime import free_port
from clray.pipelines import storage
from clray.pipelines.errors import DataError
from clray.pipelines.sources import resolve_shards
from clray.pipelines.spec import check_schema, split_spec
from clray.pipelines.storage import StorageConfig

BUCKET = "clray-test"


@pytest.fixture(scope="module")
def s3_endpoint(aws_test_env: None) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, one bucket; reachable from Ray's worker processes."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    _client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def _client(endpoint: str):  # noqa: ANN202 - boto3's client type is generated
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _keys(endpoint: str, prefix: str) -> list[str]:
    pages = _client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="module")
def s3_corpus(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The quickstart corpus (4 bad rows included) uploaded to s3://clray-test/corpus."""
    from clray.pipelines.quickstart import write_quickstart_corpus

    local = tmp_path_factory.mktemp("s3-corpus")
    write_quickstart_corpus(local, bad_rows=4)
    client = _client(s3_endpoint)
    for file in sorted(local.rglob("*.parquet")):
        client.upload_file(str(file), BUCKET, f"corpus/{file.relative_to(local).as_posix()}")
    return f"s3://{BUCKET}/corpus"


@pytest.fixture(scope="module")
def storage_cfg(s3_endpoint: str) -> StorageConfig:
    return StorageConfig(endpoint_url=s3_endpoint)


# ----------------------------------------------------------------------------- URIs


def test_storage_config_rejects_bad_endpoints() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not an http\\(s\\) URL"):
        StorageConfig(endpoint_url="127.0.0.1:9000")
    with pytest.raises(ValidationError, match="must not carry credentials"):
        StorageConfig(endpoint_url="http://key:secret@127.0.0.1:9000")
    with pytest.raises(ValidationError, match="secret_access_key"):
        StorageConfig(secret_access_key="x")  # no secret fields: unknown key


def test_join_and_split_keep_the_scheme() -> None:
    assert storage.join("s3://b/runs/", "name", "metrics.jsonl") == "s3://b/runs/name/metrics.jsonl"
    assert storage.split_s3("s3://b/a/b/") == ("b", "a/b")
    assert storage.normalize("s3://b/x/") == "s3://b/x"
    assert storage.join("/tmp/runs", "x") == "/tmp/runs/x"


def test_resolve_prefix_glob_and_object(s3_corpus: str, storage_cfg: StorageConfig, s3_endpoint: str) -> None:
    client = _client(s3_endpoint)
    # Writers' markers and other files beside the shards are skipped, as locally.
    client.put_object(Bucket=BUCKET, Key="corpus/train/_SUCCESS", Body=b"")
    client.put_object(Bucket=BUCKET, Key="corpus/train/_tmp/junk.parquet", Body=b"x")
    client.put_object(Bucket=BUCKET, Key="corpus/train/README.txt", Body=b"x")
    shards = [f"{s3_corpus}/train/part-{i:05d}.parquet" for i in range(4)]
    assert resolve_shards([f"{s3_corpus}/train"], "data.train", storage_cfg) == shards
    assert resolve_shards([f"{s3_corpus}/train/"], "data.train", storage_cfg) == shards
    assert resolve_shards([f"{s3_corpus}/tr*/part-0000[01].parquet"], "data.train", storage_cfg) == shards[:2]
    assert resolve_shards([f"s3://{BUCKET}/**/part-00003.parquet"], "data.train", storage_cfg) == [shards[3]]
    assert resolve_shards([shards[1], shards[1]], "data.train", storage_cfg) == [shards[1]]
    check_schema(split_spec(load_config(QUICKSTART_CONFIG).data, "train", shards, storage_cfg))


def test_resolve_errors_name_key_uri_and_failure(s3_corpus: str, storage_cfg: StorageConfig, tmp_path: Path) -> None:
    cases = {
        "s3://no-such-bucket-x/train": "no such bucket 'no-such-bucket-x'",
        f"{s3_corpus}/missing": "does not exist",
        f"{s3_corpus}/*/nothing-*.parquet": "matches no objects",
        f"{s3_corpus}/train/*.txt": "no .parquet files",
        "s3://no-such-bucket-x/*.parquet": "no such bucket",
    }
    for spec, phrase in cases.items():
        with pytest.raises(DataError) as err:
            resolve_shards([spec], "data.eval", storage_cfg)
        text = str(err.value)
        assert "data.eval" in text and spec in text and phrase in text, (spec, text)
    (tmp_path / "a.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="mixes local paths and s3:// URIs"):
        resolve_shards([str(tmp_path / "a.parquet"), f"{s3_corpus}/train"], "data.train", storage_cfg)


def test_schema_problem_names_the_s3_object(s3_corpus: str, storage_cfg: StorageConfig) -> None:
    data = load_config(QUICKSTART_CONFIG, ['data.positive.column="text"']).data
    shard = f"{s3_corpus}/eval/part-00000.parquet"
    with pytest.raises(DataError) as err:
        check_schema(split_spec(data, "eval", [shard], storage_cfg))
    assert shard in str(err.value) and "no column 'text'" in str(err.value)


def test_unreachable_endpoint_fails_fast_and_says_so() -> None:
    dead = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(DataError) as err:
        resolve_shards(["s3://bucket/train"], "data.train", dead)
    assert "data.train" in str(err.value) and "s3://bucket/train" in str(err.value)
    assert "cannot reach the S3 endpoint" in str(err.value) and "storage.endpoint_url" in str(err.value)


def test_access_denied_and_bad_credentials_are_explained() -> None:
    """moto (without IAM emulation) grants everything, so the translation is checked on
    the error shapes the real clients raise: botocore's ClientError and pyarrow's OSError
    text (AWS SDK error names, as pyarrow formats them)."""
    from botocore.exceptions import ClientError

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    assert storage.explain(denied).startswith("access denied")
    pyarrow_denied = OSError(
        "When getting information for key 'corpus/train' in bucket 'b': AWS Error ACCESS_DENIED during "
        "HeadObject operation: No response body."
    )
    err = storage.storage_error("s3://b/corpus/train", "looking up", pyarrow_denied, "data.train")
    assert str(err).startswith("data.train: looking up s3://b/corpus/train failed: access denied")
    assert "s3:GetObject" in str(err)
    bad_key = OSError("AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 operation: The AWS Access Key Id "
                      "you provided does not exist in our records.")
    assert "rejected the credentials" in storage.explain(bad_key)
    no_bucket = ClientError({"Error": {"Code": "NoSuchBucket", "Message": "x"}}, "ListObjectsV2")
    assert storage.explain(no_bucket).startswith("no such bucket")


def test_config_takes_a_storage_table_and_no_secrets(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART_CONFIG, ['run.output_dir="s3://bucket/runs/"', 'storage.endpoint_url="http://127.0.0.1:9000"'])
    assert cfg.run_uri == "s3://bucket/runs/quickstart"
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    with pytest.raises(ConfigError, match="storage.aws_secret_access_key: unknown key"):
        load_config(QUICKSTART_CONFIG, ['storage.aws_secret_access_key="x"'])
    with pytest.raises(ConfigError, match="remine.every_epochs with run.output_dir on S3"):
        load_config(QUICKSTART_CONFIG, ['run.output_dir="s3://bucket/runs"', 'data.batches="packed"',
                                        'data.train="s3://bucket/plan"', "data.eval=[]", "remine.every_epochs=1"])


def test_unusable_run_dir_fails_before_ray(s3_corpus: str, storage_cfg: StorageConfig, s3_endpoint: str) -> None:
    import ray

    from clray.jobs.run import run_training

    was_running = ray.is_initialized()
    cfg = load_config(QUICKSTART_CONFIG, [
        f'data.train="{s3_corpus}/train"', f'data.eval="{s3_corpus}/eval"',
        'run.output_dir="s3://no-such-bucket-x/runs"', f'storage.endpoint_url="{s3_endpoint}"',
    ])
    with pytest.raises(DataError) as err:
        run_training(cfg)
    assert "run.output_dir" in str(err.value) and "s3://no-such-bucket-x/runs/quickstart" in str(err.value)
    assert "no such bucket" in str(err.value)
    assert ray.is_initialized() == was_running  # failed before Ray was started


def test_run_lock_and_commit_markers_on_s3(storage_cfg: StorageConfig, s3_endpoint: str, tmp_path: Path) -> None:
    """One start per run and the newest complete checkpoint, with the run directory on S3:
    the lock is a conditional PUT, the scan reads markers and sizes through the store."""
    import os

    from clray.jobs.run.commit import Commit, complete_checkpoints, write_commit
    from clray.jobs.run.errors import RunLockedError
    from clray.jobs.run.lock import RunLock

    run_uri = f"s3://{BUCKET}/locked/run"
    first = RunLock(run_uri, storage_cfg).acquire()
    with pytest.raises(RunLockedError, match=f"is in use by pid {os.getpid()}"):
        RunLock(run_uri, storage_cfg).acquire()
    first.release()
    RunLock(run_uri, storage_cfg).acquire().release()
    assert "locked/run/run.lock" not in _keys(s3_endpoint, "locked/")

    client = _client(s3_endpoint)
    for step in (2, 4):
        client.put_object(Bucket=BUCKET, Key=f"locked/run/checkpoint_{step:08d}/state/model.pt", Body=b"x" * 100)
        if step == 2:
            write_commit(f"{run_uri}/checkpoint_{step:08d}", Commit(
                step=step, epoch=0, step_in_epoch=step, samples_seen=0, world_size=2, zero_stage=2,
                global_batch_size=128, steps_per_epoch=11), storage_cfg)
    complete, skipped = complete_checkpoints(run_uri, storage_cfg)
    assert [c.step for c in complete] == [2] and [c.step for c in skipped] == [4]
    assert complete[0].commit.files == {"state/model.pt": 100}


def test_packed_plan_missing_on_s3_is_named(storage_cfg: StorageConfig) -> None:
    from clray.pipelines.packed import load_plan

    data = load_config(QUICKSTART_CONFIG, ['data.batches="packed"', f'data.train="s3://{BUCKET}/no-plan"',
                                           "data.eval=[]"]).data
    with pytest.raises(DataError, match=f"s3://{BUCKET}/no-plan: no such directory"):
        load_plan(data, global_batch_size=64, num_workers=2, storage=storage_cfg)


# ----------------------------------------------------------------------------- end to end


def _assert_no_secrets(s3_endpoint: str, prefix: str) -> None:
    client = _client(s3_endpoint)
    for key in _keys(s3_endpoint, prefix):
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        for secret in (FAKE_AWS_ACCESS_KEY_ID, FAKE_AWS_SECRET_ACCESS_KEY):
            assert secret.encode() not in body, key


@pytest.mark.slow
def test_train_from_s3_into_s3_run_dir_and_resume(ray_session, s3_corpus: str, s3_endpoint: str,
                                                 monkeypatch, tmp_path: Path) -> None:
    """Corpus, quarantine, checkpoints, export, metrics and summary all on S3; a second
    start with the same name resumes from the S3 checkpoint (nothing of the run is local)."""
    from safetensors.torch import load

    from clray.jobs.run import run_training

    monkeypatch.chdir(tmp_path)
    # No eval split here (the packed test below reads one from S3): each pass costs time.
    common = [f'data.train="{s3_corpus}/train"', "data.eval=[]", 'run.name="digits"',
              f'run.output_dir="s3://{BUCKET}/runs"', f'storage.endpoint_url="{s3_endpoint}"',
              "train.log_every=1", "train.checkpoint_every=2", "optim.warmup_steps=0",
              # one worker: what is under test is where files go, not the gather
              "scaling.num_workers=1", "train.global_batch_size=64"]
    first = run_training(load_config(QUICKSTART_CONFIG, [*common, "train.max_steps=2"]))
    run_uri = f"s3://{BUCKET}/runs/digits"
    assert first.run_dir == run_uri and first.steps == 2 and first.resumed_from_step is None
    assert first.checkpoints == [f"{run_uri}/checkpoint_00000002"]
    assert first.export_dir == f"{run_uri}/export"
    assert first.quarantined_rows == 4 and first.quarantine_path == f"{run_uri}/quarantine.parquet"
    keys = _keys(s3_endpoint, "runs/digits/")
    for name in ("config.toml", "metrics.jsonl", "summary.json", "quarantine.parquet", "export/model.safetensors"):
        assert f"runs/digits/{name}" in keys, name
    assert any(k.startswith("runs/digits/checkpoint_00000002/") for k in keys)
    quarantine = pq.read_table(pa.BufferReader(
        _client(s3_endpoint).get_object(Bucket=BUCKET, Key="runs/digits/quarantine.parquet")["Body"].read()))
    assert sorted(quarantine.column("id").to_pylist()) == [f"bad-{i:04d}" for i in range(4)]
    assert all(f.startswith(f"{s3_corpus}/train/part-") for f in quarantine.column("file").to_pylist())
    exported = load(_client(s3_endpoint).get_object(Bucket=BUCKET, Key="runs/digits/export/model.safetensors")["Body"].read())

    second = run_training(load_config(QUICKSTART_CONFIG, [*common, "train.max_steps=4"]))
    assert second.resumed_from_step == 2 and second.steps == 4
    assert second.checkpoints == [f"{run_uri}/checkpoint_00000002", f"{run_uri}/checkpoint_00000004"]
    events = [json.loads(line) for line in
              _client(s3_endpoint).get_object(Bucket=BUCKET, Key="runs/digits/metrics.jsonl")["Body"].read().splitlines()]
    steps = [e["step"] for e in events if e.get("event") == "train"]
    assert steps == [1, 2, 3, 4]  # both starts, appended in one file on S3
    summary = json.loads(_client(s3_endpoint).get_object(Bucket=BUCKET, Key="runs/digits/summary.json")["Body"].read())
    assert summary["steps"] == 4 and summary["resumed_from_step"] == 2
    again = load(_client(s3_endpoint).get_object(Bucket=BUCKET, Key="runs/digits/export/model.safetensors")["Body"].read())
    assert any(not (again[k] == exported[k]).all() for k in exported)  # the export was replaced
    assert not (tmp_path / "runs").exists() and not (tmp_path / "digits").exists()
    _assert_no_secrets(s3_endpoint, "runs/")


@pytest.mark.slow
def test_mine_s3_to_s3_then_train_packed_from_the_s3_plan(ray_session, s3_corpus: str, s3_endpoint: str,
                                                          tmp_path: Path) -> None:
    import torch

    from clray.jobs.mine import run_mining, validate_mine_config
    from clray.jobs.run import run_training
    from clray.models.dual_encoder import DualEncoder
    from clray.models.export import export_model
    from clray.pipelines.mining.job import staging_dir

    model_cfg = load_config(QUICKSTART_CONFIG)
    torch.manual_seed(0)
    teacher = export_model(DualEncoder(model_cfg.model).eval(), model_cfg.model, tmp_path / "teacher")
    plan_uri = f"s3://{BUCKET}/plans/digits"
    raw = {
        "data": {"train": f"{s3_corpus}/train", "id_column": "id", "label_column": "label",
                 "anchor": {"column": "image", "kind": "image"}, "positive": {"column": "caption", "kind": "text"}},
        "teacher": {"path": str(teacher), "batch_size": 512},
        "mining": {"batch_size": 32, "epochs": 1, "num_negatives": 2, "rank_min": 2, "rank_max": 16},
        "output": {"dir": plan_uri},
        "storage": {"endpoint_url": s3_endpoint},
    }
    mined = run_mining(validate_mine_config(raw))
    assert mined.out_dir == plan_uri and mined.manifest == f"{plan_uri}/manifest.json"
    assert mined.quarantined_rows == 4 and mined.quarantine_path == f"{plan_uri}/quarantine.parquet"
    keys = _keys(s3_endpoint, "plans/digits/")
    assert "plans/digits/manifest.json" in keys and any(k.startswith("plans/digits/plans/epoch-00000/") for k in keys)
    assert not any("/work/" in k for k in keys)  # the work files stay in local staging
    assert not staging_dir(plan_uri).exists()  # removed once the plan is uploaded
    quarantine = pq.read_table(pa.BufferReader(
        _client(s3_endpoint).get_object(Bucket=BUCKET, Key="plans/digits/quarantine.parquet")["Body"].read()))
    assert all(f.startswith(f"{s3_corpus}/train/part-") for f in quarantine.column("file").to_pylist())
    # The same command again is a no-op that reads the manifest from S3.
    assert run_mining(validate_mine_config(raw)).already_complete

    cfg = load_config(QUICKSTART_CONFIG, [
        'data.batches="packed"', f'data.train="{plan_uri}"', f'data.eval="{s3_corpus}/eval"',
        f'storage.endpoint_url="{s3_endpoint}"',
        f'run.output_dir="{tmp_path / "runs"}"', 'run.name="packed"', "scaling.num_workers=1",
        "train.global_batch_size=32",
        "train.max_steps=3", "train.log_every=1",
    ])
    summary = run_training(cfg)
    assert summary.batches == "packed" and summary.plan_dir == plan_uri and summary.steps == 3
    assert summary.quarantine_path == f"{plan_uri}/quarantine.parquet"
    assert "eval/zero_shot_accuracy" in summary.eval  # the eval split was read from S3 too
    assert Path(summary.export_dir, "model.safetensors").is_file()
    _assert_no_secrets(s3_endpoint, "plans/")


@pytest.mark.slow
def test_tune_search_lives_on_s3(ray_session, s3_corpus: str, s3_endpoint: str, monkeypatch, tmp_path: Path) -> None:
    """`clray tune` with run.output_dir on S3: Tune's state, every trial's run and the
    search's results land there, and a second start is refused unless --resume."""
    from clray.jobs.cli import main

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "search.toml"
    config.write_text(f"""
[search]
base = "{QUICKSTART_CONFIG}"
metric = "loss"
mode = "min"
algorithm = "grid"
scheduler = "none"
max_concurrent = 2
[search.space]
"model.logit_scale.init_temperature" = {{ grid = [0.05, 0.5] }}
[search.resources]
num_workers = 1
[run]
name = "search"
output_dir = "s3://{BUCKET}/searches"
[storage]
endpoint_url = "{s3_endpoint}"
[data]
train = "{s3_corpus}/train"
eval = []
[train]
global_batch_size = 64
max_steps = 4
log_every = 2
""")
    assert main(["tune", str(config)]) == 0
    keys = _keys(s3_endpoint, "searches/search/")
    for name in ("tune/tuner.pkl", "results.parquet", "results.csv", "best.toml", "summary.json",
                 "trial_starts.jsonl", "search.json", "plots/curves.png"):
        assert f"searches/search/{name}" in keys, name
    rows = pq.read_table(pa.BufferReader(
        _client(s3_endpoint).get_object(Bucket=BUCKET, Key="searches/search/results.parquet")["Body"].read())).to_pylist()
    assert len(rows) == 2 and all(r["status"] == "COMPLETE" and r["steps"] == 4 for r in rows)
    for row in rows:
        assert f"searches/search/trials/{row['run_name']}/summary.json" in keys
        assert any(k.startswith(f"searches/search/trials/{row['run_name']}/checkpoint_00000004/") for k in keys)
    assert not (tmp_path / "runs").exists()
    assert main(["tune", str(config)]) == 2  # a second search into the same place needs --resume
    _assert_no_secrets(s3_endpoint, "searches/")
