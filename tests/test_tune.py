"""clray tune: search-space checks before Ray, PBT's adopt step under ZeRO-2, and one
small ASHA search on the quickstart corpus that is killed half-way and resumed."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from process_group import free_port, init_gloo, spawn_ranks
from tune_configs import GOOD, PBT, REPO, TEMPERATURE, _search_toml, _write

from clray.jobs.cli import main
from clray.jobs.config import ConfigError, load_config
from clray.jobs.tune import CRASH_ENV, check_tune_config, load_tune_config
from clray.pipelines.quickstart import write_quickstart_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quickstart")
    write_quickstart_corpus(out, bad_rows=2)
    return out


def _problems(tmp_path: Path, corpus: Path, search: str, extra: str = "") -> str:
    path = _write(tmp_path / "tune.toml", _search_toml(corpus, tmp_path, search, extra))
    with pytest.raises(ConfigError) as err:
        load_tune_config(path)
    return str(err.value)


def test_a_good_search_parses_and_applies_trial_resources(tmp_path: Path, corpus: Path) -> None:
    job = load_tune_config(_write(tmp_path / "tune.toml", _search_toml(corpus, tmp_path, GOOD)))
    assert [d.key for d in job.dimensions] == [TEMPERATURE]
    assert job.base.train.eval_every == 8 and job.base.model.logit_scale.mode == "fixed"
    trial = job.trial_raw({TEMPERATURE: 0.5})
    assert trial["model"]["logit_scale"]["init_temperature"] == 0.5
    assert trial["scaling"]["num_workers"] == 1
    assert job.search_dir == tmp_path / "runs" / "search"


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ('"model.logit_scale.init_temp" = { uniform = [0.01, 0.1] }',
         "search.space.model.logit_scale.init_temp = 0.01: model.logit_scale.init_temp: unknown key"),
        (f'"{TEMPERATURE}" = {{ uniform = [0.1, 0.1] }}', "the range [0.1, 0.1] is empty"),
        (f'"{TEMPERATURE}" = {{ loguniform = [0.0, 0.1] }}', "loguniform needs a positive low bound"),
        (f'"{TEMPERATURE}" = {{ choice = [] }}', "choice = [] is empty"),
        (f'"{TEMPERATURE}" = {{ normal = [0, 1] }}', "unknown distribution 'normal'"),
        (f'"{TEMPERATURE}" = {{ uniform = [-0.1, 0.1] }}',
         f"search.space.{TEMPERATURE} = -0.1: {TEMPERATURE}: Input should be greater than 0"),
        ('"train.zero_stage" = { randint = [1, 2.5] }', "randint bounds must be integers"),
        # nested tables name keys too
        ("[search.space.optim]\nlr = { loguniform = [0, 1e-2] }", "search.space.optim.lr: loguniform needs a positive"),
    ],
)
def test_bad_search_spaces_fail_before_anything_starts_naming_the_key(
    tmp_path: Path, corpus: Path, space: str, expected: str
) -> None:
    search = f'metric = "eval/zero_shot_accuracy"\nnum_trials = 2\n[search.space]\n{space}'
    if space.startswith("[search.space."):
        search = f'metric = "eval/zero_shot_accuracy"\nnum_trials = 2\n{space}'
    assert expected in _problems(tmp_path, corpus, search)


@pytest.mark.parametrize(
    ("search", "extra", "expected"),
    [
        (f'metric = "eval/R@1"\nnum_trials = 2\n[search.space]\n"{TEMPERATURE}" = {{ uniform = [0.01, 0.1] }}', "",
         "search.metric = 'eval/R@1' is not reported by this config; choose one of eval/a2p_R@1"),
        (f'metric = "loss"\nmode = "min"\n[search.space]\n"{TEMPERATURE}" = {{ uniform = [0.01, 0.1] }}', "",
         'search.num_trials: required with search.algorithm = "random"'),
        (f'metric = "loss"\nmode = "min"\nnum_trials = 2\n[search.space]\n"{TEMPERATURE}" = {{ grid = [0.01, 0.1] }}',
         "", 'grid values need search.algorithm = "grid"'),
        (f'algorithm = "grid"\nnum_trials = 3\n[search.space]\n"{TEMPERATURE}" = {{ grid = [0.01, 0.1] }}', "",
         "search.num_trials = 3 but the grid has 2 points"),
        ('num_trials = 2\nscheduler = "pbt"\nmetric = "eval/zero_shot_accuracy"\n[search.space]\n'
         '"loss.symmetric" = { choice = [true, false] }', "", "search at least one of them"),
        (f'num_trials = 2\nmetric = "eval/zero_shot_accuracy"\n[search.space]\n"{TEMPERATURE}" = {{ uniform = [0.01, 0.1] }}',
         "eval_every = 0", 'search.scheduler = "asha" compares trials on mid-run evaluations: set train.eval_every'),
        ("num_trials = 2\n[search.space]\n", "", "search.space is empty"),
        (f'num_trials = 2\nmax_concurrent = 0\n[search.space]\n"{TEMPERATURE}" = {{ uniform = [0.01, 0.1] }}', "",
         "search.max_concurrent: Input should be greater than or equal to 1"),
    ],
)
def test_bad_search_settings_are_named(tmp_path: Path, corpus: Path, search: str, extra: str, expected: str) -> None:
    toml = _search_toml(corpus, tmp_path, search, extra)
    if extra == "eval_every = 0":
        toml = toml.replace("eval_every = 8\n", "")
    path = _write(tmp_path / "tune.toml", toml)
    with pytest.raises(ConfigError) as err:
        load_tune_config(path)
    assert expected in str(err.value)


def test_missing_search_table_and_base_file_are_named(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[search\] is missing"):
        check_tune_config({"data": {}}, "x.toml")
    path = _write(tmp_path / "tune.toml", '[search]\nbase = "nope.toml"\n')
    with pytest.raises(ConfigError, match=r"search.base = 'nope.toml': no such file"):
        load_tune_config(path)


def test_cli_reports_a_bad_space_with_exit_2_and_no_ray(tmp_path: Path, corpus: Path, capsys) -> None:
    import ray

    was_running = ray.is_initialized()
    bad = f'metric = "eval/zero_shot_accuracy"\nnum_trials = 2\n[search.space]\n"{TEMPERATURE}" = {{ loguniform = [-1, 1] }}'
    path = _write(tmp_path / "tune.toml", _search_toml(corpus, tmp_path, bad))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"search.space.{TEMPERATURE}" in err and "Traceback" not in err
    assert ray.is_initialized() == was_running
    assert not (tmp_path / "runs").exists()


def test_shipped_search_config_parses() -> None:
    job = load_tune_config(REPO / "configs" / "tune_quickstart.toml")
    assert job.search.scheduler == "asha" and job.search.max_concurrent == 2
    assert job.base.model.logit_scale.mode == "fixed" and job.base.train.eval_every > 0


# --------------------------------------- a trial's length is its run's, not the raw rows'


def _reported(job, run_total: int, steps: list[int], monkeypatch: pytest.MonkeyPatch, finish: bool) -> list[dict]:
    """What a trial reports to Tune when its run emits these events (rank 0's order: the
    data plan, then per evaluation step train, eval and checkpoint)."""
    import ray.tune

    from clray.jobs import events
    from clray.jobs.tune import TrialReporter

    reported: list[dict] = []
    monkeypatch.setattr(ray.tune, "report", lambda result, checkpoint=None: reported.append(result))
    reporter = TrialReporter(job, "/runs/search/trials/t", "t", "t", job.base.train.checkpoint_every)
    plan = {"steps_per_epoch": run_total // job.base.train.epochs, "total_steps": run_total}
    reporter.on_event(events.DataEvent(plan=plan, quarantined=2, quarantine_path=None, reasons={}).record())
    for step in steps:
        reporter.on_event(events.TrainEvent(metrics={"loss": 1.0 / step}, step=step, epoch=0, samples_seen=step * 96,
                                            temperature=0.1, lr=1e-3).record())
        reporter.on_event(events.EvalEvent(step=step, epoch=0, metrics={"eval/zero_shot_accuracy": step / 100,
                                                                        "eval_rows": 359}).record())
        reporter.on_event(events.CheckpointEvent(step=step).record())
    if finish:
        reporter.finish()
    return reported


def test_a_trial_that_ran_its_own_steps_is_complete_though_raw_rows_promise_more(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The corpus's footers count 1440 train rows, the run trains on the 1438 left after
    quarantine: at 96 rows a batch that is 15 against 14 steps an epoch. A trial that ran
    all 28 of its steps is COMPLETE (results, summary, live table), one ASHA ended at
    step 8 is STOPPED; the raw-row count (30) only bounds ASHA's max_t."""

    import pandas as pd
    import pyarrow.parquet as pq

    from clray.jobs.tune import live_status, trial_steps_bound, write_outputs
    from clray.pipelines import steps_per_epoch

    toml = _search_toml(corpus, tmp_path, GOOD).replace("max_steps = 24\n", "").replace(
        "global_batch_size = 64", "global_batch_size = 96")
    job = load_tune_config(_write(tmp_path / "tune.toml", toml))
    run_total = steps_per_epoch(1440 - 2, 96) * job.base.train.epochs  # the 2 bad rows are quarantined
    assert (run_total, trial_steps_bound(job)) == (28, 30)

    full = _reported(job, run_total, [8, 16, 24, 28], monkeypatch, finish=True)
    stopped = _reported(job, run_total, [8], monkeypatch, finish=False)
    assert full[-1]["step"] == 28 and full[-1]["done"] and full[-1]["run_name"] == "t"
    grid = [SimpleNamespace(path=str(tmp_path / name), config={TEMPERATURE: temperature}, error=None,
                            metrics=results[-1], metrics_dataframe=pd.DataFrame(results))
            for name, temperature, results in (("full", 0.1, full), ("stopped", 1.0, stopped))]
    summary = write_outputs(job, grid)
    rows = {r["trial_id"]: r for r in pq.read_table(tmp_path / "runs" / "search" / "results.parquet").to_pylist()}
    assert (rows["full"]["status"], rows["full"]["steps"]) == ("COMPLETE", 28)
    assert (rows["stopped"]["status"], rows["stopped"]["steps"]) == ("STOPPED", 8)
    assert summary.stopped_early == 1 and summary.best_trial == "full"
    terminated = SimpleNamespace(status="TERMINATED")
    assert live_status(terminated, full[-1]) == "COMPLETE" and live_status(terminated, stopped[-1]) == "STOPPED"


