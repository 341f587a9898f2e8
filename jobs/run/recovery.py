"""Automatic recovery: Ray Train restarts a failed worker group from the last complete
checkpoint (``train.max_failures`` times), and the user is told which rank failed, why,
and (through the workers' ``resumed`` event) the step training resumed at.

``FailureRelay`` runs in Ray Train's controller (a ``ray.train.UserCallback``). It sends
each failure to the driver through the run's progress queue, and it stops Ray from
retrying what a retry cannot fix: a failure while the workers set up (building the
model, restoring) that no lost worker explains, an error of a kind a retry would only
repeat (``FINAL``), or the same error from the same rank twice in a row. Those end the
run at once with the worker's own error instead of after ``max_failures`` identical
attempts.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from clray.jobs import events

try:  # Ray Train V2's controller-side callback interface
    from ray.train import UserCallback  # [ray]
except ImportError:  # pragma: no cover - Ray Train V1 has none; clray pins V2
    UserCallback = object  # type: ignore[assignment,misc]

SETUP_FAILED = "SetupError"
FINAL = ("RemineFailedError",)
"""Errors a retry cannot fix, by class name (``worker.RemineFailedError``: the plan the
next epoch needs failed to mine; a restarted group would wait for the same failure)."""


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


class PeerLostError(RuntimeError):
    """A rank's collective broke because another rank's process is gone: raised by the
    surviving rank (``Worker.watching_peers``) naming the lost one, so the failure is
    blamed on the rank that died, not on the one that noticed."""

    def __init__(self, lost_rank: int, message: str) -> None:
        super().__init__(message)
        self.lost_rank = lost_rank

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.lost_rank, str(self)))


_LOST = re.compile(r"worker rank (\d+) \(pid \d+ on [^)]*\) is gone")


def lost_rank(error: BaseException) -> int | None:
    """The rank a ``PeerLostError`` names (also read from its text, as Ray ships a
    worker's exception across processes)."""
    if isinstance(error, PeerLostError):
        return error.lost_rank
    found = _LOST.search(str(error))
    return int(found.group(1)) if found else None


def died(error: BaseException) -> bool:
    """Whether ``error`` says the worker process itself is gone (killed, out of memory,
    its node lost), as opposed to an exception its code raised."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ActorDiedError", "RayActorError", "WorkerCrashedError", "ActorUnavailableError",
                         "NodeDiedError", "OutOfMemoryError"})


def blame(worker_exceptions: dict[int, BaseException]) -> tuple[int, BaseException]:
    """The rank whose failure explains the others: a worker that died rather than one
    whose collective broke because a peer died (the lowest such rank); else the rank a
    survivor found gone (``PeerLostError``); else the lowest rank."""
    dead = sorted(rank for rank, error in worker_exceptions.items() if died(error))
    if dead:
        return dead[0], worker_exceptions[dead[0]]
    for _, error in sorted(worker_exceptions.items()):
        lost = lost_rank(error)
        if lost is not None:
            return lost, error
    rank = min(worker_exceptions)
    return rank, worker_exceptions[rank]


def summary(error: BaseException) -> str:
    """One line: the error's type and its last non-empty message line."""
    text = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {text[-1] if text else ''}".strip()


def _raised(error: BaseException, names: tuple[str, ...]) -> bool:
    """Whether ``error`` is (or, shipped across processes by Ray, names) one of the classes ``names``."""
    return any(cls.__name__ in names for cls in type(error).__mro__) or any(f"{n}:" in str(error) for n in names)


def _is_final(error: BaseException) -> bool:
    return _raised(error, FINAL)


def _is_setup_failure(error: BaseException) -> bool:
    return _raised(error, (SETUP_FAILED,))


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
        if not died(error) and _is_final(error):
            raise GaveUp(f"worker rank {rank} cannot go on: {line}", dict(worker_exceptions))
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


def peer_processes() -> list[tuple[str, int]]:
    """(host, pid) of every rank, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    me = (socket.gethostname(), os.getpid())
    if not (dist.is_available() and dist.is_initialized()):
        return [me]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, me)
    return [tuple(p) for p in out]


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextmanager
def watching_peers(peers: list[tuple[str, int]], rank: int) -> Iterator[None]:
    """A collective that fails because another rank's process is gone (killed, out of
    memory) becomes a ``PeerLostError`` naming that rank, where this node can see it."""
    try:
        yield
    except RuntimeError as exc:
        gone = [(r, host, pid) for r, (host, pid) in enumerate(peers)
                if r != rank and host == socket.gethostname() and not _alive(pid)]
        if not gone:
            raise
        lost, host, pid = gone[0]
        raise PeerLostError(lost, f"worker rank {lost} (pid {pid} on {host}) is gone; rank {rank} noticed it "
                                  f"in a collective: {type(exc).__name__}") from exc
