"""``python -m clray.jobs.submit --cwd DIR COMMAND CONFIG ...``: a submitted job's
entrypoint on a head on the submitting machine (see ``bundle.job_entry``)."""

import sys

from clray.jobs.submit.bundle import job_entry

sys.exit(job_entry(sys.argv[1:]))
