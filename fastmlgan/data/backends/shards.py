"""The shards backend: batches streamed from WebDataset shards (``--data.dataset shards``; the
format: ``sources.shards``), decoded on CPU threads with the torch backend's geometry and
bad-image policy.

Order (``ShardPlan``). Training, epoch e: the split's shards are put in an order drawn from
(seed, e), and their samples concatenated; of the N samples, rank r of W takes positions
[r·M, (r+1)·M) with M = floor(N / W), so a shard count not divisible by W is split by samples
inside shards (two neighbouring ranks read parts of one shard), and the N − W·M samples at the end
of the epoch's order (fewer than W, a different few each epoch) are dropped, as
``DistributedSampler(drop_last=True)`` drops them. Each rank then serves floor(M / B) full batches
(the last partial batch dropped, ``plan``'s policy), so every rank takes the same number of
steps and every sample is served at most once an epoch. Inside a rank's stream, windows of
``window`` consecutive samples are shuffled (a permutation drawn from (seed, e, rank, window)):
the order is a pure function of (seed, epoch, world size, rank), so ``set_epoch(e, start_batch=k)``
finds the window holding batch k, seeks to its first sample (whole shards before it are not
opened; in its first shard the samples before it are read and skipped, never decoded), and a
resumed run serves the same batches bit for bit. Evaluation: rank r takes positions
[r·N/W, (r+1)·N/W) in index order, last partial batch kept: every sample once across ranks.

A sample's crop is ``geometry.crop_for(seed, epoch, index)`` and its pixels come from its file's
own bytes, so a sample is served with the same labels, crop and pixels as by the torch backend from
the folder the shards were built from (in another order). An undecodable image is skipped
(``on_bad_image=skip``: the next decodable sample of the same batch stands in, with its own labels
and index, the slot's crop, and ``bad`` set) or stops the run naming its shard and key (``error``).
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from fastmlgan.data.backends.plan import check_batch, check_rank
from fastmlgan.data.geometry import ON_BAD_IMAGE, crop_for, eval_resize, five_crop, image_to_rgb8, normalize, resize
from fastmlgan.data.sources.shards import ShardImages, image_member, iter_shard, label_row, sample_key
from fastmlgan.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SHARD_ORDER_TAG = 0x5348_4152_4453
"""Part of the seed of the shard order and window shuffles, so that they never draw from the
stream of a sample's crop (``crop_for`` seeds with [seed, epoch, index], index < 2**46)."""
PREFETCH_BATCHES = 2


def decode_bytes(data: bytes, where: str) -> torch.Tensor:
    """``geometry.decode_rgb`` of an image's bytes: uint8 (3, H, W), EXIF orientation applied,
    16-bit and float pixels scaled; ``DataError`` naming ``where`` when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = image_to_rgb8(img, where)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # as decode_rgb
        raise DataError(f"{where}: cannot decode image: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, SHARD_ORDER_TAG]).permutation(num_shards)


def rank_range(n: int, rank: int, world_size: int, train: bool) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s positions in the epoch's order of ``n`` samples."""
    if train:
        m = n // world_size
        return rank * m, (rank + 1) * m
    return rank * n // world_size, (rank + 1) * n // world_size


