"""Config -> splits -> this rank's loaders: the one place that turns ``--data.*`` into batches.

``build_splits`` reads the training and evaluation splits through the source of
``--data.dataset`` (``sources.SOURCES``); ``build_loaders`` picks the backend of
``--data.backend`` (``resolve_backend``) and builds this rank's loaders through ``BACKENDS``, a
name -> (training loader, evaluation loader) table of the backends' own builders. A new backend
is one module with its two builders and one entry here.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmlgan.config import DataConfig
from fastmlgan.data.backends import CHOICES, dali, shards, torch_dataloader, torchvision_gpu, vectors
from fastmlgan.data.imagecache import loader as cache_loader
from fastmlgan.data.imagecache.build import find_current
from fastmlgan.data.imagecache.format import Geometry, resolve_cache_dir
from fastmlgan.data.sources import SOURCES
from fastmlgan.data.types import Splits
from fastmlgan.distributed import DistInfo, barrier, broadcast_object
from fastmlgan.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """A loader backend: ``train(cfg, splits, info, seed, batch, channels_last, pixels_per_batch)``
    and ``eval(cfg, splits, info, seed, batch, channels_last)`` build this rank's loaders (each a
    ``types.Loader``)."""

    train: Callable
    eval: Callable
    uint8: bool = False
    """Whether its builders take ``output="uint8"`` (pixels normalised by the consumer, on its device)."""

    def output(self, requested: str) -> dict:
        """The builders' ``output`` argument: uint8 only where the backend has it (else float)."""
        return {"output": requested} if self.uint8 else {}


BACKENDS: dict[str, Backend] = {
    "torch": Backend(torch_dataloader.train_loader_from_config, torch_dataloader.eval_loader_from_config),
    "torchvision-gpu": Backend(torchvision_gpu.train_loader_from_config, torchvision_gpu.eval_loader_from_config),
    "dali": Backend(dali.train_loader_from_config, dali.eval_loader_from_config),
    "cache": Backend(cache_loader.train_loader_from_config, cache_loader.eval_loader_from_config, uint8=True),
    # Not --data.backend choices: the loader of every source that holds feature vectors, and of
    # shards (data.dataset=shards with --data.backend auto or torch).
    "shards": Backend(shards.train_loader_from_config, shards.eval_loader_from_config),
    # Not a --data.backend choice: the loader of every source that holds feature vectors.
    "features": Backend(vectors.train_loader_from_config, vectors.eval_loader_from_config),
}


def build_splits(cfg: DataConfig, info: DistInfo) -> Splits:
    """Read (and for the embedded set, generate on rank 0 first) the training and evaluation splits."""
    source = SOURCES[cfg.dataset]
    source.check_options(cfg)
    if source.prepared_by_rank0:
        # Rank 0 writes the data (when missing); the others wait, then find it complete.
        pair = source.read(cfg) if info.is_main else None
        barrier()
        train, val = pair if pair is not None else source.read(cfg)
    else:
        train, val = source.read(cfg)
    if train.class_names != val.class_names:
        raise DataError(
            f"the training and evaluation splits have different classes "
            f"({len(train.class_names)} vs {len(val.class_names)}); they must share one category list"
        )
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"empty split: {len(train)} training and {len(val)} evaluation images")
    if info.is_main:
        logger.info(
            "data: %d train samples (%d unlabelled dropped, %d missing), %d val samples (%d dropped, %d missing), %d classes",
            len(train), getattr(train, "num_dropped_unlabeled", 0), len(getattr(train, "missing", [])),
            len(val), getattr(val, "num_dropped_unlabeled", 0), len(getattr(val, "missing", [])), train.num_classes,
        )
    return Splits(train, val)


def per_rank_batch(global_batch: int, info: DistInfo, option: str) -> int:
    if global_batch % info.world_size:
        raise ConfigError(
            f"--{option} {global_batch} is not divisible by the world size {info.world_size}; "
            f"use a multiple of {info.world_size}"
        )
    return global_batch // info.world_size


def build_loaders(cfg: DataConfig, splits: Splits, info: DistInfo, seed: int, channels_last: bool = False,
                  output: str = "float"):
    """(train loader, eval loader) for this rank. ``channels_last``: the dali and torchvision-gpu
    backends deliver images in that memory format (the torch backend leaves it to the caller).
    ``output="uint8"``: the backends that can (the cache) hand over uint8 pixels for the consumer
    to normalise on its device (``scoring.inputs_to_device``); the others float32, normalised."""
    batch = per_rank_batch(cfg.batch_size, info, "data.batch_size")
    backend = data_backend(cfg, splits, info)
    train = build_train_loader(cfg, splits, info, seed, batch, channels_last, backend=backend, output=output)
    return train, build_eval_loader(cfg, splits, info, seed, channels_last, backend=backend, output=output)


