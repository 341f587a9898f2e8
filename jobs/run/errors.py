"""What can stop a training run, as the exceptions the CLI turns into exit codes.

Every ``RunError`` carries a message written for the user (the path or key involved and
what to do); ``clray`` prints it without a traceback and exits 2. ``RunStopped`` is not
an error: the run stopped because it was asked to (Ctrl-C, SIGTERM) and left a state
that the same command resumes; the CLI exits 130 or 143 for it.
"""

from __future__ import annotations


class RunError(Exception):
    """A run that cannot start or go on; the message is meant for the user as-is."""


class TrainingError(RunError):
    """A run that failed after it started; the message is meant for the user as-is."""


class RunDirError(RunError):
    """The run directory cannot be used (not a directory, not writable, ...)."""


class RunLockedError(RunError):
    """Another start of the same run holds its lock."""


class ResumeError(RunError):
    """The run's checkpoints cannot be resumed with this config (refused before Ray starts)."""


class CheckpointDamagedError(RuntimeError):
    """Raised on the workers when the checkpoint chosen for a restore fails its check;
    its commit marker has been set aside, so the next attempt picks the one before."""


class RunStopped(Exception):  # noqa: N818 - a stop on request, not an error
    """The run stopped because it was asked to (``signal_name``: SIGINT or SIGTERM).

    ``step`` and ``checkpoint``: where it stopped and the checkpoint saved there (a
    graceful stop); both None when it stopped at once, before training started or on a
    second signal (``during_training``), in which case it resumes from its newest
    complete checkpoint."""

    def __init__(self, signal_name: str, step: int | None = None, checkpoint: str | None = None,
                 during_training: bool = False) -> None:
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint
        if step is not None:
            text = (f"stopped ({signal_name}) at step {step}; {checkpoint or 'its checkpoint'} holds the state. "
                    "Start the same command again to resume there: nothing trained is lost.")
        elif during_training:
            text = (f"stopped at once (a second {signal_name}). Start the same command again to resume from the "
                    "newest complete checkpoint.")
        else:
            text = f"stopped ({signal_name}) before training started."
        super().__init__(text)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 143 if self.signal_name == "SIGTERM" else 130
