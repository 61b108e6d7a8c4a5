"""A model of multi-GPU data-parallel scaling, from a measured single-GPU step time and a measured
(or stated) all-reduce bandwidth.

    python bench/scaling.py --train bench/results/train-<gpu>.json [--bus-gbps 370] [--gpus 8 16 64]
    torchrun --nproc_per_node 8 bench/scaling.py --measure [--bytes 170e6]   # all-reduce bandwidth of this box

The model (written down in docs/performance.md):

* Per G update each rank all-reduces G's gradients once (S_G bytes: fp32, 4 bytes a parameter)
  and, in phase 2, D's three times (S_D). A ring all-reduce of S bytes on N ranks moves
  2·(N−1)/N·S bytes through each rank's link: t_comm(S, N) = 2·(N−1)/N · S / B_bus, with B_bus the
  bus bandwidth nccl-tests reports (``--measure`` measures it with torch.distributed).
* Without overlap a step takes t_step + t_comm; with DDP's bucketed overlap all but the last
  bucket (25 MB) hides behind the backward, which is about 2/3 of t_step:
  t = t_step + max(t_comm − 2/3·t_step, t_comm(25 MB, N)).
* Scaling efficiency = t_step / t (the per-GPU batch is fixed: weak scaling, as the trainer's
  --data.batch_size is global and divided across ranks, so keep B per GPU fixed by raising it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def ring_allreduce_s(size_bytes: float, ranks: int, bus_bytes_per_s: float) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * size_bytes / bus_bytes_per_s


def step_time(t_step: float, grad_bytes: float, ranks: int, bus: float, overlap: bool) -> float:
    t_comm = ring_allreduce_s(grad_bytes, ranks, bus)
    if not overlap:
        return t_step + t_comm
    exposed = max(t_comm - 2 / 3 * t_step, ring_allreduce_s(min(BUCKET_BYTES, grad_bytes), ranks, bus))
    return t_step + exposed


def gradient_bytes(backbone: str, num_labels: int, width: int = 32) -> tuple[int, int]:
    """(G's, D's) fp32 gradient bytes for the paper's D (256/512, 8 layers)."""
    from fastmlgan.models import Discriminator, build_generator

    g = build_generator(backbone, num_labels, width=width)
    d = Discriminator(num_labels, g.feature_dim)
    return 4 * sum(p.numel() for p in g.parameters()), 4 * sum(p.numel() for p in d.parameters())


def model(args) -> int:
    result = json.loads(Path(args.train).read_text())
    backbone = result["config"]["backbone"]
    g_bytes, d_bytes = gradient_bytes(backbone, result["config"].get("num_labels", 80), result["config"].get("width", 32))
    bus = args.bus_gbps * 1e9
    print(f"{backbone}: G gradients {g_bytes / 1e6:.0f} MB, D gradients {d_bytes / 1e6:.1f} MB; "
          f"bus bandwidth {args.bus_gbps:.0f} GB/s ({args.bus_source})")
    print(f"{'mode':<11}{'batch':>6} {'phase':<5}{'cache':>6}{'t_step ms':>10}" + "".join(f"{f'N={n} eff':>12}" for n in args.gpus))
    rows = []
    for r in result["rows"]:
        if "error" in r:
            continue
        t = r["ms_per_step"] / 1e3
        # Phase 2: one G all-reduce and d_steps D all-reduces per iteration.
        grads = g_bytes + (3 * d_bytes if r["phase"] == "gan" else 0)
        effs = {n: t / step_time(t, grads, n, bus, overlap=True) for n in args.gpus}
        no_overlap = {n: t / step_time(t, grads, n, bus, overlap=False) for n in args.gpus}
        rows.append({**{k: r[k] for k in ("mode", "batch", "phase", "feature_cache")}, "t_step_ms": r["ms_per_step"],
                     "efficiency_overlap": effs, "efficiency_no_overlap": no_overlap})
        print(f"{r['mode']:<11}{r['batch']:>6} {r['phase']:<5}{str(r['feature_cache'] or '-'):>6}{r['ms_per_step']:>10.1f}"
              + "".join(f"{effs[n]:>7.3f}/{no_overlap[n]:.2f}" for n in args.gpus))
    print("efficiency with DDP's overlap / without")
    if args.out:
        Path(args.out).write_text(json.dumps({"source": args.train, "bus_gbps": args.bus_gbps, "bus_source": args.bus_source,
                                              "g_bytes": g_bytes, "d_bytes": d_bytes, "rows": rows}, indent=1) + "\n")
    return 0


def time_allreduce(dist, x: torch.Tensor, repeats: int, sync, warmup: int = 3) -> list[float]:
    """Seconds of ``repeats`` all-reduces of ``x`` after ``warmup`` untimed ones. Every rank starts
    its clock after a barrier: without it a rank that arrived early timed its wait for the others
    as transfer time, and the bus bandwidth came out low."""
    times = []
    for i in range(repeats + warmup):
        sync()
        dist.barrier()
        sync()  # the barrier itself is a collective on the GPU under NCCL
        t0 = time.perf_counter()
        dist.all_reduce(x)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def measure(args) -> int:
    """All-reduce bus bandwidth of S bytes across this job's ranks (run under torchrun)."""
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    x = torch.zeros(int(args.bytes) // 4, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = statistics.median(time_allreduce(dist, x, args.repeats, sync))
    bus = 2 * (world - 1) / world * args.bytes / t
    if rank == 0:
        print(json.dumps({"ranks": world, "bytes": args.bytes, "allreduce_ms": round(t * 1e3, 3), "bus_gbps": round(bus / 1e9, 2)}))
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", help="a bench/train.py results file")
    p.add_argument("--bus-gbps", type=float, default=370.0,
                   help="all-reduce bus bandwidth, GB/s (default: a typical nccl-tests figure for 8 H100 SXM on NVSwitch)")
    p.add_argument("--bus-source", default="assumed: typical nccl-tests all_reduce bus bandwidth, 8x H100 SXM, not measured here")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--measure", action="store_true")
    p.add_argument("--bytes", type=float, default=170e6)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.measure:
        return measure(args)
    if not args.train:
        p.error("--train FILE (or --measure under torchrun)")
    return model(args)


if __name__ == "__main__":
    raise SystemExit(main())
