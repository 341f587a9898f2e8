"""Where the tests find ``shared/corpora/codesearch``, the real corpus some of them slice.

The ``shared/`` beside the repository comes first (a checkout in /work/main, or CI's
/check/work/main); a clone elsewhere (/tmp/fresh) falls back to the development machine's
/work/shared; ``CLRAY_CODESEARCH`` names another copy. A missing corpus fails the test that
needs it with the places looked in, never skips it."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLACES = (REPO.parent / "shared" / "corpora" / "codesearch", Path("/work/shared/corpora/codesearch"))


def codesearch() -> Path:
    """The codesearch corpus directory (its ``train/`` and ``eval/`` splits)."""
    named = os.environ.get("CLRAY_CODESEARCH")
    places = (Path(named),) if named else PLACES
    for place in places:
        if (place / "train").is_dir() and (place / "eval").is_dir():
            return place
    raise FileNotFoundError(
        "the codesearch corpus (train/ and eval/) is in none of: " + ", ".join(map(str, places))
        + "; set CLRAY_CODESEARCH to its directory")
