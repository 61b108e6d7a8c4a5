"""The CPU data path: decode with PIL, the paper's five-crop augmentation (§4.1) with torch ops,
and ``DataLoader`` factories that shard the data across ranks.

Reproducibility: the crop of sample ``i`` in epoch ``e`` comes from an RNG seeded by
``(seed, e, i)``, so it is the same whatever the number of workers or ranks. The epoch travels
with every index the sampler hands out (``(epoch, i)`` pairs), because persistent workers hold
their own copy of the dataset and would never see a ``set_epoch`` made in the main process.

Policy: in training the last partial batch of each epoch is dropped (``drop_last`` on both the
``DistributedSampler`` and the ``DataLoader``), so every step sees ``batch_size`` images per rank
and ranks take the same number of steps. Evaluation keeps every image exactly once.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fastmlgan.errors import ConfigError, DataError
from fastmlgan.loaders.base import LabeledImages
from fastmlgan.loaders.five_crop import NUM_POSITIONS, NUM_SIZES, base_size, crop_window
from fastmlgan.safeio import open_regular

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ON_BAD_IMAGE = ("skip", "error")


def decode_rgb(path) -> torch.Tensor:
    """Decode an image file to a uint8 (3, H, W) RGB tensor, as it is meant to be seen: EXIF
    orientation applied, 16-bit and float pixels scaled to 8 bits (``image_to_rgb8``). ``DataError``
    naming the file on failure; a FIFO or device is refused without being opened for a blocking
    read. Every backend's CPU decode, the cache build, ``predict`` and ``check`` come through here."""
    try:
        with open_regular(path, "image file") as f, Image.open(f) as img:
            img.load()  # decode now: a truncated file fails here, not later
            rgb = image_to_rgb8(img, path)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises OSError ("image file is truncated"), UnidentifiedImageError (an OSError),
        # SyntaxError or ValueError for broken files, depending on the format and the damage.
        raise DataError(f"{path}: cannot decode image: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


_ORIENTATION = 0x0112  # the EXIF tag


def rotated_jpeg(data: bytes) -> bool:
    """Whether JPEG bytes carry an EXIF orientation other than upright (nvJPEG cannot apply it)."""
    if b"Exif\x00\x00" not in data[:65536]:  # EXIF lives in an APP1 segment before the image data
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the headers only
            return img.getexif().get(_ORIENTATION, 1) != 1
    except Exception:  # noqa: BLE001 - unreadable headers: the decoder will say what is wrong
        return False
# PIL modes of 16-bit grey (PNG, TIFF); ``convert("RGB")`` clips them at 255 (a near-white image).
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def image_to_rgb8(img: Image.Image, path) -> np.ndarray:
    """(H, W, 3) uint8 of a loaded PIL image. EXIF orientation is applied (a phone photo stored
    sideways is turned upright, as viewers show it). 16-bit grey (PNG and TIFF) is scaled by
    255/65535; float pixels (mode F) in [0, 1] by 255; float pixels outside [0, 1] and 32-bit integer
    pixels (mode I, other than a PNG's 16 bits) have no known white level and are refused by name."""
    with contextlib.suppress(Exception):  # a damaged EXIF block: the pixels are still good, upright or not
        if img.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
            img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in _MODES_16BIT or (mode == "I" and img.format == "PNG"):
        grey = np.rint(np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8)
    elif mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise DataError(
                f"{path}: float pixels (PIL mode F) outside [0, 1] (min {np.nanmin(values):g}, max {np.nanmax(values):g}): "
                "their white level is unknown; convert the image to 8 or 16 bits"
            )
        grey = np.rint(values * 255.0).astype(np.uint8)
    elif mode in ("I", "I;32", "I;32B", "I;32L"):
        raise DataError(f"{path}: 32-bit integer pixels (PIL mode {mode}) have no known white level; convert the image to 8 or 16 bits")
    else:
        return np.array(img.convert("RGB"))
    return np.repeat(grey[:, :, None], 3, axis=2)


def _resize(image: torch.Tensor, side: int) -> torch.Tensor:
    # uint8 in, uint8 out: torchvision's antialiased bilinear path on uint8 matches PIL's
    # BILINEAR resize to within 1 grey level (measured), like the references that used PIL.
    return TF.resize(image, [side, side], interpolation=InterpolationMode.BILINEAR, antialias=True)


def five_crop(image: torch.Tensor, position: int, size_index: int, image_size: int) -> torch.Tensor:
    """The paper's training crop (§4.1): resize to base x base, crop, resize to image_size.

    ``image`` is uint8 (3, H, W); returns uint8 (3, image_size, image_size)."""
    top, left, side = crop_window(position, size_index, image_size)
    resized = _resize(image, base_size(image_size))
    patch = resized[:, top : top + side, left : left + side]
    return _resize(patch, image_size)


def eval_resize(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """The paper's test protocol (§4.1): the whole image resized to image_size x image_size."""
    return _resize(image, image_size)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) or (B, 3, H, W) in [0, 255] -> float32 normalised with ImageNet mean/std."""
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W) images, got shape {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(3, 1, 1) * 255.0
    return (images.to(torch.float32) - mean) / std


def crop_for(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """The (position, size index) of sample ``index`` in ``epoch``: uniform over the 25 pairs."""
    k = int(np.random.default_rng([seed, epoch, index]).integers(NUM_POSITIONS * NUM_SIZES))
    return k // NUM_SIZES, k % NUM_SIZES


class FiveCropDataset(Dataset):
    """A ``LabeledImages`` as training (random five-crop) or evaluation (whole-image resize) samples.

    ``dataset[i]`` (or ``dataset[(epoch, i)]``, as the loaders below ask for it) is a dict:
    ``image`` float32 (3, S, S) normalised, ``labels`` float32 (C,), ``crop`` int64
    [position, size_index] ([-1, -1] in evaluation), ``index`` int64 and ``bad`` bool.

    An undecodable image raises ``DataError`` with ``on_bad_image="error"``. With ``"skip"`` a
    warning names the file and the next decodable image (i+1, i+2, ... wrapping) stands in, with
    its own labels and ``index``, and ``bad=True`` so the trainer can count (or mask) it."""

    def __init__(self, images: LabeledImages, image_size: int, train: bool, seed: int = 0, on_bad_image: str = "skip"):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        if image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        self.images = images
        self.image_size = int(image_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.on_bad_image = on_bad_image
        self.epoch = 0
        self._known_bad: set[int] = set()  # per process: warn once and do not decode again

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _decode(self, index: int) -> tuple[int, torch.Tensor, bool]:
        """(index actually used, uint8 image, whether a substitute stands in for ``index``)."""
        n = len(self.images)
        for step in range(n):
            j = (index + step) % n
            if j in self._known_bad:
                continue
            try:
                return j, decode_rgb(self.images.paths[j]), step > 0
            except DataError as e:
                if self.on_bad_image == "error":
                    raise
                self._known_bad.add(j)
                logger.warning("skipping undecodable image %s (%s)", self.images.paths[j], e)
        raise DataError(f"{self.images.name}: none of the {n} images can be decoded")

    def __getitem__(self, item) -> dict:
        # item: index, (epoch, index), or (epoch, index, pixels) from a sampler with
        # ``pixels_per_batch``: pixels=False asks for everything but the image (not decoded).
        if not isinstance(item, tuple):
            item = (self.epoch, item)
        epoch, index = int(item[0]), int(item[1])
        if len(item) > 2 and not item[2]:
            position, size_index = crop_for(self.seed, epoch, index) if self.train else (-1, -1)
            return {
                "labels": torch.from_numpy(self.images.labels[index].astype(np.float32)),
                "crop": torch.tensor([position, size_index], dtype=torch.int64),
                "index": torch.tensor(index, dtype=torch.int64),
                "bad": torch.tensor(False),
            }
        used, image, substituted = self._decode(index)
        if self.train:
            # The crop belongs to the requested slot (seed, epoch, index), substitute or not.
            position, size_index = crop_for(self.seed, epoch, index)
            pixels = five_crop(image, position, size_index, self.image_size)
        else:
            position, size_index = -1, -1
            pixels = eval_resize(image, self.image_size)
        return {
            "image": normalize(pixels),
            "labels": torch.from_numpy(self.images.labels[used].astype(np.float32)),
            "crop": torch.tensor([position, size_index], dtype=torch.int64),
            "index": torch.tensor(used, dtype=torch.int64),
            "bad": torch.tensor(substituted),
        }


class _EpochTaggedSampler(Sampler):
    """Wraps a sampler so that it yields ``(epoch, index)``: the epoch reaches persistent workers.

    ``set_epoch(epoch, start_batch=k)`` starts the epoch's order at its k-th batch of
    ``batch_size`` (a resumed run continues where the interrupted one stopped)."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, pixels_per_batch: int | None = None):
        self.sampler = sampler
        self.batch_size = batch_size
        self.pixels_per_batch = pixels_per_batch
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = int(epoch)
        self.start = int(start_batch) * self.batch_size
        self.sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple]:
        epoch, start = self.epoch, self.start
        order = itertools.islice(self.sampler, start, None)
        if self.pixels_per_batch is None:
            return ((epoch, int(i)) for i in order)
        # Batches are consecutive runs of batch_size from the epoch's start (drop_last), so a
        # sample's place in its batch is its place in the epoch modulo batch_size.
        k, b = self.pixels_per_batch, self.batch_size
        return ((epoch, int(i), (start + n) % b < k) for n, i in enumerate(order))

    def __len__(self) -> int:
        return len(self.sampler)


