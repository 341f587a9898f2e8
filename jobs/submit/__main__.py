"""``python -m clray.jobs.submit --cwd DIR COMMAND CONFIG ...``: a submitted job's
entrypoint on a head on the submitting machine."""

import sys

from clray.jobs.submit import _entry

sys.exit(_entry(sys.argv[1:]))
