"""The stages of ``clray mine`` that touch Ray or the disk: embed, search, write (the
plans between search and write are pure numpy: ``pipelines.mining.plans``).

Each stage leaves its result in the plan directory's ``work/`` (or ``plans/``) under a name
that only appears once the result is whole (a temporary name, then ``os.replace``), with
the parameters it was made from. A rerun keeps every result whose parameters still match
and redoes the rest, so a job killed at any point ends with the same output as one that
never stopped. Every place that touches Ray is marked ``# [ray]``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clray.pipelines.errors import DataError
from clray.pipelines.mining.config import MiningConfig, TeacherConfig
from clray.pipelines.mining.core import NegativeSample, build_index, knn_range
from clray.pipelines.mining.plans import Embeddings, MinedEpoch
from clray.pipelines.plan_format import (
    BATCH_COLUMN,
    EPOCH_COLUMN,
    PlanColumns,
    epoch_dir,
    write_json_atomic,
)
from clray.pipelines.spec import SplitSpec

CRASH_ENV = "CLRAY_MINE_CRASH_AFTER"
"""Fault injection for the resume tests: ``embed``, ``search-chunk`` or ``epoch`` makes
the process exit at once (like a kill) right after that unit of work is saved."""


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(3)


def read_json_or_none(path: Path) -> dict[str, Any] | None:
    """A stage's parameter file, or None when it is missing or unreadable: either way the
    stage's result is not known to match and is made again."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


# ----------------------------------------------------------------------------- embed


def embed_corpus(
    split: SplitSpec,
    teacher_cfg: TeacherConfig,
    work: Path,
    fingerprint: str,
    use_gpu: bool,
) -> bool:
    """Embed every valid row of the corpus ``split`` (checked by ``check_mine``) with the
    teacher (Ray Data, an actor pool) into ``work/embeddings/``; returns False when
    embeddings for ``fingerprint`` already exist.

    Batches keep the corpus order (``preserve_order``), so each teacher forward sees the
    same rows on every run and a redone stage gives bit-identical embeddings."""
    import ray.data  # [ray]

    from clray.pipelines.mining.teacher import TeacherEmbedder
    from clray.pipelines.reading import read_shards

    marker = work / "embeddings.json"
    final = work / "embeddings"
    if (read_json_or_none(marker) or {}).get("fingerprint") == fingerprint and final.is_dir():
        return False
    marker.unlink(missing_ok=True)
    tmp = work / "embeddings.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ctx = ray.data.DataContext.get_current()  # [ray]
    previous = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        ds = read_shards(split, include_paths=True, num_cpus=0.5)
        embedded = ds.map_batches(  # [ray]
            TeacherEmbedder,
            fn_constructor_kwargs={"teacher_cfg": teacher_cfg, "data_cfg": split.data, "use_gpu": use_gpu},
            batch_format="pyarrow",
            batch_size=max(teacher_cfg.batch_size, teacher_cfg.block_rows),  # sorted by length within it
            compute=ray.data.ActorPoolStrategy(size=teacher_cfg.num_actors),  # [ray]
            num_cpus=teacher_cfg.cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
            **({"resources": dict(teacher_cfg.resources)} if teacher_cfg.resources else {}),
        )
        embedded.write_parquet(str(tmp))  # [ray]
    finally:
        ctx.execution_options.preserve_order = previous
    _replace_dir(tmp, final)
    write_json_atomic(marker, {"fingerprint": fingerprint})
    crash_point("embed")
    return True


def load_embeddings(work: Path, quarantine_path: Path, file_scheme: str = "") -> tuple[Embeddings, Any]:
    """The embed stage's good rows sorted by id (the row numbering of every later stage),
    and its bad rows written to ``quarantine_path`` (id, reason, file; removed when there
    are none) with a report. ``file_scheme`` ("s3://" for a corpus on S3) goes back in
    front of the file names, which Ray reports inside their filesystem ("bucket/key")."""
    from collections import Counter

    from clray.pipelines.validate import QUARANTINE_SCHEMA, ValidationReport, write_atomic

    table = pq.read_table(work / "embeddings")
    bad = table.filter(table.column("reason").is_valid())
    bad = bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
    if file_scheme and bad.num_rows:
        named = [None if f is None else file_scheme + f for f in bad.column("file").to_pylist()]
        bad = bad.set_column(2, "file", pa.array(named, pa.string()))
    bad = bad.sort_by([("file", "ascending"), ("id", "ascending")])
    table = table.filter(table.column("reason").is_null())
    if bad.num_rows:
        write_atomic(bad, quarantine_path)
    else:
        quarantine_path.unlink(missing_ok=True)
    report = ValidationReport(
        total_rows=table.num_rows + bad.num_rows, valid_rows=table.num_rows, quarantined_rows=bad.num_rows,
        reasons=dict(sorted(Counter(bad.column("reason").to_pylist()).items())),
        quarantine_path=str(quarantine_path) if bad.num_rows else None,
    )
    if table.num_rows < 2:
        raise DataError(f"data.train: only {table.num_rows} valid row(s) to mine; see {report.quarantine_path} "
                        "for each bad row's reason")
    # Ids are unique: pipelines.mining.job.check_mine checked the whole corpus before any work.
    table = table.sort_by([("id", "ascending")])
    ids = table.column("id").to_pylist()

    def matrix(name: str) -> np.ndarray:
        col = table.column(name).combine_chunks()
        return np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), -1)

    labels = table.column("label").to_numpy() if "label" in table.column_names else None
    return Embeddings(ids=ids, anchors=matrix("anchor_emb"), positives=matrix("positive_emb"),
                      labels=None if labels is None else labels.astype(np.int64)), report


