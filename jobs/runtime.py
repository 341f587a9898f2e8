"""Ray for every command: starting or joining it, its CPU budget, free ports, turning
Ray's failures into the user's own error, and the Ray knobs clray depends on.

Every command (train, tune, mine, submit, eval) goes through here, so that a local Ray
is sized the same way for a job whether it is started by ``clray train`` or by the
local head of ``clray submit``, and so that a worker's error reaches the user as the
line they need, not as Ray's wrapper around it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clray.jobs.config import JobConfig

RAY_VERSION_CHECKED = "2.60.0"
"""The Ray release every Ray-specific behaviour below was checked against (pinned in
pyproject.toml). Revisit each entry of RAY_KNOBS when the pin moves."""

RAY_KNOBS: dict[str, str] = {
    # Environment variables read by Ray Tune / Train that are not part of their
    # documented configuration objects, and why clray sets them.
    "TUNE_GLOBAL_CHECKPOINT_S": "2: Tune saves the search state every 2 s, so a killed "
    "search resumes with the trials that finished just before (default: adaptive, tens of s)",
    "TUNE_FORCE_TRIAL_CLEANUP_S": "3: a trial Tune stops is blocked in tune.report while its "
    "TorchTrainer runs on; Tune kills its actor after this long (default 600 s, which holds "
    "every stopped trial's resources for ten minutes)",
    "RAY_AIR_NEW_OUTPUT": "0: Tune's old console reporter, which verbose=0 silences",
    "RAY_API_SERVER_ADDRESS": "the local dashboard's URL, for Ray Train's placement-group "
    "cleaner: left to auto-detect the cluster it gives up when another Ray runs on the "
    "machine, and a stopped trial's CPUs stay reserved",
    "TUNE_ORIG_WORKING_DIR": "read, not set: the directory a Tune trial was started from "
    "(Tune moves each trial into its own directory)",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5: Ray Train V2's controller polls its workers this often "
    "(default 2 s); it takes one report per worker per poll, so every checkpoint (a report) stalled the "
    "workers up to 2 s, and the end of every fit was noticed up to 2 s late",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0 on a Ray clray starts on this machine (a local Ray, "
    "the local head of clray submit, the simulated cluster; nothing there is preempted): Ray Train "
    "V2 starts a watcher actor for every worker group that polls for draining nodes, and a new "
    "actor process costs 3-4 CPU-seconds, a tenth of a short fit's CPU on 2 cores; on a cluster "
    "someone else started (RAY_ADDRESS) it is left on",
    "TORCHDYNAMO_DISABLE": "1 in training workers: DeepSpeed's optimizer check imports an "
    "optimizer decorated with torch.compile, which imports inductor (2 s per worker on a "
    "CPU); clray compiles nothing",
    "worker_niceness": "0 (Ray system config, a local Ray only): Ray starts its workers at "
    "nice 15, so on a machine shared with anything else the training workers, which are the "
    "job, get the CPU last (a nice-15 process weighs 1/28 of a nice-0 one): beside any other "
    "work a clray run slows down where a single-process trainer (nice 0) does not",
    "Dataset.context._execution_idx": "set, not read from the environment: Ray Data seeds an "
    "epoch's shuffle with it (+1 after each execution, 0 in a new driver or split "
    "coordinator); jobs.run.ingest sets it to the epoch a start resumes in, so a resumed "
    "run shuffles every epoch as an uninterrupted one does",
    "ray.data._internal.datasource_v2.common.synthesized_columns._compute_row_hashes": "called "
    "by pipelines._compat.row_hashes: the row_hash read_parquet(include_row_hash=True) gives a "
    "row, computed on the driver to leave duplicate-id rows out of training",
    "checkpoint_manager_snapshot.json": "Ray Train V2's registry of checkpoints in the run "
    "directory; jobs.run.resume moves it aside when it is cut short or names a checkpoint "
    "that is gone (Ray would fail the run), and clray's retention keeps what it lists",
}
"""Ray and library knobs outside the documented APIs: name -> value and reason."""

RAY_PRIVATE_APIS: dict[str, str] = {
    # Ray code (not settings) that is not public API, the one place clray uses each, and why.
    "ray.autoscaler._private.util.prepare_config/validate_config": "jobs/clustercheck/launcher.py: "
    "Ray's own schema and defaults for cluster launcher YAMLs, what `ray up` applies",
    "ray.data.DataContext.use_datasource_v2": "pipelines/reading.py (legacy_parquet_reader): the V1 Parquet "
    "reader, which resolves paths on the driver only and starts no footer-reading actors per epoch",
    "ray.tune.schedulers.async_hyperband._Bracket": "benchmarks/tune.py: replays ASHA's own rung decisions "
    "over recorded curves",
    "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator.get_or_create_autoscaling_coordinator": "jobs/runtime.py "
    "(pin_data_coordinator): Ray Data's detached coordinator actor, created on the driver's node so that it "
    "does not pin a worker node an autoscaler would remove",
    "ray.data._internal.stats.get_or_create_stats_actor": "jobs/runtime.py (pin_data_coordinator): the same "
    "for Ray Data's detached stats actor",
    "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider": "jobs/submit/simnodes.py: "
    "the simulated cluster of `clray jobs up --simulate` (what ray.cluster_utils.AutoscalingCluster uses), "
    "subclassed to give each node its own runtime_env_dir_name (a ray._private.parameter.RayParams field)",
}
"""Ray internals clray calls, checked against RAY_VERSION_CHECKED (tests check that this is
the installed Ray)."""

TRAIN_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
"""Set in the driver's environment (unless the user set them), which Ray Train passes on
to its controller; why each: RAY_KNOBS."""

LOCAL_TRAIN_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
"""The same, on a Ray that clray starts on this machine, for its jobs' processes too."""

