"""The torch backend: decode with PIL on CPU worker processes, the paper's five-crop augmentation
(§4.1) with torch ops, and ``DataLoader``s that shard the data across ranks.

Reproducibility: the crop of sample ``i`` in epoch ``e`` comes from an RNG seeded by
``(seed, e, i)``, so it is the same whatever the number of workers or ranks. The epoch travels
with every index the sampler hands out (``(epoch, i)`` pairs, ``plan.EpochTaggedSampler``),
because persistent workers hold their own copy of the dataset and would never see a
``set_epoch`` made in the main process. Batch order and the last-batch policy: ``plan``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from fastmlgan.data.backends.plan import EpochTaggedSampler, ShardSampler, check_batch, check_rank
from fastmlgan.data.geometry import ON_BAD_IMAGE, crop_for, decode_rgb, eval_resize, five_crop, normalize
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


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

    def decode(self, index: int) -> tuple[int, torch.Tensor, bool]:
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
        used, image, substituted = self.decode(index)
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


class ShardedDataLoader(DataLoader):
    """A ``DataLoader`` with the ``Loader`` protocol (``data.types``): ``set_epoch`` and ``close``."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Set the epoch of the sampler (shuffle) and of the dataset (crops); the next iteration
        starts at batch ``start_batch`` of that epoch (training loaders only)."""
        if isinstance(self.sampler, EpochTaggedSampler):
            self.sampler.set_epoch(epoch, start_batch=start_batch)
        elif start_batch:
            raise ValueError("this loader cannot start an epoch mid-way")
        self.dataset.set_epoch(epoch)

    def close(self) -> None:
        """Nothing to release: worker processes end with their iterator."""


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
) -> ShardedDataLoader:
    """Shuffled, sharded training batches; the last partial batch of each epoch is dropped.

    Call ``loader.set_epoch(epoch)`` before each epoch: it reshuffles and redraws the crops.
    ``pixels_per_batch=K``: only the first K images of each batch are decoded (``image`` has K
    rows; every other field has ``batch_size``)."""
    check_rank(rank, world_size)
    check_batch(batch_size)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {len(sampler)} training images each of the "
            f"{world_size} rank(s) gets from {len(dataset)}: no full batch per epoch; lower the batch size"
        )
    return ShardedDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochTaggedSampler(sampler, batch_size, pixels_per_batch),
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
) -> ShardedDataLoader:
    """Every image exactly once across ranks (``range(rank, N, world_size)``), in order, last partial batch kept."""
    check_batch(batch_size)
    return ShardedDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),  # see build_train_loader: keep torch's global RNG untouched
    )


def train_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False,
                             pixels_per_batch: int | None = None) -> ShardedDataLoader:
    """``factory.BACKENDS["torch"]``: the training loader of ``cfg`` (a ``DataConfig``) for this rank."""
    dataset = FiveCropDataset(splits.train, cfg.image_size, train=True, seed=seed, on_bad_image=cfg.on_bad_image)
    return build_train_loader(dataset, batch, info.rank, info.world_size, seed, cfg.num_workers, pixels_per_batch)


def eval_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False) -> ShardedDataLoader:
    """``factory.BACKENDS["torch"]``: the evaluation loader; ``channels_last`` is left to the caller."""
    dataset = FiveCropDataset(splits.val, cfg.image_size, train=False, seed=seed, on_bad_image=cfg.on_bad_image)
    return build_eval_loader(dataset, batch, info.rank, info.world_size, cfg.num_workers)
