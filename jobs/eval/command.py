"""``clray eval``: the figures a run's evaluations report, for any model on any split.

The model is a clray export, a run (its latest checkpoint, or a named one, consolidated
into an export first), or a local Hugging Face / sentence-transformers text model. The
split's rows are validated and embedded by Ray Data actors (the mining teacher's
``TeacherEmbedder``: one model per actor, on a local Ray or a cluster); the figures come
from ``models.metrics.evaluate_embeddings``, exactly as during training, with duplicate
texts folded by their text. Bad rows are counted and written to a quarantine file.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clray.jobs.config.eval import EvalConfig, is_run_dir
from clray.jobs.runtime import describe_failure, start_ray, worker_env
from clray.pipelines.errors import DataError

EVAL_FILE = "eval.json"


class EvalError(Exception):
    """An evaluation that failed after it started; the message is meant for the user."""


@dataclass
class EvalSummary:
    model: str
    checkpoint: str | None
    split: list[str]
    rows: int
    quarantined_rows: int
    quarantine_path: str | None
    figures: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, list[float]] = field(default_factory=dict)
    output: str = ""
    wall_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def checkpoint_export(run_dir: Path, name: str | None, out: Path) -> tuple[Path, str]:
    """A run's checkpoint (``name``, else the newest) written as a clray export in ``out``:
    DeepSpeed's shards merged into full fp32 weights on this machine (no Ray)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from clray.jobs.config import load_config
    from clray.jobs.run.checkpoint import CHECKPOINT_TAG
    from clray.jobs.run.commit import PARTITION_SUFFIX
    from clray.jobs.run.location import checkpoint_step
    from clray.models.dual_encoder import DualEncoder
    from clray.models.export import export_model
    from clray.models.towers import pad_chunks_to

    found = sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=checkpoint_step)
    chosen = run_dir / name if name else (found[-1] if found else None)
    if chosen is None or not chosen.is_dir():
        names = ", ".join(p.name for p in found) or "none"
        raise DataError(f"{run_dir}: no checkpoint {name or ''} to evaluate (the run has: {names})")
    cfg = load_config(run_dir / "config.toml")
    model = pad_chunks_to(DualEncoder(cfg.model), cfg.data.pad_to_multiple_of)
    state_dir = chosen / CHECKPOINT_TAG
    if any(state_dir.glob(f"*{PARTITION_SUFFIX}")):  # ZeRO 1-3 (or bf16): fp32 weights from the shards
        state = get_fp32_state_dict_from_zero_checkpoint(str(chosen), tag=CHECKPOINT_TAG)
    else:  # ZeRO-0 in fp32: no shards; the whole module is in the model states file
        import torch

        saved = torch.load(state_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = {key: value.float() if value.is_floating_point() else value for key, value in saved["module"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise EvalError(f"{chosen} does not fit the run's model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return export_model(model, cfg.model, out), chosen.name


def _embed(cfg: EvalConfig, split: Any, use_gpu: bool) -> Any:
    """Every row of the split, validated and embedded in corpus order (a pyarrow table:
    id, reason, file, anchor_emb, positive_emb[, label])."""
    import ray
    import ray.data  # [ray]

    from clray.pipelines.mining.teacher import TeacherEmbedder
    from clray.pipelines.reading import read_shards

    context = ray.data.DataContext.get_current()  # [ray]
    previous = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        embedded = read_shards(split, include_paths=True).map_batches(  # [ray]
            TeacherEmbedder,
            fn_constructor_kwargs={"teacher_cfg": cfg.eval, "data_cfg": split.data, "use_gpu": use_gpu},
            batch_format="pyarrow", batch_size=max(cfg.eval.batch_size, cfg.eval.block_rows),  # sorted within it
            compute=ray.data.ActorPoolStrategy(size=cfg.eval.num_actors),  # [ray]
            num_cpus=cfg.eval.cpus_per_actor, num_gpus=1 if use_gpu else 0,
        )
        import pyarrow as pa

        return pa.concat_tables(ray.get(embedded.to_arrow_refs()))  # [ray]
    finally:
        context.execution_options.preserve_order = previous


def _keys(cfg: EvalConfig, split: Any, ids: list[str]) -> dict[str, list[str] | None]:
    """A text view's key per row is its text (duplicates fold into one candidate, as in
    sentence-transformers' evaluator); image views have none (every row distinct)."""
    import pyarrow.parquet as pq

    keys: dict[str, list[str] | None] = {"anchor": None, "positive": None}
    text_views = [v for v in keys if getattr(cfg.data, v).kind == "text"]
    if not text_views:
        return keys
    columns = [cfg.data.id_column, *(getattr(cfg.data, v).column for v in text_views)]
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(p, columns=columns, filesystem=split.filesystem) for p in split.paths])
    row_of = {str(i): r for r, i in enumerate(table.column(cfg.data.id_column).to_pylist())}
    rows = [row_of[i] for i in ids]
    for view in text_views:
        texts = table.column(getattr(cfg.data, view).column).to_pylist()
        keys[view] = [texts[r] for r in rows]
    return keys


def _class_embeddings(cfg: EvalConfig) -> tuple[Any, str] | None:
    """Zero-shot: one embedding per class (the mean over the prompt templates) from the
    text view's tower, and the view that gets classified; None without labels and names."""
    import torch

    from clray.pipelines.mining.teacher import load_teacher

    data = cfg.data
    if not (data.label_column and data.class_names):
        return None
    text_view = "positive" if data.positive.kind == "text" else ("anchor" if data.anchor.kind == "text" else None)
    if text_view is None:
        return None
    from clray.models.preprocess import preprocess_view

    model = load_teacher(cfg.eval)
    tower = model.cfg.anchor if text_view == "anchor" else model.cfg.positive_tower
    encode = model.encode_anchor if text_view == "anchor" else model.encode_positive
    per_class = []
    with torch.inference_mode():
        for name in data.class_names:
            arrays = preprocess_view(tower, [t.format(name) for t in data.prompt_templates], text_view)
            emb = encode({k: torch.from_numpy(v) for k, v in arrays.items()}).float().mean(dim=0)
            per_class.append(torch.nn.functional.normalize(emb, dim=0))
    return torch.stack(per_class), "anchor" if text_view == "positive" else "positive"


def _figures(cfg: EvalConfig, split: Any, table: Any, quarantine_path: Path) -> tuple[Any, int, int]:
    """(the evaluation, good rows, bad rows): bad rows written to ``quarantine_path``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from clray.models.metrics import evaluate_embeddings

    bad = table.filter(pc.invert(pc.is_null(table.column("reason"))))
    good = table.filter(pc.is_null(table.column("reason")))
    if bad.num_rows:
        pq.write_table(pa.table({"id": bad.column("id"), "reason": bad.column("reason"), "file": bad.column("file")}),
                       quarantine_path)
    if good.num_rows < 2:
        raise DataError(f"data.eval: {good.num_rows} valid row(s) to evaluate; see {quarantine_path}")

    def matrix(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack(good.column(name).to_numpy(zero_copy_only=False)).astype(np.float32))

    ids = [str(i) for i in good.column("id").to_pylist()]
    keys = _keys(cfg, split, ids)
    labels = torch.as_tensor(good.column("label").to_numpy()) if "label" in good.column_names else None
    classes = _class_embeddings(cfg)
    result = evaluate_embeddings(
        matrix("anchor_emb"), matrix("positive_emb"), labels=labels, anchor_keys=keys["anchor"],
        positive_keys=keys["positive"], class_embeddings=classes[0] if classes else None,
        classified=classes[1] if classes else "anchor")
    return result, good.num_rows, bad.num_rows


def _output(cfg: EvalConfig, model_root: Path) -> Path:
    if cfg.output:
        return Path(cfg.output).expanduser()
    return model_root / EVAL_FILE if model_root.is_dir() else Path(EVAL_FILE)


def run_eval(cfg: EvalConfig, *, verbose: bool = False) -> EvalSummary:
    """Evaluate ``cfg.eval.path`` on ``cfg.data.eval``; writes eval.json and returns it."""
    import ray

    from clray.pipelines.mining.teacher import teacher_problems
    from clray.pipelines.reading import quiet_ray_data
    from clray.pipelines.spec import resolve_split

    started = time.perf_counter()
    root = Path(cfg.eval.path).expanduser()
    split = resolve_split(cfg.data, "eval", cfg.storage)
    output = _output(cfg, root)
    with tempfile.TemporaryDirectory(prefix="clray-eval-") as tmp:
        checkpoint = None
        if is_run_dir(root):
            exported, checkpoint = checkpoint_export(root, cfg.checkpoint, Path(tmp) / "export")
            cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"path": str(exported), "kind": "clray"})})
        problems = teacher_problems(cfg.eval, cfg.data)
        if problems:
            raise DataError([p.replace("teacher.", "eval.") for p in problems])
        start_ray(cfg.eval.num_actors * cfg.eval.cpus_per_actor + 1, worker_env(use_gpu=True), verbose)
        quiet_ray_data()
        use_gpu = cfg.eval.use_gpu != "never" and ray.cluster_resources().get("GPU", 0) > 0
        try:
            table = _embed(cfg, split, use_gpu)
        except ray.exceptions.RayError as exc:
            raise EvalError(f"embedding the evaluation split failed: {describe_failure(exc)}") from None
        output.parent.mkdir(parents=True, exist_ok=True)
        quarantine = output.with_name("quarantine-eval.parquet")
        result, rows, bad = _figures(cfg, split, table, quarantine)
    summary = EvalSummary(
        model=str(root), checkpoint=checkpoint, split=list(split.files), rows=rows, quarantined_rows=bad,
        quarantine_path=str(quarantine) if bad else None,
        figures={f"eval/{k}": v for k, v in result.figures.items()}, histograms=result.histograms,
        output=str(output), wall_seconds=time.perf_counter() - started)
    output.write_text(summary.to_json())
    return summary
