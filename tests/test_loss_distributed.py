"""InfoNCE with cross-rank gather equals one process on the concatenated batch.

Real processes on gloo (no Ray): each rank encodes its half of a fixed global batch,
computes the loss with gathered candidates, backpropagates, then averages gradients
over ranks as DDP/DeepSpeed do. Loss and *every* parameter gradient must match a single
process that sees the whole batch. gather=False must not match, so the comparison has
teeth.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import TINY_BERT

from models.config import LossConfig, ModelConfig
from models.dual_encoder import DualEncoder
from models.losses import build_loss

GLOBAL_BATCH = 8
SEQ_LEN = 12
NO_DROPOUT_BERT = {
    **TINY_BERT,
    "hidden_dropout_prob": 0.0,  # dropout would make ranks and reference draw different masks
    "attention_probs_dropout_prob": 0.0,
}
VARIANTS = {
    "symmetric": LossConfig(symmetric=True, gather=True),
    "one_way": LossConfig(symmetric=False, gather=True),
    "local_only": LossConfig(symmetric=True, gather=False),
    # Tiled mode, with a block that splits the 4 local rows and 8 candidates raggedly.
    "tiled_symmetric": LossConfig(symmetric=True, gather=True, mode="tiled", block_size=3),
    "tiled_one_way": LossConfig(symmetric=False, gather=True, mode="tiled", block_size=3),
}
# What each variant must equal: the plain (materialised-matrix) loss on one process.
PLAIN_REFERENCE = {"symmetric": "symmetric", "one_way": "one_way",
                   "tiled_symmetric": "symmetric", "tiled_one_way": "one_way"}


def _model() -> DualEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {"anchor": {"type": "text", "config": NO_DROPOUT_BERT, "max_length": SEQ_LEN}, "shared_tower": True, "embed_dim": 16}
    )
    # float64: the check is about which terms the gradient sums, not about fp32 summation
    # order (a gradient like token_type_embeddings sums nearly-cancelling terms over every
    # token, so thread count alone moves it past any fp32 tolerance on a many-core box).
    return DualEncoder(cfg).double().train()


def _global_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
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


def _loss_and_grads(model: DualEncoder, batch: dict[str, torch.Tensor], loss_cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    anchor, positive, _, scale, _ = model(batch)
    loss = build_loss(loss_cfg)(anchor, positive, logit_scale=scale).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _rank_results(rank: int, world: int) -> dict:
    """One rank's loss and gradients per variant, averaged over ranks like DDP/DeepSpeed do."""
    model = _model()
    local = GLOBAL_BATCH // world
    batch = _rows(_global_batch(), rank * local, (rank + 1) * local)
    results = {}
    for name, loss_cfg in VARIANTS.items():
        loss, grads = _loss_and_grads(model, batch, loss_cfg)
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        results[name] = {"loss": loss / world, "grads": grads}
    return results


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores: no oversubscription
    # Pin gloo to loopback (the ranks only talk locally): left to pick an interface from
    # the hostname, connecting took ~10 s longer on the CI VM.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_rank_results(rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world: int, out_dir: Path, timeout_s: float = 120.0) -> list[dict]:
    if world == 1:
        # A process group of one, in this process: exercises the initialised-group code
        # path without paying for a spawned interpreter.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            return [_rank_results(0, 1)]
        finally:
            dist.destroy_process_group()
    ctx = mp.spawn(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):  # raises if a rank failed, with its traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks did not finish within {timeout_s}s (collective hang?)")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def _reference() -> dict:
    model = _model()
    batch = _global_batch()
    results = {}
    for name, loss_cfg in VARIANTS.items():
        loss, grads = _loss_and_grads(model, batch, loss_cfg)
        results[name] = {"loss": loss, "grads": grads}
    # What gather=False means at W=2: each rank's loss uses only its own half.
    halves = [_loss_and_grads(model, _rows(batch, i * 4, i * 4 + 4), VARIANTS["local_only"])[0] for i in (0, 1)]
    results["local_only_w2"] = {"loss": sum(halves) / 2}
    return results


def _assert_matches(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
    assert got["grads"].keys() == want["grads"].keys()
    assert len(want["grads"]) > 10  # every tower/projection/scale weight, not a handful
    for name in want["grads"]:
        torch.testing.assert_close(got["grads"][name], want["grads"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference() -> dict:
    return _reference()


@pytest.fixture(scope="module")
def ranks_for(tmp_path_factory: pytest.TempPathFactory):
    """Results per world size, spawned once per module (process start-up dominates the cost)."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = _run_ranks(world, tmp_path_factory.mktemp(f"w{world}"))
        return cache[world]

    return get


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("variant", sorted(PLAIN_REFERENCE))
def test_gathered_infonce_equals_single_process(world: int, variant: str, ranks_for, reference: dict) -> None:
    for result in ranks_for(world):
        _assert_matches(result[variant], reference[PLAIN_REFERENCE[variant]])


def test_local_only_loss_differs_from_global(ranks_for, reference: dict) -> None:
    got = ranks_for(2)[0]["local_only"]["loss"]
    # Without gather the loss is the mean of the two half-batch losses...
    torch.testing.assert_close(got, reference["local_only_w2"]["loss"], rtol=1e-5, atol=1e-6)
    # ...which is not the global-batch loss, so the equality tests above can fail.
    assert abs(got.item() - reference["symmetric"]["loss"].item()) > 1e-3
