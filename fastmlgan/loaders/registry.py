"""From ``DataConfig`` to datasets and loaders: the one place that knows every dataset kind."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastmlgan.config import DataConfig
from fastmlgan.distributed import DistInfo, barrier
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.loaders.base import LabeledImages

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    train: LabeledImages
    val: LabeledImages

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
        if info.is_main:
            embedded.ensure(cfg.root, **params)
        barrier()
        paths = embedded.ensure(cfg.root, **params)
        train = read_coco(paths.train_ann, paths.train_images, cfg.drop_unlabeled, name="embedded-train")
        val = read_coco(paths.val_ann, paths.val_images, cfg.drop_unlabeled, name="embedded-val")
    elif cfg.dataset == "features":
        from fastmlgan.loaders.features import load_feature_dataset

        for key in ("features_train", "features_test"):
            if not getattr(cfg, key):
                raise ConfigError(f"data.dataset=features needs --data.{key}")
        train, val = load_feature_dataset(cfg.features_train, cfg.features_test, xml=cfg.features_xml or None)
    elif cfg.dataset == "coco":
        for key in ("train_annotations", "train_images", "val_annotations", "val_images"):
            if not getattr(cfg, key):
                raise ConfigError(f"data.dataset=coco needs --data.{key}")
        train = read_coco(cfg.train_annotations, cfg.train_images, cfg.drop_unlabeled, name="train")
        val = read_coco(cfg.val_annotations, cfg.val_images, cfg.drop_unlabeled, name="val")
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


def build_loaders(cfg: DataConfig, splits: Splits, info: DistInfo, seed: int):
    """(train loader, eval loader) for this rank."""
    from fastmlgan.loaders.torch_loader import FiveCropDataset, build_eval_loader, build_train_loader

    batch = per_rank_batch(cfg.batch_size, info, "data.batch_size")
    eval_batch = per_rank_batch(cfg.eval_batch_size, info, "data.eval_batch_size")
    if cfg.dataset == "features":
        from fastmlgan.loaders.features import FeatureDataset, Standardizer

        # Standardised with statistics of the training split only.
        standardizer = Standardizer().fit(splits.train.features)
        train_ds = FeatureDataset(splits.train, standardizer)
        val_ds = FeatureDataset(splits.val, standardizer)
        workers = 0  # in-memory tensors: worker processes would only add overhead
    else:
        train_ds = FiveCropDataset(splits.train, cfg.image_size, train=True, seed=seed, on_bad_image=cfg.on_bad_image)
        val_ds = FiveCropDataset(splits.val, cfg.image_size, train=False, seed=seed, on_bad_image=cfg.on_bad_image)
        workers = cfg.num_workers
    if len(train_ds) < batch * info.world_size:
        raise ConfigError(
            f"--data.batch_size {cfg.batch_size} is larger than the training set ({len(train_ds)} images)"
        )
    train = build_train_loader(train_ds, batch, info.rank, info.world_size, seed, workers)
    val = build_eval_loader(val_ds, eval_batch, info.rank, info.world_size, workers)
    return train, val