def build_train_loader(
    cfg: DataConfig,
    splits: Splits,
    info: DistInfo,
    seed: int,
    batch: int,
    channels_last: bool = False,
    pixels_per_batch: int | None = None,
    backend: str | None = None,
    output: str = "float",
):
    """This rank's training loader with ``batch`` samples per batch (phase 2 asks for a whole
    iteration's batches at once). ``pixels_per_batch=K``: only the first K images of each batch
    are decoded where the backend can skip decoding (torch, torchvision-gpu, cache); the others
    carry labels, index and crop only. DALI decodes them all; the trainer ignores the extra rows.
    ``backend``: ``data_backend``'s answer (computed here when None; a collective under torchrun)."""
    if len(splits.train) < batch * info.world_size:
        raise ConfigError(
            f"--data.batch_size {cfg.batch_size} is larger than the training set ({len(splits.train)} images)"
        )
    backend = backend or data_backend(cfg, splits, info)
    return BACKENDS[backend].train(cfg, splits, info, seed, batch, channels_last, pixels_per_batch,
                                   **BACKENDS[backend].output(output))


def build_eval_loader(
    cfg: DataConfig, splits: Splits, info: DistInfo, seed: int, channels_last: bool = False, backend: str | None = None,
    output: str = "float",
):
    """This rank's evaluation loader: every image of ``splits.val`` once across ranks."""
    batch = per_rank_batch(cfg.eval_batch_size, info, "data.eval_batch_size")
    backend = backend or data_backend(cfg, splits, info, train=False)
    return BACKENDS[backend].eval(cfg, splits, info, seed, batch, channels_last, **BACKENDS[backend].output(output))


def build_iteration_loader(cfg: DataConfig, splits: Splits, info: DistInfo, seed: int, train_loader, batch: int,
                           channels_last: bool = False, pixels_per_batch: int | None = None):
    """Phase 2's loader, each batch one whole iteration of ``batch`` samples: like
    ``build_train_loader``, except that a cache loader hands out its own cache (and GPU copy:
    ``--data.cache_device cuda`` never holds the training cache twice)."""
    if isinstance(train_loader, cache_loader.CacheLoader):
        return train_loader.with_batch(batch, pixels_per_batch=pixels_per_batch)
    return build_train_loader(cfg, splits, info, seed, batch, channels_last, pixels_per_batch=pixels_per_batch)


def resolve_backend(requested: str, device, log: bool = True, cached: str = "") -> str:
    """The loader backend actually used: ``auto`` takes the decoded-image cache when ``cached``
    (why: current caches of both splits, or room to build them) is given, else DALI on a GPU when it is
    installed, else torchvision-gpu on a GPU, else torch. ``dali`` without a GPU runs DALI's CPU
    pipeline; ``torchvision-gpu`` without a GPU is an error."""
    if requested not in CHOICES:
        raise ConfigError(f"--data.backend: {requested!r} is not one of {', '.join(CHOICES)}")
    on_gpu = torch.device(device).type == "cuda"
    if requested == "auto":
        if cached:
            backend, reason = "cache", cached
        elif on_gpu:
            backend = "dali" if dali.dali_available() else "torchvision-gpu"
            reason = "GPU, DALI installed" if backend == "dali" else "GPU, DALI not installed (pip install '.[dali]')"
        else:
            backend, reason = "torch", "no GPU"
        if log:
            logger.info("data.backend auto -> %s (%s)", backend, reason)
        return backend
    if requested == "torchvision-gpu" and not on_gpu:
        raise ConfigError(
            "--data.backend torchvision-gpu decodes with nvJPEG and needs a CUDA GPU, but this process runs on "
            f"{device}; use --data.backend torch (or auto, or dali for DALI's CPU pipeline)"
        )
    if requested == "dali" and not dali.dali_available():
        dali.require_dali()  # raises with the install command
    if log:
        logger.info("data.backend %s%s", requested, " (CPU pipeline: no GPU)" if requested == "dali" and not on_gpu else "")
    return requested


