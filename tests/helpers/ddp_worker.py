"""Run by tests/integration/test_ddp.py under ``torchrun --nproc_per_node 2``: a few BCE and GAN steps, then
every rank's G and D parameters are gathered and compared on rank 0. Arguments: OUT DATA_ROOT
[eager|compile [KEY=VALUE ...]], the last ones overrides of the smoke preset."""

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


def main() -> None:
    out, data_root = Path(sys.argv[1]), sys.argv[2]
    compiled = len(sys.argv) > 3 and sys.argv[3] == "compile"
    overrides = dict(arg.split("=", 1) for arg in sys.argv[4:])
    cfg = build_config({"data.root": data_root, "out": str(out), "compile.enable": str(compiled), **overrides}, preset="smoke")
    info = init_distributed("gloo")
    out.mkdir(parents=True, exist_ok=True)
    trainer = None
    try:
        trainer = Trainer(cfg, info, out)
        params = lambda: torch.cat(  # noqa: E731
            [p.detach().flatten() for p in [*trainer.steps.generator.parameters(), *trainer.steps.discriminator.parameters()]]
        )
        init = params().clone()
        stream = BatchStream(trainer.train_loader)
        first = stream.next()
        trainer.steps.bce_step(first)
        for _ in range(2):
            trainer.steps.bce_step(stream.next())
        trainer.start_gan_phase()  # f_ext frozen from G
        f_ext_state = torch.cat([t.detach().flatten().float() for t in trainer.steps.feature_extractor.state_dict().values()])
        f_ext_all = [torch.zeros_like(f_ext_state) for _ in range(info.world_size)]
        dist.all_gather(f_ext_all, f_ext_state)
        gan_stream = BatchStream(trainer.build_gan_loader(), data_epoch=1)
        for _ in range(2):
            trainer.steps.train_step(gan_stream.next())
        final = params()
        gathered = [torch.zeros_like(final) for _ in range(info.world_size)]
        dist.all_gather(gathered, final)
        indices = [None] * info.world_size
        dist.all_gather_object(indices, first["index"].tolist())
        if info.is_main:
            result = {
                "max_abs_diff": float((gathered[0] - gathered[1]).abs().max()),
                # f_ext (weights and BatchNorm statistics) must be one model on every rank.
                "f_ext_max_abs_diff": float((f_ext_all[0] - f_ext_all[1]).abs().max()),
                "change_from_init": float((final - init).abs().max()),
                "first_batch_indices": indices,
                "backbone": trainer.steps.generator.backbone,
            }
            (out / "ddp_result.json").write_text(json.dumps(result))
    finally:
        trainer = None  # DDP models go before the process group (see destroy_distributed)
        destroy_distributed()


if __name__ == "__main__":
    from fastmlgan.commands.train import exit_after_distributed_run

    main()
    exit_after_distributed_run(0)
