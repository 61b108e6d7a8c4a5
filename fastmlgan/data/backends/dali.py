"""The DALI data path: sharded file reading, nvJPEG decoding and the paper's five-crop (§4.1) in a
DALI pipeline, behind the ``Loader`` interface of every backend (``data.types``).

Install: DALI is an extra, ``pip install .[dali]`` (the CUDA 13 wheel ``nvidia-dali-cuda130``).
CUDA 12 users install ``nvidia-dali-cuda120`` from NVIDIA's index instead::

    pip install --extra-index-url https://pypi.nvidia.com nvidia-dali-cuda120

On a GPU the JPEGs are decoded by nvJPEG (``device="mixed"``, the A100/H100 hardware decoder
takes ``hw_decoder_load`` of them) and every later operator runs on the GPU. Without a GPU the
same pipeline runs with every operator on the CPU (``device_id=None``): that is how the tests
check it against the torch loader.

Policies (the same as the torch backend's where DALI allows it):

* Sharding: ``fn.readers.file(shard_id=rank, num_shards=world_size)`` with
  ``shuffle_after_epoch=True``, which permutes the *whole* file list after every epoch (the same
  permutation on every rank: ``shuffle_after_epoch_seed`` is shared) and then gives rank ``r``
  the block ``[N*r//W, N*(r+1)//W)`` of it, so each epoch is a partition of the data across ranks
  like ``DistributedSampler``. ``random_shuffle`` is not used: it only shuffles within a buffer
  of ``initial_fill`` samples, so a file list sorted by image id stays roughly sorted.
* Training drops the last partial batch: every rank yields ``(N // W) // batch_size`` batches per
  epoch (the smallest shard's full batches), so ranks take the same number of steps; a rank
  whose shard is one sample longer decodes (and discards) at most one extra batch.
  ``pad_last_batch=True`` makes every reader epoch end on a batch boundary, so no batch mixes
  two epochs.
* Evaluation reads the file list in order, no shuffle, ``stick_to_shard=True`` (readers move
  to the next shard after every epoch by default), ``pad_last_batch=True`` with
  ``LastBatchPolicy.PARTIAL``: the iterator trims the padding, so every image is seen exactly
  once across ranks, on every pass. The loader also drops any index already seen in the pass (a guard that
  has never fired in the tests).
* Labels never travel through DALI: the reader's integer label is the sample's index in the
  ``LabeledImages``, and the multi-hot row is looked up from it after the pipeline, so labels
  cannot misalign with images.
* Crops: position and size index are drawn per sample on the CPU (``fn.random.uniform`` over the
  25 pairs, seeded per rank), returned as the ``crop`` output, and turned into the window of
  ``geometry.crop_window`` by lookup tables, so the geometry is the torch loader's exactly. The
  crops are not the torch loader's ``crop_for(seed, epoch, index)`` draws, and the data order
  after a resume is a fresh sequence, not the interrupted run's.
* EXIF orientation is applied (``adjust_orientation=True``), as the torch loader's decoder
  (``geometry.decode_rgb``) applies it: a phone photo stored sideways is seen upright, and
  ``roi`` windows are in the upright image's coordinates (checked with DALI 2.4's CPU decoder
  against PIL's ``exif_transpose``: equal to the pixel, issue 18).
* Undecodable images: DALI cannot substitute another image, so ``bad`` is always False and a
  broken JPEG stops the run with a ``DataError``. Scan a dataset first with
  ``fastmlgan check``.

``decode="roi"`` decodes only the crop window of each JPEG (``fn.decoders.image_slice`` with
the window as fractions of the image, exact because resizing to base x base is linear) and
resizes it once to ``image_size``, instead of decoding everything, resizing to base x base,
cropping and resizing again. One resampling instead of two changes pixels by a few grey levels;
``bench/loader.py`` measures whether it is faster.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from fastmlgan.data.backends.plan import check_batch, check_rank
from fastmlgan.data.geometry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_POSITIONS,
    NUM_SIZES,
    base_size,
    crop_window,
    crop_window_normalized,
)
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

READER_NAME = "Reader"
DECODE_MODES = ("full", "roi")
_NUM_CROPS = NUM_POSITIONS * NUM_SIZES
_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16"}


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports (the ``[dali]`` extra is installed)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali():
    if not dali_available():
        raise ConfigError(
            "--data.backend dali needs NVIDIA DALI: pip install '.[dali]' (CUDA 13), or "
            "pip install --extra-index-url https://pypi.nvidia.com nvidia-dali-cuda120 (CUDA 12); "
            "or use --data.backend torch"
        )
    from nvidia.dali import fn, pipeline_def, types

    return fn, pipeline_def, types


def _crop_tables(image_size: int) -> dict[str, list[float]]:
    """For each k = position * NUM_SIZES + size_index: the window in the base x base image and
    as fractions of the image (both from ``geometry``, the one place the geometry lives)."""
    tables: dict[str, list[float]] = {key: [] for key in ("top", "left", "side", "y0", "x0", "h", "w")}
    for k in range(_NUM_CROPS):
        position, size_index = divmod(k, NUM_SIZES)
        top, left, side = crop_window(position, size_index, image_size)
        y0, x0, y1, x1 = crop_window_normalized(position, size_index, image_size)
        for key, value in zip(tables, (top, left, side, y0, x0, y1 - y0, x1 - x0)):
            tables[key].append(float(value))
    return tables


def _pipelines():
    """The two ``@pipeline_def`` functions, defined on first use so that importing this module
    does not need DALI."""
    fn, pipeline_def, types = require_dali()
    mean = [m * 255.0 for m in IMAGENET_MEAN]
    std = [s * 255.0 for s in IMAGENET_STD]

    def read(files, shard_id, num_shards, train, shuffle_seed):
        # Training: a global reshuffle per epoch (shards rotate too, harmlessly). Evaluation: each
        # rank keeps its own shard on every pass (readers rotate shards by default).
        kwargs = (
            dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed) if train else dict(stick_to_shard=True)
        )
        return fn.readers.file(
            files=files,
            labels=list(range(len(files))),  # the label is the sample index (see the module docstring)
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            name=READER_NAME,
            **kwargs,
        )

    def normalize(images, on_gpu, dtype, layout):
        return fn.crop_mirror_normalize(
            images,
            device="gpu" if on_gpu else "cpu",
            dtype=getattr(types, dtype),
            output_layout=layout,
            mean=mean,
            std=std,
        )

    def decoder_kwargs(on_gpu, hw_decoder_load):
        kwargs = dict(device="mixed" if on_gpu else "cpu", output_type=types.RGB, adjust_orientation=True)
        if on_gpu:
            kwargs["hw_decoder_load"] = hw_decoder_load
        return kwargs

    @pipeline_def
    def five_crop_pipeline(
        files, shard_id, num_shards, shuffle_seed, image_size, on_gpu, decode, dtype, layout, hw_decoder_load
    ):
        """Training: read (sharded, reshuffled every epoch), draw a crop, decode, crop, resize, normalise."""
        jpegs, index = read(files, shard_id, num_shards, True, shuffle_seed)
        k = fn.random.uniform(values=list(range(_NUM_CROPS)), dtype=types.INT32)
        tables = _crop_tables(image_size)

        def lookup(key, dtype):
            return fn.lookup_table(k, keys=list(range(_NUM_CROPS)), values=tables[key], dtype=dtype)

        device = "gpu" if on_gpu else "cpu"
        if decode == "roi":
            start = fn.stack(lookup("y0", types.FLOAT), lookup("x0", types.FLOAT))
            shape = fn.stack(lookup("h", types.FLOAT), lookup("w", types.FLOAT))
            images = fn.decoders.image_slice(
                jpegs, start, shape, axis_names="HW", **decoder_kwargs(on_gpu, hw_decoder_load)
            )
            images = fn.resize(images, device=device, size=[image_size, image_size], antialias=True)
        else:
            base = base_size(image_size)
            side = lookup("side", types.INT32)
            images = fn.decoders.image(jpegs, **decoder_kwargs(on_gpu, hw_decoder_load))
            images = fn.resize(images, device=device, size=[base, base], antialias=True)
            images = fn.slice(
                images,
                device=device,
                start=fn.stack(lookup("top", types.INT32), lookup("left", types.INT32)),
                shape=fn.stack(side, side),
                axis_names="HW",
            )
            images = fn.resize(images, device=device, size=[image_size, image_size], antialias=True)
        crop = fn.stack(k // NUM_SIZES, k % NUM_SIZES)
        return normalize(images, on_gpu, dtype, layout), index, crop

    @pipeline_def
    def eval_pipeline(files, shard_id, num_shards, image_size, on_gpu, dtype, layout, hw_decoder_load):
        """Evaluation (§4.1): the whole image resized to image_size x image_size, files in order."""
        jpegs, index = read(files, shard_id, num_shards, False, None)
        images = fn.decoders.image(jpegs, **decoder_kwargs(on_gpu, hw_decoder_load))
        images = fn.resize(images, device="gpu" if on_gpu else "cpu", size=[image_size, image_size], antialias=True)
        return normalize(images, on_gpu, dtype, layout), index

    return five_crop_pipeline, eval_pipeline


def device_id(device) -> int | None:
    """DALI's ``device_id``: None (CPU-only pipeline) unless ``device`` is a CUDA device."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        raise ConfigError(f"DALI loader asked for {device} but CUDA is not available")
    return device.index if device.index is not None else torch.cuda.current_device()


