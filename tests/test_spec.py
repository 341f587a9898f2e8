"""pipelines.spec: a run's data facts (each split's column table and filesystem, the
checked towers, the data-task CPU budget) are worked out once on the driver by
``check_data``, and ``build_run_data`` builds every dataset from that ``DataSpec`` without
deriving any of them again. Ray Data is replaced by a recorder here, so no Ray starts."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_packed import read_train, write_plan

import clray.jobs.run.data  # noqa: F401  (imported before the counters patch every module)
import clray.pipelines.unpack  # noqa: F401
from clray.jobs.config import JobConfig, load_config
from clray.jobs.run.data import build_run_data, check_data
from clray.pipelines import dataset, sources, spec, storage
from clray.pipelines.dataset import build_datasets
from clray.pipelines.quickstart import write_quickstart_corpus
from clray.pipelines.unpack import build_packed_datasets
from clray.pipelines.validate import ValidationReport

QUICKSTART_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.toml"
NEGATIVES = ('data.negatives={column="negative_captions", kind="text"}', "data.num_negatives=2",
             'data.negative_id_column="negative_ids"', 'data.negative_score_column="negative_scores"')
DERIVATIONS = {
    "required_columns": sources.required_columns,
    "filesystem_for": storage.filesystem_for,
    "check_towers": spec.check_towers,
    "data_task_cpus": spec.data_task_cpus,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits-negatives")
    write_quickstart_corpus(out, hard_negatives=2)
    return out


@pytest.fixture
def derived(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Calls of each derivation, wherever a pipelines or jobs module imported it from."""
    calls: Counter[str] = Counter()
    for name, original in DERIVATIONS.items():

        def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kwargs)

        for module_name, module in list(sys.modules.items()):
            if module_name.startswith(("clray.pipelines", "clray.jobs")) and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counted)
    return calls


class FakeDataset:
    """Stands in for a lazy Ray Dataset: records how it was read and mapped."""

    def __init__(self, log: list[dict[str, Any]], **read: Any) -> None:
        self.log = log
        log.append({"op": "read_parquet", **read})

    def map_batches(self, fn: Any, **kwargs: Any) -> FakeDataset:
        self.log.append({"op": "map_batches", "fn": fn.__name__, **kwargs})
        return self

    def materialize(self) -> FakeDataset:
        return self

    def random_shuffle(self, **kwargs: Any) -> FakeDataset:
        self.log.append({"op": "random_shuffle", **kwargs})
        return self

    def randomize_block_order(self, **kwargs: Any) -> FakeDataset:
        return self

    def filter(self, **kwargs: Any) -> FakeDataset:
        self.log.append({"op": "filter", **kwargs})
        return self

    def limit(self, count: int) -> FakeDataset:
        return self

    def count(self) -> int:
        return 1000

    def to_arrow_refs(self) -> list[Any]:
        return []  # a cached set's blocks, which the workers read themselves (pipelines.cached)


