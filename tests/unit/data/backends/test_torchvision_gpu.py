"""The torchvision-gpu backend: its batched five-crop on CPU tensors against the torch loader
(bit-exact on CPU), order, sharding and the bad-image policy; on a GPU, against its CPU run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_helpers import MEAN_ABS_TOLERANCE, denormalize

from fastmlgan.data.backends.torch_dataloader import FiveCropDataset, build_eval_loader, build_train_loader
from fastmlgan.data.backends.torchvision_gpu import (
    TorchvisionLoader,
    build_torchvision_eval_loader,
    build_torchvision_train_loader,
    five_crop_batch,
    normalize_batch,
    resize_all,
)
from fastmlgan.data.geometry import NUM_POSITIONS, NUM_SIZES, base_size, decode_rgb, five_crop
from fastmlgan.data.sources.coco import read_coco
from fastmlgan.data.sources.embedded import generate
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    paths = generate(tmp_path_factory.mktemp("tv") / "data", num_train=48, num_val=21, image_size=56, seed=2)
    return read_coco(paths.train_ann, paths.train_images), read_coco(paths.val_ann, paths.val_images)


def all_crops_equal_torch(paths: list[str], image_size: int) -> None:
    """Every one of the 25 (position, size) pairs, batched, equals the torch loader's ``five_crop``."""
    images = [decode_rgb(p) for p in paths]
    base = resize_all(images, base_size(image_size))
    for position in range(NUM_POSITIONS):
        crops = torch.tensor([[position, s % NUM_SIZES] for s in range(len(images))])
        out = five_crop_batch(base, crops, image_size)
        for image, crop, ours in zip(images, crops.tolist(), out):
            assert torch.equal(ours, five_crop(image, *crop, image_size)), (position, crop)


def test_batched_five_crop_equals_torch_five_crop(generated):
    paths = generated[0].paths[:NUM_SIZES]
    for image_size in (24, 40):
        all_crops_equal_torch(paths, image_size)


@pytest.mark.realdata
def test_batched_five_crop_equals_torch_five_crop_on_coco128(shared_data):
    paths = sorted((shared_data / "coco128" / "images" / "train2017").glob("*.jpg"))[:NUM_SIZES]
    all_crops_equal_torch([str(p) for p in paths], 224)


def test_normalize_batch_layouts():
    pixels = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    out = normalize_batch(pixels)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (pixels / 255.0 - mean) / std)
    cl = normalize_batch(pixels, torch.float16, channels_last=True)
    assert cl.dtype == torch.float16 and cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl.float(), out, rtol=0, atol=5e-3)


def as_list(loader):
    return list(loader)


def test_same_batches_as_the_torch_loader(generated):
    """Same order (DistributedSampler), same crops (crop_for), same pixels, 2 ranks x 2 epochs."""
    train, val = generated
    for rank in range(2):
        ours = build_torchvision_train_loader(train, 32, 5, rank, 2, seed=7, device="cpu", num_threads=2)
        reference = build_train_loader(FiveCropDataset(train, 32, True, seed=7), 5, rank, 2, seed=7)
        assert len(ours) == len(reference) == 4
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            reference.set_epoch(epoch)
            a, b = as_list(ours), as_list(reference)
            assert len(a) == len(b) == 4
            for x, y in zip(a, b):
                assert x.keys() == y.keys()
                for key in x:
                    assert torch.equal(x[key], y[key]), (rank, epoch, key)
        ours_eval = build_torchvision_eval_loader(val, 32, 4, rank, 2, device="cpu")
        reference_eval = build_eval_loader(FiveCropDataset(val, 32, False), 4, rank, 2)
        a, b = as_list(ours_eval), as_list(reference_eval)
        assert len(a) == len(b) == len(ours_eval)
        for x, y in zip(a, b):
            for key in x:
                assert torch.equal(x[key], y[key]), (rank, key)


def test_sharding(generated):
    train, val = generated
    seen = [i for r in range(3) for b in build_torchvision_eval_loader(val, 16, 4, r, 3, device="cpu") for i in b["index"].tolist()]
    assert sorted(seen) == list(range(len(val)))
    shards = []
    for rank in range(2):
        loader = build_torchvision_train_loader(train.subset(range(45)), 16, 4, rank, 2, seed=0, device="cpu")
        shards.append([i for b in loader for i in b["index"].tolist()])
    assert len(shards[0]) == len(shards[1]) == 20 and not set(shards[0]) & set(shards[1])


