"""``run_tune``: the driver of a search. It checks what can fail before Ray starts, starts
Ray with room for the concurrent trials, builds Tune's scheduler and search algorithm,
shows a live table while trials run, and writes the outputs at the end.

Layout of a search directory (``run.output_dir/run.name``):

    tune/            Ray Tune's experiment state (what --resume restores)
    trials/ID/       one clray run per trial (checkpoints, metrics.jsonl, export, summary)
    trial_starts.jsonl  one line per start of a trial (what a resumed search reran)
    asha_rungs.json  ASHA's results per rung (Tune does not save them; a resume needs them)
    pbt_state.json   PBT's per-trial state (likewise)
    best.toml        the best trial's config, ready for `clray train`
    results.parquet, results.csv   one row per trial
    plots/           the metric against each searched key, and per-trial curves

For a search on S3, Tune writes its state there directly and every trial's run is a run
on S3; the driver's own files are staged locally and published (``TuneJob.staging``).
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from clray.jobs.config import ConfigError, validate
from clray.jobs.config.search import PBT_MUTABLE, TuneJob
from clray.jobs.tune.report import TuneSummary, print_final, print_trials, published, write_outputs
from clray.jobs.tune.schedulers import PBT_FILE, RUNGS_FILE, resumable_asha, resumable_pbt
from clray.jobs.tune.trial import run_trial, trial_steps_bound

CRASH_ENV = "CLRAY_TUNE_CRASH_AFTER"
"""Fault injection for tests: the driver exits hard (no clean-up) once this many trials
have finished and Tune has saved its state since, as a killed driver would."""

SEARCH_FILES = ("summary.json", "results.parquet", "results.csv", "best.toml", "plots", "trial_starts.jsonl")
"""What the driver publishes when the search ends."""


class _LiveTable:
    """A Tune callback that prints the trials table whenever a trial changes state, and a
    line per result; plus the CRASH_ENV fault injection for tests."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from ray.tune import Callback

        class LiveTable(Callback):
            def __init__(self, job: TuneJob) -> None:
                self.job = job
                self._console: Any = None
                self.last: dict[str, dict[str, Any]] = {}
                self.finished = 0
                self.finished_at: float | None = None

            @property
            def console(self) -> Any:
                if self._console is None:
                    from rich.console import Console

                    self._console = Console()
                return self._console

            def __getstate__(self) -> dict[str, Any]:
                # Tune pickles its run config with the experiment state; a console is not picklable.
                return {**self.__dict__, "_console": None}

            def _table(self, trials: list[Any]) -> None:
                print_trials(self.console, self.job, trials, self.last)

            def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                # Written here, on the driver, not in the trial: trials may run on other nodes.
                with (self.job.search_dir / "trial_starts.jsonl").open("a") as fh:
                    fh.write(json.dumps({"trial_id": trial.trial_id, "time": time.time(),
                                         "params": {d.key: trial.config.get(d.key) for d in self.job.dimensions}},
                                        default=str) + "\n")
                self.job.staging.publish("trial_starts.jsonl")
                self._table(trials)

            def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
                self.last[trial.trial_id] = result
                value = result.get(self.job.search.metric)
                shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
                self.console.print(f"  {trial.trial_id} step {result.get('step')}: {self.job.search.metric} {shown}",
                                   highlight=False)

            def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                self.finished += 1
                # Read now, not when the callback was made: Tune restores this callback from
                # its saved state on --resume, and the resumed driver must not inherit the
                # killed one's fault injection.
                crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
                if crash_after and self.finished >= crash_after and self.finished_at is None:
                    self.finished_at = time.monotonic()
                self._table(trials)

            def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                self._table(trials)

            def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
                # Give Tune's periodic state save (TUNE_GLOBAL_CHECKPOINT_S) time to run.
                if self.finished_at is not None and time.monotonic() - self.finished_at > 4:
                    os._exit(3)

        return LiveTable(*args, **kwargs)


def _scheduler(job: TuneJob, max_t: int | None) -> Any:
    """ASHA, PBT or FIFO. ``max_t``: the raw-row upper bound on a trial's steps
    (``trial_steps_bound``); ASHA only needs a bound, never a trial's real length."""
    from ray.tune.schedulers import FIFOScheduler

    search, train = job.search, job.base.train
    if search.scheduler == "asha":
        grace = search.asha.grace_period or train.eval_every or train.log_every
        return resumable_asha(
            job,
            time_attr="step",
            grace_period=grace,
            reduction_factor=search.asha.reduction_factor,
            # ASHA stops a trial that reaches max_t; one past the last step lets a full trial
            # end by itself (final evaluation, checkpoint and export) instead of being killed.
            max_t=(search.asha.max_t or max_t or 10**9) + 1,
        )
    if search.scheduler == "pbt":
        mutations = {d.key: d.tune_domain() for d in job.dimensions if d.key in PBT_MUTABLE}
        if search.seed is not None:
            # PBT draws its exploit partners and perturbations from Python's global random.
            random.seed(search.seed)
        return resumable_pbt(
            job,
            time_attr="step",
            perturbation_interval=search.pbt.perturbation_interval or train.eval_every,
            hyperparam_mutations=mutations,
            quantile_fraction=search.pbt.quantile_fraction,
            resample_probability=search.pbt.resample_probability,
            synch=search.pbt.synch,
        )
    return FIFOScheduler()


