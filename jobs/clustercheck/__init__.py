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
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

KUBERAY_API = "ray.io/v1"
KUBERAY_KINDS = ("RayCluster", "RayJob")
GPU_RESOURCE = "nvidia.com/gpu"
# Ray's own images carry the Ray version in their tag: rayproject/ray:2.60.0-py311-gpu.
_RAY_IMAGE = re.compile(r"^(?:docker\.io/)?rayproject/ray(?:-ml)?:(\d+)\.(\d+)")
_CONSTRAINT_FLAGS = ("-c", "--constraint", "--index-url", "--extra-index-url", "-i", "-f", "--find-links")


@lru_cache(maxsize=1)
def ray_version() -> str:
    """The installed Ray's version, read without importing Ray."""
    return importlib.metadata.version("ray")


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"^\s*(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


@lru_cache(maxsize=1)
def ray_launcher_schema() -> dict[str, Any]:
    """The cluster launcher JSON schema of the installed Ray (found without importing Ray)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ray is not installed: install clray's dependencies (bash .ci/bootstrap)")
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def _key(*parts: Any) -> str:
    """A YAML key path: available_node_types.gpu_workers.min_workers, spec.workerGroupSpecs[0]."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _show(value: Any) -> str:
    """A value as YAML writes it: false, null, 'text', 3."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def _int(value: Any) -> int | None:
    """An int that is not a bool, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    """An int/float or a numeric string (Kubernetes quantities like "1"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _image_version_problem(key: str, image: Any) -> str | None:
    """Ray's own images name their Ray version; it must be the installed Ray's."""
    if not isinstance(image, str):
        return None
    match = _RAY_IMAGE.match(image.strip())
    want = _major_minor(ray_version())
    if match is None or want is None:
        return None
    got = (int(match.group(1)), int(match.group(2)))
    if got == want:
        return None
    return (
        f"{key} = {image!r} runs Ray {got[0]}.{got[1]} but clray is tested with Ray "
        f"{want[0]}.{want[1]} (installed: {ray_version()}): use a rayproject/ray:{ray_version()} image"
    )


# --------------------------------------------------------------------------- launcher


_JSON_TYPES = {
    "integer": "a whole number", "number": "a number", "string": "a string", "boolean": "true or false",
    "object": "a mapping", "array": "a list", "null": "nothing (null)",
}


def _schema_problems(config: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = ray_launcher_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    problems = []
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    for error in errors:
        key = _key(*error.absolute_path)
        if error.validator == "type":
            wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
            fix = " or ".join(_JSON_TYPES.get(t, t) for t in wanted)
            message = f"{key} = {_show(error.instance)} is not of type {error.validator_value!r}: write {fix}"
        elif error.validator == "additionalProperties":
            message = f"{key}: {error.message}: remove the key or fix its spelling"
        elif error.validator == "required":
            message = f"{key}: {error.message}: add it"
        else:
            message = f"{key}: {error.message}"
        problems.append(f"{message} (Ray {ray_version()} cluster launcher schema)")
    return problems


def _installs_clray(command: str) -> bool:
    """A command that installs clray: runs .ci/bootstrap, or an install naming clray
    (``pip install -e ~/clray``, ``cd ~/clray && pip install .``, ``pip install clray==...``),
    clray in a constraints file or index option not counting."""
    if ".ci/bootstrap" in command:
        return True
    tokens = command.split()
    if "install" not in tokens:
        return False
    return any("clray" in tok and (i == 0 or tokens[i - 1] not in _CONSTRAINT_FLAGS) for i, tok in enumerate(tokens))


def _commands(value: Any) -> list[str]:
    return [c for c in value if isinstance(c, str)] if isinstance(value, list) else []


def _launcher_problems(config: dict[str, Any]) -> list[str]:
    problems = _schema_problems(config)
    schema_ok = not problems

    node_types = config.get("available_node_types")
    if not isinstance(node_types, dict) or not node_types:
        problems.append(
            "available_node_types: missing or empty: declare a CPU head, an autoscaling GPU "
            "worker group and a CPU worker group (see cluster/aws.yaml)"
        )
        return problems
    node_types = {name: nt if isinstance(nt, dict) else {} for name, nt in node_types.items()}

    head = config.get("head_node_type")
    if head is None:
        problems.append(
            f"head_node_type: missing: name the head's entry of available_node_types (one of {', '.join(node_types)})"
        )
    elif head not in node_types:
        problems.append(
            f"head_node_type = {head!r} names no entry of available_node_types "
            f"(it has {', '.join(map(repr, node_types))}): name one of them or add a {head!r} entry"
        )

    global_max = _int(config.get("max_workers"))
    min_sum = 0
    gpu_groups: list[str] = []
    cpu_groups: list[str] = []
    for name, nt in node_types.items():
        at = ("available_node_types", name)
        lo = _int(nt.get("min_workers", 0))
        hi = _int(nt.get("max_workers", 0 if name == head else global_max))
        if name != head and lo is not None:
            min_sum += lo
        if lo is not None and hi is not None and lo > hi:
            problems.append(
                f"{_key(*at, 'min_workers')} = {lo} is more than {_key(*at, 'max_workers')} = {hi}: "
                f"lower min_workers or raise max_workers"
            )
        if name == head:
            continue
        resources = nt.get("resources") if isinstance(nt.get("resources"), dict) else {}
        gpus = _number(resources.get("GPU")) or 0
        cpus = _number(resources.get("CPU")) or 0
        if gpus > 0:
            gpu_groups.append(name)
            if lo is not None and lo != 0:
                problems.append(
                    f"{_key(*at, 'min_workers')} = {lo} on GPU node type {name!r}: GPU nodes must start "
                    f"only when a run asks for GPUs (and leave when idle): set min_workers: 0"
                )
        elif cpus > 0:
            cpu_groups.append(name)
    if global_max is not None and min_sum > global_max:
        problems.append(
            f"max_workers = {global_max} is less than the sum of the worker types' min_workers ({min_sum}): "
            f"raise max_workers or lower min_workers"
        )
    if not gpu_groups:
        problems.append(
            "available_node_types: no worker node type declares GPU resources: add a GPU group for "
            'training, e.g. gpu_workers with min_workers: 0 and resources: {"CPU": 4, "GPU": 1}'
        )
    if not cpu_groups:
        problems.append(
            "available_node_types: no worker node type with CPU resources and no GPU: add a CPU "
            'group for Ray Data and mining, e.g. cpu_workers with min_workers: 0 and resources: {"CPU": 16}'
        )

    # clray installed on every node: by setup commands, or by an image other than Ray's own.
    docker = config.get("docker") if isinstance(config.get("docker"), dict) else {}
    if docker:
        for field in ("image", "head_image", "worker_image"):
            if (p := _image_version_problem(_key("docker", field), docker.get(field))) is not None:
                problems.append(p)
    setup = _commands(config.get("setup_commands"))
    missing: dict[str, list[str]] = {}
    for name, nt in node_types.items():
        nt_docker = nt.get("docker") if isinstance(nt.get("docker"), dict) else {}
        if name == head:
            key = "setup_commands"
            commands = setup + _commands(config.get("head_setup_commands"))
            image = docker.get("head_image") or docker.get("image")
        else:
            if (p := _image_version_problem(_key("available_node_types", name, "docker", "worker_image"),
                                            nt_docker.get("worker_image"))) is not None:
                problems.append(p)
            if "worker_setup_commands" in nt:  # a node type's own list replaces the global ones
                key = _key("available_node_types", name, "worker_setup_commands")
                commands = _commands(nt.get("worker_setup_commands"))
            else:
                key = "setup_commands"
                commands = setup + _commands(config.get("worker_setup_commands"))
            image = nt_docker.get("worker_image") or docker.get("worker_image") or docker.get("image")
        custom_image = isinstance(image, str) and image and _RAY_IMAGE.match(image.strip()) is None
        if not custom_image and not any(_installs_clray(c) for c in commands):
            missing.setdefault(key, []).append(name)
    for key, names in missing.items():
        problems.append(
            f"{key}: no command installs clray on node type(s) {', '.join(names)}: add "
            "`pip install -e ~/clray` (after torch and DeepSpeed, in .ci/bootstrap's order; see "
            "cluster/aws.yaml) or use an image with clray installed"
        )

    if schema_ok and not problems:
        problems.extend(_ray_launcher_checks(config))
    return problems


def _ray_launcher_checks(config: dict[str, Any]) -> list[str]:
    """What ``ray up`` does to a config before it calls the cloud: merge the provider's
    defaults, then Ray's validation (schema again on the merged config, head_node_type,
    the workers' minimum against max_workers, the docker config)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # a Ray without these internals: the schema check above stands
        return []
    ray_logger = logging.getLogger("ray.autoscaler._private.util")
    level = ray_logger.level
    ray_logger.setLevel(logging.WARNING)  # prepare_config logs the defaults it fills in
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as exc:  # noqa: BLE001 - any rejection is the user's to fix
        return [f"(top level): Ray's cluster launcher rejects it: {type(exc).__name__}: {exc}"]
    finally:
        ray_logger.setLevel(level)
    return []


