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

Results: a table on stdout and JSON with the device, versions, git revision and the command.
"""

from __future__ import annotations

import argparse
import json
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
from fastmlgan.distributed import DistInfo  # noqa: E402
from fastmlgan.feature_cache import NUM_WINDOWS  # noqa: E402
from fastmlgan.loaders.base import LabeledImages  # noqa: E402
from fastmlgan.loaders.five_crop import NUM_SIZES  # noqa: E402
from fastmlgan.loaders.registry import Splits  # noqa: E402
from fastmlgan.runinfo import device_slug, environment  # noqa: E402
from fastmlgan.stream import BatchStream  # noqa: E402
from fastmlgan.trainer import Trainer  # noqa: E402

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


class SyntheticStream:
    """A few pre-made batches on the device, handed out in turn (no host work in the timed loop
    beyond what the trainer itself does)."""

    def __init__(self, trainer: Trainer, phase: str, num_images: int, pool: int = 3) -> None:
        g = torch.Generator().manual_seed(1)
        lay = trainer.layout
        rows = lay.batch_size if phase == "bce" else lay.size
        pixel_rows = rows if (phase == "bce" or trainer.feature_cache is None) else lay.pixel_rows
        size, c = trainer.cfg.data.image_size, len(trainer.class_names)
        self.batches = []
        for _ in range(pool):
            images = torch.randn(pixel_rows, 3, size, size, generator=g).to(trainer.device)
            images = images.contiguous(memory_format=trainer.memory_format)
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

    saved = (trainer._bce_loss, trainer._d_loss, trainer._g_loss, trainer._features, trainer._logits)
    from fastmlgan import trainer as trainer_module
    from fastmlgan.losses import bce_loss, discriminator_loss, generator_loss

    trainer._bce_loss, trainer._d_loss, trainer._g_loss = bce_loss, discriminator_loss, generator_loss
    trainer._features, trainer._logits = trainer_module._features, trainer_module._logits
    state = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    d_state = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    try:
        with FlopCounterMode(display=False) as counter:
            step(trainer, phase, batch)
        return float(counter.get_total_flops())
    finally:
        trainer._bce_loss, trainer._d_loss, trainer._g_loss, trainer._features, trainer._logits = saved
        trainer.generator.load_state_dict(state)
        trainer.discriminator.load_state_dict(d_state)


def profile_steps(trainer: Trainer, phase: str, stream, args) -> dict:
    """Where a step's time goes: host (Python and launch) time against device time, kernel
    launches per step, and the most expensive operators. Answers "why is mode X slower at this
    batch" (launch-bound when the host time per step approaches the step time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    sync(args.device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile):
            step(trainer, phase, stream.next())
        host_s = time.perf_counter() - t0
        sync(args.device)
    wall_s = time.perf_counter() - t0
    events = prof.key_averages()
    device_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    kernels = [e for e in events if getattr(e, device_attr, 0) > 0]
    top = sorted(events, key=lambda e: getattr(e, device_attr, 0) or e.self_cpu_time_total, reverse=True)[:12]
    return {
        "steps": args.profile,
        "wall_ms_per_step": round(wall_s * 1e3 / args.profile, 3),
        "host_ms_per_step": round(host_s * 1e3 / args.profile, 3),
        "device_ms_per_step": round(sum(getattr(e, device_attr, 0) for e in kernels) / 1e3 / args.profile, 3),
        "kernel_launches_per_step": round(sum(e.count for e in kernels) / args.profile, 1),
        "top": [
            {"name": e.key[:80], "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
             "self_device_ms": round(getattr(e, device_attr, 0) / 1e3, 3)}
            for e in top
        ],
    }