class ShardPlan:
    """The samples one rank reads in an epoch, in order (module docstring)."""

    def __init__(self, images: ShardImages, batch_size: int, rank: int, world_size: int, train: bool, seed: int = 0,
                 window: int = 1024):
        check_rank(rank, world_size)
        check_batch(batch_size)
        if window < 1:
            raise ConfigError(f"data.shards_window must be positive, got {window}")
        self.images, self.batch_size, self.rank, self.world_size = images, int(batch_size), rank, world_size
        self.train, self.seed, self.window = bool(train), int(seed), int(window)
        self.epoch = self.start_batch = 0
        start, stop = rank_range(len(images), rank, world_size, train)
        self.span = stop - start
        if train and self.span < batch_size:
            raise ConfigError(
                f"batch_size={batch_size} is larger than the {self.span} training images each of the "
                f"{world_size} rank(s) gets from {len(images)}: no full batch per epoch; lower the batch size")

    def __len__(self) -> int:
        return self.span // self.batch_size if self.train else -(-self.span // self.batch_size)

    @property
    def num_served(self) -> int:
        """Positions of this rank's range that are served (training drops the last partial batch)."""
        return len(self) * self.batch_size if self.train else self.span

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def order(self) -> list[int]:
        """The shards (numbers in ``images.shards``) in this epoch's order."""
        n = len(self.images.shards)
        return [int(k) for k in shard_order(n, self.seed, self.epoch)] if self.train else list(range(n))

    def pieces(self, first: int, stop: int) -> list[tuple[int, int, int]]:
        """(shard number, samples to skip in it, samples to read) covering this rank's positions [first, stop)."""
        begin = rank_range(len(self.images), self.rank, self.world_size, self.train)[0]
        lo, hi = begin + first, begin + stop
        out, at = [], 0
        for k in self.order():
            count = self.images.shards[k].num_samples
            a, b = max(lo, at), min(hi, at + count)
            if a < b:
                out.append((k, a - at, b - a))
            at += count
            if at >= hi:
                break
        return out

    def windows(self) -> Iterator[tuple[int, int, np.ndarray | None]]:
        """(first position, stop, permutation or None) of each window from the epoch's start batch on."""
        begin = self.start_batch * self.batch_size
        if not self.train:
            if begin < self.num_served:
                yield begin, self.num_served, None
            return
        w = begin // self.window
        while w * self.window < self.num_served:
            lo, hi = w * self.window, min((w + 1) * self.window, self.num_served)
            rng = np.random.default_rng([self.seed, self.epoch, SHARD_ORDER_TAG, self.rank, w])
            yield lo, hi, rng.permutation(hi - lo)
            w += 1

    def samples(self, stop: threading.Event | None = None) -> Iterator[tuple[int, dict]]:
        """(index, raw sample) in this rank's order from the start batch on: windows are read whole
        and permuted; the samples of the start batch's window before it are read but not served."""
        begin = self.start_batch * self.batch_size
        for lo, hi, perm in self.windows():
            read = self._read(lo, hi, stop)
            if perm is None:  # evaluation: in order, streamed
                yield from read
                continue
            got = list(read)
            if stop is not None and stop.is_set():
                return
            for i, p in enumerate(perm):
                if lo + i >= begin:
                    yield got[p]

    def _read(self, lo: int, hi: int, stop: threading.Event | None) -> Iterator[tuple[int, dict]]:
        """(index, raw sample) of positions [lo, hi) of this rank's range, in the epoch's shard order."""
        served = 0
        for k, skip, count in self.pieces(lo, hi):
            shard = self.images.shards[k]
            for j, sample in enumerate(iter_shard(shard, skip, count)):
                expected = sample_key(shard.first + skip + j)
                if sample["__key__"] != expected:
                    raise DataError(f"{shard.url}: sample {skip + j} has key {sample['__key__']!r}, expected "
                                    f"{expected} (the shard does not match its manifest)")
                served += 1
                yield shard.offset + skip + j, sample
                if stop is not None and stop.is_set():
                    return
        if served != hi - lo:
            raise DataError(f"{self.images.name}: the shards hold fewer samples than their manifest lists "
                            f"({served} of {hi - lo} read in positions [{lo}, {hi}) of rank {self.rank})")


