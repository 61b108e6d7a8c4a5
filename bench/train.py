"""Throughput of the real Trainer: phase 1 (BCE steps) and phase 2 (iterations of 3 D updates
and a G update), eager, compiled and with CUDA graphs, on synthetic on-device batches (the compute
bound) or on the real loader.

    python bench/train.py [--device cpu|cuda] [--backbone resnet101] [--image-size 224]
        [--batch 256 64] [--phase bce gan] [--mode eager compile cudagraphs] [--amp auto]
        [--data synthetic|loader] [--pretrained PATH|--make-weights PATH] [--feature-cache off on]
        [--steps 20] [--warmup 5] [--repeats 3] [--out bench/results/train-<device>.json]

For every (mode, batch, phase, feature cache) it builds a Trainer, runs ``--warmup`` steps
(compilation happens there and is reported as ``warmup_s``), then ``--repeats`` timed blocks of
``--steps`` steps (one device sync at each end of a block) and reports the median block:

* ms per step, img/s (phase 1: B per step; phase 2: ``g_img_per_s`` = B × G updates/s),
  G updates/s, images consumed/s (phase 2 draws 10·B per G update);
* MFU: FLOPs of one step counted by ``torch.utils.flop_counter`` on an eager step, over the time
  and the device's dense bf16 peak (H100/H200 989 TFLOP/s; none on a CPU);
* the data-wait share (real loader only: synthetic batches are already on the device);
* peak device memory (CUDA) or the process's peak RSS (CPU).

``ratio_to_bce`` of a phase-2 row is its G-img/s over the phase-1 img/s of the same mode and batch
in the same run (the trainer-throughput issue's figure of merit).

Synthetic phase-2 batches carry sample indices and crop windows too, and ``--feature-cache on``
serves f_ext from an in-memory table of random bf16 features with the real cache's lookup (the
same gather, copy and conversion); with ``--data loader`` it builds the real cache. The frozen
feature extractor is pretrained (``--pretrained`` a torchvision state-dict file; offline,
``--make-weights PATH`` writes a randomly initialised one, which costs the same FLOPs) or, without
one, G's own trunk frozen.

``--real-data DIR`` (a coco128 folder; the GPU check carries one in ``.gpu-check/coco128``) makes
the trainer's data set that folder's labelled JPEGs listed ``--real-copies`` times, and after each
configuration's synthetic timing ``--loader-steps`` more steps run on the real loader (``--backend``)
in the same, already compiled trainer: the data-wait share of both phases with real JPEGs, at no
extra compilation (same shapes).

Time: ``--time-budget S`` skips (records, never starts) a configuration that cannot finish in what
is left: its estimate is the warm-up its mode took last in this run (``--compile-estimate`` for the
first compiled one), plus the timed steps. Rows are written after each configuration, so a run
stopped from outside keeps what it measured.

Profiles (``--profile N``) count GPU work from the device's own rows only (kernels, copies; not the
launching API call, the operator that issued it, or annotations): ``kernels_per_step`` is what the
GPU ran, ``host_launches_per_step`` the launch calls the host made (``cudaLaunchKernel`` and
friends, one ``cudaGraphLaunch`` per replayed graph): CUDA graphs lower the second, not the first.
``cudagraphs`` records, for ``--mode cudagraphs``, the skips inductor reported (it falls back to
plain launches silently otherwise) and, when profiled, the graph launches seen: ``ran`` is true only
with no skip and graph launches observed.

``--compile-backend aot_eager`` (the GPU check's CPU dry run) traces every step with dynamo and
AOTAutograd like inductor does but runs the traced graphs eagerly: seconds, not minutes, of
compilation on a CPU; the mode (CUDA graphs) is then ignored and recorded as such.

Results: a table on stdout and JSON with the device, versions, git revision and the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastmlgan.config import build_config  # noqa: E402
from fastmlgan.data.geometry import NUM_SIZES  # noqa: E402
from fastmlgan.data.stream import BatchStream  # noqa: E402
from fastmlgan.data.types import LabeledImages, Splits  # noqa: E402
from fastmlgan.distributed import DistInfo  # noqa: E402
from fastmlgan.environment import device_slug, environment  # noqa: E402
from fastmlgan.train.feature_cache import NUM_WINDOWS  # noqa: E402
from fastmlgan.train.steps import StepFunctions  # noqa: E402
from fastmlgan.train.trainer import Trainer  # noqa: E402

MODES = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead"}
# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets (SXM parts).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class SyntheticFeatureCache:
    """The real cache's lookup over an in-memory table of random bf16 features."""

    def __init__(self, num_images: int, feature_dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        table = torch.from_numpy(rng.standard_normal((num_images * NUM_WINDOWS, feature_dim), dtype=np.float32))
        self._rows = table.bfloat16().view(torch.uint16).numpy()
        self.substituted = np.zeros(0, dtype=np.int64)

    def lookup(self, index, crop, device):
        rows = index.cpu().numpy() * NUM_WINDOWS + crop[:, 0].cpu().numpy() * NUM_SIZES + crop[:, 1].cpu().numpy()
        host = torch.from_numpy(np.ascontiguousarray(self._rows[rows])).view(torch.bfloat16)
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True).float()

    def stand_in_labels(self, index, labels):
        return labels


