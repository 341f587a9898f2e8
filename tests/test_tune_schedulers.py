"""clray tune's schedulers across a killed driver (jobs/tune/schedulers.py): Tune saves its
trials but never its scheduler, so clray's ASHA and PBT keep their state in the search
directory. No Ray: the schedulers are pickled and restored as Tune's tuner.pkl does."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tune_configs import GOOD, PBT, TEMPERATURE, _search_toml, _write

from clray.jobs.tune import load_tune_config
from clray.pipelines.quickstart import write_quickstart_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quickstart")
    write_quickstart_corpus(out)
    return out


def test_asha_rungs_survive_a_killed_driver(tmp_path: Path, corpus: Path) -> None:
    """Tune saves its trials but not its scheduler: a resumed ASHA would judge the trials
    left only against each other. clray's ASHA keeps its rungs in the search directory."""
    from ray import cloudpickle
    from ray.tune.schedulers import TrialScheduler

    from clray.jobs.tune.driver import RUNGS_FILE, _scheduler

    job = load_tune_config(_write(tmp_path / "tune.toml", _search_toml(corpus, tmp_path, GOOD)))
    first = _scheduler(job, 24)
    first.set_search_properties("eval/zero_shot_accuracy", "max")
    saved = cloudpickle.dumps(first)  # what Tune's tuner.pkl holds: the scheduler before any result

    def trial(name: str) -> Any:
        return SimpleNamespace(trial_id=name)

    def result(step: int, accuracy: float) -> dict:
        return {"step": step, "eval/zero_shot_accuracy": accuracy}

    for name, accuracy in (("good", 0.27), ("strong", 0.35)):
        first.on_trial_add(None, trial(name))
        assert first.on_trial_result(None, trial(name), result(8, accuracy)) == TrialScheduler.CONTINUE
        first.on_trial_complete(None, trial(name), result(24, accuracy))
    # The driver dies here; a resumed one unpickles the scheduler Tune saved at the start.
    resumed = cloudpickle.loads(saved)
    resumed.on_trial_add(None, trial("weak"))
    assert resumed.on_trial_result(None, trial("weak"), result(8, 0.10)) == TrialScheduler.STOP
    # Killed again before Tune saved the stop: a second resume restarts the trial, and stops it again.
    again = cloudpickle.loads(saved)
    again.on_trial_add(None, trial("weak"))
    assert again.on_trial_result(None, trial("weak"), result(4, 0.10)) == TrialScheduler.STOP
    # Without the file, the resumed scheduler would let the weak trial go on (Tune's own ASHA).
    (job.search_dir / RUNGS_FILE).unlink()
    forgetful = cloudpickle.loads(saved)
    forgetful.on_trial_add(None, trial("weak"))
    assert forgetful.on_trial_result(None, trial("weak"), result(8, 0.10)) == TrialScheduler.CONTINUE


class _FakeTrial:
    """What PBT reads of a trial outside a running search (hashable, as Tune's trials are)."""

    def __init__(self, trial_id: str, config: dict, checkpoint: Any = None) -> None:
        self.trial_id, self.experiment_tag, self.checkpoint = trial_id, trial_id, checkpoint
        self.config, self.evaluated_params = dict(config), {}
        self.run_metadata = SimpleNamespace(checkpoint_manager=SimpleNamespace(
            checkpoint_config=SimpleNamespace(num_to_keep=4)))

    def is_finished(self) -> bool:
        return False


def test_pbt_state_survives_a_killed_driver(tmp_path: Path, corpus: Path) -> None:
    """A resumed PBT knows each trial's last score and perturbation and which trials held a
    checkpoint to clone, before any of them reports again; Tune's own forgets all three."""
    from ray import cloudpickle

    from clray.jobs.tune.driver import PBT_FILE, _scheduler

    job = load_tune_config(_write(tmp_path / "tune.toml", _search_toml(corpus, tmp_path, PBT)))
    first = _scheduler(job, 24)
    first.set_search_properties("eval/zero_shot_accuracy", "max")
    saved = cloudpickle.dumps(first)  # what Tune's tuner.pkl holds: the scheduler before any result
    controller = SimpleNamespace(search_alg=None)
    config = {TEMPERATURE: 0.1, "optim.lr": 1e-3}
    for name, score, checkpoint in (("weak", 0.10, None), ("strong", 0.35, "strong/checkpoint_00000008")):
        trial = _FakeTrial(name, config)
        first.on_trial_add(controller, trial)
        state = first._trial_state[trial]  # as PBT leaves it at its step-8 decision
        state.last_score, state.last_perturbation_time, state.last_train_time = score, 8, 8
        state.last_checkpoint = checkpoint
    first._save()
    assert json.loads((job.search_dir / PBT_FILE).read_text())["trials"]["strong"]["checkpointed"]

    # The driver dies; a resumed one unpickles the scheduler and Tune restores the trials.
    resumed = cloudpickle.loads(saved)
    weak, strong = _FakeTrial("weak", config), _FakeTrial("strong", config, checkpoint="restored-latest")
    for trial in (weak, strong):
        resumed.on_trial_add(controller, trial)
    assert resumed._trial_state[weak].last_score == pytest.approx(0.10)
    assert resumed._trial_state[strong].last_perturbation_time == 8
    assert resumed._trial_state[strong].last_checkpoint == "restored-latest"  # what an exploit clones
    assert resumed._trial_state[weak].last_checkpoint is None
    assert resumed._quantiles() == ([weak], [strong])  # the whole population, before anyone reports
    # Without the file (Tune's own PBT): no scores, so no quantiles and nothing to clone.
    (job.search_dir / PBT_FILE).unlink()
    forgetful = cloudpickle.loads(saved)
    for trial in (weak, strong):
        forgetful.on_trial_add(controller, trial)
    assert forgetful._quantiles() == ([], []) and forgetful._trial_state[strong].last_perturbation_time == 0
