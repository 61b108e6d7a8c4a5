"""The fallback GPU data path for machines without DALI: nvJPEG decoding through
``torchvision.io.decode_jpeg(list, device="cuda")`` and the paper's five-crop (§4.1) as batched
tensor ops, behind the ``Loader`` interface of every backend (``data.types``).

Everything but the decoder is device-agnostic, so the tests run it on CPU tensors
(``device="cpu"``, where ``decode_jpeg`` uses libjpeg-turbo).

Per batch: a small thread pool reads the files (``prefetch`` batches ahead; on CPU it also
decodes and does the first resize, which release the GIL); JPEGs are decoded in one batched call,
other formats (PNG, ...) with PIL like the torch loader; each image is resized to base x base
(``TF.resize``, antialiased bilinear, the torch loader's kernel); the crops are cut per sample
and resized to ``image_size`` in one call per crop size (five at most); then normalised.

Same order, crops and bad-image policy as the torch loader: the shard of each rank comes from
``DistributedSampler`` (training; the last partial batch dropped) or ``range(rank, N, W)``
(evaluation); the crop of sample ``i`` in epoch ``e`` is ``crop_for(seed, e, i)``; an undecodable
image is replaced by the next decodable one with ``bad=True`` (``on_bad_image="skip"``) or stops
the run (``"error"``). On CPU the pixels equal the torch loader's; on a GPU the float resize
differs from the CPU uint8 kernel by rounding.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from fastmlgan.data.backends.plan import BatchPlan
from fastmlgan.data.geometry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ON_BAD_IMAGE,
    base_size,
    crop_for,
    crop_window,
    decode_rgb,
    resize,
    rotated_jpeg,
)
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.safeio import open_regular

logger = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
# The torch loader's float32 constants, as Python floats that are exactly those float32 values.
_MEAN = [float(v) for v in torch.tensor(IMAGENET_MEAN, dtype=torch.float32) * 255.0]
_STD = [float(v) for v in torch.tensor(IMAGENET_STD, dtype=torch.float32) * 255.0]


def _in_order(groups: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
    """Rows of each group's result (``members[k]`` -> ``result[k]``) stacked back in batch order.

    No index tensor: ``out[members] = result`` with a Python list builds the index on the host and
    copies it to the GPU (pageable memory: the host waits for the stream) once per group and batch,
    and that wait inside ``BatchStream.next`` counted GPU compute as data wait. Stacking views is
    one kernel and no transfer."""
    if len(groups) == 1 and groups[0][0] == list(range(n)):
        return groups[0][1]
    rows: list = [None] * n
    for members, result in groups:
        for k, i in enumerate(members):
            rows[i] = result[k]
    return torch.stack(rows)


def resize_all(images: list[torch.Tensor], side: int) -> torch.Tensor:
    """A list of uint8 (3, H_i, W_i) images -> uint8 (B, 3, side, side), one resize call per distinct size."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[tuple(image.shape[-2:])].append(i)
    done = [(members, resize(torch.stack([images[i] for i in members]), side)) for members in groups.values()]
    return _in_order(done, len(images))


def five_crop_batch(base_images: torch.Tensor, crops: torch.Tensor, image_size: int) -> torch.Tensor:
    """The training crops of a batch already resized to base x base.

    ``base_images`` uint8 (B, 3, base, base), ``crops`` int (B, 2) [position, size_index];
    returns uint8 (B, 3, image_size, image_size), one resize call per crop size in the batch."""
    base = base_size(image_size)
    if base_images.shape[-2:] != (base, base):
        raise ValueError(f"expected images of {base}x{base} for image_size {image_size}, got {tuple(base_images.shape)}")
    by_size: dict[int, list[int]] = defaultdict(list)
    crops_list = crops.tolist()  # a host tensor: the loaders make the crops on the CPU
    for i, (_, size_index) in enumerate(crops_list):
        by_size[size_index].append(i)
    done = []
    for members in by_size.values():
        patches = []
        for i in members:
            top, left, side = crop_window(crops_list[i][0], crops_list[i][1], image_size)
            patches.append(base_images[i, :, top : top + side, left : left + side])
        done.append((members, resize(torch.stack(patches), image_size)))
    return _in_order(done, len(base_images))


