"""The cluster, simulated: `clray jobs up --simulate cluster/aws.yaml` starts an autoscaling Ray
cluster on this machine shaped like the AWS launcher file (a head with CPU 0, GPU and CPU
worker groups scaling from 0; GPUs simulated as the `sim_gpu` resource), and a search
submitted to it with `clray submit tune` makes it grow, queues the trials it has no room
for, and leaves it back at the head alone once idle."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from clray.jobs.cli import main
from clray.jobs.submit import head as heads
from clray.jobs.submit.simulate import (
    alive_by_group,
    cluster_nodes,
    simulated_config,
    state_rows,
    watch_nodes,
)

REPO = Path(__file__).resolve().parent.parent
AWS = REPO / "cluster" / "aws.yaml"


def test_the_simulation_mirrors_the_launcher_file() -> None:
    config, head_cpus = simulated_config(AWS, node_cpus=2, max_nodes=2, idle_s=5)
    nodes = config["available_node_types"]
    assert head_cpus == 0 and nodes["ray.head.default"]["resources"] == {"CPU": 0}
    assert nodes["gpu_workers"] == {"resources": {"sim_gpu": 1.0, "CPU": 2.0, "group:gpu_workers": 1000},
                                    "node_config": {}, "min_workers": 0, "max_workers": 2}
    assert nodes["cpu_workers"]["resources"] == {"CPU": 2.0, "group:cpu_workers": 1000}
    assert config["idle_timeout_minutes"] == pytest.approx(5 / 60)
    assert config["provider"]["module"] == "clray.jobs.submit.simnodes.SimulatedNodes"


def test_a_kuberay_manifest_is_refused_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["jobs", "up", "--simulate", str(REPO / "cluster" / "kuberay" / "raycluster.yaml")]) == 2
    err = capsys.readouterr().err
    assert "available_node_types" in err and "KubeRay manifests are not simulated" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The simulated AWS cluster, recorded as the local head `clray submit` uses; stopped
    (head, nodes and temp dir: its own processes only) at the end."""
    state = tmp_path_factory.mktemp("state")
    saved = {k: os.environ.get(k) for k in (heads.STATE_DIR_ENV, "RAY_ADDRESS")}
    os.environ[heads.STATE_DIR_ENV] = str(state)
    os.environ.pop("RAY_ADDRESS", None)
    assert main(["jobs", "up", "--simulate", str(AWS), "--node-cpus", "2", "--max-nodes", "2", "--idle-s", "5"]) == 0
    head = heads.read_local_head()
    assert head is not None and head.simulated == str(AWS)
    deadline = time.monotonic() + 60  # the state API lists the head a moment after it answers
    while alive_by_group(head.address) != {"head": 1} and time.monotonic() < deadline:
        time.sleep(0.5)
    yield head
    assert main(["jobs", "down"]) == 0
    assert not heads.pid_runs(head.pid, head.temp_dir) and not Path(head.temp_dir).exists()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _search(tmp_path: Path, corpus: Path) -> Path:
    path = tmp_path / "search.toml"
    path.write_text(f"""
[search]
base = "{REPO / 'configs' / 'quickstart.toml'}"
metric = "loss"
mode = "min"
max_concurrent = 3
scheduler = "none"
algorithm = "grid"

[search.space]
"model.logit_scale.init_temperature" = {{ grid = [0.05, 0.1, 0.2] }}

[search.resources]
num_workers = 1
resources_per_worker = {{ sim_gpu = 1 }}   # use_gpu = true on the real cluster

[run]
name = "search"
output_dir = "{tmp_path / 'runs'}"

[data]
train = "{corpus / 'train'}"
eval = "{corpus / 'eval'}"

[model.logit_scale]
mode = "fixed"

[train]
global_batch_size = 64
max_steps = 4
epochs = 1
eval_every = 0
checkpoint_every = 4
log_every = 2
""")
    return path


def _holding(cluster: heads.LocalHead) -> list[Any]:
    """What is still alive on the cluster (actors, placement groups, tasks), for a failure message."""
    held = []
    for kind in ("actors", "placement_groups", "tasks"):
        held += [(kind, r.get("class_name") or r.get("name"), r.get("state"), (r.get("node_id") or "")[-5:])
                 for r in state_rows(cluster.address, kind) if r.get("state") not in ("DEAD", "REMOVED", "FINISHED", "FAILED")]
    return held


