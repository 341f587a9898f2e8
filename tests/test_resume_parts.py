"""The parts of "kill anything, lose nothing" that need no Ray: commit markers and the
scan for the newest complete checkpoint, Ray's registry moved aside, checkpoint
retention, the run lock, stop requests and their exit codes, the cadence's stop, what
the controller's failure relay tells the driver, and the run directory checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clray.jobs import events
from clray.jobs.cli import QUICKSTART_CONFIG
from clray.jobs.config import TrainConfig, load_config
from clray.jobs.run import commit as commits
from clray.jobs.run.cadence import Cadence
from clray.jobs.run.commit import (
    Commit,
    complete_checkpoints,
    mark_damaged,
    prune,
    read_consumed,
    write_commit,
)
from clray.jobs.run.errors import ResumeError, RunDirError, RunLockedError, RunStopped
from clray.jobs.run.ingest import drop_rows, reads_remainder
from clray.jobs.run.location import check_local_run_dir, checkpoint_name
from clray.jobs.run.lock import LOCK, RunLock
from clray.jobs.run.recovery import FailureRelay, GaveUp, SetupError, blame
from clray.jobs.run.resume import (
    RAY_REGISTRY,
    ResumePoint,
    check_ray_registry,
    check_resumable,
    resume_point,
)
from clray.jobs.run.schedule import Schedule
from clray.jobs.run.stop import StopRequests


def fake_checkpoint(run: Path, step: int, *, epoch: int = 0, in_epoch: int | None = None, world: int = 2,
                    consumed: dict[int, list[int]] | None = None, commit: bool = True) -> Path:
    """A checkpoint directory as the workers leave it: DeepSpeed's files, per-rank RNG and
    consumed ids, and (``commit``) the marker rank 0 writes last."""
    path = run / checkpoint_name(step)
    (path / "state").mkdir(parents=True)
    (path / "state" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(300))
    for rank in range(world):
        (path / "state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(200))
        (path / f"rng_rank{rank}.pt").write_bytes(os.urandom(50))
        np.save(path / commits.consumed_name(rank), np.asarray((consumed or {}).get(rank, []), dtype=np.int64))
    if commit:
        write_commit(str(path), Commit(step=step, epoch=epoch, step_in_epoch=step if in_epoch is None else in_epoch,
                                       samples_seen=step * 128, world_size=world, zero_stage=2,
                                       global_batch_size=128, steps_per_epoch=11))
    return path


def test_only_committed_checkpoints_that_still_match_their_marker_count(tmp_path: Path) -> None:
    for step in (4, 8, 12):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 16, commit=False)  # killed while it was written
    complete, skipped = complete_checkpoints(str(tmp_path))
    assert [c.step for c in complete] == [12, 8, 4]
    assert [(c.step, c.problem) for c in skipped] == [(16, "it has no commit marker (it was being written when "
                                                            "the run stopped)")]
    # A shard cut short and a file deleted: neither is a checkpoint any more.
    shard = tmp_path / checkpoint_name(12) / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:77])
    (tmp_path / checkpoint_name(8) / "rng_rank0.pt").unlink()
    complete, skipped = complete_checkpoints(str(tmp_path))
    assert [c.step for c in complete] == [4]
    problems = {c.step: c.problem for c in skipped}
    assert problems[12] == "state/zero_pp_rank_1_mp_rank_00_optim_states.pt has 77 bytes, 200 were written"
    assert problems[8] == "rng_rank0.pt is missing"
    point = resume_point(str(tmp_path), None)
    assert point is not None and point.commit.step == 4


def test_a_checkpoint_that_fails_on_the_workers_is_set_aside(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8)
    mark_damaged(str(tmp_path / checkpoint_name(8)), "state/x.pt: its member fails its CRC check")
    complete, skipped = complete_checkpoints(str(tmp_path))
    assert [c.step for c in complete] == [4]
    assert skipped[0].problem == "it failed its check when it was last restored"
    record = json.loads((tmp_path / checkpoint_name(8) / commits.DAMAGED).read_text())
    assert record["damaged"].endswith("CRC check") and record["step"] == 8


def test_resume_position_and_the_rows_a_resumed_epoch_leaves_out(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 15, epoch=1, in_epoch=4, consumed={0: [5, 1], 1: [9, 5]})
    point = resume_point(str(tmp_path), None)
    assert point is not None and point.position() == (1, 4)
    assert read_consumed(point.uri, point.commit).tolist() == [1, 5, 9]
    # Saved at an epoch's last step: training continues at the next epoch's start.
    end = ResumePoint("x", Commit(step=11, epoch=0, step_in_epoch=11, samples_seen=0, world_size=2, zero_stage=2,
                                  global_batch_size=128, steps_per_epoch=11))
    assert end.position() == (1, 0)
    # A replayable order skips; otherwise (or with another worker count) the remainder is read.
    assert not reads_remainder(point, world_size=2, deterministic=True)
    assert reads_remainder(point, world_size=2, deterministic=False)
    assert reads_remainder(point, world_size=1, deterministic=True)
    assert not reads_remainder(end, world_size=2, deterministic=False)
    batch = {"id_key": np.array([1, 2, 5, 7]), "anchor_x": np.arange(8).reshape(4, 2)}
    kept = drop_rows(batch, np.array([1, 5, 9]))
    assert kept["id_key"].tolist() == [2, 7] and kept["anchor_x"].tolist() == [[2, 3], [6, 7]]


def test_start_from_another_run_only_when_it_is_newer_and_complete(tmp_path: Path) -> None:
    own, donor = tmp_path / "own", tmp_path / "donor"
    fake_checkpoint(own, 8)
    fake_checkpoint(donor, 12)
    point = resume_point(str(own), str(donor / checkpoint_name(12)))
    assert point is not None and point.foreign and point.commit.step == 12
    fake_checkpoint(own, 16)
    point = resume_point(str(own), str(donor / checkpoint_name(12)))
    assert point is not None and not point.foreign and point.commit.step == 16
    fake_checkpoint(donor, 20, commit=False)
    with pytest.raises(ResumeError, match="no commit marker"):
        resume_point(str(own), str(donor / checkpoint_name(20)))


def test_a_config_the_checkpoint_cannot_resume_is_refused_before_ray(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 8)
    point = resume_point(str(tmp_path), None)
    assert point is not None
    stage2 = "train.zero_stage=2"  # the stage the fake checkpoint was written with
    cfg = load_config(QUICKSTART_CONFIG, [stage2])
    assert check_resumable(cfg, point) is False
    assert check_resumable(load_config(QUICKSTART_CONFIG, ["scaling.num_workers=1", stage2]), point) is True
    with pytest.raises(ResumeError, match=r"train.zero_stage = 2, this config has 3: set train.zero_stage = 2"):
        check_resumable(load_config(QUICKSTART_CONFIG, ["train.zero_stage=3"]), point)
    # "auto" settles to 0 on CPU: a run written at 2 (the default before "auto") says how to resume it.
    with pytest.raises(ResumeError, match=r"train.zero_stage = 2, this config has 0: set train.zero_stage = 2"):
        check_resumable(load_config(QUICKSTART_CONFIG), point)
    with pytest.raises(ResumeError, match=r"global_batch_size = 128, this config has 64"):
        check_resumable(load_config(QUICKSTART_CONFIG, ["train.global_batch_size=64", stage2]), point)


def test_a_damaged_ray_registry_is_moved_aside_with_a_warning(tmp_path: Path) -> None:
    import ray

    fake_checkpoint(tmp_path, 4)
    registry = tmp_path / RAY_REGISTRY
    good = {"ray_version": ray.__version__, "checkpoint_results": [{"checkpoint_dir_name": checkpoint_name(4)}]}
    registry.write_text(json.dumps(good))
    assert check_ray_registry(str(tmp_path)) == ({checkpoint_name(4)}, None)
    registry.write_text(json.dumps(good)[:40])  # cut short by a kill
    names, warning = check_ray_registry(str(tmp_path))
    assert names == set() and not registry.exists()
    assert warning is not None and "unreadable" in warning and "nothing is lost" in warning
    assert len(list(tmp_path.glob(f"{RAY_REGISTRY}.damaged-*"))) == 1
    registry.write_text(json.dumps({**good, "checkpoint_results": [{"checkpoint_dir_name": checkpoint_name(9)}]}))
    _, warning = check_ray_registry(str(tmp_path))
    assert warning is not None and f"lists {checkpoint_name(9)}, which no longer exist" in warning


def test_prune_removes_what_killed_starts_left_but_never_what_ray_lists(tmp_path: Path) -> None:
    for step in (4, 8, 12, 16, 20):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 6, commit=False)
    gone = prune(str(tmp_path), keep=2, protected={checkpoint_name(4)})
    assert sorted(Path(g).name for g in gone) == [checkpoint_name(s) for s in (6, 8, 12)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(s) for s in (4, 16, 20)]


def test_one_start_per_run_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    first = RunLock(str(tmp_path)).acquire()
    with pytest.raises(RunLockedError) as info:
        RunLock(str(tmp_path)).acquire()
    message = str(info.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "another run.name" in message
    first.release()
    assert not (tmp_path / LOCK).exists()
    # A driver killed with its lock held: the next start takes the lock over and says so.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "command": "clray train x",
                                             "started": time.time(), "heartbeat": time.time()}))
    taken = RunLock(str(tmp_path)).acquire()
    assert taken.warning is not None and f"process {pid} no longer exists" in taken.warning
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    taken.release()
    # Another host's lock that stopped refreshing is stale too.
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "command": "clray train x",
                                             "started": 0.0, "heartbeat": time.time() - 3600}))
    taken = RunLock(str(tmp_path)).acquire()
    assert taken.warning is not None and "not refreshed it for" in taken.warning
    taken.release()


def test_stop_requests_and_their_exit_codes() -> None:
    assert RunStopped("SIGTERM", 40, "runs/q/checkpoint_00000040").exit_code == 143
    assert RunStopped("SIGINT").exit_code == 130
    assert "checkpoint_00000040 holds the state" in str(RunStopped("SIGTERM", 40, "runs/q/checkpoint_00000040"))
    with StopRequests() as stops:
        with pytest.raises(RunStopped, match="before training started"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        stops.training = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stops.signal_name == "SIGTERM"
        sent: list[str] = []

        class Queue:
            def put(self, item: str) -> None:
                sent.append(item)

        assert stops.forward(Queue()) and not stops.forward(Queue())
        assert sent == ["SIGTERM"]
        with pytest.raises(RunStopped, match="at once"):  # a second signal does not wait
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signal.SIGTERM))


def test_the_cadence_checkpoints_where_a_stop_was_agreed() -> None:
    schedule = Schedule(steps_per_epoch=10, total_steps=30, local_shuffle_buffer=None, num_train_rows=100)
    c = Cadence(TrainConfig(checkpoint_every=20, eval_every=7, log_every=5), schedule, has_eval=True)
    assert not c.after(7).stop and not c.after(7).checkpoint
    stopped = c.after(7, stop=True)
    assert stopped.stop and stopped.checkpoint and stopped.log and not stopped.evaluate


class _Queue:
    def __init__(self) -> None:
        self.items: list[dict] = []

    def put(self, item: dict) -> None:
        self.items.append(item)


class ActorDiedError(Exception):
    """Named like Ray's: a worker process that is gone."""