# ----------------------------------------------------------- PBT's adopt step (no Ray)


def _adopt_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    init_gloo(rank, 1, port)
    from clray.jobs.config import load_config
    from clray.jobs.run.engine import adopt_config, build_engine
    from clray.models.dual_encoder import DualEncoder

    cfg = load_config(REPO / "configs" / "quickstart.toml", ["scaling.num_workers=1", "optim.lr=1e-3", "train.zero_stage=2"])
    results = {}
    for how in ("adopt", "fill_only"):
        torch.manual_seed(0)
        engine = build_engine(DualEncoder(cfg.model), cfg, total_steps=20)
        for _ in range(5):
            engine.lr_scheduler.step()
        factor = engine.lr_scheduler.lr_lambdas[0](engine.lr_scheduler.last_epoch)
        new = cfg.model_copy(deep=True)
        new.optim.lr, new.model.logit_scale.init_temperature = 3e-3, 0.5
        if how == "adopt":
            adopt_config(engine, new)
        else:  # the naive change ZeRO's fp32 master copy undoes at the next step
            with torch.no_grad():
                engine.module.logit_scale.fill_(math.log(2.0))
        lr_after = engine.optimizer.param_groups[0]["lr"]
        # One step with a zero gradient: Adam's first update is zero, so the scale must stay.
        loss = engine.module.logit_scale.sum() * 0.0
        engine.backward(loss)
        engine.step()
        results[how] = {"lr": lr_after, "factor": factor, "log_scale": float(engine.module.logit_scale.detach()[0])}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_adopt_config_sets_lr_and_temperature_through_zero2_master_weights(tmp_path: Path) -> None:
    (result,) = spawn_ranks(_adopt_worker, (free_port(), str(tmp_path)), 1, tmp_path, timeout_s=240)
    adopted = result["adopt"]
    assert adopted["lr"] == pytest.approx(3e-3 * adopted["factor"])
    assert adopted["log_scale"] == pytest.approx(math.log(2.0), abs=1e-6)
    # Teeth: writing only the model parameter is undone by the optimizer's master copy.
    assert result["fill_only"]["log_scale"] == pytest.approx(math.log(1 / 0.07), abs=1e-5)