def synthetic_splits(num_images: int, num_labels: int) -> Splits:
    rng = np.random.default_rng(0)
    labels = (rng.random((num_images, num_labels)) < 3 / num_labels).astype(np.uint8)
    names = [f"class{i}" for i in range(num_labels)]
    paths = [f"/nonexistent/synthetic-{i}.jpg" for i in range(num_images)]
    return Splits(LabeledImages("synthetic-train", paths, labels, names), LabeledImages("synthetic-val", paths[:64], labels[:64], names))


def synthetic_images(rows: int, size: int, device: torch.device, memory_format, seed: int) -> torch.Tensor:
    """Random images made on ``device`` itself. Made on the host and copied, phase 2's pool at
    batch 256 (3 x 2560 x 3 x 224 x 224 floats) took about 30 s per configuration before anything
    was timed."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (rows, 3, size, size)
    if memory_format == torch.channels_last:
        return torch.randn((rows, size, size, 3), generator=g, device=device).permute(0, 3, 1, 2)
    return torch.randn(shape, generator=g, device=device)


class SyntheticStream:
    """A few pre-made batches on the device, handed out in turn (no host work in the timed loop
    beyond what the trainer itself does)."""

    def __init__(self, trainer: Trainer, phase: str, num_images: int, pool: int = 3) -> None:
        g = torch.Generator().manual_seed(1)
        lay = trainer.layout
        rows = lay.batch_size if phase == "bce" else lay.size
        pixel_rows = rows if (phase == "bce" or trainer.steps.feature_cache is None) else lay.pixel_rows
        size, c = trainer.cfg.data.image_size, len(trainer.class_names)
        self.batches = []
        for k in range(pool):
            images = synthetic_images(pixel_rows, size, trainer.device, trainer.steps.memory_format, seed=1 + k)
            labels = (torch.rand(rows, c, generator=g) < 3 / c).float()
            if trainer.device.type == "cuda":
                labels = labels.pin_memory()
            self.batches.append({
                "image": images,
                "labels": labels,
                "index": torch.randint(num_images, (rows,), generator=g),
                "crop": torch.stack([torch.randint(5, (rows,), generator=g), torch.randint(NUM_SIZES, (rows,), generator=g)], 1),
            })
        self.i = 0
        self.wait_s = 0.0

    def next(self):
        self.i += 1
        return self.batches[self.i % len(self.batches)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(trainer: Trainer, phase: str, batch) -> float:
    """FLOPs of one eager step (forward and backward of every model the step runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    steps = trainer.steps
    saved = steps.functions
    steps.functions = StepFunctions.eager()  # the same step, uncompiled: the counter sees every op
    state = {k: v.clone() for k, v in steps.generator.state_dict().items()}
    d_state = {k: v.clone() for k, v in steps.discriminator.state_dict().items()}
    try:
        with FlopCounterMode(display=False) as counter:
            step(trainer, phase, batch)
        return float(counter.get_total_flops())
    finally:
        steps.functions = saved
        steps.generator.load_state_dict(state)
        steps.discriminator.load_state_dict(d_state)


# Host calls that put work on a GPU stream: one per kernel outside a graph, one per graph replay.
KERNEL_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                       "cudaLaunchCooperativeKernel")
GRAPH_LAUNCH_CALLS = ("cudaGraphLaunch", "cuGraphLaunch")