TUNE_DEFAULTS = {"TUNE_GLOBAL_CHECKPOINT_S": "2", "TUNE_FORCE_TRIAL_CLEANUP_S": "3", "RAY_AIR_NEW_OUTPUT": "0"}


def free_port() -> int:
    """A TCP port free on loopback right now (for a dashboard or a test server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_cpus(cfg: JobConfig) -> float:
    """Logical CPUs one training run holds: its workers' for the whole run, plus
    ``data.num_cpus`` for Ray Data beside them (without those, Ray Data's tasks never
    schedule while the workers hold every CPU). A search multiplies it by the trials it
    runs at once; a local head for a submitted job is started with at least this."""
    return cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.num_cpus


def local_cpus(needed: float) -> int:
    """Logical CPUs to start a local Ray with: the machine's cores, or more when the job
    needs more (oversubscribing logical CPUs is fine; a job that cannot schedule is not)."""
    return max(os.cpu_count() or 1, math.ceil(needed))


def worker_env(use_gpu: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every Ray process a job starts (set as the job's runtime_env)."""
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning", "TORCHDYNAMO_DISABLE": "1"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.update(extra or {})
    return env


def own_op_builds() -> None:
    """Build DeepSpeed's CPU communication op (torch compiles it on first use) with one and
    the same ``ninja`` in every process, so that it is built once and then only loaded.

    PATH starts with the directory of the ``ninja`` that pip installed beside DeepSpeed (a
    dependency of it), found from the ``ninja`` package without importing it: a training
    worker, a submitted job (whose PATH starts with the venv's ``bin``), ``.ci/bootstrap``'s
    pre-build and a venv that borrows this one's packages all use it. Before, some found a
    system ninja of another version; two versions hash a build command differently, so
    each took the other's build for a stale one and compiled the op again (about 40 s on 2
    cores, at the start of a run)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("ninja")
    if spec is None or spec.origin is None:
        return
    # site-packages/ninja/__init__.py -> the environment's bin/ (lib/pythonX.Y/site-packages)
    own = Path(spec.origin).resolve().parents[4] / "bin"
    if not (own / "ninja").is_file():
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != str(own):
        os.environ["PATH"] = f"{own}{os.pathsep}{path}" if path else str(own)


def start_ray(needed_cpus: float, env_vars: dict[str, str], verbose: bool = False, dashboard: bool = False,
              resources: dict[str, float] | None = None) -> None:
    """Connect to RAY_ADDRESS if set, else start a local Ray with ``local_cpus(needed_cpus)``
    logical CPUs and the custom ``resources`` the job's workers ask for (on a cluster its
    nodes declare them). A Ray this process already started is kept as it is.

    ``dashboard``: also start Ray's dashboard, which serves the state API. A search needs
    it: Tune kills the trials it stops, and Ray Train's placement-group cleaner asks the
    state API whether the trial's controller died before it frees the trial's resources;
    without it every stopped trial keeps its workers' CPUs reserved for good. The local
    dashboard gets a free loopback port, and the job's processes are told it
    (RAY_API_SERVER_ADDRESS): left to find it themselves, they give up when another Ray
    runs on the machine ("Found multiple active Ray instances"), and the resources leak."""
    import ray

    for name, value in TRAIN_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(
        include_dashboard=dashboard,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        runtime_env={"env_vars": env_vars},
    )
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        pin_data_coordinator()
        return
    # A local Ray's processes inherit the environment its raylet started with, so the job's
    # variables are set there rather than as a runtime_env: with one, every worker process
    # starts twice (Ray's setup_worker applies it, then execs the worker), about 0.4
    # CPU-seconds more per process, and a run starts about ten of them.
    env = {name: os.environ.setdefault(name, value) for name, value in LOCAL_TRAIN_DEFAULTS.items()}
    env.update(env_vars)
    del kwargs["runtime_env"]
    if dashboard:
        port = free_port()
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    if resources:
        kwargs["resources"] = dict(resources)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        ray.init(num_cpus=local_cpus(needed_cpus), _system_config={"worker_niceness": 0}, **kwargs)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    start_reaper()


def pin_data_coordinator() -> None:
    """Create Ray Data's two cluster-wide actors here, on the driver's node: its
    autoscaling coordinator and its stats actor.

    Ray Data creates each (detached, zero CPUs, pinned to a node) from the first process on
    the cluster that runs a dataset: with a job's trials or split coordinators on worker
    nodes, that is a worker node, which then never counts as idle, so an autoscaler never
    removes it (found on the simulated cluster: a CPU node kept for good after a search,
    by one actor or the other). Created first by the driver, they live on the head, where
    the driver of a submitted job runs."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )
    from ray.data._internal.stats import get_or_create_stats_actor

    get_or_create_autoscaling_coordinator()
    get_or_create_stats_actor()


