"""What a submitted job carries, checked before anything is uploaded.

- ``working_dir`` is a *bundle* staged in a temporary directory: clray's own packages
  (``clray/`` with jobs, pipelines, models and configs), ``pyproject.toml`` and the submitted config
  file. It is built from the packages, not by uploading the repository root with
  excludes, because a repository root also holds ``.venv``, ``data/``, ``runs/`` and
  whatever else a user keeps there (Ray refuses packages over a few hundred MiB), and
  because the config file may live anywhere on the submitting machine.
- ``pip`` lists clray's dependencies at the versions pinned in ``.ci/constraints.txt``
  (the versions clray is tested with). Ray builds one virtualenv per distinct list on
  each node, on top of the node's Python, so on an image that already holds those
  versions pip is satisfied without downloading; it still costs tens of seconds per
  node the first time. ``--deps none`` skips it for images that already have clray's
  dependencies, and is the default for the local head clray starts itself (it runs this
  very Python).
- ``env_vars`` holds only the variables the user names with ``--env NAME``. Nothing else
  from this machine's environment (AWS keys, tokens) goes into the runtime_env or the
  job metadata.
- the entrypoint is ``python -m clray.jobs.cli ...``, or on a head on this machine
  ``python -m clray.jobs.submit --cwd DIR ...`` (``job_entry`` in ``__main__``), which first changes to
  the submitting directory.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clray.jobs.submit.after import AFTER_KEY
from clray.jobs.submit.errors import SubmitError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
"""The clray package's directory: the repository root in a checkout (installed editable),
``site-packages/clray`` in an installed wheel."""

COMMANDS = ("train", "tune", "mine")
"""The commands `clray submit` sends; PATH_KEYS names the path-valued keys of each."""
BUNDLE_PACKAGE = "clray"
"""The bundle holds clray as the package it is installed as: clray/__init__.py (the
repository root's), clray/jobs, clray/pipelines, clray/models and clray/configs."""

BUNDLE_PACKAGES = ("jobs", "pipelines", "models")
BUNDLE_DATA = ("configs",)
BUNDLE_EXTRA = ("pyproject.toml",)
BUNDLE_CONFIG_DIR = "_submitted"
"""Where the submitted config lands inside the bundle (the job's working directory)."""

COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", "*.egg-info")
PATH_KEYS = {
    "train": ("data.train", "data.eval", "run.output_dir", "model.anchor.pretrained",
              "model.anchor.tokenizer", "model.positive.pretrained", "model.positive.tokenizer"),
    "tune": ("data.train", "data.eval", "run.output_dir", "model.anchor.pretrained",
             "model.anchor.tokenizer", "model.positive.pretrained", "model.positive.tokenizer"),
    "mine": ("data.train", "teacher.path", "output.dir"),
}
"""Config keys that name files; on a remote cluster they are read there, not here."""

PATH_DEFAULTS = {"run.output_dir": "runs"}


def pinned_requirements(repo_root: Path = REPO_ROOT) -> list[str]:
    """clray's dependencies as pip requirements, pinned to ``.ci/constraints.txt`` where
    it pins them (torch keeps its range: the cluster's own CUDA build satisfies it)."""
    from packaging.requirements import Requirement

    pyproject = repo_root / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        specs = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    else:  # an installed clray without its source tree
        from importlib.metadata import PackageNotFoundError, requires

        try:
            specs = [r for r in requires("clray") or [] if "extra ==" not in r]
        except PackageNotFoundError:
            raise SubmitError(
                "cannot find clray's dependency list (no pyproject.toml next to the jobs package and "
                "clray is not installed): submit from a clray checkout, or use --deps none on an "
                "image that has clray's dependencies"
            ) from None
    pins: dict[str, str] = {}
    constraints = repo_root / ".ci" / "constraints.txt"
    if constraints.is_file():
        for line in constraints.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                pins[_norm(req.name)] = str(req.specifier)
    out = []
    for spec in specs:
        req = Requirement(spec)
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        version = pins.get(_norm(req.name), str(req.specifier))
        out.append(f"{req.name}{extras}{version}")
    return out


def _norm(name: str) -> str:
    """A distribution name as pip compares it (PEP 503): case, _ and . do not matter."""
    return name.lower().replace("_", "-").replace(".", "-")


def stage_bundle(config_path: Path, staging_dir: Path, repo_root: Path = REPO_ROOT) -> Path:
    """Copy clray's code and the config into ``staging_dir``; returns the config's path
    relative to the bundle (the job's working directory)."""
    package = staging_dir / BUNDLE_PACKAGE
    package.mkdir()
    shutil.copy2(repo_root / "__init__.py", package / "__init__.py")
    for name in BUNDLE_PACKAGES:
        src = repo_root / name
        if not (src / "__init__.py").is_file():
            raise SubmitError(f"cannot bundle clray: {src} is not a package directory")
        shutil.copytree(src, package / name, ignore=COPY_IGNORE)
    for name in BUNDLE_DATA:
        if (repo_root / name).is_dir():
            shutil.copytree(repo_root / name, package / name, ignore=COPY_IGNORE)
    for name in BUNDLE_EXTRA:
        if (repo_root / name).is_file():
            shutil.copy2(repo_root / name, staging_dir / name)
    target = Path(BUNDLE_CONFIG_DIR) / config_path.name
    (staging_dir / BUNDLE_CONFIG_DIR).mkdir()
    base = search_base(config_path)
    if base is None:
        shutil.copy2(config_path, staging_dir / target)
        return target
    # A search config lays itself over `search.base`, a path relative to the config: ship
    # that file too, next to the config, and point the shipped copy at it.
    from clray.jobs.config import read_toml

    bundled_base = f"base-{base.name}"
    shutil.copy2(base, staging_dir / BUNDLE_CONFIG_DIR / bundled_base)
    raw = read_toml(config_path)
    raw["search"]["base"] = bundled_base
    import tomli_w

    (staging_dir / target).write_text(tomli_w.dumps(raw))
    return target


def search_base(config_path: Path) -> Path | None:
    """The training config a search config names in ``search.base`` (relative to the
    search config), or None; SubmitError when it names a missing file."""
    from clray.jobs.config import read_toml

    search = read_toml(config_path).get("search")
    name = search.get("base") if isinstance(search, dict) else None
    if name is None:
        return None
    base = (config_path.parent / str(name)).expanduser()
    if not base.is_file():
        raise SubmitError(f"{config_path}: search.base = {name!r}: no such file {base}")
    return base


def merged_raw(config_path: Path, overrides: list[str]) -> dict[str, Any]:
    """The config as its command will read it: laid over ``search.base`` when it names
    one, then the overrides."""
    from clray.jobs.config import apply_overrides, merge_tables, read_toml

    raw = read_toml(config_path)
    base = search_base(config_path)
    if base is not None:
        raw = merge_tables(read_toml(base), raw)
    return apply_overrides(raw, overrides)


def forwarded_env(names: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables named by ``--env``; a name that is not set is an error, not a silent
    omission (the job would fail later, on the cluster, with a worse message)."""
    from clray.jobs.run.worker import RECORD_BATCHES_ENV

    reserved = {"TOKENIZERS_PARALLELISM", "PYTHONWARNINGS", "DS_ACCELERATOR", RECORD_BATCHES_ENV}
    out: dict[str, str] = {}
    missing = []
    for name in names:
        if not name or "=" in name:
            raise SubmitError(f"--env {name!r}: give a variable name (its value is read from this shell), e.g. --env HF_HOME")
        if name in reserved:
            raise SubmitError(f"--env {name}: clray sets {name} for its workers itself; drop it")
        if name not in environ:
            missing.append(name)
        else:
            out[name] = environ[name]
    if missing:
        raise SubmitError(f"--env names variables that are not set here: {', '.join(missing)}; export them or drop --env")
    return out


def build_runtime_env(
    working_dir: str, *, deps: str, env_vars: Mapping[str, str], repo_root: Path = REPO_ROOT
) -> dict[str, Any]:
    """The job's runtime_env: the bundle, the pinned dependencies (``deps="pip"``) and
    exactly the variables the user forwarded."""
    runtime_env: dict[str, Any] = {"working_dir": working_dir}
    if deps == "pip":
        # pip_check off: Ray's pip check flags conflicts among the node image's own
        # packages too, which are not ours to fix.
        runtime_env["pip"] = {"packages": pinned_requirements(repo_root), "pip_check": False}
    elif deps != "none":
        raise SubmitError(f"--deps {deps!r}: use pip or none")
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def build_entrypoint(command: str, config_in_bundle: Path, overrides: list[str], extra: list[str],
                     workdir: str | None, after: list[str] | None = None) -> str:
    """``python -m clray.jobs.cli COMMAND CONFIG ...``, run in the bundle. With ``workdir`` (a
    head on this machine) the job first changes to that directory, so relative paths in
    the config mean what they mean to ``clray train`` here; with ``after`` it first waits
    on the cluster for those jobs to succeed (``submit/after.py``)."""
    args = [command, str(config_in_bundle)] + [x for o in overrides for x in ("--set", o)] + extra
    if workdir is None and not after:
        return shlex.join(["python", "-m", "clray.jobs.cli"] + args)
    head = ["python", "-m", "clray.jobs.submit"] + [x for job in after or [] for x in ("--after", job)]
    if workdir is not None:
        head += ["--cwd", workdir]
    return shlex.join(head + args)


def job_metadata(command: str, config_path: Path, after: list[str] | None = None) -> dict[str, str]:
    """What ``clray jobs list/status`` show about a job: the command, the config's file
    name and the jobs it waits for. Deliberately nothing from the environment or the
    config's contents."""
    meta = {"clray_command": command, "clray_config": config_path.name}
    if after:
        meta[AFTER_KEY] = ",".join(after)
    return meta


def remote_path_notes(command: str, raw: Mapping[str, Any]) -> list[str]:
    """Path-valued keys of a config that will be read on another machine."""
    notes = []
    for key in PATH_KEYS.get(command, ()):
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        value = node if node is not None else PATH_DEFAULTS.get(key)
        values = value if isinstance(value, list) else [value]
        local = [v for v in values if isinstance(v, str) and v != "char" and "://" not in v]
        if local:
            notes.append(f"{key} = {', '.join(map(repr, local))}")
    return notes


def validate_config(command: str, config: Path, overrides: list[str], same_machine: bool) -> dict[str, Any]:
    """Check the config before anything is uploaded; returns the raw TOML with overrides.

    On this machine (a loopback head) the full check runs, data shards included. For a remote
    cluster only the syntax and, for train, the schema: paths are checked where they are
    read, on the cluster. A search config is laid over its ``search.base`` first."""
    raw = merged_raw(config, overrides)
    if command == "train":
        from pydantic import ValidationError

        from clray.jobs.config import ConfigError, JobConfig, format_pydantic, load_config

        if same_machine:
            from clray.jobs.run.data import check_data

            # the shards and their columns too, with plain pyarrow, as `clray train` does
            # before it starts Ray: a job that would fail on its first line is not submitted
            check_data(load_config(config, overrides))
        else:
            try:
                JobConfig.model_validate(raw)
            except ValidationError as err:
                raise ConfigError(str(config), format_pydantic(err)) from None
    elif command == "mine" and same_machine:
        from clray.jobs.config.mine import load_mine_config

        load_mine_config(config, overrides)
    elif command == "tune" and same_machine:
        from clray.jobs.config.search import load_tune_config

        load_tune_config(config, overrides)
    return raw


def needed_cpus(command: str, raw: Mapping[str, Any]) -> int:
    """Logical CPUs a local head needs for this job (the same sum ``clray train`` uses)."""
    from clray.jobs.runtime import local_cpus, training_cpus

    needed = 0.0
    if command == "train":
        from clray.jobs.config import JobConfig

        try:
            needed = training_cpus(JobConfig.model_validate(raw))
        except Exception:  # validated already; a schema error would have stopped us
            pass
    return local_cpus(needed)