def step(trainer: Trainer, phase: str, batch):
    return trainer.bce_step(batch) if phase == "bce" else trainer.train_step(batch)


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
        trainer.phase = "gan"
        if cache and args.data == "synthetic":
            if trainer.spec.conditional and trainer.feature_extractor is None:
                trainer._freeze_feature_extractor("phase1")
            trainer.feature_cache = SyntheticFeatureCache(len(trainer.splits.train), trainer.generator.feature_dim)
        trainer.start_gan_phase()
    return trainer


def measure(args, mode: str, batch: int, phase: str, cache: bool, splits, workdir: Path) -> dict:
    device = args.device
    trainer = build_trainer(args, mode, batch, phase, cache, workdir, splits)
    if args.data == "synthetic":
        stream = SyntheticStream(trainer, phase, len(trainer.splits.train))
    else:
        loader = trainer.train_loader if phase == "bce" else trainer.build_gan_loader()
        stream = BatchStream(loader, data_epoch=1)
    trainer.generator.train()
    trainer.discriminator.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(trainer, phase, stream.next())
    sync(device)
    warmup_s = time.perf_counter() - t0
    blocks, waits = [], []
    for _ in range(args.repeats):
        stream.wait_s = 0.0
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(trainer, phase, stream.next())
        sync(device)
        blocks.append((time.perf_counter() - t0) / args.steps)
        waits.append(stream.wait_s / (args.steps * blocks[-1]))
    profile = profile_steps(trainer, phase, stream, args) if args.profile else None
    flops = count_flops(trainer, phase, stream.next()) if args.flops else None
    sec = statistics.median(blocks)
    lay = trainer.layout
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
    }
    if phase == "bce":
        row["img_per_s"] = round(batch / sec, 1)
    else:
        row["g_updates_per_s"] = round(1 / sec, 3)
        row["g_img_per_s"] = round(batch / sec, 1)
        row["images_consumed_per_s"] = round(lay.size / sec, 1)
    if flops is not None:
        row["flops_per_step"] = flops
        peak = peak_flops(device)
        row["tflops"] = round(flops / sec / 1e12, 3)
        row["mfu"] = round(flops / sec / peak, 4) if peak else None
    if profile is not None:
        row["profile"] = profile
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
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
            f"{(r.get('mfu') or float('nan')):>7.3f}{r['data_wait_frac']:>6.2f}"
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
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.make_weights:
        make_weights(args.backbone, Path(args.make_weights))
        args.pretrained = args.make_weights
    if args.device.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    splits = synthetic_splits(args.num_images, args.num_labels) if args.data == "synthetic" else None
    rows: list[dict] = []
    out = Path(args.out or REPO / "bench" / "results" / f"train-{device_slug(args.device)}.json")
    with tempfile.TemporaryDirectory(prefix="fastmlgan-bench-train-") as tmp:
        for mode in args.mode:
            for batch in args.batch:
                for phase in args.phase:
                    for cache in (args.feature_cache if phase == "gan" else ["off"]):
                        workdir = Path(tmp) / f"{mode}-{batch}-{phase}-{cache}"
                        workdir.mkdir()
                        torch._dynamo.reset()
                        print(f"measuring {mode} batch {batch} {phase}{' feature cache' if cache == 'on' else ''} ...", flush=True)
                        try:
                            rows.append(measure(args, mode, batch, phase, cache == "on", splits, workdir))
                        except Exception as e:  # noqa: BLE001 - record it and measure the rest
                            rows.append({"mode": mode, "batch": batch, "phase": phase, "feature_cache": cache == "on",
                                         "error": f"{type(e).__name__}: {e}"[:500]})
                            print(f"  failed: {rows[-1]['error']}", flush=True)
                        # Written after every row: a time limit that stops the run keeps what was measured.
                        write(args, rows, out)
    print(table([r for r in rows if "error" not in r]))
    print(f"wrote {out}")
    return 1 if any("error" in r for r in rows) else 0


def write(args, rows: list[dict], out: Path) -> None:
    add_ratios([r for r in rows if "error" not in r])
    result = {
        "benchmark": "train",
        **environment(args.device),
        "config": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
