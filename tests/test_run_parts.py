"""The parts of a training run that need no Ray: what the driver hands the workers, the
cadence every rank follows, and the events workers send back."""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest

from clray.jobs import events
from clray.jobs.cli import QUICKSTART_CONFIG
from clray.jobs.config import TrainConfig, load_config
from clray.jobs.run.cadence import Cadence
from clray.jobs.run.schedule import Schedule
from clray.jobs.run.worker import WorkerSpec

NON_DEFAULT = [
    "loss.gradcache=true", "loss.chunk_size=8", 'loss.mode="tiled"', "loss.block_size=16",
    "loss.hardness_beta=0.5", "optim.grad_clip=0.5", "train.report_every=3", "train.eval_every=5",
    "train.checkpoint_every=4", "data.deterministic=true", "run.seed=11", 'model.projection="mlp"',
]


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_workers_train_with_the_drivers_config_key_for_key() -> None:
    """What a worker validates from Ray's train_loop_config (pickled on the way, as Ray
    ships it) is the driver's resolved config, every key: none is dropped or defaulted."""
    cfg = load_config(QUICKSTART_CONFIG, NON_DEFAULT)
    schedule = Schedule(steps_per_epoch=11, total_steps=33, local_shuffle_buffer=2048, num_train_rows=1438)
    spec = WorkerSpec(job=cfg, schedule=schedule, has_eval=True, export_dir="/x/export", start_from="/y/ckpt",
                      adopt_config=True)
    worker_side = WorkerSpec.decode(pickle.loads(pickle.dumps(spec.encode())))
    driver, worker = flat(cfg.model_dump(mode="json")), flat(worker_side.job.model_dump(mode="json"))
    assert worker == driver
    for override in NON_DEFAULT:  # the keys the issue names really are set away from their defaults
        key, value = override.split("=", 1)
        assert str(driver[key]).lower().strip('"') == value.strip('"'), key
    assert worker_side.schedule == schedule
    assert (worker_side.has_eval, worker_side.export_dir, worker_side.start_from, worker_side.adopt_config) == (
        True, "/x/export", "/y/ckpt", True)


def cadence(**train: int) -> tuple[Cadence, Schedule]:
    schedule = Schedule(steps_per_epoch=10, total_steps=30, local_shuffle_buffer=None, num_train_rows=100)
    return Cadence(TrainConfig(**train), schedule, has_eval=True), schedule


def test_cadence_decides_from_the_step_alone() -> None:
    c, _ = cadence(log_every=4, eval_every=10, checkpoint_every=15, report_every=0)
    at = {step: c.after(step) for step in range(1, 31)}
    assert [s for s, a in at.items() if a.log] == [4, 8, 12, 16, 20, 24, 28, 30]
    # the last step of a complete run is evaluated once, at the end (evaluate_at_end)
    assert [s for s, a in at.items() if a.evaluate] == [10, 20]
    assert [s for s, a in at.items() if a.checkpoint] == [15, 30]
    # an evaluation is reported to Ray (for Tune's schedulers) unless a checkpoint carries it
    assert [s for s, a in at.items() if a.report] == [10, 20]
    assert c.evaluate_at_end(30) and not c.evaluate_at_end(29)


def test_cadence_of_a_start_that_stops_early() -> None:
    c, schedule = cadence(log_every=100, eval_every=10)
    schedule.stop_step = 20
    after = c.after(20)
    assert after.checkpoint and after.log and after.evaluate  # 20 < total: a mid-run evaluation
    assert not c.evaluate_at_end(20)  # the run is evaluated when a later start completes it


