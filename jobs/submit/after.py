"""``clray submit ... --after ID``: a job that starts its command only once job ID has
SUCCEEDED (for example ``clray submit train`` after the ``clray submit mine`` that writes
its batch plan).

Ray's Jobs API has no dependencies between jobs, so clray keeps them itself:

- at submission, every ID must name a job on the cluster that has not already FAILED or
  been STOPPED (``check_before_submit``); otherwise nothing is submitted;
- the job is submitted at once, with ``clray_after`` in its metadata (``clray jobs list``
  shows it), and its entrypoint is ``python -m clray.jobs.submit --after ID ...``. That
  entrypoint waits *on the cluster* (``wait_for_jobs``), so the submitting machine may go
  away; while it waits the job is RUNNING in Ray's eyes but holds no CPU (a job's driver
  reserves none unless ``--num-cpus`` asks), and its log says what it waits for;
- when every ID has SUCCEEDED the command runs; when one ends FAILED or STOPPED the job
  fails without running it, its message naming that job and its status.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from clray.jobs.submit.errors import SubmitError

AFTER_KEY = "clray_after"
"""The metadata key holding the ids a job waits for, comma-separated."""
FAILED_ENDS = ("FAILED", "STOPPED")


def status_name(status: Any) -> str:
    """'SUCCEEDED' from a JobStatus or its str ('JobStatus.SUCCEEDED'), for printing and comparing."""
    return str(getattr(status, "value", status)).split(".")[-1]


def check_before_submit(client: Any, address: str, ids: Sequence[str]) -> None:
    """Every id names a job on the cluster that can still succeed; else SubmitError."""
    for job_id in ids:
        try:
            info = client.get_job_info(job_id)
        except Exception as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                raise SubmitError(
                    f"--after {job_id}: there is no job {job_id!r} on {address} (`clray jobs list "
                    f"--address {address}` shows the jobs there)"
                ) from None
            raise SubmitError(f"--after {job_id}: the Jobs API at {address} answered: {str(exc).strip()}") from None
        status = status_name(info.status)
        if status in FAILED_ENDS:
            raise SubmitError(
                f"--after {job_id}: job {job_id} ended {status}"
                f"{_reason(info)}, so this job would never start; nothing was submitted. "
                f"Submit {job_id}'s work again and wait for the new id, or drop --after"
            )


def _reason(info: Any) -> str:
    message = (getattr(info, "message", None) or "").strip().splitlines()
    return f" ({message[-1]})" if message else ""


def wait_for_jobs(client: Any, ids: Sequence[str], say: Callable[[str], None], poll_s: float = 2.0,
                  sleep: Callable[[float], None] = time.sleep) -> str | None:
    """Poll until every job in ``ids`` has SUCCEEDED (returns None) or one has ended
    FAILED or STOPPED (returns the message this job fails with)."""
    waiting = list(ids)
    said: dict[str, str] = {}
    while waiting:
        for job_id in list(waiting):
            info = client.get_job_info(job_id)
            status = status_name(info.status)
            if status == "SUCCEEDED":
                say(f"clray: job {job_id} SUCCEEDED")
                waiting.remove(job_id)
            elif status in FAILED_ENDS:
                return (f"not started: job {job_id}, which this job runs after (--after), "
                        f"ended {status}{_reason(info)}")
            elif said.get(job_id) != status:
                say(f"clray: waiting for job {job_id} ({status}) before starting")
                said[job_id] = status
        if waiting:
            sleep(poll_s)
    return None


def cluster_jobs_client() -> Any:
    """The Jobs API of the cluster this job runs on, found from inside it: a submitted
    job's driver has RAY_ADDRESS=auto, and the cluster's context names its dashboard."""
    import ray
    from ray.job_submission import JobSubmissionClient

    from clray.jobs.submit.address import auth_headers

    context = ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    url = context.dashboard_url
    ray.shutdown()
    if not url:
        raise SubmitError("this cluster has no dashboard (Jobs API) to ask about the jobs to wait for")
    url = url if "://" in url else f"http://{url}"
    return JobSubmissionClient(url, headers=auth_headers(url, None))
