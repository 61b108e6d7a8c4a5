"""What checking a decoded-image cache's pixel checksums costs (issue 18), and what reading rows
with ``pread`` instead of the memory map costs (a truncated cache: an error, not SIGBUS).

On coco128 listed 8 times (1,008 real JPEG entries, ``bench/loader.py``'s set) or, without
``../shared/data``, the embedded set: builds the training (256x256 rows at 224) and evaluation
(224x224) caches once, then times, median of ``--repeats`` after one warm-up, with the file in the
page cache (a cold read adds the disk's time to read it once):

- ``verify``: the CRC-32 of every pixel chunk (what ``ensure_cache`` now does when a run opens a
  cache), on 1, 2 and 4 threads;
- ``open``: ``ImageCache.open`` plus the stale check, without and with ``verify``;
- rows: copying every row in batches of 64 into a staging buffer, from the memory map (before) and
  with ``pread`` (now); and a whole ``CacheLoader`` epoch (five-crops, normalised) both ways.

``python bench/cache_checksum.py [--repeats 5] [--out bench/results/cache-checksum-cpu.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from fastmlgan.data.imagecache.build import ensure_cache  # noqa: E402
from fastmlgan.data.imagecache.format import Geometry, ImageCache, read_rows  # noqa: E402
from fastmlgan.data.imagecache.loader import CacheLoader  # noqa: E402
from fastmlgan.data.sources.coco import read_coco  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: the page cache holds the file afterwards
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def images(workdir: Path):
    from loader import coco128_repeated

    made = coco128_repeated(8, workdir)
    if made is not None:
        return "coco128x8", read_coco(*made, name="coco128x8")
    from fastmlgan.data.sources import embedded

    paths = embedded.ensure(workdir / "embedded", num_train=1000, num_val=100, image_size=320, seed=0)
    return "embedded", read_coco(paths.train_ann, paths.train_images, name="embedded")


def memmap_rows(cache, rows, out):  # the reading before issue 18
    for j, r in enumerate(rows):
        out[j] = cache.pixels[r]


def measure(data, purpose: str, folder: Path, repeats: int) -> dict:
    import fastmlgan.data.imagecache.loader as cl

    geometry = Geometry(purpose, 224)
    cache = ensure_cache(data, geometry, folder, num_threads=2, progress=False)
    size = cache.path.stat().st_size
    row: dict = {"file_bytes": size}
    for threads in (1, 2, 4):
        row[f"verify_s_{threads}_threads"] = median_time(lambda t=threads: cache.verify(t), repeats)
    row["gb_per_s_2_threads"] = size / row["verify_s_2_threads"] / 1e9
    row["open_s_without_verify"] = median_time(lambda: ImageCache.open(cache.path, geometry).stale_reason(data), repeats)
    row["open_s_with_verify_2_threads"] = row["open_s_without_verify"] + row["verify_s_2_threads"]
    order = np.arange(len(cache))
    staged = np.empty((64, geometry.side, geometry.side, 3), np.uint8)

    def copy_all(read):
        for a in range(0, len(order), 64):
            rows = order[a : a + 64].tolist()
            read(cache, rows, staged[: len(rows)])

    row["rows_s_memmap"] = median_time(lambda: copy_all(memmap_rows), repeats)
    row["rows_s_pread"] = median_time(lambda: copy_all(read_rows), repeats)
    loader = CacheLoader(cache, 224, 32, 0, 1, train=purpose == "train", num_threads=2)

    def epoch():
        for _ in loader:
            pass

    row["epoch_img_per_s_pread"] = len(loader) * 32 / median_time(epoch, repeats)
    cl.read_rows, original = memmap_rows, cl.read_rows
    try:
        row["epoch_img_per_s_memmap"] = len(loader) * 32 / median_time(epoch, repeats)
    finally:
        cl.read_rows = original
    loader.close()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cache-checksum-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads_torch": 1}
    with tempfile.TemporaryDirectory() as tmp:
        name, data = images(Path(tmp))
        results["dataset"], results["images"] = name, len(data)
        for purpose in ("train", "eval"):
            results[purpose] = measure(data, purpose, Path(tmp) / "c", args.repeats)
            print(purpose, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results[purpose].items()}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
