"""Ray cluster launcher configs (``ray up`` YAML): Ray's own JSON schema first, then what
clray relies on (an autoscaling GPU worker group starting at 0, a CPU worker group, clray
installed on every node, Ray images of the installed Ray), last Ray's own launcher checks
(``prepare_config`` + ``validate_config``, no cloud calls)."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from clray.jobs.clustercheck.common import (
    RAY_IMAGE,
    as_int,
    as_number,
    image_version_problem,
    key_path,
    ray_version,
    show,
)

_CONSTRAINT_FLAGS = ("-c", "--constraint", "--index-url", "--extra-index-url", "-i", "-f", "--find-links")
"""pip options whose argument may name clray without installing it."""
_JSON_TYPES = {
    "integer": "a whole number", "number": "a number", "string": "a string", "boolean": "true or false",
    "object": "a mapping", "array": "a list", "null": "nothing (null)",
}


def is_launcher(doc: dict[str, Any]) -> bool:
    """A document with the launcher's top-level keys."""
    return "provider" in doc or "available_node_types" in doc or "head_node_type" in doc


@lru_cache(maxsize=1)
def ray_launcher_schema() -> dict[str, Any]:
    """The cluster launcher JSON schema of the installed Ray (found without importing Ray)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ray is not installed: install clray's dependencies (bash .ci/bootstrap)")
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def launcher_problems(config: dict[str, Any]) -> list[str]:
    """Every problem of one launcher config, without the file name. Ray's own launcher
    checks run only on a config clean otherwise: their first exception would hide the rest."""
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
    problems.extend(_head_problems(head, node_types))
    problems.extend(_worker_group_problems(config, node_types, head))
    problems.extend(_install_problems(config, node_types, head))

    if schema_ok and not problems:
        problems.extend(_ray_launcher_checks(config))
    return problems


def _schema_problems(config: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = ray_launcher_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    problems = []
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    for error in errors:
        key = key_path(*error.absolute_path)
        if error.validator == "type":
            wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
            fix = " or ".join(_JSON_TYPES.get(t, t) for t in wanted)
            message = f"{key} = {show(error.instance)} is not of type {error.validator_value!r}: write {fix}"
        elif error.validator == "additionalProperties":
            message = f"{key}: {error.message}: remove the key or fix its spelling"
        elif error.validator == "required":
            message = f"{key}: {error.message}: add it"
        else:
            message = f"{key}: {error.message}"
        problems.append(f"{message} (Ray {ray_version()} cluster launcher schema)")
    return problems


def _head_problems(head: Any, node_types: dict[str, dict[str, Any]]) -> list[str]:
    if head is None:
        return [
            f"head_node_type: missing: name the head's entry of available_node_types (one of {', '.join(node_types)})"
        ]
    if head not in node_types:
        return [
            f"head_node_type = {head!r} names no entry of available_node_types "
            f"(it has {', '.join(map(repr, node_types))}): name one of them or add a {head!r} entry"
        ]
    return []


def _worker_group_problems(config: dict[str, Any], node_types: dict[str, dict[str, Any]], head: Any) -> list[str]:
    """min/max_workers of every node type, and the groups clray needs: GPU workers that
    start at 0, CPU workers for Ray Data and mining."""
    problems = []
    global_max = as_int(config.get("max_workers"))
    min_sum = 0
    gpu_groups: list[str] = []
    cpu_groups: list[str] = []
    for name, nt in node_types.items():
        at = ("available_node_types", name)
        lo = as_int(nt.get("min_workers", 0))
        hi = as_int(nt.get("max_workers", 0 if name == head else global_max))
        if name != head and lo is not None:
            min_sum += lo
        if lo is not None and hi is not None and lo > hi:
            problems.append(
                f"{key_path(*at, 'min_workers')} = {lo} is more than {key_path(*at, 'max_workers')} = {hi}: "
                f"lower min_workers or raise max_workers"
            )
        if name == head:
            continue
        resources = nt.get("resources") if isinstance(nt.get("resources"), dict) else {}
        gpus = as_number(resources.get("GPU")) or 0
        cpus = as_number(resources.get("CPU")) or 0
        if gpus > 0:
            gpu_groups.append(name)
            if lo is not None and lo != 0:
                problems.append(
                    f"{key_path(*at, 'min_workers')} = {lo} on GPU node type {name!r}: GPU nodes must start "
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
    return problems


def _install_problems(config: dict[str, Any], node_types: dict[str, dict[str, Any]], head: Any) -> list[str]:
    """clray installed on every node: by setup commands, or by an image other than Ray's
    own; and Ray's own images of the installed Ray version."""
    problems = []
    docker = config.get("docker") if isinstance(config.get("docker"), dict) else {}
    if docker:
        for field in ("image", "head_image", "worker_image"):
            if (p := image_version_problem(key_path("docker", field), docker.get(field))) is not None:
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
            if (p := image_version_problem(key_path("available_node_types", name, "docker", "worker_image"),
                                           nt_docker.get("worker_image"))) is not None:
                problems.append(p)
            if "worker_setup_commands" in nt:  # a node type's own list replaces the global ones
                key = key_path("available_node_types", name, "worker_setup_commands")
                commands = _commands(nt.get("worker_setup_commands"))
            else:
                key = "setup_commands"
                commands = setup + _commands(config.get("worker_setup_commands"))
            image = nt_docker.get("worker_image") or docker.get("worker_image") or docker.get("image")
        custom_image = isinstance(image, str) and image and RAY_IMAGE.match(image.strip()) is None
        if not custom_image and not any(_installs_clray(c) for c in commands):
            missing.setdefault(key, []).append(name)
    for key, names in missing.items():
        problems.append(
            f"{key}: no command installs clray on node type(s) {', '.join(names)}: add "
            "`pip install -e ~/clray` (after torch and DeepSpeed, in .ci/bootstrap's order; see "
            "cluster/aws.yaml) or use an image with clray installed"
        )
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
