"""Backend choice and the contract every backend keeps with the trainer: the same crops for the
same crop parameters, the same batch dicts, and sharding that covers every image once per epoch."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import declared
from loader_helpers import MAX_ABS_TOLERANCE, MEAN_ABS_TOLERANCE, denormalize

from fastmlgan.config import DataConfig, build_config
from fastmlgan.data.backends import dali as dali_module
from fastmlgan.data.backends.torch_dataloader import FiveCropDataset, build_eval_loader, build_train_loader
from fastmlgan.data.backends.torchvision_gpu import (
    build_torchvision_eval_loader,
    build_torchvision_train_loader,
    five_crop_batch,
    resize_all,
)
from fastmlgan.data.factory import build_loaders, resolve_backend
from fastmlgan.data.geometry import base_size, decode_rgb, five_crop
from fastmlgan.data.imagecache.build import ensure_cache
from fastmlgan.data.imagecache.format import Geometry
from fastmlgan.data.imagecache.loader import CacheLoader
from fastmlgan.data.sources.coco import read_coco
from fastmlgan.data.sources.embedded import generate
from fastmlgan.data.stream import BatchStream
from fastmlgan.data.types import LabeledImages, Splits
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import ConfigError
from fastmlgan.models import build_generator
from fastmlgan.scoring import predict

HAS_DALI = dali_module.dali_available()
# Where the run declares the dali extra installed (make test on Linux), its tests run, and fail without it.
needs_dali = pytest.mark.skipif(not HAS_DALI and not declared("dali"), reason="DALI is not installed (pip install '.[dali]')")
CPU = torch.device("cpu")
BACKENDS = ["torch", "torchvision-cpu", pytest.param("dali", marks=needs_dali)]


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Splits:
    paths = generate(tmp_path_factory.mktemp("backends") / "data", num_train=45, num_val=23, image_size=48, seed=5)
    return Splits(read_coco(paths.train_ann, paths.train_images), read_coco(paths.val_ann, paths.val_images))


def test_config_validates_backend_and_dataset():
    assert DataConfig().backend == "auto"
    for backend in ("auto", "dali", "torchvision-gpu", "torch"):
        assert build_config({"data.backend": backend}).data.backend == backend
    with pytest.raises(ConfigError, match="--data.backend: 'nvjpeg' is not one of auto, dali, torchvision-gpu, torch"):
        build_config({"data.backend": "nvjpeg"})
    for dataset in ("nuswide", "list"):
        assert DataConfig(dataset=dataset).dataset == dataset
    with pytest.raises(ConfigError, match="data.nuswide_split"):
        DataConfig(nuswide_split="random")
    with pytest.raises(ConfigError, match="data.dali_hw_decoder_load"):
        DataConfig(dali_hw_decoder_load=1.5)


def test_resolve_backend(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="fastmlgan.data.factory"):
        assert resolve_backend("auto", CPU) == "torch"
    assert "auto -> torch (no GPU)" in caplog.text
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ConfigError, match="torchvision-gpu decodes with nvJPEG and needs a CUDA GPU"):
        resolve_backend("torchvision-gpu", CPU)
    monkeypatch.setattr(dali_module, "dali_available", lambda: False)
    assert resolve_backend("auto", torch.device("cuda")) == "torchvision-gpu"
    with pytest.raises(ConfigError, match=r"pip install '.\[dali\]'.*nvidia-dali-cuda120"):
        resolve_backend("dali", CPU)
    monkeypatch.setattr(dali_module, "dali_available", lambda: True)
    assert resolve_backend("auto", torch.device("cuda")) == "dali"
    assert resolve_backend("dali", CPU) == "dali"


def three_way(images, image_size: int) -> None:
    """DALI's crops against torch's and torchvision-gpu's (on CPU tensors) for the same parameters."""
    from fastmlgan.data.backends.dali import build_dali_train_loader

    batch = next(iter(build_dali_train_loader(images, image_size, 10, 0, 1, seed=9)))
    decoded = [decode_rgb(images.paths[i]) for i in batch["index"].tolist()]
    batched = five_crop_batch(resize_all(decoded, base_size(image_size)), batch["crop"], image_size)
    for image, crop, ours, tv in zip(decoded, batch["crop"].tolist(), batch["image"], batched):
        reference = five_crop(image, *crop, image_size)
        assert torch.equal(tv, reference)
        diff = (denormalize(ours) - reference.long()).abs()
        assert diff.float().mean() <= MEAN_ABS_TOLERANCE and diff.max() <= MAX_ABS_TOLERANCE, crop


