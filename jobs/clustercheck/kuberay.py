"""KubeRay manifests (``apiVersion: ray.io/v1``, ``RayCluster`` or ``RayJob``): the fields
clray relies on. KubeRay's CRD schema is not installed with Ray, so only these are checked:
an in-tree autoscaler, the installed Ray's version, a GPU group starting at 0 and a CPU-only
group, and a RayJob that brings its own cluster and tears it down."""

from __future__ import annotations

from typing import Any

from clray.jobs.clustercheck.common import (
    as_int,
    as_number,
    image_version_problem,
    key_path,
    major_minor,
    ray_version,
    show,
    yaml_error,
)

KUBERAY_API = "ray.io/v1"
KUBERAY_KINDS = ("RayCluster", "RayJob")
GPU_RESOURCE = "nvidia.com/gpu"


def is_kuberay(doc: dict[str, Any]) -> bool:
    """A document with Kubernetes' top-level keys (checked as KubeRay, whatever its kind)."""
    return "apiVersion" in doc or "kind" in doc


def kuberay_problems(doc: dict[str, Any]) -> list[str]:
    """Every problem of one KubeRay document, without the file name."""
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


def _ray_job_problems(doc: dict[str, Any]) -> list[str]:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return ["spec: missing or not a mapping: give entrypoint, shutdownAfterJobFinishes and rayClusterSpec"]
    problems: list[str] = []
    entrypoint = spec.get("entrypoint")
    if not isinstance(entrypoint, str) or "clray" not in entrypoint:
        problems.append(
            f"spec.entrypoint = {show(entrypoint)}: clray's RayJob runs a clray command: "
            f"e.g. entrypoint: clray train configs/my.toml"
        )
    shutdown = spec.get("shutdownAfterJobFinishes")
    if shutdown is not True:
        state = "is not set" if shutdown is None else f"= {show(shutdown)}"
        problems.append(
            f"spec.shutdownAfterJobFinishes {state}: the cluster would outlive the job (GPU pods "
            f"included): set shutdownAfterJobFinishes: true"
        )
    ttl = spec.get("ttlSecondsAfterFinished")
    if ttl is not None and (as_int(ttl) is None or ttl < 0):
        problems.append(
            f"spec.ttlSecondsAfterFinished = {show(ttl)}: a whole number of seconds >= 0: e.g. ttlSecondsAfterFinished: 300"
        )
    runtime_env = spec.get("runtimeEnvYAML")
    if runtime_env is not None:
        problems.extend(_runtime_env_problems(runtime_env))
    if "rayClusterSpec" not in spec:
        why = " (spec.clusterSelector runs on an existing cluster)" if "clusterSelector" in spec else ""
        problems.append(
            f"spec.rayClusterSpec: missing{why}: clray's RayJob brings its own cluster and tears it down: "
            f"give rayClusterSpec (see cluster/kuberay/rayjob.yaml)"
        )
    else:
        problems.extend(_ray_cluster_spec_problems(spec["rayClusterSpec"], ("spec", "rayClusterSpec")))
    return problems


def _runtime_env_problems(runtime_env: Any) -> list[str]:
    """KubeRay reads ``runtimeEnvYAML`` as text holding a YAML mapping."""
    import yaml

    problems = []
    parsed: Any = None
    if isinstance(runtime_env, str):
        try:
            parsed = yaml.safe_load(runtime_env)
        except yaml.YAMLError as exc:
            problems.append(f"spec.runtimeEnvYAML: not valid YAML ({yaml_error(exc)}): fix the text")
            parsed = {}
    if not isinstance(parsed, dict):
        problems.append(
            "spec.runtimeEnvYAML: KubeRay takes the runtime env as a YAML string of a mapping: "
            "write it as a block (runtimeEnvYAML: |) holding e.g. working_dir: ..."
        )
    return problems


def _ray_cluster_spec_problems(spec: Any, at: tuple[Any, ...]) -> list[str]:
    problems: list[str] = []
    if not isinstance(spec, dict):
        return [f"{key_path(*at)}: missing or not a mapping: give the RayCluster spec (see cluster/kuberay/raycluster.yaml)"]

    autoscaling = spec.get("enableInTreeAutoscaling")
    if autoscaling is not True:
        state = "is not set" if autoscaling is None else f"= {show(autoscaling)}"
        problems.append(
            f"{key_path(*at, 'enableInTreeAutoscaling')} {state}: worker groups must grow with the work "
            f"(more trials, more nodes) and shrink back to minReplicas: set enableInTreeAutoscaling: true"
        )
    problems.extend(_ray_version_problems(spec.get("rayVersion"), at))

    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append(f"{key_path(*at, 'headGroupSpec')}: missing or not a mapping: give the head's pod template")
    else:
        _start_params_problems((*at, "headGroupSpec"), head, problems)
        _container_problems((*at, "headGroupSpec"), head, problems)

    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        problems.append(
            f"{key_path(*at, 'workerGroupSpecs')}: missing or empty: give a GPU group (gpu-workers) and a "
            f"CPU group (cpu-workers), see cluster/kuberay/raycluster.yaml"
        )
        return problems
    _worker_groups_problems(groups, at, problems)
    return problems


def _ray_version_problems(version: Any, at: tuple[Any, ...]) -> list[str]:
    want = major_minor(ray_version())
    if version is None:
        return [f'{key_path(*at, "rayVersion")}: missing: set rayVersion: "{ray_version()}"']
    if not isinstance(version, str):
        return [
            f'{key_path(*at, "rayVersion")} = {version!r} is a {type(version).__name__}, not a string '
            f'(YAML reads 2.60 as the number 2.6): quote it: rayVersion: "{ray_version()}"'
        ]
    if major_minor(version) != want:
        return [
            f"{key_path(*at, 'rayVersion')} = {version!r} but clray is tested with Ray {want[0]}.{want[1]} "
            f'(installed: {ray_version()}): set rayVersion: "{ray_version()}" and use images of that version'
        ]
    return []


