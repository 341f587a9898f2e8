"""What every rank must agree on before a run starts, and where a rank is in it.

The driver fixes the ``Schedule`` from the valid-row count (examples) or the mined plan
(packed) and hands the same one to every worker: a rank that ran a different number of
steps would leave the others waiting in a collective for ever.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Schedule:
    """Decided on the driver so every rank agrees: no rank can run a different count."""

    steps_per_epoch: int
    total_steps: int
    """Steps of the whole run: what the LR schedule spans."""
    local_shuffle_buffer: int | None
    num_train_rows: int
    packed: bool = False
    """Mined packed batches: each dataset row is one whole local batch."""
    num_plans: int = 1
    """Packed: epoch plans, one dataset each; epoch e reads plan e % num_plans."""
    global_batches: bool = False
    """Packed plans of global batches: every rank reads each plan itself (its own part of
    every batch, in step order), so the trainer splits no training dataset."""
    stop_step: int | None = None
    """Stop here (checkpoint + export, no evaluation) and leave the rest of the run to a
    later start with the same run name; None: run to total_steps."""
    remainder_rows: int = 0
    """Examples: valid rows beyond the last full global batch, left out of each epoch."""

    def train_dataset(self, epoch: int) -> str:
        """The name of the data epoch ``epoch`` reads (packed plans are cycled through)."""
        return f"train_{epoch % self.num_plans}" if self.packed else "train"

    @property
    def end_step(self) -> int:
        """The step this start of the run ends at."""
        return self.total_steps if self.stop_step is None else min(self.stop_step, self.total_steps)


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    best_value: float | None = None
    """With train.select_by: the best evaluation so far, and the step it was at (so a
    resumed run keeps choosing against what the run already saw)."""
    best_step: int | None = None

    def advance(self, samples: int) -> None:
        self.step += 1
        self.step_in_epoch += 1
        self.samples_seen += samples

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