@pytest.fixture
def with_bad_images(generated, tmp_path) -> LabeledImages:
    """6 images: index 2 truncated, index 4 a PNG (decodable, not JPEG), index 5 not an image."""
    small = generated[0]
    paths = []
    for i in range(6):
        dest = tmp_path / f"{i}.jpg"
        shutil.copy(small.paths[i], dest)
        paths.append(str(dest))
    data = Path(paths[2]).read_bytes()
    Path(paths[2]).write_bytes(data[: len(data) // 2])
    from PIL import Image

    with Image.open(paths[4]) as img:
        img.convert("RGB").save(paths[4], format="PNG")
    Path(paths[5]).write_text("<html>404</html>")
    return LabeledImages("bad", paths, small.labels[:6], small.class_names)


def test_bad_images_follow_the_torch_loader_policy(with_bad_images, caplog):
    ours = build_torchvision_eval_loader(with_bad_images, 16, 4, 0, 1, device="cpu")
    reference = build_eval_loader(FiveCropDataset(with_bad_images, 16, False), 4, 0, 1)
    with caplog.at_level(logging.WARNING, logger="fastmlgan.data.backends.torchvision_gpu"):
        a = as_list(ours)
    assert "2.jpg" in caplog.text and "5.jpg" in caplog.text
    b = as_list(reference)
    assert torch.cat([x["bad"] for x in a]).tolist() == [False, False, True, False, False, True]
    assert torch.cat([x["index"] for x in a]).tolist() == [0, 1, 3, 3, 4, 0]
    for x, y in zip(a, b):
        for key in x:
            assert torch.equal(x[key], y[key]), key
    strict = build_torchvision_eval_loader(with_bad_images, 16, 4, 0, 1, device="cpu", on_bad_image="error")
    with pytest.raises(DataError, match=r"2\.jpg"):
        as_list(strict)


def test_needs_a_gpu_unless_told_cpu(generated):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="torchvision-gpu needs a CUDA GPU"):
        TorchvisionLoader(generated[0], 16, 4, 0, 1, train=True, device="cuda")


@pytest.mark.gpu
@gpu
def test_gpu_decode_and_crop_match_the_cpu_run(generated):
    train, val = generated
    cpu = as_list(build_torchvision_train_loader(train, 32, 8, 0, 1, seed=1, device="cpu"))
    cuda = as_list(build_torchvision_train_loader(train, 32, 8, 0, 1, seed=1, device="cuda", channels_last=True))
    assert len(cpu) == len(cuda)
    for x, y in zip(cpu, cuda):
        assert y["image"].is_cuda and y["image"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["crop"], y["crop"])
        # nvJPEG vs libjpeg-turbo and the float GPU resize vs the CPU uint8 kernel.
        diff = (denormalize(x["image"]) - denormalize(y["image"])).abs().float()
        assert diff.mean(dim=(1, 2, 3)).max() <= 2 * MEAN_ABS_TOLERANCE
    ev_cpu = as_list(build_torchvision_eval_loader(val, 32, 8, 0, 1, device="cpu"))
    ev_gpu = as_list(build_torchvision_eval_loader(val, 32, 8, 0, 1, device="cuda"))
    for x, y in zip(ev_cpu, ev_gpu):
        diff = (denormalize(x["image"]) - denormalize(y["image"])).abs().float()
        assert diff.mean(dim=(1, 2, 3)).max() <= 2 * MEAN_ABS_TOLERANCE
    assert np.array_equal(torch.cat([b["index"] for b in ev_gpu]).numpy(), np.arange(len(val)))


def test_batch_assembly_copies_nothing_from_the_host():
    # On a GPU, torch.tensor(mean, device="cuda") and out[python_list] = ... are pageable
    # host-to-device copies: the host waits for the GPU inside BatchStream.next, and the wait counted
    # as data wait. Recorded on CPU tensors: no tensor made from Python data, no list indexing.
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastmlgan.data.backends.torchvision_gpu import five_crop_batch, normalize_batch, resize_all
    from fastmlgan.data.geometry import base_size

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for shape in [(3, 40, 50), (3, 30, 20), (3, 40, 50)]]
    crops = torch.tensor([[0, 1], [2, 3], [1, 1]])
    with Ops() as ops:
        out = normalize_batch(five_crop_batch(resize_all(images, base_size(32)), crops, 32))
    host_copies = [name for name in ops.seen if name.startswith(("lift_fresh", "index_put", "index.", "_local_scalar"))]
    assert not host_copies
    # and the result is the one the per-image path gives
    from fastmlgan.data.geometry import crop_window, resize

    for i, image in enumerate(images):
        base = resize(image, base_size(32))
        top, left, side = crop_window(int(crops[i, 0]), int(crops[i, 1]), 32)
        expected = normalize_batch(resize(base[:, top : top + side, left : left + side][None], 32))
        assert torch.equal(out[i], expected[0])
