"""The uint8 path of issue 20: the cache loader hands over uint8 pixels and the consumer normalises
them on its device (``geometry.normalize_batch``); the float path stays as it was.

Each test compares against an independent reference: hand-computed ImageNet normalisation in
float64, the float path's own batches, or the torch backend's pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmlgan.config import build_config
from fastmlgan.data.backends.torch_dataloader import FiveCropDataset, build_train_loader
from fastmlgan.data.geometry import IMAGENET_MEAN, IMAGENET_STD, normalize, normalize_batch, resize, resize_into
from fastmlgan.data.imagecache.build import ensure_cache
from fastmlgan.data.imagecache.format import Geometry
from fastmlgan.data.imagecache.loader import CacheLoader
from fastmlgan.data.sources.coco import read_coco
from fastmlgan.data.sources.embedded import generate
from fastmlgan.data.types import Splits
from fastmlgan.distributed import DistInfo
from fastmlgan.scoring import inputs_to_device, predict

SIZE = 32  # training rows 37x37, five crop sides 37..18: every window is resized but one
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    paths = generate(tmp_path_factory.mktemp("u8") / "data", num_train=40, num_val=19, image_size=48, seed=11)
    return Splits(read_coco(paths.train_ann, paths.train_images), read_coco(paths.val_ann, paths.val_images))


@pytest.fixture(scope="module")
def caches(splits, tmp_path_factory):
    directory = tmp_path_factory.mktemp("u8caches")
    return (ensure_cache(splits.train, Geometry("train", SIZE), directory, progress=False),
            ensure_cache(splits.val, Geometry("eval", SIZE), directory, progress=False))


def reference_normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation computed by hand in float64, channel c = (v - 255 mean_c) / (255 std_c)."""
    x = images.to(torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def test_normalize_batch_equals_the_hand_computed_normalisation():
    # Every grey level in every channel, in both memory formats: a swapped mean and std, swapped
    # channels or a missing 255 is far outside 1e-6.
    levels = torch.arange(256, dtype=torch.uint8)
    images = torch.stack([levels.view(16, 16)] * 3).unsqueeze(0).repeat(2, 1, 1, 1)
    images[1] = images[1].flip(-1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = normalize_batch(images.contiguous(memory_format=fmt), fmt)
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(got.double(), reference_normalize(images), rtol=0, atol=1e-6)
    # Red 0 is -2.1179 (0.485 / 0.229), blue 255 is +2.64 ((1 - 0.406) / 0.225), by hand.
    assert abs(float(normalize_batch(images)[0, 0, 0, 0]) - (-0.485 / 0.229)) < 1e-6
    assert abs(float(normalize_batch(images)[0, 2, 15, 15]) - (1 - 0.406) / 0.225) < 1e-6


def test_device_normalisation_equals_the_cpu_one():
    """The consumer's normalisation (eager, and compiled as the trainer runs it) against the CPU
    loader's float path (``geometry.normalize``, the torch backend's): bit for bit eagerly; the
    compiled kernel within one float32 rounding."""
    images = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cpu = normalize(images)
    assert torch.equal(normalize_batch(images), cpu)
    assert torch.equal(normalize_batch(images.contiguous(memory_format=torch.channels_last)), cpu)
    compiled = torch.compile(normalize_batch, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.testing.assert_close(compiled(images), cpu, rtol=1.2e-7, atol=0)
    with pytest.raises(ValueError, match="expected uint8"):
        normalize_batch(cpu)


def test_resize_into_equals_resize():
    rows = torch.randint(0, 256, (3, 37, 37, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    window = rows.permute(0, 3, 1, 2)[:, :, 4:30, 2:28]  # a strided, channels_last window
    out = torch.empty((3, 3, 32, 32), dtype=torch.uint8, memory_format=torch.channels_last)
    resize_into(window, out)
    assert torch.equal(out, resize(window, 32))


def batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("train", [True, False])
def test_uint8_batches_equal_the_float_batches(caches, train):
    """uint8, normalised on the consumer's side, against today's float path: within one grey level
    (here bit for bit on a CPU); the labels, crops and order are the same."""
    cache = caches[0] if train else caches[1]
    u8 = CacheLoader(cache, SIZE, 8, 0, 1, train=train, seed=4, num_threads=2, output="uint8")
    fl = CacheLoader(cache, SIZE, 8, 0, 1, train=train, seed=4, num_threads=2)
    grey = 1.0 / (255 * max(IMAGENET_STD))  # one grey level in normalised units, at most
    for epoch in (0, 1) if train else (0,):
        ours, theirs = batches(u8, epoch), batches(fl, epoch)
        assert len(ours) == len(theirs) == len(u8)
        for a, b in zip(ours, theirs):
            assert a["image"].dtype == torch.uint8 and a["image"].is_contiguous(memory_format=torch.channels_last)
            for key in ("labels", "crop", "index", "bad"):
                assert torch.equal(a[key], b[key]), key
            x = inputs_to_device(a, CPU, torch.contiguous_format)
            assert (x - b["image"]).abs().max() <= grey
            assert torch.equal(x, b["image"])


def test_uint8_crops_are_the_torch_backends_pixels(splits, caches):
    """The CPU float path's bit-exact equality with the torch backend holds for uint8 pixels too."""
    ours = CacheLoader(caches[0], SIZE, 8, 0, 1, train=True, seed=3, num_threads=2, output="uint8")
    ref = build_train_loader(FiveCropDataset(splits.train, SIZE, True, seed=3), 8, 0, 1, seed=3)
    for a, b in zip(batches(ours, 2), batches(ref, 2)):
        assert torch.equal(normalize_batch(a["image"]), b["image"])


def test_the_gpu_paths_output_kinds_on_cpu_tensors(caches):
    """The GPU path (rows staged, crops cut by crop group) run on CPU tensors: the same output kind
    and the same pixels as the CPU path, for both kinds."""
    for output in ("uint8", "float"):
        loader = CacheLoader(caches[0], SIZE, 8, 0, 1, train=True, seed=5, num_threads=1, output=output)
        loader.set_epoch(1)
        cpu = list(loader)
        gpu = [loader._finish_gpu(loader._host_part(b, 1)) for b in loader.batches()]
        for a, b in zip(gpu, cpu):
            assert a["image"].dtype == b["image"].dtype == (torch.uint8 if output == "uint8" else torch.float32)
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["crop"], b["crop"])


def test_evaluation_and_the_trainer_normalise_uint8_batches(splits, caches, tmp_path):
    """Evaluation (``scoring.predict``: the trainer's, ``evaluate``'s and the reproduction's path)
    scores uint8 batches exactly as float ones; the trainer's input is the float path's."""
    from fastmlgan.models import build_generator
    from fastmlgan.train.trainer import Trainer

    torch.manual_seed(0)
    generator = build_generator("smallcnn", splits.train.num_classes, None, width=8, depth=2)
    u8 = CacheLoader(caches[1], SIZE, 8, 0, 1, train=False, output="uint8")
    fl = CacheLoader(caches[1], SIZE, 8, 0, 1, train=False)
    s_u8, t_u8 = predict(generator, u8, CPU)
    s_fl, t_fl = predict(generator, fl, CPU)
    assert s_u8.shape == (len(splits.val), splits.train.num_classes)
    assert np.array_equal(s_u8, s_fl) and np.array_equal(t_u8, t_fl)

    cfg = build_config({"data.backend": "cache", "data.cache_dir": str(tmp_path), "data.image_size": str(SIZE),
                        "data.batch_size": "4", "model.backbone": "smallcnn", "out": str(tmp_path)}, preset="smoke")
    trainer = Trainer(cfg, DistInfo(0, 1, 0, CPU), tmp_path, splits=splits)
    assert trainer.train_loader.output == trainer.eval_loader.output == "uint8"
    batch = next(iter(trainer.train_loader))
    float_batch = next(iter(CacheLoader(trainer.train_loader.cache, SIZE, 4, 0, 1, train=True, seed=cfg.train.seed)))
    assert torch.equal(trainer.steps.model_input(batch), float_batch["image"])
    trainer.train_loader.close()
    trainer.eval_loader.close()
