"""Every objective, in every mode, on 1, 2 and 4 ranks equals one process on the whole batch.

Real processes on gloo (no Ray): each rank encodes its slice of a fixed global batch
with a float64 tiny-BERT dual encoder, runs the loss (gather, tiled, ring, and GradCache
around gather and ring), backpropagates and averages loss and gradients over ranks as
DDP/DeepSpeed do. The loss and *every* parameter gradient must equal a single process
computing the plain full-matrix reference of :mod:`loss_reference` (written without
the library) on the concatenated batch. The batch is built so that every mask bites:
duplicate ids (within and across ranks), hard negatives whose id equals some anchor's,
repeated labels, teacher scores on both sides of the threshold. Negative controls show
the comparison has teeth. Each world size is spawned once; all variants run inside.

Also here: GradCache with dropout, and ring memory not growing with W. The blockwise
engine on raw tensors and the loss's own validation are in test_loss_blockwise.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from loss_reference import reference_loss
from process_group import free_port, init_gloo, spawn_ranks
from tiny_models import TINY_BERT

from clray.models.config import LossConfig, ModelConfig
from clray.models.dual_encoder import DualEncoder
from clray.models.gradcache import gradcache_step
from clray.models.losses import apply_loss, build_loss
from clray.models.losses.bench import siglip_ring_vs_gather
from clray.models.losses.ring import ring_memory

GLOBAL_BATCH = 8
K = 2  # hard negatives per anchor
SEQ_LEN = 10
CHUNK = 3  # GradCache chunk: splits local batches of 8 and 4 raggedly
BLOCK = 3  # tiles: ragged against 8 gathered columns, 4 local rows, ring blocks of 4 and 12
THRESHOLD = 0.5
IDS = [10, 11, 12, 10, 13, 14, 11, 15]  # 10 twice on rank 0 of 2; 11 on both ranks
LABELS = [0, 1, 0, 2, 1, -1, 2, 0]  # repeats within and across ranks; one unknown
NEGATIVE_IDS = [[12, 20], [21, 11], [22, 23], [24, 10], [13, 25], [26, 27], [28, 15], [29, 11]]
NEGATIVE_SCORES = [[0.9, 0.1], [0.2, 0.7], [0.6, 0.3], [0.1, 0.2], [0.4, 0.8], [0.95, 0.05], [0.3, 0.55], [0.2, 0.1]]

# name -> (LossConfig fields, whether the batch has hard negatives)
VARIANTS: dict[str, tuple[dict, bool]] = {
    "infonce_symmetric": ({}, False),
    "infonce_one_way": ({"symmetric": False}, False),
    "infonce_negatives_id_teacher": ({"mask_same_id": True, "teacher_threshold": THRESHOLD}, True),
    "infonce_hardness": ({"hardness_beta": 0.5, "mask_same_id": True}, True),
    "infonce_same_label": ({"mask_same_label": True, "symmetric": False}, False),
    "dcl": ({"type": "dcl"}, False),
    "dcl_negatives_hardness": ({"type": "dcl", "hardness_beta": 0.5, "teacher_threshold": THRESHOLD}, True),
    "supcon": ({"type": "supcon"}, False),
    "supcon_negatives_id": ({"type": "supcon", "mask_same_id": True, "symmetric": False}, True),
    "siglip": ({"type": "siglip"}, False),
    "siglip_negatives_id_teacher": (
        {"type": "siglip", "mask_same_id": True, "mask_same_label": True, "teacher_threshold": THRESHOLD}, True),
}
# name -> (LossConfig fields, GradCache on)
MODES: dict[str, tuple[dict, bool]] = {
    "gather": ({"mode": "gather"}, False),
    "tiled": ({"mode": "tiled", "block_size": BLOCK}, False),
    "ring": ({"mode": "ring", "block_size": BLOCK}, False),
    "gradcache_gather": ({"mode": "gather"}, True),
    "gradcache_ring": ({"mode": "ring", "block_size": BLOCK}, True),
}
LOCAL_ONLY = {"gather": False, "mask_same_id": True}  # gather=False: a different, per-rank objective
WORLDS = (1, 2, 4)
TOL = {"rtol": 1e-5, "atol": 1e-9}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: extra intra-op threads only contend with the spawned ranks (and other
    jobs on a 2-core box), which made a tiny BERT forward 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bert(dropout: float) -> dict:
    return {**TINY_BERT, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}


def _model(dropout: float = 0.0) -> DualEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({
        "anchor": {"type": "text", "config": _bert(dropout), "max_length": SEQ_LEN},
        "shared_tower": True,
        "embed_dim": 16,
        "logit_bias": {"init": -3.0},  # only siglip uses it; the others leave it without a gradient
    })
    # float64: the check is about which terms the gradient sums, not fp32 summation order.
    return DualEncoder(cfg).double().train()


def _global_batch(negatives: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    batch: dict[str, torch.Tensor] = {}
    views = {"anchor": (GLOBAL_BATCH,), "positive": (GLOBAL_BATCH,), "negative": (GLOBAL_BATCH, K)}
    for view, rows in views.items():
        tokens = torch.randint(5, 60, (*rows, SEQ_LEN), generator=gen)
        lengths = torch.randint(3, SEQ_LEN + 1, rows, generator=gen)
        mask = (torch.arange(SEQ_LEN) < lengths[..., None]).long()
        if view != "negative" or negatives:
            batch[f"{view}_input_ids"] = tokens * mask
            batch[f"{view}_attention_mask"] = mask
    # Side inputs go to every loss, as the training loop passes them; each uses what its config asks.
    batch["label"] = torch.tensor(LABELS)
    batch["id_key"] = torch.tensor(IDS)
    batch["negative_id_key"] = torch.tensor(NEGATIVE_IDS)
    batch["negative_score"] = torch.tensor(NEGATIVE_SCORES, dtype=torch.float64)
    return batch


def _rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in batch.items()}


def _grads(model: DualEncoder) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _library(model: DualEncoder, batch: dict, cfg: LossConfig, gradcache: bool) -> tuple[torch.Tensor, dict, dict]:
    """Loss, parameter gradients and metrics of this rank's slice (one training step's backward)."""
    loss_fn = build_loss(cfg)
    model.zero_grad(set_to_none=True)
    if gradcache:
        def backward(surrogate: torch.Tensor, last: bool) -> None:
            surrogate.backward()

        out = gradcache_step(model, batch, CHUNK, lambda enc: apply_loss(loss_fn, enc, batch), backward)
    else:
        out = apply_loss(loss_fn, model(batch), batch)
        out.loss.backward()
    return out.loss.detach(), _grads(model), out.metrics


def _average(loss: torch.Tensor, grads: dict[str, torch.Tensor], world: int) -> dict:
    """Mean over ranks of the loss and every gradient, as DDP/DeepSpeed average them (one all_reduce)."""
    names = sorted(grads)
    flat = torch.cat([loss.reshape(1)] + [grads[n].reshape(-1) for n in names])
    dist.all_reduce(flat)
    flat /= world
    out, start = {}, 1
    for n in names:
        out[n] = flat[start : start + grads[n].numel()].reshape(grads[n].shape)
        start += grads[n].numel()
    return {"loss": flat[0], "grads": out}


def _ring_memory_and_agreement(rows: int = 6, dim: int = 16) -> dict[str, float]:
    """Peak bytes the ring allocated (blocks in flight, gradient accumulators) during one
    symmetric InfoNCE forward+backward with hard negatives, in units of this rank's own
    a2p candidate block (embeddings + metadata); and the largest difference between the
    ring's and gather mode's loss and input gradients on the same embeddings."""
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    data = [F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)
            for shape in ((rows, dim), (rows, dim), (rows, K, dim))]
    ids = torch.arange(rows) % 3 + 10 * dist.get_rank()
    results = {}
    for mode in ("ring", "gather"):
        leaves = [t.clone().requires_grad_() for t in data]
        loss_fn = build_loss(LossConfig(mode=mode, block_size=4, mask_same_id=True))
        ring_memory.reset()
        loss = loss_fn(*leaves, ids=ids, negative_ids=ids[:, None].expand(rows, K) + 1,
                       logit_scale=torch.tensor(10.0, dtype=torch.float64)).loss
        loss.backward()
        results[mode] = (ring_memory.peak, [loss.detach()] + [t.grad for t in leaves])
    columns = rows * (1 + K)
    diff = max(float((a - b).abs().max()) for a, b in zip(results["ring"][1], results["gather"][1], strict=True))
    return {"peak_blocks": results["ring"][0] / (columns * dim * 8 + columns * 5 * 8), "max_diff": diff}


def _rank_results(rank: int, world: int) -> dict:
    model = _model()
    local = GLOBAL_BATCH // world
    batches = {neg: _rows(_global_batch(neg), rank * local, (rank + 1) * local) for neg in (False, True)}
    results: dict = {}
    for variant, (fields, negatives) in VARIANTS.items():
        for mode, (mode_fields, gradcache) in MODES.items():
            loss, grads, metrics = _library(model, batches[negatives], LossConfig(**fields, **mode_fields), gradcache)
            results[variant, mode] = {**_average(loss, grads, world), "metrics": metrics}
    for mode in ("gather", "tiled", "ring"):
        # LossConfig refuses ring with gather = false (nothing would travel: a config asking for
        # it is a mistake), but the loss defines it (each rank's own block, tiled): build it as is.
        cfg = LossConfig.model_construct(**LOCAL_ONLY, **MODES[mode][0])
        loss, grads, _ = _library(model, batches[True], cfg, False)
        results["local_only", mode] = _average(loss, grads, world)
    results["ring"] = _ring_memory_and_agreement()
    results["bench"] = siglip_ring_vs_gather(local_batch=12, dim=8, block_size=5, hard_negatives=1, warmup=4)
    return results


def _worker(rank: int, world: int, port: int, out_dir: str, memory_only: bool) -> None:
    init_gloo(rank, world, port)
    try:
        result = {"ring": _ring_memory_and_agreement()} if memory_only else _rank_results(rank, world)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(world: int, out_dir: Path, memory_only: bool = False, timeout_s: float = 150.0) -> list[dict]:
    if world == 1:
        # A process group of one, in this process: the initialised-group code path
        # without paying for a spawned interpreter.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            return [_rank_results(0, 1)]
        finally:
            dist.destroy_process_group()
    out_dir.mkdir(parents=True, exist_ok=True)
    return spawn_ranks(_worker, (world, free_port(), str(out_dir), memory_only), world, out_dir, timeout_s)


# --- the single-process reference ----------------------------------------------------


def _reference_run(fields: dict, negatives: bool, groups: int = 1) -> dict:
    """Reference loss and gradients on the global batch; with ``groups`` > 1, the mean of
    the reference on each rank's slice alone (what gather=False means)."""
    model = _model()
    batch = _global_batch(negatives)
    cfg = LossConfig(**fields)
    size = GLOBAL_BATCH // groups
    total = torch.zeros((), dtype=torch.float64)
    for g in range(groups):
        part = _rows(batch, g * size, (g + 1) * size)
        enc = model(part)
        total = total + reference_loss(
            cfg.type, enc.anchor, enc.positive, enc.negatives, scale=enc.scale, bias=enc.bias,
            symmetric=cfg.symmetric, labels=part["label"], ids=part["id_key"],
            negative_ids=part["negative_id_key"], negative_scores=part["negative_score"],
            hardness_beta=cfg.hardness_beta, mask_same_id=cfg.mask_same_id,
            mask_same_label=cfg.mask_same_label, teacher_threshold=cfg.teacher_threshold,
        ) / groups
    total.backward()
    return {"loss": total.detach(), "grads": _grads(model)}


