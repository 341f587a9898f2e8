"""``clray cluster check FILE...``: cluster files checked before anything is launched.

Two kinds of file, told apart by their keys:

* a Ray cluster launcher config (``provider``, ``available_node_types``/``head_node_type``):
  validated against the JSON schema shipped in the installed Ray
  (``ray/autoscaler/ray-schema.json``, what ``ray up`` validates against), then against
  what clray relies on: an autoscaling GPU worker group starting at 0, a CPU worker
  group, clray installed on every node, Ray images of the installed Ray version; last,
  Ray's own launcher checks (``prepare_config`` + ``validate_config``, no cloud calls);
* KubeRay manifests (``apiVersion: ray.io/v1``, ``RayCluster`` or ``RayJob``; a file may
  hold several YAML documents): the fields clray relies on (KubeRay's CRD schema is not
  installed with Ray, so only these are checked).

Every problem names the file, the YAML key path and the fix; all are reported at once.
The launcher checks live in ``launcher``, the KubeRay ones in ``kuberay``, what both use
(the installed Ray's version, key paths, lenient values) in ``common``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from clray.jobs.clustercheck.common import ray_version, yaml_error
from clray.jobs.clustercheck.kuberay import KUBERAY_API, is_kuberay, kuberay_problems
from clray.jobs.clustercheck.launcher import is_launcher, launcher_problems

__all__ = ["check_file", "main_check", "ray_version"]


def check_file(path: str | Path) -> list[str]:
    """Every problem in one cluster file, each as "FILE: KEY PATH: what is wrong: the fix";
    [] when the file is fine."""
    import yaml

    label = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return [f"{label}: no such file"]
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{label}: cannot be read: {exc}"]
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [f"{label}: not valid YAML: {yaml_error(exc)}"]
    if not docs:
        return [f"{label}: empty: expected a Ray cluster launcher config or KubeRay manifests"]

    problems: list[str] = []
    for i, doc in enumerate(docs, start=1):
        where = label if len(docs) == 1 else f"{label} (document {i})"
        if not isinstance(doc, dict):
            problems.append(f"{where}: a {type(doc).__name__}, not a mapping: expected a cluster launcher "
                            "config or a KubeRay manifest")
            continue
        if is_kuberay(doc):
            found = kuberay_problems(doc)
        elif is_launcher(doc):
            if len(docs) > 1:
                problems.append(f"{where}: a cluster launcher config must be the only document in its file: "
                                "move it to a file of its own")
                continue
            found = launcher_problems(doc)
        else:
            found = [
                "(top level): neither a Ray cluster launcher config (provider, available_node_types, "
                f"head_node_type) nor a KubeRay manifest (apiVersion: {KUBERAY_API}, kind: RayCluster "
                "or RayJob): fix the file or keep it out of cluster/"
            ]
        problems.extend(f"{where}: {p}" for p in found)
    return problems


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a directory stands for every *.yaml/*.yml under it."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()))
        else:
            out.append(path)
    return out


def main_check(paths: Sequence[str | Path]) -> int:
    """``clray cluster check FILE...``: prints "ok: FILE" per clean file and every problem
    of the others (on stderr); 0 when all are clean, 2 otherwise."""
    files = _expand(paths)
    if not files:
        print("error: no cluster files to check: give launcher YAMLs, KubeRay manifests or a "
              "directory holding them", file=sys.stderr)
        return 2
    failed = False
    for path in files:
        problems = check_file(path)
        if problems:
            failed = True
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
        else:
            print(f"ok: {path}")
    return 2 if failed else 0
