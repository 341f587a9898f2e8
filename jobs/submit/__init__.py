"""``clray submit`` and ``clray jobs``: run train, tune and mine through Ray's Jobs API.

What travels with a job, and why:

- ``working_dir`` is a *bundle* staged in a temporary directory: clray's own packages
  (``clray/`` with jobs, pipelines, models and configs), ``pyproject.toml`` and the submitted config
  file. It is built from the packages, not by uploading the repository root with
  excludes, because a repository root also holds ``.venv``, ``data/``, ``runs/`` and
  whatever else a user keeps there (Ray refuses packages over a few hundred MiB), and
  because the config file may live anywhere on the submitting machine.
- ``pip`` lists clray's dependencies at the versions pinned in ``.ci/constraints.txt``
  (the versions clray is tested with). Ray builds one virtualenv per distinct list on
  each node, on top of the node's Python, so on an image that already holds those
  versions pip is satisfied without downloading; it still costs tens of seconds per
  node the first time. ``--deps none`` skips it for images that already have clray's
  dependencies, and is the default for the local head clray starts itself (it runs this
  very Python).
- ``env_vars`` holds only the variables the user names with ``--env NAME``. Nothing else
  from this machine's environment (AWS keys, tokens) goes into the runtime_env or the
  job metadata.

Security: Ray's dashboard, which serves the Jobs API, accepts any request unless the
cluster enables token authentication, and whoever can submit a job runs code on every
node. clray has no default address, and warns before it submits to a plain ``http://``
address that is not loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import shlex
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
from urllib.parse import urlsplit

from clray.jobs.runtime import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
"""The clray package's directory: the repository root in a checkout (installed editable),
``site-packages/clray`` in an installed wheel."""
COMMANDS = ("train", "tune", "mine")
BUNDLE_PACKAGE = "clray"
"""The bundle holds clray as the package it is installed as: clray/__init__.py (the
repository root's), clray/jobs, clray/pipelines, clray/models and clray/configs."""
BUNDLE_PACKAGES = ("jobs", "pipelines", "models")
BUNDLE_DATA = ("configs",)
BUNDLE_EXTRA = ("pyproject.toml",)
BUNDLE_CONFIG_DIR = "_submitted"
"""Where the submitted config lands inside the bundle (the job's working directory)."""
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", "*.egg-info")
STATE_DIR_ENV = "CLRAY_STATE_DIR"
"""Where ``clray submit`` records the local head it started (default ``~/.clray``)."""
LOCAL_HEAD_FILE = "local_head.json"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PATH_KEYS = {
    "train": ("data.train", "data.eval", "run.output_dir", "model.anchor.pretrained",
              "model.anchor.tokenizer", "model.positive.pretrained", "model.positive.tokenizer"),
    "tune": ("data.train", "data.eval", "run.output_dir", "model.anchor.pretrained",
             "model.anchor.tokenizer", "model.positive.pretrained", "model.positive.tokenizer"),
    "mine": ("data.train", "teacher.path", "output.dir"),
}
"""Config keys that name files; on a remote cluster they are read there, not here."""
PATH_DEFAULTS = {"run.output_dir": "runs"}


class SubmitError(Exception):
    """A submission or jobs command that cannot go on; the message is meant for the user."""


# --------------------------------------------------------------------------- addresses


def parse_address(address: str, source: str = "--address") -> str:
    """The Jobs API base URL (``http(s)://HOST:PORT``), or SubmitError naming the fix.

    The Jobs API is the dashboard's HTTP port (8265 by default), not the GCS port
    (6379) that ``RAY_ADDRESS=HOST:6379`` or ``ray://`` addresses name."""
    text = address.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(
            f"{source} = {address!r} is not a Jobs API address: give the head's dashboard "
            "URL, e.g. http://HEAD:8265 (not a ray:// or GCS HOST:6379 address)"
        )
    try:
        parts.port  # noqa: B018  (raises on a non-numeric port)
    except ValueError:
        raise SubmitError(f"{source} = {address!r}: the port is not a number, e.g. http://HEAD:8265") from None
    if parts.path not in ("", "/") or parts.query:
        raise SubmitError(f"{source} = {address!r}: give only scheme, host and port, e.g. http://HEAD:8265")
    return text


def is_loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_warning(address: str) -> str | None:
    """The warning for a plain-HTTP Jobs API on another machine, else None."""
    if urlsplit(address).scheme != "http" or is_loopback(address):
        return None
    return (
        f"{address} is plain HTTP on another machine. Ray's dashboard (the Jobs API) has no "
        "authentication unless the cluster enables it (token authentication), and a submitted "
        "job runs code on every node, so anyone who can reach this port controls the cluster; "
        "requests and tokens also cross the network unencrypted. Safer: reach the dashboard "
        "through an SSH tunnel (`ray dashboard cluster/aws.yaml`, then --address "
        "http://127.0.0.1:8265) or `kubectl port-forward`. If the cluster runs token "
        "authentication (RAY_AUTH_MODE=token), set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
        "here as well; if it sits behind a TLS proxy, use its https:// address and "
        "--token-env NAME to send the proxy's bearer token from the variable NAME."
    )


def resolve_jobs_address(explicit: str | None, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The Jobs API address for ``clray jobs``/``clray submit`` and where it came from:
    --address, else RAY_ADDRESS when it is an http(s) URL, else the local head that
    ``clray submit`` recorded. Raises SubmitError when there is none."""
    environ = os.environ if environ is None else environ
    if explicit:
        return parse_address(explicit), "--address"
    env_address = environ.get("RAY_ADDRESS", "")
    if env_address.startswith(("http://", "https://")):
        return parse_address(env_address, "RAY_ADDRESS"), "RAY_ADDRESS"
    head = read_local_head(environ)
    if head is not None and head.alive():
        return head.address, f"the local head in {local_head_path(environ)}"
    raise SubmitError(
        "no Jobs API address: pass --address http://HEAD:8265 or set RAY_ADDRESS=http://HEAD:8265 "
        "(a local head started by `clray submit` without --address is found automatically "
        "while it runs)"
    )


# --------------------------------------------------------------------------- runtime_env


def pinned_requirements(repo_root: Path = REPO_ROOT) -> list[str]:
    """clray's dependencies as pip requirements, pinned to ``.ci/constraints.txt`` where
    it pins them (torch keeps its range: the cluster's own CUDA build satisfies it)."""
    from packaging.requirements import Requirement

    pyproject = repo_root / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        specs = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    else:  # an installed clray without its source tree
        from importlib.metadata import PackageNotFoundError, requires

        try:
            specs = [r for r in requires("clray") or [] if "extra ==" not in r]
        except PackageNotFoundError:
            raise SubmitError(
                "cannot find clray's dependency list (no pyproject.toml next to the jobs package and "
                "clray is not installed): submit from a clray checkout, or use --deps none on an "
                "image that has clray's dependencies"
            ) from None
    pins: dict[str, str] = {}
    constraints = repo_root / ".ci" / "constraints.txt"
    if constraints.is_file():
        for line in constraints.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                pins[_norm(req.name)] = str(req.specifier)
    out = []
    for spec in specs:
        req = Requirement(spec)
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        version = pins.get(_norm(req.name), str(req.specifier))
        out.append(f"{req.name}{extras}{version}")
    return out


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def stage_bundle(config_path: Path, staging_dir: Path, repo_root: Path = REPO_ROOT) -> Path:
    """Copy clray's code and the config into ``staging_dir``; returns the config's path
    relative to the bundle (the job's working directory)."""
    package = staging_dir / BUNDLE_PACKAGE
    package.mkdir()
    shutil.copy2(repo_root / "__init__.py", package / "__init__.py")
    for name in BUNDLE_PACKAGES:
        src = repo_root / name
        if not (src / "__init__.py").is_file():
            raise SubmitError(f"cannot bundle clray: {src} is not a package directory")
        shutil.copytree(src, package / name, ignore=COPY_IGNORE)
    for name in BUNDLE_DATA:
        if (repo_root / name).is_dir():
            shutil.copytree(repo_root / name, package / name, ignore=COPY_IGNORE)
    for name in BUNDLE_EXTRA:
        if (repo_root / name).is_file():
            shutil.copy2(repo_root / name, staging_dir / name)
    target = Path(BUNDLE_CONFIG_DIR) / config_path.name
    (staging_dir / BUNDLE_CONFIG_DIR).mkdir()
    base = search_base(config_path)
    if base is None:
        shutil.copy2(config_path, staging_dir / target)
        return target
    # A search config lays itself over `search.base`, a path relative to the config: ship
    # that file too, next to the config, and point the shipped copy at it.
    from clray.jobs.config import read_toml

    bundled_base = f"base-{base.name}"
    shutil.copy2(base, staging_dir / BUNDLE_CONFIG_DIR / bundled_base)
    raw = read_toml(config_path)
    raw["search"]["base"] = bundled_base
    import tomli_w

    (staging_dir / target).write_text(tomli_w.dumps(raw))
    return target


def search_base(config_path: Path) -> Path | None:
    """The training config a search config names in ``search.base`` (relative to the
    search config), or None; SubmitError when it names a missing file."""
    from clray.jobs.config import read_toml

    search = read_toml(config_path).get("search")
    name = search.get("base") if isinstance(search, dict) else None
    if name is None:
        return None
    base = (config_path.parent / str(name)).expanduser()
    if not base.is_file():
        raise SubmitError(f"{config_path}: search.base = {name!r}: no such file {base}")
    return base


def merged_raw(config_path: Path, overrides: list[str]) -> dict[str, Any]:
    """The config as its command will read it: laid over ``search.base`` when it names
    one, then the overrides."""
    from clray.jobs.config import apply_overrides, merge_tables, read_toml

    raw = read_toml(config_path)
    base = search_base(config_path)
    if base is not None:
        raw = merge_tables(read_toml(base), raw)
    return apply_overrides(raw, overrides)


def forwarded_env(names: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables named by ``--env``; a name that is not set is an error, not a silent
    omission (the job would fail later, on the cluster, with a worse message)."""
    from clray.jobs.run.worker import RECORD_BATCHES_ENV

    reserved = {"TOKENIZERS_PARALLELISM", "PYTHONWARNINGS", "DS_ACCELERATOR", RECORD_BATCHES_ENV}
    out: dict[str, str] = {}
    missing = []
    for name in names:
        if not name or "=" in name:
            raise SubmitError(f"--env {name!r}: give a variable name (its value is read from this shell), e.g. --env HF_HOME")
        if name in reserved:
            raise SubmitError(f"--env {name}: clray sets {name} for its workers itself; drop it")
        if name not in environ:
            missing.append(name)
        else:
            out[name] = environ[name]
    if missing:
        raise SubmitError(f"--env names variables that are not set here: {', '.join(missing)}; export them or drop --env")
    return out


def build_runtime_env(
    working_dir: str, *, deps: str, env_vars: Mapping[str, str], repo_root: Path = REPO_ROOT
) -> dict[str, Any]:
    """The job's runtime_env: the bundle, the pinned dependencies (``deps="pip"``) and
    exactly the variables the user forwarded."""
    runtime_env: dict[str, Any] = {"working_dir": working_dir}
    if deps == "pip":
        # pip_check off: Ray's pip check flags conflicts among the node image's own
        # packages too, which are not ours to fix.
        runtime_env["pip"] = {"packages": pinned_requirements(repo_root), "pip_check": False}
    elif deps != "none":
        raise SubmitError(f"--deps {deps!r}: use pip or none")
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def build_entrypoint(command: str, config_in_bundle: Path, overrides: list[str], extra: list[str],
                     workdir: str | None) -> str:
    """``python -m jobs.cli COMMAND CONFIG ...``, run in the bundle. With ``workdir`` (a
    head on this machine) the job first changes to that directory, so relative paths in
    the config mean what they mean to ``clray train`` here."""
    args = [command, str(config_in_bundle)] + [x for o in overrides for x in ("--set", o)] + extra
    if workdir is None:
        head = ["python", "-m", "clray.jobs.cli"]
    else:
        head = ["python", "-m", "clray.jobs.submit", "--cwd", workdir]
    return shlex.join(head + args)


def job_metadata(command: str, config_path: Path) -> dict[str, str]:
    """What ``clray jobs list/status`` show about a job: the command and the config's file
    name. Deliberately nothing from the environment or the config's contents."""
    return {"clray_command": command, "clray_config": config_path.name}


def remote_path_notes(command: str, raw: Mapping[str, Any]) -> list[str]:
    """Path-valued keys of a config that will be read on another machine."""
    notes = []
    for key in PATH_KEYS.get(command, ()):
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        value = node if node is not None else PATH_DEFAULTS.get(key)
        values = value if isinstance(value, list) else [value]
        local = [v for v in values if isinstance(v, str) and v != "char" and "://" not in v]
        if local:
            notes.append(f"{key} = {', '.join(map(repr, local))}")
    return notes


def validate_config(command: str, config: Path, overrides: list[str], same_machine: bool) -> dict[str, Any]:
    """Check the config before anything is uploaded; returns the raw TOML with overrides.

    On this machine (a loopback head) the full check runs, data shards included. For a remote
    cluster only the syntax and, for train, the schema: paths are checked where they are
    read, on the cluster. A search config is laid over its ``search.base`` first."""
    raw = merged_raw(config, overrides)
    if command == "train":
        from pydantic import ValidationError

        from clray.jobs.config import ConfigError, JobConfig, format_pydantic, load_config

        if same_machine:
            from clray.jobs.run.data import check_data

            # the shards and their columns too, with plain pyarrow, as `clray train` does
            # before it starts Ray: a job that would fail on its first line is not submitted
            check_data(load_config(config, overrides))
        else:
            try:
                JobConfig.model_validate(raw)
            except ValidationError as err:
                raise ConfigError(str(config), format_pydantic(err)) from None
    elif command == "mine" and same_machine:
        from clray.jobs.config.mine import load_mine_config

        load_mine_config(config, overrides)
    elif command == "tune" and same_machine:
        try:
            from clray.jobs.tune import load_tune_config  # type: ignore[import-not-found]
        except ImportError:  # a clray without `clray tune`: the job itself will say so
            return raw
        load_tune_config(config, overrides)
    return raw


def needed_cpus(command: str, raw: Mapping[str, Any]) -> int:
    """Logical CPUs a local head needs for this job (the same sum ``clray train`` uses)."""
    from clray.jobs.runtime import local_cpus, training_cpus

    needed = 0.0
    if command == "train":
        from clray.jobs.config import JobConfig

        try:
            needed = training_cpus(JobConfig.model_validate(raw))
        except Exception:  # validated already; a schema error would have stopped us
            pass
    return local_cpus(needed)


# --------------------------------------------------------------------------- local head


def local_head_path(environ: Mapping[str, str] | None = None) -> Path:
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
    num_cpus: int

    def alive(self) -> bool:
        if not _pid_runs(self.pid, self.temp_dir):
            return False
        try:
            import requests

            return _answers(requests.get(f"{self.address}/api/version", timeout=5))
        except Exception:
            return False

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the group (``ray start --block`` then stops its processes), then
        SIGKILL what is left; the temp dir goes too."""
        ours = _pid_runs(self.pid, self.temp_dir)
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


def _pid_runs(pid: int, temp_dir: str) -> bool:
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


def start_head(num_cpus: int, temp_root: str | None = None, timeout_s: float = 120.0) -> LocalHead:
    """Start a Ray head with its dashboard (the Jobs API) on 127.0.0.1 and wait until the
    Jobs API answers. Every port Ray would otherwise take at a fixed default is picked
    free, so the head coexists with other Ray instances on the machine; the temp dir is
    short because Ray's unix socket paths must fit in ~107 bytes."""
    temp_dir = tempfile.mkdtemp(prefix="clray-", dir=temp_root or "/tmp")
    gcs_port, dash_port = free_port(), free_port()
    ray_bin = [sys.executable, "-m", "ray.scripts.scripts"]
    cmd = ray_bin + [
        "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--num-cpus", str(num_cpus), "--temp-dir", temp_dir,
    ]
    env = dict(os.environ)
    # The job's `python` must be this Python (the one with clray's dependencies), also
    # when clray was started by path without activating its virtualenv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # the head process keeps writing it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    log.close()
    head = LocalHead(address=f"http://127.0.0.1:{dash_port}", gcs_address=f"127.0.0.1:{gcs_port}",
                     pid=proc.pid, temp_dir=temp_dir, num_cpus=num_cpus)
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
        if head.num_cpus < num_cpus:
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


# --------------------------------------------------------------------------- client


def auth_headers(address: str, token_env: str | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """HTTP headers for the Jobs API.

    ``--token-env NAME`` sends the value of NAME as a bearer token (a TLS proxy's or the
    cluster's Ray token). On loopback the local Ray token (``~/.ray/auth_token``,
    RAY_AUTH_TOKEN), which Ray 2.60's heads on this machine require once it exists, is
    sent as well; it never leaves the machine. To a remote address Ray's own client
    sends its token only when RAY_AUTH_MODE=token is set, as Ray documents."""
    environ = os.environ if environ is None else environ
    if token_env:
        if not environ.get(token_env):
            raise SubmitError(f"--token-env {token_env}: the variable {token_env} is not set (or empty) here")
        return {"Authorization": f"Bearer {environ[token_env]}"}
    if is_loopback(address):
        try:
            from ray._raylet import AuthenticationTokenLoader

            loader = AuthenticationTokenLoader.instance()
            if loader.has_token(ignore_auth_mode=True):
                return {"Authorization": f"Bearer {loader.get_raw_token(ignore_auth_mode=True)}"}
        except Exception:  # an older Ray without token auth: nothing to send
            return {}
    return {}


def connect(address: str, token_env: str | None = None) -> Any:
    """A JobSubmissionClient, or SubmitError saying why the address does not answer."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers(address, token_env))
    except SubmitError:
        raise
    except Exception as exc:
        raise SubmitError(_connection_message(address, exc)) from None


def _connection_message(address: str, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "uthentication" in type(exc).__name__ or "Unauthorized" in str(exc) or "401" in text:
        return (
            f"the Jobs API at {address} refused the request: the cluster uses token authentication. "
            "Set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's token, "
            "or --token-env NAME for a proxy's token"
        )
    return (
        f"cannot reach the Ray Jobs API at {address} ({text}): check that the head runs and that its "
        "dashboard port (8265 by default) is reachable from here, e.g. through `ray dashboard "
        "cluster/aws.yaml` or `kubectl port-forward`"
    )


def _call(address: str, fn: Callable[[], Any], job_id: str | None = None) -> Any:
    """Run one Jobs API call; a missing job or a dropped connection becomes SubmitError."""
    try:
        return fn()
    except SubmitError:
        raise
    except Exception as exc:
        message = str(exc)
        if job_id is not None and ("does not exist" in message or "404" in message):
            raise SubmitError(
                f"no job {job_id!r} on {address}: `clray jobs list --address {address}` shows the jobs there"
            ) from None
        if "ConnectionError" in type(exc).__name__ or "Connection" in message:
            raise SubmitError(_connection_message(address, exc)) from None
        raise SubmitError(f"the Jobs API at {address} answered: {message.strip()}") from None


# --------------------------------------------------------------------------- commands


@dataclass
class Submitted:
    submission_id: str
    address: str
    runtime_env: dict[str, Any]
    entrypoint: str


def submit(args: argparse.Namespace, say: Callable[[str], None], warn: Callable[[str], None]) -> Submitted:
    """Validate, bundle and submit; returns the submission (the id is printed by the CLI)."""
    config = Path(args.config).expanduser()
    if not config.is_file():
        raise SubmitError(f"no such config file: {config}")
    env_vars = forwarded_env(args.env, os.environ)  # before any Ray is started

    local_head = None
    if args.address or os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address, _ = resolve_jobs_address(args.address)
    else:
        address = ""
    same_machine = not address or is_loopback(address)
    raw = validate_config(args.job_command, config, args.overrides, same_machine)
    if not address:
        num_cpus = args.local_cpus or needed_cpus(args.job_command, raw)
        local_head = ensure_local_head(num_cpus, say)
        address = local_head.address
    deps = args.deps or ("none" if local_head is not None else "pip")

    warning = security_warning(address)
    if warning:
        warn(warning)
    if not same_machine:
        notes = remote_path_notes(args.job_command, raw)
        if notes:
            warn(
                "these config paths are read on the cluster, not on this machine: "
                + "; ".join(notes)
                + ". Every node must see them at that path (a shared filesystem) or they must be "
                "s3:// URIs; relative paths resolve inside the job's unpacked working directory, "
                "which Ray deletes later."
            )

    client = connect(address, args.token_env)
    with tempfile.TemporaryDirectory(prefix="clray-bundle-") as staging:
        config_in_bundle = stage_bundle(config, Path(staging))
        runtime_env = build_runtime_env(staging, deps=deps, env_vars=env_vars)
        entrypoint = build_entrypoint(
            args.job_command, config_in_bundle, args.overrides, args.extra,
            workdir=os.getcwd() if same_machine else None,
        )
        kwargs: dict[str, Any] = dict(
            entrypoint=entrypoint, runtime_env=runtime_env, metadata=job_metadata(args.job_command, config),
            submission_id=args.submission_id,
        )
        if args.num_cpus is not None:
            kwargs["entrypoint_num_cpus"] = args.num_cpus
        if args.num_gpus is not None:
            kwargs["entrypoint_num_gpus"] = args.num_gpus
        # submit_job zips and uploads the bundle before it returns, so the staging
        # directory can go right after.
        job_id = _call(address, lambda: client.submit_job(**kwargs))
    return Submitted(job_id, address, {**runtime_env, "working_dir": "<bundle>"}, entrypoint)


def follow_logs(address: str, job_id: str, token_env: str | None, write: Callable[[str], None]) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    client = connect(address, token_env)
    _call(address, lambda: client.get_job_status(job_id), job_id)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:
        # the log stream closes when the job ends; a dropped connection is an error
        if "Connection" in type(exc).__name__ or "Connection" in str(exc):
            raise SubmitError(_connection_message(address, exc)) from None
        raise
    # the stream can close a moment before the status turns terminal
    deadline = time.monotonic() + 30
    status = str(_call(address, lambda: client.get_job_status(job_id), job_id))
    while status_name(status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(_call(address, lambda: client.get_job_status(job_id), job_id))
    return status_name(status)


def status_name(status: Any) -> str:
    return str(getattr(status, "value", status)).split(".")[-1]


def job_info(address: str, job_id: str, token_env: str | None) -> Any:
    client = connect(address, token_env)
    return _call(address, lambda: client.get_job_info(job_id), job_id)


def list_jobs(address: str, token_env: str | None) -> list[Any]:
    client = connect(address, token_env)
    jobs = _call(address, client.list_jobs)
    return sorted(jobs, key=lambda j: j.start_time or 0)


def job_logs(address: str, job_id: str, token_env: str | None) -> str:
    client = connect(address, token_env)
    return _call(address, lambda: client.get_job_logs(job_id), job_id)


def stop_job(address: str, job_id: str, token_env: str | None) -> bool:
    client = connect(address, token_env)
    return bool(_call(address, lambda: client.stop_job(job_id), job_id))


def stop_local_head(say: Callable[[str], None]) -> int:
    head = read_local_head()
    path = local_head_path()
    if head is None:
        say(f"no local head recorded in {path}: nothing to stop")
        return 0
    head.stop()
    path.unlink(missing_ok=True)
    say(f"stopped the local Ray head at {head.address}")
    return 0


def _entry(argv: list[str]) -> int:
    """``python -m jobs.submit --cwd DIR COMMAND CONFIG ...``: the job's entrypoint on a
    head on the submitting machine; runs ``jobs.cli`` in DIR with the bundle's config."""
    if len(argv) < 4 or argv[0] != "--cwd":
        print("usage: python -m jobs.submit --cwd DIR COMMAND CONFIG [ARGS ...]", file=sys.stderr)
        return 2
    workdir, rest = argv[1], argv[2:]
    rest[1] = str(Path(rest[1]).absolute())  # the config, inside the bundle
    os.chdir(workdir)
    from clray.jobs.cli import main

    return main(rest)

