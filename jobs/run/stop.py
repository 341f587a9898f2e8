"""Stopping a run on request: Ctrl-C (SIGINT) and SIGTERM (what a cluster sends a
preempted driver) are handled alike.

Before the workers train, a signal stops the start at once (nothing to save). While they
train, the first signal becomes a stop request: the driver puts it into a queue that
rank 0 watches, every rank learns it from an all-reduced flag at the same step
(``StopAgreement`` and ``Cadence.after(stop=...)``), all ranks checkpoint there
and end, and the driver raises ``RunStopped`` naming the checkpoint; the same command
resumes from it. A second signal does not wait: the driver exits at once and the run
later resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from clray.jobs.run.errors import RunStopped

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """The driver's signal handlers for one run (installed only on the main thread: a run
    inside a Tune trial is stopped by Tune)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.training = False
        """Set while the workers train: a first signal then asks them to stop."""
        self.forwarded = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def reinstall(self) -> None:
        """Install the handlers again: ``ray.init`` installs Ray's own for SIGTERM (which
        dumps a stack and aborts, exit -6) over them."""
        if self._previous:
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None and self.training:
            self.signal_name = name  # the fit thread's driver loop forwards it to the workers
            return
        # Before training there is nothing to save; a second signal does not wait.
        raise RunStopped(self.signal_name or name, during_training=self.training)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def forward(self, queue: Any) -> bool:
        """Put a pending request into the workers' stop queue once; True when it did."""
        if self.signal_name is None or self.forwarded or queue is None:
            return False
        queue.put(self.signal_name)
        self.forwarded = True
        return True


class StopAgreement:
    """The workers' side: every rank learns a stop request at the same step, and no step
    waits for it.

    Rank 0 watches the driver's stop queue from a thread (one Ray call every ``poll_s``).
    After every step each rank starts an all-reduce (MAX) of rank 0's flag and does not
    wait for it; the one started after step s is read after step s + 1, by when it has
    long arrived. So all ranks stop at the same step, one step after rank 0 saw the
    request, and a step pays no round trip to the queue or to the other ranks (the
    blocking version cost every rank one all-reduce per step, and rank 0 a Ray call
    every ``poll_s``, which the others waited for at the next collective).

    Without a queue (a Tune trial is stopped by Tune), no rank starts any all-reduce."""

    def __init__(self, queue: Any, rank: int, device: Any, poll_s: float) -> None:
        self.queue = queue
        self.device = device
        self._seen = threading.Event()
        self._done = threading.Event()
        self._pending: tuple[Any, Any] | None = None
        if queue is not None and rank == 0:
            threading.Thread(target=self._watch, args=(poll_s,), name="clray-stop-poll", daemon=True).start()

    @property
    def requested(self) -> bool:
        """Rank 0: whether its watch has seen a stop request (False on every other rank)."""
        return self._seen.is_set()

    def _watch(self, poll_s: float) -> None:
        while not self._done.wait(poll_s):
            try:
                if not self.queue.empty():  # [ray]
                    self._seen.set()
                    return
            except Exception:  # noqa: BLE001 - the driver is gone: Ray Train ends this worker
                return

    def after_step(self) -> bool:
        """Whether every rank stops now (the same answer on every rank, at every step)."""
        import torch
        import torch.distributed as dist

        if self.queue is None:
            return False
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested

        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item() > 0)
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.device)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return agreed

    def close(self) -> None:
        """Wait for the all-reduce in flight (every rank started it) and end the watch."""
        self._done.set()
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
