"""Kill anything, lose nothing: the quickstart, interrupted every way a cluster
interrupts it, against the same run left alone.

Fits are shared (each costs worker start-up): one uninterrupted reference run; one run
whose worker is SIGKILLed mid-epoch and that Ray Train restarts by itself; that run's
directory then damaged (Ray's registry cut short, the newest checkpoint deleted, a shard
of the next one truncated, a stale error.log) and started again; one ``clray train``
process stopped with SIGTERM mid-epoch and resumed with another worker count. Each
test below checks one claim on them. Rows are compared by the ids each rank recorded
per step (``CLRAY_RECORD_BATCHES``), losses by metrics.jsonl, weights by the export.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from clray.jobs.cli import QUICKSTART_CONFIG
from clray.jobs.config import load_config
from clray.jobs.run import TrainSummary, run_training
from clray.jobs.run.errors import ResumeError, RunLockedError
from clray.jobs.run.location import checkpoint_name
from clray.jobs.run.worker import RECORD_BATCHES_ENV
from clray.pipelines.dataset import id_keys

pytestmark = pytest.mark.integration

STEPS = 16  # an epoch is 11 steps: every interrupted run resumes inside epoch 0 and crosses into epoch 1
COMMON = ["data.deterministic=true", f"train.max_steps={STEPS}", "train.checkpoint_every=4", "train.log_every=1",
          "train.keep_checkpoints=3", "train.zero_stage=2"]
"""ZeRO-2 (not the CPU default, 0): its partitioned checkpoints are what the restarts, the
elastic resume (through DeepSpeed's universal form) and the integrity checks must handle."""


@dataclass
class Run:
    """What one run left: its summary, events, the ids each rank trained per step (the
    last attempt's, when steps were trained twice) and its exported weights."""

    summary: TrainSummary | None
    run_dir: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    ids: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def losses(self) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in read_events(self.run_dir) if e["event"] == "train"}

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in read_events(self.run_dir) if e["event"] == kind]


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_batches(record: Path) -> dict[tuple[int, int], list[int]]:
    """(step, rank) -> id keys, the last time that step was trained."""
    out: dict[tuple[int, int], list[int]] = {}
    for line in record.read_text().splitlines():
        row = json.loads(line)
        out[(row["step"], row["rank"])] = row["id_keys"]
    return out


def weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clray.pipelines.quickstart import write_quickstart_corpus

    out = tmp_path_factory.mktemp("chaos-corpus")
    write_quickstart_corpus(out, bad_rows=4)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos-runs")


def overrides(corpus: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [f'data.train="{corpus / "train"}"', f'data.eval="{corpus / "eval"}"', f'run.output_dir="{runs}"',
            f'run.name="{name}"', *COMMON, *extra]


def train(corpus: Path, runs: Path, name: str, *extra: str, kill: tuple[int, int] | None = None) -> Run:
    """``run_training`` in this process, recording batches; ``kill=(rank, step)``: SIGKILL
    that rank's worker process once it starts that step (found in the batch record)."""
    record = runs / f"{name}.batches.jsonl"
    seen: list[dict[str, Any]] = []
    done = threading.Event()
    killed: list[dict[str, Any]] = []

    def killer() -> None:
        assert kill is not None
        while not done.is_set():
            if record.exists():
                for line in record.read_text().splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # the last line, still being written
                        break
                    if row["rank"] == kill[0] and row["step"] >= kill[1]:
                        os.kill(row["pid"], signal.SIGKILL)
                        killed.append(row)
                        return
            time.sleep(0.02)

    os.environ[RECORD_BATCHES_ENV] = str(record)
    try:
        if kill:
            threading.Thread(target=killer, daemon=True).start()
        summary = run_training(load_config(QUICKSTART_CONFIG, overrides(corpus, runs, name, *extra)),
                               on_event=seen.append)
    finally:
        done.set()
        del os.environ[RECORD_BATCHES_ENV]
    # A kill that never happened would make the checks on the restart meaningless.
    assert not kill or killed, f"the killer never found rank {kill[0]} at step {kill[1]} in {record}"
    return Run(summary, runs / name, seen, read_batches(record))


@pytest.fixture(scope="module")
def reference(ray_session: None, corpus: Path, runs: Path) -> Run:
    return train(corpus, runs, "left-alone")


@pytest.fixture(scope="module")
def worker_killed(ray_session: None, corpus: Path, runs: Path) -> Run:
    return train(corpus, runs, "worker-killed", "train.max_failures=1", kill=(1, 6))


def test_a_killed_worker_is_restarted_and_the_run_matches_one_left_alone(reference: Run, worker_killed: Run) -> None:
    failures = [e for e in worker_killed.events if e["event"] == "failure"]
    resumed = [e for e in worker_killed.events if e["event"] == "resumed"]
    assert len(failures) == 1 and failures[0]["retrying"] and failures[0]["rank"] == 1, \
        (failures, [e["event"] for e in worker_killed.events])
    assert len(resumed) == 1 and resumed[0]["step"] in (4, 8) and resumed[0]["step_in_epoch"] == resumed[0]["step"]
    assert resumed[0]["checkpoint"] == checkpoint_name(resumed[0]["step"])
    # The same rows per step and rank, the same loss every step, the same end.
    assert worker_killed.ids == reference.ids and len(reference.ids) == 2 * STEPS
    assert worker_killed.losses() == reference.losses() and len(reference.losses()) == STEPS
    assert worker_killed.summary.final_train["loss"] == reference.summary.final_train["loss"]
    assert worker_killed.summary.eval == reference.summary.eval
    got, want = weights(worker_killed.run_dir), weights(reference.run_dir)
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)


