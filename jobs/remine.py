"""Re-mining between epochs (dynamic hard-negative mining, as in Conan-embedding):
``clray train`` with ``remine.every_epochs = N`` trains N epochs on the current mined
plan, exports, mines a new plan with that export as the teacher, and switches to it at
the next epoch.

The run is a sequence of ``run_training`` calls with ``stop_epoch`` (each resumes from
the previous one's checkpoint, so steps, optimizer, LR schedule and RNG carry over)
and ``run_mining`` calls between them. ``run_dir/remine.json`` records which plan is
current from which epoch, so a killed run started again continues where it stopped:
mid-phase training resumes from its checkpoint; an interrupted mining job resumes its
own work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from clray.models.config import Strict

STATE_FILE = "remine.json"


class RemineConfig(Strict):
    every_epochs: int = Field(default=0, ge=0)
    """0: off. N: after every N epochs, mine a new plan with the run's current model as the
    teacher (its export) and train on it from the next epoch. Needs data.batches =
    "packed": data.train is the first plan, and its corpus is what gets re-mined."""
    mining: dict[str, Any] = Field(default_factory=dict)
    """Keys of a mining config's [mining] table for the new plans (rank_min, margin,
    num_negatives, ...); unset keys keep the first plan's values. batch_size and epochs
    are set by the run: the local batch size and every_epochs."""
    teacher: dict[str, Any] = Field(default_factory=dict)
    """Teacher settings other than path (batch_size, num_actors, cpus_per_actor, use_gpu)."""


def _format(err: ValidationError, prefix: str) -> list[str]:
    from clray.jobs.config import _format_pydantic

    return [f"{prefix}.{line}" for line in _format_pydantic(err)]


def remine_problems(cfg: Any) -> list[str]:
    """Cross-checks of the remine section against the rest of a JobConfig."""
    from clray.pipelines.mining.config import MiningConfig, TeacherConfig

    remine: RemineConfig = cfg.remine
    if not remine.every_epochs:
        return []
    problems = []
    if cfg.data.batches != "packed":
        problems.append(
            "remine.every_epochs needs data.batches = \"packed\" and data.train = a plan from `clray mine` "
            "(the first plan; its corpus is re-mined)"
        )
    if remine.every_epochs >= cfg.train.epochs:
        problems.append(
            f"remine.every_epochs = {remine.every_epochs} but train.epochs = {cfg.train.epochs}: no epoch would "
            "use a new plan; lower every_epochs or train longer"
        )
    for key in ("batch_size", "epochs"):
        if key in remine.mining:
            problems.append(f"remine.mining.{key} is set by the run (local batch size, every_epochs): remove it")
    try:
        MiningConfig.model_validate({"batch_size": max(2, cfg.local_batch_size), **remine.mining,
                                     "epochs": max(1, remine.every_epochs)})
    except ValidationError as err:
        problems.extend(_format(err, "remine.mining"))
    if "path" in remine.teacher:
        problems.append("remine.teacher.path is the run's own export: remove it")
    else:
        try:
            TeacherConfig.model_validate({"path": ".", **remine.teacher})
        except ValidationError as err:
            problems.extend(_format(err, "remine.teacher"))
    return problems


def _mine_config(cfg: Any, first_manifest: dict[str, Any], teacher_dir: Path, epoch: int, out_dir: Path) -> Any:
    from clray.jobs.mine import MineConfig
    from clray.pipelines.mining.config import MiningConfig, OutputConfig, TeacherConfig

    data = cfg.data.without_negatives().model_copy(
        update={"train": list(first_manifest["corpus"]["files"]), "batches": "examples", "eval": []}
    )
    parameters = {k: v for k, v in first_manifest["parameters"].items() if k in MiningConfig.model_fields}
    parameters.update(cfg.remine.mining)
    parameters.update(batch_size=cfg.local_batch_size, epochs=cfg.remine.every_epochs, seed=cfg.run.seed + epoch)
    return MineConfig(
        data=data,
        teacher=TeacherConfig(path=str(teacher_dir), **cfg.remine.teacher),
        mining=MiningConfig.model_validate(parameters),
        output=OutputConfig(dir=str(out_dir)),
        storage=cfg.storage,  # the corpus may be on S3
    )


def run_with_remining(
    cfg: Any,
    *,
    verbose: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """``run_training``, with a new mined plan every ``remine.every_epochs`` epochs."""
    from clray.jobs.mine import run_mining
    from clray.jobs.train import run_training
    from clray.pipelines.plan_format import read_manifest, write_json_atomic
    from clray.pipelines.storage import normalize

    if not cfg.remine.every_epochs:
        return run_training(cfg, verbose=verbose, on_event=on_event)
    every, epochs = cfg.remine.every_epochs, cfg.train.epochs
    run_dir = cfg.run_dir
    first_plan = normalize(cfg.data.train[0])  # a local path or an s3:// plan
    first_manifest = read_manifest(first_plan, cfg.storage)
    state_path = run_dir / STATE_FILE
    state = {"plan": first_plan, "from_epoch": 0, "plans": [{"plan": first_plan, "from_epoch": 0}]}
    if state_path.is_file():
        import json

        state = json.loads(state_path.read_text())
    while True:
        start = state["from_epoch"]
        stop = start + every
        phase = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": [state["plan"]]})})
        summary = run_training(phase, verbose=verbose, on_event=on_event, stop_epoch=stop if stop < epochs else None)
        if stop >= epochs or summary.steps >= summary.total_steps:
            return summary
        if on_event:
            on_event({"event": "remine", "epoch": stop, "teacher": str(run_dir / "export")})
        mine_cfg = _mine_config(cfg, first_manifest, run_dir / "export", stop, run_dir / "mined" / f"epoch-{stop:04d}")
        mined = run_mining(mine_cfg, overwrite=True)
        if on_event:
            on_event({"event": "remined", "epoch": stop, "plan": mined.out_dir, "statistics": mined.statistics})
        state = {"plan": mined.out_dir, "from_epoch": stop,
                 "plans": [*state["plans"], {"plan": mined.out_dir, "from_epoch": stop}]}
        write_json_atomic(state_path, state)