class DALILoader:
    """A DALI pipeline as a loader the trainer can use like the torch ones: ``len``, ``set_epoch``,
    and iteration yielding ``{"image", "labels", "crop", "index", "bad"}`` batch dicts.

    The pipeline is built on the first iteration (building is cheap; it keeps construction of an
    unused loader free), with a shuffle seed that folds in the epoch of that first iteration, so a
    resumed run does not replay the order of its first epochs."""

    def __init__(
        self,
        images: LabeledImages,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        train: bool,
        seed: int = 0,
        device=None,
        num_threads: int = 2,
        decode: str = "full",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        hw_decoder_load: float = 0.65,
        prefetch: int = 2,
    ):
        check_rank(rank, world_size)
        check_batch(batch_size)
        if image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        if decode not in DECODE_MODES:
            raise ConfigError(f"DALI decode must be one of {DECODE_MODES}, got {decode!r}")
        if dtype not in _DTYPES:
            raise ConfigError(f"DALI outputs float32 or float16 images, not {dtype} (cast after the loader)")
        if len(images) == 0:
            raise DataError(f"{images.name}: no images")
        self.images = images
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.device_id = device_id(device)
        self.num_threads = max(1, int(num_threads))
        self.decode = decode
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.hw_decoder_load = float(hw_decoder_load)
        self.prefetch = int(prefetch)
        self.epoch = 0
        self.start_batch = 0
        n = len(images)
        if self.train:
            per_rank = n // self.world_size
            self.num_batches = per_rank // self.batch_size
            if self.num_batches == 0:
                raise ConfigError(
                    f"batch_size={batch_size} is larger than the {per_rank} training images each of the "
                    f"{world_size} rank(s) gets from {n}: no full batch per epoch; lower the batch size"
                )
        else:
            # DALI's shard of rank r: [n*r//W, n*(r+1)//W) (its documented shard formula).
            self.shard = range(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)
            self.num_batches = -(-len(self.shard) // self.batch_size)
        self._labels = torch.from_numpy(images.labels.astype(np.float32))
        self._pin = torch.cuda.is_available()
        self._iterator = None
        self._unfinished = False
        self._seen_duplicate = False

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """DALI's reader keeps its own shuffle, so a resumed epoch cannot replay the interrupted
        run's images: it yields the epoch's remaining number of batches (``num_batches -
        start_batch``), so epoch boundaries stay where they were, with a fresh draw of images."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def close(self) -> None:
        """The pipeline is kept for the next pass (another phase reuses it); it goes with the loader."""

    def _build(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        five_crop_pipeline, eval_pipeline = _pipelines()
        on_gpu = self.device_id is not None
        layout = "HWC" if self.channels_last else "CHW"
        common = dict(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            # Per-rank crop stream; the shuffle (below) must be the same on every rank.
            seed=(self.seed * 1_000_003 + 7919 * self.rank + 1) % (2**31 - 1),
            prefetch_queue_depth=self.prefetch,
            files=list(self.images.paths),
            shard_id=self.rank,
            num_shards=self.world_size,
            image_size=self.image_size,
            on_gpu=on_gpu,
            dtype=_DTYPES[self.dtype],
            layout=layout,
            hw_decoder_load=self.hw_decoder_load,
        )
        if self.train:
            pipe = five_crop_pipeline(
                shuffle_seed=(self.seed * 100_003 + self.epoch) % (2**31 - 1), decode=self.decode, **common
            )
            outputs, policy = ["image", "index", "crop"], LastBatchPolicy.DROP
        else:
            pipe = eval_pipeline(**common)
            outputs, policy = ["image", "index"], LastBatchPolicy.PARTIAL
        pipe.build()
        return DALIGenericIterator(
            pipe, outputs, reader_name=READER_NAME, last_batch_policy=policy, auto_reset=True, prepare_first_batch=False
        )

    def _next(self, iterator):
        try:
            return next(iterator)[0]
        except StopIteration:
            raise
        except RuntimeError as e:
            raise DataError(
                f"{self.images.name}: the DALI pipeline failed (a missing, truncated or non-image file?): "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else e}. DALI cannot skip bad images: "
                "run fastmlgan check with the same --data options, or use --data.backend torch"
            ) from e

    def _batch(self, out: dict) -> dict:
        index = out["index"].reshape(-1).to(torch.int64).cpu()
        image = out["image"]
        if self.channels_last:
            image = image.permute(0, 3, 1, 2)  # NHWC storage: an NCHW tensor in channels_last format
        if "crop" in out:
            crop = out["crop"].reshape(-1, 2).to(torch.int64).cpu()
        else:
            crop = torch.full((len(index), 2), -1, dtype=torch.int64)
        return {
            "image": image,
            # Pinned, so that the trainer's non_blocking copy to the GPU does not stall the host.
            "labels": self._labels[index].pin_memory() if self._pin else self._labels[index],
            "crop": crop,
            "index": index,
            "bad": torch.zeros(len(index), dtype=torch.bool),
        }

    def __iter__(self) -> Iterator[dict]:
        if self._iterator is None:
            self._iterator = self._build()
        iterator = self._iterator
        if self._unfinished:
            # The last pass was abandoned mid-epoch: finish DALI's epoch so this one starts at its beginning.
            for _ in iterator:
                pass
        self._unfinished = True
        yield from self._epoch(iterator)
        self._unfinished = False

    def _epoch(self, iterator) -> Iterator[dict]:
        if self.train:
            for _ in range(self.num_batches - min(self.start_batch, self.num_batches)):
                yield self._batch(self._next(iterator))
            # A longer shard may hold one more full batch: drain it so the next epoch starts fresh.
            for _ in iterator:
                pass
            return
        seen = np.zeros(len(self.images), dtype=bool)
        while True:
            try:
                batch = self._batch(self._next(iterator))
            except StopIteration:
                return
            idx = batch["index"].numpy()
            keep = ~seen[idx]
            seen[idx] = True
            if not keep.all():
                if not self._seen_duplicate:
                    logger.warning("DALI eval loader: dropped %d repeated sample(s) in one pass", int((~keep).sum()))
                    self._seen_duplicate = True
                mask = torch.from_numpy(keep)
                batch = {k: v[mask.to(v.device)] if k == "image" else v[mask] for k, v in batch.items()}
            if len(batch["index"]):
                yield batch


def build_dali_train_loader(
    images: LabeledImages,
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device=None,
    num_threads: int = 2,
    decode: str = "full",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    hw_decoder_load: float = 0.65,
) -> DALILoader:
    """Sharded, reshuffled five-crop training batches; the last partial batch is dropped.

    ``device``: a CUDA device (nvJPEG + GPU operators, images on that device) or None/CPU (a
    CPU-only pipeline)."""
    return DALILoader(
        images, image_size, batch_size, rank, world_size, train=True, seed=seed, device=device,
        num_threads=num_threads, decode=decode, dtype=dtype, channels_last=channels_last,
        hw_decoder_load=hw_decoder_load,
    )


def build_dali_eval_loader(
    images: LabeledImages,
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    device=None,
    num_threads: int = 2,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    hw_decoder_load: float = 0.65,
) -> DALILoader:
    """Whole images resized to image_size, in order, every image exactly once across ranks."""
    return DALILoader(
        images, image_size, batch_size, rank, world_size, train=False, device=device,
        num_threads=num_threads, dtype=dtype, channels_last=channels_last, hw_decoder_load=hw_decoder_load,
    )


def _from_config(cfg, info, channels_last: bool) -> dict:
    return dict(device=info.device, num_threads=cfg.num_threads, channels_last=channels_last,
                hw_decoder_load=cfg.dali_hw_decoder_load)


def train_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False,
                             pixels_per_batch: int | None = None) -> DALILoader:
    """``factory.BACKENDS["dali"]``: the training loader of ``cfg`` (a ``DataConfig``); DALI decodes
    every image of a batch (``pixels_per_batch`` is not honoured: the trainer ignores extra rows)."""
    if cfg.on_bad_image == "skip" and info.is_main:
        logger.info(
            "data.backend dali cannot skip undecodable images (on_bad_image=skip is not honoured): "
            "check the dataset first with fastmlgan check"
        )
    return build_dali_train_loader(
        splits.train, cfg.image_size, batch, info.rank, info.world_size, seed, decode=cfg.dali_decode,
        **_from_config(cfg, info, channels_last),
    )


def eval_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False) -> DALILoader:
    return build_dali_eval_loader(
        splits.val, cfg.image_size, batch, info.rank, info.world_size, **_from_config(cfg, info, channels_last)
    )
