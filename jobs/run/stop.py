"""Stopping a run on request: Ctrl-C (SIGINT) and SIGTERM (what a cluster sends a
preempted driver) are handled alike.

Before the workers train, a signal stops the start at once (nothing to save). While they
train, the first signal becomes a stop request: the driver puts it into a queue that
rank 0 polls, every rank learns it from one all-reduced flag at the same step
(``Worker.stop_requested`` and ``Cadence.after(stop=...)``), all ranks checkpoint there
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
