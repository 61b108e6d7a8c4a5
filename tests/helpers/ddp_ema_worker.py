"""Run by tests/unit/train/test_ema.py under ``torchrun --nproc_per_node 2``: BCE and GAN steps with
``--train.ema_decay``, then every rank's averaged weights are gathered and compared on rank 0:
the parameters without any synchronisation, the BatchNorm statistics after ``WeightEma.sync``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fastmlgan.config import build_config
from fastmlgan.data.stream import BatchStream
from fastmlgan.distributed import destroy_distributed, init_distributed
from fastmlgan.train.trainer import Trainer


def _gather(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    out = [torch.zeros_like(tensor) for _ in range(world_size)]
    dist.all_gather(out, tensor)
    return out


def main() -> None:
    out, data_root, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = build_config({"data.root": data_root, "out": str(out), "compile.enable": str(mode == "compile"),
                        "train.ema_decay": "0.5"}, preset="smoke")
    info = init_distributed("gloo")
    out.mkdir(parents=True, exist_ok=True)
    trainer = None
    try:
        trainer = Trainer(cfg, info, out)
        stream = BatchStream(trainer.train_loader)
        for _ in range(3):
            trainer.steps.bce_step(stream.next())
        trainer.start_gan_phase()
        gan_stream = BatchStream(trainer.build_gan_loader(), data_epoch=1)
        for _ in range(2):
            trainer.steps.train_step(gan_stream.next())
        ema = trainer.steps.ema.module
        params = torch.cat([p.detach().flatten() for p in ema.parameters()])
        buffers = lambda: torch.cat([b.detach().flatten().double() for b in ema.buffers()])  # noqa: E731
        params_all, buffers_before = _gather(params, info.world_size), _gather(buffers(), info.world_size)
        trainer.steps.ema.sync()
        buffers_after = _gather(buffers(), info.world_size)
        g_params = torch.cat([p.detach().flatten() for p in trainer.steps.generator.parameters()])
        if info.is_main:
            result = {
                "params_max_abs_diff": float((params_all[0] - params_all[1]).abs().max()),
                "buffers_differed_before_sync": float((buffers_before[0] - buffers_before[1]).abs().max()),
                "buffers_max_abs_diff": float((buffers_after[0] - buffers_after[1]).abs().max()),
                "ema_from_g": float((params - g_params).abs().max()),
                "updates": trainer.steps.ema.updates,
            }
            (out / "ddp_ema_result.json").write_text(json.dumps(result))
    finally:
        trainer = None  # DDP models go before the process group (see destroy_distributed)
        destroy_distributed()


if __name__ == "__main__":
    main()
