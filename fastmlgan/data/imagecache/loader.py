"""Serving a decoded-image cache (``imagecache.format``): batches with the interface of the other backends
(``len``, ``set_epoch``, iteration yielding ``{"image", "labels", "crop", "index", "bad"}``).

Same order, crops and bad-image flags as the torch loader: training shards come from
``DistributedSampler`` (shuffled, the last partial batch dropped), evaluation takes
``range(rank, N, W)`` in order, every image once; the crop of sample ``i`` in epoch ``e`` is
``crop_for(seed, e, i)``; a row whose image could not be decoded holds the next decodable image,
with that image's ``index`` and labels and ``bad=True``. Each rank reads only its own rows.

What ``image`` holds (``output``): ``"uint8"``, the pixels as (B, 3, S, S) uint8 in channels_last
memory (the rows' own NHWC layout: no copy), normalised by the consumer on its device
(``geometry.normalize_batch``, the first op of the trainer's step); or ``"float"``, normalised
here, bit for bit ``geometry.normalize`` of the same pixels (float32, or ``dtype``).

On a CPU, each batch is cut into chunks of ``CHUNK`` samples run on a pool of ``num_threads``
threads, ``prefetch`` batches ahead, so every thread stays busy even at an epoch's first and
last batch. A chunk reads each row with one ``pread`` into a buffer of its thread (reused: no
page faults, and the row stays in the core's cache) and resizes the crop window straight into
the batch (``geometry.resize_into``: no scatter copy afterwards). Both are ATen or system calls
that release the GIL; the crops of a batch are drawn together (``geometry.crops_for``), so what
holds the GIL per sample is a few Python lines (docs/performance.md, "The decoded-image cache
loader", has the profile). Measured on the
2-core CPU: the float32 normalisation cost 0.2 ms an image plus 0.6 ms of page faults on the
fresh 600 KB an image it writes, against 0.17 ms for the crop and resize: the uint8 output
leaves it to the device.

On a GPU the pool stages the rows (pinned) and the serving thread copies them (non-blocking),
cuts the crops there (one resize per crop group, torchvision's float path rounded to uint8)
and, for ``output="float"``, normalises there; the output kinds are the CPU's.
``cache_device="cuda"``: the whole training cache (every epoch's shard differs) or this rank's
share of the evaluation cache is copied to GPU memory once, and rows are gathered there.

``pixels_per_batch=K``: ``image`` holds only the first K samples of each batch (the other keys
all of them): for callers that need pixels for a few samples and labels for the rest.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fastmlgan.data.backends.plan import BatchPlan
from fastmlgan.data.geometry import IMAGENET_MEAN, IMAGENET_STD, NUM_SIZES, crop_window, crops_for, resize, resize_into
from fastmlgan.data.imagecache.build import ensure_cache
from fastmlgan.data.imagecache.format import CacheError, Geometry, ImageCache, read_rows, resolve_cache_dir
from fastmlgan.errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_DEVICES = ("cpu", "cuda")
OUTPUTS = ("float", "uint8")
CHUNK = 16
"""Samples per pool task on a CPU: a batch of 128 is 8 tasks, so 2 threads share every batch."""
GPU_HEADROOM = 0.10
"""Share of the GPU's memory a cache on the GPU must leave free (for the models and activations)."""
# The torch loader's float32 constants, as Python floats that are exactly those float32 values.
_MEAN = [float(v) for v in torch.tensor(IMAGENET_MEAN, dtype=torch.float32) * 255.0]
_STD = [float(v) for v in torch.tensor(IMAGENET_STD, dtype=torch.float32) * 255.0]


