"""The Jobs API side of ``clray submit`` and ``clray jobs``: connecting (with the message
that says why an address does not answer), submitting a bundled job, and reading, following
and stopping jobs.

Every command here looks ``connect`` up in this module when it runs, so replacing
``client.connect`` (as the unit tests do with a recording client) reaches all of them; for
those tests this module also re-exports the names they use from the package's other modules.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clray.jobs.runtime import free_port
from clray.jobs.submit.address import (
    auth_headers,
    is_loopback,
    parse_address,
    resolve_jobs_address,
    security_warning,
)
from clray.jobs.submit.after import check_before_submit, status_name
from clray.jobs.submit.bundle import (
    build_entrypoint,
    build_runtime_env,
    forwarded_env,
    job_metadata,
    needed_cpus,
    pinned_requirements,
    remote_path_notes,
    stage_bundle,
    validate_config,
)
from clray.jobs.submit.errors import SubmitError
from clray.jobs.submit.head import (
    LOCAL_HEAD_FILE,
    STATE_DIR_ENV,
    LocalHead,
    ensure_local_head,
    local_head_path,
    pid_runs,
    start_head,
)

__all__ = [
    "TERMINAL", "Submitted", "connect", "submit", "follow_logs", "status_name", "job_info",
    "list_jobs", "job_logs", "stop_job", "SubmitError",
    # for tests/test_submit.py, which drives the package through this module (the one whose
    # `connect` it replaces) and may change only its import line
    "free_port", "parse_address", "is_loopback", "security_warning", "resolve_jobs_address",
    "pinned_requirements", "forwarded_env", "LOCAL_HEAD_FILE", "STATE_DIR_ENV", "LocalHead",
    "local_head_path", "start_head", "pid_runs",
]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
"""Job statuses after which nothing changes: follow_logs waits for one of them."""


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


@dataclass
class Submitted:
    """A finished submission: its id and address (what the CLI prints) and what was sent,
    the runtime_env's working_dir shown as ``<bundle>`` (that directory is gone once submit
    returns)."""

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
    after = list(getattr(args, "after", None) or [])
    check_before_submit(client, address, after)
    with tempfile.TemporaryDirectory(prefix="clray-bundle-") as staging:
        config_in_bundle = stage_bundle(config, Path(staging))
        runtime_env = build_runtime_env(staging, deps=deps, env_vars=env_vars)
        entrypoint = build_entrypoint(
            args.job_command, config_in_bundle, args.overrides, args.extra,
            workdir=os.getcwd() if same_machine else None, after=after,
        )
        kwargs: dict[str, Any] = dict(
            entrypoint=entrypoint, runtime_env=runtime_env, metadata=job_metadata(args.job_command, config, after),
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


def job_info(address: str, job_id: str, token_env: str | None) -> Any:
    """The Jobs API's JobDetails of one job (status, message, metadata, runtime_env)."""
    client = connect(address, token_env)
    return _call(address, lambda: client.get_job_info(job_id), job_id)


def list_jobs(address: str, token_env: str | None) -> list[Any]:
    """Every job on the cluster, oldest first, as `clray jobs list` prints them."""
    client = connect(address, token_env)
    jobs = _call(address, client.list_jobs)
    return sorted(jobs, key=lambda j: j.start_time or 0)


def job_logs(address: str, job_id: str, token_env: str | None) -> str:
    """A job's logs so far, as one string."""
    client = connect(address, token_env)
    return _call(address, lambda: client.get_job_logs(job_id), job_id)


def stop_job(address: str, job_id: str, token_env: str | None) -> bool:
    """Ask the cluster to stop a job; False when it had ended already."""
    client = connect(address, token_env)
    return bool(_call(address, lambda: client.stop_job(job_id), job_id))

