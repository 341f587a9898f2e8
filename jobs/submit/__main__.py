"""``python -m clray.jobs.submit [--after ID] [--cwd DIR] COMMAND CONFIG ...``: a submitted
job's entrypoint when it waits for other jobs or runs on a head on the submitting machine
(what ``bundle.build_entrypoint`` writes with ``after`` or a workdir). A program entry
point, like ``clray.jobs.cli``: it dispatches to the CLI, and no module of the package
imports it."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def job_entry(argv: list[str]) -> int:
    """``python -m clray.jobs.submit [--after ID ...] [--cwd DIR] COMMAND CONFIG ...``: a
    submitted job's entrypoint (what ``build_entrypoint`` writes for ``--after`` or a head
    on this machine). It waits on the cluster until every ``--after`` job has SUCCEEDED
    (fails, without running the command, if one ended FAILED or STOPPED), then runs
    ``clray.jobs.cli`` (in DIR, with ``--cwd``) with the bundle's config."""
    after: list[str] = []
    workdir = None
    rest = list(argv)
    while rest[:1] in (["--after"], ["--cwd"]) and len(rest) >= 2:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--after":
            after.append(value)
        else:
            workdir = value
    if len(rest) < 2:
        print("usage: python -m clray.jobs.submit [--after ID ...] [--cwd DIR] COMMAND CONFIG [ARGS ...]",
              file=sys.stderr)
        return 2
    rest[1] = str(Path(rest[1]).absolute())  # the config, inside the bundle
    if after:
        from clray.jobs.submit.after import cluster_jobs_client, wait_for_jobs

        refused = wait_for_jobs(cluster_jobs_client(), after, lambda text: print(text, flush=True))
        if refused:
            print(f"clray: {refused}", file=sys.stderr, flush=True)
            return 1
    if workdir is not None:
        os.chdir(workdir)
    from clray.jobs.cli import main

    return main(rest)


if __name__ == "__main__":
    sys.exit(job_entry(sys.argv[1:]))