class ShardSampler(Sampler):
    """Indices ``range(rank, N, world_size)``: every image once across ranks, no padding, no shuffle."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        _check_rank(rank, world_size)
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


class BatchPlan:
    """The batches of one rank in the torch loader's order, for loaders that assemble batches
    themselves (torchvision-gpu, cache): training shuffles with ``DistributedSampler`` (the last
    partial batch dropped, so every rank takes the same steps); evaluation takes
    ``range(rank, N, world_size)`` in order, last partial batch kept. ``set_epoch(epoch, start_batch)``
    reshuffles, and a pass starts at batch ``start_batch`` (a resumed run continues mid-epoch)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, train: bool, seed: int = 0):
        _check_rank(rank, world_size)
        _check_batch(batch_size)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.epoch = 0
        self.start_batch = 0
        if self.train:
            # range(n) stands in for the dataset: the sampler only needs its length.
            self.sampler = DistributedSampler(
                range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
            if len(self.sampler) < batch_size:
                raise ConfigError(
                    f"batch_size={batch_size} is larger than the {len(self.sampler)} training images each of the "
                    f"{world_size} rank(s) gets from {num_samples}: no full batch per epoch; lower the batch size"
                )
        else:
            self.sampler = ShardSampler(num_samples, rank, world_size)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Reshuffle and redraw the crops for ``epoch``; the next pass starts at its batch ``start_batch``."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)
        if self.train:
            self.sampler.set_epoch(self.epoch)

    def _batches(self) -> list[list[int]]:
        order = [int(i) for i in self.sampler]
        step = self.batch_size
        batches = [order[i : i + step] for i in range(0, len(order), step)]
        if self.train and batches and len(batches[-1]) < step:
            batches.pop()
        return batches[self.start_batch :]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size={world_size}), got rank={rank}")


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack a batch's fields; ``image`` only from the items that carry one (``pixels_per_batch``:
    they are the leading ones)."""
    out = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "image"}
    images = [item["image"] for item in items if "image" in item]
    if images:
        out["image"] = torch.stack(images)
    return out


def build_train_loader(
    dataset: FiveCropDataset,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    pixels_per_batch: int | None = None,
) -> DataLoader:
    """Shuffled, sharded training batches; the last partial batch of each epoch is dropped.

    Call ``set_epoch(loader, epoch)`` before each epoch: it reshuffles and redraws the crops.
    ``pixels_per_batch=K``: only the first K images of each batch are decoded (``image`` has K
    rows; every other field has ``batch_size``)."""
    _check_rank(rank, world_size)
    _check_batch(batch_size)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {len(sampler)} training images each of the "
            f"{world_size} rank(s) gets from {len(dataset)}: no full batch per epoch; lower the batch size"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_EpochTaggedSampler(sampler, batch_size, pixels_per_batch),
        num_workers=num_workers,
        drop_last=True,
        collate_fn=collate if pixels_per_batch is not None else None,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Every iter() draws the workers' base seed from this generator; without one it would come
        # from torch's global RNG, shifting the training noise (Gumbel samples, ε) by one draw per
        # epoch start, and a resumed run would draw its noise from another place in the stream.
        generator=torch.Generator().manual_seed(seed),
    )


def build_eval_loader(
    dataset: FiveCropDataset, batch_size: int, rank: int, world_size: int, num_workers: int = 0
) -> DataLoader:
    """Every image exactly once across ranks (``range(rank, N, world_size)``), in order, last partial batch kept."""
    _check_batch(batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),  # see build_train_loader: keep torch's global RNG untouched
    )


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Set the epoch of the loader's sampler (shuffle) and dataset (crops); its next iteration
    starts at batch ``start_batch`` of that epoch."""
    if not isinstance(loader, DataLoader) and hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch, start_batch=start_batch)  # the dali / torchvision-gpu / cache loaders
        return
    if isinstance(loader.sampler, _EpochTaggedSampler):
        loader.sampler.set_epoch(epoch, start_batch=start_batch)
    elif start_batch:
        raise ValueError("this loader cannot start an epoch mid-way")
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