_REAPER = """
import os, signal, sys, time
driver = int(sys.argv[1])
def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]  # parent pid, start time
    except (OSError, IndexError, ValueError):
        return None
def descendants():
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        info = stat(pid)
        if info:
            parents[int(pid)] = info
    found, todo = {}, [driver]
    while todo:
        parent = todo.pop()
        for pid, (ppid, started) in parents.items():
            if ppid == parent and pid not in found and pid != os.getpid():
                found[pid] = started
                todo.append(pid)
    return found
known = {}
while stat(driver) is not None:
    known.update(descendants())
    time.sleep(1.0)
for pid, started in known.items():
    info = stat(pid)
    if info is not None and info[1] == started:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def start_reaper() -> None:
    """Make a local Ray die with the process that started it, however that process dies.

    ``ray.init`` starts the session's GCS and raylet tied to this process, but the raylet's
    agents (dashboard agent, runtime-env agent) notice a lost raylet only after minutes;
    a driver killed with SIGKILL (an out-of-memory kill, a scheduler's hard stop) left
    them running. A small watcher in its own session notes this process's descendants
    every second while it lives and, once it has ended, kills those still there (the same
    process: its start time is compared, so a reused pid is left alone); after a normal
    ``ray.shutdown`` none are. Linux only (/proc)."""
    import subprocess
    import sys

    if not os.path.isdir("/proc"):
        return
    subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid())], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


# ------------------------------------------------------------------ a run's channel


class _Mailboxes:
    """The actor behind a run's channel: one FIFO per topic (async, so a ``get`` waiting
    for an item does not hold up a ``put``)."""

    def __init__(self) -> None:
        self.boxes: dict[str, Any] = {}

    def _box(self, topic: str) -> Any:
        import asyncio

        return self.boxes.setdefault(topic, asyncio.Queue())

    async def put(self, topic: str, item: Any) -> None:
        self._box(topic).put_nowait(item)

    async def get(self, topic: str, timeout: float) -> tuple[bool, Any]:
        import asyncio

        try:
            return True, await asyncio.wait_for(self._box(topic).get(), timeout)
        except asyncio.TimeoutError:
            return False, None

    async def size(self, topic: str) -> int:
        return self._box(topic).qsize()


class Mailbox:
    """One topic of a run's channel, with the part of ``ray.util.queue.Queue``'s interface
    clray uses: ``put``, ``get(timeout)`` (raises ``queue.Empty``) and ``empty``."""

    def __init__(self, actor: Any, topic: str) -> None:
        self.actor, self.topic = actor, topic

    def put(self, item: Any) -> None:
        import ray

        ray.get(self.actor.put.remote(self.topic, item))

    def get(self, timeout: float) -> Any:
        import queue

        import ray

        found, item = ray.get(self.actor.get.remote(self.topic, timeout))
        if not found:
            raise queue.Empty
        return item

    def empty(self) -> bool:
        import ray

        return ray.get(self.actor.size.remote(self.topic)) == 0


def run_channel(actor_options: dict[str, Any]) -> tuple[Mailbox, Mailbox]:
    """A run's progress (workers -> driver) and stop (driver -> rank 0) queues, both served
    by one small actor: each actor is a process of its own, which costs 2-3 CPU-seconds to
    start, and two ``ray.util.queue.Queue`` cost two. The actor's class lives here, in a
    module that imports neither torch nor Ray Train, so its process starts light."""
    import ray

    actor = ray.remote(_Mailboxes).options(**actor_options).remote()
    return Mailbox(actor, "progress"), Mailbox(actor, "stop")


# ------------------------------------------------------------------ Ray's failures


@dataclass(frozen=True)
class Failure:
    """What went wrong inside Ray, as the user's own error: the failing rank (when a
    training worker failed), the exception's type name and its last message line."""

    rank: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception)): (?P<message>\S.*)$")


