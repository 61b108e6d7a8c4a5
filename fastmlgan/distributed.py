"""Process-group set-up for ``torchrun`` (any world size) and plain ``python`` (world size 1)."""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Reads torchrun's environment; NCCL on GPUs, gloo on CPU. One GPU per local rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                "use --nproc_per_node <= the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
            **_restart_safe_store(rank, world_size, timeout),
        )
    return DistInfo(rank, world_size, local_rank, device)


def _restart_safe_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun, the rendezvous store with this restart attempt's own key prefix.

    After ``torchrun --max-restarts`` restarts a failed job, the new workers' process group reads
    the previous attempt's addresses from the store torchrun keeps, and connecting to the dead
    workers fails ("Gloo connectFullMesh failed ... Connection refused"; seen here with torch 2.14
    and gloo on every restart; pytorch/pytorch#135712, #167288). Prefixing every key with
    ``TORCHELASTIC_RESTART_COUNT`` keeps the attempts apart. Outside torchrun: env:// as usual."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return {}
    # The elastic agent hosts the store when it says so; otherwise rank 0 does (env://'s rule).
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=rank == 0 and not agent, timeout=timeout,
    )
    return {"store": dist.PrefixStore(f"/fastmlgan/attempt_{attempt}", store), "rank": rank, "world_size": world_size}


def destroy_distributed() -> None:
    """Tear the process group down. Call it after dropping every DDP model: a DDP reducer may keep
    its last gloo all-reduce work (with tensors) alive, and if that is freed only during
    interpreter shutdown, after the group is gone, the process aborts ("terminate called without
    an active exception"; seen here with torch 2.14 and gloo in 3 of about 20 two-rank runs)."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_arrays(array, info: DistInfo):
    """Concatenate a numpy array from every rank (rank order) on every rank."""
    return np.concatenate(all_gather_objects(array, info), axis=0) if info.enabled else array


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (rank order) on every rank."""
    if not info.enabled:
        return [obj]
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (and buffers) to every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def allreduce_gradients(params, world_size: int, bucket_bytes: int = 25 * 2**20) -> None:
    """Average ``.grad`` over ranks: flat buckets of ~25 MB (DDP's default bucket size), all
    launched asynchronously, then unpacked. Every rank must hold gradients for the same
    parameters (the steps never leave one out)."""
    grads = [p.grad for p in params if p.grad is not None]
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        if not buckets or size + g.numel() * g.element_size() > bucket_bytes or buckets[-1][0].dtype != g.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel() * g.element_size()
    pending = []
    for bucket in buckets:
        flat = _flatten_dense_tensors(bucket)
        flat.div_(world_size)
        pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)
