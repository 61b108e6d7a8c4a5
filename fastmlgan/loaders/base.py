"""The one interface every dataset reader returns and every loader backend consumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np


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
