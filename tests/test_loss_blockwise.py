"""The blockwise engine on raw tensors, and what a loss object accepts.

The tiled engine against gather mode and against finite differences (gradcheck), with
no logits matrix ever built; half-precision inputs; which ``LossConfig`` combinations
``build_loss`` turns into which objective, and the errors for the rest and for missing
side inputs. The equivalence of every mode across ranks is test_loss_equivalence.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clray.models.config import LossConfig
from clray.models.losses import LOSSES, build_loss
from clray.models.losses.blockwise import BlockSource, Problem, blockwise_aggregates
from clray.models.losses.columns import MaskSpec, pair_columns, row_meta

# --- the blockwise engine on raw tensors -----------------------------------------------


def _unit(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()


@pytest.mark.parametrize(("rows", "cols", "block"), [(7, 7, 3), (16, 40, 5), (10, 25, 1), (12, 12, 64)])
@pytest.mark.parametrize("objective", ["infonce", "dcl", "supcon", "siglip"])
def test_tiled_equals_gather_on_raw_tensors(rows: int, cols: int, block: int, objective: str) -> None:
    """Rows and columns of different counts (the extra columns act as hard negatives)."""
    anchor, positive = _unit(rows, 8, seed=1), _unit(rows, 8, seed=2)
    negatives = _unit(rows, cols // rows + 1, 8, seed=3)
    scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(rows) % 3
    inputs = (anchor, positive, negatives, scale, bias)
    beta = 0.7 if objective in ("infonce", "dcl") else 0.0
    results = []
    for mode in ("gather", "tiled"):
        loss_fn = build_loss(LossConfig(type=objective, mode=mode, block_size=block, hardness_beta=beta))
        out = loss_fn(anchor, positive, negatives, labels, logit_scale=scale, logit_bias=bias)
        results.append((out, torch.autograd.grad(out.loss, inputs, allow_unused=True)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert got.metrics == pytest.approx(want.metrics, abs=1e-12)


@pytest.mark.parametrize("objective", ["infonce", "supcon", "siglip"])
def test_blockwise_gradcheck(objective: str) -> None:
    """The hand-written backward against finite differences (hardness weights are a
    stop-gradient by definition, so finite differences do not apply to them: beta = 0)."""
    queries, cands = _unit(5, 4, seed=4), _unit(7, 4, seed=5)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 0])
    rows = row_meta(5, 0, None, labels[:5], queries.device)
    cols = pair_columns(7, 0, None, labels, cands.device)
    loss_cls = LOSSES[objective]
    problem = Problem(loss_cls(), MaskSpec(label_positives=loss_cls.label_positives), 2, BlockSource())

    def fn(q, c, s, b):
        aggregates, _, _ = blockwise_aggregates(problem, q, rows, c, cols, s, b)
        return tuple(aggregates)

    assert torch.autograd.gradcheck(fn, (queries, cands, scale, bias))


def test_tiled_never_builds_the_logits() -> None:
    """2048 x 2048 candidates in tiles of 256: backward keeps only inputs and per-row stats."""
    rows, dim = 2048, 16
    anchor, positive = (_unit(rows, dim, seed=s).detach().float().requires_grad_() for s in (8, 9))
    scale = torch.tensor(10.0, requires_grad=True)
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = build_loss(LossConfig(mode="tiled", block_size=256))(anchor, positive, logit_scale=scale)
    out.loss.backward()
    assert largest <= rows * dim  # never rows x rows
    assert torch.isfinite(anchor.grad).all() and torch.isfinite(positive.grad).all()


def test_half_precision_inputs_are_scored_in_float32() -> None:
    anchor, positive = (_unit(6, 8, seed=s).detach().to(torch.bfloat16).requires_grad_() for s in (10, 11))
    for mode in ("gather", "tiled", "ring"):
        out = build_loss(LossConfig(type="siglip", mode=mode, block_size=4))(
            anchor, positive, logit_scale=torch.tensor(10.0, dtype=torch.bfloat16),
            logit_bias=torch.tensor(-5.0, dtype=torch.bfloat16))
        assert out.loss.dtype == torch.float32
        out.loss.backward()
        assert anchor.grad is not None and anchor.grad.dtype == torch.bfloat16
        anchor.grad = None


# --- config and input validation --------------------------------------------------------


@pytest.mark.parametrize("objective", ["infonce", "dcl", "supcon", "siglip"])
@pytest.mark.parametrize("mode", ["gather", "tiled", "ring"])
def test_build_loss_builds_every_type_and_mode(objective: str, mode: str) -> None:
    loss_fn = build_loss(LossConfig(type=objective, mode=mode))
    assert loss_fn.objective == objective and loss_fn.mode == mode


@pytest.mark.parametrize(("fields", "key"), [
    ({"type": "siglip", "hardness_beta": 0.5}, "loss.hardness_beta"),
    ({"type": "supcon", "hardness_beta": 0.5}, "loss.hardness_beta"),
    ({"type": "supcon", "mask_same_label": True}, "loss.mask_same_label"),
])
def test_build_loss_rejects_combinations_that_make_no_sense(fields: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_loss(LossConfig(**fields))


@pytest.mark.parametrize(("fields", "key"), [
    ({"type": "siglip", "hardness_beta": 0.5}, "loss.hardness_beta"),
    ({"type": "supcon", "hardness_beta": 0.5}, "loss.hardness_beta"),
    ({"type": "supcon", "mask_same_label": True}, "loss.mask_same_label"),
])
def test_build_loss_refuses_them_from_an_unvalidated_config(fields: dict, key: str) -> None:
    """Defence in depth: a LossConfig made with model_construct skips its validation; the
    class's traits still refuse a setting the objective would silently ignore."""
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_loss(LossConfig.model_construct(**fields))


