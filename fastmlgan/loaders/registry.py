"""From ``DataConfig`` to datasets and loaders: the one place that knows every dataset kind."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastmlgan.config import FEATURE_DATASETS, DataConfig
from fastmlgan.distributed import DistInfo, barrier
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.loaders.base import LabeledImages

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    train: LabeledImages
    val: LabeledImages
    # Feature data: the training split's standardisation, fitted once (training rows only).
    standardizer: Any = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def build_splits(cfg: DataConfig, info: DistInfo) -> Splits:
    """Read (and for the embedded set, generate on rank 0 first) the training and evaluation splits."""
    from fastmlgan.loaders.coco import read_coco

    if cfg.dataset == "embedded":
        from fastmlgan.loaders import embedded

        params = dict(
            num_train=cfg.embedded_num_train,
            num_val=cfg.embedded_num_val,
            image_size=cfg.embedded_image_size,
            seed=cfg.embedded_seed,
        )
        # Rank 0 writes the dataset (when missing); the others wait, then find it complete.
        paths = embedded.ensure(cfg.root, **params) if info.is_main else None
        barrier()
        if paths is None:
            paths = embedded.ensure(cfg.root, **params)
        train = read_coco(paths.train_ann, paths.train_images, cfg.drop_unlabeled, name="embedded-train")
        val = read_coco(paths.val_ann, paths.val_images, cfg.drop_unlabeled, name="embedded-val")
    elif cfg.dataset == "features":
        from fastmlgan.loaders.features import load_feature_dataset

        for key in ("features_train", "features_test"):
            if not getattr(cfg, key):
                raise ConfigError(f"data.dataset=features needs --data.{key}")
        train, val = load_feature_dataset(cfg.features_train, cfg.features_test, xml=cfg.features_xml or None)
    elif cfg.dataset == "labelsets":
        from fastmlgan.loaders.labelsets import load_labelsets, noise_model

        for key in ("labelsets_train", "labelsets_test"):
            if not getattr(cfg, key):
                raise ConfigError(f"data.dataset=labelsets needs --data.{key}")
        train, val = load_labelsets(cfg.labelsets_train, cfg.labelsets_test, cfg.labelsets_names or None, noise_model(cfg))
    elif cfg.dataset == "coco":
        for key in ("train_annotations", "train_images", "val_annotations", "val_images"):
            if not getattr(cfg, key):
                raise ConfigError(f"data.dataset=coco needs --data.{key}")
        outside = cfg.allow_outside_root
        train = read_coco(cfg.train_annotations, cfg.train_images, cfg.drop_unlabeled, "train", outside)
        val = read_coco(cfg.val_annotations, cfg.val_images, cfg.drop_unlabeled, "val", outside)
    elif cfg.dataset == "nuswide":
        from fastmlgan.loaders.nuswide import read_nuswide

        if not cfg.nuswide_root:
            raise ConfigError("data.dataset=nuswide needs --data.nuswide_root")
        train, val = read_nuswide(
            cfg.nuswide_root, cfg.nuswide_split, cfg.nuswide_num_train, cfg.nuswide_seed,
            image_root=cfg.image_root or None, drop_unlabeled=cfg.drop_unlabeled, allow_outside_root=cfg.allow_outside_root,
        )
    elif cfg.dataset == "list":
        from fastmlgan.loaders.listfile import read_label_names, read_list

        for key in ("list_train", "list_val", "label_names"):
            if not getattr(cfg, key):
                raise ConfigError(f"data.dataset=list needs --data.{key}")
        names = read_label_names(cfg.label_names)
        root, outside = cfg.image_root or None, cfg.allow_outside_root
        train = read_list(cfg.list_train, names, root, cfg.drop_unlabeled, name="train", allow_outside_root=outside)
        val = read_list(cfg.list_val, names, root, cfg.drop_unlabeled, name="val", allow_outside_root=outside)
    else:
        raise ConfigError(f"data.dataset={cfg.dataset!r} has no image reader")
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


def build_loaders(cfg: DataConfig, splits: Splits, info: DistInfo, seed: int, channels_last: bool = False):
    """(train loader, eval loader) for this rank. ``channels_last``: the dali and torchvision-gpu
    backends deliver images in that memory format (the torch backend leaves it to the caller)."""
    batch = per_rank_batch(cfg.batch_size, info, "data.batch_size")
    backend = data_backend(cfg, splits, info)
    train = build_train_loader(cfg, splits, info, seed, batch, channels_last, backend=backend)
    return train, build_eval_loader(cfg, splits, info, seed, channels_last, backend=backend)


def build_train_loader(
    cfg: DataConfig,
    splits: Splits,
    info: DistInfo,
    seed: int,
    batch: int,
    channels_last: bool = False,
    pixels_per_batch: int | None = None,
    backend: str | None = None,
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
    if cfg.dataset in FEATURE_DATASETS:
        from fastmlgan.loaders.features import FeatureDataset
        from fastmlgan.loaders.torch_loader import build_train_loader as torch_train_loader

        # Standardised with statistics of the training split only; in-memory tensors: worker
        # processes would only add overhead.
        return torch_train_loader(FeatureDataset(splits.train, _standardizer(splits)), batch, info.rank, info.world_size, seed, 0)
    backend = backend or data_backend(cfg, splits, info)
    if backend == "cache":
        from fastmlgan.loaders.cache_loader import CacheLoader

        return CacheLoader(_cache(cfg, splits.train, "train", info), cfg.image_size, batch, info.rank, info.world_size,
                           train=True, seed=seed, pixels_per_batch=pixels_per_batch, **_cache_common(cfg, info, channels_last))
    if backend == "dali":
        from fastmlgan.loaders.dali import build_dali_train_loader

        _log_dali_bad_image_policy(cfg, info)
        return build_dali_train_loader(
            splits.train, cfg.image_size, batch, info.rank, info.world_size, seed, decode=cfg.dali_decode,
            **_dali_common(cfg, info, channels_last),
        )
    if backend == "torchvision-gpu":
        from fastmlgan.loaders.torchvision_gpu import build_torchvision_train_loader

        return build_torchvision_train_loader(
            splits.train, cfg.image_size, batch, info.rank, info.world_size, seed,
            pixels_per_batch=pixels_per_batch, **_torchvision_common(cfg, info, channels_last),
        )
    from fastmlgan.loaders.torch_loader import FiveCropDataset
    from fastmlgan.loaders.torch_loader import build_train_loader as torch_train_loader

    dataset = FiveCropDataset(splits.train, cfg.image_size, train=True, seed=seed, on_bad_image=cfg.on_bad_image)
    return torch_train_loader(dataset, batch, info.rank, info.world_size, seed, cfg.num_workers, pixels_per_batch)


def build_eval_loader(
    cfg: DataConfig, splits: Splits, info: DistInfo, seed: int, channels_last: bool = False, backend: str | None = None
):
    """This rank's evaluation loader: every image of ``splits.val`` once across ranks."""
    batch = per_rank_batch(cfg.eval_batch_size, info, "data.eval_batch_size")
    from fastmlgan.loaders.torch_loader import build_eval_loader as torch_eval_loader

    if cfg.dataset in FEATURE_DATASETS:
        from fastmlgan.loaders.features import FeatureDataset

        return torch_eval_loader(FeatureDataset(splits.val, _standardizer(splits)), batch, info.rank, info.world_size, 0)
    backend = backend or data_backend(cfg, splits, info, train=False)
    if backend == "cache":
        from fastmlgan.loaders.cache_loader import CacheLoader

        return CacheLoader(_cache(cfg, splits.val, "eval", info), cfg.image_size, batch, info.rank, info.world_size,
                           train=False, **_cache_common(cfg, info, channels_last))
    if backend == "dali":
        from fastmlgan.loaders.dali import build_dali_eval_loader

        return build_dali_eval_loader(
            splits.val, cfg.image_size, batch, info.rank, info.world_size, **_dali_common(cfg, info, channels_last)
        )
    if backend == "torchvision-gpu":
        from fastmlgan.loaders.torchvision_gpu import build_torchvision_eval_loader

        return build_torchvision_eval_loader(
            splits.val, cfg.image_size, batch, info.rank, info.world_size, **_torchvision_common(cfg, info, channels_last)
        )
    from fastmlgan.loaders.torch_loader import FiveCropDataset

    dataset = FiveCropDataset(splits.val, cfg.image_size, train=False, seed=seed, on_bad_image=cfg.on_bad_image)
    return torch_eval_loader(dataset, batch, info.rank, info.world_size, cfg.num_workers)