@pytest.fixture(scope="module")
def reference() -> dict:
    out = {variant: _reference_run(fields, negatives) for variant, (fields, negatives) in VARIANTS.items()}
    for world in WORLDS:
        out["local_only", world] = _reference_run(LOCAL_ONLY, True, groups=world)
    return out


@pytest.fixture(scope="module")
def ranks_for(tmp_path_factory: pytest.TempPathFactory):
    """Results per world size, spawned once per module (process start-up dominates the cost)."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = _run_ranks(world, tmp_path_factory.mktemp(f"w{world}"))
        return cache[world]

    return get


def _assert_matches(got: dict, want: dict, what: str) -> None:
    torch.testing.assert_close(got["loss"], want["loss"], **TOL, msg=lambda m: f"{what} loss: {m}")
    assert got["grads"].keys() == want["grads"].keys(), what
    assert len(want["grads"]) > 10  # every tower/projection/scale weight, not a handful
    for name in want["grads"]:
        torch.testing.assert_close(got["grads"][name], want["grads"][name], **TOL,
                                   msg=lambda m, name=name: f"{what} grad {name}: {m}")


# --- equivalence ------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"W{w}")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_mode_equals_the_single_process_reference(world: int, variant: str, ranks_for, reference) -> None:
    for rank, result in enumerate(ranks_for(world)):
        for mode in MODES:
            _assert_matches(result[variant, mode], reference[variant], f"{variant}/{mode} W={world} rank {rank}")


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"W{w}")
def test_metrics_agree_across_modes(world: int, ranks_for) -> None:
    for result in ranks_for(world):
        for variant in VARIANTS:
            want = result[variant, "gather"]["metrics"]
            assert set(want) >= {"pos_sim", "neg_sim", "accuracy"}
            for mode in MODES:
                got = result[variant, mode]["metrics"]
                assert got == pytest.approx(want, abs=1e-9), (variant, mode)


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"W{w}")
def test_local_only_is_the_per_rank_objective_in_every_mode(world: int, ranks_for, reference) -> None:
    for result in ranks_for(world):
        for mode in ("gather", "tiled", "ring"):
            _assert_matches(result["local_only", mode], reference["local_only", world], f"local_only/{mode} W={world}")


def test_negative_controls_have_teeth(reference) -> None:
    """The comparisons above could fail: gather=False is not the global loss, and each
    mask, the hardness weighting and the hard negatives change the reference loss."""
    def loss(fields: dict, negatives: bool) -> float:
        return _reference_run(fields, negatives)["loss"].item()

    for world in (2, 4):
        assert abs(reference["local_only", world]["loss"].item() - reference["local_only", 1]["loss"].item()) > 1e-3
    masked = reference["infonce_negatives_id_teacher"]["loss"].item()
    assert abs(masked - loss({"teacher_threshold": THRESHOLD}, True)) > 1e-3  # id mask bites
    assert abs(masked - loss({"mask_same_id": True}, True)) > 1e-3  # teacher mask bites
    assert abs(masked - loss({"mask_same_id": True, "teacher_threshold": THRESHOLD}, False)) > 1e-3  # negatives count
    hard = reference["infonce_hardness"]["loss"].item()
    assert abs(hard - loss({"mask_same_id": True}, True)) > 1e-3
    one_way = reference["infonce_one_way"]["loss"].item()
    assert abs(reference["infonce_same_label"]["loss"].item() - one_way) > 1e-3
    siglip = reference["siglip_negatives_id_teacher"]["loss"].item()
    assert abs(siglip - loss({"type": "siglip", "mask_same_label": True, "teacher_threshold": THRESHOLD}, True)) > 1e-3
    assert abs(siglip - loss({"type": "siglip", "mask_same_id": True, "teacher_threshold": THRESHOLD}, True)) > 1e-3
    supcon = reference["supcon"]["loss"].item()
    assert abs(supcon - reference["infonce_symmetric"]["loss"].item()) > 1e-3


def test_ring_memory_does_not_grow_with_world_size(ranks_for, tmp_path: Path) -> None:
    """What the ring allocates (blocks being scored and in flight, gradient accumulators),
    at its peak, in units of one local candidate block. It rises while the chains get
    long enough to hold every buffer at once (W = 2 runs one chain; both chains have
    three steps from W = 7) and then stays put: W = 7, 8 and 16 (tried by hand) give
    the same. Gathering instead holds every foreign block and its gradient: 2 (W - 1).
    W = 7 (odd: both chains end together) and 8 also check ring against gather."""
    runs = {world: [r["ring"] for r in ranks_for(world)] for world in (1, 2, 4)}
    for world in (7, 8):  # random embeddings, no model
        runs[world] = [r["ring"] for r in _run_ranks(world, tmp_path / f"w{world}", memory_only=True)]
    for world, ranks in runs.items():
        assert max(r["max_diff"] for r in ranks) < 1e-12, world
    peaks = {world: max(r["peak_blocks"] for r in ranks) for world, ranks in runs.items()}
    assert peaks[1] == 0, peaks  # one rank: nothing travels
    assert 0 < peaks[2] <= peaks[4] <= peaks[7], peaks
    assert peaks[8] == pytest.approx(peaks[7]), peaks
    # A fixed bound: per chain 2 blocks (scored, in flight) and 3 gradient buffers.
    assert peaks[8] <= 10 < 2 * (8 - 1), peaks


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"W{w}")
def test_siglip_benchmark_helper_runs_both_modes(world: int, ranks_for) -> None:
    for rank, result in enumerate(ranks_for(world)):
        bench = result["bench"]
        assert (bench["world"], bench["rank"]) == (world, rank)
        assert bench["gather"]["loss"] == pytest.approx(bench["ring"]["loss"], rel=1e-5)
        assert bench["max_grad_diff"] < 1e-5 and bench["ring"]["seconds"] > 0
        assert (bench["ring"]["peak_ring_bytes"] > 0) == (world > 1)


# --- GradCache with dropout -------------------------------------------------------------


def _dropout_gradients(gradcache: bool, seed: int) -> dict[str, torch.Tensor]:
    model = _model(dropout=0.1)
    batch = _global_batch(True)
    loss_fn = build_loss(LossConfig(mask_same_id=True, mode="tiled", block_size=BLOCK))
    torch.manual_seed(seed)
    if gradcache:
        gradcache_step(model, batch, CHUNK, lambda enc: apply_loss(loss_fn, enc, batch), lambda s, last: s.backward())
    else:  # the same chunks encoded in the same order, with the graph kept
        parts = [model(_rows(batch, i, i + CHUNK)) for i in range(0, GLOBAL_BATCH, CHUNK)]
        encoded = type(parts[0])(
            torch.cat([p.anchor for p in parts]), torch.cat([p.positive for p in parts]),
            torch.cat([p.negatives for p in parts]), parts[0].scale, parts[0].bias,
        )
        apply_loss(loss_fn, encoded, batch).loss.backward()
    return _grads(model)


def test_gradcache_replays_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    want = _dropout_gradients(gradcache=False, seed=5)
    got = _dropout_gradients(gradcache=True, seed=5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-10, msg=name)

    def differs(a: dict, b: dict) -> bool:
        return any(not torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-8) for n in a)

    assert differs(_dropout_gradients(gradcache=False, seed=6), want)  # dropout is really on
    from clray.models import gradcache

    monkeypatch.setattr(gradcache, "_set_rng_state", lambda state, device: None)
    assert differs(_dropout_gradients(gradcache=True, seed=5), want)  # without the RNG replay it is wrong
