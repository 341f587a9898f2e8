"""Evaluation on the held-out split: retrieval (exact-pair and the IR figures with
duplicates folded), zero-shot accuracy, and the embedding geometry with its histograms.

Every rank embeds the whole (small) eval split. That costs W-fold compute on a split that
is minutes at most, and keeps ZeRO-3 correct: its partitioned forward is a collective, so
all ranks must run the same forwards in the same order.
"""

from __future__ import annotations

from typing import Any

import torch

from clray.jobs.config import JobConfig
from clray.jobs.run.engine import cast_batch


def _zero_shot_views(cfg: JobConfig) -> tuple[str, str] | None:
    """(view whose tower embeds the class prompts, view that gets classified)."""
    if not (cfg.data.label_column and cfg.data.class_names):
        return None
    if cfg.data.positive.kind == "text":
        return "positive", "anchor"
    if cfg.data.anchor.kind == "text":
        return "anchor", "positive"
    return None


def _tower_cfg(cfg: JobConfig, view: str):
    return cfg.model.anchor if view == "anchor" else cfg.model.positive_tower


def class_prompt_embeddings(model: Any, cfg: JobConfig, text_view: str, device: torch.device) -> torch.Tensor:
    """One embedding per class: the normalised mean over the prompt templates."""
    from clray.models.preprocess import preprocess_view, trim_padding

    tower = _tower_cfg(cfg, text_view)
    encode = model.encode_anchor if text_view == "anchor" else model.encode_positive
    per_class = []
    for name in cfg.data.class_names:
        prompts = [t.format(name) for t in cfg.data.prompt_templates]
        arrays = trim_padding(preprocess_view(tower, prompts, text_view), cfg.data.pad_to_multiple_of)
        batch = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
        emb = encode(batch).float().mean(dim=0)
        per_class.append(torch.nn.functional.normalize(emb, dim=0))
    return torch.stack(per_class)


@torch.no_grad()
def embed_split(model: Any, batches: Any, bf16: bool, has_labels: bool, cfg: JobConfig) -> dict[str, Any]:
    """Both views' embeddings of the whole split, its labels, and for text views a key per
    row (its token ids), so duplicate texts fold into one candidate for the IR figures."""
    from clray.models.metrics import row_keys

    anchors, positives, labels = [], [], []
    keys: dict[str, list[bytes]] = {view: [] for view in ("anchor", "positive") if getattr(cfg.data, view).kind == "text"}
    for batch in batches:
        batch = cast_batch(batch, bf16)
        anchors.append(model.encode_anchor(batch).float().cpu())
        positives.append(model.encode_positive(batch).float().cpu())
        if has_labels:
            labels.append(batch["label"].cpu())
        for view, found in keys.items():
            found.extend(row_keys(batch[f"{view}_input_ids"].cpu(), batch[f"{view}_attention_mask"].cpu()))
    out: dict[str, Any] = {"anchor": torch.cat(anchors), "positive": torch.cat(positives)}
    if has_labels:
        out["label"] = torch.cat(labels)
    out["keys"] = keys
    return out


@torch.no_grad()
def evaluate(model: Any, cfg: JobConfig, eval_shard: Any, device: torch.device,
             bf16: bool) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """(``eval_rows`` and every ``eval/...`` figure, the similarity histograms) of the
    model on the eval split (``models.metrics.evaluate_embeddings``)."""
    from clray.models.metrics import evaluate_embeddings
    from clray.pipelines.collate import training_collate

    was_training = model.training
    model.eval()
    try:
        has_labels = cfg.data.label_column is not None
        # Dynamic padding as in training: each eval batch is cut to its longest row.
        batches = eval_shard.iter_torch_batches(batch_size=cfg.train.eval_batch_size, device=device,
                                                collate_fn=training_collate(cfg.data))  # [ray]
        emb = embed_split(model, batches, bf16, has_labels, cfg)
        views = _zero_shot_views(cfg)
        classes = None
        if views is not None and has_labels:
            classes = class_prompt_embeddings(model, cfg, views[0], device).cpu()
        result = evaluate_embeddings(
            emb["anchor"], emb["positive"], labels=emb.get("label"), anchor_keys=emb["keys"].get("anchor"),
            positive_keys=emb["keys"].get("positive"), class_embeddings=classes,
            classified=views[1] if views else "anchor",
        )
        metrics: dict[str, Any] = {"eval_rows": int(emb["anchor"].shape[0])}
        metrics.update({f"eval/{key}": value for key, value in result.figures.items()})
        return metrics, result.histograms
    finally:
        model.train(was_training)
