"""GradCache under a real DeepSpeed engine equals the uncached step, at ZeRO 0, 1, 2 and 3.

Two gloo ranks (spawned processes, no Ray) each build DeepSpeed engines with the
trainer's DeepSpeed config (``jobs.engine.deepspeed_config``: fp32 on CPU, gradient
accumulation 1; clipping off) and run two optimizer steps through the trainer's own
step function, ``jobs.worker.train_step``, on a tiny shared-tower text DualEncoder:
global batch 16, 8 rows per rank, GradCache chunks of 3 (ragged: 3 + 3 + 2). The
second step checks what the first leaves behind (boundary flag, ZeRO state). The client optimizer is
plain SGD, not AdamW: AdamW's first step is about ``lr * sign(g)``, which turns fp32
round-off in a near-zero gradient into a full-size difference; with SGD the parameter
change *is* ``-lr * gradient``, so equal parameters mean equal gradients.

After the steps every parameter (ZeRO-3 partitions gathered) must equal

- without dropout: the same engine stepped without GradCache, and one plain-torch
  process that takes SGD steps on the whole global batch;
- with dropout: a plain-torch process that encodes each rank's chunks one after another
  *with* a graph from that rank's RNG seed, i.e. draws the very dropout masks the cached
  pass draws. That only holds if GradCache's re-encode replays the RNG state.

So that equality is not vacuous, the parameters must have moved by far more than the
tolerance, and broken variants must be caught: GradCache without the RNG replay (dropout
on), a loss over each rank's own rows only, and (at ZeRO 1 and 2, where it changes the
result) an accumulation boundary set on every chunk instead of the last one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from process_group import free_port, init_gloo, spawn_ranks
from tiny_models import TINY_BERT

from clray.models.config import LossConfig, ModelConfig
from clray.models.dual_encoder import DualEncoder, Encoded
from clray.models.losses import apply_loss, build_loss

WORLD = 2
GLOBAL_BATCH = 16
LOCAL_BATCH = GLOBAL_BATCH // WORLD
CHUNK = 3  # 8 local rows -> chunks of 3, 3 and 2
SEQ_LEN = 12
STEPS = 2
LR = 0.1  # SGD: the parameter change is -LR * gradient
DROPOUT = 0.2
STAGES = (0, 1, 2, 3)
SEED = 1234  # each rank draws dropout from SEED + rank
TIMEOUT_S = 240.0
# fp32 gradients of one step through a 1-layer BERT differ by ~1e-7 between a chunked
# and a whole-batch forward (different matmul shapes, different summation order).
ATOL, RTOL = 2e-6, 1e-5
UPDATE_RTOL, UPDATE_FLOOR = 1e-4, 1e-5
CLIP = 0.05  # far below the quickstart's gradient norms: every step is clipped

pytestmark = pytest.mark.timeout(TIMEOUT_S + 60)


def _model(dropout: float) -> DualEncoder:
    torch.manual_seed(0)
    bert = {**TINY_BERT, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    cfg = ModelConfig.model_validate(
        {"anchor": {"type": "text", "config": bert, "max_length": SEQ_LEN}, "shared_tower": True, "embed_dim": 16}
    )
    return DualEncoder(cfg).train()


def _global_batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1 + step)
    batch = {}
    for view in ("anchor", "positive"):
        ids = torch.randint(5, 60, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
        lengths = torch.randint(3, SEQ_LEN + 1, (GLOBAL_BATCH,), generator=gen)
        mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
        batch[f"{view}_input_ids"] = ids * mask
        batch[f"{view}_attention_mask"] = mask
    return batch


def _rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in batch.items()}


def _local_batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    return _rows(_global_batch(step), rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------- on each rank


def _engine(model: DualEncoder, stage: int, clip: tuple[str, float] | None = None):
    import deepspeed

    from clray.jobs.cli import QUICKSTART_CONFIG
    from clray.jobs.config import load_config
    from clray.jobs.run.engine import deepspeed_config

    cfg = load_config(QUICKSTART_CONFIG, [
        f"scaling.num_workers={WORLD}", f"train.global_batch_size={GLOBAL_BATCH}",
        f"train.zero_stage={stage}", "optim.grad_clip=0.0", 'train.precision="fp32"',
    ])
    config = deepspeed_config(cfg)  # the trainer's DeepSpeed config, ZeRO stage and all
    assert config["gradient_accumulation_steps"] == 1 and not config["bf16"]["enabled"]
    # DeepSpeed clips at norm 1.0 when the key is absent: clipping would rescale every
    # update to the same norm and hide a wrong gradient's size, so switch it off.
    config["gradient_clipping"] = 0.0
    if clip and clip[0] == "deepspeed":
        config["gradient_clipping"] = clip[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    if clip and clip[0] == "clray":
        engine.clray_clip_norm = clip[1]  # what build_engine sets where own_clip(cfg) says clray clips
    return engine


def _gathered(engine) -> dict[str, torch.Tensor]:
    """Full parameter values on every rank (ZeRO-3 holds only a partition outside forward)."""
    import deepspeed

    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().clone() for n, p in named}


def _step(stage: int, rank: int, dropout: float, chunk: int | None, broken: str | None = None,
          clip: tuple[str, float] | None = None, clray_reduces: bool = False) -> dict:
    """One ``train_step`` from fresh identical weights; the parameters after it.
    ``clray_reduces``: the engine reduces gradients with clray's row-sparse all-reduce
    (what ``build_engine`` installs at ZeRO-0 in fp32), not DeepSpeed's."""
    from clray.jobs.run.engine import train_step
    from clray.jobs.run.reduction import own_reduction
    from clray.models import gradcache

    engine = _engine(_model(dropout), stage, clip)
    # min_rows: the char tokenizer's 164-row vocabulary counts as a table sent by rows
    reduction = own_reduction(engine, min_rows=100) if clray_reduces else None
    if clray_reduces:
        assert reduction is not None and len(reduction.tables) == 1  # the word embeddings
    if stage == 3:
        assert engine.zero_optimization_partition_weights()
    loss_cfg = LossConfig(gather=broken != "local_loss")
    patch = contextlib.nullcontext()
    if broken == "no_rng_replay":
        patch = _patched(gradcache, "_set_rng_state", lambda *args: None)
    if broken == "boundary_every_chunk":
        set_boundary = engine.set_gradient_accumulation_boundary
        engine.set_gradient_accumulation_boundary = lambda last: set_boundary(True)
    torch.manual_seed(SEED + rank)
    losses, scales = [], []
    with patch:
        for step in range(STEPS):
            out, scale, _ = train_step(engine, build_loss(loss_cfg), _local_batch(rank, step), gradcache_chunk=chunk)
            losses.append(float(out.loss.detach()))
            scales.append(scale)
    return {"losses": losses, "scales": scales, "params": _gathered(engine),
            "rows_sent": reduction.rows_sent if reduction else None}


