"""The batch-mining job (B3: teacher embeddings -> kNN graph -> communities -> batches),
with mined hard negatives, written as packed batches that training reads whole.

Order: the config, the corpus schema, the ids and the teacher are checked before Ray is
needed; then embed (Ray Data actor pool) -> search (Ray actors over query chunks) ->
graph, communities, plans, negatives (here) -> packed Parquet per epoch ->
``manifest.json``, written last and atomically. Each stage's result is kept with the
parameters it came from (``pipelines.mining.stages``), so running the same job again
after a kill resumes, and the manifest and plans come out byte-identical to an
uninterrupted run.

Both ``clray mine`` and a training run that re-mines between epochs run it; the caller
starts Ray (``start_ray``) and turns Ray's failures into its own message.
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

from clray.pipelines.errors import DataError, MineError
from clray.pipelines.mining.config import MineConfig, TeacherConfig
from clray.pipelines.spec import SplitSpec
from clray.pipelines.staging import Staging, kept_staging_dir
from clray.pipelines.storage import StorageConfig

STAGING_NAME = "mine"
ERROR_LOG = "error.log"
"""Written into the plan directory when a Ray stage fails: the full error."""


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


def _check_ids(split: SplitSpec) -> None:
    """Ids name rows in plans and negatives, so they must be unique over the corpus."""
    import pyarrow.parquet as pq

    data_cfg = split.data
    seen: dict[str, str] = {}
    dups: list[str] = []
    for f, path in zip(split.files, split.paths, strict=True):
        for value in pq.read_table(path, columns=[data_cfg.id_column], filesystem=split.filesystem).column(0).to_pylist():
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
        in_batch_scores=m.in_batch_scores_column if m.in_batch_scores else None,
    )


def check_mine(cfg: MineConfig) -> SplitSpec:
    """Corpus files, schema, ids, teacher and column names: every problem before Ray.
    Returns the corpus as the split every later stage reads (its files, column table and
    filesystem worked out once)."""
    from clray.pipelines.mining.teacher import teacher_problems
    from clray.pipelines.spec import resolve_split

    problems = teacher_problems(cfg.teacher, cfg.data)
    corpus: SplitSpec | None = None
    try:
        corpus = resolve_split(cfg.data, "train", cfg.storage)
        if corpus is not None:
            _check_ids(corpus)
    except DataError as err:
        problems.extend(err.problems)
    cols = plan_columns(cfg)
    taken = {cols.id, cols.anchor, cols.positive, cols.label, "epoch", "batch"}
    for key in ("negatives_column", "negative_ids_column", "negative_scores_column", "in_batch_scores_column"):
        used = cfg.mining.in_batch_scores if key == "in_batch_scores_column" else cfg.mining.num_negatives
        if used and getattr(cfg.mining, key) in taken:
            problems.append(f"mining.{key} = {getattr(cfg.mining, key)!r} clashes with a corpus or plan column: rename it")
    if problems:
        raise DataError(problems)
    assert corpus is not None  # DataConfig refuses an empty data.train
    return corpus


def mining_cpus(cfg: MineConfig) -> float:
    """Logical CPUs a mining job holds: the teacher actors for the whole embed stage,
    plus room for the reads and writes beside them."""
    return cfg.teacher.num_actors * cfg.teacher.cpus_per_actor + 2


def _use_gpu(cfg: TeacherConfig) -> bool:
    import ray

    if cfg.use_gpu == "never":
        return False
    has = ray.cluster_resources().get("GPU", 0) > 0
    if cfg.use_gpu == "always" and not has:
        raise DataError('teacher.use_gpu = "always" but the Ray cluster has no GPUs: use "auto" or "never"')
    return has


@dataclass
class _Job:
    """A checked job: its corpus, where it writes, and the fingerprints of its stages."""

    cfg: MineConfig
    corpus: SplitSpec
    out: Staging
    embed_fp: str
    plan_fp: str
    teacher_fp: str

    @property
    def work(self) -> Path:
        return self.out.local / "work"

    @property
    def files(self) -> list[str]:
        """The corpus files, as the manifest records them."""
        return list(self.corpus.files)


def _prepare(cfg: MineConfig, corpus: SplitSpec) -> _Job:
    from clray.pipelines.mining.teacher import teacher_fingerprint
    from clray.pipelines.plan_format import MANIFEST_VERSION

    # A plan on S3 is mined in a local staging directory that a killed job finds again on
    # the same machine (so the resume rules hold) and uploaded at the end, manifest last.
    out = Staging(cfg.output.dir, cfg.storage, "output.dir", name=STAGING_NAME, keep=True)
    teacher_fp = teacher_fingerprint(cfg.teacher)
    embed_fp = _hash({"data": cfg.data.model_dump(mode="json", include={"train", "anchor", "positive", "id_column",
                                                                           "label_column"}),
                      "corpus": _corpus_fingerprint(list(corpus.files), cfg.storage), "teacher": teacher_fp,
                      "teacher_cfg": cfg.teacher.model_dump(include={"pooling", "max_length", "kind"})})
    plan_fp = _hash({"embed": embed_fp, "mining": mining_parameters(cfg), "format": MANIFEST_VERSION})
    return _Job(cfg, corpus, out, embed_fp, plan_fp, teacher_fp)


def mining_parameters(cfg: MineConfig) -> dict[str, Any]:
    return {**cfg.mining.model_dump(mode="json"), "target_community_size": cfg.mining.target_community_size}


def _existing_plan(job: _Job, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a complete plan mined with these very settings (nothing to do), or
    None; a different complete plan is refused unless ``overwrite``, then removed."""
    from clray.pipelines import storage as st
    from clray.pipelines.plan_format import MANIFEST_NAME, PlanFormatError, read_manifest

    final_manifest = job.out.path(MANIFEST_NAME)
    if not st.is_file(final_manifest, job.cfg.storage):
        return None
    try:
        existing = read_manifest(job.out.uri, job.cfg.storage)
    except PlanFormatError:
        existing = {}
    if existing.get("fingerprint") == job.plan_fp:
        return existing
    if not overwrite:
        raise MineError(
            f"{job.out.uri} already holds a complete plan mined with other settings, teacher or corpus "
            f"(its {MANIFEST_NAME} differs): pass --overwrite to replace it or set output.dir to a new directory"
        )
    st.delete(final_manifest, job.cfg.storage)
    (job.out.local / MANIFEST_NAME).unlink(missing_ok=True)
    return None


