"""``clray jobs up`` (``start_recorded_head``), and with ``--simulate cluster/aws.yaml``: an autoscaling Ray cluster on this machine,
shaped like a cluster launcher file, for trying searches, mining and ``--after`` chains
without a cloud account (and for the tests that prove them).

Ray ships a fake multi-node node provider for exactly this (what
``ray.cluster_utils.AutoscalingCluster`` uses): the head runs Ray's autoscaler, and each
node it "launches" is one more raylet on this machine with the resources its node type
declares. clray starts that head itself (``head.start_head``) instead of through
``AutoscalingCluster``, whose start and shutdown run ``ray stop --force`` and would end
every other Ray on the machine.

How a launcher file becomes the simulated cluster:

- the head keeps its declared resources (``CPU: 0`` in ``cluster/aws.yaml``: no work there);
- each worker node type keeps its name, ``min_workers`` and, capped at ``max_nodes``,
  ``max_workers``; its CPUs shrink to ``node_cpus`` (this machine has few cores); its GPUs
  become the custom resource ``sim_gpu`` (nothing here runs CUDA), so a job puts its
  workers on the GPU group with ``scaling.resources_per_worker = {sim_gpu = 1}`` where on
  the real cluster it says ``use_gpu = true``; other custom resources are kept, and every
  node also declares ``group:NAME = 1000`` so work can be pinned to its group;
- idle nodes go after ``idle_s`` seconds (``idle_timeout_minutes`` is 10 on AWS).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clray.jobs.submit.errors import SubmitError
from clray.jobs.submit.head import LocalHead, local_head_path, read_local_head, start_head

SIM_GPU = "sim_gpu"
"""The custom resource a simulated node declares for each GPU of its node type."""
GROUP_PREFIX = "group:"
"""Every simulated node declares ``group:<its node type> = 1000``."""
GROUP_AMOUNT = 1000

_LAUNCHER_STUBS: dict[str, Any] = {
    "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "auth": {"ssh_user": "ubuntu"}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}
"""Keys the autoscaler's config schema requires and a fake cluster does not use."""


