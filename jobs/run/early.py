"""An epoch's first batch fetched ahead, on a thread (``Worker.start_early``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from clray.jobs.run.schedule import TrainState


class EarlyStart:
    """An epoch's batches whose first is fetched on a thread from the moment this is made.
    Iterating waits for it (an error it raised is raised here), then the rest follow on
    the iterating thread: the generator never runs on two threads at once."""

    def __init__(self, batches: Iterator[dict[str, Any]], state: TrainState) -> None:
        self.batches, self.state = batches, state
        """The state the batches were started for (``epoch_batches`` reads it as it goes)."""
        self.first: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fetch, name="clray-first-batch", daemon=True)
        self.thread.start()

    def _fetch(self) -> None:
        try:
            self.first.append(next(self.batches))
        except StopIteration:
            pass
        except BaseException as exc:  # re-raised on the training thread, where it belongs
            self.error = exc

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        yield from self.first
        yield from self.batches