def summarize_profile(events, steps: int) -> dict:
    """Per-step GPU work from a profiler's events (``prof.events()``).

    Only the device's own rows count as GPU work (kernels, copies, memsets): a kernel also shows
    up as the API call that launched it and inside the operator and annotation ranges around it,
    and summing every row with device time counted it two or three times. Launches are the host's
    launch calls, so that under CUDA graphs (kernels replayed inside one ``cudaGraphLaunch``) they
    show what the graphs saved while ``kernels_per_step`` stays the work the GPU did."""
    from torch.autograd import DeviceType

    device = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    host = [e for e in events if e.device_type == DeviceType.CPU]
    kernel_calls = sum(e.name in KERNEL_LAUNCH_CALLS for e in host)
    graph_calls = sum(e.name in GRAPH_LAUNCH_CALLS for e in host)
    by_name: dict[str, list[float]] = {}
    for e in device:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: sum(kv[1]), reverse=True)[:12]
    return {
        "device_ms_per_step": round(sum(sum(v) for v in by_name.values()) / 1e3 / steps, 3),
        "kernels_per_step": round(len(device) / steps, 1),
        "host_launches_per_step": round((kernel_calls + graph_calls) / steps, 1),
        "graph_launches_per_step": round(graph_calls / steps, 1),
        "top_device": [{"name": name[:80], "count": len(v), "device_ms": round(sum(v) / 1e3, 3)} for name, v in top],
    }


def profile_steps(trainer: Trainer, phase: str, stream, args, profiler=None) -> dict:
    """Where a step's time goes: host (Python and launch) time against device time, kernels and
    launches per step, and the most expensive kernels. Answers "why is mode X slower at this
    batch" (launch-bound when the host time per step approaches the step time). The wall time
    ends at the device sync, inside the profiler: its teardown (seconds of event processing) is
    not a step's time."""
    if profiler is None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
        profiler = profile(activities=activities)
    sync(args.device)
    with profiler as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile):
            step(trainer, phase, stream.next())
        host_s = time.perf_counter() - t0
        sync(args.device)
        wall_s = time.perf_counter() - t0
    return {
        "steps": args.profile,
        "wall_ms_per_step": round(wall_s * 1e3 / args.profile, 3),
        "host_ms_per_step": round(host_s * 1e3 / args.profile, 3),
        **summarize_profile(prof.events(), args.profile),
    }


