"""The Trainer on a GPU with everything on: bf16 autocast, channels_last, the Triton kernels and
torch.compile (with and without CUDA graphs). Run by ``bench/gpu_check.sh``; skipped on CPUs."""

from __future__ import annotations

import math

import pytest
import torch

from fastmlgan.config import build_config
from fastmlgan.data.stream import BatchStream
from fastmlgan.distributed import DistInfo
from fastmlgan.train.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by bench/gpu_check.sh)"),
]


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory):
    from fastmlgan.data.sources import embedded

    root = tmp_path_factory.mktemp("gpu") / "embedded"
    embedded.ensure(root, num_train=512, num_val=64, image_size=72, seed=0)
    return root


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


# Two of the four (mode, feature cache) pairs: each compiles ResNet-18's steps afresh (the CUDA-graph
# ones miss inductor's FX-graph cache), and four of them did not fit the GPU check's budget. The
# cache changes which graphs phase 2 compiles (no f_ext), not how, so each mode meets one setting.
@pytest.mark.parametrize(("mode", "feature_cache"), [("default", False), ("reduce-overhead", True)])
def test_trainer_steps_with_bf16_channels_last_triton_and_compile(embedded_root, tmp_path, monkeypatch, mode, feature_cache):
    monkeypatch.setenv("FASTMLGAN_KERNELS", "triton")
    overrides = {
        "data.root": str(embedded_root),
        "data.embedded_num_train": "512",
        "data.embedded_num_val": "64",
        "data.embedded_image_size": "72",
        "data.image_size": "64",
        "data.batch_size": "16",
        "data.backend": "torchvision-gpu",
        "model.backbone": "resnet18",
        "model.channels_last": "true",
        "precision.amp": "bf16",
        "compile.enable": "true",
        "compile.mode": mode,
        "out": str(tmp_path),
    }
    if feature_cache:
        overrides["gan.feature_cache"] = str(tmp_path / "features.cache")
    trainer = Trainer(build_config(overrides, preset="smoke"), DistInfo(0, 1, 0, torch.device("cuda", 0)), tmp_path)
    assert trainer.steps.memory_format == torch.channels_last and trainer.steps.amp_dtype == torch.bfloat16
    g0, d0 = _flat(trainer.steps.generator), _flat(trainer.steps.discriminator)
    stream = BatchStream(trainer.train_loader)
    logged = []
    for _ in range(3):
        out = trainer.steps.bce_step(stream.next())
        logged.append({k: float(v) for k, v in out.items()})
    trainer.state.phase = "gan"
    trainer.start_gan_phase()
    gan = BatchStream(trainer.build_gan_loader(), data_epoch=1)
    for _ in range(3):
        batch = gan.next()
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
        if feature_cache:
            assert batch["image"].shape[0] == trainer.layout.pixel_rows
        out = trainer.steps.train_step(batch)
        logged.append({k: float(v) for k, v in out.items()})
    assert {"loss_d", "gp", "wasserstein", "loss_g", "bce"} <= set(logged[-1])
    for record in logged:
        assert all(math.isfinite(v) for v in record.values()), record
    # Every model moved, and the logged D values are this iteration's (not a replayed graph's
    # overwritten buffers): the last two iterations logged different D losses.
    assert not torch.equal(_flat(trainer.steps.generator), g0)
    assert not torch.equal(_flat(trainer.steps.discriminator), d0)
    assert logged[-1]["loss_d"] != logged[-2]["loss_d"]
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["mAP"] <= 100.0