def normalize_batch(images: torch.Tensor, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> ImageNet-normalised ``dtype``, optionally in channels_last memory format.

    Channel by channel with Python-float constants (the float32 values of mean·255 and std·255, so
    the result equals the broadcast ``(x - mean) / std`` bit for bit): a ``torch.tensor(mean,
    device="cuda")`` per batch was a pageable host-to-device copy, on which the host waits for the
    GPU, inside ``BatchStream.next``."""
    out = images.to(torch.float32, copy=True)  # never normalise the caller's tensor in place
    for c in range(3):
        out[:, c].sub_(_MEAN[c]).div_(_STD[c])
    out = out.to(dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _read(path: str) -> bytes:
    with open_regular(path, "image file") as f:  # a FIFO or a device: a DataError, not a wait
        return f.read()


class TorchvisionLoader(BatchPlan):
    """Batches of a ``LabeledImages`` decoded with torchvision on ``device``: ``len``,
    ``set_epoch`` and iteration yielding ``{"image", "labels", "crop", "index", "bad"}``."""

    def __init__(
        self,
        images: LabeledImages,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        train: bool,
        seed: int = 0,
        device="cuda",
        num_threads: int = 4,
        on_bad_image: str = "skip",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        prefetch: int = 2,
        pixels_per_batch: int | None = None,
    ):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        super().__init__(len(images), batch_size, rank, world_size, train, seed)
        if image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "--data.backend torchvision-gpu needs a CUDA GPU (nvJPEG decoding) and none is available; "
                "use --data.backend torch (or auto)"
            )
        self.images = images
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.num_threads = max(1, int(num_threads))
        self.on_bad_image = on_bad_image
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.prefetch = max(1, int(prefetch))
        # Only the first K images of each training batch are decoded (the rest: labels, index, crop).
        self.pixels_per_batch = pixels_per_batch
        self._labels = torch.from_numpy(images.labels.astype(np.float32))
        self._pin = torch.cuda.is_available()
        self._known_bad: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None

    # -- decoding -------------------------------------------------------------------------------

    def load(self, index: int):
        """Pool task: the file's bytes, or on CPU the decoded image already resized for the batch."""
        try:
            data = _read(self.images.paths[index])
        except OSError as e:
            return DataError(f"{self.images.paths[index]}: cannot read image file: {e}")
        except DataError as e:
            return e
        if self.device.type != "cpu":
            return data
        try:
            return self._resize_first(self._decode_cpu(index, data))
        except DataError as e:
            return e

    def _decode_cpu(self, index: int, data: bytes) -> torch.Tensor:
        if data[:3] == JPEG_MAGIC:
            try:  # EXIF orientation as decode_rgb applies it
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                   apply_exif_orientation=True)
            except RuntimeError:
                pass  # PIL decides (and names the problem), as in the torch loader
        return decode_rgb(self.images.paths[index])

    def _resize_first(self, image: torch.Tensor) -> torch.Tensor:
        return resize(image, base_size(self.image_size) if self.train else self.image_size)

    def decode_gpu(self, indices: list[int], loaded: list) -> list:
        """Batched nvJPEG decode of the JPEGs among ``loaded`` (bytes or errors); others via PIL."""
        out: list = list(loaded)
        # nvJPEG cannot apply EXIF orientation (torchvision: "only on CPU"): such files go through decode_rgb.
        jpegs = [i for i, x in enumerate(loaded) if isinstance(x, bytes) and x[:3] == JPEG_MAGIC and not rotated_jpeg(x)]
        tensors = [torch.frombuffer(bytearray(loaded[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device) if tensors else []
        except RuntimeError:
            decoded = []
            for t in tensors:  # find the broken one(s)
                try:
                    decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(jpegs, decoded):
            out[i] = image
        for i, x in enumerate(out):
            if isinstance(x, (bytes, type(None))):  # not a JPEG, or nvJPEG failed: PIL decides
                try:
                    out[i] = decode_rgb(self.images.paths[indices[i]]).to(self.device, non_blocking=True)
                except DataError as e:
                    out[i] = e
        return [x if isinstance(x, DataError) else self._resize_first(x) for x in out]

    def _substitute(self, index: int, error: DataError) -> tuple[int, torch.Tensor]:
        """The torch loader's skip policy: the next decodable image (i+1, i+2, ... wrapping) stands in."""
        if self.on_bad_image == "error":
            raise error
        if index not in self._known_bad:
            self._known_bad.add(index)
            logger.warning("skipping undecodable image %s (%s)", self.images.paths[index], error)
        n = len(self.images)
        for step in range(1, n):
            j = (index + step) % n
            if j in self._known_bad:
                continue
            result = self.load(j)
            if self.device.type != "cpu" and not isinstance(result, DataError):
                result = self.decode_gpu([j], [result])[0]
            if not isinstance(result, DataError):
                return j, result
            self._known_bad.add(j)
            logger.warning("skipping undecodable image %s (%s)", self.images.paths[j], result)
        raise DataError(f"{self.images.name}: none of the {n} images can be decoded")

    def _assemble(self, indices: list[int], loaded: list) -> dict:
        """The batch of ``indices``; ``loaded`` holds the files of its first len(loaded) (all of
        them unless ``pixels_per_batch``), the others get no image."""
        decoded, rest = indices[: len(loaded)], indices[len(loaded) :]
        if self.device.type != "cpu":
            loaded = self.decode_gpu(decoded, loaded)
        used, bad, pixels = [], [], []
        for index, result in zip(decoded, loaded):
            if isinstance(result, DataError):
                j, result = self._substitute(index, result)
                used.append(j)
                bad.append(True)
            else:
                used.append(index)
                bad.append(False)
            pixels.append(result)
        used += rest
        bad += [False] * len(rest)
        first = torch.stack(pixels)
        if self.train:
            # The crop belongs to the requested slot (seed, epoch, index), substitute or not.
            crops = torch.tensor([crop_for(self.seed, self.epoch, i) for i in indices], dtype=torch.int64)
            images = five_crop_batch(first, crops[: len(decoded)], self.image_size)
        else:
            crops = torch.full((len(indices), 2), -1, dtype=torch.int64)
            images = first
        index = torch.tensor(used, dtype=torch.int64)
        return {
            "image": normalize_batch(images, self.dtype, self.channels_last),
            # Pinned, so that the trainer's non_blocking copy to the GPU does not stall the host.
            "labels": self._labels[index].pin_memory() if self._pin else self._labels[index],
            "crop": crops,
            "index": index,
            "bad": torch.tensor(bad, dtype=torch.bool),
        }

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="fastmlgan-read")
        batches = self.batches()
        pending: list[list[Future]] = []
        ahead = 0
        for b, indices in enumerate(batches):
            while ahead < len(batches) and ahead <= b + self.prefetch:
                decode = batches[ahead][: self.pixels_per_batch] if self.train else batches[ahead]
                pending.append([self._pool.submit(self.load, i) for i in decode])
                ahead += 1
            futures = pending.pop(0)
            yield self._assemble(indices, [f.result() for f in futures])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def build_torchvision_train_loader(
    images: LabeledImages,
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device="cuda",
    num_threads: int = 4,
    on_bad_image: str = "skip",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    pixels_per_batch: int | None = None,
) -> TorchvisionLoader:
    """Shuffled, sharded five-crop training batches (the torch loader's order and crops); last partial batch dropped."""
    return TorchvisionLoader(
        images, image_size, batch_size, rank, world_size, train=True, seed=seed, device=device,
        num_threads=num_threads, on_bad_image=on_bad_image, dtype=dtype, channels_last=channels_last,
        pixels_per_batch=pixels_per_batch,
    )


def build_torchvision_eval_loader(
    images: LabeledImages,
    image_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    device="cuda",
    num_threads: int = 4,
    on_bad_image: str = "skip",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> TorchvisionLoader:
    """Whole images resized to image_size, ``range(rank, N, W)`` in order, every image exactly once."""
    return TorchvisionLoader(
        images, image_size, batch_size, rank, world_size, train=False, device=device,
        num_threads=num_threads, on_bad_image=on_bad_image, dtype=dtype, channels_last=channels_last,
    )


def _from_config(cfg, info, channels_last: bool) -> dict:
    return dict(device=info.device, num_threads=cfg.num_threads, on_bad_image=cfg.on_bad_image, channels_last=channels_last)


def train_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False,
                             pixels_per_batch: int | None = None) -> TorchvisionLoader:
    """``factory.BACKENDS["torchvision-gpu"]``: the training loader of ``cfg`` (a ``DataConfig``)."""
    return build_torchvision_train_loader(
        splits.train, cfg.image_size, batch, info.rank, info.world_size, seed,
        pixels_per_batch=pixels_per_batch, **_from_config(cfg, info, channels_last),
    )


def eval_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False) -> TorchvisionLoader:
    return build_torchvision_eval_loader(
        splits.val, cfg.image_size, batch, info.rank, info.world_size, **_from_config(cfg, info, channels_last)
    )
