"""Re-mining between epochs (dynamic hard-negative mining, as in Conan-embedding):
``clray train`` with ``remine.every_epochs = N`` trains N epochs on the current mined
plan, exports, mines a new plan with that export as the teacher, and switches to it at
the next epoch.

The run is a sequence of ``run_training`` calls with ``stop_epoch`` (each resumes from
the previous one's checkpoint, so steps, optimizer, LR schedule and RNG carry over)
and mining jobs (``pipelines.mining.job``) between them. ``run_dir/remine.json``
records which plan is current from which epoch, so a killed run started again continues
where it stopped: mid-phase training resumes from its checkpoint; an interrupted mining
job resumes its own work.

With ``remine.overlap`` the run is one fit instead and the mining runs beside it
(``jobs.run.overlap``).
"""

from __future__ import annotations

import json

from clray.jobs import events
from clray.jobs.config import JobConfig
from clray.jobs.run.driver import OnEvent, TrainSummary, init_ray, run_training
from clray.jobs.run.replan import STATE_FILE, mine_config, mined_dir


def run_with_remining(cfg: JobConfig, *, verbose: bool = False, on_event: OnEvent | None = None) -> TrainSummary:
    """``run_training``, with a new mined plan every ``remine.every_epochs`` epochs."""
    import ray

    from clray.jobs.runtime import describe_failure
    from clray.pipelines.errors import MineError
    from clray.pipelines.mining.job import error_log, mine_plans
    from clray.pipelines.plan_format import read_manifest, write_json_atomic
    from clray.pipelines.storage import normalize

    if not cfg.remine.every_epochs:
        raise ValueError("run_with_remining needs remine.every_epochs; call run_training")
    if cfg.remine.overlap:
        from clray.jobs.run.overlap import OverlapMiner

        return run_training(cfg, verbose=verbose, on_event=on_event, overlap=OverlapMiner(cfg, verbose=verbose))
    every, epochs = cfg.remine.every_epochs, cfg.train.epochs
    run_dir = cfg.run_dir
    first_plan = normalize(cfg.data.train[0])  # a local path or an s3:// plan
    first_manifest = read_manifest(first_plan, cfg.storage)
    state_path = run_dir / STATE_FILE
    state = {"plan": first_plan, "from_epoch": 0, "plans": [{"plan": first_plan, "from_epoch": 0}]}
    if state_path.is_file():
        state = json.loads(state_path.read_text())
    while True:
        start = state["from_epoch"]
        stop = start + every
        phase = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": [state["plan"]]})})
        summary = run_training(phase, verbose=verbose, on_event=on_event, stop_epoch=stop if stop < epochs else None)
        if stop >= epochs or summary.steps >= summary.total_steps:
            return summary
        if on_event:
            on_event(events.RemineEvent(epoch=stop, teacher=str(run_dir / "export")).record())
        mine_cfg = mine_config(cfg, first_manifest, run_dir / "export", stop, mined_dir(run_dir, stop))
        try:
            mined = mine_plans(mine_cfg, start_ray=lambda: init_ray(cfg, verbose), overwrite=True)
        except ray.exceptions.RayError as exc:
            raise MineError(f"re-mining failed: {describe_failure(exc)}\n  details: {error_log(mine_cfg)}") from None
        if on_event:
            on_event(events.ReminedEvent(epoch=stop, plan=mined.out_dir, statistics=mined.statistics).record())
        state = {"plan": mined.out_dir, "from_epoch": stop,
                 "plans": [*state["plans"], {"plan": mined.out_dir, "from_epoch": stop}]}
        write_json_atomic(state_path, state)
