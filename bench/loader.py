"""Loader throughput: images per second of every available backend on the same files.

    python bench/loader.py                      # every backend available here, embedded data
    python bench/loader.py --quick              # a smaller run (CI, smoke)
    python bench/loader.py --device cuda --backend dali,torchvision-gpu,torch
    python bench/loader.py --dataset coco --data.train_annotations A.json --data.train_images DIR \\
        [--data.val_annotations B.json --data.val_images DIR2]

Backends (``--backend``, comma-separated, default all available on the device):
  torch            the CPU reference: DataLoader with ``--threads`` worker processes
  dali             DALI five-crop pipeline (full decode, resize, crop, resize), ``--threads`` threads;
                   on CPU every operator runs on the CPU, on a GPU nvJPEG + GPU operators
  dali-roi         the same with region-of-interest decoding of the crop window (one resize)
  torchvision-gpu  torchvision decode_jpeg + batched five-crop, ``--threads`` reader threads (on
                   ``--device cpu`` it runs the same code on CPU tensors)
  cache            the decoded-image cache (built first, in ``--cache-dir`` or a temporary folder; its
                   build time and size are reported), rows staged in host memory, ``--threads``
                   threads; with ``--device cuda`` the crops are cut on the GPU
  cache-gpu        (``--device cuda`` only) the same with the whole cache in GPU memory
  shards           the images written as WebDataset shards first (build time reported), read by the
                   shards loader (``--data.dataset shards``), ``--threads`` threads (bench/loader_shards.py)
  dali-shards      the same shards through DALI's ``fn.readers.webdataset`` and the five-crop
                   pipeline of ``dali`` (DALI only; skipped without it or webdataset)
  ffcv             FFCV's loader on an FFCV file of the cache's own rows, the same five-crop windows,
                   ``--threads`` threads and batch (``bench/ffcv_rows.py``); skipped, with the reason,
                   when ``ffcv`` is not importable

Output kinds (``--output``, cache, cache-gpu and ffcv): ``uint8`` (channels_last (B, 3, S, S), to be
normalised on the consumer's device) and ``float`` (float32, normalised by the loader); every other
backend hands over float32. Each row names its kind.

Datasets (``--dataset``): ``embedded`` (generated 320 px JPEGs), ``coco128x8`` (a COCO JSON that
lists the 126 labelled coco128 images 8 times under new ids: 1,008 real JPEG entries, written to
a temporary folder; the images come from ``--coco128`` (default ``../shared/data/coco128``; the
GPU check carries a copy in ``.gpu-check/coco128``); skipped with a message when absent), or
``coco`` (your own files).

Every timed epoch holds at least ``--min-batches`` batches (default: twice ``--threads``): a
smaller listing is repeated until it does. An epoch of a few batches against eight workers
measures the pipeline filling up, not its throughput (the GPU check's embedded epochs were 4 and
2 batches of 128 against 8 workers).

Each backend runs its training loader (random five-crop, shuffled) and evaluation loader
(whole-image resize) for whole epochs: one warm-up epoch, then ``--repeats`` timed epochs; the
table gives the median (and min/max) images per second, and the CPU cores used (CPU seconds of
this process and its worker processes per wall second, median over the timed epochs) and the CPU
milliseconds per image (a measure other processes on a shared machine disturb less). On a GPU
each timed epoch ends with a ``torch.cuda.synchronize()``. On CPU intra-op threads are set to 1 so
that every backend uses exactly ``--threads`` threads (or worker processes). Results go to
``--out`` as JSON with the device, versions, git revision, the exact command and the machine's
load average before the run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # bench/loader_shards.py, bench/ffcv_rows.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ffcv_rows import ffcv_missing, ffcv_version, write_ffcv  # noqa: E402

from fastmlgan.data.backends.dali import dali_available  # noqa: E402
from fastmlgan.data.sources.coco import read_coco  # noqa: E402
from fastmlgan.data.types import LabeledImages  # noqa: E402
from fastmlgan.environment import device_name, device_slug, git_revision, versions  # noqa: E402

ALL_BACKENDS = ("torch", "dali", "dali-roi", "torchvision-gpu", "cache", "cache-gpu", "ffcv", "shards", "dali-shards")
OUTPUTS = ("uint8", "float")
KINDED = ("cache", "cache-gpu", "ffcv")
"""The backends that hand over either output kind."""
SHARED_DATA = REPO / ".." / "shared" / "data"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (``time.process_time``: all its threads, at the
    clock's resolution) and every live descendant (DataLoader workers; /proc, in clock ticks)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    ours, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in ours:
                ours.add(child)
                frontier.append(child)
    ours.discard(os.getpid())
    return time.process_time() + sum(times.get(pid, 0.0) for pid in ours)


def repeat_to(images: LabeledImages, min_images: int) -> LabeledImages:
    """``images`` listed as many whole times as it takes to hold at least ``min_images`` entries."""
    copies = max(1, -(-min_images // max(1, len(images))))
    if copies == 1:
        return images
    return LabeledImages(f"{images.name}x{copies}", list(images.paths) * copies, np.tile(images.labels, (copies, 1)),
                         list(images.class_names))


def coco128_repeated(copies: int, workdir: Path, root: Path | None = None) -> tuple[Path, Path] | None:
    """A COCO JSON listing coco128's images ``copies`` times under new ids (None when absent)."""
    root = Path(root) if root else SHARED_DATA / "coco128"
    ann = root / "instances_coco128.json"
    if not ann.is_file():
        return None
    data = json.loads(ann.read_text())
    stride = max(img["id"] for img in data["images"]) + 1
    images, annotations = [], []
    for c in range(copies):
        images += [{**img, "id": img["id"] + c * stride} for img in data["images"]]
        annotations += [{**a, "id": k + c * len(data["annotations"]), "image_id": a["image_id"] + c * stride}
                        for k, a in enumerate(data["annotations"])]
    out = workdir / f"coco128x{copies}.json"
    out.write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    return out, (root / "images" / "train2017").resolve()


