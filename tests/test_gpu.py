"""The GPU path of a worker, without Ray: DeepSpeed on CUDA in bf16 over NCCL, the same
engine setup and train_step the Ray workers run. Skipped only where there is no CUDA
device (CI has none); run it on a GPU machine with `pytest tests/test_gpu.py`."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from process_group import free_port

from clray.jobs.cli import QUICKSTART_CONFIG
from clray.jobs.config import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def nccl_group():
    # One group for the module: DeepSpeed caches the group it first sees, so a destroyed
    # and re-created group between tests would leave it holding a dead one.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.pop("DS_ACCELERATOR", None)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


STEPS = 150


def _setup(tmp_path: Path, zero_stage: int, precision: str):
    from clray.jobs.run.engine import build_engine, cast_batch
    from clray.models.dual_encoder import DualEncoder
    from clray.models.preprocess import preprocess_view
    from clray.pipelines.quickstart import write_quickstart_corpus

    cfg = load_config(QUICKSTART_CONFIG, [
        "scaling.use_gpu=true", "scaling.num_workers=1", "train.global_batch_size=128",
        f"train.zero_stage={zero_stage}", "optim.warmup_fraction=0.0", f'train.precision="{precision}"',
    ])
    if not (tmp_path / "data").exists():
        write_quickstart_corpus(tmp_path / "data", bad_rows=0)
    rows = pq.read_table(tmp_path / "data" / "train").slice(0, 128).to_pylist()
    arrays = {
        **preprocess_view(cfg.model.anchor, [r["image"] for r in rows], "anchor"),
        **preprocess_view(cfg.model.positive_tower, [r["caption"] for r in rows], "positive"),
    }
    batch = cast_batch({k: torch.from_numpy(v).cuda() for k, v in arrays.items()}, bf16=precision != "fp32")
    torch.manual_seed(0)
    engine = build_engine(DualEncoder(cfg.model).cuda(), cfg, total_steps=STEPS)
    return cfg, engine, batch, arrays


def _train(engine, cfg, batch) -> tuple[list[float], list[float]]:
    from clray.jobs.run.engine import train_step
    from clray.models.losses import build_loss

    loss_fn = build_loss(cfg.loss)
    losses, scales = [], []
    for _ in range(STEPS):
        out, scale, _ = train_step(engine, loss_fn, batch)
        losses.append(out.loss.item())
        scales.append(scale)
    return losses, scales


def test_bf16_tracks_fp32_on_gpu(nccl_group, tmp_path: Path) -> None:
    from clray.jobs.run.engine import use_bf16

    cfg, engine, batch, _ = _setup(tmp_path, 2, "auto")
    assert use_bf16(cfg) and engine.bfloat16_enabled()
    assert next(engine.module.parameters()).device.type == "cuda"
    bf16_losses, scales = _train(engine, cfg, batch)
    _, engine32, batch32, _ = _setup(tmp_path, 2, "fp32")
    assert not engine32.bfloat16_enabled()
    fp32_losses, _ = _train(engine32, cfg, batch32)

    assert all(torch.isfinite(torch.tensor(bf16_losses)))
    assert fp32_losses[-1] < fp32_losses[0] - 1.0, fp32_losses[::10]  # one repeated batch: it fits
    assert bf16_losses[-1] < bf16_losses[0] - 1.0, bf16_losses[::10]
    assert abs(bf16_losses[-1] - fp32_losses[-1]) < 0.25 * fp32_losses[0], (bf16_losses[-1], fp32_losses[-1])
    assert all(0 < s <= 100.0 + 1e-3 for s in scales)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_engine_exports_what_it_trained(nccl_group, zero_stage: int, tmp_path: Path) -> None:
    from clray.models.export import load_exported

    cfg, engine, batch, arrays = _setup(tmp_path, zero_stage, "auto")
    losses, _ = _train(engine, cfg, batch)
    assert losses[-1] < losses[0] - 1.0, losses[::10]

    # Embed with the engine (a ZeRO-3 forward gathers on its own), then export the way the
    # worker does: under ZeRO-3, inside GatheredParameters with no forward in between
    # (a forward's post-hook would re-partition the modules it ran).
    engine.eval()
    with torch.no_grad():
        gpu_emb = engine.module.encode_positive(batch).float().cpu()
    from clray.jobs.run.checkpoint import export as _export

    _export(engine, cfg, str(tmp_path / "export"), rank=0)
    cpu_model = load_exported(tmp_path / "export").float()
    cpu_batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
    with torch.no_grad():
        cpu_emb = cpu_model.encode_positive(cpu_batch)
    cosine = torch.nn.functional.cosine_similarity(gpu_emb, cpu_emb, dim=-1)
    assert cosine.min() > 0.98, cosine.min()  # bf16 on GPU vs fp32 on CPU
