"""clray's own gradient all-reduce at ZeRO-0 in fp32: one flat buffer, and only the rows
of an embedding table that some rank's batch touched.

DeepSpeed's ZeRO-0 reduction (``buffered_allreduce_fallback``) copies every gradient into
one flat buffer, all-reduces it and copies it back: for all-MiniLM-L6-v2 that is 22.7M
floats, and half of them are the word-embedding table's gradient (30,522 x 384), whose
rows are zero except for the few hundred token ids of the step's batch. Here a table's
gradient travels as its non-zero rows only: each rank marks the rows where its gradient is
not zero, one small all-reduce (MAX) of those marks gives the union over ranks, and those
rows ride in the flat buffer beside the other gradients. A row outside the union is zero
on every rank, so its average is zero: the result is the dense average, bit for bit with
two ranks (a + b is b + a in floating point; tests/test_gradcache_deepspeed.py checks it
against DeepSpeed's own reduction).

It replaces the engine's ``allreduce_gradients`` on the instance, so everything that
calls ``engine.backward`` (the training step, GradCache's chunks) gets it, and keeps
DeepSpeed's contract: reduce only at a gradient-accumulation boundary, a missing gradient
counts as zeros, the sum is scaled by 1 / world size after the all-reduce.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ROW_SPARSE_MIN_ROWS = 1024
"""An embedding table with at least this many rows is reduced by rows (a vocabulary);
smaller ones (positions, token types) go whole: their marks would cost more than they save."""


class RowSparseAllReduce:
    """The engine's gradient all-reduce (see the module's docstring). ``min_rows``: the
    smallest embedding table sent by rows."""

    def __init__(self, engine: Any, min_rows: int = ROW_SPARSE_MIN_ROWS) -> None:
        self.engine = engine
        params = [p for p in engine.module.parameters() if p.requires_grad and p.numel() > 0]
        tables = {id(m.weight) for m in engine.module.modules()
                  if isinstance(m, torch.nn.Embedding) and m.weight.shape[0] >= min_rows}
        self.tables = [p for p in params if id(p) in tables]
        self.dense = [p for p in params if id(p) not in tables]
        self.rows_sent: list[int] = []  # per table, the rows the last reduction sent

    def __call__(self, *args: Any, **kwargs: Any) -> None:  # DeepSpeed passes a bucket size
        if not self.engine.is_gradient_accumulation_boundary():
            return
        world = dist.get_world_size()
        for p in (*self.dense, *self.tables):
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # every rank must send the same layout
        rows = self._union_rows() if self.tables else []
        self.rows_sent = [int(index.numel()) for index in rows]
        parts = [p.grad.reshape(-1) for p in self.dense]
        parts += [p.grad.index_select(0, index).reshape(-1) for p, index in zip(self.tables, rows, strict=True)]
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        flat.mul_(1.0 / world)
        pieces = flat.split([part.numel() for part in parts])
        for p, piece in zip(self.dense, pieces, strict=False):
            p.grad.copy_(piece.view_as(p.grad))
        for p, index, piece in zip(self.tables, rows, pieces[len(self.dense):], strict=True):
            p.grad.index_copy_(0, index, piece.view(index.numel(), p.shape[1]))

    def _union_rows(self) -> list[torch.Tensor]:
        """Per table, the indices of the rows whose gradient is not zero on some rank."""
        marks = torch.cat([(p.grad != 0).any(dim=1) for p in self.tables]).to(torch.uint8)
        dist.all_reduce(marks, op=dist.ReduceOp.MAX)
        rows, start = [], 0
        for p in self.tables:
            rows.append(marks[start:start + p.shape[0]].nonzero().squeeze(1))
            start += p.shape[0]
        return rows


def own_reduction(engine: Any, min_rows: int = ROW_SPARSE_MIN_ROWS) -> RowSparseAllReduce | None:
    """Install :class:`RowSparseAllReduce` as ``engine``'s gradient all-reduce where it
    applies: ZeRO-0, fp32, more than one rank, data parallelism over the whole world.
    Elsewhere DeepSpeed reduces (ZeRO 1-3 partition gradients; bf16 reduces through its
    optimizer's fp32 buffers). Returns the installed reduction, or None."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    if not dist.is_initialized() or dist.get_world_size() < 2 or engine.dp_world_size != dist.get_world_size():
        return None
    reduction = RowSparseAllReduce(engine, min_rows)
    engine.allreduce_gradients = reduction
    return reduction
