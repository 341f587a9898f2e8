"""The local Ray head ``clray submit`` starts when no address is given: a ``ray start --head``
on loopback in its own process group, recorded in a state file so that later ``clray submit``
and ``clray jobs`` calls find it, and stopped by that group only (``ray stop`` would end every
Ray on the machine, including drivers and clusters that are not ours)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clray.jobs.runtime import LOCAL_TRAIN_DEFAULTS, free_port
from clray.jobs.submit.errors import SubmitError

STATE_DIR_ENV = "CLRAY_STATE_DIR"
"""Where ``clray submit`` records the local head it started (default ``~/.clray``)."""
LOCAL_HEAD_FILE = "local_head.json"


def local_head_path(environ: Mapping[str, str] | None = None) -> Path:
    """The state file naming the local head (in $CLRAY_STATE_DIR, else ``~/.clray``)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(STATE_DIR_ENV) or Path.home() / ".clray") / LOCAL_HEAD_FILE


@dataclass
class LocalHead:
    """A Ray head on loopback, run by ``ray start --head --block`` in its own process
    group. Stopping it ends that group only: ``ray stop`` would end every Ray on the
    machine, including drivers and clusters that are not ours."""

    address: str
    gcs_address: str
    pid: int
    temp_dir: str
    num_cpus: float
    simulated: str | None = None
    """The cluster launcher file this head simulates (``clray jobs up --simulate``)."""

    def alive(self) -> bool:
        if not pid_runs(self.pid, self.temp_dir):
            return False
        try:
            import requests

            return _answers(requests.get(f"{self.address}/api/version", timeout=5))
        except Exception:
            return False

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the group (``ray start --block`` then stops its processes), then
        SIGKILL what is left; the temp dir goes too."""
        ours = pid_runs(self.pid, self.temp_dir)
        if ours:
            _signal_group(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and _group_alive(self.pid):
                time.sleep(0.2)
        _kill_leftovers(self, group=ours)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def _answers(response: Any) -> bool:
    """The dashboard is up: it answers, possibly 401 (Ray 2.60 heads require a token
    once ``~/.ray/auth_token`` exists; the client sends it, this probe need not)."""
    return response.status_code < 500


def pid_runs(pid: int, temp_dir: str) -> bool:
    """The recorded pid is still our ``ray start`` (not a reused pid)."""
    try:
        import psutil

        return temp_dir in " ".join(psutil.Process(pid).cmdline())
    except Exception:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    import psutil

    for proc in psutil.process_iter(["pid", "status"]):
        try:
            # a zombie has exited already; it only waits to be reaped
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def _kill_leftovers(head: LocalHead, group: bool) -> None:
    """SIGKILL what is left of the head: its process group (only when ``group``: the
    recorded pid was still our ``ray start``, so the group id is not a reused one), any
    process naming its temp dir, and the Ray client server, which names its GCS port."""
    import psutil

    gcs = re.compile(rf"--address=\S+:{head.gcs_address.rsplit(':', 1)[-1]}(\s|$)")

    victims = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            in_group = group and os.getpgid(proc.pid) == head.pid
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
        if in_group or head.temp_dir in cmdline or ("ray" in cmdline and gcs.search(cmdline)):
            victims.append(proc)
            try:
                victims.extend(proc.children(recursive=True))
            except psutil.Error:
                pass
    for proc in victims:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=5)


def start_head(num_cpus: float, temp_root: str | None = None, timeout_s: float = 120.0,
               autoscaling: dict[str, Any] | None = None, simulated: str | None = None) -> LocalHead:
    """Start a Ray head with its dashboard (the Jobs API) on 127.0.0.1 and wait until the
    Jobs API answers. Every port Ray would otherwise take at a fixed default is picked
    free, so the head coexists with other Ray instances on the machine; the temp dir is
    short because Ray's unix socket paths must fit in ~107 bytes.

    ``autoscaling``: a fake multi-node autoscaling config (``simulate.simulated_config``);
    the head then runs Ray's autoscaler, whose nodes are raylets on this machine under the
    same temp dir, so ``LocalHead.stop`` ends them with the head."""
    temp_dir = tempfile.mkdtemp(prefix="clray-", dir=temp_root or "/tmp")
    gcs_port, dash_port = free_port(), free_port()
    extra: list[str] = []
    env = dict(os.environ)
    env.update({name: env.get(name, value) for name, value in LOCAL_TRAIN_DEFAULTS.items()})  # nothing here is preempted
    if autoscaling is not None:
        autoscaling = {**autoscaling, "provider": {**autoscaling["provider"], "gcs_address": f"127.0.0.1:{gcs_port}"}}
        config_path = Path(temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(autoscaling))
        extra = [f"--autoscaling-config={config_path}"]
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    ray_bin = [sys.executable, "-m", "ray.scripts.scripts"]
    cmd = ray_bin + [
        "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--num-cpus", str(int(num_cpus)), "--temp-dir", temp_dir, *extra,
    ]
    # The job's `python` must be this Python (the one with clray's dependencies), also
    # when clray was started by path without activating its virtualenv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # the head process keeps writing it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    log.close()
    head = LocalHead(address=f"http://127.0.0.1:{dash_port}", gcs_address=f"127.0.0.1:{gcs_port}",
                     pid=proc.pid, temp_dir=temp_dir, num_cpus=num_cpus, simulated=simulated)
    deadline = time.monotonic() + timeout_s
    import requests

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (Path(temp_dir) / "ray-start.log").read_text(errors="replace")[-2000:]
            head.stop()
            raise SubmitError(f"the local Ray head did not start (exit code {proc.returncode}):\n{tail}")
        try:
            if _answers(requests.get(f"{head.address}/api/version", timeout=2)):
                return head
        except requests.RequestException:
            pass
        time.sleep(0.5)
    head.stop()
    raise SubmitError(f"the local Ray head did not answer on {head.address} within {timeout_s:.0f} s")


def read_local_head(environ: Mapping[str, str] | None = None) -> LocalHead | None:
    """The head recorded in the state file, or None (no file, or one that does not parse);
    whether it still runs is ``LocalHead.alive``'s question."""
    path = local_head_path(environ)
    try:
        return LocalHead(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def ensure_local_head(num_cpus: int, say: Callable[[str], None]) -> LocalHead:
    """The recorded local head if it still runs, else a new one (recorded for later
    ``clray submit`` and ``clray jobs`` calls)."""
    head = read_local_head()
    if head is not None and head.alive():
        if head.num_cpus < num_cpus and not head.simulated:
            say(f"note: the local head has {head.num_cpus} CPUs and this job asks for {num_cpus}; "
                "`clray jobs down` then submit again starts a bigger one")
        return head
    path = local_head_path()
    say(f"starting a local Ray head ({num_cpus} CPUs) ...")
    head = start_head(num_cpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head.to_json())
    say(f"local Ray head at {head.address} (recorded in {path}; `clray jobs down` stops it)")
    return head


def stop_local_head(say: Callable[[str], None]) -> int:
    """``clray jobs down``: stop the recorded local head (only that one) and forget it."""
    head = read_local_head()
    path = local_head_path()
    if head is None:
        say(f"no local head recorded in {path}: nothing to stop")
        return 0
    head.stop()
    path.unlink(missing_ok=True)
    say(f"stopped the local Ray head at {head.address}")
    return 0