def test_the_failure_relay_names_the_rank_that_died_and_gives_up_on_repeats() -> None:
    died = {0: RuntimeError("gloo: Connection closed by peer"), 1: ActorDiedError("The actor died unexpectedly")}
    assert blame(died)[0] == 1
    queue = _Queue()
    relay = FailureRelay(queue, max_failures=2)
    relay.after_exception(None, died)
    event = events.parse(queue.items[0])
    assert len(queue.items) == 1 and isinstance(event, events.FailureEvent)
    assert (event.rank, event.died, event.retrying, event.failures) == (1, True, True, 1)
    with pytest.raises(GaveUp, match="while setting up"):
        relay.after_exception(None, {0: SetupError("ValueError: no-such-architecture")})
    relay = FailureRelay(_Queue(), max_failures=5)
    relay.after_exception(None, {1: ValueError("nan loss at step 40")})
    with pytest.raises(GaveUp, match="twice in a row") as info:
        relay.after_exception(None, {1: ValueError("nan loss at step 40 ")})
    assert set(info.value.worker_failures) == {1}


def test_a_survivor_names_the_rank_whose_process_is_gone() -> None:
    """Only the survivor's broken collective reached Ray (the dead rank was not polled yet):
    the rank to blame is the one the survivor found gone, also from the text Ray ships."""
    import subprocess
    import sys

    from clray.jobs.run.recovery import PeerLostError, watching_peers

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    peers = [(socket.gethostname(), os.getpid()), (socket.gethostname(), gone.pid)]
    with pytest.raises(PeerLostError, match=f"worker rank 1 \\(pid {gone.pid} on .*\\) is gone") as info:
        with watching_peers(peers, rank=0):
            raise RuntimeError("gloo: Connection closed by peer")
    assert blame({0: info.value})[0] == 1
    shipped = RuntimeError(f"ray.exceptions.RayTaskError: PeerLostError: {info.value}")
    assert blame({0: shipped})[0] == 1
    with pytest.raises(ValueError, match="not a collective"):  # other errors pass through
        with watching_peers(peers, rank=0):
            raise ValueError("not a collective")
    with pytest.raises(RuntimeError, match="nan"):  # every peer alive: the error as it was
        with watching_peers(peers[:1], rank=0):
            raise RuntimeError("nan")


def test_run_directory_problems_name_the_path_and_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError, match=r"is a file, not a directory.*Set run.output_dir to a directory"):
        check_local_run_dir(blocker / "quickstart", str(blocker))
    with pytest.raises(RunDirError, match=r"cannot write the run directory /proc/clray-test/q"):
        check_local_run_dir(Path("/proc/clray-test/q"), "/proc/clray-test")