@pytest.mark.parametrize("event", [
    events.DataEvent(plan={"total_steps": 3}, quarantined=1, quarantine_path="q.parquet", reasons={"x": 1}),
    events.DataEvent(plan={}, quarantined=0, quarantine_path=None, reasons={}, packed={"plan_dir": "p"}),
    events.ResumedEvent(step=4, epoch=1, step_in_epoch=0, dataset="train"),
    events.TrainEvent(metrics={"loss": 2.5, "accuracy": 0.1}, step=4, epoch=0, samples_seen=512,
                      temperature=0.07, lr=1e-3),
    events.TrainEvent(metrics={"loss": 2.5}, step=4, epoch=0, samples_seen=512, temperature=0.1,
                      logit_bias=-10.0, lr=1e-3),
    events.EvalEvent(step=4, epoch=0, metrics={"eval_rows": 10, "eval/a2p_R@1": 0.5}),
    events.CheckpointEvent(step=4), events.EndEvent(step=4, epoch=0, complete=True),
    events.ExportedEvent(path="/e"), events.AdoptedEvent(lr=0.1, temperature=0.2),
    events.RemineEvent(epoch=1, teacher="/t"), events.ReminedEvent(epoch=1, plan="/p", statistics={"a": 1}),
])
def test_an_event_survives_its_record(event: events.Event) -> None:
    record = event.record()
    assert record["event"] == event.kind and "metrics" not in record
    again = events.parse({"time": 12.5, **record})
    assert type(again) is type(event) and again.time == 12.5
    assert asdict(again) == {**asdict(event), "time": 12.5}


def test_an_unknown_event_is_named() -> None:
    with pytest.raises(ValueError, match="unknown run event 'nope'"):
        events.parse({"event": "nope"})


def test_metric_window_says_where_a_steps_time_goes() -> None:
    """time/<phase>: mean seconds per step; backward is logged without the gradient
    reduction inside it; window_steps lets a reader add the windows up."""
    from clray.jobs.run.window import PHASES, MetricWindow

    window = MetricWindow()
    for _ in range(2):
        window.times.seconds["forward"] += 1.0
        window.times.seconds["backward"] += 3.0
        window.times.seconds["reduce"] += 0.5
        window.times.seconds["step"] += 0.25
        window.add({"loss": 1.0}, data_time=0.1, step_time=4.0)
    out = window.reduce(global_batch=8)
    assert out["window_steps"] == 2
    assert {f"time/{p}" for p in PHASES} | {"time/wall"} <= set(out)
    assert out["time/forward"] == 1.0 and out["time/backward"] == 2.5 and out["time/reduce"] == 0.5
    assert out["time/optimizer"] == 0.25 and abs(out["time/data"] - 0.1) < 1e-9
    window.reset()
    assert not window.times.seconds and window.steps == 0