def mine_plans(cfg: MineConfig, *, start_ray: Callable[[], None], overwrite: bool = False,
               on_event: Callable[[dict[str, Any]], None] | None = None) -> MineSummary:
    """Run (or resume, or confirm) the mining job for ``cfg``; returns its summary.

    ``start_ray`` is called once the driver-side checks passed and Ray is needed. A Ray
    failure propagates (with the full error in ``OUT/error.log``) for the caller to
    describe."""
    from clray.pipelines import quiet_ray_data
    from clray.pipelines.mining import stages
    from clray.pipelines.plan_format import write_json_atomic

    def event(name: str, **data: Any) -> None:
        if on_event:
            on_event({"event": name, **data})

    started = time.perf_counter()
    job = _prepare(cfg, check_mine(cfg))
    existing = _existing_plan(job, overwrite)
    if existing is not None:
        event("complete", path=job.out.path("manifest.json"))
        return summarize(job.out.uri, existing, already_complete=True)
    job.work.mkdir(parents=True, exist_ok=True)
    if (stages.read_json_or_none(job.work / "plan.json") or {}).get("fingerprint") != job.plan_fp:
        shutil.rmtree(job.out.local / "plans", ignore_errors=True)
        write_json_atomic(job.work / "plan.json", {"fingerprint": job.plan_fp})

    import ray

    start_ray()
    quiet_ray_data()
    try:
        manifest, resumed, seconds = _run_stages(job, event)
    except ray.exceptions.RayError as exc:
        (job.out.local / ERROR_LOG).write_text(repr(exc))
        job.out.publish(ERROR_LOG)
        raise
    seconds["total"] = time.perf_counter() - started
    write_json_atomic(job.out.local / "timings.json", {k: round(v, 3) for k, v in seconds.items()})
    _publish(job)
    return summarize(job.out.uri, manifest, resumed=resumed, seconds=seconds)


def staging_dir(out_uri: str) -> Path:
    """Where a plan bound for S3 is mined on this machine (removed once it is uploaded)."""
    return kept_staging_dir(out_uri, STAGING_NAME)


def error_log(cfg: MineConfig) -> str:
    """Where a failed job's full error is written."""
    from clray.pipelines import storage as st

    return st.join(st.normalize(cfg.output.dir), ERROR_LOG)


def _embed_and_search(job: _Job, event: Callable[..., None], seconds: dict[str, float],
                      resumed: dict[str, bool]) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    from clray.pipelines.mining import stages

    cfg = job.cfg
    t0 = time.perf_counter()
    use_gpu = _use_gpu(cfg.teacher)
    resumed["embed"] = not stages.embed_corpus(job.corpus, cfg.teacher, job.work, job.embed_fp, use_gpu)
    emb, report = stages.load_embeddings(job.work, job.out.local / "quarantine.parquet", job.corpus.file_scheme)
    seconds["embed"] = time.perf_counter() - t0
    quarantine_at = job.out.path("quarantine.parquet") if report.quarantine_path else None
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
    search_fp = _hash({"embed": job.embed_fp, "k": k, "index": cfg.mining.index, "nlist": cfg.mining.nlist,
                       "nprobe": cfg.mining.nprobe, "exact": cfg.mining.exact_threshold,
                       "chunk": cfg.mining.search_chunk_rows, "seed": cfg.mining.seed})
    neighbours, sims, search_info = stages.search(emb, cfg.mining, job.work, search_fp, k)
    resumed["search"] = search_info["chunks_searched"] < search_info["chunks"]
    seconds["search"] = time.perf_counter() - t0
    event("searched", **search_info)
    return emb, report, neighbours, sims, {"k": k, **search_info}