class CudagraphSkips(logging.Handler):
    """Collects the reasons inductor gives when it does not use CUDA graphs for a graph
    (``log_cudagraph_skip_and_bump_counter``: a warning, and the run goes on without graphs)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []
        self.logger = None

    def emit(self, record) -> None:
        self.reasons.append(record.getMessage()[:300])

    def __enter__(self):
        from torch._inductor import cudagraph_utils

        self.logger = cudagraph_utils.cudagraphs_log
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def cudagraph_record(args, skips: list[str], profile: dict | None) -> dict:
    """Whether CUDA graphs ran in a ``--mode cudagraphs`` configuration, and the evidence."""
    launches = profile.get("graph_launches_per_step") if profile else None
    if args.device.type != "cuda":
        ran, why = False, f"no CUDA graphs on {args.device.type}"
    elif args.compile_backend != "inductor":
        ran, why = False, f"compile backend {args.compile_backend}: no CUDA graphs"
    elif skips:
        ran, why = False, "inductor skipped CUDA graphs: " + "; ".join(skips[:3])
    elif launches is None:
        ran, why = None, "no skip reported; not profiled, so no graph launches were seen (use --profile)"
    else:
        ran = launches > 0
        why = f"{launches} graph launches per step" if ran else "no skip reported, but no graph launch was seen"
    return {"ran": ran, "why": why, "skips": len(skips), "skip_reasons": skips[:10], "graph_launches_per_step": launches}


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def step(trainer: Trainer, phase: str, batch):
    return trainer.steps.bce_step(batch) if phase == "bce" else trainer.steps.train_step(batch)


def build_trainer(args, mode: str, batch: int, phase: str, cache: bool, workdir: Path, splits) -> Trainer:
    overrides = {
        "model.backbone": args.backbone,
        "model.pretrained": args.pretrained or "",
        "model.width": str(args.width),
        "data.image_size": str(args.image_size),
        "data.batch_size": str(batch),
        "data.num_workers": str(args.workers),
        "data.num_threads": str(args.threads),
        "data.backend": args.backend,
        # Synthetic splits name no real files: auto must not build a decoded-image cache of them.
        "data.cache_auto_share": "0" if args.data == "synthetic" else "0.25",
        "precision.amp": args.amp,
        "compile.enable": str(mode != "eager"),
        "compile.mode": MODES[mode] or "default",
        "checkpoint.enable": "false",
        "out": str(workdir),
    }
    if args.data == "loader":
        overrides.update(dict(kv.split("=", 1) for kv in args.data_option))
        if cache:
            overrides["gan.feature_cache"] = str(workdir / f"features-{args.backbone}-{args.image_size}.cache")
    cfg = build_config(overrides, preset=args.preset)
    info = DistInfo(0, 1, 0, args.device)
    trainer = Trainer(cfg, info, workdir, splits=splits)
    if phase == "gan":
        trainer.state.phase = "gan"
        if cache and args.data == "synthetic":  # the cache component swapped for an in-memory one
            steps = trainer.steps
            steps.feature_cache = SyntheticFeatureCache(len(trainer.splits.train), steps.generator.feature_dim)
        trainer.start_gan_phase()
    return trainer


def timed_blocks(trainer: Trainer, phase: str, stream, steps: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per step of each block of ``steps`` steps, and the share of it spent waiting for data."""
    device = trainer.device
    blocks, waits = [], []
    for _ in range(repeats):
        stream.wait_s = 0.0
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(trainer, phase, stream.next())
        sync(device)
        blocks.append((time.perf_counter() - t0) / steps)
        waits.append(stream.wait_s / (steps * blocks[-1]))
    return blocks, waits


def rates(phase: str, batch: int, sec: float, layout) -> dict:
    if phase == "bce":
        return {"img_per_s": round(batch / sec, 1)}
    return {"g_updates_per_s": round(1 / sec, 3), "g_img_per_s": round(batch / sec, 1),
            "images_consumed_per_s": round(layout.size / sec, 1)}


def measure_real_loader(trainer: Trainer, phase: str, batch: int, args) -> dict:
    """``--loader-steps`` steps on the real loader in this (already compiled) trainer: same shapes,
    so no recompilation; two untimed steps start the loader's workers and prefetch first."""
    loader = trainer.train_loader if phase == "bce" else trainer.build_gan_loader()
    stream = BatchStream(loader, data_epoch=1)
    try:
        for _ in range(2):
            step(trainer, phase, stream.next())
        blocks, waits = timed_blocks(trainer, phase, stream, args.loader_steps, 1)
    finally:
        stream.close()
    return {"loader": type(loader).__name__, "steps": args.loader_steps, "ms_per_step": round(blocks[0] * 1e3, 3),
            **rates(phase, batch, blocks[0], trainer.layout), "data_wait_frac": round(waits[0], 4)}