# --------------------------------------------------------------------------- KubeRay


def _container_problems(at: tuple[Any, ...], pod: Any, problems: list[str]) -> list[dict[str, Any]]:
    """The pod template's containers (checking the first has an image); [] when absent."""
    template = pod.get("template") if isinstance(pod, dict) else None
    spec = template.get("spec") if isinstance(template, dict) else None
    containers = spec.get("containers") if isinstance(spec, dict) else None
    key = _key(*at, "template", "spec", "containers")
    if not isinstance(containers, list) or not containers or not all(isinstance(c, dict) for c in containers):
        problems.append(f"{key}: missing or not a list of containers: give the Ray container, with its image")
        return []
    image = containers[0].get("image")
    if not isinstance(image, str) or not image.strip():
        problems.append(
            f"{_key(*at, 'template', 'spec', 'containers', 0, 'image')}: missing: name an image with "
            f"Ray {ray_version()} and clray installed"
        )
    elif (p := _image_version_problem(_key(*at, "template", "spec", "containers", 0, "image"), image)) is not None:
        problems.append(p)
    return containers


def _start_params_problems(at: tuple[Any, ...], group: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    params = group.get("rayStartParams", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        problems.append(f"{_key(*at, 'rayStartParams')}: not a mapping: write e.g. rayStartParams: {{}}")
        return {}
    for name, value in params.items():
        if not isinstance(value, str):
            problems.append(
                f"{_key(*at, 'rayStartParams', name)} = {_show(value)}: KubeRay takes strings only: quote it "
                f"({name}: \"{value}\")"
            )
    return params


def _gpu_limit(containers: list[dict[str, Any]]) -> float:
    total = 0.0
    for container in containers:
        resources = container.get("resources")
        limits = resources.get("limits") if isinstance(resources, dict) else None
        if isinstance(limits, dict):
            total += _number(limits.get(GPU_RESOURCE)) or 0
    return total


def _ray_cluster_spec_problems(spec: Any, at: tuple[Any, ...]) -> list[str]:
    problems: list[str] = []
    if not isinstance(spec, dict):
        return [f"{_key(*at)}: missing or not a mapping: give the RayCluster spec (see cluster/kuberay/raycluster.yaml)"]

    autoscaling = spec.get("enableInTreeAutoscaling")
    if autoscaling is not True:
        state = "is not set" if autoscaling is None else f"= {_show(autoscaling)}"
        problems.append(
            f"{_key(*at, 'enableInTreeAutoscaling')} {state}: worker groups must grow with the work "
            f"(more trials, more nodes) and shrink back to minReplicas: set enableInTreeAutoscaling: true"
        )

    version = spec.get("rayVersion")
    want = _major_minor(ray_version())
    if version is None:
        problems.append(f'{_key(*at, "rayVersion")}: missing: set rayVersion: "{ray_version()}"')
    elif not isinstance(version, str):
        problems.append(
            f'{_key(*at, "rayVersion")} = {version!r} is a {type(version).__name__}, not a string '
            f'(YAML reads 2.60 as the number 2.6): quote it: rayVersion: "{ray_version()}"'
        )
    elif _major_minor(version) != want:
        problems.append(
            f"{_key(*at, 'rayVersion')} = {version!r} but clray is tested with Ray {want[0]}.{want[1]} "
            f'(installed: {ray_version()}): set rayVersion: "{ray_version()}" and use images of that version'
        )

    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"{_key(*at, 'headGroupSpec')}: missing or not a mapping: give the head's pod template")
    else:
        _start_params_problems((*at, "headGroupSpec"), head, problems)
        _container_problems((*at, "headGroupSpec"), head, problems)

    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        problems.append(
            f"{_key(*at, 'workerGroupSpecs')}: missing or empty: give a GPU group (gpu-workers) and a "
            f"CPU group (cpu-workers), see cluster/kuberay/raycluster.yaml"
        )
        return problems
    gpu_groups, cpu_groups, seen = [], [], set()
    for i, group in enumerate(groups):
        g_at = (*at, "workerGroupSpecs", i)
        if not isinstance(group, dict):
            problems.append(f"{_key(*g_at)}: not a mapping: give groupName, minReplicas, maxReplicas and template")
            continue
        name = group.get("groupName")
        if not isinstance(name, str) or not name:
            problems.append(f"{_key(*g_at, 'groupName')}: missing: name the group (e.g. gpu-workers)")
            name = f"#{i}"
        elif name in seen:
            problems.append(f"{_key(*g_at, 'groupName')} = {name!r} is used twice: give each group its own name")
        seen.add(name)
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        for field, value in (("minReplicas", lo), ("maxReplicas", hi)):
            if _int(value) is None or value < 0:
                state = "is missing" if value is None else f"= {_show(value)}"
                problems.append(
                    f"{_key(*g_at, field)} {state} (group {name}): the autoscaler needs a whole number "
                    f">= 0 here: set {field}"
                )
        if _int(lo) is not None and _int(hi) is not None:
            if lo > hi:
                problems.append(
                    f"{_key(*g_at, 'minReplicas')} = {lo} is more than maxReplicas = {hi} (group {name}): "
                    f"lower minReplicas or raise maxReplicas"
                )
            replicas = group.get("replicas")
            if replicas is not None and (_int(replicas) is None or not lo <= replicas <= hi):
                problems.append(
                    f"{_key(*g_at, 'replicas')} = {_show(replicas)} (group {name}) is not between minReplicas "
                    f"and maxReplicas: set it to {lo} (the autoscaler changes it from there)"
                )
        params = _start_params_problems(g_at, group, problems)
        containers = _container_problems(g_at, group, problems)
        gpus = _gpu_limit(containers)
        if gpus > 0:
            gpu_groups.append(name)
            if _int(lo) is not None and lo != 0:
                problems.append(
                    f"{_key(*g_at, 'minReplicas')} = {lo} on GPU group {name}: GPU pods must start only "
                    f"when a run asks for GPUs (and leave when idle): set minReplicas: 0"
                )
            declared = _number(params.get("num-gpus"))
            if declared is not None and declared != gpus:
                problems.append(
                    f"{_key(*g_at, 'rayStartParams', 'num-gpus')} = {params['num-gpus']!r} but the container "
                    f'limits {GPU_RESOURCE} to {gpus:g} (group {name}): make them equal (num-gpus: "{gpus:g}")'
                )
        else:
            cpu_groups.append(name)
    if not gpu_groups:
        problems.append(
            f"{_key(*at, 'workerGroupSpecs')}: no group has a GPU: add a training group whose container "
            f"limits {GPU_RESOURCE} (e.g. 1), with minReplicas: 0"
        )
    if not cpu_groups:
        problems.append(
            f"{_key(*at, 'workerGroupSpecs')}: no CPU-only group: add one (e.g. cpu-workers) for Ray Data "
            f"preprocessing and mining"
        )
    return problems


def _ray_job_problems(doc: dict[str, Any]) -> list[str]:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return ["spec: missing or not a mapping: give entrypoint, shutdownAfterJobFinishes and rayClusterSpec"]
    problems: list[str] = []
    entrypoint = spec.get("entrypoint")
    if not isinstance(entrypoint, str) or "clray" not in entrypoint:
        problems.append(
            f"spec.entrypoint = {_show(entrypoint)}: clray's RayJob runs a clray command: "
            f"e.g. entrypoint: clray train configs/my.toml"
        )
    shutdown = spec.get("shutdownAfterJobFinishes")
    if shutdown is not True:
        state = "is not set" if shutdown is None else f"= {_show(shutdown)}"
        problems.append(
            f"spec.shutdownAfterJobFinishes {state}: the cluster would outlive the job (GPU pods "
            f"included): set shutdownAfterJobFinishes: true"
        )
    ttl = spec.get("ttlSecondsAfterFinished")
    if ttl is not None and (_int(ttl) is None or ttl < 0):
        problems.append(
            f"spec.ttlSecondsAfterFinished = {_show(ttl)}: a whole number of seconds >= 0: e.g. ttlSecondsAfterFinished: 300"
        )
    runtime_env = spec.get("runtimeEnvYAML")
    if runtime_env is not None:
        import yaml

        parsed: Any = None
        if isinstance(runtime_env, str):
            try:
                parsed = yaml.safe_load(runtime_env)
            except yaml.YAMLError as exc:
                problems.append(f"spec.runtimeEnvYAML: not valid YAML ({_yaml_error(exc)}): fix the text")
                parsed = {}
        if not isinstance(parsed, dict):
            problems.append(
                "spec.runtimeEnvYAML: KubeRay takes the runtime env as a YAML string of a mapping: "
                "write it as a block (runtimeEnvYAML: |) holding e.g. working_dir: ..."
            )
    if "rayClusterSpec" not in spec:
        why = " (spec.clusterSelector runs on an existing cluster)" if "clusterSelector" in spec else ""
        problems.append(
            f"spec.rayClusterSpec: missing{why}: clray's RayJob brings its own cluster and tears it down: "
            f"give rayClusterSpec (see cluster/kuberay/rayjob.yaml)"
        )
    else:
        problems.extend(_ray_cluster_spec_problems(spec["rayClusterSpec"], ("spec", "rayClusterSpec")))
    return problems


def _kuberay_problems(doc: dict[str, Any]) -> list[str]:
    api, kind = doc.get("apiVersion"), doc.get("kind")
    problems = []
    if api != KUBERAY_API:
        fix = " (ray.io/v1alpha1 is KubeRay's old, deprecated API)" if api == "ray.io/v1alpha1" else ""
        problems.append(
            f"apiVersion = {api!r}: clray checks KubeRay's {KUBERAY_API} manifests{fix}: set apiVersion: {KUBERAY_API}"
        )
    if kind not in KUBERAY_KINDS:
        problems.append(
            f"kind = {kind!r}: clray checks {' and '.join(KUBERAY_KINDS)} manifests only: "
            f"set kind: RayCluster or RayJob, or keep this document out of cluster/"
        )
        return problems
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    if not isinstance(name, str) or not name:
        problems.append("metadata.name: missing: Kubernetes needs a name for the object")
    if kind == "RayCluster":
        problems.extend(_ray_cluster_spec_problems(doc.get("spec"), ("spec",)))
    else:
        problems.extend(_ray_job_problems(doc))
    return problems


# --------------------------------------------------------------------------- files


def _yaml_error(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(exc, "problem", None) or exc)


def _is_launcher(doc: dict[str, Any]) -> bool:
    return "provider" in doc or "available_node_types" in doc or "head_node_type" in doc


def _is_kuberay(doc: dict[str, Any]) -> bool:
    return "apiVersion" in doc or "kind" in doc


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
        return [f"{label}: not valid YAML: {_yaml_error(exc)}"]
    if not docs:
        return [f"{label}: empty: expected a Ray cluster launcher config or KubeRay manifests"]

    problems: list[str] = []
    for i, doc in enumerate(docs, start=1):
        where = label if len(docs) == 1 else f"{label} (document {i})"
        if not isinstance(doc, dict):
            problems.append(f"{where}: a {type(doc).__name__}, not a mapping: expected a cluster launcher "
                            "config or a KubeRay manifest")
            continue
        if _is_kuberay(doc):
            found = _kuberay_problems(doc)
        elif _is_launcher(doc):
            if len(docs) > 1:
                problems.append(f"{where}: a cluster launcher config must be the only document in its file: "
                                "move it to a file of its own")
                continue
            found = _launcher_problems(doc)
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