def test_clray_eval_consolidates_a_zero2_checkpoint_into_the_weights_the_run_exported(reference: Run,
                                                                                        tmp_path: Path) -> None:
    """`clray eval RUN` merges a ZeRO-2 checkpoint's shards into fp32 weights (the CPU
    default, ZeRO-0, has no shards and takes the other path: tests/test_train.py)."""
    import torch
    from safetensors.torch import load_file

    from clray.jobs.eval import checkpoint_export

    out, name = checkpoint_export(reference.run_dir, None, tmp_path / "export")
    assert name == f"checkpoint_{STEPS:08d}"  # the last step's, so the state the run exported
    got, want = load_file(str(out / "model.safetensors")), weights(reference.run_dir)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[key], want[key]) for key in want)


@pytest.fixture(scope="module")
def damaged(worker_killed: Run, corpus: Path, runs: Path) -> Run:
    run_dir = worker_killed.run_dir
    registry = run_dir / "checkpoint_manager_snapshot.json"
    registry.write_text(registry.read_text()[:50])
    import shutil

    shutil.rmtree(run_dir / checkpoint_name(16))
    shard = sorted((run_dir / checkpoint_name(12) / "state").glob("zero_pp_rank_1_*"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    (run_dir / "error.log").write_text("a failure of an earlier start\n")
    (runs / "worker-killed.batches.jsonl").unlink()
    return train(corpus, runs, "worker-killed", "train.max_failures=1")


def test_damaged_run_state_falls_back_to_the_newest_intact_checkpoint(reference: Run, damaged: Run) -> None:
    warnings = [e["message"] for e in damaged.events if e["event"] == "warning"]
    assert any("checkpoint registry" in w and "moved aside" in w for w in warnings), warnings
    assert any(w.startswith(f"{checkpoint_name(12)} is not used: state/zero_pp_rank_1_") and "1000 bytes" in w
               and w.endswith(f"resuming from {checkpoint_name(8)} instead") for w in warnings), warnings
    resumed = [e for e in damaged.events if e["event"] == "resumed"]
    assert [e["step"] for e in resumed] == [8]
    # Steps 9-16 trained again: the same rows and losses as the run left alone.
    assert damaged.ids == {k: v for k, v in reference.ids.items() if k[0] > 8}
    assert {s: v for s, v in damaged.losses().items() if s > 8} == {s: v for s, v in reference.losses().items()
                                                                      if s > 8}
    assert damaged.summary.final_train["loss"] == reference.summary.final_train["loss"]
    assert not (damaged.run_dir / "error.log").exists()
    # Retention: the damaged checkpoint and the unregistered leftovers are gone.
    assert [Path(p).name for p in damaged.summary.checkpoints] == [checkpoint_name(s) for s in (8, 12, 16)]


@dataclass
class Stopped:
    code: int
    stderr: str
    ids: dict[tuple[int, int], list[int]]
    run_dir: Path
    locked: str


@pytest.fixture(scope="module")
def sigterm(ray_session: None, corpus: Path, runs: Path) -> Stopped:
    """``clray train`` (its own driver and Ray, no data.deterministic) sent SIGTERM once
    it trains step 5; meanwhile a second start of the same run is refused."""
    name, record = "preempted", runs / "preempted.batches.jsonl"
    args = [a for o in overrides(corpus, runs, name, "data.deterministic=false", "train.max_steps=22")
            for a in ("--set", o)]
    env = {**os.environ, RECORD_BATCHES_ENV: str(record)}
    proc = subprocess.Popen([sys.executable, "-m", "clray.jobs.cli", "train", str(QUICKSTART_CONFIG), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    def wait_for_step(step: int) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if record.exists() and any(json.loads(line)["step"] >= step for line in record.read_text().splitlines()):
                return
            time.sleep(0.05)

    # The second start as soon as the first trains (its refusal takes a second or two, in
    # which the first trains on), then SIGTERM from step 5: mid-epoch whatever the load.
    wait_for_step(1)
    locked = ""
    try:
        run_training(load_config(QUICKSTART_CONFIG, overrides(corpus, runs, name)))
    except RunLockedError as exc:
        locked = str(exc)
    wait_for_step(5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    return Stopped(proc.returncode, stderr, read_batches(record), runs / name, locked)


def test_sigterm_checkpoints_where_it_stops_and_exits_143(sigterm: Stopped) -> None:
    assert "is in use by pid" in sigterm.locked and "another run.name" in sigterm.locked
    assert sigterm.code == 143, sigterm.stderr[-2000:]
    stopped = [e for e in read_events(sigterm.run_dir) if e["event"] == "end"][-1]
    assert stopped["stopped"] and not stopped["complete"] and 5 <= stopped["step"] < 11
    assert f"stopped (SIGTERM) at step {stopped['step']}" in sigterm.stderr
    assert checkpoint_name(stopped["step"]) in sigterm.stderr and "Traceback" not in sigterm.stderr
    assert (sigterm.run_dir / checkpoint_name(stopped["step"]) / "clray-commit.json").is_file()
    assert not (sigterm.run_dir / "run.lock").exists()


def test_a_config_the_checkpoint_cannot_resume_is_refused_and_config_toml_kept(sigterm: Stopped, corpus: Path,
                                                                                 runs: Path) -> None:
    before = (sigterm.run_dir / "config.toml").read_text()
    with pytest.raises(ResumeError, match="train.zero_stage = 2, this config has 3"):
        run_training(load_config(QUICKSTART_CONFIG, overrides(corpus, runs, "preempted", "train.zero_stage=3",
                                                              "train.max_steps=22")))
    assert (sigterm.run_dir / "config.toml").read_text() == before


@pytest.fixture(scope="module")
def elastic(sigterm: Stopped, corpus: Path, runs: Path) -> Run:
    """The SIGTERMed run resumed on one worker instead of two (same global batch)."""
    (runs / "preempted.batches.jsonl").unlink()  # the stopped start's record is read already (sigterm.ids)
    return train(corpus, runs, "preempted", "data.deterministic=false", "train.max_steps=22",
                 "scaling.num_workers=1")


def test_resumed_with_one_worker_every_row_is_trained_once_per_epoch(sigterm: Stopped, elastic: Run,
                                                                      corpus: Path) -> None:
    warnings = [e["message"] for e in elastic.events if e["event"] == "warning"]
    assert any("written by 2 worker(s)) with 1" in w and "universal" in w for w in warnings), warnings
    resumed = [e for e in elastic.events if e["event"] == "resumed"][0]
    assert resumed["dataset"] == "train_resume" and resumed["step_in_epoch"] > 0
    restart = resumed["step"]
    # Per step: the first run's rows up to the checkpoint, the resumed run's after it.
    steps: dict[int, list[int]] = {}
    for (step, _), keys in sigterm.ids.items():
        if step <= restart:
            steps.setdefault(step, []).extend(keys)
    for (step, _), keys in elastic.ids.items():
        assert step > restart
        steps.setdefault(step, []).extend(keys)
    assert sorted(steps) == list(range(1, 23)) and all(len(v) == 128 for v in steps.values())
    valid = set(id_keys(_valid_ids(corpus)).tolist())
    for epoch in (0, 1):
        trained = [k for s in range(11 * epoch + 1, 11 * epoch + 12) for k in steps[s]]
        assert len(trained) == len(set(trained)) == 11 * 128, f"epoch {epoch}: a row trained twice"
        assert set(trained) <= valid and len(valid) - len(trained) == elastic.summary.remainder_rows_per_epoch
    assert elastic.summary.steps == 22 and elastic.summary.resumed_from_step == restart


def _valid_ids(corpus: Path) -> list[str]:
    ids = [r for f in sorted((corpus / "train").glob("*.parquet")) for r in pq.read_table(f, columns=["id"])
           .column("id").to_pylist()]
    return [i for i in ids if not str(i).startswith("bad-")]


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every process below ``root`` (from /proc)."""
    parents: dict[int, tuple[int, str]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(pid)] = (int(fields[1]), fields[19])
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, started) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def still_running(processes: dict[int, str]) -> list[int]:
    out = []
    for pid, started in processes.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == started and fields[0] != "Z":
            out.append(pid)
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the driver's processes")
def test_a_killed_driver_takes_its_ray_with_it() -> None:
    """A driver that started a local Ray is SIGKILLed: its GCS, raylet, agents and workers go too."""
    proc = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from clray.jobs.runtime import start_ray\n"
        "start_ray(1, {})\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        time.sleep(5)  # the raylet starts its agents after ray.init returns
        ray_processes = descendants(proc.pid)
        assert len(ray_processes) >= 3  # the watcher is in a session of its own, not below the driver
    finally:
        proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while still_running(ray_processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert still_running(ray_processes) == []


# --------------------------------------------------------------------------- a node lost


def _node_of(pid: int, nodes: list[Any]) -> Any:
    """The cluster node whose raylet is an ancestor of process ``pid`` (a worker)."""
    import psutil
    from ray._private import ray_constants

    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    for node in nodes:
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        if raylet in ancestors:
            return node
    raise AssertionError(f"worker {pid} runs under none of the cluster's raylets")


@pytest.fixture(scope="module")
def node_lost(reference: Run, corpus: Path, runs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``clray train`` (2 workers, ``train.max_failures = 3``) on a Ray cluster of a head and two worker nodes (``ray.cluster_utils.Cluster``,
    every node on this machine, so the run directory is storage every node reaches); each
    node has room for one worker (``slot = 1``). Once rank 1 trains step 6 its node is
    removed, killed without warning, and 3 s later a replacement node joins, as an
    autoscaler would add one."""
    from ray.cluster_utils import Cluster

    record = runs / "node-lost.batches.jsonl"
    # Ray declares a node dead once it misses its health checks (by default after about 15 s
    # and more): until then Ray Train may place the restarted workers on the lost node, and
    # each such try costs a failure. Here the head checks every second.
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "temp_dir": str(tmp_path_factory.mktemp("cluster")),
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                           "health_check_timeout_ms": 2000}})
    try:
        workers = [cluster.add_node(num_cpus=2, resources={"slot": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        cmd = [sys.executable, "-m", "clray.jobs.cli", "train", str(QUICKSTART_CONFIG)]
        for override in overrides(corpus, runs, "node-lost", "train.max_failures=3",
                                  "scaling.resources_per_worker={slot = 1}"):
            cmd += ["--set", override]
        env = {**os.environ, "RAY_ADDRESS": cluster.address, RECORD_BATCHES_ENV: str(record)}
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lost = None
        while lost is None and proc.poll() is None and time.monotonic() - started < 300:
            rows = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
            victim = next((r for r in rows if r["rank"] == 1 and r["step"] >= 6), None)
            if victim is None:
                time.sleep(0.05)
                continue
            node = _node_of(victim["pid"], workers)
            cluster.remove_node(node, allow_graceful=False)
            lost = {"step": victim["step"], "at": time.monotonic() - started}
            time.sleep(3)
            cluster.add_node(num_cpus=2, resources={"slot": 1})
        out, _ = proc.communicate(timeout=600)
        wall = time.monotonic() - started
    finally:
        try:
            cluster.shutdown()
        except AssertionError as exc:  # Ray's check that the killed node's processes are gone
            print(f"cluster shutdown: {exc}"[:500])
    return {"code": proc.returncode, "out": out, "lost": lost, "wall": wall,
            "run": Run(None, runs / "node-lost", [], read_batches(record))}


def test_a_run_survives_losing_a_node_and_matches_one_left_alone(reference: Run, node_lost: dict[str, Any]) -> None:
    assert node_lost["lost"] is not None, node_lost["out"][-3000:]
    assert node_lost["code"] == 0, node_lost["out"][-3000:]
    run: Run = node_lost["run"]
    failures, resumed = run.of("failure"), run.of("resumed")
    assert failures and all(f["retrying"] for f in failures), failures
    # back from a checkpoint (every 4 steps) written before the loss was noticed, on the
    # surviving and the replacement node
    assert resumed and all(r["step"] % 4 == 0 and node_lost["lost"]["step"] - 4 < r["step"] < STEPS
                           for r in resumed), (node_lost["lost"], resumed)
    print(f"\nnode lost at step {node_lost['lost']['step']} ({node_lost['lost']['at']:.0f} s in); resumed from "
          f"step {resumed[0]['step']}; finished {STEPS} steps after {node_lost['wall']:.0f} s")
    # the same rows per step and rank, the same loss every step, the same weights
    assert run.ids == reference.ids
    assert run.losses() == reference.losses()
    got, want = weights(run.run_dir), weights(reference.run_dir)
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
