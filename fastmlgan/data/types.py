"""What flows through ``fastmlgan.data``: the labelled-image lists a source reads
(``LabeledImages``; feature data: ``sources.tables.FeatureSet``), the two splits of a run
(``Splits``), the keys of a batch and the ``Loader`` protocol every backend implements."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

BATCH_KEYS = ("image", "labels", "index", "crop", "bad")
"""A batch is a dict of tensors: ``image`` float32 (B, 3, S, S) normalised, or uint8 (B, 3, S, S)
channels_last for the consumer to normalise on its device (the cache loader's ``output="uint8"``;
``scoring.inputs_to_device`` does it), or (B, D) feature vectors; ``labels`` float32 (B, C) multi-hot, ``index`` int64 (B,) the sample actually served,
``crop`` int64 (B, 2) [position, size index] of the five-crop ([-1, -1] in evaluation), ``bad``
bool (B,) a stand-in for an undecodable image. With ``pixels_per_batch=K`` ``image`` has K rows."""


@dataclass
class LabeledImages:
    """A multi-label image set: one image path and one multi-hot row per image.

    ``labels[i, c] == 1`` when image ``i`` carries class ``c`` (``class_names[c]``).
    """

    name: str
    paths: list[str]
    labels: np.ndarray  # (N, C) uint8
    class_names: list[str]
    num_dropped_unlabeled: int = 0
    """Images in the source that had no label and were dropped (the paper's protocol)."""
    missing: list[str] = field(default_factory=list)
    """Files listed by the source but absent on disk (not in ``paths``)."""

    def __post_init__(self) -> None:
        self.labels = np.ascontiguousarray(self.labels, dtype=np.uint8)
        if self.labels.ndim != 2 or self.labels.shape[0] != len(self.paths):
            raise ValueError(
                f"{self.name}: labels must have shape (num_images={len(self.paths)}, num_classes), "
                f"got {self.labels.shape}"
            )
        if self.labels.shape[1] != len(self.class_names):
            raise ValueError(
                f"{self.name}: {self.labels.shape[1]} label columns but {len(self.class_names)} class names"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices, name: str | None = None) -> LabeledImages:
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            name=name or self.name,
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            missing=list(self.missing),
        )


@dataclass
class Splits:
    """The training and evaluation splits of a run (``factory.build_splits``)."""

    train: Any  # LabeledImages, or a FeatureSet for feature data
    val: Any
    # Feature data: the training split's standardisation, fitted once (training rows only).
    standardizer: Any = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


@runtime_checkable
class Loader(Protocol):
    """What every backend's loader is (``factory.BACKENDS``): iterating yields the batches of one
    epoch (``BATCH_KEYS``) for this rank; ``set_epoch(epoch, start_batch)`` reshuffles and redraws
    the crops for ``epoch`` and starts its next pass at batch ``start_batch`` (a resumed run);
    ``close`` releases threads or pipelines."""

    def __iter__(self) -> Iterator[dict]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def close(self) -> None: ...