def measure(args, mode: str, batch: int, phase: str, cache: bool, splits, workdir: Path) -> dict:
    device = args.device
    trainer = build_trainer(args, mode, batch, phase, cache, workdir, splits)
    if args.data == "synthetic":
        stream = SyntheticStream(trainer, phase, len(trainer.splits.train))
    else:
        loader = trainer.train_loader if phase == "bce" else trainer.build_gan_loader()
        stream = BatchStream(loader, data_epoch=1)
    trainer.steps.generator.train()
    trainer.steps.discriminator.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with CudagraphSkips() as skipped:
        for _ in range(args.warmup):
            step(trainer, phase, stream.next())
        sync(device)
        warmup_s = time.perf_counter() - t0
        blocks, waits = timed_blocks(trainer, phase, stream, args.steps, args.repeats)
        # The training steps' peak, before the profiled steps and the eager FLOP count add theirs.
        memory = peak_memory(device)
        profile = profile_steps(trainer, phase, stream, args) if args.profile else None
    flops = count_flops(trainer, phase, stream.next()) if args.flops else None
    sec = statistics.median(blocks)
    row = {
        "mode": mode,
        "batch": batch,
        "phase": phase,
        "feature_cache": cache if phase == "gan" else None,
        "ms_per_step": round(sec * 1e3, 3),
        "steps_per_s": round(1 / sec, 3),
        "warmup_s": round(warmup_s, 2),
        "block_ms": [round(b * 1e3, 3) for b in blocks],
        "data_wait_frac": round(statistics.median(waits), 4) if args.data == "loader" else 0.0,
        **rates(phase, batch, sec, trainer.layout),
    }
    if mode != "eager" and args.compile_backend != "inductor":
        row["compile_backend"] = args.compile_backend
    if flops is not None:
        row["flops_per_step"] = flops
        peak = peak_flops(device)
        row["tflops"] = round(flops / sec / 1e12, 3)
        row["mfu"] = round(flops / sec / peak, 4) if peak else None
    if profile is not None:
        row["profile"] = profile
    if mode == "cudagraphs":
        row["cudagraphs"] = cudagraph_record(args, skipped.reasons, profile)
    row.update(memory)
    if args.loader_steps and args._real_splits is not None:
        try:
            row["real_loader"] = measure_real_loader(trainer, phase, batch, args)
        except Exception as e:  # noqa: BLE001 - the synthetic numbers stand; say what failed
            row["real_loader"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    del trainer, stream
    return row


def add_ratios(rows: list[dict]) -> None:
    bce = {(r["mode"], r["batch"]): r["img_per_s"] for r in rows if r["phase"] == "bce"}
    for r in rows:
        if r["phase"] == "gan" and (r["mode"], r["batch"]) in bce:
            r["ratio_to_bce"] = round(r["g_img_per_s"] / bce[(r["mode"], r["batch"])], 4)


def make_weights(backbone: str, path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(backbone, weights=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    print(f"wrote randomly initialised {backbone} weights to {path} (stand-in for ImageNet weights offline)")


def table(rows: list[dict]) -> str:
    head = f"{'mode':<11}{'batch':>6} {'phase':<5}{'cache':>6}{'ms/step':>10}{'img/s':>10}{'G-upd/s':>9}{'consumed/s':>11}{'ratio':>7}{'MFU':>7}{'wait':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['mode']:<11}{r['batch']:>6} {r['phase']:<5}{str(r['feature_cache'] or '-'):>6}{r['ms_per_step']:>10.1f}"
            f"{r.get('img_per_s', r.get('g_img_per_s', 0)):>10.1f}{r.get('g_updates_per_s', r['steps_per_s']):>9.2f}"
            f"{r.get('images_consumed_per_s', r.get('img_per_s', 0)):>11.1f}{r.get('ratio_to_bce', float('nan')):>7.3f}"
            f"{(r.get('mfu') or float('nan')):>7.3f}{r.get('real_loader', {}).get('data_wait_frac', r['data_wait_frac']):>6.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--width", type=int, default=32, help="smallcnn / mlp width")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, nargs="+", default=[256])
    p.add_argument("--phase", nargs="+", choices=("bce", "gan"), default=["bce", "gan"])
    p.add_argument("--mode", nargs="+", choices=tuple(MODES), default=["eager", "compile"])
    p.add_argument("--feature-cache", nargs="+", choices=("off", "on"), default=["off"])
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"))
    p.add_argument("--data", choices=("synthetic", "loader"), default="synthetic")
    p.add_argument("--data-option", nargs="*", default=[], metavar="KEY=VALUE",
                   help="--data loader: config overrides, e.g. data.dataset=coco data.train_annotations=...")
    p.add_argument("--backend", default="auto", help="--data loader: data.backend")
    p.add_argument("--workers", type=int, default=2, help="--data loader: data.num_workers (torch backend)")
    p.add_argument("--threads", type=int, default=8, help="--data loader: data.num_threads (GPU backends)")
    p.add_argument("--preset", default="embedded", help="the config preset the overrides apply to")
    p.add_argument("--pretrained", default="", help="f_ext/G weights: a torchvision weight name or a local file")
    p.add_argument("--make-weights", default="", metavar="PATH", help="write random torchvision weights to PATH and use them")
    p.add_argument("--num-images", type=int, default=4096, help="synthetic data set size")
    p.add_argument("--num-labels", type=int, default=80)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS steps per configuration (host vs device time, launches, top operators)")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count (MFU)")
    p.add_argument("--plan", nargs="+", default=None, metavar="MODE/PHASE[/CACHE]",
                   help="the configurations in this order (e.g. compile/bce eager/bce compile/gan/on) instead of "
                        "--mode x --phase x --feature-cache: the most wanted first, as --time-budget cuts the end")
    p.add_argument("--real-data", default="", metavar="DIR",
                   help="a coco128 folder: the trainer's data set, and --loader-steps on its real loader")
    p.add_argument("--real-copies", type=int, default=8, help="--real-data listed this many times")
    p.add_argument("--loader-steps", type=int, default=0, help="steps timed on the real loader per configuration")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="skip configurations that cannot finish within S seconds of the start (default: the GPU "
                        "check step's limit, $GPU_CHECK_STEP_LIMIT_S, less 15 s; else no limit)")
    p.add_argument("--compile-estimate", type=float, default=120.0, metavar="S",
                   help="warm-up assumed for the first compiled configuration under --time-budget")
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager"),
                   help="aot_eager: dynamo + AOTAutograd without inductor (the CPU dry run)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.time_budget is None:
        limit = os.environ.get("GPU_CHECK_STEP_LIMIT_S")
        args.time_budget = max(1.0, float(limit) - 15) if limit else 0.0
    try:
        plan = parse_plan(args)
    except ValueError as e:
        p.error(str(e))
    args.device = torch.device(args.device)
    if args.compile_backend != "inductor":
        use_compile_backend(args.compile_backend)
    if args.make_weights:
        if not Path(args.make_weights).is_file():  # the same seed writes the same weights: reuse them
            make_weights(args.backbone, Path(args.make_weights))
        args.pretrained = args.make_weights
    if args.device.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    rows: list[dict] = []
    out = Path(args.out or REPO / "bench" / "results" / f"train-{device_slug(args.device)}.json")
    with tempfile.TemporaryDirectory(prefix="fastmlgan-bench-train-") as tmp:
        args._real_splits = real_splits(args, Path(tmp)) if args.real_data else None
        if args._real_splits is not None:
            splits = args._real_splits
        else:
            splits = synthetic_splits(args.num_images, args.num_labels) if args.data == "synthetic" else None
        seen: dict[str, float] = {}
        for batch in args.batch:
            for mode, phase, cache in plan:
                label = f"{mode} batch {batch} {phase}{' feature cache' if cache == 'on' else ''}"
                head = {"mode": mode, "batch": batch, "phase": phase, "feature_cache": cache == "on" if phase == "gan" else None}
                reason = over_budget(args, mode, seen, time.perf_counter() - start)
                if reason:
                    rows.append({**head, "skipped": reason})
                    print(f"skipping {label}: {reason}", flush=True)
                    write(args, rows, out)
                    continue
                workdir = Path(tmp) / f"{mode}-{batch}-{phase}-{cache}"
                workdir.mkdir()
                torch._dynamo.reset()
                print(f"measuring {label} ...", flush=True)
                t0 = time.perf_counter()
                try:
                    rows.append(measure(args, mode, batch, phase, cache == "on", splits, workdir))
                except Exception as e:  # noqa: BLE001 - record it and measure the rest
                    rows.append({**head, "error": f"{type(e).__name__}: {e}"[:500]})
                    print(f"  failed: {rows[-1]['error']}", flush=True)
                seen[mode + " total"] = time.perf_counter() - t0
                # Written after every row: a time limit that stops the run keeps what was measured.
                write(args, rows, out)
    print(table([r for r in rows if "error" not in r and "skipped" not in r]))
    print(f"wrote {out}")
    return 1 if any("error" in r for r in rows) else 0


