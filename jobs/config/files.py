"""Config files: TOML in and out, ``--set`` overrides, and laying one table over another."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from clray.jobs.config.errors import ConfigError

if TYPE_CHECKING:
    from clray.jobs.config import JobConfig


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as a TOML value, else as a plain string."""
    if "=" not in text:
        raise ConfigError("--set", [f"{text!r}: write overrides as key=value, e.g. optim.lr=3e-4"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", [f"{text!r}: the key must be a dotted path like scaling.num_workers"])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError("--set", [f"{text!r}: {part!r} is a value, not a section"])
            node = child
        node[path[-1]] = value
    return out


def merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``, table by table (how a search config's ``search.base``
    and a run's overrides are applied)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"no such config file: {path}"])
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None


def dump_toml(cfg: JobConfig) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))
