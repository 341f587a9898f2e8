"""The training loop that runs on every Ray Train worker.

Read top to bottom: build model and engine, restore, then per epoch take exactly
``steps_per_epoch`` batches from this worker's shard, step, report, checkpoint; at the
end evaluate and export. Every place the worker touches Ray is marked ``# [ray]``;
everything else is plain torch + DeepSpeed.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from clray.jobs.config import JobConfig
from clray.jobs.engine import build_engine, cast_batch, use_bf16

CHECKPOINT_TAG = "state"

RECORD_BATCHES_ENV = "CLRAY_RECORD_BATCHES"
"""Debugging aid: when this environment variable names a file, every worker appends one
JSON line per step there: rank, step, epoch, step_in_epoch and the sorted ``id_key``s of
its local batch (the int64 keys of ``pipelines.dataset.id_keys``). Off by default."""


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0


@dataclass
class Plan:
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
    stop_step: int | None = None
    """Stop here (checkpoint + export, no evaluation) and leave the rest of the run to a
    later start with the same run name; None: run to total_steps."""

    @property
    def dataset_names(self) -> list[str]:
        """The trainer's training datasets: "train", or "train_0", "train_1", ... per plan."""
        return [f"train_{i}" for i in range(self.num_plans)] if self.packed else ["train"]

    def train_dataset(self, epoch: int) -> str:
        """The dataset epoch ``epoch`` reads (packed plans are cycled through)."""
        names = self.dataset_names
        return names[epoch % len(names)]

    @property
    def end_step(self) -> int:
        """The step this start of the run ends at."""
        return self.total_steps if self.stop_step is None else min(self.stop_step, self.total_steps)


class ShardExhaustedError(RuntimeError):
    pass


class MetricWindow:
    """Accumulates per-step numbers between two reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.data_time = 0.0
        self.step_time = 0.0
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, float], data_time: float, step_time: float) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1
        self.data_time += data_time
        self.step_time += step_time

    def reduce(self, global_batch: int) -> dict[str, float]:
        """Average over steps and ranks (one small all_reduce)."""
        keys = sorted(self.sums)
        local = torch.tensor(
            [self.sums[k] / max(1, self.steps) for k in keys] + [self.data_time, self.step_time],
            dtype=torch.float64,
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local)
            local /= dist.get_world_size()
        out = {k: float(v) for k, v in zip(keys, local[: len(keys)], strict=True)}
        data_time, step_time = float(local[-2]), float(local[-1])
        elapsed = time.perf_counter() - self.started
        out["samples_per_s"] = global_batch * self.steps / max(elapsed, 1e-9)
        out["data_wait_fraction"] = data_time / max(step_time, 1e-9)
        return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_step(
    engine: Any, loss_fn: torch.nn.Module, batch: dict[str, Any], gradcache_chunk: int | None = None
) -> tuple[Any, float, float | None]:
    """One optimizer step: encode, loss over gathered candidates, backward, step.

    With ``gradcache_chunk`` the encoder runs in chunks of that many rows and their cached
    embedding gradients are backpropagated chunk by chunk (:mod:`models.gradcache`); the
    engine's gradient-accumulation boundary is set on the last chunk only, so ZeRO reduces
    and partitions the summed gradients once. That is not just cheaper: under ZeRO 1 and 2
    a parameter that gets no gradient in a boundary backward ends the step with a zero
    gradient, so a boundary on every chunk would silently drop the logit scale's gradient
    (it enters in the first chunk only). tests/test_gradcache_deepspeed.py checks the
    result equals the uncached step at ZeRO 0-3.

    Returns the loss output and the logit scale and bias the step used: under ZeRO-3
    those parameters are partitioned outside forward, so this is where they are readable."""
    from clray.models.gradcache import gradcache_step
    from clray.models.losses import apply_loss

    used: dict[str, Any] = {}

    def compute(encoded: Any) -> Any:
        used["scale"], used["bias"] = encoded.scale, encoded.bias
        return apply_loss(loss_fn, encoded, batch)

    if gradcache_chunk:
        if engine.gradient_accumulation_steps() != 1:
            # The chunks *are* the accumulation: one train_step is one optimizer step.
            raise ValueError(
                "gradcache needs DeepSpeed gradient_accumulation_steps = 1 (it sets the "
                f"accumulation boundary itself), got {engine.gradient_accumulation_steps()}"
            )

        def backward(surrogate: torch.Tensor, last: bool) -> None:
            engine.set_gradient_accumulation_boundary(last)
            engine.backward(surrogate)

        device = next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).device
        out = gradcache_step(engine, batch, gradcache_chunk, compute, backward, device=device)
    else:
        out = compute(engine(batch))
        engine.backward(out.loss)
    engine.step()
    bias = used["bias"]
    return out, float(used["scale"].detach().float()), None if bias is None else float(bias.detach().float())


def save_checkpoint(engine: Any, state: TrainState, rank: int, metrics: dict[str, Any]) -> None:
    """DeepSpeed writes its shards on every rank; Ray merges the ranks' directories."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="clray-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={"train_state": asdict(state)})
        torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
        ray.train.report(  # [ray]
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{state.step:08d}",
        )


