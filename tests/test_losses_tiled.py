"""Tiled cross-entropy: the same loss and gradients as the materialised matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.config import LossConfig
from models.losses import build_loss
from models.losses.tiled import tiled_cross_entropy


def _unit(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()


@pytest.mark.parametrize(("rows", "cols", "block"), [(7, 7, 3), (16, 40, 5), (33, 33, 64), (10, 25, 1), (12, 12, 12)])
def test_matches_full_cross_entropy(rows: int, cols: int, block: int) -> None:
    queries, keys = _unit(rows, seed=1), _unit(cols, seed=2)
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, cols, (rows,), generator=torch.Generator().manual_seed(3))

    want = F.cross_entropy(scale * queries @ keys.T, targets)
    want_grads = torch.autograd.grad(want, (queries, keys, scale))
    got, metrics = tiled_cross_entropy(queries, keys, scale, targets, block=block)
    got_grads = torch.autograd.grad(got, (queries, keys, scale))

    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    sims = (queries @ keys.T).detach()
    rows_idx = torch.arange(rows)
    assert metrics["pos_sim"].item() == pytest.approx(sims[rows_idx, targets].mean().item())
    assert metrics["accuracy"].item() == pytest.approx((sims.argmax(1) == targets).double().mean().item())


def test_gradcheck() -> None:
    queries, keys = _unit(5, dim=4, seed=4), _unit(6, dim=4, seed=5)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 5, 2, 2, 1])
    assert torch.autograd.gradcheck(lambda q, k, s: tiled_cross_entropy(q, k, s, targets, block=2)[0],
                                    (queries, keys, scale))


@pytest.mark.parametrize("symmetric", [True, False])
def test_infonce_tiled_mode_equals_gather_mode(symmetric: bool) -> None:
    anchor, positive = _unit(20, seed=6), _unit(20, seed=7)
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    plain = build_loss(LossConfig(symmetric=symmetric))(anchor, positive, logit_scale=scale)
    plain_grads = torch.autograd.grad(plain.loss, (anchor, positive, scale))
    tiled = build_loss(LossConfig(symmetric=symmetric, mode="tiled", block_size=6))(anchor, positive, logit_scale=scale)
    tiled_grads = torch.autograd.grad(tiled.loss, (anchor, positive, scale))
    torch.testing.assert_close(tiled.loss, plain.loss, rtol=1e-12, atol=1e-12)
    for g, w in zip(tiled_grads, plain_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for key in ("pos_sim", "neg_sim", "accuracy"):
        assert tiled.metrics[key] == pytest.approx(plain.metrics[key], abs=1e-9), key


def test_tiled_never_builds_the_full_matrix() -> None:
    """With 4096 x 4096 candidates and blocks of 256, no tensor of n x m elements exists."""
    rows = 4096
    queries, keys = _unit(rows, dim=16, seed=8).detach().float(), _unit(rows, dim=16, seed=9).detach().float()
    queries.requires_grad_()
    keys.requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = tiled_cross_entropy(queries, keys, scale, torch.arange(rows), block=256)
    loss.backward()
    assert largest <= rows * 16  # only the inputs themselves are kept for backward
    assert torch.isfinite(queries.grad).all()
