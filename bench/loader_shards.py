"""The shards rows of ``bench/loader.py``: the same images written as WebDataset shards first (timed,
like the cache build), then read by

  shards       the kit's shards loader (``--data.dataset shards``): webdataset's tar iteration in a
               reader thread, PIL decode and the five-crop on ``--threads`` threads;
  dali-shards  DALI's ``fn.readers.webdataset`` (with the build's ``wds2idx`` index files) and the
               DALI backend's full-decode five-crop geometry (``geometry.crop_window``), nvJPEG on a
               GPU, CPU operators elsewhere. A throughput row only: the kit trains from shards with
               the shards loader (or the decoded-image cache built from them).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fastmlgan.data.backends.dali import device_id, require_dali
from fastmlgan.data.backends.shards import ShardLoader
from fastmlgan.data.geometry import IMAGENET_MEAN, IMAGENET_STD, NUM_POSITIONS, NUM_SIZES, base_size, crop_window
from fastmlgan.data.shardbuild import build_shards
from fastmlgan.data.sources.shards import open_split, read_manifest

SHARD_BYTES = 64 * 10**6  # coco128 x8's 1,008 entries (57 KB a JPEG) make one shard of 57.6 MB


def shards_for(split: str, images, args) -> dict:
    """Write ``images`` as shards (timed) in the bench's work folder; the split read back."""
    out = Path(args.workdir) / f"shards-{split}"
    start = time.perf_counter()
    build_shards({"train": images}, out, max_bytes=SHARD_BYTES, progress=False)
    seconds = time.perf_counter() - start
    entry = read_manifest(out)["splits"]["train"]
    n = len(entry["shards"])
    return {"shard_images": open_split(f"{out}/train-{{000000..{n - 1:06d}}}.tar", "", "shards"),
            "shards_build_s": round(seconds, 3), "shards": n, "shards_bytes": entry["bytes"]}


def build_loader(backend: str, train: bool, shard_images, args, device: torch.device):
    if backend == "shards":
        return ShardLoader(shard_images, args.image_size, args.batch_size, 0, 1, train=train, seed=0,
                           num_threads=args.threads)
    return DaliShardsLoader(shard_images, args.image_size, args.batch_size, train, args.threads, device)


class DaliShardsLoader:
    """DALI's webdataset reader + five-crop (or evaluation resize): batches of ``image`` for ``run_epoch``."""

    def __init__(self, images, image_size: int, batch_size: int, train: bool, threads: int, device: torch.device):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        fn, pipeline_def, types = require_dali()
        gpu = device_id(device) if device.type == "cuda" else None
        on_gpu = gpu is not None
        where = "gpu" if on_gpu else "cpu"
        paths = [s.url for s in images.shards]
        index_paths = [p[:-4] + ".idx" for p in paths]
        keys = list(range(NUM_POSITIONS * NUM_SIZES))
        windows = [crop_window(k // NUM_SIZES, k % NUM_SIZES, image_size) for k in keys]

        @pipeline_def
        def pipeline():
            jpegs = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg;jpeg;png"],
                                          random_shuffle=train, initial_fill=1024, name="Reader")
            kwargs = dict(device="mixed" if on_gpu else "cpu", output_type=types.RGB)
            if on_gpu:
                kwargs["hw_decoder_load"] = 0.65
            images_ = fn.decoders.image(jpegs, **kwargs)
            if train:
                k = fn.random.uniform(values=keys, dtype=types.INT32)

                def lookup(column):
                    return fn.lookup_table(k, keys=keys, values=[float(w[column]) for w in windows], dtype=types.INT32)

                base = base_size(image_size)
                images_ = fn.resize(images_, device=where, size=[base, base], antialias=True)
                images_ = fn.slice(images_, device=where, start=fn.stack(lookup(0), lookup(1)),
                                   shape=fn.stack(lookup(2), lookup(2)), axis_names="HW")
            images_ = fn.resize(images_, device=where, size=[image_size, image_size], antialias=True)
            return fn.crop_mirror_normalize(images_, device=where, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])

        pipe = pipeline(batch_size=batch_size, num_threads=max(1, threads), device_id=gpu, seed=1, prefetch_queue_depth=2)
        pipe.build()
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        self.iterator = DALIGenericIterator(pipe, ["image"], reader_name="Reader", last_batch_policy=policy,
                                            auto_reset=True)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """DALI reshuffles by itself; nothing to set."""

    def __iter__(self):
        for out in self.iterator:
            yield {"image": out[0]["image"]}

    def close(self) -> None:
        del self.iterator