@needs_dali
def test_same_crops_for_the_same_parameters(splits):
    three_way(splits.train, 40)


@needs_dali
@pytest.mark.realdata
def test_same_crops_for_the_same_parameters_on_coco128(shared_data):
    root = shared_data / "coco128"
    three_way(read_coco(root / "instances_coco128.json", root / "images" / "train2017"), 224)


def loaders(backend: str, splits: Splits, rank: int, world_size: int, batch: int):
    if backend == "torch":
        train = build_train_loader(FiveCropDataset(splits.train, 16, True, seed=1), batch, rank, world_size, seed=1)
        return train, build_eval_loader(FiveCropDataset(splits.val, 16, False), batch, rank, world_size)
    if backend == "torchvision-cpu":
        return (
            build_torchvision_train_loader(splits.train, 16, batch, rank, world_size, seed=1, device="cpu", num_threads=2),
            build_torchvision_eval_loader(splits.val, 16, batch, rank, world_size, device="cpu", num_threads=2),
        )
    from fastmlgan.data.backends.dali import build_dali_eval_loader, build_dali_train_loader

    return (
        build_dali_train_loader(splits.train, 16, batch, rank, world_size, seed=1, num_threads=2),
        build_dali_eval_loader(splits.val, 16, batch, rank, world_size, num_threads=2),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_shards_each_epoch(backend, splits):
    """45 training images, 2 ranks, batch 4: each rank takes 5 batches (20 of its 22), the ranks
    are disjoint, every epoch; the 23 evaluation images are seen exactly once across ranks."""
    pairs = [loaders(backend, splits, rank, 2, 4) for rank in range(2)]
    for epoch in range(2):
        shards = []
        for train, _ in pairs:
            train.set_epoch(epoch)
            batches = list(train)
            assert len(batches) == len(train) == 5
            for b in batches:
                assert set(b) == {"image", "labels", "crop", "index", "bad"}
                assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.float32
                assert b["labels"].shape == (4, splits.train.num_classes) and b["labels"].dtype == torch.float32
                assert b["crop"].dtype == b["index"].dtype == torch.int64 and b["bad"].dtype == torch.bool
                assert torch.equal(b["labels"], torch.from_numpy(splits.train.labels[b["index"].numpy()]).float())
            shards.append([i for b in batches for i in b["index"].tolist()])
        assert len(set(shards[0])) == len(set(shards[1])) == 20 and not set(shards[0]) & set(shards[1])
    seen = []
    for _, evaluation in pairs:
        batches = list(evaluation)
        assert len(batches) == len(evaluation)
        assert all((b["crop"] == -1).all() and not b["bad"].any() for b in batches)
        seen += [i for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(len(splits.val)))


# -- a resumed stream (a checkpoint's data position) --------------------------------------------


def train_loader(backend: str, splits: Splits, cache_dir):
    """A fresh training loader of rank 1 of 2, batch 4 (5 batches an epoch), as a restarted process builds it."""
    if backend == "torch":
        return build_train_loader(FiveCropDataset(splits.train, 16, True, seed=1), 4, 1, 2, seed=1)
    if backend == "torchvision-cpu":
        return build_torchvision_train_loader(splits.train, 16, 4, 1, 2, seed=1, device="cpu", num_threads=2)
    if backend == "cache":
        cache = ensure_cache(splits.train, Geometry("train", 16), cache_dir, progress=False)
        return CacheLoader(cache, 16, 4, 1, 2, train=True, seed=1, num_threads=2)
    from fastmlgan.data.backends.dali import build_dali_train_loader

    return build_dali_train_loader(splits.train, 16, 4, 1, 2, seed=1, num_threads=2)


@pytest.mark.parametrize("backend", ["torch", "torchvision-cpu", "cache"])
def test_a_resumed_stream_serves_the_batches_of_an_uninterrupted_one(backend, splits, tmp_path):
    """Stopped after k batches (mid-epoch, at an epoch's last batch, just after a boundary), a new
    loader started from the stream's saved position serves exactly the batches the uninterrupted
    stream served next: same images (bit for bit), crops, labels and flags, across the next epoch
    boundary. A backend that ignores ``start_batch`` replays the epoch's first batches instead."""
    full = BatchStream(train_loader(backend, splits, tmp_path))
    n = len(full)
    assert n == 5
    seen, positions = [], []
    for _ in range(2 * n + 2):
        seen.append(full.next())
        positions.append(full.state_dict())
    for stop in (1, 3, n - 1, n, n + 1, 2 * n - 1):
        partial = BatchStream(train_loader(backend, splits, tmp_path))
        for _ in range(stop):
            partial.next()
        resumed = BatchStream(train_loader(backend, splits, tmp_path), **partial.state_dict())
        for i in range(stop, len(seen)):
            batch = resumed.next()
            assert resumed.state_dict() == positions[i], (stop, i)
            for key in ("index", "crop", "labels", "bad", "image"):
                assert torch.equal(batch[key], seen[i][key]), f"{backend}: stopped after {stop}, batch {i}, {key}"


@needs_dali
def test_a_resumed_dali_stream_keeps_the_epoch_boundaries(splits, tmp_path):
    """DALI's reader keeps its own shuffle, so a resumed epoch cannot replay the interrupted run's
    images (``DALILoader.set_epoch``): it serves the epoch's remaining number of batches, so every
    later position (data epoch, batch) is where the uninterrupted run had it, each batch a full one
    of this rank's shard, no image twice within the resumed epoch."""
    full = BatchStream(train_loader("dali", splits, tmp_path))
    n = len(full)
    positions = []
    for _ in range(2 * n + 1):
        full.next()
        positions.append(full.state_dict())
    full.close()
    for stop in (2, n):
        partial = BatchStream(train_loader("dali", splits, tmp_path))
        for _ in range(stop):
            partial.next()
        state = partial.state_dict()
        partial.close()
        resumed = BatchStream(train_loader("dali", splits, tmp_path), **state)
        rest_of_epoch = []
        for i in range(stop, len(positions)):
            batch = resumed.next()
            assert resumed.state_dict() == positions[i], (stop, i)
            assert batch["index"].shape == (4,)
            if resumed.data_epoch == state["data_epoch"]:
                rest_of_epoch += batch["index"].tolist()
        assert len(rest_of_epoch) == len(set(rest_of_epoch)) == 4 * (n - stop if stop < n else 0)
        resumed.close()


# -- evaluation with undecodable images ---------------------------------------------------------


def eval_loader(backend: str, images: LabeledImages, cache_dir):
    if backend == "torch":
        return build_eval_loader(FiveCropDataset(images, 16, False, on_bad_image="skip"), 4, 0, 1)
    if backend == "torchvision-cpu":
        return build_torchvision_eval_loader(images, 16, 4, 0, 1, device="cpu", num_threads=2, on_bad_image="skip")
    cache = ensure_cache(images, Geometry("eval", 16), cache_dir, "skip", progress=False)
    return CacheLoader(cache, 16, 4, 0, 1, train=False, num_threads=2)


@pytest.mark.parametrize("backend", ["torch", "torchvision-cpu", "cache"])
def test_evaluation_counts_each_image_once_with_undecodable_ones(backend, splits, tmp_path):
    """The 23 evaluation images with image 4 truncated and image 10 not an image at all: the
    loaders put the next decodable image in their slots (flagged ``bad``), and
    ``inference.predict`` must leave those rows out: the scores and targets are exactly those of
    the 21 good images, each once, in order (as a split without the two gives them)."""
    paths = []
    for i, path in enumerate(splits.val.paths):
        paths.append(str(tmp_path / f"{i:02d}.jpg"))
        shutil.copy(path, paths[-1])
    raw = Path(paths[4]).read_bytes()
    Path(paths[4]).write_bytes(raw[: len(raw) // 2])
    Path(paths[10]).write_bytes(np.random.default_rng(0).integers(0, 256, 1500, dtype=np.uint8).tobytes())
    broken = LabeledImages("broken", paths, splits.val.labels.copy(), splits.val.class_names)
    good = [i for i in range(len(paths)) if i not in (4, 10)]
    clean = broken.subset(good, name="clean")

    torch.manual_seed(0)
    g = build_generator("smallcnn", splits.val.num_classes, width=8)
    # BatchNorm statistics of real inputs, so that scores differ from image to image.
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        g.train()(torch.cat([b["image"] for b in eval_loader("torch", clean, tmp_path / "stats")]))
    batches = list(eval_loader(backend, broken, tmp_path / "broken-cache"))
    bad = torch.cat([b["bad"] for b in batches])
    assert len(bad) == 23 and bad.nonzero().flatten().tolist() == [4, 10]  # stand-ins in the two slots
    scores, targets = predict(g, eval_loader(backend, broken, tmp_path / "broken-cache"), CPU)
    expected, _ = predict(g, eval_loader(backend, clean, tmp_path / "clean-cache"), CPU)
    assert scores.shape == (21, splits.val.num_classes)
    np.testing.assert_array_equal(targets, splits.val.labels[good].astype(np.float32))
    # Same images, other batch compositions: fp32 CPU convolutions agree to ~1e-7.
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert scores.std(axis=0).min() > 1e-4  # rows that differ, so a duplicated or shifted row shows


@needs_dali
def test_registry_builds_the_dali_cpu_pipeline(splits):
    cfg = DataConfig(backend="dali", image_size=16, batch_size=8, eval_batch_size=8, num_threads=2)
    train, val = build_loaders(cfg, splits, DistInfo(1, 2, 1, CPU), seed=0)
    assert isinstance(train, dali_module.DALILoader) and len(train) == 22 // 4
    train.set_epoch(3)
    assert train.epoch == 3 and next(iter(train))["image"].shape == (4, 3, 16, 16)
    assert sum(len(b["index"]) for b in val) == len(range(23 // 2, 23))


def test_registry_refuses_torchvision_gpu_without_a_gpu(splits):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="torchvision-gpu"):
        build_loaders(DataConfig(backend="torchvision-gpu", image_size=16, batch_size=8), splits, DistInfo(0, 1, 0, CPU), 0)


@pytest.mark.gpu
def test_auto_backend_on_a_gpu(splits):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = DataConfig(backend="auto", image_size=32, batch_size=8, eval_batch_size=8)
    info = DistInfo(0, 1, 0, torch.device("cuda", 0))
    train, val = build_loaders(cfg, splits, info, seed=0, channels_last=True)
    expected = "dali" if HAS_DALI else "torchvision-gpu"
    assert resolve_backend("auto", info.device) == expected
    batch = next(iter(train))
    assert batch["image"].is_cuda and batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["image"].shape == (8, 3, 32, 32) and not batch["labels"].is_cuda
    seen = [i for b in val for i in b["index"].tolist()]
    assert sorted(seen) == list(range(len(splits.val)))