# ------------------------------------------- one ASHA search, killed half-way and resumed


def _trial_statuses(experiment: Path) -> dict[str, str]:
    (state_file,) = glob.glob(str(experiment / "experiment_state-*.json"))
    state = json.loads(Path(state_file).read_text())
    statuses = {}
    for entry in state["trial_data"]:
        trial = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        statuses[trial["trial_id"]] = trial["status"]
    return statuses


@pytest.fixture(scope="module")
def search(ray_session: None, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Start a 4-trial ASHA search (2 at a time) in a driver that dies hard once 2 trials
    have finished, then resume it in-process with `clray tune --resume`."""
    import ray

    out = tmp_path_factory.mktemp("tune")
    # Data paths relative to the working directory, as in configs/tune_quickstart.toml:
    # trials must read them from where the search started, not from Tune's trial dirs.
    assert Path.cwd() == REPO, "run the tests from the repository root"
    toml = _search_toml(corpus, out, GOOD).replace(f'"{corpus}/', f'"{os.path.relpath(corpus, REPO)}/')
    assert '"../' in toml
    config = _write(out / "tune.toml", toml)
    env = {**os.environ, CRASH_ENV: "2", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.run([sys.executable, "-m", "clray.jobs.cli", "tune", str(config)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    search_dir = out / "runs" / "search"
    statuses = _trial_statuses(search_dir / "tune")
    starts_before = (search_dir / "trial_starts.jsonl").read_text().splitlines()
    checkpointed_before = {p.parent.name for p in (search_dir / "trials").glob("*/checkpoint_*")}
    code = main(["tune", str(config), "--resume"])
    return {
        "first": first, "statuses_at_crash": statuses, "starts_before": starts_before, "code": code,
        "checkpointed_before": checkpointed_before, "dir": search_dir, "config": config,
    }


def test_asha_search_runs_trials_stops_some_early_and_writes_a_best_config(search: dict) -> None:
    import pyarrow.parquet as pq

    assert search["code"] == 0
    search_dir: Path = search["dir"]
    rows = pq.read_table(search_dir / "results.parquet").to_pylist()
    assert len(rows) == 4
    assert sorted(r[TEMPERATURE] for r in rows) == [0.05, 0.1, 1.0, 3.0]
    assert all(r["status"] in ("COMPLETE", "STOPPED") for r in rows), rows
    stopped = [r for r in rows if r["status"] == "STOPPED"]
    assert stopped, "ASHA stopped no trial early"
    assert all(r["steps"] < 24 for r in stopped) and all(r["steps"] == 24 for r in rows if r["status"] == "COMPLETE")
    assert all(r["metric_last"] is not None and r["evaluations"] >= 1 for r in rows)
    assert sum(r["steps"] for r in rows) < 4 * 24
    # Every trial was a real clray run with its own run directory and metrics.
    for row in rows:
        events = [json.loads(x) for x in (search_dir / "trials" / row["run_name"] / "metrics.jsonl").read_text().splitlines()]
        assert any(e["event"] == "eval" and e["step"] == row["steps"] for e in events)

    best = max((r for r in rows), key=lambda r: r["metric_last"])
    cfg = load_config(search_dir / "best.toml")  # parses as a training config
    assert cfg.model.logit_scale.init_temperature == best[TEMPERATURE]
    assert cfg.run.name == "search-best" and cfg.scaling.num_workers == 1
    summary = json.loads((search_dir / "summary.json").read_text())
    assert summary["best_trial"] == best["trial_id"] and summary["stopped_early"] == len(stopped)
    assert (search_dir / "results.csv").read_text().startswith("\"trial_id\"")
    for plot in summary["plots"]:
        assert Path(plot).stat().st_size > 1000


def test_stopped_and_killed_trials_give_their_resources_back(search: dict) -> None:
    """Tune kills the trials ASHA stops (and the killed driver's trials die with it); Ray
    Train must then free their workers' reservations, or later trials wait forever."""
    import time

    import ray

    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == total


def test_resumed_search_reruns_no_finished_trial(search: dict) -> None:
    first = search["first"]
    assert first.returncode == 3, first.stdout[-2000:] + first.stderr[-2000:]
    finished = {t for t, status in search["statuses_at_crash"].items() if status == "TERMINATED"}
    assert len(finished) >= 2, search["statuses_at_crash"]
    starts = [json.loads(line) for line in (search["dir"] / "trial_starts.jsonl").read_text().splitlines()]
    assert len(starts) > len(search["starts_before"]), "the resume started no trial"
    for trial in finished:
        assert sum(s["trial_id"] == trial for s in starts) == 1, f"finished trial {trial} ran again"
    # A trial that was running at the kill and had a checkpoint went on from it.
    for trial in search["checkpointed_before"] - finished:
        events = [json.loads(x) for x in (search["dir"] / "trials" / trial / "metrics.jsonl").read_text().splitlines()]
        assert any(e["event"] == "resumed" for e in events), f"{trial} restarted from scratch"


def test_checkpoint_step_is_read_from_the_directory_name() -> None:
    """How a resumed trial tells whether the checkpoint Tune holds is newer than the last
    one Ray Train registered for the run (jobs.worker restores the newer)."""

    from clray.jobs.run.location import checkpoint_step as _checkpoint_step

    assert _checkpoint_step(None) == -1
    assert _checkpoint_step("/runs/s/trials/t/checkpoint_00000024") == 24
    assert _checkpoint_step("s3://bucket/runs/s/trials/t/checkpoint_00000032/") == 32
    assert _checkpoint_step(SimpleNamespace(path="/runs/t/checkpoint_00000008")) == 8
    assert _checkpoint_step("/runs/t/export") == -1


@pytest.mark.slow
def test_pbt_copies_a_strong_trial_and_adopts_its_own_perturbed_config(
    ray_session: None, corpus: Path, tmp_path: Path
) -> None:
    """Two PBT trials, 16 steps, one decision at step 8 with both trials there (synch): the
    weaker one restarts from the stronger one's checkpoint in a new run directory and trains
    on with its own perturbed learning rate and temperature; no run trains past its end
    twice. (Asynchronous PBT compares a trial with whatever step the other reached, so
    whether two trials exploit at all depends on which ran ahead: not a test.)"""
    import pyarrow.parquet as pq

    config = _write(tmp_path / "tune.toml", _search_toml(corpus, tmp_path, PBT, steps=16))
    pointers = set(Path(tempfile.gettempdir()).glob("clray-tune-ptr-*"))
    assert main(["tune", str(config)]) == 0
    # Each checkpoint's pointer is staged in /tmp for Tune to persist, then removed; PBT
    # below restores from the persisted copy.
    assert set(Path(tempfile.gettempdir()).glob("clray-tune-ptr-*")) <= pointers
    search_dir = tmp_path / "runs" / "search"
    rows = pq.read_table(search_dir / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["COMPLETE", "COMPLETE"] and all(r["steps"] == 16 for r in rows)
    runs = {p.name: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
            for p in (search_dir / "trials").iterdir()}
    exploits = {name: events for name, events in runs.items() if "-" in name}
    assert exploits, f"PBT copied no trial: {sorted(runs)}"
    for name, events in exploits.items():
        adopted = next(e for e in events if e["event"] == "adopted")
        resumed = next(e for e in events if e["event"] == "resumed")
        assert resumed["step"] == 8
        trial_cfg = load_config(search_dir / "trials" / name / "config.toml")
        assert adopted["lr"] == pytest.approx(trial_cfg.optim.lr)
        assert adopted["temperature"] == pytest.approx(trial_cfg.model.logit_scale.init_temperature)
        # The adopted temperature is the one it trained with (fixed logit scale).
        assert next(e for e in events if e["event"] == "train")["temperature"] == pytest.approx(adopted["temperature"])
    for name, events in runs.items():
        assert sum(e["event"] == "end" for e in events) <= 1, f"{name} trained to its end twice"
    best = load_config(search_dir / "best.toml")
    assert best.model.logit_scale.mode == "fixed"