def restore_checkpoint(engine: Any, checkpoint: Any, rank: int) -> TrainState:
    with checkpoint.as_directory() as path:
        _, client = engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
        rng_file = Path(path) / f"rng_rank{rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=False))
    if not client or "train_state" not in client:
        raise RuntimeError(f"checkpoint {checkpoint.path} has no clray train state: was it written by clray?")
    return TrainState(**client["train_state"])


def _next_batch(batches: Any, state: TrainState, plan: Plan, rank: int) -> dict[str, torch.Tensor]:
    try:
        return next(batches)
    except StopIteration:
        raise ShardExhaustedError(
            f"rank {rank}: the data shard ran out after {state.step_in_epoch} of "
            f"{plan.steps_per_epoch} batches in epoch {state.epoch}; the corpus changed since "
            "the driver counted it, or rows were lost in preprocessing"
        ) from None


def _unpacked(batches: Any) -> Any:
    """Packed mode: each torch batch is [1, B, ...] (one mined batch); drop the 1."""
    for batch in batches:
        yield {key: value[0] for key, value in batch.items()}


def _record_batch(path: str, rank: int, state: TrainState, batch: dict[str, Any]) -> None:
    line = {
        "rank": rank,
        "step": state.step + 1,
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "id_keys": sorted(int(k) for k in batch["id_key"].reshape(-1).tolist()),
    }
    # One short append per line: ranks writing the same file do not interleave lines.
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def _every(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def _checkpoint_step(checkpoint: Any) -> int:
    """The step a ``checkpoint_<step>`` directory (a path or a Ray Checkpoint) holds; -1 for
    none or a name without a step."""
    if checkpoint is None:
        return -1
    name = str(getattr(checkpoint, "path", checkpoint)).rstrip("/").rsplit("/", 1)[-1]
    prefix, _, step = name.rpartition("_")
    return int(step) if prefix == "checkpoint" and step.isdigit() else -1


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train  # [ray]

    cfg = JobConfig.model_validate(config["job"])
    plan = Plan(**config["plan"])
    progress = config.get("progress")
    ctx = ray.train.get_context()  # [ray]
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    if cfg.scaling.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()  # [ray]
    else:
        device = torch.device("cpu")
    bf16 = use_bf16(cfg)

    from clray.models.dual_encoder import DualEncoder
    from clray.models.losses import build_loss

    _seed_everything(cfg.run.seed)  # identical initial weights on every rank
    model = DualEncoder(cfg.model).to(device)
    loss_fn = build_loss(cfg.loss)
    gradcache_chunk = cfg.loss.chunk_size if cfg.loss.gradcache else None
    engine = build_engine(model, cfg, plan.total_steps)
    _seed_everything(cfg.run.seed + 7919 * (rank + 1))  # distinct dropout streams per rank

    def publish(item: dict[str, Any]) -> None:
        if rank == 0 and progress is not None:
            progress.put(item)

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()  # [ray]
    adopt = False
    start_from = config.get("start_from")
    if start_from and (checkpoint is None or _checkpoint_step(checkpoint) < _checkpoint_step(start_from)):
        # A new run that starts from another run's checkpoint (a PBT exploit), or this run
        # resumed at a checkpoint saved after the last one Ray Train registered. Once this
        # run has a later checkpoint of its own, a restart resumes that instead.
        from clray.pipelines import storage

        fs, inner = storage.filesystem(start_from, cfg.storage)
        checkpoint = ray.train.Checkpoint(inner, filesystem=fs)  # [ray]
        adopt = bool(config.get("adopt_config"))
    if checkpoint is not None:
        state = restore_checkpoint(engine, checkpoint, rank)
        if state.step_in_epoch >= plan.steps_per_epoch:
            # Saved at an epoch's last step: start the next epoch instead of reading this
            # one again only to skip all of it.
            state.epoch += 1
            state.step_in_epoch = 0
        publish({"event": "resumed", "step": state.step, "epoch": state.epoch,
                 "step_in_epoch": state.step_in_epoch, "dataset": plan.train_dataset(state.epoch)})

    # Only the start that restored the donor's checkpoint adopts; a later restart of this
    # run resumes its own checkpoints with what they hold.
    if adopt:
        adopt_config(engine, cfg)
        publish({"event": "adopted", "lr": cfg.optim.lr, "temperature": cfg.model.logit_scale.init_temperature})
    eval_shard = ray.train.get_dataset_shard("eval") if config.get("has_eval") else None  # [ray]

    shards: dict[str, Any] = {}
    record_path = os.environ.get(RECORD_BATCHES_ENV)
    window = MetricWindow()
    gb = cfg.train.global_batch_size
    end = plan.end_step
    while state.step < end:
        name = plan.train_dataset(state.epoch)
        if name not in shards:
            shards[name] = ray.train.get_dataset_shard(name)  # [ray]
        if plan.packed:
            # One row per mined batch: taken whole, never re-batched or shuffled here.
            batches = _unpacked(
                shards[name].iter_torch_batches(  # [ray]
                    batch_size=1,
                    drop_last=True,
                    prefetch_batches=cfg.data.prefetch_batches,
                    device=device,
                )
            )
        else:
            batches = iter(
                shards[name].iter_torch_batches(  # [ray]
                    batch_size=cfg.local_batch_size,
                    drop_last=True,
                    local_shuffle_buffer_size=plan.local_shuffle_buffer,
                    # data.deterministic: the same buffer order every run, a new one each epoch
                    local_shuffle_seed=(cfg.run.seed * 100_003 + state.epoch * 101 + rank)
                    if cfg.data.deterministic else None,
                    prefetch_batches=cfg.data.prefetch_batches,
                    device=device,
                )
            )
        # Mid-epoch resume: this epoch already consumed step_in_epoch batches per rank.
        for _ in range(state.step_in_epoch):
            _next_batch(batches, state, plan, rank)
        window.reset()
        while state.step_in_epoch < plan.steps_per_epoch and state.step < end:
            t0 = time.perf_counter()
            batch = cast_batch(_next_batch(batches, state, plan, rank), bf16)
            t1 = time.perf_counter()
            if record_path:
                _record_batch(record_path, rank, state, batch)
            engine.module.set_progress(state.step / max(1, plan.total_steps - 1))
            out, scale, bias = train_step(engine, loss_fn, batch, gradcache_chunk)
            t2 = time.perf_counter()
            state.step += 1
            state.step_in_epoch += 1
            state.samples_seen += gb
            window.add({"loss": out.loss.detach().float().item(), **out.metrics}, t1 - t0, t2 - t0)

            final = state.step == end
            metrics: dict[str, Any] = {}
            # The final step of a complete run is evaluated after the loop, once.
            if eval_shard is not None and _every(state.step, cfg.train.eval_every) and not (
                final and state.step >= plan.total_steps
            ):
                metrics.update(_evaluate_now(engine, cfg, eval_shard, device, bf16, state))
                publish({"event": "eval", **metrics})
            if state.step % cfg.train.log_every == 0 or final:
                metrics.update(window.reduce(gb))
                window.reset()
                metrics.update(
                    step=state.step,
                    epoch=state.epoch,
                    samples_seen=state.samples_seen,
                    temperature=1.0 / scale,
                    **({} if bias is None else {"logit_bias": bias}),
                    lr=float(engine.get_lr()[0]),
                )
                publish({"event": "train", **metrics})
            # Every rank takes the same branch: the decision depends on the step alone. The
            # final step always checkpoints, so a finished run (or one resumed at its end,
            # which skips this loop) always has its last state saved.
            if final or _every(state.step, cfg.train.checkpoint_every):
                save_checkpoint(engine, state, rank, metrics or {"step": state.step, "epoch": state.epoch})
                publish({"event": "checkpoint", "step": state.step})
            elif metrics.get("eval_rows") is not None or _every(state.step, cfg.train.report_every):
                ray.train.report(metrics or {"step": state.step, "epoch": state.epoch})  # [ray]
        if state.step_in_epoch >= plan.steps_per_epoch:
            for _ in batches:  # drain the remainder (< one batch) so the next epoch starts clean
                pass
            state.epoch += 1
            state.step_in_epoch = 0

    from clray.jobs.evaluate import evaluate

    complete = state.step >= plan.total_steps
    publish({"event": "end", "step": state.step, "epoch": state.epoch, "complete": complete})
    eval_metrics: dict[str, Any] = {"step": state.step, "epoch": state.epoch}
    # A run stopped early (stop_step) is evaluated when it completes, not at every stop.
    if eval_shard is not None and complete:
        eval_metrics.update(evaluate(engine.module, cfg, eval_shard, device, bf16))
        publish({"event": "eval", **eval_metrics})

    export_dir = config.get("export_dir")
    if export_dir:
        _export(engine, cfg, export_dir, rank)
        publish({"event": "exported", "path": export_dir})
    ray.train.report({**eval_metrics, "final": complete})  # [ray]


def _evaluate_now(
    engine: Any, cfg: JobConfig, eval_shard: Any, device: torch.device, bf16: bool, state: TrainState
) -> dict[str, Any]:
    """A mid-run evaluation (train.eval_every): every rank embeds the eval split (see
    jobs.evaluate), so this is a collective step like any other."""
    from clray.jobs.evaluate import evaluate

    return {"step": state.step, "epoch": state.epoch, **evaluate(engine.module, cfg, eval_shard, device, bf16)}


def adopt_config(engine: Any, cfg: JobConfig) -> None:
    """After restoring another run's checkpoint (a PBT exploit), take this config's learning
    rate and temperature instead of the checkpoint's: that is the perturbation.

    The LR keeps its place on the schedule (warmup/cosine position from the checkpoint);
    only the peak it scales changes. The temperature restarts at init_temperature, and a
    learnable one trains on from there."""
    import math

    schedule = engine.lr_scheduler
    factor = schedule.lr_lambdas[0](schedule.last_epoch)
    schedule.base_lrs = [cfg.optim.lr for _ in schedule.base_lrs]
    for group in engine.optimizer.param_groups:
        group["lr"] = cfg.optim.lr * factor
    if cfg.model.logit_scale.mode == "scheduled":
        return  # the schedule sets it each step from the config
    value = math.log(1.0 / cfg.model.logit_scale.init_temperature)
    param = engine.module.logit_scale
    if param.requires_grad:
        # ZeRO keeps an fp32 master copy of trained parameters and writes it back into the
        # model after each step: set that copy too, or the next step undoes the change.
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, torch.full((1,), value, dtype=torch.float32, device=param.device))
    if cfg.train.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            with torch.no_grad():
                param.fill_(value)
    else:
        with torch.no_grad():
            param.fill_(value)


def _export(engine: Any, cfg: JobConfig, export_dir: str, rank: int) -> None:
    """Rank 0 writes the HF-format export; under ZeRO-3 all ranks first gather the weights.
    An ``s3://`` export is written to a local temporary directory on rank 0's node and
    uploaded from there (the driver may be on another machine)."""
    from clray.models.export import export_model
    from clray.pipelines import storage

    def write() -> None:
        if not storage.is_s3(export_dir):
            export_model(engine.module, cfg.model, export_dir)
            return
        with tempfile.TemporaryDirectory(prefix="clray-export-") as tmp:
            local = export_model(engine.module, cfg.model, Path(tmp) / "export")
            storage.delete(export_dir, cfg.storage)  # no stale files from an earlier export
            storage.upload(local, export_dir, cfg.storage)

    if cfg.train.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                write()
    elif rank == 0:
        write()
    if dist.is_initialized():
        dist.barrier()
