"""Automatic recovery: Ray Train restarts a failed worker group from the last complete
checkpoint (``train.max_failures`` times), and the user is told which rank failed, why,
and (through the workers' ``resumed`` event) the step training resumed at.

``FailureRelay`` runs in Ray Train's controller (a ``ray.train.UserCallback``). It sends
each failure to the driver through the run's progress queue, and it stops Ray from
retrying what a retry cannot fix: a failure while the workers set up (building the
model, restoring) that no lost worker explains, or the same error from the same rank
twice in a row. Those end the run at once with the worker's own error instead of after
``max_failures`` identical attempts.
"""

from __future__ import annotations

from typing import Any

from clray.jobs import events

try:  # Ray Train V2's controller-side callback interface
    from ray.train import UserCallback  # [ray]
except ImportError:  # pragma: no cover - Ray Train V1 has none; clray pins V2
    UserCallback = object  # type: ignore[assignment,misc]

SETUP_FAILED = "SetupError"


class SetupError(RuntimeError):
    """A worker failed before training its first step of this start (building the
    model or engine, restoring): raised around the original error, which is its cause."""


class GaveUp(RuntimeError):  # noqa: N818 - the controller gives up on purpose
    """Raised in the controller to end a fit that retrying cannot save; carries the
    failing workers' errors like Ray's ``WorkerGroupError`` does."""

    def __init__(self, reason: str, worker_failures: dict[int, BaseException]) -> None:
        super().__init__(reason)
        self.worker_failures = worker_failures

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (str(self), self.worker_failures))


def died(error: BaseException) -> bool:
    """Whether ``error`` says the worker process itself is gone (killed, out of memory,
    its node lost), as opposed to an exception its code raised."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ActorDiedError", "RayActorError", "WorkerCrashedError", "ActorUnavailableError",
                         "NodeDiedError", "OutOfMemoryError"})


def blame(worker_exceptions: dict[int, BaseException]) -> tuple[int, BaseException]:
    """The rank whose failure explains the others: a worker that died rather than one
    whose collective broke because a peer died; the lowest such rank."""
    dead = sorted(rank for rank, error in worker_exceptions.items() if died(error))
    rank = dead[0] if dead else min(worker_exceptions)
    return rank, worker_exceptions[rank]


def summary(error: BaseException) -> str:
    """One line: the error's type and its last non-empty message line."""
    text = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {text[-1] if text else ''}".strip()


def _is_setup_failure(error: BaseException) -> bool:
    return any(cls.__name__ == SETUP_FAILED for cls in type(error).__mro__) or f"{SETUP_FAILED}:" in str(error)


class FailureRelay(UserCallback):
    """Tells the driver about every failure Ray Train handles, and ends the fit early
    when a retry would only repeat it."""

    def __init__(self, progress: Any, max_failures: int) -> None:
        self.progress = progress
        self.max_failures = max_failures
        self.failures = 0
        self.last: tuple[int, str] | None = None

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        """Called once per failed worker group (the poll that found it failed)."""
        self.failures += 1
        rank, error = blame(worker_exceptions)
        line = summary(error)
        if not died(error) and _is_setup_failure(error) and not any(died(e) for e in worker_exceptions.values()):
            raise GaveUp(f"worker rank {rank} failed while setting up: {line}", dict(worker_exceptions))
        if not died(error) and self.last == (rank, line):
            raise GaveUp(f"worker rank {rank} failed twice in a row with the same error: {line}",
                         dict(worker_exceptions))
        self.last = (rank, line)
        retrying = self.max_failures < 0 or self.failures <= self.max_failures
        if self.progress is not None:
            self.progress.put(events.FailureEvent(
                rank=rank, error=line, died=died(error), failures=self.failures, max_failures=self.max_failures,
                retrying=retrying, ranks={str(r): f"{type(e).__module__}.{summary(e)}"[:300]
                                          for r, e in sorted(worker_exceptions.items())}).record())
