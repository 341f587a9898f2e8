"""``clray mine``: the batch-mining job (B3: teacher embeddings -> kNN graph -> communities
-> batches), with mined hard negatives, written as packed batches training reads whole.

Order: the config, the corpus schema, the ids and the teacher are checked on the driver
before Ray starts; then embed (Ray Data actor pool) -> search (Ray actors over query
chunks) -> graph, communities, plans, negatives (driver) -> packed Parquet per epoch ->
``manifest.json``, written last and atomically. Each stage's result is kept with the
parameters it came from (``pipelines.mining.stages``), so rerunning the same command after
a kill resumes, and the manifest and plans come out byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from clray.models.config import Strict
from clray.pipelines.config import DataConfig
from clray.pipelines.mining.config import MiningConfig, OutputConfig, TeacherConfig
from clray.pipelines.storage import StorageConfig


class MineConfig(Strict):
    data: DataConfig
    """The corpus, as in a training config: data.train shards, the anchor and positive
    views, id_column and (optional) label_column. data.eval is not mined."""
    teacher: TeacherConfig
    mining: MiningConfig
    output: OutputConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """How to reach s3:// URIs in data.train and output.dir; credentials from the AWS chain."""

    @model_validator(mode="after")
    def _no_negatives(self) -> MineConfig:
        if self.data.negatives is not None:
            raise ValueError(
                "data.negatives: the mining job writes hard negatives itself (mining.num_negatives); "
                "remove data.negatives from the mining config"
            )
        return self


def load_mine_config(path: str | Path, overrides: list[str] | None = None) -> MineConfig:
    from clray.jobs.config import apply_overrides, read_toml

    return validate_mine_config(apply_overrides(read_toml(path), overrides or []), str(path))


def validate_mine_config(raw: dict[str, Any], source: str = "config") -> MineConfig:
    from clray.jobs.config import ConfigError, _format_pydantic

    try:
        return MineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, _format_pydantic(err)) from None