def _worker_groups_problems(groups: list[Any], at: tuple[Any, ...], problems: list[str]) -> None:
    """Each worker group, then the groups clray needs: one with a GPU, one CPU-only."""
    gpu_groups, cpu_groups, seen = [], [], set()
    for i, group in enumerate(groups):
        g_at = (*at, "workerGroupSpecs", i)
        if not isinstance(group, dict):
            problems.append(f"{key_path(*g_at)}: not a mapping: give groupName, minReplicas, maxReplicas and template")
            continue
        name = group.get("groupName")
        if not isinstance(name, str) or not name:
            problems.append(f"{key_path(*g_at, 'groupName')}: missing: name the group (e.g. gpu-workers)")
            name = f"#{i}"
        elif name in seen:
            problems.append(f"{key_path(*g_at, 'groupName')} = {name!r} is used twice: give each group its own name")
        seen.add(name)
        if _worker_group_problems(group, g_at, name, problems):
            gpu_groups.append(name)
        else:
            cpu_groups.append(name)
    if not gpu_groups:
        problems.append(
            f"{key_path(*at, 'workerGroupSpecs')}: no group has a GPU: add a training group whose container "
            f"limits {GPU_RESOURCE} (e.g. 1), with minReplicas: 0"
        )
    if not cpu_groups:
        problems.append(
            f"{key_path(*at, 'workerGroupSpecs')}: no CPU-only group: add one (e.g. cpu-workers) for Ray Data "
            f"preprocessing and mining"
        )


def _worker_group_problems(group: dict[str, Any], g_at: tuple[Any, ...], name: str, problems: list[str]) -> bool:
    """One worker group's replicas, start parameters and containers; True when it has a GPU."""
    lo, hi = group.get("minReplicas"), group.get("maxReplicas")
    for field, value in (("minReplicas", lo), ("maxReplicas", hi)):
        if as_int(value) is None or value < 0:
            state = "is missing" if value is None else f"= {show(value)}"
            problems.append(
                f"{key_path(*g_at, field)} {state} (group {name}): the autoscaler needs a whole number "
                f">= 0 here: set {field}"
            )
    if as_int(lo) is not None and as_int(hi) is not None:
        if lo > hi:
            problems.append(
                f"{key_path(*g_at, 'minReplicas')} = {lo} is more than maxReplicas = {hi} (group {name}): "
                f"lower minReplicas or raise maxReplicas"
            )
        replicas = group.get("replicas")
        if replicas is not None and (as_int(replicas) is None or not lo <= replicas <= hi):
            problems.append(
                f"{key_path(*g_at, 'replicas')} = {show(replicas)} (group {name}) is not between minReplicas "
                f"and maxReplicas: set it to {lo} (the autoscaler changes it from there)"
            )
    params = _start_params_problems(g_at, group, problems)
    containers = _container_problems(g_at, group, problems)
    gpus = _gpu_limit(containers)
    if gpus <= 0:
        return False
    if as_int(lo) is not None and lo != 0:
        problems.append(
            f"{key_path(*g_at, 'minReplicas')} = {lo} on GPU group {name}: GPU pods must start only "
            f"when a run asks for GPUs (and leave when idle): set minReplicas: 0"
        )
    declared = as_number(params.get("num-gpus"))
    if declared is not None and declared != gpus:
        problems.append(
            f"{key_path(*g_at, 'rayStartParams', 'num-gpus')} = {params['num-gpus']!r} but the container "
            f'limits {GPU_RESOURCE} to {gpus:g} (group {name}): make them equal (num-gpus: "{gpus:g}")'
        )
    return True


def _container_problems(at: tuple[Any, ...], pod: Any, problems: list[str]) -> list[dict[str, Any]]:
    """The pod template's containers (checking the first has an image); [] when absent."""
    template = pod.get("template") if isinstance(pod, dict) else None
    spec = template.get("spec") if isinstance(template, dict) else None
    containers = spec.get("containers") if isinstance(spec, dict) else None
    key = key_path(*at, "template", "spec", "containers")
    if not isinstance(containers, list) or not containers or not all(isinstance(c, dict) for c in containers):
        problems.append(f"{key}: missing or not a list of containers: give the Ray container, with its image")
        return []
    image = containers[0].get("image")
    image_key = key_path(*at, "template", "spec", "containers", 0, "image")
    if not isinstance(image, str) or not image.strip():
        problems.append(f"{image_key}: missing: name an image with Ray {ray_version()} and clray installed")
    elif (p := image_version_problem(image_key, image)) is not None:
        problems.append(p)
    return containers


def _start_params_problems(at: tuple[Any, ...], group: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    params = group.get("rayStartParams", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        problems.append(f"{key_path(*at, 'rayStartParams')}: not a mapping: write e.g. rayStartParams: {{}}")
        return {}
    for name, value in params.items():
        if not isinstance(value, str):
            problems.append(
                f"{key_path(*at, 'rayStartParams', name)} = {show(value)}: KubeRay takes strings only: quote it "
                f"({name}: \"{value}\")"
            )
    return params


def _gpu_limit(containers: list[dict[str, Any]]) -> float:
    total = 0.0
    for container in containers:
        resources = container.get("resources")
        limits = resources.get("limits") if isinstance(resources, dict) else None
        if isinstance(limits, dict):
            total += as_number(limits.get(GPU_RESOURCE)) or 0
    return total
