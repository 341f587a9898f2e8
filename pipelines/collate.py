"""Batch collation for ``iter_torch_batches`` on the training workers.

Kept apart from ``pipelines.dataset`` because it imports Ray at module level (the
collate base class lives there), and only code already running inside Ray needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn


class TorchCollate(NumpyBatchCollateFn):
    """Tensors for the numeric model inputs; a list of strings for ``id``.

    Ray's default collate turns every column into a tensor and fails on string ids.
    Ray 2.60 deprecates plain functions as ``collate_fn``, hence a class. Arrays Ray
    hands over may be read-only views of the object store; they are copied so torch
    never aliases memory it must not write.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for key, value in batch.items():
            if value.dtype.kind in "OUS":
                out[key] = [str(v) for v in value]
            elif value.flags.writeable:
                out[key] = torch.from_numpy(value)
            else:
                out[key] = torch.from_numpy(value.copy())
        return out
