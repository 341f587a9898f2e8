"""What the launcher and the KubeRay checks share: the installed Ray's version (every image
and ``rayVersion`` must match it), YAML key paths for messages, and the lenient reading of
values that a hand-written YAML file may hold as the wrong type."""

from __future__ import annotations

import importlib.metadata
import json
import re
from functools import lru_cache
from typing import Any

RAY_IMAGE = re.compile(r"^(?:docker\.io/)?rayproject/ray(?:-ml)?:(\d+)\.(\d+)")
"""Ray's own images carry the Ray version in their tag: rayproject/ray:2.60.0-py311-gpu."""


@lru_cache(maxsize=1)
def ray_version() -> str:
    """The installed Ray's version, read without importing Ray."""
    return importlib.metadata.version("ray")


def major_minor(version: str) -> tuple[int, int] | None:
    """(2, 60) from "2.60.0"; None when the text does not start with a version."""
    match = re.match(r"^\s*(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def key_path(*parts: Any) -> str:
    """A YAML key path: available_node_types.gpu_workers.min_workers, spec.workerGroupSpecs[0]."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def show(value: Any) -> str:
    """A value as YAML writes it: false, null, 'text', 3."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def as_int(value: Any) -> int | None:
    """An int that is not a bool, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_number(value: Any) -> float | None:
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


def image_version_problem(key: str, image: Any) -> str | None:
    """Ray's own images name their Ray version; it must be the installed Ray's."""
    if not isinstance(image, str):
        return None
    match = RAY_IMAGE.match(image.strip())
    want = major_minor(ray_version())
    if match is None or want is None:
        return None
    got = (int(match.group(1)), int(match.group(2)))
    if got == want:
        return None
    return (
        f"{key} = {image!r} runs Ray {got[0]}.{got[1]} but clray is tested with Ray "
        f"{want[0]}.{want[1]} (installed: {ray_version()}): use a rayproject/ray:{ray_version()} image"
    )


def yaml_error(exc: Exception) -> str:
    """A PyYAML error as "line L, column C: problem" (PyYAML counts from 0)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(exc, "problem", None) or exc)