def load_data(args) -> tuple[LabeledImages, LabeledImages, str]:
    if args.dataset == "embedded":
        from fastmlgan.data.sources.embedded import ensure

        n_train, n_val, size = (128, 64, 320) if args.quick else (512, 256, 320)
        root = Path(args.data_root or REPO / "data" / f"bench-embedded-{size}")
        paths = ensure(root, num_train=n_train, num_val=n_val, image_size=size, seed=0)
        train = read_coco(paths.train_ann, paths.train_images)
        val = read_coco(paths.val_ann, paths.val_images)
        return train, val, f"embedded ({n_train} train + {n_val} val synthetic JPEGs, {size}x{size})"
    if args.dataset == "auto":
        args.dataset = "coco128x8" if (Path(args.coco128) / "instances_coco128.json").is_file() else "embedded"
        if args.dataset == "embedded":
            print(f"--dataset auto: no coco128 at {Path(args.coco128).resolve()}: the embedded set instead", flush=True)
        return load_data(args)
    if args.dataset == "coco128x8":
        made = coco128_repeated(args.copies, Path(args.workdir), Path(args.coco128))
        if made is None:
            sys.exit(f"skipping --dataset coco128x8: {Path(args.coco128).resolve()} is absent (see ../shared/data/README.md)")
        train = read_coco(*made, name=f"coco128x{args.copies}")
        return train, train, f"coco128x{args.copies} ({len(train)} entries: coco128's labelled JPEGs listed {args.copies} times, train and eval)"
    if not (args.train_annotations and args.train_images):
        sys.exit("--dataset coco needs --data.train_annotations and --data.train_images")
    train = read_coco(args.train_annotations, args.train_images)
    if args.val_annotations and args.val_images:
        val = read_coco(args.val_annotations, args.val_images)
    else:
        val = train
    return train, val, f"coco ({args.train_annotations}: {len(train)} train, {len(val)} val images)"


def build_cache_for(split: str, images: LabeledImages, args, device: torch.device) -> dict:
    """Build the split's cache from scratch (timed) and report its size."""
    from fastmlgan.data.imagecache.build import build_cache, resolve_decoder
    from fastmlgan.data.imagecache.format import Geometry, cache_path

    geometry = Geometry("train" if split == "train" else "eval", args.image_size)
    path = cache_path(images, geometry, args.cache_dir)
    decoder = resolve_decoder("auto", device)
    cpu0, start = cpu_seconds(), time.perf_counter()
    cache = build_cache(images, geometry, path, decoder=decoder, device=device, num_threads=args.threads, progress=False)
    seconds = time.perf_counter() - start
    return {"cache": cache, "build_s": round(seconds, 3), "build_images_per_s": round(len(images) / seconds, 1),
            "build_cores_used": round((cpu_seconds() - cpu0) / seconds, 2), "cache_bytes": cache.nbytes,
            "cache_decoder": decoder, "cache_file": path.name}