def test_a_local_ray_runs_its_workers_at_normal_priority(ray_session: None) -> None:
    """Ray starts workers at nice 15; clray's local Ray at 0 (jobs.runtime.RAY_KNOBS), so a
    training worker is not the last to get the CPU on a shared machine."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)


def test_a_local_rays_processes_get_the_jobs_environment_without_a_runtime_env(ray_session: None) -> None:
    """A local Ray clray starts hands the job's variables to its processes through the
    raylet's environment, not a runtime_env (which makes every worker process start twice),
    and leaves the driver's own environment as it was; Ray Train's preemption watcher (an
    actor per worker group) is off on one node."""
    import os

    import ray

    @ray.remote(num_cpus=0)
    def seen() -> tuple[str | None, str | None, dict]:
        return (os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"),
                ray.get_runtime_context().runtime_env)

    address, watcher, runtime_env = ray.get(seen.remote())
    assert address is not None and address.startswith("http://127.0.0.1:")
    assert watcher == "0" and os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert not runtime_env.get("env_vars")
    assert "RAY_API_SERVER_ADDRESS" not in os.environ


def test_a_runs_channel_carries_progress_and_stops_in_one_actor(ray_session: None) -> None:
    """The run's progress and stop queues are two topics of one actor: each keeps its own
    order, a get waits up to its timeout and then raises queue.Empty, and a worker-side
    handle (pickled into the workers' spec) reaches the same queues."""
    import queue

    import ray

    from clray.jobs.runtime import run_channel

    progress, stop = run_channel({"num_cpus": 0})
    assert progress.actor._actor_id == stop.actor._actor_id
    assert progress.empty() and stop.empty()

    @ray.remote(num_cpus=0)
    def publish(box: bytes) -> None:
        for step in range(3):
            pickle.loads(box).put({"step": step})

    ray.get(publish.remote(pickle.dumps(progress)))
    stop.put("SIGTERM")
    assert [progress.get(timeout=5)["step"] for _ in range(3)] == [0, 1, 2]
    assert not stop.empty() and stop.get(timeout=1) == "SIGTERM" and stop.empty()
    with pytest.raises(queue.Empty):
        progress.get(timeout=0.2)
    ray.kill(progress.actor)


def test_every_process_builds_deepspeeds_op_with_the_ninja_pip_installed_beside_it(tmp_path: Path) -> None:
    """jobs.runtime.own_op_builds: whatever PATH a process starts with, the ``ninja`` torch
    finds is the one installed with the ``ninja`` package (two ninja versions each rebuild
    the other's op)."""
    import importlib.util
    import subprocess
    import sys

    code = "import shutil; from clray.jobs.runtime import own_op_builds; own_op_builds(); print(shutil.which('ninja'))"
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    ninja = subprocess.run([sys.executable, "-c", code], env=bare, capture_output=True, text=True, check=True).stdout.strip()
    package = Path(importlib.util.find_spec("ninja").origin).resolve()
    assert Path(ninja).parent == package.parents[4] / "bin"


def test_ray_is_the_release_its_knobs_were_checked_against() -> None:
    """Private Ray APIs and knobs (jobs.runtime.RAY_KNOBS, RAY_PRIVATE_APIS) were checked
    against one Ray release: a different one must be checked again before it is used."""
    import ray

    from clray.jobs.runtime import RAY_KNOBS, RAY_PRIVATE_APIS, RAY_VERSION_CHECKED

    assert ray.__version__ == RAY_VERSION_CHECKED
    assert all(why for why in {**RAY_KNOBS, **RAY_PRIVATE_APIS}.values())


def test_the_baseline_and_the_selection_are_decided_from_the_step_and_the_figures() -> None:
    from clray.jobs.run.cadence import Selection
    from clray.jobs.run.schedule import TrainState

    schedule = Schedule(steps_per_epoch=10, total_steps=30, local_shuffle_buffer=None, num_train_rows=100)
    plain = Cadence(TrainConfig(eval_every=10), schedule, has_eval=True)
    assert plain.evaluate_at_start(0) and not plain.evaluate_at_start(3)  # a resumed run has its baseline
    assert not Cadence(TrainConfig(eval_at_start=False), schedule, has_eval=True).evaluate_at_start(0)
    assert not Cadence(TrainConfig(), schedule, has_eval=False).evaluate_at_start(0)
    # with select_by the last step is evaluated in the loop, like any evaluation that may be the best
    picking = Cadence(TrainConfig(eval_every=10, select_by="eval/a2p_R@1"), schedule, has_eval=True)
    assert picking.after(30).evaluate and not picking.evaluate_at_end(30)
    assert not plain.after(30).evaluate and plain.evaluate_at_end(30)

    state, selection = TrainState(), Selection(TrainConfig(select_by="eval/a2p_R@1"))
    state.step = 10
    assert selection.consider(state, {"eval/a2p_R@1": 0.5})
    state.step = 20
    assert not selection.consider(state, {"eval/a2p_R@1": 0.4})
    state.step = 30
    assert selection.consider(state, {"eval/a2p_R@1": 0.6}) and (state.best_step, state.best_value) == (30, 0.6)
    lower, fresh = Selection(TrainConfig(select_by="eval/alignment", select_mode="min")), TrainState()
    assert lower.consider(fresh, {"eval/alignment": 0.5})
    assert not lower.consider(fresh, {"eval/alignment": 0.6})
    assert lower.consider(fresh, {"eval/alignment": 0.4})


class _StopQueue:
    """The driver's stop queue as rank 0's watcher sees it: a request is pending once the
    file exists (rank 0's loop writes it at a chosen step)."""

    def __init__(self, flag_file: str) -> None:
        self.flag_file = flag_file

    def empty(self) -> bool:
        import os

        return not os.path.exists(self.flag_file)


def _stop_worker(rank: int, port: int, out_dir: str) -> None:
    import time
    from pathlib import Path

    import torch
    from process_group import init_gloo

    from clray.jobs.run.stop import StopAgreement

    init_gloo(rank, 2, port)
    flag_file = str(Path(out_dir) / "stop-requested")
    stops = StopAgreement(_StopQueue(flag_file), rank, torch.device("cpu"), poll_s=0.005)  # only rank 0 watches it
    answers = []
    for step in range(1, 200):
        time.sleep(0.01 if rank == 0 else 0.003)  # unequal steps: the ranks drift apart
        if rank == 0 and step == 5:
            Path(flag_file).touch()
            while not stops.requested:  # the watcher saw it (within a poll or two)
                time.sleep(0.001)
            seen_at = step
        answers.append(stops.after_step())
        if answers[-1]:
            break
    stops.close()
    torch.save({"answers": answers, "seen_at": seen_at if rank == 0 else None}, Path(out_dir) / f"rank{rank}.pt")


def test_every_rank_stops_at_the_same_step_one_after_rank_0_saw_the_request(tmp_path) -> None:  # noqa: ANN001
    """The stop flag is all-reduced without waiting (jobs.run.stop.StopAgreement): the flag
    started after step s is read after step s + 1, so rank 0's request stops every rank
    at the same step, one step later, and a step never waits for the queue."""
    from process_group import free_port, spawn_ranks

    rank0, rank1 = spawn_ranks(_stop_worker, (free_port(), str(tmp_path)), 2, tmp_path, timeout_s=120)
    seen = rank0["seen_at"]
    assert rank0["answers"] == rank1["answers"] == [False] * seen + [True]


def test_without_a_stop_queue_no_rank_stops_or_all_reduces() -> None:
    import torch

    from clray.jobs.run.stop import StopAgreement

    stops = StopAgreement(None, 0, torch.device("cpu"), poll_s=0.01)
    assert [stops.after_step() for _ in range(3)] == [False] * 3 and stops._pending is None
    stops.close()


def test_a_rank_waiting_for_an_overlapped_plan_takes_it_fails_with_the_reason_or_stops(ray_session: None,
                                                                                        monkeypatch) -> None:  # noqa: ANN001
    """remine.overlap: a rank at a boundary whose plan is not mined yet polls the driver's
    board until the plan is there, raises the miner's reason when it failed, and gives up
    (None) when a stop is asked for while it waits; a start stopped there checkpoints
    the step it stopped at, unless that step has a checkpoint already."""
    import threading
    import time
    from types import SimpleNamespace

    import ray
    import torch

    from clray.jobs.run import replan, worker
    from clray.jobs.run.overlap import PlanBoard

    monkeypatch.setattr(replan, "POLL_WAIT_S", 0.02)
    board = ray.remote(num_cpus=0)(PlanBoard).remote()
    stops = SimpleNamespace(requested=False)
    rank = SimpleNamespace(rank=0, device=torch.device("cpu"), stops=stops, spec=SimpleNamespace(board=board, packed=None))
    plans = replan.EpochPlans(rank)

    def later(action) -> None:  # noqa: ANN001
        threading.Timer(0.3, action).start()

    later(lambda: board.put.remote(1, "plan mined at 1"))
    started = time.monotonic()
    assert plans._wait(1) == "plan mined at 1" and time.monotonic() - started >= 0.3
    ray.get(board.fail.remote(2, "the teacher at epoch 2 could not be read"))
    with pytest.raises(replan.RemineFailedError, match="teacher at epoch 2"):
        plans._wait(2)
    later(lambda: setattr(stops, "requested", True))
    started = time.monotonic()
    assert plans._wait(3) is None and time.monotonic() - started >= 0.3
    ray.kill(board)

    saved = []
    for saved_step in (6, 7):
        state = SimpleNamespace(step=7)
        stopped = SimpleNamespace(
            plans=SimpleNamespace(begin=lambda engine, state: False), saved_step=saved_step,
            checkpoint=lambda engine, state: saved.append(state.step),
            schedule=SimpleNamespace(end_step=20), cfg=SimpleNamespace(loss=SimpleNamespace(gradcache=False)))
        assert worker._train(stopped, None, None, state, None, None, None) is True
    assert saved == [7]  # once: the second start had checkpointed step 7 already
