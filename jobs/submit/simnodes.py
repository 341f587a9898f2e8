"""The node provider of ``clray jobs up --simulate``: Ray's fake multi-node provider, each
of whose nodes gets its own runtime-environment directory.

Ray's fake provider starts every simulated node under the head's session directory with
the default ``runtime_resources`` directory, so all nodes of the simulation share one. On
a real cluster each node has its own disk: each node's runtime-env agent unpacks a job's
``working_dir`` there and deletes it when its own workers no longer use it. Sharing one,
the agents unpack over and delete under each other's workers, and a job's tasks on the
simulated nodes fail at random (``ModuleNotFoundError`` for a module of the bundle,
``FileNotFoundError`` inside Ray Data). Loaded by the autoscaler as an ``external``
provider (``provider.module``), in the head's Python.
"""

from __future__ import annotations

from typing import Any

import ray._private.parameter as parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class SimulatedNodes(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config: Any, tags: Any, count: Any, resources: Any,
                                               labels: Any) -> None:
        original = parameter.RayParams
        index = self._next_node_id + 1  # the id the parent gives this node

        def own_directory(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("runtime_env_dir_name", f"runtime_resources_node{index}")
            return original(*args, **kwargs)

        with self.lock:  # the parent takes the same (reentrant) lock to create the node
            parameter.RayParams = own_directory  # type: ignore[misc]
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                parameter.RayParams = original  # type: ignore[misc]
