"""A mining config (``clray mine``, and ``clray submit mine``) read from TOML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from clray.jobs.config import ConfigError, apply_overrides, format_pydantic, read_toml
from clray.pipelines.mining.config import MineConfig


def load_mine_config(path: str | Path, overrides: list[str] | None = None) -> MineConfig:
    return validate_mine_config(apply_overrides(read_toml(path), overrides or []), str(path))


def validate_mine_config(raw: dict[str, Any], source: str = "config") -> MineConfig:
    try:
        return MineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, format_pydantic(err)) from None
