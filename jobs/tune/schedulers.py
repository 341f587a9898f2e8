"""Tune's ASHA and PBT with a state that outlives the driver.

Tune saves its trials for ``--resume`` but never its scheduler: the scheduler a resumed
driver gets is the one pickled into ``tuner.pkl`` when the search started, empty. A
restored ASHA then judges the trials left only against each other; a restored PBT has
forgotten every trial's last score, its last perturbation and which trials held a
checkpoint to clone, so for a whole perturbation interval it decides on the trials that
reported since the resume alone (one trial: no decision at all) and cannot exploit a top
trial it has not seen report again.

Each scheduler here writes what it would lose to a file in the search directory after
every result that changed it (``SavedState``; on S3 the file is published there) and
reads it back in a resumed driver before its first decision. The files are pickled
unread into ``tuner.pkl`` with the scheduler, so only a resumed driver reads them.
"""

from __future__ import annotations

import json
from typing import Any

from clray.jobs.config.search import TuneJob

RUNGS_FILE = "asha_rungs.json"
"""ASHA's recorded results per rung and each trial's bracket (``resumable_asha``)."""

PBT_FILE = "pbt_state.json"
"""PBT's per-trial state: last score, last perturbation and train times, and whether it
held a checkpoint PBT may clone (``resumable_pbt``)."""


class SavedState:
    """One scheduler's state file in the search directory: read once, by a resumed driver
    (``load``), and written only when its content changed (``save``; most results change
    nothing, and on S3 each write is an upload)."""

    def __init__(self, job: TuneJob, name: str) -> None:
        self.job, self.name = job, name
        self.loaded = False  # pickled False into tuner.pkl: a resumed driver reads the file
        self.written = ""

    def load(self) -> dict[str, Any] | None:
        """The saved state, the first time only, when a file is there."""
        if self.loaded:
            return None
        self.loaded = True
        if not self.job.staging.pull(self.name):
            return None
        return json.loads((self.job.search_dir / self.name).read_text())

    def save(self, state: dict[str, Any]) -> None:
        text = json.dumps(state)
        if text != self.written:
            (self.job.search_dir / self.name).write_text(text)
            self.job.staging.publish(self.name)
            self.written = text


class _Kept:
    """What both schedulers do around Tune's own: read the saved state before their first
    decision (``_restore``) and save it after (``_save``)."""

    def _restore(self) -> None:
        raise NotImplementedError

    def _save(self) -> None:
        raise NotImplementedError

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._restore()
        super().on_trial_complete(tune_controller, trial, result)  # type: ignore[misc]
        self._save()


def resumable_asha(job: TuneJob, **kwargs: Any) -> Any:
    """Tune's ``ASHAScheduler(**kwargs)`` whose rungs, trial brackets and stopped trials
    are saved to ``RUNGS_FILE``; a trial it stopped that the resume starts again is
    stopped again at its first result."""
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(_Kept, ASHAScheduler):
        def __init__(self, job: TuneJob, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.saved = SavedState(job, RUNGS_FILE)
            self.stopped: set[str] = set()
            self.saved_brackets: dict[str, int] = {}  # trial -> bracket, as read back on a resume

        def _restore(self) -> None:
            saved = self.saved.load()
            if saved is None:
                return
            for bracket, rungs in zip(self._brackets, saved["rungs"], strict=True):  # the same config: pickled
                by_milestone = {milestone: values for milestone, values in rungs}
                for milestone, recorded in bracket._rungs:
                    recorded.update(by_milestone.get(milestone, {}))
            self.saved_brackets = saved["trials"]
            self.stopped = set(saved["stopped"])

        def _save(self) -> None:
            self.saved.save({"rungs": [[[m, dict(r)] for m, r in b._rungs] for b in self._brackets],
                             "trials": {t: self._brackets.index(b) for t, b in self._trial_info.items()},
                             "stopped": sorted(self.stopped)})

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            self._restore()
            super().on_trial_add(tune_controller, trial)
            index = self.saved_brackets.get(trial.trial_id)
            if index is not None:  # a trial from before the resume stays in its bracket
                self._trial_info[trial.trial_id] = self._brackets[index]

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            self._restore()
            if trial.trial_id in self.stopped:  # stopped before the kill, restarted by the resume
                return self.STOP
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == self.STOP:
                self.stopped.add(trial.trial_id)
            self._save()
            return decision

    return ResumableASHA(job, **kwargs)


PBT_FIELDS = ("last_score", "last_perturbation_time", "last_train_time")


def resumable_pbt(job: TuneJob, **kwargs: Any) -> Any:
    """Tune's ``PopulationBasedTraining(**kwargs)`` whose per-trial state is saved to
    ``PBT_FILE``. A trial restored by the resume gets back its last score and times; one
    that held a checkpoint for PBT to clone gets the checkpoint Tune restored it with (its
    latest), so it can be exploited before it reports again."""
    from ray.tune.schedulers import PopulationBasedTraining

    class ResumablePBT(_Kept, PopulationBasedTraining):
        def __init__(self, job: TuneJob, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.saved = SavedState(job, PBT_FILE)
            self.saved_trials: dict[str, dict[str, Any]] = {}

        def _restore(self) -> None:
            saved = self.saved.load()
            if saved is not None:
                self.saved_trials = saved["trials"]
                self._num_perturbations = saved["perturbations"]

        def _save(self) -> None:
            trials = {trial.trial_id: {**{f: getattr(state, f) for f in PBT_FIELDS},
                                       "checkpointed": state.last_checkpoint is not None}
                      for trial, state in self._trial_state.items()}
            self.saved.save({"trials": trials, "perturbations": self._num_perturbations})

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            self._restore()
            super().on_trial_add(tune_controller, trial)
            saved = self.saved_trials.get(trial.trial_id)
            if saved is not None:  # a trial from before the resume
                state = self._trial_state[trial]
                for name in PBT_FIELDS:
                    setattr(state, name, saved[name])
                if saved["checkpointed"]:
                    state.last_checkpoint = trial.checkpoint

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            self._restore()
            decision = super().on_trial_result(tune_controller, trial, result)
            self._save()
            return decision

    return ResumablePBT(job, **kwargs)