def build(backend: str, train: bool, images: LabeledImages, args, device: torch.device, cache=None, output="float",
          ffcv_file=None):
    batch, threads, size = args.batch_size, args.threads, args.image_size
    if backend in ("shards", "dali-shards"):
        from loader_shards import build_loader

        return build_loader(backend, train, cache, args, device)  # cache: the split's shards here
    if backend in ("cache", "cache-gpu"):
        from fastmlgan.data.imagecache.loader import CacheLoader

        return CacheLoader(cache, size, batch, 0, 1, train=train, seed=0, device=device, num_threads=threads,
                           cache_device="cuda" if backend == "cache-gpu" else "cpu", output=output)
    if backend == "ffcv":
        from ffcv_rows import FFCVLoader

        return FFCVLoader(ffcv_file, train, size, batch, threads, output)
    if backend == "torch":
        from fastmlgan.data.backends.torch_dataloader import FiveCropDataset, build_eval_loader, build_train_loader

        ds = FiveCropDataset(images, size, train=train, seed=0)
        if train:
            return build_train_loader(ds, batch, 0, 1, seed=0, num_workers=threads)
        return build_eval_loader(ds, batch, 0, 1, num_workers=threads)
    if backend in ("dali", "dali-roi"):
        from fastmlgan.data.backends.dali import build_dali_eval_loader, build_dali_train_loader

        dev = device if device.type == "cuda" else None
        if train:
            decode = "roi" if backend == "dali-roi" else "full"
            return build_dali_train_loader(images, size, batch, 0, 1, seed=0, device=dev, num_threads=threads, decode=decode)
        return build_dali_eval_loader(images, size, batch, 0, 1, device=dev, num_threads=threads)
    from fastmlgan.data.backends.torchvision_gpu import build_torchvision_eval_loader, build_torchvision_train_loader

    if train:
        return build_torchvision_train_loader(images, size, batch, 0, 1, seed=0, device=device, num_threads=threads)
    return build_torchvision_eval_loader(images, size, batch, 0, 1, device=device, num_threads=threads)


def run_epoch(loader, epoch: int, device: torch.device) -> tuple[int, float, float]:
    loader.set_epoch(epoch)
    n = 0
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    for batch in loader:
        image = batch["image"]
        if image.device != device:  # count the host-to-device copy of the CPU backends too
            image = image.to(device, non_blocking=True)
        n += image.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return n, seconds, (cpu_seconds() - cpu0) / seconds