def _run_stages(job: _Job, event: Callable[..., None]) -> tuple[dict[str, Any], dict[str, bool], dict[str, float]]:
    """Embed, search, plan and write; returns the manifest (written), what was resumed and
    each stage's seconds."""
    from clray.pipelines.mining.plans import make_plans
    from clray.pipelines.mining.teacher import teacher_kind
    from clray.pipelines.plan_format import (
        MANIFEST_FORMAT,
        MANIFEST_NAME,
        MANIFEST_VERSION,
        columns_dict,
        write_json_atomic,
    )

    cfg = job.cfg
    seconds: dict[str, float] = {}
    resumed: dict[str, bool] = {}
    emb, report, neighbours, sims, search_info = _embed_and_search(job, event, seconds, resumed)
    k = search_info.pop("k")

    t0 = time.perf_counter()
    plans, statistics = make_plans(emb, neighbours, sims, cfg.mining, k)
    statistics["search"] = {key: v for key, v in search_info.items() if key != "chunks_searched"}
    seconds["plan"] = time.perf_counter() - t0
    event("planned", statistics=statistics)

    t0 = time.perf_counter()
    epochs = _write_epochs(job, emb, plans, resumed, event)
    seconds["write"] = time.perf_counter() - t0
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "fingerprint": job.plan_fp,
        "batch_size": cfg.mining.batch_size,
        "num_workers": cfg.mining.num_workers,
        "local_batch_size": cfg.mining.local_batch_size,
        "num_negatives": cfg.mining.num_negatives,
        "columns": columns_dict(plan_columns(cfg)),
        "rows": len(emb.ids),
        "quarantined_rows": report.quarantined_rows,
        "quarantine_path": "quarantine.parquet" if report.quarantine_path else None,
        "quarantine_reasons": report.reasons,
        "corpus": {"files": job.files},
        "teacher": {"path": cfg.teacher.path, "kind": teacher_kind(cfg.teacher), "fingerprint": job.teacher_fp,
                    "dim": int(emb.anchors.shape[1])},
        "parameters": mining_parameters(cfg),
        "epochs": epochs,
        "statistics": statistics,
    }
    write_json_atomic(job.out.local / MANIFEST_NAME, manifest)
    return manifest, resumed, seconds


def _write_epochs(job: _Job, emb: Any, plans: list[Any], resumed: dict[str, bool],
                  event: Callable[..., None]) -> list[dict[str, Any]]:
    """Each epoch plan as packed Parquet (kept when an earlier start wrote it whole)."""
    from clray.pipelines.mining import stages

    cfg = job.cfg
    corpus = stages.corpus_table(job.corpus, plan_columns(cfg), emb.ids)
    epochs = []
    for ep in plans:
        expected = math.ceil(len(ep.plan.batches) / cfg.mining.batches_per_file)
        written = stages.epoch_written(job.out.local, ep.epoch, expected)
        reused = resumed[f"epoch_{ep.epoch}"] = written is not None
        if written is None:
            written = stages.write_epoch(job.out.local, corpus, ep, plan_columns(cfg), emb.ids,
                                         cfg.mining.batches_per_file, emb)
        epochs.append({
            "epoch": ep.epoch, "seed": ep.seed, "num_batches": len(ep.plan.batches), "files": written,
            "remainder_ids": [emb.ids[i] for i in ep.plan.remainder.tolist()],
            "num_remainder": ep.plan.num_remainder, "topped_up_negatives": ep.topped_up,
            "least_similar_negatives": ep.least_similar,
            "packing": ep.plan.info,
        })
        event("written", epoch=ep.epoch, batches=len(ep.plan.batches), reused=reused)
    return epochs


def _publish(job: _Job) -> None:
    """Upload a finished plan on S3: plans and reports first, ``manifest.json`` last, so a
    reader on S3 sees a complete plan or none (the local rule). Plans of an earlier,
    replaced job are removed first; the staging directory goes once all is uploaded."""
    from clray.pipelines.plan_format import MANIFEST_NAME

    if not job.out.remote:
        return
    job.out.publish("plans", "quarantine.parquet", "timings.json", mirror=True)
    job.out.publish(MANIFEST_NAME)
    job.out.discard()


def summarize(out: str | Path, manifest: dict[str, Any], *, already_complete: bool = False,
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
