"""What a data source is: the one object ``config`` (the ``data.dataset`` choices), the factory
(``build_splits``) and ``check`` (its listings) read, one per kind in ``sources.SOURCES``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fastmlgan.errors import ConfigError


@dataclass
class Listing:
    """Every image one split lists, present or not, with its labels' status (for ``data.check``)."""

    split: str
    paths: list[str]
    labelled: np.ndarray  # (N,) bool
    unknown_labels: list[str] = field(default_factory=list)
    read_images: Callable | None = None
    """Where the images are not files (shards): ``read_images()`` yields each one's bytes (None:
    unreadable) in ``paths`` order, adding what is wrong with the container to ``unknown_labels``."""


class Source:
    """One kind of data set (``--data.dataset KIND``).

    ``required``: the ``data.*`` options ``read`` needs (a missing one is a ``ConfigError`` naming
    it); ``holds_features``: the source gives feature vectors (a ``FeatureSet``, the ``mlp``
    backbone), not images; ``prepared_by_rank0``: ``read`` may create the data (the embedded
    generator), so under torchrun rank 0 reads first and the others after a barrier."""

    kind = ""
    required: tuple[str, ...] = ()
    holds_features = False
    prepared_by_rank0 = False
    streams = False  # the images are read as a stream (shards): the shards backend or the decoded-image cache

    def check_options(self, cfg) -> None:
        for key in self.required:
            if not getattr(cfg, key):
                raise ConfigError(f"data.dataset={self.kind} needs --data.{key}")

    def read(self, cfg) -> tuple:
        """(training split, evaluation split) of ``cfg`` (a ``DataConfig``)."""
        raise NotImplementedError

    def title(self, cfg) -> str:
        """The data set's name in results (the reproduction harness's tables)."""
        return self.kind

    def listings(self, cfg) -> list[Listing]:
        """Every image each split lists, for ``fastmlgan check``."""
        raise ConfigError(f"data.dataset={self.kind!r} has no image files to check")
