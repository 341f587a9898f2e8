"""``python -m clray.jobs.submit --cwd DIR COMMAND CONFIG ...``: a submitted job's
entrypoint on a head on the submitting machine (what ``bundle.build_entrypoint`` writes
with a workdir). A program entry point, like ``clray.jobs.cli``: it dispatches to the CLI,
and no module of the package imports it."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def job_entry(argv: list[str]) -> int:
    """``python -m clray.jobs.submit --cwd DIR COMMAND CONFIG ...``: the job's entrypoint on a
    head on the submitting machine (what ``build_entrypoint`` writes with a workdir); runs
    ``clray.jobs.cli`` in DIR with the bundle's config."""
    if len(argv) < 4 or argv[0] != "--cwd":
        print("usage: python -m clray.jobs.submit --cwd DIR COMMAND CONFIG [ARGS ...]", file=sys.stderr)
        return 2
    workdir, rest = argv[1], argv[2:]
    rest[1] = str(Path(rest[1]).absolute())  # the config, inside the bundle
    os.chdir(workdir)
    from clray.jobs.cli import main

    return main(rest)


if __name__ == "__main__":
    sys.exit(job_entry(sys.argv[1:]))
