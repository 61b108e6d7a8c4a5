"""Data sources: files on disk -> labelled lists (``LabeledImages``, or ``FeatureSet`` for feature
vectors). One module per source, one entry per kind in ``SOURCES``: ``config`` takes the
``data.dataset`` choices from it, the factory reads a split pair through it
(``factory.build_splits``) and ``fastmlgan check`` its listings. A new source is one file with a
``Source`` subclass and one line here."""

from __future__ import annotations

from fastmlgan.data.sources.base import Listing, Source
from fastmlgan.data.sources.coco import CocoSource
from fastmlgan.data.sources.embedded import EmbeddedSource
from fastmlgan.data.sources.features import FeaturesSource
from fastmlgan.data.sources.labelsets import LabelsetsSource
from fastmlgan.data.sources.listfile import ListSource
from fastmlgan.data.sources.nuswide import NuswideSource
from fastmlgan.data.sources.shards import ShardsSource

# The order is the order of the choices in --help and in error messages.
SOURCES: dict[str, Source] = {
    source.kind: source
    for source in (EmbeddedSource(), CocoSource(), NuswideSource(), ListSource(), FeaturesSource(), LabelsetsSource(),
                   ShardsSource())
}

__all__ = ["SOURCES", "Listing", "Source"]