# ----------------------------------------------------------------------------- search


def _searcher_class() -> Any:
    import ray  # [ray]

    @ray.remote  # [ray]
    class Searcher:
        """Holds the index and both views once; answers query ranges."""

        def __init__(self, index_bytes: np.ndarray, positives: np.ndarray, anchors: np.ndarray, threads: int):
            import faiss

            faiss.omp_set_num_threads(threads)
            self.index = faiss.deserialize_index(index_bytes)
            self.positives = positives
            self.anchors = anchors

        def search(self, start: int, stop: int, k: int, nprobe: int) -> tuple[int, np.ndarray, np.ndarray]:
            nb, sims = knn_range(self.index, self.positives, start, stop, k, nprobe=nprobe, queries=self.anchors)
            return start, nb, sims

    return Searcher


def search(emb: Embeddings, cfg: MiningConfig, work: Path, fingerprint: str, k: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """k nearest positives of every anchor (self excluded), the queries split in chunks of
    ``search_chunk_rows`` over ``search_actors`` Ray actors. Each finished chunk is saved
    (``work/knn/``), as is the index, so a rerun searches only what is missing."""
    import faiss
    import ray  # [ray]

    n = len(emb.ids)
    knn_dir = work / "knn"
    params = knn_dir / "params.json"
    if (read_json_or_none(params) or {}).get("fingerprint") != fingerprint:
        shutil.rmtree(knn_dir, ignore_errors=True)
        knn_dir.mkdir(parents=True)
        write_json_atomic(params, {"fingerprint": fingerprint})
    index_path = knn_dir / "index.faiss"
    if index_path.is_file():
        index = faiss.read_index(str(index_path))
    else:
        index = build_index(emb.positives, index=cfg.index, exact_threshold=cfg.exact_threshold, nlist=cfg.nlist,
                            seed=cfg.seed)
        tmp = knn_dir / ".index.faiss.tmp"
        faiss.write_index(index, str(tmp))
        os.replace(tmp, index_path)
    chunks = [(a, min(n, a + cfg.search_chunk_rows)) for a in range(0, n, cfg.search_chunk_rows)]

    def part(start: int) -> Path:
        return knn_dir / f"part-{start:012d}.npz"

    todo = [c for c in chunks if not part(c[0]).is_file()]
    searched = len(todo)
    if todo:
        cpus = int(ray.available_resources().get("CPU", 1))  # [ray]
        actors = cfg.search_actors or max(1, min(8, cpus))
        actors = min(actors, len(todo))
        searcher_cls = _searcher_class()
        index_ref = ray.put(faiss.serialize_index(index))  # [ray]
        pos_ref, anc_ref = ray.put(emb.positives), ray.put(emb.anchors)  # [ray]
        options = {"num_cpus": 1, **({"resources": dict(cfg.search_resources)} if cfg.search_resources else {})}
        pool = [searcher_cls.options(**options).remote(index_ref, pos_ref, anc_ref, 1) for _ in range(actors)]  # [ray]
        pending = {}
        queue = list(todo)
        for actor in pool:
            if queue:
                a, b = queue.pop(0)
                pending[actor.search.remote(a, b, k, cfg.nprobe)] = actor  # [ray]
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)  # [ray]
            actor = pending.pop(done[0])
            start, nb, sims = ray.get(done[0])  # [ray]
            tmp = knn_dir / f".part-{start:012d}.tmp.npz"
            np.savez(tmp, neighbours=nb, sims=sims)
            os.replace(tmp, part(start))
            crash_point("search-chunk")
            if queue:
                a, b = queue.pop(0)
                pending[actor.search.remote(a, b, k, cfg.nprobe)] = actor  # [ray]
        for actor in pool:
            ray.kill(actor)  # [ray]
    neighbours = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for a, b in chunks:
        with np.load(part(a)) as data:
            neighbours[a:b], sims[a:b] = data["neighbours"], data["sims"]
    info = {"index": type(index).__name__, "k": k, "chunks": len(chunks), "chunks_searched": searched}
    if not isinstance(index, faiss.IndexFlat):
        info["recall_at_10"] = _sampled_recall(emb, neighbours, min(10, k), cfg.seed)
    return neighbours, sims, info