class ShardLoader:
    """The ``types.Loader`` of a ``ShardImages`` split: batches of ``BATCH_KEYS`` in ``ShardPlan``'s order."""

    def __init__(self, images: ShardImages, image_size: int, batch_size: int, rank: int, world_size: int, train: bool,
                 seed: int = 0, on_bad_image: str = "skip", num_threads: int = 4, window: int = 1024,
                 pixels_per_batch: int | None = None):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self.images, self.image_size, self.train, self.seed = images, int(image_size), bool(train), int(seed)
        self.on_bad_image, self.pixels_per_batch = on_bad_image, pixels_per_batch
        self.plan = ShardPlan(images, batch_size, rank, world_size, train, seed, window)
        self.pool = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="fastmlgan-shards")

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.plan.set_epoch(epoch, start_batch)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- one sample ----------------------------------------------------------------------------

    def _where(self, index: int) -> str:
        return self.images.paths[index]

    def _crop(self, epoch: int, index: int) -> tuple[int, int]:
        return crop_for(self.seed, epoch, index) if self.train else (-1, -1)

    def _pixels(self, image: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
        if self.train:
            return normalize(five_crop(image, crop[0], crop[1], self.image_size))
        return normalize(eval_resize(image, self.image_size))

    def _decode(self, epoch: int, index: int, sample: dict):
        """(decoded uint8 image, normalised pixels of its own slot), or the ``DataError``."""
        member = image_member(sample)
        try:
            if member is None:
                raise DataError(f"{self._where(index)}: the sample has no image member")
            image = decode_bytes(member[1], self._where(index))
            return image, self._pixels(image, self._crop(epoch, index))
        except DataError as e:
            return e

    # -- batches -------------------------------------------------------------------------------

    def _labels(self, index: int, sample: dict) -> np.ndarray:
        row = label_row(sample, self.images.num_classes, self._where(index))
        if not np.array_equal(row, self.images.labels[index]):
            raise DataError(f"{self._where(index)}: its labels differ from the split's label rows (<split>-labels.npy): "
                            "the shards and their manifest do not belong together")
        return row

    def _batch(self, epoch: int, raw: list[tuple[int, dict]], results: list) -> dict[str, torch.Tensor]:
        n = len(raw)
        k = n if self.pixels_per_batch is None else min(n, self.pixels_per_batch)
        decoded = dict(enumerate(results))
        index = [i for i, _ in raw]
        used, bad = list(range(n)), [False] * n
        for j in range(k):
            if not isinstance(decoded[j], DataError):
                continue
            if self.on_bad_image == "error":
                raise decoded[j]
            logger.warning("skipping undecodable image %s (%s)", self._where(index[j]), decoded[j])
            for step in range(1, n):  # the next decodable sample of the batch stands in
                s = (j + step) % n
                if s not in decoded:
                    decoded[s] = self._decode(epoch, *raw[s])
                if not isinstance(decoded[s], DataError):
                    used[j], bad[j] = s, True
                    break
            else:
                raise DataError(f"{self.images.name}: none of the {n} images of a batch can be decoded "
                                f"(first {self._where(index[0])})")
        crops = [self._crop(epoch, i) for i in index]
        pixels = []
        for j in range(k):
            if bad[j]:  # the stand-in's image, cropped as this slot's sample would have been
                pixels.append(self._pixels(decoded[used[j]][0], crops[j]))
            else:
                pixels.append(decoded[j][1])
        labels = np.stack([self._labels(*raw[used[j]]) for j in range(n)]).astype(np.float32)
        out = {
            "labels": torch.from_numpy(labels),
            "index": torch.tensor([index[used[j]] for j in range(n)], dtype=torch.int64),
            "crop": torch.tensor(crops, dtype=torch.int64),
            "bad": torch.tensor(bad),
        }
        if pixels:
            out["image"] = torch.stack(pixels)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, size = self.plan.epoch, self.plan.batch_size
        stop = threading.Event()
        batches: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES + 1)
        end = object()

        def read() -> None:  # the reader thread: raw batches in order (I/O: local files or pipes)
            try:
                batch = []
                for item in self.plan.samples(stop):
                    batch.append(item)
                    if len(batch) == size:
                        _put(batches, batch, stop)
                        batch = []
                if batch and not self.train:
                    _put(batches, batch, stop)
                _put(batches, end, stop)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                _put(batches, e, stop)

        reader = threading.Thread(target=read, name="fastmlgan-shards-reader", daemon=True)
        reader.start()
        pending: deque = deque()
        try:
            done = False
            while True:
                while not done and len(pending) < PREFETCH_BATCHES:
                    raw = batches.get()
                    if raw is end:
                        done = True
                    elif isinstance(raw, BaseException):
                        raise raw
                    else:
                        k = len(raw) if self.pixels_per_batch is None else min(len(raw), self.pixels_per_batch)
                        pending.append((raw, [self.pool.submit(self._decode, epoch, *raw[j]) for j in range(k)]))
                if not pending:
                    return
                raw, futures = pending.popleft()
                yield self._batch(epoch, raw, [f.result() for f in futures])
        finally:
            stop.set()
            for _, futures in pending:
                for f in futures:
                    f.cancel()
            while reader.is_alive():
                try:
                    batches.get(timeout=0.05)
                except queue.Empty:
                    pass
            reader.join()


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def rows_shards(images: ShardImages, side: int, chunk_rows: int, num_threads: int, device=None):
    """For the decoded-image cache (``imagecache.build``): (first row, [HWC uint8 row | DataError])
    chunks in index order, every shard read once from start to end, decoded on CPU threads."""
    def one(item):
        index, sample = item
        member = image_member(sample)
        try:
            if member is None:
                raise DataError(f"{images.paths[index]}: the sample has no image member")
            return resize(decode_bytes(member[1], images.paths[index]), side).permute(1, 2, 0).contiguous().numpy()
        except DataError as e:
            return e

    plan = ShardPlan(images, 1, 0, 1, train=False)
    with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="fastmlgan-cache") as pool:
        chunk, start = [], 0
        for item in plan.samples():
            chunk.append(item)
            if len(chunk) == chunk_rows:
                yield start, list(pool.map(one, chunk))
                start, chunk = start + len(chunk), []
        if chunk:
            yield start, list(pool.map(one, chunk))


def train_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False,
                             pixels_per_batch: int | None = None) -> ShardLoader:
    """``factory.BACKENDS["shards"]``: this rank's training loader over ``--data.shards``."""
    return ShardLoader(splits.train, cfg.image_size, batch, info.rank, info.world_size, True, seed, cfg.on_bad_image,
                       cfg.num_threads, cfg.shards_window, pixels_per_batch)


def eval_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False) -> ShardLoader:
    """``factory.BACKENDS["shards"]``: this rank's evaluation loader over ``--data.shards_val``."""
    return ShardLoader(splits.val, cfg.image_size, batch, info.rank, info.world_size, False, seed, cfg.on_bad_image,
                       cfg.num_threads, cfg.shards_window)