@contextlib.contextmanager
def _patched(module, name: str, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _rank_results(rank: int) -> dict:
    results = {}
    for stage in STAGES:
        results[stage] = {
            "plain": _step(stage, rank, 0.0, None),
            "gradcache": _step(stage, rank, 0.0, CHUNK),
            "dropout_gradcache": _step(stage, rank, DROPOUT, CHUNK),
            "dropout_no_rng_replay": _step(stage, rank, DROPOUT, CHUNK, broken="no_rng_replay"),
            "local_loss_gradcache": _step(stage, rank, 0.0, CHUNK, broken="local_loss"),
            "boundary_every_chunk": _step(stage, rank, 0.0, CHUNK, broken="boundary_every_chunk"),
        }
    for how in ("deepspeed", "clray"):  # ZeRO-0: clray clips itself (jobs.run.engine.own_clip)
        results[0][f"clipped_by_{how}"] = _step(0, rank, 0.0, None, clip=(how, CLIP))
    results[0]["plain_clray_reduces"] = _step(0, rank, 0.0, None, clray_reduces=True)
    results[0]["gradcache_clray_reduces"] = _step(0, rank, 0.0, CHUNK, clray_reduces=True)
    return results


def _worker(rank: int, port: int, out_dir: str) -> None:
    from clray.jobs.runtime import own_op_builds

    os.environ["DS_ACCELERATOR"] = "cpu"
    own_op_builds()  # as jobs.run.engine.build_engine does: the ninja the op was pre-built with
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    init_gloo(rank, WORLD, port)
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    try:
        torch.save(_rank_results(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both ranks' results for every stage and variant, from one spawn (start-up dominates)."""
    out_dir = tmp_path_factory.mktemp("gradcache_ds")
    return spawn_ranks(_worker, (free_port(), str(out_dir)), WORLD, out_dir, TIMEOUT_S)


# ------------------------------------------------------------- plain-torch truth


def _encode_chunks_with_graph(model: DualEncoder, batch: dict[str, torch.Tensor], chunk: int) -> Encoded:
    """Chunks encoded one after another, each with its graph: the dropout masks the
    cached pass draws from the same starting RNG state."""
    parts = [model(_rows(batch, s, min(s + chunk, LOCAL_BATCH))) for s in range(0, LOCAL_BATCH, chunk)]
    return Encoded(torch.cat([p.anchor for p in parts]), torch.cat([p.positive for p in parts]),
                   None, parts[0].scale, None)


def _torch_reference(dropout: float) -> dict:
    """One process, the whole global batch, STEPS SGD steps: what the two ranks must reach.
    With dropout, each rank's rows are encoded from that rank's own RNG stream."""
    model = _model(dropout)
    streams = []
    for rank in range(WORLD):
        torch.manual_seed(SEED + rank)
        streams.append(torch.get_rng_state())
    losses = []
    for step in range(STEPS):
        batch = _global_batch(step)
        if dropout:
            per_rank = []
            for rank in range(WORLD):
                torch.set_rng_state(streams[rank])
                per_rank.append(_encode_chunks_with_graph(model, _local_batch(rank, step), CHUNK))
                streams[rank] = torch.get_rng_state()
            encoded = Encoded(torch.cat([e.anchor for e in per_rank]), torch.cat([e.positive for e in per_rank]),
                              None, per_rank[0].scale, None)
        else:
            encoded = model(batch)
        loss = apply_loss(build_loss(LossConfig()), encoded, batch).loss
        model.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
    return {"losses": losses, "params": _params(model)}


@pytest.fixture(scope="module")
def reference() -> dict:
    return {"initial": _params(_model(0.0)), "plain": _torch_reference(0.0), "dropout": _torch_reference(DROPOUT)}


def _update_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter tensor, how far the update ``got - initial`` is from ``want - initial``,
    relative to the size of the wanted update (an update is ``-LR * gradient``). The floor
    keeps tensors whose gradient is zero in exact arithmetic (a key bias: softmax ignores
    a shift shared by all keys) from dividing round-off by round-off."""
    assert got.keys() == want.keys() == initial.keys()
    errors = {}
    for name in want:
        wanted = (want[name] - initial[name]).double()
        off = (got[name].double() - want[name].double()).norm()
        errors[name] = float(off / max(float(wanted.norm()), UPDATE_FLOOR))
    return errors


def _assert_same_step(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                      what: str) -> None:
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{what}: {n}: {m}")
    errors = _update_errors(got, want, initial)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] < UPDATE_RTOL, f"{what}: {worst} update off by {errors[worst]:.2e} of its size"


# ------------------------------------------------------------------------ tests


@pytest.mark.parametrize("stage", STAGES)
def test_gradcache_step_equals_uncached_step(stage: int, ranks: list[dict], reference: dict) -> None:
    initial, want = reference["initial"], reference["plain"]["params"]
    for rank, result in enumerate(ranks):
        got = result[stage]
        _assert_same_step(got["gradcache"]["params"], got["plain"]["params"], initial, f"rank {rank} gradcache vs uncached")
        _assert_same_step(got["gradcache"]["params"], want, initial, f"rank {rank} gradcache vs one torch process")
        _assert_same_step(got["plain"]["params"], want, initial, f"rank {rank} uncached vs one torch process")
        assert got["gradcache"]["losses"] == pytest.approx(got["plain"]["losses"], rel=1e-5)
        assert got["gradcache"]["scales"] == pytest.approx(got["plain"]["scales"], rel=1e-6)
    for step in range(STEPS):
        mean_loss = sum(r[stage]["gradcache"]["losses"][step] for r in ranks) / WORLD  # each: mean of its rows
        assert mean_loss == pytest.approx(reference["plain"]["losses"][step], rel=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_gradcache_replays_dropout_masks(stage: int, ranks: list[dict], reference: dict) -> None:
    for rank, result in enumerate(ranks):
        got = result[stage]["dropout_gradcache"]["params"]
        _assert_same_step(got, reference["dropout"]["params"], reference["initial"], f"rank {rank} dropout gradcache")


def test_the_comparison_has_teeth(ranks: list[dict], reference: dict) -> None:
    initial, want = reference["initial"], reference["plain"]["params"]
    # The steps moved every parameter tensor by more than the update floor, except the
    # key bias, whose gradient is zero in exact arithmetic...
    moved = {n: float((want[n] - initial[n]).norm()) for n in initial}
    unmoved = [n for n, norm in moved.items() if norm < UPDATE_FLOOR]
    assert len(moved) > 20 and unmoved == ["anchor_tower.model.encoder.layer.0.attention.self.key.bias"], unmoved
    assert max(float((want[n] - initial[n]).abs().max()) for n in initial) > 1e4 * ATOL
    for stage in STAGES:
        for result in ranks:
            got = result[stage]
            # ...and each broken variant misses some update by far more than UPDATE_RTOL:
            # re-encoding without replaying the RNG draws new dropout masks,
            errors = _update_errors(got["dropout_no_rng_replay"]["params"], reference["dropout"]["params"], initial)
            assert max(errors.values()) > 100 * UPDATE_RTOL, (stage, max(errors.values()))
            # a loss over each rank's own rows only is a different objective,
            errors = _update_errors(got["local_loss_gradcache"]["params"], want, initial)
            assert max(errors.values()) > 100 * UPDATE_RTOL, (stage, max(errors.values()))
            # and at ZeRO 1 and 2 an accumulation boundary on every chunk loses the logit
            # scale's gradient (its update comes out zero): the scale gets its gradient in
            # the first chunk only, and a parameter with no gradient in the last boundary
            # backward ends up with none. (At ZeRO 0 and 3 such boundaries only cost extra
            # reductions; the result is right.)
            errors = _update_errors(got["boundary_every_chunk"]["params"], want, initial)
            if stage in (1, 2):
                assert errors["logit_scale"] > 100 * UPDATE_RTOL, (stage, errors["logit_scale"])


def test_clray_clips_at_zero_0_as_deepspeed_would(ranks: list[dict], reference: dict) -> None:
    """At ZeRO-0 in fp32 clray clips with torch's fused clip_grad_norm_ before DeepSpeed's
    step, and DeepSpeed does not clip (it would all-reduce a norm every rank already has):
    the parameters after two clipped steps are DeepSpeed's own clipping's, and clipping
    did act (they are not the unclipped steps')."""
    from clray.jobs.cli import QUICKSTART_CONFIG
    from clray.jobs.config import load_config
    from clray.jobs.run.engine import deepspeed_config, own_clip

    for rank in ranks:
        by_clray, by_ds = rank[0]["clipped_by_clray"], rank[0]["clipped_by_deepspeed"]
        errors = _update_errors(by_clray["params"], by_ds["params"], reference["initial"])
        assert max(errors.values()) < UPDATE_RTOL, errors
        unclipped = _update_errors(by_ds["params"], rank[0]["plain"]["params"], reference["initial"])
        assert max(unclipped.values()) > 0.1, unclipped
    for stage, precision, clray_clips in ((0, "fp32", True), (2, "fp32", False), (0, "bf16", False)):
        cfg = load_config(QUICKSTART_CONFIG, [f"train.zero_stage={stage}", f'train.precision="{precision}"',
                                              "optim.grad_clip=0.5"] + (["scaling.use_gpu=true"] if precision == "bf16" else []))
        assert own_clip(cfg) == (0.5 if clray_clips else 0.0)
        assert deepspeed_config(cfg)["gradient_clipping"] == (0.0 if clray_clips else 0.5)


def test_clray_row_sparse_reduction_equals_deepspeeds_bit_for_bit(ranks: list[dict], reference: dict) -> None:
    """At ZeRO-0 in fp32 clray all-reduces the word-embedding gradient by its non-zero rows
    only (jobs.run.reduction): two steps with it, plain and with GradCache, leave every
    parameter exactly where DeepSpeed's dense all-reduce leaves it. The batches use token
    ids 5-59 of the char tokenizer's 164-row vocabulary (a table sent by rows for this test),
    so the rows sent are a union smaller than the table, and the table did move."""
    initial = reference["initial"]
    vocab = initial["anchor_tower.model.embeddings.word_embeddings.weight"].shape[0]
    for rank in ranks:
        for variant in ("plain", "gradcache"):
            ours, deepspeeds = rank[0][f"{variant}_clray_reduces"], rank[0][variant]
            for name, value in deepspeeds["params"].items():
                torch.testing.assert_close(ours["params"][name], value, rtol=0, atol=0, msg=f"{variant}: {name}")
            assert ours["losses"] == deepspeeds["losses"]
            (sent,) = ours["rows_sent"]
            assert 5 < sent <= 60 and vocab == 164, sent
    word = "anchor_tower.model.embeddings.word_embeddings.weight"
    moved = (reference["plain"]["params"][word] - initial[word]).abs().amax(dim=1) > 0
    assert 5 < int(moved.sum()) <= 60
    for stage, precision, installed in ((0, "fp32", True), (2, "fp32", False), (0, "bf16", False)):
        assert _reduction_applies(stage, precision) == installed


def _reduction_applies(stage: int, precision: str) -> bool:
    """What ``own_reduction`` decides for an engine of this stage and precision (a stand-in
    engine on a 2-rank world: the decision reads only these)."""
    from unittest import mock

    from clray.jobs.run.reduction import own_reduction

    engine = mock.Mock(module=torch.nn.Embedding(2000, 4), dp_world_size=2)
    engine.zero_optimization_stage.return_value = stage
    engine.bfloat16_enabled.return_value = precision == "bf16"
    engine.fp16_enabled.return_value = False
    with mock.patch.object(dist, "is_initialized", return_value=True), \
            mock.patch.object(dist, "get_world_size", return_value=2):
        return own_reduction(engine) is not None