def parse_plan(args) -> list[tuple[str, str, str]]:
    """(mode, phase, feature cache) in the order to measure them."""
    if not args.plan:
        return [(m, ph, c) for m in args.mode for ph in args.phase for c in (args.feature_cache if ph == "gan" else ["off"])]
    plan = []
    for item in args.plan:
        parts = item.split("/")
        mode, phase, cache = (parts + ["off"])[:3] if len(parts) in (2, 3) else ("", "", "")
        if mode not in MODES or phase not in ("bce", "gan") or cache not in ("on", "off") or (phase == "bce" and cache == "on"):
            raise ValueError(f"--plan {item!r}: expected MODE/bce or MODE/gan/on|off with MODE one of {', '.join(MODES)}")
        plan.append((mode, phase, cache))
    return plan


def over_budget(args, mode: str, seen: dict, elapsed: float) -> str:
    """Why a configuration of ``mode`` cannot finish in the time left ('' when it can): its
    estimate is the last whole configuration of that mode in this run, else the compile estimate
    (compiled modes) and the last configuration's time."""
    if not args.time_budget:
        return ""
    if mode + " total" in seen:
        need = seen[mode + " total"]
    else:
        need = (args.compile_estimate if mode != "eager" else 0.0) + max(
            [v for k, v in seen.items() if k.endswith(" total")] or [0.0])
    left = args.time_budget - elapsed
    return "" if need <= left else f"needs about {need:.0f} s, {left:.0f} s left of --time-budget {args.time_budget:.0f}"