@pytest.fixture
def ray_data_log(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Ray Data's reads and the quarantine pass, recorded instead of run."""
    import ray.data

    log: list[dict[str, Any]] = []
    monkeypatch.setattr(ray.data, "read_parquet", lambda paths, **kwargs: FakeDataset(log, paths=paths, **kwargs))

    def quarantine_pass(ds: FakeDataset, data_cfg: Any, anchor: Any, positive: Any, **kwargs: Any) -> ValidationReport:
        log.append({"op": "quarantine_pass", "data_cfg": data_cfg, **kwargs})
        return ValidationReport(total_rows=1000, valid_rows=1000, quarantined_rows=0)

    monkeypatch.setattr(dataset, "quarantine_pass", quarantine_pass)
    return log


def job_config(tmp_path: Path, *overrides: str) -> JobConfig:
    return load_config(QUICKSTART_CONFIG, [f'run.output_dir="{tmp_path / "runs"}"', *overrides])


def test_examples_run_derives_each_fact_once(
    corpus: Path, tmp_path: Path, derived: Counter[str], ray_data_log: list[dict[str, Any]]
) -> None:
    cfg = job_config(tmp_path, f'data.train="{corpus / "train"}"', f'data.eval="{corpus / "eval"}"', *NEGATIVES)
    data_spec = check_data(cfg)
    # One column table and one filesystem per split (eval reads no hard negatives), one
    # tower check and one CPU budget: all on the driver before Ray would start.
    assert derived == {"required_columns": 2, "filesystem_for": 2, "check_towers": 1, "data_task_cpus": 1}
    assert data_spec.train is not None and data_spec.eval is not None and data_spec.plan is None
    assert "negative_captions" in data_spec.train.columns and "negative_captions" not in data_spec.eval.columns

    data = build_run_data(cfg, data_spec, str(tmp_path / "quarantine.parquet"))
    assert derived == {"required_columns": 2, "filesystem_for": 2, "check_towers": 1, "data_task_cpus": 1}
    assert set(data.datasets) == {"train", "eval"} and data.steps_per_epoch == 1000 // 128
    assert data.cached is not None and data.cached.num_rows == 1000  # small enough for data.cache

    reads = [e for e in ray_data_log if e["op"] == "read_parquet"]
    assert len(reads) == 4  # quarantine + dataset, per split
    for read in reads:
        split = data_spec.train if read["paths"] == list(data_spec.train.paths) else data_spec.eval
        assert read["columns"] == list(split.columns) and read["num_cpus"] == data_spec.task_cpus
    assert all(e["num_cpus"] == data_spec.task_cpus for e in ray_data_log if e["op"] != "read_parquet")
    quarantined = [e["data_cfg"] for e in ray_data_log if e["op"] == "quarantine_pass"]
    assert quarantined == [data_spec.train.data, data_spec.eval.data]

    with pytest.raises(ValueError, match="spec is of examples mode"):
        build_packed_datasets(data_spec, num_workers=2, quarantine_path=tmp_path / "q.parquet")


def test_packed_run_derives_each_fact_once(
    corpus: Path, tmp_path: Path, derived: Counter[str], ray_data_log: list[dict[str, Any]]
) -> None:
    plan_dir = tmp_path / "plan"
    write_plan(plan_dir, read_train(corpus))  # two epoch plans of 7 and 6 batches of 32
    cfg = job_config(tmp_path, 'data.batches="packed"', f'data.train="{plan_dir}"', f'data.eval="{corpus / "eval"}"',
                     "train.global_batch_size=64", *NEGATIVES)
    data_spec = check_data(cfg)
    # The training table serves the plan's footer check and both epoch plans' reads.
    assert derived == {"required_columns": 2, "filesystem_for": 3, "check_towers": 1, "data_task_cpus": 1}
    assert data_spec.train is None and data_spec.plan is not None and len(data_spec.plan_epochs) == 2

    data = build_run_data(cfg, data_spec, str(tmp_path / "quarantine.parquet"))
    assert derived == {"required_columns": 2, "filesystem_for": 3, "check_towers": 1, "data_task_cpus": 1}
    assert set(data.datasets) == {"train_0", "train_1", "eval"} and data.steps_per_epoch == 3

    plan_reads = [e for e in ray_data_log if e["op"] == "read_parquet" and e["paths"] != list(data_spec.eval.paths)]
    assert [r["paths"] for r in plan_reads] == [list(split.paths) for split in data_spec.plan_epochs]
    assert all(r["columns"][2:] == list(data_spec.plan_epochs[0].columns) for r in plan_reads)
    assert all(e.get("num_cpus") == data_spec.task_cpus for e in ray_data_log if e["op"] != "quarantine_pass")

    with pytest.raises(ValueError, match="spec is packed"):
        build_datasets(data_spec, quarantine_path=tmp_path / "q.parquet", seed=0)