def _search_alg(job: TuneJob) -> Any:
    if job.search.algorithm != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Seeded: the same search config draws the same trial configs.
        return BasicVariantGenerator(max_concurrent=job.search.max_concurrent, random_state=job.search.seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=job.search.seed))


def _trial_cpus(job: TuneJob) -> float:
    from clray.jobs.runtime import training_cpus

    return training_cpus(validate(job.trial_raw({}), job.source))


def _check_start(job: TuneJob, experiment_uri: str, resume: bool) -> None:
    """A new search must not land on an old one, and --resume needs one to resume."""
    from clray.pipelines import storage

    has_search = storage.is_file(storage.join(experiment_uri, "tuner.pkl"), job.base.storage)
    if resume and not has_search:
        raise ConfigError(job.source, [f"--resume: no search to resume in {experiment_uri} (start it without --resume)"])
    if not resume and has_search:
        raise ConfigError(job.source, [
            f"{job.search_uri} already holds a search: add --resume to continue it, or set run.name to start a new one"
        ])


def _stage_search_files(job: TuneJob, resume: bool) -> None:
    """search.json (what was searched), and on --resume the starts so far, which the live
    table appends to."""
    if resume:
        job.staging.pull("trial_starts.jsonl")
    else:  # nothing of an earlier search's scheduler state may reach this one
        for name in (RUNGS_FILE, PBT_FILE):
            (job.search_dir / name).unlink(missing_ok=True)
    (job.search_dir / "search.json").write_text(json.dumps(
        {"source": job.source, "base": job.raw_base, "search": job.search.model_dump(mode="json")},
        indent=2, default=str,
    ))
    job.staging.publish("search.json")


def _tuner(job: TuneJob, experiment_uri: str, max_t: int | None, resume: bool) -> Any:
    """Tune's Tuner for this search, new or restored from its saved state."""
    from ray import tune

    from clray.pipelines import storage

    # The trial's own process only waits on its TorchTrainer, whose workers ask Ray for the
    # real resources (what an autoscaler sees); a token CPU keeps it schedulable anywhere.
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"CPU": 0.01})
    remote = job.staging.remote
    # Tune's state next to the trials: on S3 through the filesystem the data uses, so a
    # search resumes from any machine.
    fs, inner = storage.filesystem(job.search_uri, job.base.storage)
    if resume:
        restore_path = storage.filesystem(experiment_uri, job.base.storage)[1] if remote else experiment_uri
        return tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True, resume_unfinished=True,
                                  storage_filesystem=fs if remote else None)
    location = {"storage_path": inner, "storage_filesystem": fs} if remote else {"storage_path": str(job.search_dir)}
    run_config = tune.RunConfig(
        name="tune",
        **location,
        callbacks=[_LiveTable(job)],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=job.search.max_failures),
    )
    return tune.Tuner(
        trainable,
        param_space={d.key: d.tune_domain() for d in job.dimensions},
        tune_config=tune.TuneConfig(
            metric=job.search.metric,
            mode=job.search.mode,
            num_samples=1 if job.search.algorithm == "grid" else job.search.num_trials,
            # random/grid: the generator above limits concurrency itself
            max_concurrent_trials=job.search.max_concurrent if job.search.algorithm == "optuna" else None,
            scheduler=_scheduler(job, max_t),
            search_alg=_search_alg(job),
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=run_config,
    )


def run_tune(job: TuneJob, *, resume: bool = False, verbose: bool = False, console: Any = None) -> TuneSummary:
    """Run (or resume) the search and write its outputs; returns the summary."""
    started = time.perf_counter()
    from rich.console import Console

    from clray.jobs.run.data import check_data
    from clray.jobs.run.driver import run_worker_env
    from clray.jobs.runtime import TUNE_DEFAULTS, start_ray

    console = console or Console()
    for name, value in TUNE_DEFAULTS.items():  # why each: jobs.runtime.RAY_KNOBS
        os.environ.setdefault(name, value)
    staging = job.staging  # first use: a search on S3 checks it can write there
    experiment_uri = staging.path("tune")
    _check_start(job, experiment_uri, resume)
    # Every trial checks its own data, but one check here fails a broken corpus in seconds.
    check_data(job.base)
    _stage_search_files(job, resume)

    trial_cfg = validate(job.trial_raw({}), job.source)
    # Room for max_concurrent trials at once (their workers plus Ray Data), so they run
    # side by side here; on a cluster the autoscaler provides it.
    per_trial = {k: v * trial_cfg.scaling.num_workers for k, v in trial_cfg.scaling.resources_per_worker.items()}
    start_ray(job.search.max_concurrent * _trial_cpus(job), run_worker_env(trial_cfg), verbose, dashboard=True,
              resources={k: v * job.search.max_concurrent for k, v in per_trial.items()})
    from clray.pipelines import quiet_ray_data

    quiet_ray_data()
    tuner = _tuner(job, experiment_uri, trial_steps_bound(job), resume)
    if resume:
        console.print(f"resuming the search in {job.search_uri}")
    grid = tuner.fit()
    summary = published(job, write_outputs(job, grid))
    summary.wall_seconds = time.perf_counter() - started
    (job.search_dir / "summary.json").write_text(summary.to_json())
    staging.publish(*SEARCH_FILES)
    print_final(console, job, summary)
    return summary
