"""Batch collation for ``iter_torch_batches`` on the training workers.

Kept apart from ``pipelines.dataset`` because it imports Ray at module level (the
collate base class lives there), and only code already running inside Ray needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from clray.models.preprocess import trim_padding


class TorchCollate(NumpyBatchCollateFn):
    """Tensors for the numeric model inputs; a list of strings for ``id``.

    Ray's default collate turns every column into a tensor and fails on string ids.
    Ray 2.60 deprecates plain functions as ``collate_fn``, hence a class. Arrays Ray
    hands over may be read-only views of the object store; they are copied so torch
    never aliases memory it must not write.

    ``pad_to_longest``: text views are cut to the batch's longest row, rounded up to
    ``pad_to_multiple_of`` (``models.preprocess.trim_padding``): dynamic padding. It runs
    here, in Ray's prefetch threads, so the training step never waits for it.
    """

    def __init__(self, pad_to_longest: bool = False, pad_to_multiple_of: int = 1) -> None:
        super().__init__()
        self.pad_to_longest = pad_to_longest
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        if self.pad_to_longest:
            batch = trim_padding(batch, self.pad_to_multiple_of)
        out: dict[str, Any] = {}
        for key, value in batch.items():
            if value.dtype.kind in "OUS":
                out[key] = [str(v) for v in value]
            elif value.flags.writeable and value.flags.c_contiguous:
                out[key] = torch.from_numpy(value)
            else:
                out[key] = torch.from_numpy(np.ascontiguousarray(value) if value.flags.writeable else value.copy())
        return out


def training_collate(data_cfg: Any) -> TorchCollate:
    """The collate of every training and evaluation batch: dynamic padding with the
    run's ``data.pad_to_multiple_of``."""
    return TorchCollate(pad_to_longest=True, pad_to_multiple_of=data_cfg.pad_to_multiple_of)