def measure(backend: str, split: str, images, args, device, cache=None, output="float", ffcv_file=None) -> dict:
    loader = build(backend, split == "train", images, args, device, cache, output, ffcv_file)
    run_epoch(loader, 0, device)  # warm-up: worker start, pipeline build, allocations
    rates, counts, cores = [], [], []
    for r in range(args.repeats):
        n, seconds, used = run_epoch(loader, r + 1, device)
        rates.append(n / seconds)
        counts.append(n)
        cores.append(used)
    if hasattr(loader, "close"):
        loader.close()
    del loader
    return {
        "backend": backend,
        "split": split,
        "output": output,
        "images_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "runs": [round(x, 2) for x in rates],
        "images_per_run": counts[0],
        "cores_used": round(statistics.median(cores), 2),
        # CPU time per image: less sensitive than img/s to other processes on a shared machine.
        "cpu_ms_per_image": round(1000 * statistics.median(c / r for c, r in zip(cores, rates)), 3),
        # The machine may be shared: cores used means little when the load exceeds the core count.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def ratio(a: float, b: float) -> float | None:
    """a / b to two places; None where b was too small to measure (a run shorter than the CPU
    clock's resolution: the dry run's few images)."""
    return round(a / b, 2) if b > 0 else None


def record(device: torch.device, args, description: str, command: str, load_before, speedups: dict, rows: list) -> dict:
    """The results file's content."""
    return {
        "benchmark": "loader",
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "dataset": description,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "versions": versions(),
        "git_revision": git_revision() or "unknown",
        "command": command,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "speedups": speedups,
        "results": rows,
    }


def available_backends(device: torch.device) -> list[str]:
    out = ["torch"]
    if dali_available():
        out += ["dali", "dali-roi"]
    out.append("torchvision-gpu")  # on CPU it runs the same code on CPU tensors
    out.append("cache")
    if device.type == "cuda":
        out.append("cache-gpu")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="all", help="comma-separated subset of " + ",".join(ALL_BACKENDS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", default="embedded", choices=("embedded", "coco128x8", "coco", "auto"),
                        help="auto: coco128x8 when ../shared/data/coco128 is there, else embedded")
    parser.add_argument("--data.root", dest="data_root", default="", help="embedded: where the bench dataset is generated")
    parser.add_argument("--data.train_annotations", dest="train_annotations", default="")
    parser.add_argument("--data.train_images", dest="train_images", default="")
    parser.add_argument("--data.val_annotations", dest="val_annotations", default="")
    parser.add_argument("--data.val_images", dest="val_images", default="")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--split", default="train,eval", help="train, eval or both")
    parser.add_argument("--output", default="uint8,float", help="cache, cache-gpu, ffcv: the output kinds, uint8 and/or float")
    parser.add_argument("--quick", action="store_true", help="smaller dataset and 3 repeats")
    parser.add_argument("--out", default="", help="JSON output (default bench/results/loader-<device>.json)")
    parser.add_argument("--cache-dir", default="", help="where the cache backend's caches are built (default: a temporary folder)")
    parser.add_argument("--coco128", default=str(SHARED_DATA / "coco128"), help="the coco128 folder of --dataset coco128x8/auto")
    parser.add_argument("--limit", type=int, default=0, help="keep the first N entries of each split (the CPU dry run)")
    parser.add_argument("--copies", type=int, default=8, help="--dataset coco128x8: how many times coco128 is listed")
    parser.add_argument("--min-batches", type=int, default=0,
                        help="batches per timed epoch at least (a smaller listing is repeated; default 2 x --threads)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    workdir = tempfile.TemporaryDirectory(prefix="fastmlgan-bench-")
    args.workdir = workdir.name
    args.cache_dir = args.cache_dir or str(Path(workdir.name) / "cache")
    if args.quick:
        args.repeats = min(args.repeats, 3)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available")
    if device.type == "cpu":
        torch.set_num_threads(1)  # every backend gets --threads threads or worker processes, no more
    backends = available_backends(device) if args.backend == "all" else args.backend.split(",")
    unknown = set(backends) - set(ALL_BACKENDS)
    if unknown:
        sys.exit(f"unknown backend(s) {sorted(unknown)}; known: {', '.join(ALL_BACKENDS)}")
    if set(args.output.split(",")) - set(OUTPUTS):
        sys.exit(f"--output: {args.output!r}: a comma-separated subset of {', '.join(OUTPUTS)}")
    if "cache-gpu" in backends and device.type != "cuda":
        sys.exit("cache-gpu keeps the cache in GPU memory: it needs --device cuda")
    train, val, description = load_data(args)
    if args.limit:
        train, val = train.subset(range(min(args.limit, len(train)))), val.subset(range(min(args.limit, len(val))))
        description += f"; the first {args.limit} entries"
    min_images = args.batch_size * (args.min_batches or 2 * args.threads)
    if len(train) < min_images or len(val) < min_images:
        train, val = repeat_to(train, min_images), repeat_to(val, min_images)
        description += f"; listed until each epoch holds >= {min_images} images ({len(train)} train, {len(val)} eval entries)"
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else "bench/loader.py " + " ".join(argv)
    print(f"device {device} ({device_slug(device)}), {description}, batch {args.batch_size}, "
          f"{args.threads} threads, image size {args.image_size}, {args.repeats} repeats", flush=True)
    rows, caches = [], {}
    skipped = {}
    outputs = args.output.split(",")
    for backend in backends:
        if backend.startswith("dali") and not dali_available():
            print(f"skipping {backend}: DALI is not installed", flush=True)
            continue
        if backend.endswith("shards") and importlib.util.find_spec("webdataset") is None:
            skipped[backend] = "webdataset (the shards extra) is not installed"
            print(f"skipping {backend}: {skipped[backend]}", flush=True)
            continue
        if backend == "ffcv" and ffcv_missing():
            skipped["ffcv"] = ffcv_missing()
            print(f"skipping ffcv: {skipped['ffcv']} (install it in its own environment: README, Benchmarks)", flush=True)
            continue
        for split in args.split.split(","):
            if backend == "dali-roi" and split == "eval":
                continue  # the same eval pipeline as dali
            images = train if split == "train" else val
            extra, ffcv_file = {}, None
            if backend.endswith("shards"):
                if "shards-" + split not in caches:
                    from loader_shards import shards_for

                    caches["shards-" + split] = shards_for(split, images, args)
                    print(f"  shards build     {split:<5} {caches['shards-' + split]['shards_build_s']:9.1f} s", flush=True)
                extra = {k: v for k, v in caches["shards-" + split].items() if k != "shard_images"}
                row = {**measure(backend, split, images, args, device, caches["shards-" + split]["shard_images"]), **extra}
                rows.append(row)
                print(f"  {backend:<10} float {split:<5} {row['images_per_s']:9.1f} img/s  (min {row['min']:.1f}, "
                      f"max {row['max']:.1f}, {row['cores_used']:.2f} cores, {row['cpu_ms_per_image']:.2f} CPU ms/img, "
                      f"load {row['load_average'][0]:.2f})", flush=True)
                continue
            if backend.startswith("cache") or backend == "ffcv":
                if split not in caches:
                    caches[split] = build_cache_for(split, images, args, device)
                    built = caches[split]
                    print(f"  cache build      {split:<5} {built['build_s']:9.1f} s ({built['build_images_per_s']:.1f} img/s, "
                          f"{built['cache_decoder']} decoder), {built['cache_bytes']} bytes", flush=True)
                extra = {k: v for k, v in caches[split].items() if k != "cache"}
            if backend == "ffcv":
                ffcv_file = Path(args.workdir) / f"{split}.beton"
                extra = {**extra, **write_ffcv(caches[split]["cache"], ffcv_file, args.threads), "ffcv_version": ffcv_version()}
                print(f"  ffcv write       {split:<5} {extra['ffcv_write_s']:9.1f} s, {extra['ffcv_file_bytes']} bytes", flush=True)
            for output in outputs if backend in KINDED else ["float"]:
                row = {**measure(backend, split, images, args, device, caches.get(split, {}).get("cache"), output, ffcv_file),
                       **extra}
                rows.append(row)
                print(f"  {backend:<10} {output:<5} {split:<5} {row['images_per_s']:9.1f} img/s  (min {row['min']:.1f}, "
                      f"max {row['max']:.1f}, {row['cores_used']:.2f} cores, {row['cpu_ms_per_image']:.2f} CPU ms/img, "
                      f"load {row['load_average'][0]:.2f})", flush=True)
    header = f"{'backend':<16} {'output':<6} {'split':<6} {'img/s (median)':>15} {'min':>9} {'max':>9} {'cores':>6} {'load':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['backend']:<16} {row['output']:<6} {row['split']:<6} {row['images_per_s']:>15.1f} {row['min']:>9.1f} "
              f"{row['max']:>9.1f} {row['cores_used']:>6.2f} {row['load_average'][0]:>6.2f}")
    speedups = {}
    for split in ("train", "eval"):
        for output in OUTPUTS:
            rate = {r["backend"]: r["images_per_s"] for r in rows if r["split"] == split and r["output"] in (output, "float")
                    and (r["backend"] not in KINDED or r["output"] == output)}
            cpu = {r["backend"]: r["cpu_ms_per_image"] for r in rows if r["split"] == split
                   and (r["backend"] not in KINDED or r["output"] == output)}
            if "torch" in rate and "cache" in rate:
                speedups[f"cache {output}/torch {split} img/s"] = round(rate["cache"] / rate["torch"], 2)
                speedups[f"torch/cache {output} {split} CPU time per image"] = ratio(cpu["torch"], cpu["cache"])
            if "ffcv" in rate and "cache" in rate:
                speedups[f"cache/ffcv {output} {split} img/s"] = round(rate["cache"] / rate["ffcv"], 2)
                speedups[f"ffcv/cache {output} {split} CPU time per image"] = ratio(cpu["ffcv"], cpu["cache"])
            if "torch" in rate and "shards" in rate and output == "float":
                speedups[f"shards/torch {split} img/s"] = round(rate["shards"] / rate["torch"], 2)
    if speedups:
        print("\n" + ", ".join(f"{k}: {v}x" if v is not None else f"{k}: too short to time" for k, v in speedups.items()))
    result = record(device, args, description, command, load_before, speedups, rows)
    result["skipped"] = skipped
    out = Path(args.out or REPO / "bench" / "results" / f"loader-{device_slug(device)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