def simulated_config(launcher_file: Path, node_cpus: int = 2, max_nodes: int = 2, idle_s: float = 10.0,
                     ) -> tuple[dict[str, Any], float]:
    """The fake-provider autoscaling config mirroring ``launcher_file``'s node types, and
    the head's CPUs. The GCS address is filled in by ``start_head``."""
    import yaml

    try:
        doc = yaml.safe_load(launcher_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SubmitError(f"--simulate {launcher_file}: cannot read it as a cluster launcher file ({exc})") from None
    types = (doc or {}).get("available_node_types")
    head_type = (doc or {}).get("head_node_type")
    if not isinstance(types, dict) or head_type not in types:
        raise SubmitError(
            f"--simulate {launcher_file}: needs a Ray cluster launcher file with available_node_types and "
            "head_node_type (like cluster/aws.yaml); KubeRay manifests are not simulated"
        )
    head_resources = dict(types[head_type].get("resources") or {})
    head_cpus = float(head_resources.pop("CPU", 0))
    nodes: dict[str, Any] = {
        "ray.head.default": {"resources": {**_simulated(head_resources, head_cpus), "CPU": head_cpus},
                             "node_config": {}, "max_workers": 0},
    }
    for name, spec in types.items():
        if name == head_type:
            continue
        resources = dict(spec.get("resources") or {})
        cpus = min(float(resources.pop("CPU", node_cpus)), float(node_cpus))
        nodes[name] = {
            "resources": {**_simulated(resources, cpus), "CPU": cpus, f"{GROUP_PREFIX}{name}": GROUP_AMOUNT},
            "node_config": {},
            "min_workers": int(spec.get("min_workers", 0)),
            "max_workers": min(int(spec.get("max_workers", max_nodes)), max_nodes),
        }
    config = {
        "cluster_name": f"simulated-{launcher_file.stem}",
        "max_workers": max_nodes * (len(nodes) - 1),
        "provider": {"type": "external", "module": "clray.jobs.submit.simnodes.SimulatedNodes",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": nodes,
        "head_node_type": "ray.head.default",
        "upscaling_speed": float(doc.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_s / 60.0,
        **_LAUNCHER_STUBS,
    }
    return config, head_cpus


def _simulated(resources: dict[str, Any], cpus: float) -> dict[str, float]:
    """A node type's non-CPU resources as simulated: GPUs become ``sim_gpu``."""
    out = {k: float(v) for k, v in resources.items() if k != "GPU"}
    if resources.get("GPU"):
        out[SIM_GPU] = float(resources["GPU"])
    return out


def state_rows(address: str, kind: str, limit: int = 1000) -> list[dict[str, Any]]:
    """The rows of one of the cluster's state API lists (``nodes``, ``actors``,
    ``placement_groups``, ``tasks``; dead ones included), detailed, from its dashboard."""
    import requests

    from clray.jobs.submit.address import auth_headers

    response = requests.get(f"{address}/api/v0/{kind}", params={"limit": limit, "detail": "true"},
                            headers=auth_headers(address, None), timeout=10)
    response.raise_for_status()
    return response.json()["data"]["result"]["result"]


def cluster_nodes(address: str) -> list[dict[str, Any]]:
    """The cluster's nodes as its dashboard's state API lists them (alive and dead): node
    id, state, node group (the ``group:NAME`` resource, or the head) and resources."""
    nodes = []
    for row in state_rows(address, "nodes"):
        resources = row.get("resources_total") or {}
        group = next((k[len(GROUP_PREFIX):] for k in resources if k.startswith(GROUP_PREFIX)), None)
        nodes.append({"node_id": row["node_id"], "state": row["state"], "is_head": row.get("is_head_node", False),
                      "group": group or ("head" if row.get("is_head_node") else "?"), "resources": resources})
    return nodes


def alive_by_group(address: str) -> dict[str, int]:
    """How many nodes of each group are alive now, e.g. {"head": 1, "gpu_workers": 2}."""
    counts: dict[str, int] = {}
    for node in cluster_nodes(address):
        if node["state"] == "ALIVE":
            counts[node["group"]] = counts.get(node["group"], 0) + 1
    return counts


def watch_nodes(address: str, until: Any, every_s: float = 1.0) -> list[tuple[float, dict[str, int]]]:
    """Alive nodes per group every ``every_s`` seconds until ``until()`` is true: the
    timeline the README's figures come from. A poll the dashboard does not answer is skipped."""
    started = time.monotonic()
    timeline: list[tuple[float, dict[str, int]]] = []
    while not until():
        try:
            counts = alive_by_group(address)
        except Exception:
            counts = None
        if counts is not None and (not timeline or timeline[-1][1] != counts):
            timeline.append((round(time.monotonic() - started, 1), counts))
        time.sleep(every_s)
    return timeline


def start_recorded_head(say: Callable[[str], None], num_cpus: float, simulate: Path | None = None,
                        node_cpus: int = 2, max_nodes: int = 2, idle_s: float = 10.0) -> LocalHead:
    """``clray jobs up``: start a local head (simulating ``simulate``'s cluster when given)
    and record it, so ``clray submit`` and ``clray jobs`` use it without --address. A
    recorded head that still runs is stopped first."""
    config: dict[str, Any] | None = None
    if simulate is not None:  # a file that cannot be simulated stops nothing
        config, head_cpus = simulated_config(simulate, node_cpus=node_cpus, max_nodes=max_nodes, idle_s=idle_s)
    old = read_local_head()
    if old is not None and old.alive():
        say(f"stopping the local head recorded before, at {old.address}")
        old.stop()
    if config is None:
        head = start_head(num_cpus)
        what = f"local Ray head ({int(num_cpus)} CPUs)"
    else:
        head = start_head(head_cpus, autoscaling=config, simulated=str(simulate))
        groups = ", ".join(f"{name} 0-{t['max_workers']} x {t['resources']}"
                           for name, t in config["available_node_types"].items() if name != "ray.head.default")
        what = f"simulated {simulate} cluster (head CPU {head_cpus:g}; {groups}; idle nodes go after {idle_s:g} s)"
    path = local_head_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head.to_json())
    say(f"{what} at {head.address} (recorded in {path}; `clray jobs down` stops it)")
    return head
