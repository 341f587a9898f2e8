"""What ``clray eval`` evaluates: a model (a clray export, a run's checkpoint, or a local
Hugging Face / sentence-transformers text model) on an evaluation split described like a
training config's ``data.eval``.

The split comes from ``--config`` (any TOML with a ``[data]`` table, e.g. a training
config; ``data.train`` may be left out) or, for a run directory, from the run's own
``config.toml``. How the model embeds is the mining teacher's ``TeacherConfig`` (pooling
and max_length for Hugging Face models, batch size, actors, GPUs), given in ``[eval]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from clray.jobs.config.errors import ConfigError, format_pydantic
from clray.jobs.config.files import apply_overrides, read_toml
from clray.models.config import Strict
from clray.pipelines.config import DataConfig
from clray.pipelines.mining.config import TeacherConfig
from clray.pipelines.storage import StorageConfig

RUN_CONFIG = "config.toml"


class EvalConfig(Strict):
    data: DataConfig
    """The evaluation split is data.eval; the views, id, label and class prompts as in a
    training config (data.train is not read)."""
    eval: TeacherConfig
    """The model (``path``) and how it embeds: batch_size, num_actors, cpus_per_actor,
    use_gpu; for Hugging Face models pooling and max_length."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    output: str | None = None
    """Where eval.json goes (default: beside the model, or in the run directory)."""
    checkpoint: str | None = None
    """For a run: the checkpoint evaluated (its directory name), else the latest."""

    @model_validator(mode="after")
    def _has_split(self) -> EvalConfig:
        if not self.data.eval:
            raise ValueError("data.eval is empty: name the evaluation split's shards (directories, globs or files)")
        return self


def is_run_dir(path: Path) -> bool:
    """A training run's directory: its resolved config beside its checkpoints."""
    return (path / RUN_CONFIG).is_file() and any(p.is_dir() for p in path.glob("checkpoint_*"))


def _from_run_dir(run_dir: Path, specs: Any) -> Any:
    """A run's data.eval with relative paths taken from where the run was started (its
    environment.json records the directory); other paths unchanged."""
    import json

    env = run_dir / "environment.json"
    started_in = json.loads(env.read_text()).get("working_dir") if env.is_file() else None
    if not started_in or not specs:
        return specs

    def absolute(spec: str) -> str:
        return spec if "://" in spec or Path(spec).expanduser().is_absolute() else str(Path(started_in) / spec)

    return absolute(specs) if isinstance(specs, str) else [absolute(s) for s in specs]


def load_eval_config(model: str, config: str | None, overrides: list[str] | None = None,
                     checkpoint: str | None = None, output: str | None = None) -> EvalConfig:
    """The eval config for ``clray eval MODEL``: ``[data]`` (and ``[eval]``, ``[storage]``)
    from ``config``, or from a run directory's own config.toml; every problem at once."""
    root = Path(model).expanduser()
    source = config or (str(root / RUN_CONFIG) if is_run_dir(root) else None)
    if source is None:
        raise ConfigError(model, [f"{model} is not a run directory: give --config FILE with a [data] table "
                                  "whose data.eval names the evaluation split"])
    raw = read_toml(source)
    kept = {k: v for k, v in raw.items() if k in ("data", "eval", "storage", "output", "checkpoint")}
    data = dict(kept.get("data") or {})
    if config is None:  # a run's own config: its relative paths mean the directory it ran in
        data["eval"] = _from_run_dir(root, data.get("eval"))
    if "train" not in data and "eval" in data:
        data["train"] = data["eval"]  # not read: a split only has to name its eval shards
    kept["data"] = data
    kept["eval"] = {**(kept.get("eval") or {}), "path": str(root)}
    if checkpoint is not None:
        kept["checkpoint"] = checkpoint
    if output is not None:
        kept["output"] = output
    kept = apply_overrides(kept, overrides or [])
    try:
        return EvalConfig.model_validate(kept)
    except ValidationError as err:
        raise ConfigError(source, format_pydantic(err)) from None