def root_cause(exc: BaseException) -> BaseException:
    """Unwrap Ray's wrappers (worker-group errors, task errors, ``cause`` chains) down to
    the innermost exception that is still an object here."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if failures:
            exc = next(iter(sorted(failures.items())))[1]
            continue
        cause = getattr(exc, "cause", None) or exc.__cause__
        if cause is not None and cause is not exc:
            exc = cause
            continue
        break
    return exc


def _remote_user_error(exc: BaseException) -> tuple[str, str] | None:
    """The user's exception inside a Ray Data UDF failure, from the remote tracebacks.

    Ray Data re-raises a failing map function as ``UserCodeException("UDF failed ...")``
    and ships the original (e.g. a ``DataError`` naming a bad row of a mined batch) only
    as traceback text, so the last non-Ray ``module.Type: message`` line there is the
    user's error."""
    found = None
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        for line in str(node).splitlines():
            match = _EXCEPTION_LINE.match(line.strip())
            if match and not match["type"].startswith("ray."):
                found = (match["type"].rsplit(".", 1)[-1], match["message"])
        failures = getattr(node, "worker_failures", None)
        node = next(iter(sorted(failures.items())))[1] if failures else getattr(node, "cause", None) or node.__cause__
    return found


def describe_failure(exc: BaseException) -> Failure:
    """The one way clray turns an exception that came out of Ray into a message."""
    failures = getattr(exc, "worker_failures", None)
    rank = min(failures) if failures else None
    root = root_cause(exc)
    # Ray prefixes remote errors with a traceback; keep the last line, the user's message.
    text = str(root).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(root).__name__)
    kind = type(root).__name__
    if type(root).__module__.startswith("ray.") and (remote := _remote_user_error(exc)) is not None:
        kind, last = remote
    return Failure(rank=rank, kind=kind, message=last.strip())
