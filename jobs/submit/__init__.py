"""``clray submit`` and ``clray jobs``: run train, tune and mine through Ray's Jobs API.

A submission checks the config here, stages a bundle of clray's code and the config, pins
clray's dependencies, forwards only the variables named with ``--env`` and submits through the
head's dashboard; without an address it first starts (or reuses) a Ray head on this machine.

The parts, each with the reasons for its choices:

- ``address``: the Jobs API address (--address, RAY_ADDRESS, the recorded local head), the
  warning for plain HTTP to another machine, the token headers;
- ``bundle``: what a job carries (working_dir bundle, pinned pip list, forwarded variables,
  entrypoint, metadata) and the config check before upload; ``job_entry`` is the entrypoint
  ``python -m clray.jobs.submit --cwd DIR ...`` runs;
- ``head``: the local head, its state file and stopping it by its own process group;
- ``client``: connecting, submitting, following, listing and stopping jobs;
- ``errors``: SubmitError, the one error the CLI prints as a single line.

This module exports what ``clray.jobs.cli`` uses.
"""

from __future__ import annotations

from clray.jobs.submit.address import resolve_jobs_address
from clray.jobs.submit.client import (
    follow_logs,
    job_info,
    job_logs,
    list_jobs,
    status_name,
    stop_job,
    submit,
)
from clray.jobs.submit.errors import SubmitError
from clray.jobs.submit.head import stop_local_head
from clray.jobs.submit.simulate import start_recorded_head

__all__ = [
    "SubmitError",
    "follow_logs",
    "job_info",
    "job_logs",
    "list_jobs",
    "resolve_jobs_address",
    "start_recorded_head",
    "status_name",
    "stop_job",
    "stop_local_head",
    "submit",
]
