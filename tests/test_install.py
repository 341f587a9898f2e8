"""clray installs under its own name: a wheel built from this checkout puts one package,
``clray``, into site-packages (jobs, pipelines and models inside it), so a user's own
``models`` package is never shadowed and never shadows clray.

The wheel goes into a fresh virtual environment; its dependencies (torch, Ray, ...) are
borrowed from the test's own environment through a path file, so the test installs
nothing from the network. That path file adds the directory to ``sys.path`` without
running the ``.pth`` files inside it, so the editable install of this checkout stays
invisible to the fresh environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomli_w
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A new virtualenv holding only the clray wheel (plus a path to the dependencies)."""
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    # Built from a copy: setuptools leaves build/ and *.egg-info behind in the tree it builds.
    source = tmp / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "runs", "data", "__pycache__", ".pytest_cache", ".ruff_cache"))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                 "-w", str(tmp / "dist"), str(source)], tmp, env)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp / "dist").glob("clray-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env)
    site = Path(purelib.stdout.strip())
    (site / "clray-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                     str(wheel)], tmp, env)
    assert installed.returncode == 0, installed.stderr
    return {"python": python, "clray": venv / "bin" / "clray", "site": site, "tmp": tmp, "env": env}


def test_wheel_holds_one_top_level_package(fresh_env: dict) -> None:
    site = fresh_env["site"]
    assert (site / "clray" / "jobs" / "cli.py").is_file()
    assert (site / "clray" / "configs" / "quickstart.toml").is_file()
    for name in ("jobs", "pipelines", "models"):
        assert not (site / name).exists(), f"{name} installed as a top-level package"
    env, tmp = fresh_env["env"], fresh_env["tmp"]
    gone = run([str(fresh_env["python"]), "-c", "import models"], tmp, env)
    assert gone.returncode != 0 and "No module named 'models'" in gone.stderr
    api = run([str(fresh_env["python"]), "-c",
               "import clray, clray.models.losses as losses; from clray import LossConfig, build_loss; "
               "print(clray.__file__); print(type(build_loss(LossConfig())).__name__)"], tmp, env)
    assert api.returncode == 0, api.stderr
    assert api.stdout.splitlines()[0].startswith(str(site))
    assert api.stdout.splitlines()[1] == "InfoNCE"


def test_cli_trains_beside_a_users_own_models_package(fresh_env: dict) -> None:
    """From a working directory holding a ``models`` package of the user's: the user's
    code imports theirs, and `clray --help` and a tiny `clray train` use clray's."""
    work = fresh_env["tmp"] / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "__init__.py").write_text('WHOSE = "the user\'s"\n')
    env = fresh_env["env"]
    mine = run([str(fresh_env["python"]), "-c", "import models; print(models.WHOSE)"], work, env)
    assert mine.stdout.strip() == "the user's", mine.stderr

    helped = run([str(fresh_env["clray"]), "--help"], work, env)
    assert helped.returncode == 0 and "train" in helped.stdout, helped.stderr

    from clray.pipelines.quickstart import write_quickstart_corpus

    write_quickstart_corpus(work / "data", bad_rows=0)
    raw = tomllib.loads((ROOT / "configs" / "quickstart.toml").read_text())
    raw["data"]["train"] = "data/train"
    raw["data"].pop("eval")
    raw["train"].update(max_steps=2, log_every=1)
    raw["scaling"]["num_workers"] = 1
    (work / "tiny.toml").write_text(tomli_w.dumps(raw))
    trained = run([str(fresh_env["clray"]), "train", "tiny.toml"], work, env, timeout=600)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    summary = (work / "runs" / "quickstart" / "summary.json").read_text()
    assert '"steps": 2' in summary
    assert (work / "runs" / "quickstart" / "export").is_dir()