def _standardizer(splits: Splits):
    from fastmlgan.loaders.features import Standardizer

    if splits.standardizer is None:
        splits.standardizer = Standardizer().fit(splits.train.features)
    return splits.standardizer


BACKENDS = ("auto", "dali", "torchvision-gpu", "torch", "cache")


def resolve_backend(requested: str, device, log: bool = True, cached: str = "") -> str:
    """The loader backend actually used: ``auto`` takes the decoded-image cache when ``cached``
    (the folder holding current caches of both splits) is given, else DALI on a GPU when it is
    installed, else torchvision-gpu on a GPU, else torch. ``dali`` without a GPU runs DALI's CPU
    pipeline; ``torchvision-gpu`` without a GPU is an error."""
    import torch

    from fastmlgan.loaders.dali import dali_available

    if requested not in BACKENDS:
        raise ConfigError(f"--data.backend: {requested!r} is not one of {', '.join(BACKENDS)}")
    on_gpu = torch.device(device).type == "cuda"
    if requested == "auto":
        if cached:
            backend, reason = "cache", f"current caches of both splits in {cached}"
        elif on_gpu:
            backend = "dali" if dali_available() else "torchvision-gpu"
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
    if requested == "dali" and not dali_available():
        from fastmlgan.loaders.dali import _require_dali

        _require_dali()  # raises with the install command
    if log:
        logger.info("data.backend %s%s", requested, " (CPU pipeline: no GPU)" if requested == "dali" and not on_gpu else "")
    return requested


