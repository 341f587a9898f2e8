"""``clray tune``: a Ray Tune search over training-config keys, each trial a whole run.

A search config is a training config plus a ``[search]`` table. Each trial is a whole
``clray train`` run (``run_training``: a ``TorchTrainer`` built and fitted inside a Tune
function trainable, the Ray Train V2 pattern) with its own run directory under
``SEARCH_DIR/trials/``. Trials report their mid-run evaluations (``train.eval_every``) to
Tune, so ASHA can stop weak trials and PBT can copy strong ones.

The modules, in dependency order: ``config`` (the search and every check before Ray),
``trial`` (one trial inside Tune, and a trial's step count), ``report`` (the tables,
results, best.toml and plots), ``driver`` (``run_tune``: Ray, Tune's scheduler and search
algorithm, the live table). This package is the façade the CLI, tests and benchmarks use.
"""

from clray.jobs.config.search import TuneJob, check_tune_config, load_tune_config
from clray.jobs.tune.driver import CRASH_ENV, run_tune
from clray.jobs.tune.report import TuneSummary, live_status, trial_rows, write_outputs
from clray.jobs.tune.trial import (
    TOTAL_STEPS,
    TrialReporter,
    run_trial,
    trial_status,
    trial_steps_bound,
)

__all__ = ["CRASH_ENV", "TOTAL_STEPS", "TrialReporter", "TuneJob", "TuneSummary", "check_tune_config",
           "live_status", "load_tune_config", "run_trial", "run_tune", "trial_rows", "trial_status",
           "trial_steps_bound", "write_outputs"]