@dataclass
class MineSummary:
    out_dir: str
    manifest: str
    rows: int
    quarantined_rows: int
    quarantine_path: str | None
    epochs: int
    batches_per_epoch: int
    remainder_per_epoch: list[int]
    statistics: dict[str, Any]
    resumed: dict[str, bool] = field(default_factory=dict)
    already_complete: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def _hash(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _corpus_fingerprint(files: list[str], storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    from clray.pipelines import storage as st_mod

    out = []
    for f in files:
        if st_mod.is_s3(f):
            fs, inner = st_mod.filesystem(f, storage)
            info = fs.get_file_info(inner)
            out.append({"file": f, "bytes": info.size, "mtime_ns": info.mtime_ns})
            continue
        st = os.stat(f)
        out.append({"file": f, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _check_ids(files: list[str], data_cfg: DataConfig, storage: StorageConfig | None = None) -> None:
    """Ids name rows in plans and negatives, so they must be unique over the corpus."""
    import pyarrow.parquet as pq

    from clray.pipelines.errors import DataError
    from clray.pipelines.storage import filesystem

    seen: dict[str, str] = {}
    dups: list[str] = []
    for f in files:
        fs, inner = filesystem(f, storage)
        for value in pq.read_table(inner, columns=[data_cfg.id_column], filesystem=fs).column(0).to_pylist():
            if value is None:
                continue  # quarantined as a null id
            key = str(value)
            if key in seen:
                dups.append(f"{key!r} ({seen[key]} and {f})")
            else:
                seen[key] = f
    if dups:
        shown = "; ".join(dups[:5])
        raise DataError(
            f"data.id_column = {data_cfg.id_column!r}: {len(dups)} id(s) appear on more than one row, e.g. "
            f"{shown}; mined plans and negatives name rows by id, so make the ids unique"
        )


def plan_columns(cfg: MineConfig) -> Any:
    from clray.pipelines.plan_format import PlanColumns

    m = cfg.mining
    neg = m.num_negatives > 0
    return PlanColumns(
        id=cfg.data.id_column,
        anchor=cfg.data.anchor.column,
        anchor_kind=cfg.data.anchor.kind,
        positive=cfg.data.positive.column,
        positive_kind=cfg.data.positive.kind,
        label=cfg.data.label_column,
        negatives=m.negatives_column if neg else None,
        negative_ids=m.negative_ids_column if neg else None,
        negative_scores=m.negative_scores_column if neg else None,
    )


def check_mine(cfg: MineConfig) -> list[str]:
    """Corpus files, schema, ids, teacher and column names: every problem before Ray."""
    from clray.pipelines import check_schema, resolve_shards
    from clray.pipelines.errors import DataError
    from clray.pipelines.mining.teacher import teacher_problems

    problems = teacher_problems(cfg.teacher, cfg.data)
    try:
        files = resolve_shards(cfg.data.train, "data.train", cfg.storage)
        check_schema(files, cfg.data, "data.train", cfg.storage)
        _check_ids(files, cfg.data, cfg.storage)
    except DataError as err:
        problems.extend(err.problems)
        files = []
    cols = plan_columns(cfg)
    taken = {cols.id, cols.anchor, cols.positive, cols.label, "epoch", "batch"}
    for key in ("negatives_column", "negative_ids_column", "negative_scores_column"):
        if cfg.mining.num_negatives and getattr(cfg.mining, key) in taken:
            problems.append(f"mining.{key} = {getattr(cfg.mining, key)!r} clashes with a corpus or plan column: rename it")
    if problems:
        raise DataError(problems)
    return files


def init_ray_for_mining(cfg: MineConfig, verbose: bool = False) -> None:
    from clray.jobs.train import start_ray

    # the teacher actors hold their CPUs for the whole embed stage; reads and writes need more
    start_ray(cfg.teacher.num_actors * cfg.teacher.cpus_per_actor + 2, {"TOKENIZERS_PARALLELISM": "false"}, verbose)


def _use_gpu(cfg: TeacherConfig) -> bool:
    import ray

    if cfg.use_gpu == "never":
        return False
    has = ray.cluster_resources().get("GPU", 0) > 0
    if cfg.use_gpu == "always" and not has:
        from clray.pipelines.errors import DataError

        raise DataError('teacher.use_gpu = "always" but the Ray cluster has no GPUs: use "auto" or "never"')
    return has


class MineError(Exception):
    """The job failed after it started; the message is meant for the user as-is."""


def run_mining(cfg: MineConfig, *, verbose: bool = False, overwrite: bool = False,
               on_event: Callable[[dict[str, Any]], None] | None = None) -> MineSummary:
    """Run (or resume, or confirm) the mining job for ``cfg``; returns its summary."""
    from clray.pipelines.mining import stages
    from clray.pipelines.mining.teacher import teacher_fingerprint, teacher_kind
    from clray.pipelines.plan_format import (
        MANIFEST_FORMAT,
        MANIFEST_NAME,
        MANIFEST_VERSION,
        PlanFormatError,
        columns_dict,
        read_manifest,
        write_json_atomic,
    )

    def event(name: str, **data: Any) -> None:
        if on_event:
            on_event({"event": name, **data})

    from clray.pipelines import storage as st

    started = time.perf_counter()
    files = check_mine(cfg)
    if st.is_s3(cfg.output.dir):
        # The plan goes to S3; the job works in a local staging directory that a killed
        # job finds again on the same machine (so the resume rules hold), and uploads the
        # plan at the end, manifest last.
        out_uri = st.normalize(cfg.output.dir)
        st.check_writable(out_uri, cfg.storage, "output.dir")
        out = staging_dir(out_uri)
    else:
        out = Path(cfg.output.dir).expanduser().absolute()
        out_uri = str(out)
    remote = out_uri != str(out)
    columns = plan_columns(cfg)
    teacher_fp = teacher_fingerprint(cfg.teacher)
    embed_fp = _hash({"data": cfg.data.model_dump(mode="json", include={"train", "anchor", "positive", "id_column",
                                                                           "label_column"}),
                      "corpus": _corpus_fingerprint(files, cfg.storage), "teacher": teacher_fp,
                      "teacher_cfg": cfg.teacher.model_dump(include={"pooling", "max_length", "kind"})})
    mining_params = {**cfg.mining.model_dump(mode="json"), "target_community_size": cfg.mining.target_community_size}
    plan_fp = _hash({"embed": embed_fp, "mining": mining_params, "format": MANIFEST_VERSION})

    manifest_path = out / MANIFEST_NAME
    final_manifest = st.join(out_uri, MANIFEST_NAME)
    if st.is_file(final_manifest, cfg.storage):
        try:
            existing = read_manifest(out_uri, cfg.storage)
        except PlanFormatError:
            existing = {}
        if existing.get("fingerprint") == plan_fp:
            event("complete", path=final_manifest)
            return _summary(out_uri, existing, already_complete=True)
        if not overwrite:
            raise MineError(
                f"{out_uri} already holds a complete plan mined with other settings, teacher or corpus "
                f"(its {MANIFEST_NAME} differs): pass --overwrite to replace it or set output.dir to a new directory"
            )
        st.delete(final_manifest, cfg.storage)
        manifest_path.unlink(missing_ok=True)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if (stages._read_json(work / "plan.json") or {}).get("fingerprint") != plan_fp:
        shutil.rmtree(out / "plans", ignore_errors=True)
        write_json_atomic(work / "plan.json", {"fingerprint": plan_fp})

    import ray

    from clray.jobs.train import _root_cause
    from clray.pipelines import quiet_ray_data
    from clray.pipelines.errors import DataError

    init_ray_for_mining(cfg, verbose)
    quiet_ray_data()
    seconds: dict[str, float] = {}
    resumed: dict[str, bool] = {}
    try:
        t0 = time.perf_counter()
        use_gpu = _use_gpu(cfg.teacher)
        resumed["embed"] = not stages.embed_corpus(files, cfg.data, cfg.teacher, work, embed_fp, use_gpu, cfg.storage)
        emb, report = stages.load_embeddings(work, out / "quarantine.parquet", "s3://" if st.is_s3(files[0]) else "")
        seconds["embed"] = time.perf_counter() - t0
        quarantine_at = st.join(out_uri, "quarantine.parquet") if report.quarantine_path else None
        event("quarantine", valid=report.valid_rows, quarantined=report.quarantined_rows,
              path=quarantine_at, reasons=report.reasons)
        event("embedded", rows=len(emb.ids), dim=int(emb.anchors.shape[1]), reused=resumed["embed"], gpu=use_gpu)

        n = len(emb.ids)
        if n <= cfg.mining.rank_min + 1:
            raise DataError(
                f"data.train: {n} valid rows leave no neighbours after skipping mining.rank_min = "
                f"{cfg.mining.rank_min}: mine a larger corpus or lower rank_min"
            )
        if n < cfg.mining.batch_size:
            raise DataError(f"data.train: {n} valid rows, fewer than one batch of mining.batch_size = "
                            f"{cfg.mining.batch_size}")
        k = min(cfg.mining.rank_max, n - 1)
        t0 = time.perf_counter()
        search_fp = _hash({"embed": embed_fp, "k": k, "index": cfg.mining.index, "nlist": cfg.mining.nlist,
                           "nprobe": cfg.mining.nprobe, "exact": cfg.mining.exact_threshold,
                           "chunk": cfg.mining.search_chunk_rows, "seed": cfg.mining.seed})
        neighbours, sims, search_info = stages.search(emb, cfg.mining, work, search_fp, k)
        resumed["search"] = search_info["chunks_searched"] < search_info["chunks"]
        seconds["search"] = time.perf_counter() - t0
        event("searched", **search_info)

        t0 = time.perf_counter()
        plans, statistics = stages.make_plans(emb, neighbours, sims, cfg.mining, k)
        statistics["search"] = {key: v for key, v in search_info.items() if key != "chunks_searched"}
        seconds["plan"] = time.perf_counter() - t0
        event("planned", statistics=statistics)

        t0 = time.perf_counter()
        corpus = stages._corpus_table(files, cfg.data, columns, emb.ids, cfg.storage)
        epochs = []
        for ep in plans:
            expected = math.ceil(len(ep.plan.batches) / cfg.mining.batches_per_file)
            written = stages.epoch_written(out, ep.epoch, expected)
            reused = resumed[f"epoch_{ep.epoch}"] = written is not None
            if written is None:
                written = stages.write_epoch(out, corpus, ep, columns, emb.ids, cfg.mining.batches_per_file)
            epochs.append({
                "epoch": ep.epoch, "seed": ep.seed, "num_batches": len(ep.plan.batches), "files": written,
                "remainder_ids": [emb.ids[i] for i in ep.plan.remainder.tolist()],
                "num_remainder": ep.plan.num_remainder, "topped_up_negatives": ep.topped_up,
                "least_similar_negatives": ep.least_similar,
                "packing": ep.plan.info,
            })
            event("written", epoch=ep.epoch, batches=len(ep.plan.batches), reused=reused)
        seconds["write"] = time.perf_counter() - t0
    except (DataError, MineError):
        raise
    except ray.exceptions.RayError as exc:
        root = _root_cause(exc)
        last = next((ln for ln in reversed(str(root).strip().splitlines()) if ln.strip()), type(root).__name__)
        (out / "error.log").write_text(repr(exc))
        if remote:
            st.upload(out / "error.log", st.join(out_uri, "error.log"), cfg.storage)
        raise MineError(f"mining failed: {type(root).__name__}: {last}\n  details: {st.join(out_uri, 'error.log')}") from None

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "fingerprint": plan_fp,
        "batch_size": cfg.mining.batch_size,
        "num_negatives": cfg.mining.num_negatives,
        "columns": columns_dict(columns),
        "rows": len(emb.ids),
        "quarantined_rows": report.quarantined_rows,
        "quarantine_path": "quarantine.parquet" if report.quarantine_path else None,
        "quarantine_reasons": report.reasons,
        "corpus": {"files": files},
        "teacher": {"path": cfg.teacher.path, "kind": teacher_kind(cfg.teacher), "fingerprint": teacher_fp,
                    "dim": int(emb.anchors.shape[1])},
        "parameters": mining_params,
        "epochs": epochs,
        "statistics": statistics,
    }
    write_json_atomic(manifest_path, manifest)
    seconds["total"] = time.perf_counter() - started
    write_json_atomic(out / "timings.json", {k: round(v, 3) for k, v in seconds.items()})
    if remote:
        publish_plan(out, out_uri, cfg.storage)
    return _summary(out_uri, manifest, resumed=resumed, seconds=seconds)


def staging_dir(out_uri: str) -> Path:
    """Local working copy of a plan directory on S3: ``$TMPDIR/clray-mine-<hash of the
    URI>``, the same on every start so a killed job resumes its stages; removed once the
    plan is uploaded."""
    import tempfile

    digest = hashlib.blake2b(out_uri.encode(), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / f"clray-mine-{digest}"


def publish_plan(local: Path, out_uri: str, storage: StorageConfig) -> None:
    """Upload a finished plan: plans and reports first, ``manifest.json`` last, so a reader
    on S3 sees a complete plan or none (the local rule). Plans of an earlier, replaced job
    are removed first; the work files stay behind (they are this machine's cache)."""
    from clray.pipelines import storage as st
    from clray.pipelines.plan_format import MANIFEST_NAME

    st.delete(st.join(out_uri, "plans"), storage)
    st.upload(local / "plans", st.join(out_uri, "plans"), storage)
    for name in ("quarantine.parquet", "timings.json"):
        if (local / name).is_file():
            st.upload(local / name, st.join(out_uri, name), storage)
        else:
            st.delete(st.join(out_uri, name), storage)
    st.upload(local / MANIFEST_NAME, st.join(out_uri, MANIFEST_NAME), storage)
    shutil.rmtree(local, ignore_errors=True)


def _summary(out: str | Path, manifest: dict[str, Any], *, already_complete: bool = False,
             resumed: dict[str, bool] | None = None, seconds: dict[str, float] | None = None) -> MineSummary:
    from clray.pipelines.storage import join

    epochs = manifest["epochs"]
    return MineSummary(
        out_dir=str(out),
        manifest=join(out, "manifest.json"),
        rows=manifest["rows"],
        quarantined_rows=manifest["quarantined_rows"],
        quarantine_path=join(out, manifest["quarantine_path"]) if manifest.get("quarantine_path") else None,
        epochs=len(epochs),
        batches_per_epoch=epochs[0]["num_batches"],
        remainder_per_epoch=[e["num_remainder"] for e in epochs],
        statistics=manifest["statistics"],
        resumed=resumed or {},
        already_complete=already_complete,
        seconds={k: round(v, 3) for k, v in (seconds or {}).items()},
    )
