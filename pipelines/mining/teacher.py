"""The mining teacher: a clray export or a Hugging Face text model, as one ``DualEncoder``.

Either way the teacher is the same torch module training uses (``models.DualEncoder``):
a clray export is loaded as it is; a Hugging Face / sentence-transformers model becomes a
shared text tower with no projection, whose normalised pooled output is what
sentence-transformers computes for that model. So one embedding path serves both, and
``TeacherEmbedder`` (a Ray Data actor) is the only place the model runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clray.models.config import ModelConfig, TextTowerConfig
from clray.pipelines.config import DataConfig
from clray.pipelines.mining.config import TeacherConfig

CLRAY_EXPORT_FILE = "clray_model.json"  # models.export.CONFIG_FILE (kept import-free of torch here)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def teacher_kind(cfg: TeacherConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    return "clray" if (Path(cfg.path).expanduser() / CLRAY_EXPORT_FILE).is_file() else "hf"


def _hf_pooling(root: Path, pooling: str) -> str:
    if pooling != "auto":
        return pooling
    pool_cfg = root / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        modes = json.loads(pool_cfg.read_text())
        if modes.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def _hf_model_config(cfg: TeacherConfig) -> ModelConfig:
    root = Path(cfg.path).expanduser()
    hidden = json.loads((root / "config.json").read_text()).get("hidden_size")
    tokenizer = str(root) if (root / "tokenizer_config.json").is_file() else "char"
    tower = TextTowerConfig(
        pretrained=str(root), tokenizer=tokenizer, pooling=_hf_pooling(root, cfg.pooling), max_length=cfg.max_length
    )
    return ModelConfig(anchor=tower, shared_tower=True, projection="none", embed_dim=int(hidden))


def teacher_model_config(cfg: TeacherConfig) -> ModelConfig:
    """The teacher's model config, read from its files without loading weights."""
    root = Path(cfg.path).expanduser()
    if teacher_kind(cfg) == "clray":
        meta = json.loads((root / CLRAY_EXPORT_FILE).read_text())
        return ModelConfig.model_validate(meta["model"])
    return _hf_model_config(cfg)


def teacher_problems(cfg: TeacherConfig, data_cfg: DataConfig) -> list[str]:
    """Everything wrong with the teacher for this corpus, found from its files alone."""
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        return [
            f"teacher.path = {cfg.path!r} is not a directory: give a clray export (run_dir/export) or a "
            "Hugging Face model saved with save_pretrained (clray never downloads models)"
        ]
    kind = teacher_kind(cfg)
    if kind == "clray" and not (root / CLRAY_EXPORT_FILE).is_file():
        return [f"teacher.kind = \"clray\" but {root} has no {CLRAY_EXPORT_FILE}: point at a `clray train` export"]
    if kind == "hf" and not (root / "config.json").is_file():
        return [
            f"teacher.path = {cfg.path!r} has neither {CLRAY_EXPORT_FILE} (a clray export) nor config.json "
            "(a Hugging Face model): point at one of those"
        ]
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in root.rglob("*") if p.is_file()):
        return [f"teacher.path = {cfg.path!r} holds no weights (*.safetensors, *.bin): is the save complete?"]
    try:
        model_cfg = teacher_model_config(cfg)
    except Exception as exc:  # noqa: BLE001 - any unreadable config is the user's file
        return [f"teacher.path = {cfg.path!r}: cannot read its model config ({type(exc).__name__}: {exc})"]
    problems = []
    towers = {"anchor": model_cfg.anchor, "positive": model_cfg.positive_tower}
    for view_name, tower in towers.items():
        view = getattr(data_cfg, view_name)
        is_text = tower.type == "text"
        if (view.kind == "text") != is_text:
            what = "a text model" if kind == "hf" else f"a {tower.type} tower for the {view_name} view"
            problems.append(
                f"data.{view_name} is a {view.kind} column ({view.column!r}) but the teacher at {cfg.path!r} has "
                f"{what}: use a teacher whose {view_name} tower reads {view.kind}"
            )
    return problems