def data_backend(cfg: DataConfig, splits: Splits, info: DistInfo, train: bool = True) -> str:
    """The loader backend of ``--data.backend`` for these splits (``auto``'s pick logged once).
    Under torchrun a collective: rank 0 decides whether current decoded-image caches exist.
    Feature data always goes through the ``features`` backend."""
    holds_features = SOURCES[cfg.dataset].holds_features
    if cfg.backend == "cache" and holds_features:
        raise ConfigError(
            f"--data.backend cache stores decoded images, but data.dataset={cfg.dataset} holds feature vectors: "
            "use --data.backend auto"
        )
    streams = SOURCES[cfg.dataset].streams
    # A stream's caches are built by `fastmlgan cache build`, never on first use.
    cached = _cache_decision(cfg, splits, info, may_build=not streams) if cfg.backend == "auto" and not holds_features else ""
    if streams and not (cfg.backend == "cache" or cached):
        return streamed_backend(cfg, info, train)
    backend = resolve_backend(cfg.backend, info.device, log=info.is_main and train, cached=cached)
    return "features" if holds_features else backend


def streamed_backend(cfg: DataConfig, info: DistInfo, train: bool) -> str:
    """The loader of a source read as a stream (shards): its own CPU-thread loader, for ``auto``
    (without current caches) and ``torch``; the decoded-image cache with ``cache``."""
    if cfg.backend not in ("auto", "torch"):
        raise ConfigError(
            f"--data.backend {cfg.backend} reads image files; data.dataset={cfg.dataset} streams its images: use "
            "--data.backend auto or torch (the shards loader, CPU threads) or cache (fastmlgan cache build first)"
        )
    if info.is_main and train:
        logger.info("data.backend %s -> shards (data.dataset=%s: the shards loader, %d CPU threads)",
                    cfg.backend, cfg.dataset, cfg.num_threads)
    return "shards"


def free_disk_bytes(directory: Path) -> int:
    """Free bytes on the file system of ``directory`` (or of its nearest existing parent)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def cache_bytes(images, geometry: Geometry) -> int:
    """The pixel rows of a cache: what its size comes to (the other sections are a few bytes a row)."""
    return len(images) * geometry.side * geometry.side * 3


def worth_building(needed: int, free: int, share: float, where: str) -> tuple[bool, str]:
    """(build?, why): ``auto`` builds the missing caches when they take at most ``share`` of what
    is free (``--data.cache_auto_share``): a cache pays from its second epoch on (one decode
    instead of one per epoch), but a disk it fills stops the run."""
    gib = 2**30
    fits = needed <= share * free
    return fits, (f"{needed / gib:.2f} GiB of decoded images, {'within' if fits else 'more than'} "
                  f"{share:.0%} of the {free / gib:.2f} GiB free {where} (--data.cache_auto_share)")


def _cache_decision(cfg: DataConfig, splits: Splits, info: DistInfo, may_build: bool = True) -> str:
    """For ``auto``: why the decoded-image cache is used (current caches of both splits, or room
    to build the missing ones on first use), else ''. Rank 0's answer on every rank, so that all
    ranks pick one backend."""
    found = ""
    if info.is_main:
        directory = resolve_cache_dir(cfg.cache_dir)
        missing, reasons = [], []
        for images, purpose in ((splits.train, "train"), (splits.val, "eval")):
            geometry = Geometry(purpose, cfg.image_size)
            path, why = find_current(images, geometry, directory)
            if path is None:
                missing.append(cache_bytes(images, geometry))
                reasons.append(why)
        if not missing:
            found = f"current caches of both splits in {directory}"
        elif any("no cache" not in r for r in reasons):
            # A cache exists but cannot be used: say so, never use it silently (nor rebuild it unasked).
            logger.info("data.backend auto: not using the decoded-image cache: %s", "; ".join(reasons))
        elif cfg.cache_auto_share > 0 and may_build:
            build, why = worth_building(sum(missing), free_disk_bytes(directory), cfg.cache_auto_share, f"in {directory}")
            if build and cfg.cache_device == "cuda" and info.device.type == "cuda":
                train_bytes = cache_bytes(splits.train, Geometry("train", cfg.image_size))
                free, _ = cache_loader.usable_gpu_memory(info.device)
                build, gpu_why = worth_building(train_bytes, free, cfg.cache_auto_share, f"on {info.device}")
                why += "; " + gpu_why
            if build:
                found = f"building the decoded-image caches on first use: {why}"
            else:
                logger.info("data.backend auto: not building the decoded-image cache: %s", why)
    return broadcast_object(found, info)
