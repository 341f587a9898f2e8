"""``clray tune``: a Ray Tune search over training-config keys, each trial a whole run."""

from clray.jobs.tune.search import (
    CRASH_ENV,
    TuneJob,
    TuneSummary,
    check_tune_config,
    load_tune_config,
    run_trial,
    run_tune,
    write_outputs,
)

__all__ = ["CRASH_ENV", "TuneJob", "TuneSummary", "check_tune_config", "load_tune_config", "run_trial", "run_tune",
           "write_outputs"]
