"""Benchmarks must not rot: every script in benchmarks/ runs end to end in its ``--tiny``
mode (sizes shrunk to seconds), so an API change that breaks one fails the suite.

The figures of a tiny run mean nothing; only that every code path of the script still
runs. They run as their own command, as a user would; the ones that train start a local
Ray of their own, so conftest runs them first, before the session's shared Ray exists
(two Rays on one machine confuse Ray's state API, which the search benchmark uses).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from corpora import codesearch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ON_RAY = ("train_loop", "vs_sentence_transformers", "mined_vs_random", "tune", "b3", "remine_overlap")
"""Scripts that train with clray (run_training, run_mining, run_tune), each starting its own
local Ray: 1-2 minutes each on 2 cores, remine_overlap (2 epochs re-mined sequentially,
then 3 overlapped; overlap needs 3) about 3; about 11 minutes in all (2026-12-07)."""
STANDALONE = ("gradcache", "losses", "mining", "siglip_ring")


def test_every_benchmark_is_classified_and_has_a_tiny_mode() -> None:
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert scripts == sorted(ON_RAY + STANDALONE), "a new benchmark script: add it to ON_RAY or STANDALONE"
    for name in scripts:
        assert "--tiny" in (BENCHMARKS / f"{name}.py").read_text(), f"benchmarks/{name}.py has no --tiny mode"


def run_tiny(name: str, timeout: int, workdir: Path) -> None:
    """``benchmarks/NAME.py --tiny`` as its own command: it must exit 0 and print its figures.
    A script that keeps its work directory (``--workdir``; it defaults to a new one under
    /tmp) gets the test's own, so the suite leaves nothing behind; one that reads the
    codesearch corpus gets the one the tests found (``tests/corpora.py``): a script's own
    default is the ``shared/`` beside the repository, which a clone elsewhere lacks."""
    script = BENCHMARKS / f"{name}.py"
    command = [sys.executable, str(script), "--tiny"]
    if '"--workdir"' in script.read_text():
        command += ["--workdir", str(workdir)]
    if '"--corpus"' in script.read_text():
        command += ["--corpus", str(codesearch())]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stdout.strip(), f"benchmarks/{name}.py --tiny printed nothing"


@pytest.mark.parametrize("name", STANDALONE)
def test_standalone_benchmark_runs_tiny(name: str, tmp_path: Path) -> None:
    run_tiny(name, 600, tmp_path)


@pytest.mark.parametrize("name", ON_RAY)
def test_benchmark_on_ray_runs_tiny(name: str, tmp_path: Path) -> None:
    run_tiny(name, 900, tmp_path)
