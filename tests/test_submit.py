"""`clray submit` / `clray jobs`: what a submission sends (bundle, pinned dependencies,
forwarded variables and nothing else), address handling, the security warning and the
error messages; then one real job on a Ray head started by `ray start --head` on
loopback, followed to completion through the Jobs API."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import tomllib

from clray.jobs.cli import QUICKSTART_CONFIG, REPO_ROOT, main
from clray.jobs.submit import client as submit
from clray.jobs.submit.__main__ import job_entry

SECRET = "fake-secret-do-not-ship-7f3a"


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "https://ray.example.com", "http://head:8265/"])
def test_jobs_api_addresses_are_accepted(address: str) -> None:
    assert submit.parse_address(address) == address.rstrip("/")


@pytest.mark.parametrize(
    "address, says",
    [
        ("127.0.0.1:8265", "not a Jobs API address"),
        ("ray://head:10001", "not a Jobs API address"),
        ("auto", "not a Jobs API address"),
        ("http://:8265", "not a Jobs API address"),
        ("http://head:port", "port is not a number"),
        ("http://head:8265/api/jobs", "only scheme, host and port"),
    ],
)
def test_bad_addresses_name_the_fix(address: str, says: str) -> None:
    with pytest.raises(submit.SubmitError, match=says) as info:
        submit.parse_address(address)
    assert "http://HEAD:8265" in str(info.value)


def test_non_http_address_is_one_message_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["jobs", "list", "--address", "head:6379"]) == 2
    err = capsys.readouterr().err
    assert "not a Jobs API address" in err and "Traceback" not in err


def test_loopback_detection() -> None:
    for address in ("http://127.0.0.1:8265", "http://localhost:1", "http://[::1]:8265", "http://127.3.4.5:80"):
        assert submit.is_loopback(address), address
    for address in ("http://10.0.0.5:8265", "http://head.internal:8265", "https://ray.example.com"):
        assert not submit.is_loopback(address), address


def test_plain_http_to_another_machine_warns_about_authentication() -> None:
    warning = submit.security_warning("http://10.0.0.5:8265")
    assert warning is not None
    for words in ("has no authentication unless the cluster enables it", "token authentication",
                  "RAY_AUTH_TOKEN", "SSH tunnel", "https://", "--token-env"):
        assert words in warning, words
    assert submit.security_warning("http://127.0.0.1:8265") is None
    assert submit.security_warning("https://ray.example.com") is None


def test_jobs_address_comes_from_flag_then_ray_address_then_local_head(tmp_path: Path) -> None:
    env = {submit.STATE_DIR_ENV: str(tmp_path)}
    assert submit.resolve_jobs_address("http://h:1", env)[0] == "http://h:1"
    assert submit.resolve_jobs_address(None, {**env, "RAY_ADDRESS": "http://h:2"}) == ("http://h:2", "RAY_ADDRESS")
    # a GCS address in RAY_ADDRESS (what `clray train` joins) is not a Jobs API address
    with pytest.raises(submit.SubmitError, match="no Jobs API address"):
        submit.resolve_jobs_address(None, {**env, "RAY_ADDRESS": "auto"})
    # a recorded local head that no longer runs is not used
    (tmp_path / submit.LOCAL_HEAD_FILE).write_text(json.dumps(
        {"address": "http://127.0.0.1:9", "gcs_address": "127.0.0.1:8", "pid": 2**22 + 7,
         "temp_dir": str(tmp_path / "gone"), "num_cpus": 2}))
    with pytest.raises(submit.SubmitError, match="--address http://HEAD:8265"):
        submit.resolve_jobs_address(None, env)


# --------------------------------------------------------------------------- runtime_env


def test_pinned_requirements_follow_constraints() -> None:
    reqs = submit.pinned_requirements()
    constraints = dict(
        line.split("==") for line in (REPO_ROOT / ".ci" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert f"ray[data,default,train,tune]=={constraints['ray']}" in reqs
    assert f"deepspeed=={constraints['deepspeed']}" in reqs
    assert "torch>=2.3" in reqs  # the cluster's own (CUDA) torch satisfies it
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(reqs) == len(pyproject)
    for req in reqs:
        name = req.split("[")[0].split("=")[0].split(">")[0]
        if name in constraints:
            assert req.endswith(f"=={constraints[name]}"), req


def test_forwarded_env_is_only_what_is_named() -> None:
    environ = {"AWS_SECRET_ACCESS_KEY": SECRET, "HF_HOME": "/cache/hf"}
    assert submit.forwarded_env([], environ) == {}
    assert submit.forwarded_env(["HF_HOME"], environ) == {"HF_HOME": "/cache/hf"}
    with pytest.raises(submit.SubmitError, match="not set here: NOPE"):
        submit.forwarded_env(["HF_HOME", "NOPE"], environ)
    with pytest.raises(submit.SubmitError, match="clray sets DS_ACCELERATOR"):
        submit.forwarded_env(["DS_ACCELERATOR"], {"DS_ACCELERATOR": "cpu"})
    with pytest.raises(submit.SubmitError, match="give a variable name"):
        submit.forwarded_env(["A=b"], environ)


class RecordingClient:
    """Stands in for JobSubmissionClient in unit tests: records what would be submitted,
    including the files of the working_dir bundle at submission time."""

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}
        self.bundle: dict[str, bytes] = {}

    def submit_job(self, **kwargs: Any) -> str:
        self.kwargs = kwargs
        root = Path(kwargs["runtime_env"]["working_dir"])
        self.bundle = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return kwargs["submission_id"] or "raysubmit_recorded"


def tiny_config(path: Path, corpus: Path, out: Path, **train: Any) -> Path:
    raw = tomllib.loads(QUICKSTART_CONFIG.read_text())
    raw["run"]["output_dir"] = str(out)
    raw["data"]["train"] = str(corpus / "train")
    raw["data"].pop("eval")
    raw["train"].update({"epochs": 1, "max_steps": 2, "log_every": 1, **train})
    raw["scaling"]["num_workers"] = 1
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> RecordingClient:
    client = RecordingClient()
    monkeypatch.setattr(submit, "connect", lambda address, token_env=None: client)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("CLRAY_TEST_TOKEN", SECRET + "-token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return client


def test_submission_sends_bundle_pins_and_no_environment(
    recorded: RecordingClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "corpus" / "train").mkdir(parents=True)
    config = tiny_config(tmp_path / "elsewhere.toml", tmp_path / "corpus", tmp_path / "runs")
    # a remote cluster: the config is read there, so only its syntax and schema are checked here
    code = main(["submit", "train", str(config), "--address", "https://ray.example.com",
                 "--set", "optim.lr=1e-3", "--num-gpus", "0.5", "--num-cpus", "2",
                 "--submission-id", "job-1", "--", "--verbose"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "job-1" in out and "clray jobs logs job-1 --follow --address https://ray.example.com" in out

    kwargs = recorded.kwargs
    assert kwargs["submission_id"] == "job-1"
    assert kwargs["entrypoint_num_gpus"] == 0.5 and kwargs["entrypoint_num_cpus"] == 2
    assert shlex.split(kwargs["entrypoint"]) == [
        "python", "-m", "clray.jobs.cli", "train", "_submitted/elsewhere.toml", "--set", "optim.lr=1e-3", "--verbose"]
    runtime_env = kwargs["runtime_env"]
    assert set(runtime_env) == {"working_dir", "pip"}  # no env_vars unless asked for
    assert runtime_env["pip"]["packages"] == submit.pinned_requirements()
    assert kwargs["metadata"] == {"clray_command": "train", "clray_config": "elsewhere.toml"}
    # the bundle: clray's packages, configs and the submitted config; no caches, no data, no venv
    assert recorded.bundle["_submitted/elsewhere.toml"] == config.read_bytes()
    for name in ("clray/__init__.py", "clray/jobs/cli.py", "clray/jobs/submit/__init__.py", "clray/pipelines/__init__.py",
                 "clray/models/__init__.py", "clray/configs/quickstart.toml", "pyproject.toml"):
        assert name in recorded.bundle, name
    assert not [n for n in recorded.bundle if "__pycache__" in n or n.startswith((".venv", "data/", "runs/", ".git"))]
    # nothing from the environment anywhere in what was sent
    sent = json.dumps({k: v for k, v in kwargs.items() if k != "runtime_env"}) + json.dumps(
        {k: v for k, v in runtime_env.items() if k != "working_dir"})
    assert SECRET not in sent
    assert not [n for n, data in recorded.bundle.items() if SECRET.encode() in data]


def test_env_flag_forwards_exactly_the_named_variable(recorded: RecordingClient, tmp_path: Path) -> None:
    (tmp_path / "corpus" / "train").mkdir(parents=True)
    config = tiny_config(tmp_path / "c.toml", tmp_path / "corpus", tmp_path / "runs")
    assert main(["submit", "train", str(config), "--address", "https://ray.example.com",
                 "--env", "AWS_SECRET_ACCESS_KEY", "--deps", "none"]) == 0
    runtime_env = recorded.kwargs["runtime_env"]
    assert runtime_env["env_vars"] == {"AWS_SECRET_ACCESS_KEY": SECRET}
    assert "pip" not in runtime_env
    assert SECRET + "-token" not in json.dumps(recorded.kwargs, default=str)


def test_search_config_ships_with_its_base_and_passes_arguments_through(
    recorded: RecordingClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "configs").mkdir()
    base = tmp_path / "configs" / "train-base.toml"
    base.write_text(QUICKSTART_CONFIG.read_text())
    (tmp_path / "searches").mkdir()
    search = tmp_path / "searches" / "temp.toml"
    search.write_text('[search]\nbase = "../configs/train-base.toml"\nnum_trials = 4\n')
    assert main(["submit", "tune", str(search), "--address", "https://h", "--", "--resume"]) == 0
    assert shlex.split(recorded.kwargs["entrypoint"])[3:] == ["tune", "_submitted/temp.toml", "--resume"]
    shipped = tomllib.loads(recorded.bundle["_submitted/temp.toml"].decode())
    assert shipped == {"search": {"base": "base-train-base.toml", "num_trials": 4}}
    assert recorded.bundle["_submitted/base-train-base.toml"] == base.read_bytes()
    # the base's relative paths are what the cluster will read
    assert "data.train = 'data/quickstart/train'" in capsys.readouterr().err

    search.write_text('[search]\nbase = "missing.toml"\n')
    assert main(["submit", "tune", str(search), "--address", "https://h"]) == 2
    assert "search.base = 'missing.toml': no such file" in capsys.readouterr().err


def test_plain_http_submission_warns_and_lists_paths_the_cluster_reads(
    recorded: RecordingClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "rel.toml"
    raw = tomllib.loads(QUICKSTART_CONFIG.read_text())  # relative data paths, default-relative output
    raw["run"].pop("output_dir")
    config.write_text(tomli_w.dumps(raw))
    assert main(["submit", "train", str(config), "--address", "http://10.1.2.3:8265"]) == 0
    err = capsys.readouterr().err
    assert "plain HTTP on another machine" in err and "token authentication" in err
    assert "data.train = 'data/quickstart/train'" in err and "run.output_dir = 'runs'" in err
    assert "s3://" in err


def test_loopback_submission_checks_paths_here_and_runs_in_this_directory(
    recorded: RecordingClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    # same machine: the full config check runs before anything is sent
    assert main(["submit", "train", str(QUICKSTART_CONFIG), "--address", "http://127.0.0.1:8265"]) == 2
    err = capsys.readouterr().err
    assert "data/quickstart/train" in err and "Traceback" not in err and recorded.kwargs == {}

    (tmp_path / "corpus" / "train").mkdir(parents=True)
    _write_one_shard(tmp_path / "corpus" / "train")
    config = tiny_config(tmp_path / "c.toml", tmp_path / "corpus", tmp_path / "runs")
    assert main(["submit", "train", str(config), "--address", "http://127.0.0.1:8265"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert shlex.split(recorded.kwargs["entrypoint"])[:6] == [
        "python", "-m", "clray.jobs.submit", "--cwd", str(tmp_path), "train"]


def _write_one_shard(directory: Path) -> None:
    from clray.pipelines.quickstart import write_quickstart_corpus

    write_quickstart_corpus(directory.parent / "full", num_shards=1, bad_rows=0)
    (directory / "part-00000.parquet").write_bytes((directory.parent / "full" / "train" / "part-00000.parquet").read_bytes())


def test_submit_errors_before_contacting_anything(
    recorded: RecordingClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", "train", str(tmp_path / "missing.toml"), "--address", "https://h"]) == 2
    assert "no such config file" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[train]\nepochs = 'many'\n")
    assert main(["submit", "train", str(tmp_path / "bad.toml"), "--address", "https://h"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["submit", "train", str(QUICKSTART_CONFIG), "--address", "https://h", "--env", "NOT_SET_ANYWHERE"]) == 2
    assert "NOT_SET_ANYWHERE" in capsys.readouterr().err
    assert recorded.kwargs == {}


def test_unreachable_address_is_one_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from clray.jobs.cli import main as cli_main

    port = submit.free_port()  # nothing listens there
    assert cli_main(["jobs", "status", "x", "--address", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray Jobs API at http://127.0.0.1:{port}" in err and "Traceback" not in err


def test_the_job_entry_runs_the_cli_in_the_given_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "_submitted").mkdir(parents=True)
    (bundle / "_submitted" / "c.toml").write_text(QUICKSTART_CONFIG.read_text())
    workdir = tmp_path / "work"
    workdir.mkdir()
    seen: dict[str, Any] = {}

    def fake_main(argv: list[str]) -> int:
        seen.update(cwd=os.getcwd(), argv=argv)
        return 0

    monkeypatch.chdir(bundle)
    monkeypatch.setattr("clray.jobs.cli.main", fake_main)
    assert job_entry(["--cwd", str(workdir), "train", "_submitted/c.toml", "--set", "a.b=1"]) == 0
    assert seen == {"cwd": str(workdir), "argv": ["train", str(bundle / "_submitted" / "c.toml"), "--set", "a.b=1"]}


# --------------------------------------------------------------------------- --after


class Statuses:
    """A Jobs API stand-in whose jobs move through the given statuses, one per poll."""

    def __init__(self, **jobs: list[str]) -> None:
        self.jobs = {k.replace("_", "-"): list(v) for k, v in jobs.items()}

    def get_job_info(self, job_id: str) -> Any:
        from types import SimpleNamespace

        if job_id not in self.jobs:
            raise RuntimeError(f"Job {job_id} does not exist")
        seq = self.jobs[job_id]
        status = seq.pop(0) if len(seq) > 1 else seq[0]
        return SimpleNamespace(status=f"JobStatus.{status}", message="Job entrypoint command failed with exit code 1")


def test_after_waits_until_every_job_succeeded_and_refuses_when_one_failed() -> None:
    from clray.jobs.submit.after import check_before_submit, wait_for_jobs

    said: list[str] = []
    client = Statuses(mine=["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"], other=["SUCCEEDED"])
    assert wait_for_jobs(client, ["mine", "other"], said.append, sleep=lambda s: None) is None
    assert said == ["clray: waiting for job mine (PENDING) before starting", "clray: job other SUCCEEDED",
                    "clray: waiting for job mine (RUNNING) before starting", "clray: job mine SUCCEEDED"]

    refused = wait_for_jobs(Statuses(mine=["RUNNING", "FAILED"]), ["mine"], said.append, sleep=lambda s: None)
    assert refused is not None and "job mine" in refused and "ended FAILED" in refused and "exit code 1" in refused

    check_before_submit(Statuses(mine=["RUNNING"]), "http://h:1", ["mine"])  # can still succeed
    with pytest.raises(submit.SubmitError, match="--after gone: there is no job 'gone' on http://h:1"):
        check_before_submit(Statuses(), "http://h:1", ["gone"])
    with pytest.raises(submit.SubmitError, match="job mine ended STOPPED.*nothing was submitted"):
        check_before_submit(Statuses(mine=["STOPPED"]), "http://h:1", ["mine"])


def test_after_goes_into_the_entrypoint_and_the_metadata(recorded: RecordingClient, tmp_path: Path) -> None:
    recorded.get_job_info = Statuses(mine_1=["RUNNING"]).get_job_info  # type: ignore[attr-defined]
    (tmp_path / "corpus" / "train").mkdir(parents=True)
    config = tiny_config(tmp_path / "c.toml", tmp_path / "corpus", tmp_path / "runs")
    assert main(["submit", "train", str(config), "--address", "https://h", "--after", "mine-1"]) == 0
    assert shlex.split(recorded.kwargs["entrypoint"]) == [
        "python", "-m", "clray.jobs.submit", "--after", "mine-1", "train", "_submitted/c.toml"]
    assert recorded.kwargs["metadata"]["clray_after"] == "mine-1"


def test_the_job_entry_waits_then_runs_or_fails_without_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from clray.jobs.submit import after

    (tmp_path / "_submitted").mkdir()
    (tmp_path / "_submitted" / "c.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    ran: list[list[str]] = []
    monkeypatch.setattr("clray.jobs.cli.main", lambda argv: ran.append(argv) or 0)
    monkeypatch.setattr(after.time, "sleep", lambda s: None)
    monkeypatch.setattr(after, "cluster_jobs_client", lambda: Statuses(a=["RUNNING", "SUCCEEDED"], b=["FAILED"]))
    assert job_entry(["--after", "a", "train", "_submitted/c.toml"]) == 0
    assert ran == [["train", str(tmp_path / "_submitted" / "c.toml")]]
    assert job_entry(["--after", "a", "--after", "b", "train", "_submitted/c.toml"]) == 1
    assert len(ran) == 1 and "not started: job b" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real head


@pytest.fixture(scope="module")
def ray_head() -> Any:
    """`ray start --head` on loopback with the Jobs API, stopped at the end by its own
    process group and temp dir only (the session's in-process Ray, if any, stays)."""
    head = submit.start_head(num_cpus=3)
    yield head
    head.stop(grace_s=5)
    assert not submit.pid_runs(head.pid, head.temp_dir) and not Path(head.temp_dir).exists()


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")  # inside Ray's log tail
@pytest.mark.slow
def test_submit_follow_and_read_the_result(
    ray_head: submit.LocalHead, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from clray.pipelines.quickstart import write_quickstart_corpus

    corpus = tmp_path / "corpus"
    write_quickstart_corpus(corpus, num_shards=2, bad_rows=0)
    config = tiny_config(tmp_path / "tiny.toml", corpus, tmp_path / "runs")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("CLRAY_FORWARDED", "yes")
    address = ray_head.address
    started = time.perf_counter()
    # --deps none: this head runs this very Python (see the README on --deps pip)
    assert main(["submit", "train", str(config), "--address", address, "--deps", "none",
                 "--env", "CLRAY_FORWARDED", "--submission-id", f"clray-test-{os.getpid()}"]) == 0
    out = capsys.readouterr().out
    job_id = f"clray-test-{os.getpid()}"
    assert f"job {job_id}" in out and f"clray jobs logs {job_id} --follow" in out

    # --after: `after` waits on the cluster for the job above, then trains; `doomed` waits for
    # `stopped`, which is stopped while it waits, so both end without training. `stopped`
    # waits for a gate job that runs until the test stops it: were it to wait for the job
    # above, a fast machine could finish that job before the stop, and `stopped` would train.
    gate_id = f"gate-{os.getpid()}"
    submit.connect(address).submit_job(
        entrypoint="python -c 'import time; time.sleep(900)'", submission_id=gate_id)

    def submit_after(name: str, first: str) -> int:
        return main(["submit", "train", str(config), "--address", address, "--deps", "none",
                     "--set", f"run.name={name}", "--after", first, "--submission-id", f"{name}-{os.getpid()}"])

    after_id, stopped_id, doomed_id = (f"{n}-{os.getpid()}" for n in ("after", "stopped", "doomed"))
    assert submit_after("after", job_id) == 0
    assert submit_after("stopped", gate_id) == 0
    assert submit_after("doomed", stopped_id) == 0
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "200")  # one table row per job
    assert main(["jobs", "list", "--address", address]) == 0
    listing = capsys.readouterr().out
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.split("│")] for line in listing.splitlines())
            if len(cells) > 5}
    assert rows[after_id][2].endswith("(waiting)") and rows[after_id][5] == job_id, listing
    assert main(["jobs", "stop", stopped_id, "--address", address]) == 0
    assert main(["jobs", "stop", gate_id, "--address", address]) == 0

    assert main(["jobs", "logs", job_id, "--follow", "--address", address]) == 0
    logs = capsys.readouterr().out
    assert "step 2/2" in logs
    assert main(["jobs", "status", job_id, "--address", address]) == 0
    status = capsys.readouterr().out
    assert "SUCCEEDED" in status and "clray_config=tiny.toml" in status
    assert main(["jobs", "list", "--address", address]) == 0
    assert job_id in capsys.readouterr().out

    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["steps"] == 2 and Path(summary["export_dir"]).is_dir()
    info = submit.job_info(address, job_id, None)
    assert info.runtime_env["env_vars"] == {"CLRAY_FORWARDED": "yes"}
    assert SECRET not in json.dumps(info.runtime_env) + json.dumps(info.metadata)
    with capsys.disabled():  # the split between job overhead and the run, for `pytest -s`
        print(f"\nsubmit to SUCCEEDED: {time.perf_counter() - started:.1f} s, of which the run "
              f"itself {summary['wall_seconds']:.1f} s")

    assert main(["jobs", "status", "no-such-job", "--address", address]) == 2
    assert "no job 'no-such-job'" in capsys.readouterr().err

    assert main(["jobs", "logs", doomed_id, "--follow", "--address", address]) == 2
    captured = capsys.readouterr()
    assert f"not started: job {stopped_id}, which this job runs after (--after), ended STOPPED" in captured.out
    assert f"job {doomed_id} ended FAILED" in captured.err
    assert submit_after("late", stopped_id) == 2  # refused at submission: it could never start
    assert f"job {stopped_id} ended STOPPED" in capsys.readouterr().err
    assert main(["jobs", "logs", after_id, "--follow", "--address", address]) == 0
    logs = capsys.readouterr().out
    assert f"waiting for job {job_id} (RUNNING) before starting" in logs and "step 2/2" in logs
    assert json.loads((tmp_path / "runs" / "after" / "summary.json").read_text())["steps"] == 2
    assert not (tmp_path / "runs" / "stopped").exists() and not (tmp_path / "runs" / "doomed").exists()

    # Without --address, `clray jobs` finds the head recorded by `clray submit` (here: this
    # head, recorded as `clray submit` records the one it starts), and `jobs down` stops it.
    monkeypatch.setenv(submit.STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "state").mkdir()
    submit.local_head_path().write_text(ray_head.to_json())
    assert main(["jobs", "status", job_id]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "down"]) == 0
    assert f"stopped the local Ray head at {address}" in capsys.readouterr().out
    assert not submit.pid_runs(ray_head.pid, ray_head.temp_dir) and not submit.local_head_path().exists()
    assert main(["jobs", "list"]) == 2
    assert "no Jobs API address" in capsys.readouterr().err