def teacher_fingerprint(cfg: TeacherConfig) -> str:
    """A content hash of the teacher (its weights and configs) and the settings that
    change its embeddings, so a rerun knows whether earlier embeddings still hold."""
    root = Path(cfg.path).expanduser()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(cfg.model_dump(include={"kind", "pooling", "max_length"}), sort_keys=True).encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_teacher(cfg: TeacherConfig) -> Any:
    """The teacher as a ``DualEncoder`` in eval mode."""
    from clray.models.dual_encoder import DualEncoder
    from clray.models.export import load_exported

    if teacher_kind(cfg) == "clray":
        return load_exported(Path(cfg.path).expanduser())
    return DualEncoder(_hf_model_config(cfg)).eval()


class TeacherEmbedder:
    """Ray Data actor: corpus rows in (read with their source ``path``); out, per row: ``id``,
    ``reason`` (why the row cannot be mined, ``row_problems``; null for a good row),
    ``file``, ``anchor_emb`` and ``positive_emb`` (unit-norm float32 lists, null for a bad
    row) and ``label`` (when configured). Validating here, in the same pass that embeds,
    saves a second read of the corpus; the driver writes the bad rows to the quarantine."""

    def __init__(self, teacher_cfg: TeacherConfig, data_cfg: DataConfig, use_gpu: bool) -> None:
        import torch

        torch.set_num_threads(max(1, int(teacher_cfg.cpus_per_actor)))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        from clray.models.towers import pad_chunks_to

        self.model = pad_chunks_to(load_teacher(teacher_cfg), data_cfg.pad_to_multiple_of).to(self.device)
        self.data_cfg = data_cfg
        self.batch_size = teacher_cfg.batch_size
        self.towers = {"anchor": self.model.cfg.anchor, "positive": self.model.cfg.positive_tower}

    def _embed(self, table: pa.Table, view_name: str) -> np.ndarray:
        import torch

        from clray.models.encoding import encode_by_length
        from clray.models.preprocess import preprocess_view

        values = table.column(getattr(self.data_cfg, view_name).column).to_pylist()
        if not values:
            return np.zeros((0, self.model.cfg.embed_dim), dtype=np.float32)
        encode = self.model.encode_anchor if view_name == "anchor" else self.model.encode_positive
        arrays = preprocess_view(self.towers[view_name], values, view_name)
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
        # The block's rows sorted by length and embedded batch_size at a time, each forward
        # padded to its own longest row, the order restored (models.encoding): on real
        # text most forwards are far shorter than max_length.
        with torch.inference_mode():
            return encode_by_length(encode, inputs, view_name, self.batch_size,
                                    self.data_cfg.pad_to_multiple_of).float().cpu().numpy()

    def __call__(self, table: pa.Table) -> pa.Table:
        from clray.pipelines.validate import PATH_COLUMN, row_problems

        data_cfg = self.data_cfg
        problems = row_problems(table, data_cfg, self.towers["anchor"], self.towers["positive"])
        keep = np.array([p is None for p in problems], dtype=bool)
        good = table.filter(pa.array(keep))
        n, dim = table.num_rows, self.model.cfg.embed_dim
        columns: dict[str, Any] = {
            "id": table.column(data_cfg.id_column).combine_chunks().cast(pa.string()),
            "reason": pa.array(problems, pa.string()),
            "file": (table.column(PATH_COLUMN).combine_chunks().cast(pa.string()) if PATH_COLUMN in table.column_names
                     else pa.nulls(n, pa.string())),
        }
        for view_name in ("anchor", "positive"):
            emb = self._embed(good, view_name)
            full = np.zeros((n, dim), dtype=np.float32)
            full[keep] = emb
            columns[f"{view_name}_emb"] = pa.FixedSizeListArray.from_arrays(
                pa.array(full.reshape(-1), pa.float32()), dim, mask=pa.array(~keep)
            )
        if data_cfg.label_column is not None:
            columns["label"] = table.column(data_cfg.label_column).combine_chunks().cast(pa.int64())
        return pa.table(columns)
