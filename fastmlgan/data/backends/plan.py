"""The order of batches, shared by every image backend: which samples each rank gets, in which
order, and where a (resumed) epoch starts.

Policy: in training the last partial batch of each epoch is dropped (``drop_last`` on the
``DistributedSampler``), so every step sees ``batch_size`` images per rank and ranks take the same
number of steps. Evaluation keeps every image exactly once (``range(rank, N, world_size)``).
``set_epoch(epoch, start_batch=k)`` reshuffles for ``epoch`` and starts it at its k-th batch (a
resumed run continues where the interrupted one stopped). The crop of sample ``i`` in epoch ``e``
is ``geometry.crop_for(seed, e, i)`` whatever the backend, worker or rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler

from fastmlgan.errors import ConfigError


class EpochTaggedSampler(Sampler):
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
        check_rank(rank, world_size)
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
        check_rank(rank, world_size)
        check_batch(batch_size)
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

    def batches(self) -> list[list[int]]:
        order = [int(i) for i in self.sampler]
        step = self.batch_size
        batches = [order[i : i + step] for i in range(0, len(order), step)]
        if self.train and batches and len(batches[-1]) < step:
            batches.pop()
        return batches[self.start_batch :]


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size={world_size}), got rank={rank}")


def check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
