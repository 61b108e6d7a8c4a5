"""Bytes on disk -> batches, one way down: ``sources`` (files -> labelled lists; the ``SOURCES``
table) -> ``types`` (splits, batch keys, the ``Loader`` protocol) -> ``geometry`` (decode, five-crop,
normalise) -> ``backends`` (torch, torchvision-gpu, DALI, feature vectors; ``plan``: batch order)
and ``imagecache`` (the decoded-image cache: format, build, decode, loader) -> ``factory`` (config
-> splits -> this rank's loaders; the ``BACKENDS`` table) -> ``stream`` (the trainer's resumable
stream of batches). ``check`` scans a data set before training. Nothing is imported here.
"""