def _sampled_recall(emb: Embeddings, neighbours: np.ndarray, k: int, seed: int, samples: int = 1000) -> float:
    """Recall@k of an approximate search on a seeded sample of queries, against exact."""
    n = len(emb.ids)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(samples, n), replace=False))
    scores = emb.anchors[rows] @ emb.positives.T
    scores[np.arange(len(rows)), rows] = -np.inf
    exact = np.argpartition(-scores, k, axis=1)[:, :k]
    hits = sum(len(set(exact[i]) & set(neighbours[r, :k])) for i, r in enumerate(rows))
    return round(hits / (len(rows) * k), 4)


# ----------------------------------------------------------------------------- write


def corpus_table(split: SplitSpec, columns: PlanColumns, ids: list[str]) -> pa.Table:
    """The raw columns of the mined rows of the corpus ``split``, in ``ids`` order (the
    embeddings' row order): what the packed batches are cut from."""
    data_cfg = split.data
    names = [data_cfg.id_column, data_cfg.anchor.column, data_cfg.positive.column]
    if columns.label:
        names.append(columns.label)
    parts = [pq.read_table(p, columns=names, filesystem=split.filesystem) for p in split.paths]
    table = pa.concat_tables(parts, promote_options="permissive")
    table = table.set_column(0, data_cfg.id_column, table.column(data_cfg.id_column).cast(pa.string()))
    position = {v: i for i, v in enumerate(table.column(data_cfg.id_column).to_pylist())}
    take = np.fromiter((position[i] for i in ids), dtype=np.int64, count=len(ids))
    return table.take(pa.array(take))


def _lists(values: pa.Array, size: int) -> pa.Array:
    offsets = pa.array(np.arange(0, len(values) + 1, size, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def _in_batch_scores(emb: Embeddings, batches: list[np.ndarray]) -> pa.Array:
    """Per batch, the teacher's [B, B] anchor-positive similarities (row i: anchor i against
    every in-batch positive j, in batch order) as ``list<list<float32>>``."""
    size = len(batches[0])
    values = np.concatenate([(emb.anchors[b] @ emb.positives[b].T).reshape(-1) for b in batches]).astype(np.float32)
    return _lists(_lists(pa.array(values, pa.float32()), size), size)


def _packed_table(corpus: pa.Table, batches: list[np.ndarray], epoch: int, first_batch: int, columns: PlanColumns,
                  emb_ids: pa.Array, negatives: NegativeSample | None, emb: Embeddings | None = None) -> pa.Table:
    size = len(batches[0])
    rows = np.concatenate(batches)
    take = pa.array(rows)
    out: dict[str, pa.Array] = {
        EPOCH_COLUMN: pa.array([epoch] * len(batches), pa.int32()),
        BATCH_COLUMN: pa.array(range(first_batch, first_batch + len(batches)), pa.int32()),
    }
    for name in (columns.id, columns.anchor, columns.positive, columns.label):
        if name is not None:
            out[name] = _lists(corpus.column(name).combine_chunks().take(take), size)
    if negatives is not None and columns.negatives:
        m = negatives.idx.shape[1]
        neg_rows = pa.array(negatives.idx[rows].reshape(-1))
        positive_values = corpus.column(columns.positive).combine_chunks().take(neg_rows)
        out[columns.negatives] = _lists(_lists(positive_values, m), size)
        out[columns.negative_ids] = _lists(_lists(emb_ids.take(neg_rows), m), size)
        scores = pa.array(negatives.sims[rows].reshape(-1).astype(np.float32), pa.float32())
        out[columns.negative_scores] = _lists(_lists(scores, m), size)
    if columns.in_batch_scores and emb is not None:
        out[columns.in_batch_scores] = _in_batch_scores(emb, batches)
    return pa.table(out)


def write_epoch(out_dir: Path, corpus: pa.Table, epoch_plan: MinedEpoch, columns: PlanColumns, ids: list[str],
                batches_per_file: int, emb: Embeddings | None = None) -> list[str]:
    """Write one epoch's packed batches to ``plans/epoch-NNNNN/`` (whole directory or
    nothing: written under a temporary name, then renamed); returns the relative paths."""
    final = epoch_dir(out_dir, epoch_plan.epoch)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    emb_ids = pa.array(ids, pa.string())
    batches = epoch_plan.plan.batches
    names = []
    for part, start in enumerate(range(0, len(batches), batches_per_file)):
        chunk = batches[start : start + batches_per_file]
        table = _packed_table(corpus, chunk, epoch_plan.epoch, start, columns, emb_ids, epoch_plan.negatives, emb)
        name = f"part-{part:05d}.parquet"
        pq.write_table(table, tmp / name)
        names.append(str(final.relative_to(out_dir) / name))
    _replace_dir(tmp, final)
    crash_point("epoch")
    return names


def epoch_written(out_dir: Path, epoch: int, expected_files: int) -> list[str] | None:
    final = epoch_dir(out_dir, epoch)
    files = sorted(final.glob("part-*.parquet")) if final.is_dir() else []
    if len(files) != expected_files:
        return None
    return [str(f.relative_to(out_dir)) for f in files]
