"""The CPU data path: decoding, five-crop against an independent PIL pipeline, reproducible crops,
rank sharding, and bad-image handling."""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmlgan.data.backends.torch_dataloader import FiveCropDataset, build_eval_loader, build_train_loader
from fastmlgan.data.geometry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_POSITIONS,
    NUM_SIZES,
    PAPER_CROP_SIDES,
    base_size,
    crop_for,
    crop_window,
    decode_rgb,
    eval_resize,
    five_crop,
    normalize,
)
from fastmlgan.data.sources.coco import read_coco
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError

# torch's uint8 antialiased bilinear resize and PIL's BILINEAR differ by at most one grey level
# per resize (measured); two resizes in a row: at most 2, and on average far below one level.
# Shifting the crop window by a single pixel moves the mean difference to >= 0.7 on these images.
MAX_ABS_TOLERANCE = 2
MEAN_ABS_TOLERANCE = 0.1


@pytest.fixture(scope="module")
def train_images(embedded_small) -> LabeledImages:
    return read_coco(embedded_small.train_ann, embedded_small.train_images)


@pytest.fixture(scope="module")
def small_set(train_images) -> LabeledImages:
    return train_images.subset(range(40), name="small")


def pil_five_crop(path, position: int, size_index: int, image_size: int, shift: int = 0) -> np.ndarray:
    """Independent reference with PIL, the geometry re-derived from the paper's numbers (§4.1)."""
    base = round(image_size * 256 / 224)
    side = round(PAPER_CROP_SIDES[size_index] * base / 256)
    far = base - side
    top, left = [(0, 0), (0, far), (far, 0), (far, far), (far // 2, far // 2)][position]
    left = min(left + shift, far)
    with Image.open(path) as img:
        out = (
            img.convert("RGB")
            .resize((base, base), Image.BILINEAR)
            .crop((left, top, left + side, top + side))
            .resize((image_size, image_size), Image.BILINEAR)
        )
    return np.asarray(out).transpose(2, 0, 1).astype(np.int64)


def check_against_pil(path, image_size: int) -> None:
    image = decode_rgb(path)
    shifted = []
    for position in range(NUM_POSITIONS):
        for size_index in range(NUM_SIZES):
            ours = five_crop(image, position, size_index, image_size)
            assert ours.dtype == torch.uint8 and ours.shape == (3, image_size, image_size)
            diff = np.abs(ours.numpy().astype(np.int64) - pil_five_crop(path, position, size_index, image_size))
            assert diff.max() <= MAX_ABS_TOLERANCE, (path, position, size_index)
            assert diff.mean() <= MEAN_ABS_TOLERANCE, (path, position, size_index)
            if size_index > 0:
                off_by_one = pil_five_crop(path, position, size_index, image_size, shift=1)
                shifted.append(np.abs(ours.numpy().astype(np.int64) - off_by_one).mean())
    # The tolerance is tight enough to see a window one pixel off.
    assert np.mean(shifted) > 5 * MEAN_ABS_TOLERANCE
    with Image.open(path) as img:
        ref = np.asarray(img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)).transpose(2, 0, 1)
    diff = np.abs(eval_resize(image, image_size).numpy().astype(np.int64) - ref)
    assert diff.max() <= 1


@pytest.mark.parametrize("image_size", [24, 64])
def test_five_crop_matches_pil_on_generated_jpegs(small_set, image_size):
    for path in small_set.paths[:3]:
        check_against_pil(path, image_size)


@pytest.mark.realdata
def test_five_crop_matches_pil_on_coco128(shared_data):
    paths = sorted((shared_data / "coco128" / "images" / "train2017").glob("*.jpg"))[:2]
    for path in paths:
        check_against_pil(path, 224)


@pytest.mark.parametrize("image_size", [24, 32, 64, 224, 299])
def test_every_crop_window_is_inside_the_resized_image(image_size):
    base = base_size(image_size)
    windows = set()
    for position in range(NUM_POSITIONS):
        for size_index in range(NUM_SIZES):
            top, left, side = crop_window(position, size_index, image_size)
            assert 0 <= top and 0 <= left and 0 < side and top + side <= base and left + side <= base
            windows.add((top, left, side))
    # Full-size crops coincide at every position; the four other sizes give 5 distinct windows each.
    assert len(windows) == 1 + 4 * NUM_POSITIONS


def test_crops_cover_all_25_pairs_uniformly():
    """2500 draws: each of the 25 pairs within an exact binomial bound (false-failure rate
    <= 1e-6, Bonferroni over the 25 pairs)."""
    n = 2500
    counts = Counter(crop_for(seed=0, epoch=0, index=i) for i in range(n))
    assert set(counts) == {(p, s) for p in range(NUM_POSITIONS) for s in range(NUM_SIZES)}
    x = np.arange(n + 1)
    p = 1 / 25
    log_pmf = np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in x])
    pmf = np.exp(log_pmf + x * math.log(p) + (n - x) * math.log1p(-p))
    for k in counts.values():
        assert 2 * min(pmf[: k + 1].sum(), pmf[k:].sum()) > 1e-6 / 25


