"""Re-mining beside training (``remine.overlap = true``): the worker group is never torn
down for a new plan.

With ``remine.every_epochs = N`` the boundaries N, 2N, ... (the starts of those epochs)
are where the workers export a teacher (the model as it is there) and go on training;
the driver mines a plan with it in a miner process (``main --serve``, one per fit, joined
to the run's Ray, its actors on CPU resources beside the trainer), and the workers train
on that plan from the next boundary. So the plan of every epoch is a function of the
epoch alone (``replan.plan_source``; the workers' side is ``replan.EpochPlans``): epochs 0 to 2N-1 train on the first
plan, epochs kN to (k+1)N-1 (k >= 2) on the plan mined at boundary (k-1)N. A resumed or
restarted run trains the same batches; when a plan is not mined by the boundary it is
needed at, the workers wait for it and say how long (``events.PlanEvent``).

Without overlap (``jobs.run.remine``) every plan is one period fresher, but training
stops for the teacher export, the fit's teardown, the mining and a new fit each time.

The driver's side is ``OverlapMiner``: it hears the workers' ``remine`` events, runs one
mining job at a time, checks each plan as the run's own data check would, and hands it
to the workers through a ``PlanBoard`` actor on the driver's node (which outlives a
restart of the worker group). ``run_dir/remine.json`` lists the plans ready so far, so a
run started again does not mine them again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clray.jobs import events
from clray.jobs.config import JobConfig
from clray.jobs.run.replan import STATE_FILE, mine_config, mined_dir, mining_boundaries, teacher_dir

if TYPE_CHECKING:
    from clray.pipelines.spec import DataSpec

class PlanBoard:
    """A Ray actor on the driver's node: the plans mined so far, by boundary, as checked
    ``DataSpec``s every rank reads its part of each batch from; or why one failed."""

    def __init__(self) -> None:
        self.plans: dict[int, tuple[str, Any]] = {}

    def put(self, boundary: int, spec: Any) -> None:
        self.plans[boundary] = ("ready", spec)

    def fail(self, boundary: int, message: str) -> None:
        self.plans[boundary] = ("failed", message)

    def get(self, boundary: int) -> tuple[str, Any] | None:
        return self.plans.get(boundary)


class OverlapMiner:
    """The driver's side: mines a plan for every teacher the workers export, one job at a
    time, and publishes each to the board once checked."""

    def __init__(self, cfg: JobConfig, *, verbose: bool = False) -> None:
        from clray.pipelines.plan_format import read_manifest
        from clray.pipelines.storage import normalize

        self.cfg = cfg
        self.verbose = verbose
        self.run_dir = Path(cfg.run_dir)
        self.first_plan = normalize(cfg.data.train[0])
        self.first_manifest = read_manifest(self.first_plan, cfg.storage)
        if self.first_manifest.get("num_workers") is None:
            from clray.pipelines.errors import DataError

            raise DataError(
                f"remine.overlap needs a plan of global batches, mined for the run's {cfg.scaling.num_workers} "
                f"workers: data.train = {self.first_plan} is a plan of local batches (its manifest has no "
                f"num_workers); mine it again with mining.num_workers = {cfg.scaling.num_workers}, or remove "
                "remine.overlap"
            )
        self.every = cfg.remine.every_epochs
        self.wanted = set(mining_boundaries(self.every, cfg.train.epochs))
        self.state_path = self.run_dir / STATE_FILE
        self.state = self._read_state()
        self.requests: list[tuple[int, str]] = []
        self.requested: set[int] = set()
        self.lock = threading.Condition()
        self.closed = False
        self.process: subprocess.Popen[bytes] | None = None
        self.board: Any = None
        self.steps_per_epoch = 0
        self.post: Callable[[dict[str, Any]], None] | None = None
        """Puts an event into the current fit's progress queue (set by the fit)."""
        self.thread: threading.Thread | None = None

    def _read_state(self) -> dict[str, Any]:
        if self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            if state.get("overlap"):
                return state
        return {"overlap": True, "every_epochs": self.every, "plan": self.first_plan, "from_epoch": 0,
                "plans": [{"plan": self.first_plan, "from_epoch": 0}]}

    def start(self, checked: DataSpec, steps_per_epoch: int) -> Any:
        """Once Ray is up: the board (on this node), the plans already mined published on
        it, and the mining thread. Returns the board for the workers."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.steps_per_epoch = steps_per_epoch
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = ray.remote(PlanBoard).options(num_cpus=0, scheduling_strategy=here).remote()
        for entry in self.state["plans"][1:]:
            boundary = entry["mined_at"]
            self.requested.add(boundary)
            ray.get(self.board.put.remote(boundary, self._check(Path(entry["plan"]))))
        for boundary in sorted(self.wanted - self.requested):
            # exported by an earlier start of this run, which stopped before its plan was mined
            if teacher_dir(self.run_dir, boundary).is_dir():
                self.on_event(events.RemineEvent(epoch=boundary, teacher=str(teacher_dir(self.run_dir, boundary)),
                                                  overlap=True).record())
        self.thread = threading.Thread(target=self._serve, name="clray-overlap-miner", daemon=True)
        self.thread.start()
        return self.board

    def on_event(self, record: dict[str, Any]) -> None:
        """Every event the driver relays: a teacher exported at a boundary is a request."""
        if record.get("event") != events.RemineEvent.kind:
            return
        boundary = int(record["epoch"])
        with self.lock:
            if boundary in self.wanted and boundary not in self.requested:
                self.requested.add(boundary)
                self.requests.append((boundary, record["teacher"]))
                self.lock.notify_all()

    def close(self) -> None:
        """The fit is over: a mining job still running is of no use to it any more."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()
            process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _serve(self) -> None:
        if self.wanted - self.requested or self.requests:
            self._spawn()  # warm (imports, Ray) while the first epochs train
        while True:
            with self.lock:
                while not self.requests and not self.closed:
                    self.lock.wait()
                if self.closed:
                    return
                boundary, teacher = self.requests.pop(0)
            self._mine(boundary, teacher)

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        """The miner process (``main --serve``), joined to the run's Ray; one per fit, kept
        for every boundary (started again if it died)."""
        import ray

        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        # the environment the run's own processes get (DS_ACCELERATOR=cpu on a CPU run), as the sequential mining has
        gpu = ["--use-gpu"] if self.cfg.scaling.use_gpu or self.cfg.remine.teacher.get("use_gpu") is True else []
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            if self.closed:
                return None
            if self.process is None or self.process.poll() is not None:
                with self.log.open("ab") as fh:
                    self.process = subprocess.Popen([sys.executable, "-m", "clray.jobs.run.overlap", "--serve", *gpu],
                                                    stdin=subprocess.PIPE, stdout=fh, stderr=subprocess.STDOUT,
                                                    env=env)
            return self.process

    @property
    def log(self) -> Path:
        return mined_dir(self.run_dir, 0).parent / "miner.log"

    def _mine(self, boundary: int, teacher: str) -> None:
        import ray

        out = mined_dir(self.run_dir, boundary)
        cfg = mine_config(self.cfg, self.first_manifest, Path(teacher), boundary, out)
        request = out.parent / f"epoch-{boundary:04d}.request.json"
        result = out.parent / f"epoch-{boundary:04d}.result.json"
        request.parent.mkdir(parents=True, exist_ok=True)
        result.unlink(missing_ok=True)
        request.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "result": str(result)}))
        started = time.time()
        process = self._spawn()
        if process is None:
            return
        try:
            assert process.stdin is not None
            process.stdin.write(f"{request}\n".encode())
            process.stdin.flush()
        except OSError:
            pass  # it died: said below
        while not result.is_file() and process.poll() is None and not self.closed:
            time.sleep(0.2)
        if self.closed:
            return
        outcome = json.loads(result.read_text()) if result.is_file() else None
        if outcome is None or "error" in outcome:
            why = outcome["error"] if outcome else (
                f"the miner process ended (exit code {process.poll()}): "
                + " / ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:]))
            self._fail(boundary, f"re-mining at epoch {boundary} failed: {why} (details: {self.log})")
            return
        try:
            spec = self._check(out)
        except Exception as exc:  # noqa: BLE001 - a bad plan fails the run on the workers, with its reason
            self._fail(boundary, f"the plan re-mined at epoch {boundary} ({out}) cannot be trained: {exc}")
            return
        from_epoch = boundary + self.every
        self.state["plans"].append({"plan": str(out), "from_epoch": from_epoch, "mined_at": boundary,
                                    "seconds": round(time.time() - started, 1)})
        self.state.update(plan=str(out), from_epoch=from_epoch)
        from clray.pipelines.plan_format import write_json_atomic

        write_json_atomic(self.state_path, self.state)
        ray.get(self.board.put.remote(boundary, spec))
        self._post(events.ReminedEvent(epoch=from_epoch, plan=str(out), statistics=outcome["statistics"],
                                        overlap=True).record())

    def _check(self, plan: Path) -> DataSpec:
        """The plan checked as the run's own data is (``check_data``), and fit for the run's
        schedule: global batches for its workers, as many per epoch as the first plan."""
        from clray.jobs.run.data import check_data

        phase = self.cfg.model_copy(update={"data": self.cfg.data.model_copy(update={"train": [str(plan)]})})
        spec = check_data(phase)
        assert spec.plan is not None
        counts = {e.num_batches for e in spec.plan.epochs}
        if not spec.plan.global_batches or counts != {self.steps_per_epoch}:
            raise ValueError(f"it holds {sorted(counts)} batches per epoch (global batches: "
                             f"{spec.plan.global_batches}); the run trains {self.steps_per_epoch} global batches per epoch")
        return spec

    def _fail(self, boundary: int, message: str) -> None:
        message = " / ".join(line.strip() for line in message.splitlines() if line.strip())  # one line to report
        ray_board = self.board
        ray_board.fail.remote(boundary, message)
        self._post(events.WarningEvent(message=message).record())

    def _post(self, record: dict[str, Any]) -> None:
        if self.post is not None:
            try:
                self.post(record)
            except Exception:  # noqa: BLE001 - events are best-effort; the plan is on the board
                pass


def main(argv: list[str] | None = None) -> int:
    """The miner process, joined to the run's Ray (RAY_ADDRESS): ``python -m
    clray.jobs.run.overlap --serve [--use-gpu]`` mines one request (a JSON file: the mining config and
    where to write the result) per line of its stdin, until it closes;
    ``python -m clray.jobs.run.overlap REQUEST.json`` mines one."""
    import traceback

    from clray.jobs.runtime import start_ray, worker_env
    from clray.pipelines.mining import stages  # noqa: F401 - imported once, before the first request
    from clray.pipelines.mining.config import MineConfig
    from clray.pipelines.mining.job import mine_plans
    from clray.pipelines.plan_format import write_json_atomic

    args = argv if argv is not None else sys.argv[1:]
    start_ray(0, worker_env("--use-gpu" in args))
    paths = [a for a in args if not a.startswith("--")]
    requests = (line.strip() for line in sys.stdin) if "--serve" in args else iter(paths[:1])
    for path in requests:
        if not path:
            continue
        request = json.loads(Path(path).read_text())
        print(f"== {time.strftime('%H:%M:%S')} mining {path}", flush=True)
        try:
            cfg = MineConfig.model_validate(request["config"])
            mined = mine_plans(cfg, start_ray=lambda: None, overwrite=True)
            outcome: dict[str, Any] = {"plan": mined.out_dir, "statistics": mined.statistics}
        except Exception as exc:  # noqa: BLE001 - told to the run, which fails with it; the process serves on
            traceback.print_exc()
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
        write_json_atomic(Path(request["result"]), json.loads(json.dumps(outcome, default=str)))
        print(f"== {time.strftime('%H:%M:%S')} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
