"""The training data as the trainer sees it: an endless, resumable stream of loader batches, and
the layout of one phase-2 iteration inside one loader batch.

Phase 2 (§4.1) draws, per G update, ``gan.d_steps`` (3) D updates of three independently drawn
batches each (matched, generated, mismatched pairs) and one batch for the G update: 10 batches of
B. They do not depend on G or D, so the loader delivers them as ONE batch of 10·B, prefetched like
any other batch, and the trainer cuts it into its parts. A shuffled stream cut into consecutive
slices is the same draw as consecutive batches of that stream, so the pair kinds stay independent
draws, exactly as with ten separate batches.

The slices are ordered so that the images whose pixels phase 2 needs come first: the G update's
and the generated pairs' (G runs on them). With a frozen-feature cache (``--gan.feature_cache``),
the matched and mismatched pairs need only their features, looked up by sample index and crop, so
the loader decodes the first (1 + d_steps)·B images of each batch and skips the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastmlgan.errors import ConfigError


@dataclass(frozen=True)
class IterationLayout:
    """Where each part of a phase-2 iteration sits in its loader batch (rows, per rank)."""

    batch_size: int  # B: per rank and pair kind
    d_steps: int
    negative_sampling: bool

    @property
    def kinds(self) -> int:
        """Pair kinds per D update: matched, generated (and mismatched with negative sampling)."""
        return 3 if self.negative_sampling else 2

    @property
    def num_batches(self) -> int:
        """Batches of B drawn per G update: 10 with §4.1's settings."""
        return 1 + self.d_steps * self.kinds

    @property
    def size(self) -> int:
        """Rows of the loader batch of one iteration."""
        return self.num_batches * self.batch_size

    def check_fits(self, num_train: int, world_size: int, held_out: str = "") -> None:
        """``ConfigError`` when a rank's share of the training split (``DistributedSampler``,
        drop_last: floor(N / W)) holds no whole phase-2 iteration, at start-up rather than after
        phase 1. ``held_out``: what a validation split took from it, e.g. "32 held out by
        --data.val_fraction 0.2" (named in the message, with the option among the remedies)."""
        per_rank = num_train // world_size
        if per_rank < self.size:
            kinds = "3 pair kinds" if self.negative_sampling else "2 pair kinds"
            fits = per_rank // self.num_batches * world_size
            raise ConfigError(
                f"phase 2 draws {self.num_batches} batches per G update (1 + --gan.d_steps {self.d_steps} x {kinds}): "
                f"{self.size} images per rank with --data.batch_size {self.batch_size * world_size}, but each of the "
                f"{world_size} rank(s) gets {per_rank} of the {num_train} training images"
                + (f" ({held_out})" if held_out else "") + "; use "
                + (f"--data.batch_size {fits} or less, " if fits else "") + "fewer --gan.d_steps, "
                + ("a smaller --data.val_fraction, " if held_out else "") + "or --train.gan_epochs 0"
            )

    @property
    def pixel_rows(self) -> int:
        """Leading rows whose images G sees: the G update's and the generated pairs'."""
        return (1 + self.d_steps) * self.batch_size

    def _rows(self, block: int) -> slice:
        return slice(block * self.batch_size, (block + 1) * self.batch_size)

    def generator_rows(self) -> slice:
        return self._rows(0)

    def generated_rows(self, step: int | None = None) -> slice:
        """The generated pairs of D update ``step``, or of all D updates (None)."""
        if step is None:
            return slice(self.batch_size, (1 + self.d_steps) * self.batch_size)
        return self._rows(1 + step)

    def matched_rows(self, step: int) -> slice:
        return self._rows(1 + self.d_steps + step)

    def mismatched_rows(self, step: int) -> slice:
        if not self.negative_sampling:
            raise ValueError("no mismatched pairs without negative sampling")
        return self._rows(1 + 2 * self.d_steps + step)


class BatchStream:
    """An endless stream of training batches across data epochs.

    Its position, (data epoch, batches consumed in it), is part of every checkpoint: a resumed run
    continues with the batch an uninterrupted run would have drawn next. Counts the wall time spent
    waiting for data and the images the loader substituted because they could not be decoded.
    """

    def __init__(self, loader, data_epoch: int = 0, position: int = 0) -> None:
        self.loader = loader
        self.data_epoch = data_epoch
        self.position = position  # batches of ``data_epoch`` already handed out
        self._it: Iterator | None = None
        self.wait_s = 0.0
        self.num_bad = 0

    def __len__(self) -> int:
        return len(self.loader)

    def next(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        while True:
            if self._it is None:
                if self.position >= len(self.loader):
                    self.data_epoch, self.position = self.data_epoch + 1, 0
                self.loader.set_epoch(self.data_epoch, start_batch=self.position)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                break
            except StopIteration:
                self._it = None
                self.data_epoch, self.position = self.data_epoch + 1, 0
        self.position += 1
        if "bad" in batch:
            self.num_bad += int(batch["bad"].sum())
        self.wait_s += time.perf_counter() - t0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"data_epoch": self.data_epoch, "position": self.position}

    def close(self) -> None:
        self._it = None
        self.loader.close()
