"""What a worker logs between two logs: per-step metrics and where each step's time went,
averaged over the steps of the window and over the ranks (one small all-reduce)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from clray.jobs.run.engine import PhaseTimes

__all__ = ["PHASES", "MetricWindow"]


PHASES = ("data", "forward", "backward", "reduce", "optimizer", "other")
"""Where a training step's time goes, logged as ``time/<phase>`` (mean seconds per step,
averaged over ranks): waiting for the batch, forward (encoders and loss), backward
(without the gradient reduction), the gradient reduction DeepSpeed does at the end of
backward, the optimizer step (at ZeRO 1-2 with the gathering of updated parameters), and
the rest (evaluation, metric logging, checkpoints and reports to Ray). ``time/wall`` is
the wall time per step; the phases add up to it but for the loop's own bookkeeping."""


class MetricWindow:
    """Accumulates per-step numbers between two logs."""

    def __init__(self) -> None:
        self.times = PhaseTimes()
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.data_time = 0.0
        self.step_time = 0.0
        self.times.reset()
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, float], data_time: float, step_time: float) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1
        self.data_time += data_time
        self.step_time += step_time

    def phase_seconds(self) -> list[float]:
        """Seconds per step of each of ``PHASES`` (backward without its reduction)."""
        seconds = dict(self.times.seconds)
        seconds["backward"] = seconds.get("backward", 0.0) - seconds.get("reduce", 0.0)
        seconds["optimizer"] = seconds.get("step", 0.0)
        seconds["data"] = self.data_time
        return [seconds.get(name, 0.0) / max(1, self.steps) for name in PHASES]

    def reduce(self, global_batch: int) -> dict[str, float]:
        """Average over steps and ranks (one small all_reduce)."""
        keys = sorted(self.sums)
        elapsed = time.perf_counter() - self.started
        local = torch.tensor(
            [self.sums[k] / max(1, self.steps) for k in keys] + self.phase_seconds()
            + [elapsed / max(1, self.steps), self.data_time, self.step_time],
            dtype=torch.float64,
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local)
            local /= dist.get_world_size()
        out = {k: float(v) for k, v in zip(keys, local[: len(keys)], strict=True)}
        for name, value in zip((*PHASES, "wall"), local[len(keys):-2], strict=True):
            out[f"time/{name}"] = float(value)
        data_time, step_time = float(local[-2]), float(local[-1])
        out["samples_per_s"] = global_batch * self.steps / max(elapsed, 1e-9)
        out["data_wait_fraction"] = data_time / max(step_time, 1e-9)
        out["window_steps"] = self.steps
        return out
