"""Serving a decoded-image cache (``imagecache.format``): batches with the interface of the other backends
(``len``, ``set_epoch``, iteration yielding ``{"image", "labels", "crop", "index", "bad"}``).

Same order, crops and bad-image flags as the torch loader: training shards come from
``DistributedSampler`` (shuffled, the last partial batch dropped), evaluation takes
``range(rank, N, W)`` in order, every image once; the crop of sample ``i`` in epoch ``e`` is
``crop_for(seed, e, i)``; a row whose image could not be decoded holds the next decodable image,
with that image's ``index`` and labels and ``bad=True``. Each rank reads only its own rows.

Per batch, on a pool of ``num_threads`` threads, ``prefetch`` batches ahead: the rows are copied
from the memory map (one memcpy each) into a staging buffer (pinned when a GPU is present),
sorted by crop (position, size), so that each crop group is one contiguous slice; then, on the
serving device, each group's window is resized to image_size in one call (the torch loader's
uint8 antialiased resize; on a GPU torchvision's float path, rounded), scattered back to batch
order and normalised channel by channel in place (measured on the 2-core CPU: 0.2 ms an image,
against 1.5 ms for the broadcast ``(x - mean) / std`` with type promotion; the result is the
same to the bit). On a CPU the whole batch is made on the pool; on a GPU the pool stages the
rows and the serving thread copies them (non-blocking) and launches the GPU ops.

``cache_device="cuda"``: the whole training cache (every epoch's shard differs) or this rank's
share of the evaluation cache is copied to GPU memory once, and rows are gathered there.

``pixels_per_batch=K``: ``image`` holds only the first K samples of each batch (the other keys
all of them): for callers that need pixels for a few samples and labels for the rest.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fastmlgan.data.backends.plan import BatchPlan
from fastmlgan.data.geometry import IMAGENET_MEAN, IMAGENET_STD, NUM_SIZES, crop_for, crop_window, resize
from fastmlgan.data.imagecache.build import ensure_cache
from fastmlgan.data.imagecache.format import CacheError, Geometry, ImageCache, read_rows, resolve_cache_dir
from fastmlgan.errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_DEVICES = ("cpu", "cuda")
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
    ):
        """``gpu_pixels``: the GPU copy of another loader over the same cache (``with_batch``)."""
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
        self._labels = torch.from_numpy(cache.labels.astype(np.float32))
        self._pin = torch.cuda.is_available()
        self._gpu_pixels: torch.Tensor | None = gpu_pixels
        if cache_device == "cuda" and gpu_pixels is None:
            self._load_to_gpu()
        self._pool: ThreadPoolExecutor | None = None

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
            gpu_pixels=self._gpu_pixels,
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

    # -- one batch ------------------------------------------------------------------------------

    def _host_part(self, indices: list[int], epoch: int) -> dict:
        """Pool task: crops, labels and the staged rows (on a CPU: the finished batch)."""
        idx = np.asarray(indices, dtype=np.int64)
        k = len(idx) if self.pixels_per_batch is None else min(self.pixels_per_batch, len(idx))
        if self.train:
            # The crop belongs to the requested slot (seed, epoch, index), substitute or not.
            crops = np.array([crop_for(self.seed, epoch, int(i)) for i in idx], dtype=np.int64).reshape(-1, 2)
            key = crops[:k, 0] * NUM_SIZES + crops[:k, 1]
            order = np.argsort(key, kind="stable")
            cuts = np.flatnonzero(np.diff(key[order])) + 1
            groups = [(int(key[order[a]]), int(a), int(b)) for a, b in zip([0, *cuts], [*cuts, k]) if b > a]
        else:
            crops = np.full((len(idx), 2), -1, dtype=np.int64)
            order, groups = np.arange(k), [(-1, 0, k)] if k else []
        used = torch.from_numpy(self.cache.source[idx])
        labels = self._labels[used]
        part = {
            "labels": labels.pin_memory() if self._pin else labels,  # pinned: the trainer copies non_blocking
            "crop": torch.from_numpy(crops),
            "index": used,
            "bad": torch.from_numpy(self.cache.bad[idx]),
            "order": torch.from_numpy(order),
            "groups": groups,
        }
        rows = idx[order]
        if self._gpu_pixels is not None:
            local = rows if self.train else (rows - self.rank) // self.world_size
            part["rows"] = torch.from_numpy(local).pin_memory()
            return part
        staged = torch.empty((k, self.side, self.side, 3), dtype=torch.uint8, pin_memory=self._pin and self.device.type == "cuda")
        read_rows(self.cache, rows.tolist(), staged.numpy())  # one pread of a contiguous row each
        part["staged"] = staged
        if self.device.type == "cpu":
            part["image"] = self._images(part.pop("staged"), part["order"], groups)
        return part

    def _finish(self, part: dict) -> dict:
        if "image" not in part:
            if "rows" in part:
                staged = self._gpu_pixels.index_select(0, part.pop("rows").to(self.device, non_blocking=True))
            else:
                staged = part.pop("staged").to(self.device, non_blocking=True)
            part["image"] = self._images(staged, part["order"].to(self.device, non_blocking=True), part["groups"])
        del part["order"], part["groups"]
        return part

    def _images(self, staged: torch.Tensor, order: torch.Tensor, groups: list) -> torch.Tensor:
        """Staged (k, side, side, 3) uint8 rows, sorted by crop -> normalised (k, 3, S, S) in batch order."""
        size = self.image_size
        x = staged.permute(0, 3, 1, 2)  # NCHW view of NHWC rows: channels_last
        if not self.train:
            return self._normalize(x)  # rows are the evaluation input already, in order
        out = torch.empty((len(x), 3, size, size), dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)
        on_cpu = x.device.type == "cpu"
        for key, a, b in groups:
            top, left, side = crop_window(key // NUM_SIZES, key % NUM_SIZES, size)
            window = x[a:b, :, top : top + side, left : left + side]
            crops = window if side == size else resize(window, size)
            if on_cpu:
                # One memcpy per sample: 26 us an image here, against 140 for out[order[a:b]] = crops.
                for j, dst in enumerate(order[a:b].tolist()):
                    out[dst] = crops[j]
            else:
                out[order[a:b]] = crops  # one kernel
        return self._normalize(out)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> (x - mean) / std like ``geometry.normalize``, bit for bit, one channel at a time in place."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=fmt)
        for c in range(3):
            channel = out[:, c]
            channel.copy_(images[:, c])
            channel.sub_(_MEAN[c]).div_(_STD[c])
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="fastmlgan-cache")
        epoch, batches = self.epoch, self.batches()
        depth = max(self.prefetch, self.num_threads)
        pending: deque = deque()
        ahead = 0
        try:
            for b in range(len(batches)):
                while ahead < len(batches) and ahead <= b + depth:
                    pending.append(self._pool.submit(self._host_part, batches[ahead], epoch))
                    ahead += 1
                yield self._finish(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _cache(cfg, images, purpose: str, info) -> ImageCache:
    """The current decoded-image cache of ``images`` (built first when missing or stale)."""
    if cfg.cache_device == "cuda" and info.device.type != "cuda":
        raise ConfigError(f"--data.cache_device cuda keeps the cache in GPU memory, but this process runs on {info.device}")
    return ensure_cache(images, Geometry(purpose, cfg.image_size), resolve_cache_dir(cfg.cache_dir), cfg.on_bad_image,
                        info, num_threads=cfg.num_threads, progress=info.is_main)


def _from_config(cfg, info, channels_last: bool) -> dict:
    return dict(device=info.device, num_threads=cfg.num_threads, channels_last=channels_last, cache_device=cfg.cache_device)


def train_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False,
                             pixels_per_batch: int | None = None) -> CacheLoader:
    """``factory.BACKENDS["cache"]``: the training loader of ``cfg`` (a ``DataConfig``), over the
    training split's cache (built on first use)."""
    return CacheLoader(_cache(cfg, splits.train, "train", info), cfg.image_size, batch, info.rank, info.world_size,
                       train=True, seed=seed, pixels_per_batch=pixels_per_batch, **_from_config(cfg, info, channels_last))


def eval_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False) -> CacheLoader:
    return CacheLoader(_cache(cfg, splits.val, "eval", info), cfg.image_size, batch, info.rank, info.world_size,
                       train=False, **_from_config(cfg, info, channels_last))
