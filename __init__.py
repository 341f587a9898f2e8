"""clray: distributed contrastive representation learning on Ray.

The public API, importable without starting Ray (each name is imported on first use, so
``import clray`` stays cheap and ``clray.models`` stays usable without Ray at all):

- ``load_config(path, overrides=None)``: a training config (TOML) as a validated
  ``JobConfig``, every problem reported at once;
- ``build_loss(loss_config)``: the contrastive objective a ``LossConfig`` describes;
- ``load_model(export_dir)``: a trained dual encoder from a clray export, on CPU;
- ``run_training(config)``: train on a local Ray or the cluster in ``RAY_ADDRESS``.

The packages: ``clray.models`` (torch only: towers, dual encoder, losses, metrics),
``clray.pipelines`` (Ray Data: read, validate, tokenize, pack and mine batches) and
``clray.jobs`` (the ``clray`` command and one package per command).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_config": ("clray.jobs.config", "load_config"),
    "JobConfig": ("clray.jobs.config", "JobConfig"),
    "ConfigError": ("clray.jobs.config", "ConfigError"),
    "build_loss": ("clray.models.losses", "build_loss"),
    "LossConfig": ("clray.models.config", "LossConfig"),
    "ModelConfig": ("clray.models.config", "ModelConfig"),
    "DualEncoder": ("clray.models.dual_encoder", "DualEncoder"),
    "load_model": ("clray.models.export", "load_exported"),
    "run_training": ("clray.jobs.run", "run_training"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'clray' has no attribute {name!r}")
    import importlib

    module, attr = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