def _trial_times(search_dir: Path) -> dict[str, tuple[float, float]]:
    """Each trial's first and last training event (wall clock, from its metrics.jsonl)."""
    times = {}
    for trial in sorted((search_dir / "trials").iterdir()):
        stamps = [json.loads(line)["time"] for line in (trial / "metrics.jsonl").read_text().splitlines()]
        times[trial.name] = (min(stamps), max(stamps))
    return times


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the search and the mining test: the mining job's teacher is a trial's export."""
    return tmp_path_factory.mktemp("simulated")


@pytest.mark.integration
def test_a_search_grows_the_cluster_queues_what_does_not_fit_and_idle_nodes_go(
    cluster: heads.LocalHead, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = work
    from clray.pipelines.quickstart import write_quickstart_corpus

    corpus = tmp_path / "corpus"
    write_quickstart_corpus(corpus, num_shards=2, bad_rows=0)
    search = _search(tmp_path, corpus)
    assert alive_by_group(cluster.address) == {"head": 1}  # every group scales from 0

    done = threading.Event()
    timeline: list[Any] = []
    watcher = threading.Thread(target=lambda: timeline.extend(watch_nodes(cluster.address, done.is_set)))
    watcher.start()
    started = time.monotonic()
    try:
        # no --address: the recorded (simulated) head; 3 trials at once, room for 2
        code = main(["submit", "tune", str(search), "--follow"])
        searched = time.monotonic() - started
        out = capsys.readouterr().out
        assert code == 0, out[-3000:]
        deadline = time.monotonic() + 90
        while alive_by_group(cluster.address) != {"head": 1} and time.monotonic() < deadline:
            time.sleep(1)
        idle = time.monotonic() - started
    finally:
        done.set()
        watcher.join()
    if timeline[-1][1] != alive_by_group(cluster.address):  # the watcher's last poll may precede the last change
        timeline.append((round(idle, 1), alive_by_group(cluster.address)))
    gpu_nodes = [counts.get("gpu_workers", 0) for _, counts in timeline]
    with capsys.disabled():  # the figures in the README's cluster section
        print(f"\nnodes over time (s since submit: alive per group): {timeline}")
        print(f"search done after {searched:.0f} s; back to the head alone after {idle:.0f} s")

    # nodes were added while the trials ran: the GPU group grew to its cap of 2 ...
    assert max(gpu_nodes) == 2, timeline
    # ... and every idle node was removed after the search
    assert timeline[-1][1] == {"head": 1} and alive_by_group(cluster.address) == {"head": 1}, (timeline, _holding(cluster))

    search_dir = tmp_path / "runs" / "search"
    results = pq.read_table(search_dir / "results.parquet").to_pylist()
    assert sorted(r["status"] for r in results) == ["COMPLETE"] * 3, results  # none failed
    # the trial that found no GPU node free waited: with one sim_gpu a node and two nodes at
    # most, never were three trials training at once, and some trial trained only after
    # another had finished. (How far apart they start depends on how fast nodes come up:
    # on a fast machine the second node can come after the first trial has ended.)
    times = _trial_times(search_dir)
    edges = sorted([(start, 1) for start, _ in times.values()] + [(end, -1) for _, end in times.values()])
    assert max(itertools.accumulate(step for _, step in edges)) <= 2, times  # an end before a start at one time
    waited = [t for t, (start, _) in times.items() if any(end < start for u, (_, end) in times.items() if u != t)]
    assert waited, times
    with capsys.disabled():
        t0 = min(start for start, _ in times.values())
        print("trial training windows (s): " + ", ".join(
            f"{t} {s - t0:.1f}-{e - t0:.1f}" for t, (s, e) in sorted(times.items(), key=lambda kv: kv[1])))


def _placed(cluster: heads.LocalHead) -> dict[str, set[str]]:
    """The node groups each kind of actor ran on over the cluster's life (dead nodes and
    actors included), by class name."""
    groups = {n["node_id"]: n["group"] for n in cluster_nodes(cluster.address)}
    placed: dict[str, set[str]] = {}
    for row in state_rows(cluster.address, "actors", limit=10000):
        placed.setdefault(row["class_name"], set()).add(groups.get(row.get("node_id"), "?"))
    return placed


@pytest.mark.integration
def test_mining_runs_on_the_cpu_group_and_training_ran_on_the_gpu_group(
    cluster: heads.LocalHead, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomli_w
    import tomllib

    raw = tomllib.loads((REPO / "configs" / "mine_quickstart.toml").read_text())
    teacher = sorted((work / "runs" / "search" / "trials").glob("*/export"))[0]  # a trial's model
    raw["data"]["train"] = str(work / "corpus" / "train")
    raw["teacher"].update(path=str(teacher), resources={"group:cpu_workers": 1})
    raw["mining"].update(search_actors=1, search_resources={"group:cpu_workers": 1})
    raw["output"]["dir"] = str(work / "mined")
    config = work / "mine.toml"
    config.write_text(tomli_w.dumps(raw))
    assert main(["submit", "mine", str(config), "--follow"]) == 0, capsys.readouterr().out[-3000:]
    assert (work / "mined" / "manifest.json").is_file()

    placed = _placed(cluster)
    embedders = {k: v for k, v in placed.items() if "TeacherEmbedder" in k}
    with capsys.disabled():
        print(f"\nwhere each actor ran (node groups): {dict(sorted(placed.items()))}")
    assert embedders and all(v == {"cpu_workers"} for v in embedders.values()), placed
    searchers = {k: v for k, v in placed.items() if k.endswith("Searcher")}
    assert searchers and all(v == {"cpu_workers"} for v in searchers.values()), placed
    assert placed["RayTrainWorker"] == {"gpu_workers"}, placed  # the search's training workers