def _log_dali_bad_image_policy(cfg: DataConfig, info: DistInfo) -> None:
    if cfg.on_bad_image == "skip" and info.is_main:
        logger.info(
            "data.backend dali cannot skip undecodable images (on_bad_image=skip is not honoured): "
            "check the dataset first with python -m fastmlgan.loaders.check"
        )


def _dali_common(cfg: DataConfig, info: DistInfo, channels_last: bool) -> dict:
    return dict(device=info.device, num_threads=cfg.num_threads, channels_last=channels_last,
                hw_decoder_load=cfg.dali_hw_decoder_load)


def _torchvision_common(cfg: DataConfig, info: DistInfo, channels_last: bool) -> dict:
    return dict(device=info.device, num_threads=cfg.num_threads, on_bad_image=cfg.on_bad_image, channels_last=channels_last)


def data_backend(cfg: DataConfig, splits: Splits, info: DistInfo, train: bool = True) -> str:
    """The loader backend of ``--data.backend`` for these splits (``auto``'s pick logged once).
    Under torchrun a collective: rank 0 decides whether current decoded-image caches exist."""
    if cfg.backend == "cache" and cfg.dataset in FEATURE_DATASETS:
        raise ConfigError(
            f"--data.backend cache stores decoded images, but data.dataset={cfg.dataset} holds feature vectors: "
            "use --data.backend auto"
        )
    cached = _current_caches(cfg, splits, info) if cfg.backend == "auto" and cfg.dataset not in FEATURE_DATASETS else ""
    return resolve_backend(cfg.backend, info.device, log=info.is_main and train, cached=cached)


def _cache(cfg: DataConfig, images, purpose: str, info: DistInfo):
    """The current decoded-image cache of ``images`` (built first when missing or stale)."""
    from fastmlgan.loaders.cache import Geometry, ensure_cache, resolve_cache_dir

    if cfg.cache_device == "cuda" and info.device.type != "cuda":
        raise ConfigError(f"--data.cache_device cuda keeps the cache in GPU memory, but this process runs on {info.device}")
    return ensure_cache(images, Geometry(purpose, cfg.image_size), resolve_cache_dir(cfg.cache_dir), cfg.on_bad_image,
                        info, num_threads=cfg.num_threads, progress=info.is_main)


def _cache_common(cfg: DataConfig, info: DistInfo, channels_last: bool) -> dict:
    return dict(device=info.device, num_threads=cfg.num_threads, channels_last=channels_last, cache_device=cfg.cache_device)


def _current_caches(cfg: DataConfig, splits: Splits, info: DistInfo) -> str:
    """For ``auto``: the cache folder when current caches of both splits exist there (rank 0's
    answer on every rank, so that all ranks pick one backend), else ''."""
    from fastmlgan.distributed import broadcast_object
    from fastmlgan.loaders.cache import Geometry, find_current, resolve_cache_dir

    found = ""
    if info.is_main:
        directory = resolve_cache_dir(cfg.cache_dir)
        reasons = []
        for images, purpose in ((splits.train, "train"), (splits.val, "eval")):
            path, why = find_current(images, Geometry(purpose, cfg.image_size), directory)
            if path is None:
                reasons.append(why)
        if not reasons:
            found = str(directory)
        elif any("no cache" not in r for r in reasons):
            # A cache exists but cannot be used: say so, never use it silently.
            logger.info("data.backend auto: not using the decoded-image cache: %s", "; ".join(reasons))
    return broadcast_object(found, info)
