"""Process-group set-up for ``torchrun`` (any world size) and plain ``python`` (world size 1)."""

from __future__ import annotations

import datetime
import fcntl
import gc
import ipaddress
import logging
import os
import socket
import struct
import threading
import uuid
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
        if backend == "gloo" and (interface := _gloo_interface()) is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
            logger.info("gloo: the host name resolves to a loopback address; using %s, the interface that "
                        "reaches MASTER_ADDR %s (set GLOO_SOCKET_IFNAME to choose)", interface, os.environ["MASTER_ADDR"])
        device_id = device if device.type == "cuda" else None
        under_torchrun = _torchrun_store(rank, world_size, timeout)
        if under_torchrun:
            _init_with_fresh_prefix(backend, timeout, device_id, under_torchrun)
        else:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    return DistInfo(rank, world_size, local_rank, device)


def _torchrun_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun, the rendezvous store (its keys then go under a prefix of this start's own).

    After ``torchrun --max-restarts`` restarts a failed job, the new workers' process group reads
    the previous start's addresses from the store torchrun keeps for all of its rounds, and
    connecting to the dead workers fails ("Gloo connectFullMesh failed ... Connection refused";
    seen here with torch 2.14 and gloo on every restart; pytorch/pytorch#135712, #167288).
    ``TORCHELASTIC_RESTART_COUNT`` cannot tell the starts apart across hosts: each host's agent
    counts its own restarts, and an agent restarted by another host's failure (a membership
    change) does not count it (pytorch/pytorch#108158). Two hosts then used different prefixes and
    waited for each other's keys until the store timeout (``--dist.timeout_s``; issue 22: host
    B's worker killed, both hosts hung). Rank 0 draws a fresh prefix and hands it to each rank
    that asks with a fresh nonce of its own (``_PrefixServer``, ``_ask_prefix``), so no rank can
    take a dead start's. Outside torchrun:
    env:// as usual."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") is None or "MASTER_ADDR" not in os.environ:
        return {}
    # The elastic agent hosts the store when it says so; otherwise rank 0 does (env://'s rule).
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=rank == 0 and not agent, timeout=timeout,
    )
    return {"store": store, "rank": rank, "world_size": world_size}


_HANDSHAKE = "/fastmlgan/handshake"


def _ask_prefix(store, rank: int, timeout: datetime.timedelta) -> str:
    """A rank other than 0: this start's prefix, from rank 0, in answer to a nonce no earlier
    process used (a stale answer cannot match it)."""
    nonce = uuid.uuid4().hex
    store.set(f"{_HANDSHAKE}/ask/{rank}", nonce)
    answer = f"{_HANDSHAKE}/answer/{nonce}"
    store.wait([answer], timeout)
    return store.get(answer).decode()


class _PrefixServer:
    """Rank 0: answers every rank's latest nonce with this start's prefix until stopped (once the
    process group is up, every rank has its answer). A nonce left by a dead process is answered
    too, harmlessly: nobody waits for it."""

    def __init__(self, world_size: int, timeout: datetime.timedelta):
        self.prefix = f"/fastmlgan/start_{uuid.uuid4().hex}"
        # A connection of its own: init_process_group uses the other one meanwhile (with one
        # shared connection, the third start of issue 22's trial never met; observed once, not
        # isolated further).
        self._store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
        )
        self._world_size = world_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fastmlgan-prefix", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        answered: dict[int, bytes] = {}
        keys = {r: f"{_HANDSHAKE}/ask/{r}" for r in range(1, self._world_size)}
        while not self._stop.is_set():
            try:
                for r, key in keys.items():
                    if self._store.check([key]):
                        nonce = self._store.get(key)
                        if answered.get(r) != nonce:
                            self._store.set(f"{_HANDSHAKE}/answer/{nonce.decode()}", self.prefix)
                            answered[r] = nonce
            except (RuntimeError, OSError):  # the store went away: init_process_group reports it
                return
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _init_with_fresh_prefix(backend: str, timeout: datetime.timedelta, device_id, kwargs: dict) -> None:
    store = kwargs.pop("store")
    server = _PrefixServer(kwargs["world_size"], timeout) if kwargs["rank"] == 0 else None
    try:
        prefix = server.prefix if server is not None else _ask_prefix(store, kwargs["rank"], timeout)
        dist.init_process_group(
            backend=backend, timeout=timeout, device_id=device_id, store=dist.PrefixStore(prefix, store), **kwargs
        )
    finally:
        if server is not None:
            server.stop()


def _gloo_interface() -> str | None:
    """The network interface for gloo across hosts, where gloo's own choice would fail.

    gloo binds to the address the host name resolves to. Where that is a loopback address (a
    container's or network namespace's /etc/hosts, Debian's ``127.0.1.1 HOST``), every rank
    advertises 127.x and the ranks of other hosts connect to themselves ("Connection refused";
    issue 22, two network namespaces with one host name). Then the interface holding the address
    that reaches MASTER_ADDR is the one to use; None where gloo's choice is sound, where
    GLOO_SOCKET_IFNAME is set, on one host, or where no IPv4 interface can be found."""
    master = os.environ.get("MASTER_ADDR")
    if os.environ.get("GLOO_SOCKET_IFNAME") or int(os.environ.get("GROUP_WORLD_SIZE", "1")) <= 1 or not master:
        return None
    try:
        own = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        own = set()
    if any(not ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in own):
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))  # UDP: no packet is sent; the kernel picks the route's source address
            local = s.getsockname()[0]
    except OSError:
        return None
    if ipaddress.ip_address(local).is_loopback:
        return None  # MASTER_ADDR is this host's loopback: every rank is here
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR: the interface's IPv4 address (Linux)
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
        if socket.inet_ntoa(raw[20:24]) == local:
            return name
    return None


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
