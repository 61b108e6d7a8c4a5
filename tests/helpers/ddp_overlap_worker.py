"""Run by tests/integration/test_ddp.py under ``torchrun --nproc_per_node 2``: can G's gradient all-reduce
start before G's backward has finished (overlap), eager and compiled?

Eager: the hook on G's *input* gradient fires when the backward reaches the first layer, i.e. at
its very end; every DDP bucket hook that fires before it launched its all-reduce while backward
was still running.

Compiled: a compiled backward hands out all its gradients at once, so the hook order says nothing;
what allows overlap is the backward being split into several compiled pieces (DDPOptimizer, one per
bucket), between which the buckets' all-reduces run. Count the compiled backward nodes in the
autograd graph: one means no overlap is possible."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from fastmlgan.config import build_config
from fastmlgan.data.stream import BatchStream
from fastmlgan.distributed import destroy_distributed, init_distributed
from fastmlgan.train.trainer import Trainer


def compiled_backward_pieces(root) -> int:
    """Nodes of the autograd graph under ``root`` that run a compiled (AOTAutograd) backward."""
    seen, stack, pieces = set(), [root], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        pieces += "CompiledFunction" in type(node).__name__
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return pieces


def main() -> None:
    out, data_root, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = build_config(
        {"data.root": data_root, "out": str(out), "compile.enable": str(mode == "compile"),
         # Several buckets: a 4.7 MB G (smallcnn, width 32) in 1 MB buckets (DDP's default is 25 MB;
         # its first bucket is 1 MB, and DDPOptimizer needs the others at least as large).
         "model.width": "32", "dist.bucket_cap_mb": "1"},
        preset="smoke",
    )
    info = init_distributed("gloo")
    out.mkdir(parents=True, exist_ok=True)
    trainer = None
    try:
        trainer = Trainer(cfg, info, out)
        events: list[str] = []

        def hook(state, bucket):
            events.append("allreduce")
            return allreduce_hook(state, bucket)

        trainer.steps.g_model.register_comm_hook(dist.group.WORLD, hook)
        stream = BatchStream(trainer.train_loader)
        counts = []
        for _ in range(3):  # DDP rebuilds its buckets after the first iteration: look at the last
            batch = stream.next()
            events.clear()
            x = trainer.steps.model_input(batch).requires_grad_(True)
            x.register_hook(lambda g: events.append("input-grad") or g)
            loss = trainer.steps.g_model(x).float().square().mean()
            pieces = compiled_backward_pieces(loss.grad_fn)
            loss.backward()
            counts.append({"before": events.index("input-grad"), "total": events.count("allreduce"), "pieces": pieces})
        if info.is_main:
            (out / "overlap.json").write_text(json.dumps(counts))
    finally:
        trainer = None
        destroy_distributed()


if __name__ == "__main__":
    from fastmlgan.commands.train import exit_after_distributed_run

    main()
    exit_after_distributed_run(0)