def test_decode_rgb(small_set, tmp_path):
    path = small_set.paths[0]
    image = decode_rgb(path)
    with Image.open(path) as img:
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), np.asarray(img.convert("RGB")))
    grey = tmp_path / "grey.png"
    Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10)).save(grey)
    decoded = decode_rgb(grey)
    assert decoded.shape == (3, 6, 10) and decoded.dtype == torch.uint8
    assert torch.equal(decoded[0], decoded[2]) and decoded[0, 1, 3] == 13
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(DataError, match="notes.jpg.*cannot decode"):
        decode_rgb(text)
    with pytest.raises(DataError, match="absent.jpg.*not found"):
        decode_rgb(tmp_path / "absent.jpg")


def test_normalize_by_hand():
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 3).expand(3, 2, 3)
    out = normalize(pixels)
    assert out.dtype == torch.float32
    for c in range(3):
        expected = (torch.tensor([0, 128, 255]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[c, 0], expected.float(), rtol=1e-6, atol=1e-6)
    batch = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    torch.testing.assert_close(normalize(batch)[2], normalize(batch[2]))


# ImageNet's mean and standard deviation, written out (torchvision's documented values).
MEAN_RGB, STD_RGB = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def denormalize_by_hand(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, S, S) -> grey levels, x * std * 255 + mean * 255, float64 (not rounded)."""
    x = image.double().numpy()
    return np.stack([x[c] * STD_RGB[c] * 255 + MEAN_RGB[c] * 255 for c in range(3)])


def crop_by_hand(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """The documented crop draw: one integer in [0, 25) from numpy's default_rng seeded with
    [seed, epoch, index], position-major (k // 5, k % 5); every backend draws the same."""
    k = int(np.random.default_rng([seed, epoch, index]).integers(25))
    return k // 5, k % 5


def test_samples_and_reproducible_crops(small_set):
    dataset = FiveCropDataset(small_set, image_size=24, train=True, seed=5)
    again = FiveCropDataset(small_set, image_size=24, train=True, seed=5)
    sample = dataset[(0, 3)]
    assert sample["image"].shape == (3, 24, 24) and sample["image"].dtype == torch.float32
    np.testing.assert_array_equal(sample["labels"].numpy(), small_set.labels[3].astype(np.float32))
    assert sample["index"] == 3 and not sample["bad"]
    position, size_index = sample["crop"].tolist()
    assert (position, size_index) == crop_by_hand(5, 0, 3)
    # The pixels: grey levels (the normalisation undone with the constants above: whole levels),
    # against the PIL pipeline with the paper's geometry, within the tolerances a one-pixel shift breaks.
    levels = denormalize_by_hand(sample["image"])
    assert np.abs(levels - levels.round()).max() < 1e-3
    diff = np.abs(levels.round() - pil_five_crop(small_set.paths[3], position, size_index, 24))
    assert diff.max() <= MAX_ABS_TOLERANCE and diff.mean() <= MEAN_ABS_TOLERANCE

    epoch0 = [tuple(dataset[(0, i)]["crop"].tolist()) for i in range(40)]
    assert epoch0 == [tuple(again[(0, i)]["crop"].tolist()) for i in range(40)]
    assert epoch0 == [crop_by_hand(5, 0, i) for i in range(40)]
    dataset.set_epoch(0)
    assert torch.equal(dataset[7]["image"], again[(0, 7)]["image"])
    # Other epoch / other seed: each crop repeats with probability 1/25; 40 draws.
    epoch1 = [tuple(dataset[(1, i)]["crop"].tolist()) for i in range(40)]
    assert epoch1 == [crop_by_hand(5, 1, i) for i in range(40)]
    dataset.set_epoch(1)
    assert epoch1 == [tuple(dataset[i]["crop"].tolist()) for i in range(40)]
    other_seed = [tuple(FiveCropDataset(small_set, 24, True, seed=6)[(0, i)]["crop"].tolist()) for i in range(40)]
    assert other_seed == [crop_by_hand(6, 0, i) for i in range(40)]
    assert sum(a != b for a, b in zip(epoch0, epoch1)) >= 30
    assert sum(a != b for a, b in zip(epoch0, other_seed)) >= 30

    evaluation = FiveCropDataset(small_set, image_size=24, train=False)
    sample = evaluation[3]
    assert sample["crop"].tolist() == [-1, -1]
    levels = denormalize_by_hand(sample["image"])
    assert np.abs(levels - levels.round()).max() < 1e-3
    with Image.open(small_set.paths[3]) as img:
        whole = np.asarray(img.convert("RGB").resize((24, 24), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.abs(levels.round() - whole).max() <= 1  # §4.1's test input: the whole image, resized


def indices(loader) -> list[int]:
    return [i for batch in loader for i in batch["index"].tolist()]


def test_eval_sharding_covers_every_image_once(small_set):
    images = small_set.subset(range(37))  # odd, and not a multiple of the batch size
    dataset = FiveCropDataset(images, image_size=16, train=False)
    shards = [indices(build_eval_loader(dataset, batch_size=4, rank=r, world_size=2)) for r in range(2)]
    assert shards[0] == list(range(0, 37, 2)) and shards[1] == list(range(1, 37, 2))
    assert sorted(shards[0] + shards[1]) == list(range(37))
    last = list(build_eval_loader(dataset, batch_size=4, rank=1, world_size=2))[-1]
    assert last["image"].shape[0] == 18 % 4  # partial batch kept


def test_train_sharding_partitions_each_epoch(small_set):
    dataset = FiveCropDataset(small_set, image_size=16, train=True, seed=1)
    loaders = [build_train_loader(dataset, batch_size=4, rank=r, world_size=2, seed=11) for r in range(2)]
    orders = []
    for epoch in range(2):
        shards = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            assert all(b["image"].shape == (4, 3, 16, 16) for b in batches) and len(batches) == 5
            assert all(
                tuple(c) == crop_for(1, epoch, i)
                for b in batches
                for c, i in zip(b["crop"].tolist(), b["index"].tolist())
            )
            shards.append([i for b in batches for i in b["index"].tolist()])
        assert sorted(shards[0] + shards[1]) == list(range(40))
        orders.append(shards[0])
    assert orders[0] != orders[1]  # reshuffled

    # 41 images: each rank gets 20, the one left over is dropped; batch 8 drops the partial batch.
    dataset = FiveCropDataset(small_set.subset(range(40)), image_size=16, train=True)
    odd = FiveCropDataset(
        LabeledImages(
            "odd",
            small_set.paths + small_set.paths[:1],
            np.concatenate([small_set.labels, small_set.labels[:1]]),
            small_set.class_names,
        ),
        image_size=16,
        train=True,
    )
    shards = [indices(build_train_loader(odd, batch_size=8, rank=r, world_size=2, seed=0)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 16
    assert not set(shards[0]) & set(shards[1])
    with pytest.raises(ConfigError, match="batch_size=32"):
        build_train_loader(dataset, batch_size=32, rank=0, world_size=2, seed=0)
    with pytest.raises(ConfigError, match="rank"):
        build_train_loader(dataset, batch_size=4, rank=2, world_size=2, seed=0)


def test_persistent_workers_see_the_epoch(small_set):
    images = small_set.subset(range(16))
    dataset = FiveCropDataset(images, image_size=16, train=True, seed=3)
    loader = build_train_loader(dataset, batch_size=8, rank=0, world_size=1, seed=0, num_workers=1)
    assert loader.persistent_workers
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            for crop, index in zip(batch["crop"].tolist(), batch["index"].tolist()):
                assert tuple(crop) == crop_for(3, epoch, index)


@pytest.fixture
def with_bad_images(small_set, tmp_path) -> LabeledImages:
    """6 images; index 2 is a truncated JPEG, index 5 (the last) is not an image at all."""
    paths = []
    for i in range(6):
        dest = tmp_path / f"{i}.jpg"
        shutil.copy(small_set.paths[i], dest)
        paths.append(str(dest))
    data = Path(paths[2]).read_bytes()
    Path(paths[2]).write_bytes(data[: len(data) // 2])
    Path(paths[5]).write_text("<html>404</html>")
    return LabeledImages("bad", paths, small_set.labels[:6], small_set.class_names)


def test_bad_image_skip_substitutes_next(with_bad_images, caplog):
    dataset = FiveCropDataset(with_bad_images, image_size=16, train=True, seed=0)
    with caplog.at_level(logging.WARNING, logger="fastmlgan.data.backends.torch_dataloader"):
        sample = dataset[(0, 2)]
    assert "2.jpg" in caplog.text
    assert sample["bad"] and sample["index"] == 3
    torch.testing.assert_close(sample["labels"], torch.from_numpy(with_bad_images.labels[3]).float())
    assert tuple(sample["crop"].tolist()) == crop_for(0, 0, 2)  # the crop of the requested slot
    position, size_index = crop_for(0, 0, 2)
    expected = normalize(five_crop(decode_rgb(with_bad_images.paths[3]), position, size_index, 16))
    torch.testing.assert_close(sample["image"], expected, rtol=0, atol=0)
    wrapped = dataset[(0, 5)]
    assert wrapped["bad"] and wrapped["index"] == 0

    evaluation = FiveCropDataset(with_bad_images, image_size=16, train=False)
    batches = list(build_eval_loader(evaluation, batch_size=4, rank=0, world_size=1))
    assert [b["image"].shape[0] for b in batches] == [4, 2]
    assert torch.cat([b["bad"] for b in batches]).tolist() == [False, False, True, False, False, True]
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 3, 3, 4, 0]


def test_bad_image_error_names_the_file(with_bad_images):
    dataset = FiveCropDataset(with_bad_images, image_size=16, train=True, on_bad_image="error")
    assert not dataset[1]["bad"]
    with pytest.raises(DataError, match=r"2\.jpg.*cannot decode"):
        dataset[2]
    with pytest.raises(DataError, match=r"5\.jpg"):
        dataset[5]
    with pytest.raises(ConfigError, match="on_bad_image"):
        FiveCropDataset(with_bad_images, image_size=16, train=True, on_bad_image="ignore")
