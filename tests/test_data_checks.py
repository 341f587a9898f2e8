"""The data problems of issue 14 point 6, each with its own message: duplicate ids
quarantined (all but the first) with their reason, files in a shard directory that are
not read listed, a shard with damaged pages named down to the row group, the per-epoch
remainder shown, and a run directory that cannot be written refused with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clray.jobs.cli import QUICKSTART_CONFIG, main
from clray.jobs.config import load_config
from clray.jobs.run.data import RunData, build_run_data, check_data, make_schedule
from clray.jobs.views import _data_lines
from clray.pipelines.errors import DataError
from clray.pipelines.integrity import unreadable_row_groups
from clray.pipelines.quickstart import write_quickstart_corpus
from clray.pipelines.validate import ValidationReport


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("checks-corpus")
    write_quickstart_corpus(out, bad_rows=0)
    return out


def config(corpus: Path, tmp_path: Path, *extra: str):  # noqa: ANN201 - JobConfig
    return load_config(QUICKSTART_CONFIG, [f'data.train="{corpus / "train"}"', f'data.eval="{corpus / "eval"}"',
                                           f'run.output_dir="{tmp_path / "runs"}"', *extra])


def test_files_in_a_shard_directory_that_are_not_read_are_listed(corpus: Path, tmp_path: Path) -> None:
    train = tmp_path / "train"
    train.mkdir()
    for shard in (corpus / "train").glob("*.parquet"):
        (train / shard.name).write_bytes(shard.read_bytes())
    (train / "more-rows.csv").write_text("id,caption\n")
    (train / "_SUCCESS").write_text("")  # a writer's marker: skipped without a word
    (train / "notes").mkdir()
    (train / "notes" / "readme.txt").write_text("about the corpus")
    spec = check_data(config(corpus, tmp_path, f'data.train="{train}"'))
    assert spec.warnings == [
        f"data.train: 2 file(s) in its shard directories are not Parquet and are not read: {train / 'more-rows.csv'}, "
        f"{train / 'notes' / 'readme.txt'}. Convert them to Parquet to train on them, or move them out (names "
        "starting with _ or . are skipped without a warning)"]
    assert check_data(config(corpus, tmp_path)).warnings == []


def damage_row_group(src: Path, dst: Path, row_group: int) -> None:
    """A copy of ``src`` with intact footer whose ``row_group``'s image pages are garbage."""
    table = pq.read_table(src)
    pq.write_table(table, dst, row_group_size=100, compression="snappy")
    column = pq.ParquetFile(dst).metadata.row_group(row_group).column(table.schema.names.index("image"))
    data = bytearray(dst.read_bytes())
    for i in range(column.data_page_offset + 40, column.data_page_offset + 240):
        data[i] ^= 0x5A
    dst.write_bytes(bytes(data))


def test_a_shard_with_damaged_pages_is_named_with_its_row_group(corpus: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    train = tmp_path / "train"
    train.mkdir()
    shards = sorted((corpus / "train").glob("*.parquet"))
    damage_row_group(shards[1], train / shards[1].name, row_group=2)
    (train / shards[0].name).write_bytes(shards[0].read_bytes())
    cfg = config(corpus, tmp_path, f'data.train="{train}"')
    spec = check_data(cfg)  # the footers are intact: the checks before Ray pass
    problems = unreadable_row_groups(spec.train)
    assert len(problems) == 1 and problems[0].startswith(
        f"data.train: {train / shards[1].name}: row group 2 of 4 (rows 200-299) cannot be decoded (OSError:")
    assert "rewrite the shard" in problems[0]

    # When the quarantine pass's read fails inside Ray, that is what the user is told.
    import clray.pipelines as pipelines

    def failing_read(*args: object, **kwargs: object) -> None:
        raise RuntimeError("ray.exceptions.RayTaskError(OSError): Couldn't deserialize thrift ... retry")

    monkeypatch.setattr(pipelines, "build_datasets", failing_read)
    with pytest.raises(DataError) as info:
        build_run_data(cfg, spec, str(tmp_path / "q.parquet"))
    assert str(info.value) == problems[0]


def test_the_per_epoch_remainder_is_shown(corpus: Path, tmp_path: Path) -> None:
    cfg = config(corpus, tmp_path)
    data = RunData(datasets={}, steps_per_epoch=11, num_rows=1438, has_eval=False,
                   report=ValidationReport(total_rows=1438, valid_rows=1438, quarantined_rows=0))
    schedule = make_schedule(cfg, data, None)
    assert schedule.remainder_rows == 1438 - 11 * 128 == 30
    from dataclasses import asdict

    from clray.jobs import events

    lines = _data_lines(events.DataEvent(plan=asdict(schedule), quarantined=0, quarantine_path=None, reasons={}))
    assert lines[1] == ("  30 rows per epoch do not fill a last global batch of 128 and sit that epoch out (which "
                        "ones changes with each epoch's shuffle)")


def test_an_unwritable_run_directory_exits_2_naming_the_path(corpus: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    code = main(["train", str(QUICKSTART_CONFIG), "--set", f'data.train="{corpus / "train"}"', "--set",
                 f'data.eval="{corpus / "eval"}"', "--set", f'run.output_dir="{blocker}"'])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{blocker} is a file, not a directory" in " ".join(err.split()) and "run.output_dir" in err


def test_duplicate_ids_are_quarantined_all_but_the_first(ray_session: None, corpus: Path, tmp_path: Path) -> None:
    from clray.pipelines import build_datasets

    train = tmp_path / "train"
    train.mkdir()
    shards = sorted((corpus / "train").glob("*.parquet"))
    first = pq.read_table(shards[0])
    ids = first.column("id").to_pylist()
    # 10 rows share one id: the first of them (row 3 of shard 0) stays, 9 go.
    ids[3:8] = ["dup"] * 5
    pq.write_table(first.set_column(0, "id", pa.array(ids)), train / shards[0].name)
    second = pq.read_table(shards[1])
    ids2 = second.column("id").to_pylist()
    ids2[:5] = ["dup"] * 5
    pq.write_table(second.set_column(0, "id", pa.array(ids2)), train / shards[1].name)
    cfg = config(corpus, tmp_path, f'data.train="{train}"', "data.eval=[]", 'data.cache="always"')
    spec = check_data(cfg)
    prepared = build_datasets(spec, quarantine_path=tmp_path / "q.parquet", seed=0)
    report = prepared.report
    total = first.num_rows + second.num_rows
    assert (report.total_rows, report.valid_rows, report.quarantined_rows) == (total, total - 9, 9)
    assert report.reasons == {"id: duplicate id": 9}
    rows = pq.read_table(tmp_path / "q.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["dup"] * 9
    assert all(r["reason"] == f"id: duplicate id (the first row with it, kept, is row 3 of {shards[0].name})"
               for r in rows)
    assert sorted(Path(r["file"]).name for r in rows) == [shards[0].name] * 4 + [shards[1].name] * 5
    # Training sees every id once: the kept "dup" row and no other.
    keys = [k for b in prepared.train.iter_batches(batch_size=None, batch_format="numpy") for k in b["id_key"]]
    assert len(keys) == len(set(keys)) == total - 9
    assert json.dumps(report.reasons)  # plain data, as the summary stores it