def test_ring_without_gather_is_defined_for_the_loss() -> None:
    """The config refuses it (nothing would travel between workers), but the loss itself
    defines it as each rank's own candidates, tiled: the same as tiled mode."""
    anchor, positive = _unit(6, 8, seed=12), _unit(6, 8, seed=13)
    scale = torch.tensor(5.0, dtype=torch.float64)
    ring = build_loss(LossConfig.model_construct(mode="ring", gather=False, block_size=4))
    tiled = build_loss(LossConfig(mode="tiled", gather=False, block_size=4))
    torch.testing.assert_close(ring(anchor, positive, logit_scale=scale).loss,
                               tiled(anchor, positive, logit_scale=scale).loss, rtol=0, atol=0)


def test_config_rules_agree_with_the_objectives_traits() -> None:
    """LossConfig's rules name the types; the classes declare traits. They must not drift."""
    import typing

    assert set(typing.get_args(LossConfig.model_fields["type"].annotation)) == set(LOSSES)
    for name, cls in LOSSES.items():
        assert cls.objective == name
        hardness = LossConfig.model_construct(type=name, hardness_beta=0.5).rule_problems()
        assert (not hardness) == cls.accepts_hardness, name
        same_label = LossConfig.model_construct(type=name, mask_same_label=True).rule_problems()
        assert (not same_label) == cls.accepts_mask_same_label, name


def test_missing_side_inputs_are_clear_errors() -> None:
    e = torch.eye(4, dtype=torch.float64)
    scale = torch.tensor(1.0)
    with pytest.raises(ValueError, match="mask_same_id"):
        build_loss(LossConfig(mask_same_id=True))(e, e, logit_scale=scale)
    with pytest.raises(ValueError, match="negative_id"):
        build_loss(LossConfig(mask_same_id=True))(e, e, e[:, None], ids=torch.arange(4), logit_scale=scale)
    with pytest.raises(ValueError, match="labels"):
        build_loss(LossConfig(type="supcon"))(e, e, logit_scale=scale)
    with pytest.raises(ValueError, match="labels"):
        build_loss(LossConfig(mask_same_label=True))(e, e, logit_scale=scale)
    with pytest.raises(ValueError, match="logit bias"):
        build_loss(LossConfig(type="siglip"))(e, e, logit_scale=scale)
    with pytest.raises(ValueError, match="teacher"):
        build_loss(LossConfig(teacher_threshold=0.5))(e, e, e[:, None], logit_scale=scale)
    with pytest.raises(ValueError, match=r"\[b, k, d\]"):
        build_loss(LossConfig())(e, e, e, logit_scale=scale)
    # Side inputs a config does not ask for are accepted and ignored.
    plain = build_loss(LossConfig())(e, e, logit_scale=scale).loss
    extra = build_loss(LossConfig())(e, e, labels=torch.zeros(4, dtype=torch.long), ids=torch.zeros(4, dtype=torch.long),
                                     logit_scale=scale).loss
    torch.testing.assert_close(plain, extra)
