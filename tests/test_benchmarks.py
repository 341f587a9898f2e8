"""Benchmarks must not rot: every script in benchmarks/ runs end to end in its ``--tiny``
mode (sizes shrunk to seconds), so an API change that breaks one fails the suite.

The figures of a tiny run mean nothing; only that every code path of the script still
runs. Scripts that start Ray run in this process on the test session's Ray (one Ray
start shared by all); the others run as their own command, as a user would.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ON_RAY = ("train_loop", "vs_sentence_transformers", "mined_vs_random", "tune", "b3")
"""Scripts that train with clray (run_training, run_mining, run_tune): run in-process."""
STANDALONE = ("gradcache", "losses", "mining", "siglip_ring")


def load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_is_run_here_and_has_a_tiny_mode() -> None:
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert scripts == sorted(ON_RAY + STANDALONE), "a new benchmark script: add it to ON_RAY or STANDALONE"
    for name in scripts:
        assert "--tiny" in (BENCHMARKS / f"{name}.py").read_text(), f"benchmarks/{name}.py has no --tiny mode"


@pytest.mark.parametrize("name", STANDALONE)
def test_standalone_benchmark_runs_tiny(name: str) -> None:
    out = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--tiny"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stdout.strip(), f"benchmarks/{name}.py --tiny printed nothing"


@pytest.mark.parametrize("name", ON_RAY)
def test_training_benchmark_runs_tiny(ray_session: None, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    load(name).main(["--tiny"])  # tune's exit code says whether its goal was met: not at this size
    assert capsys.readouterr().out.strip(), f"benchmarks/{name}.py --tiny printed nothing"