def real_splits(args, workdir: Path):
    """coco128's labelled JPEGs listed ``--real-copies`` times (None with a line when absent)."""
    sys.path.insert(0, str(REPO / "bench"))
    from loader import coco128_repeated

    from fastmlgan.data.sources.coco import read_coco

    made = coco128_repeated(args.real_copies, workdir, Path(args.real_data))
    if made is None:
        print(f"--real-data: no coco128 at {Path(args.real_data).resolve()}: synthetic batches only, no real-loader rows",
              flush=True)
        return None
    train = read_coco(*made, name=f"coco128x{args.real_copies}")
    return Splits(train, train.subset(range(min(64, len(train))), name="coco128-eval"))


def use_compile_backend(backend: str) -> None:
    """Make every ``torch.compile`` of this process use ``backend`` (modes are inductor's: dropped)."""
    real = torch.compile

    def compile_with(model=None, **kwargs):
        kwargs.pop("mode", None)
        kwargs["backend"] = backend
        return real(model, **kwargs) if model is not None else (lambda m: real(m, **kwargs))

    torch.compile = compile_with


def write(args, rows: list[dict], out: Path) -> None:
    add_ratios([r for r in rows if "error" not in r and "skipped" not in r])
    result = {
        "benchmark": "train",
        **environment(args.device),
        "config": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items() if not k.startswith("_")},
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
