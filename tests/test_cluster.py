"""`clray cluster check`: every shipped cluster file checks clean; broken copies fail
naming the file and the key. No Ray cluster is started."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from clray.jobs.clustercheck import check_file, main_check, ray_version

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster"
CLUSTER_FILES = sorted(CLUSTER_DIR.rglob("*.yaml"))
AWS = CLUSTER_DIR / "aws.yaml"
RAYCLUSTER = CLUSTER_DIR / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER_DIR / "kuberay" / "rayjob.yaml"


def test_the_cluster_files_are_there() -> None:
    assert {AWS, RAYCLUSTER, RAYJOB} <= set(CLUSTER_FILES)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[str(p.relative_to(CLUSTER_DIR)) for p in CLUSTER_FILES])
def test_every_shipped_cluster_file_checks_clean(path: Path) -> None:
    assert check_file(path) == []


def test_main_check_on_the_directory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main_check([CLUSTER_DIR]) == 0
    out = capsys.readouterr().out
    for path in CLUSTER_FILES:
        assert f"ok: {path}" in out


def mutated(tmp_path: Path, source: Path, change: Callable[[Any], None]) -> Path:
    doc = yaml.safe_load(source.read_text())
    change(doc)
    out = tmp_path / source.name
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def assert_names(problems: list[str], path: Path, *needles: str) -> None:
    assert problems, "expected problems"
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}: {problems}"
    assert all(p.startswith(str(path)) for p in problems), problems


def gpu_group(doc: dict) -> dict:
    return doc["available_node_types"]["gpu_workers"]


LAUNCHER_CASES = {
    # Ray's own schema: a field of the wrong type, an unknown key, a missing required field.
    "schema_type": (lambda d: gpu_group(d).update(min_workers="one"),
                    ["available_node_types.gpu_workers.min_workers", "integer", "schema"]),
    "schema_unknown_key": (lambda d: d.update(idle_timeout="10"), ["idle_timeout", "was unexpected", "schema"]),
    "schema_required": (lambda d: gpu_group(d).pop("resources"), ["available_node_types.gpu_workers", "'resources'"]),
    "head_missing": (lambda d: d.update(head_node_type="ray.head.default"), ["head_node_type", "ray.head.default"]),
    "gpu_min_workers": (lambda d: gpu_group(d).update(min_workers=1),
                        ["available_node_types.gpu_workers.min_workers = 1", "min_workers: 0"]),
    "min_over_max": (lambda d: d["available_node_types"]["cpu_workers"].update(min_workers=0, max_workers=-1),
                     ["available_node_types.cpu_workers.min_workers", "max_workers"]),
    "no_gpu_group": (lambda d: gpu_group(d).update(resources={"CPU": 4}), ["available_node_types", "GPU"]),
    "no_cpu_group": (lambda d: d["available_node_types"].pop("cpu_workers"), ["available_node_types", "CPU group"]),
    "no_install": (lambda d: d.update(setup_commands=["pip install -c ~/clray/.ci/constraints.txt torch"]),
                   ["setup_commands", "installs clray"]),
    "old_ray_image": (lambda d: gpu_group(d)["docker"].update(worker_image="rayproject/ray:2.9.0-py311-gpu"),
                      ["available_node_types.gpu_workers.docker.worker_image", "2.9"]),
    # Passes the schema and clray's checks; Ray's own launcher code rejects it.
    "ray_rejects": (lambda d: d["provider"].update(type="no-such-cloud"), ["rejects", "no-such-cloud"]),
}


@pytest.mark.parametrize("case", LAUNCHER_CASES)
def test_broken_launcher_config_names_the_key(tmp_path: Path, case: str) -> None:
    change, needles = LAUNCHER_CASES[case]
    path = mutated(tmp_path, AWS, change)
    assert_names(check_file(path), path, *needles)


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def gpu_workers(doc: dict) -> dict:
    return next(g for g in cluster_spec(doc)["workerGroupSpecs"] if g["groupName"] == "gpu-workers")


KUBERAY_CASES = {
    "cluster_no_autoscaling": (RAYCLUSTER, lambda d: d["spec"].pop("enableInTreeAutoscaling"),
                               ["spec.enableInTreeAutoscaling", "true"]),
    "job_no_shutdown": (RAYJOB, lambda d: d["spec"].pop("shutdownAfterJobFinishes"),
                        ["spec.shutdownAfterJobFinishes", "true"]),
    "job_entrypoint": (RAYJOB, lambda d: d["spec"].update(entrypoint="python train.py"), ["spec.entrypoint"]),
    "job_wrong_ray_version": (RAYJOB, lambda d: cluster_spec(d).update(rayVersion="2.59.0"),
                              ["spec.rayClusterSpec.rayVersion", "2.59", ray_version()]),
    "cluster_unquoted_version": (RAYCLUSTER, lambda d: d["spec"].update(rayVersion=2.6),
                                 ["spec.rayVersion", "quote it"]),
    "gpu_min_replicas": (RAYCLUSTER, lambda d: gpu_workers(d).update(minReplicas=1, replicas=1),
                         ["spec.workerGroupSpecs[0].minReplicas = 1", "minReplicas: 0"]),
    "min_over_max": (RAYJOB, lambda d: gpu_workers(d).update(minReplicas=0, maxReplicas=-1),
                     ["spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas"]),
    "no_gpu_group": (RAYCLUSTER, lambda d: gpu_workers(d)["template"]["spec"]["containers"][0].pop("resources"),
                     ["spec.workerGroupSpecs", "no group has a GPU"]),
    "start_param_not_string": (RAYCLUSTER, lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
                               ["spec.headGroupSpec.rayStartParams.num-cpus", "strings"]),
    "no_image": (RAYCLUSTER, lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
                 ["spec.headGroupSpec.template.spec.containers[0].image"]),
    "job_no_cluster_spec": (RAYJOB, lambda d: d["spec"].pop("rayClusterSpec"), ["spec.rayClusterSpec", "missing"]),
    "old_api": (RAYCLUSTER, lambda d: d.update(apiVersion="ray.io/v1alpha1"), ["apiVersion", "ray.io/v1"]),
    "unknown_kind": (RAYCLUSTER, lambda d: d.update(kind="RayService"), ["kind", "RayService"]),
}


@pytest.mark.parametrize("case", KUBERAY_CASES)
def test_broken_kuberay_manifest_names_the_key(tmp_path: Path, case: str) -> None:
    source, change, needles = KUBERAY_CASES[case]
    path = mutated(tmp_path, source, change)
    assert_names(check_file(path), path, *needles)


def test_several_documents_in_one_file(tmp_path: Path) -> None:
    cluster, job = yaml.safe_load(RAYCLUSTER.read_text()), yaml.safe_load(RAYJOB.read_text())
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump_all([cluster, job]))
    assert check_file(path) == []

    broken = copy.deepcopy(job)
    broken["spec"]["shutdownAfterJobFinishes"] = False
    path.write_text(yaml.safe_dump_all([cluster, broken, {"apiVersion": "v1", "kind": "ConfigMap"}]))
    problems = check_file(path)
    assert_names(problems, path, "(document 2)", "spec.shutdownAfterJobFinishes = false")
    assert_names(problems, path, "(document 3)", "kind = 'ConfigMap'")
    assert not any("(document 1)" in p for p in problems)


def test_not_yaml_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    assert_names(check_file(bad), bad, "not valid YAML", "line")
    other = tmp_path / "other.yaml"
    other.write_text("name: something else\n")
    assert_names(check_file(other), other, "neither a Ray cluster launcher config")

    assert main_check([AWS, bad, tmp_path / "missing.yaml"]) == 2
    captured = capsys.readouterr()
    assert f"ok: {AWS}" in captured.out
    assert "not valid YAML" in captured.err and "missing.yaml: no such file" in captured.err


def test_rayjob_cluster_has_the_raycluster_groups() -> None:
    """The ephemeral cluster of the RayJob is the long-lived RayCluster's, group for group."""
    cluster, job = yaml.safe_load(RAYCLUSTER.read_text()), yaml.safe_load(RAYJOB.read_text())
    want = cluster["spec"]["workerGroupSpecs"]
    got = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in got] == [g["groupName"] for g in want] == ["gpu-workers", "cpu-workers"]
    for a, b in zip(got, want, strict=True):
        assert (a["minReplicas"], a["maxReplicas"], a["rayStartParams"]) == (b["minReplicas"], b["maxReplicas"], b["rayStartParams"])
        assert a["template"]["spec"]["containers"][0]["resources"] == b["template"]["spec"]["containers"][0]["resources"]


def test_cli_checks_the_shipped_cluster_directory(capsys) -> None:
    """`clray cluster check cluster/`, as CI runs it, passes on every shipped file."""
    from clray.jobs.cli import main

    root = Path(__file__).resolve().parent.parent / "cluster"
    assert main(["cluster", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: ") == len(list(root.rglob("*.yaml")))