def usable_gpu_memory(device) -> tuple[int, int]:
    """(bytes this process can still allocate on ``device``, the device's total bytes).

    ``torch.cuda.mem_get_info``'s free bytes leave out what PyTorch's caching allocator holds
    reserved but unused (freed tensors it keeps for reuse), which a new allocation gets first:
    counting it as used refused caches that fit after, say, a model was built and freed."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + max(0, cached), total


def check_gpu_fit(nbytes: int, free: int, total: int, what: str, device) -> None:
    """``ConfigError`` when ``nbytes`` would leave less than ``GPU_HEADROOM`` of the GPU free."""
    headroom = int(total * GPU_HEADROOM)
    if nbytes > free - headroom:
        gib = 2**30
        raise ConfigError(
            f"--data.cache_device cuda: {what} needs {nbytes / gib:.2f} GiB of GPU memory, but {device} has "
            f"{free / gib:.2f} GiB free of {total / gib:.2f} GiB and {headroom / gib:.2f} GiB must stay free for "
            "training; use --data.cache_device cpu (pinned host staging)"
        )


class CacheLoader(BatchPlan):
    """Batches of an ``ImageCache``, five-cropped (training) or as stored (evaluation)."""

    def __init__(
        self,
        cache: ImageCache,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        train: bool,
        seed: int = 0,
        device="cpu",
        num_threads: int = 2,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        prefetch: int = 2,
        cache_device: str = "cpu",
        pixels_per_batch: int | None = None,
        gpu_pixels: torch.Tensor | None = None,
        output: str = "float",
    ):
        """``gpu_pixels``: the GPU copy of another loader over the same cache (``with_batch``).
        ``output``: ``"float"`` (normalised here, ``dtype``, channels_last when asked) or
        ``"uint8"`` (channels_last uint8, normalised by the consumer: ``geometry.normalize_batch``)."""
        super().__init__(len(cache), batch_size, rank, world_size, train, seed)
        expected = Geometry("train" if train else "eval", int(image_size))
        if cache.geometry != expected:
            raise CacheError(f"{cache.path}: a cache for {cache.geometry.describe()}, but this loader serves {expected.describe()}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"the cache loader was asked for {self.device} but CUDA is not available")
        if cache_device not in CACHE_DEVICES:
            raise ConfigError(f"--data.cache_device: {cache_device!r} is not one of {', '.join(CACHE_DEVICES)}")
        if cache_device == "cuda" and self.device.type != "cuda":
            raise ConfigError(f"--data.cache_device cuda keeps the cache in GPU memory, but this process runs on {self.device}")
        if pixels_per_batch is not None and pixels_per_batch < 0:
            raise ConfigError(f"pixels_per_batch must be >= 0, got {pixels_per_batch}")
        if output not in OUTPUTS:
            raise ConfigError(f"cache loader output {output!r} is not one of {', '.join(OUTPUTS)}")
        self.cache = cache
        self.image_size = int(image_size)
        self.side = cache.geometry.side
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.num_threads = max(1, int(num_threads))
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.prefetch = max(1, int(prefetch))
        self.cache_device = cache_device
        self.pixels_per_batch = pixels_per_batch
        self.output = output
        self._labels = torch.from_numpy(cache.labels.astype(np.float32))
        self._pin = torch.cuda.is_available()
        self._gpu_pixels: torch.Tensor | None = gpu_pixels
        if cache_device == "cuda" and gpu_pixels is None:
            self._load_to_gpu()
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()  # each pool thread's row buffer

    def with_batch(self, batch_size: int, pixels_per_batch: int | None = None) -> CacheLoader:
        """A training loader over the same cache with another batch size (phase 2's whole
        iterations) that shares this one's GPU copy: with ``--data.cache_device cuda`` a second
        loader built from scratch put the training cache in GPU memory twice (2 x 15 GiB for COCO
        at 224)."""
        if not self.train:
            raise ValueError("with_batch: only a training loader's batch can change")
        if len(self.cache) < batch_size * self.world_size:
            raise ConfigError(
                f"a batch of {batch_size} per rank needs {batch_size * self.world_size} training images, "
                f"but the cache {self.cache.path.name} holds {len(self.cache)}: lower --data.batch_size"
            )
        return CacheLoader(
            self.cache, self.image_size, batch_size, self.rank, self.world_size, train=True, seed=self.seed,
            device=self.device, num_threads=self.num_threads, dtype=self.dtype, channels_last=self.channels_last,
            prefetch=self.prefetch, cache_device=self.cache_device, pixels_per_batch=pixels_per_batch,
            gpu_pixels=self._gpu_pixels, output=self.output,
        )

    def _load_to_gpu(self) -> None:
        # Training needs every row (each epoch's shard is another draw); evaluation only this rank's.
        rows = np.arange(len(self.cache)) if self.train else np.arange(self.rank, len(self.cache), self.world_size)
        nbytes = len(rows) * self.side * self.side * 3
        free, total = usable_gpu_memory(self.device)
        check_gpu_fit(nbytes, free, total, f"the {self.cache.geometry.purpose} cache {self.cache.path.name}", self.device)
        pixels = torch.empty((len(rows), self.side, self.side, 3), dtype=torch.uint8, device=self.device)
        step = max(1, 2**28 // (self.side * self.side * 3))
        for a in range(0, len(rows), step):
            block = np.empty((len(rows[a : a + step]), self.side, self.side, 3), dtype=np.uint8)
            read_rows(self.cache, rows[a : a + step], block)  # pread: a truncated file is an error, not SIGBUS
            pixels[a : a + step].copy_(torch.from_numpy(block))
        self._gpu_pixels = pixels
        logger.info("cache %s: %d rows in GPU memory (%.2f GiB)", self.cache.path.name, len(rows), nbytes / 2**30)

    # -- one batch on a CPU: a plan, then chunks on the pool --------------------------------------

    def _plan(self, indices: list[int], epoch: int) -> dict:
        """The batch's metadata and empty buffers (serving thread; a few numpy calls)."""
        idx = np.asarray(indices, dtype=np.int64)
        k = len(idx) if self.pixels_per_batch is None else min(self.pixels_per_batch, len(idx))
        used = torch.from_numpy(self.cache.source[idx])
        size = self.image_size
        # channels_last uint8: the memory of (k, S, S, 3) rows, as the resize writes it.
        pixels = torch.empty((k, 3, size, size), dtype=torch.uint8, memory_format=torch.channels_last)
        # The crop belongs to the requested slot (seed, epoch, index), substitute or not.
        crops = crops_for(self.seed, epoch, idx) if self.train else np.full((len(idx), 2), -1, dtype=np.int64)
        batch = {
            "labels": self._labels[used],
            "crop": torch.from_numpy(crops),
            "index": used,
            "bad": torch.from_numpy(self.cache.bad[idx]),
            "image": pixels,
        }
        if self.output == "float":
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            batch["float"] = torch.empty((k, 3, size, size), dtype=torch.float32, memory_format=fmt)
        return {"idx": idx, "k": k, "epoch": epoch, "batch": batch}

    def _fill(self, plan: dict, lo: int, hi: int) -> None:
        """Pool task: samples [lo, hi) of a batch: crop draws, rows, crops, (float) normalisation."""
        idx, k, batch = plan["idx"], plan["k"], plan["batch"]
        pixels = batch["image"]
        if not self.train:
            rows = idx[lo : min(hi, k)]
            if len(rows):  # evaluation rows are the input already: one pread straight into the batch
                read_rows(self.cache, rows, pixels[lo : lo + len(rows)].permute(0, 2, 3, 1).numpy())
        else:
            crops = batch["crop"].numpy()
            buf = getattr(self._local, "row", None)
            if buf is None or buf.shape[0] != self.side:
                buf = self._local.row = np.empty((self.side, self.side, 3), dtype=np.uint8)
            row = torch.from_numpy(buf).permute(2, 0, 1).unsqueeze(0)  # (1, 3, side, side) channels_last view
            size = self.image_size
            for j in range(lo, min(hi, k)):
                position, size_index = int(crops[j, 0]), int(crops[j, 1])
                read_rows(self.cache, idx[j : j + 1], buf[None])  # one pread of a contiguous row
                top, left, side = crop_window(position, size_index, size)
                window = row[:, :, top : top + side, left : left + side]
                if side == size:
                    pixels[j].copy_(window[0])
                else:
                    resize_into(window, pixels[j : j + 1])
        if self.output == "float" and min(hi, k) > lo:
            _normalize_into(pixels[lo : min(hi, k)], batch["float"][lo : min(hi, k)])

    def _finish_cpu(self, plan: dict) -> dict:
        batch = plan["batch"]
        if self.output == "float":
            image = batch.pop("float")
            batch["image"] = image if self.dtype == torch.float32 else image.to(self.dtype)
        return batch

    # -- one batch on a GPU: rows staged on the pool, crops cut on the GPU -------------------------

    def _host_part(self, indices: list[int], epoch: int) -> dict:
        """Pool task (GPU): crops, labels and the staged rows, sorted by crop (one resize per group)."""
        idx = np.asarray(indices, dtype=np.int64)
        k = len(idx) if self.pixels_per_batch is None else min(self.pixels_per_batch, len(idx))
        if self.train:
            # The crop belongs to the requested slot (seed, epoch, index), substitute or not.
            crops = crops_for(self.seed, epoch, idx)
            key = crops[:k, 0] * NUM_SIZES + crops[:k, 1]
            order = np.argsort(key, kind="stable")
            cuts = np.flatnonzero(np.diff(key[order])) + 1
            groups = [(int(key[order[a]]), int(a), int(b)) for a, b in zip([0, *cuts], [*cuts, k]) if b > a]
        else:
            crops = np.full((len(idx), 2), -1, dtype=np.int64)
            order, groups = np.arange(k), [(-1, 0, k)] if k else []
        used = torch.from_numpy(self.cache.source[idx])
        part = {
            "labels": self._pin_if_gpu(self._labels[used]),  # pinned: the trainer copies non_blocking
            "crop": torch.from_numpy(crops),
            "index": used,
            "bad": torch.from_numpy(self.cache.bad[idx]),
            "order": torch.from_numpy(order),
            "groups": groups,
        }
        rows = idx[order]
        if self._gpu_pixels is not None:
            local = rows if self.train else (rows - self.rank) // self.world_size
            part["rows"] = self._pin_if_gpu(torch.from_numpy(local))
            return part
        staged = torch.empty((k, self.side, self.side, 3), dtype=torch.uint8, pin_memory=self._pin)
        read_rows(self.cache, rows.tolist(), staged.numpy())  # one pread of a contiguous row each
        part["staged"] = staged
        return part

    def _pin_if_gpu(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self._pin else t  # (the GPU path runs on CPU tensors in the tests)

    def _finish_gpu(self, part: dict) -> dict:
        if "rows" in part:
            staged = self._gpu_pixels.index_select(0, part.pop("rows").to(self.device, non_blocking=True))
        else:
            staged = part.pop("staged").to(self.device, non_blocking=True)
        part["image"] = self._gpu_images(staged, part.pop("order").to(self.device, non_blocking=True), part.pop("groups"))
        return part

    def _gpu_images(self, staged: torch.Tensor, order: torch.Tensor, groups: list) -> torch.Tensor:
        """Staged (k, side, side, 3) uint8 rows, sorted by crop -> (k, 3, S, S) in batch order:
        channels_last uint8, or normalised (``output``)."""
        size = self.image_size
        x = staged.permute(0, 3, 1, 2)  # NCHW view of NHWC rows: channels_last
        if self.train:
            out = torch.empty((len(x), 3, size, size), dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)
            for key, a, b in groups:
                top, left, side = crop_window(key // NUM_SIZES, key % NUM_SIZES, size)
                window = x[a:b, :, top : top + side, left : left + side]
                out[order[a:b]] = window if side == size else resize(window, size)  # one kernel
            x = out
        if self.output == "uint8":
            return x
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        image = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
        _normalize_into(x, image)
        return image if self.dtype == torch.float32 else image.to(self.dtype)

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="fastmlgan-cache")
        epoch, batches = self.epoch, self.batches()
        on_cpu = self.device.type == "cpu"
        depth = max(self.prefetch, 1 if on_cpu else self.num_threads)
        pending: deque = deque()
        ahead = 0
        try:
            for b in range(len(batches)):
                while ahead < len(batches) and ahead <= b + depth:
                    pending.append(self._submit(batches[ahead], epoch, on_cpu))
                    ahead += 1
                plan, futures = pending.popleft()
                if on_cpu:
                    for future in futures:
                        future.result()
                    yield self._finish_cpu(plan)
                else:
                    yield self._finish_gpu(futures[0].result())
        finally:
            for _, futures in pending:
                for future in futures:
                    future.cancel()

    def _submit(self, indices: list[int], epoch: int, on_cpu: bool) -> tuple:
        if not on_cpu:
            return None, [self._pool.submit(self._host_part, indices, epoch)]
        plan = self._plan(indices, epoch)
        n = len(indices)
        return plan, [self._pool.submit(self._fill, plan, lo, min(n, lo + CHUNK)) for lo in range(0, n, CHUNK)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _normalize_into(images: torch.Tensor, out: torch.Tensor) -> None:
    """uint8 ``images`` -> ``out`` (float32, same shape): ``geometry.normalize`` bit for bit, one
    channel at a time in place (0.2 ms an image on the 2-core CPU, against 1.5 ms for the
    broadcast ``(x - mean) / std`` with its type promotion)."""
    for c in range(3):
        channel = out[:, c]
        channel.copy_(images[:, c])
        channel.sub_(_MEAN[c]).div_(_STD[c])


def _cache(cfg, images, purpose: str, info) -> ImageCache:
    """The current decoded-image cache of ``images`` (built first when missing or stale)."""
    if cfg.cache_device == "cuda" and info.device.type != "cuda":
        raise ConfigError(f"--data.cache_device cuda keeps the cache in GPU memory, but this process runs on {info.device}")
    return ensure_cache(images, Geometry(purpose, cfg.image_size), resolve_cache_dir(cfg.cache_dir), cfg.on_bad_image,
                        info, num_threads=cfg.num_threads, progress=info.is_main)


def _from_config(cfg, info, channels_last: bool, output: str) -> dict:
    return dict(device=info.device, num_threads=cfg.num_threads, channels_last=channels_last, cache_device=cfg.cache_device,
                output=output)


def train_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False,
                             pixels_per_batch: int | None = None, output: str = "float") -> CacheLoader:
    """``factory.BACKENDS["cache"]``: the training loader of ``cfg`` (a ``DataConfig``), over the
    training split's cache (built on first use)."""
    return CacheLoader(_cache(cfg, splits.train, "train", info), cfg.image_size, batch, info.rank, info.world_size,
                       train=True, seed=seed, pixels_per_batch=pixels_per_batch, **_from_config(cfg, info, channels_last, output))


def eval_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False,
                            output: str = "float") -> CacheLoader:
    return CacheLoader(_cache(cfg, splits.val, "eval", info), cfg.image_size, batch, info.rank, info.world_size,
                       train=False, **_from_config(cfg, info, channels_last, output))
