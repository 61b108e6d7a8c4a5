"""The DALI backend against the torch loader: crops, sharding, labels, layouts, the training CLI.

DALI runs its CPU pipeline here (device_id=None); the GPU pipeline is tested by the gpu-marked
test where DALI and a GPU are both present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import import_extra

import_extra("dali", "nvidia.dali")

from loader_helpers import (  # noqa: E402
    MAX_ABS_TOLERANCE,
    MEAN_ABS_TOLERANCE,
    binomial_ok,
    coco_labels_by_file,
    denormalize,
    shifted_crop,
)

from fastmlgan.data.backends.dali import build_dali_eval_loader, build_dali_train_loader  # noqa: E402
from fastmlgan.data.geometry import (  # noqa: E402
    NUM_POSITIONS,
    NUM_SIZES,
    crop_window_normalized,
    decode_rgb,
    eval_resize,
    five_crop,
    resize,
)
from fastmlgan.data.sources.coco import read_coco  # noqa: E402
from fastmlgan.data.sources.embedded import generate  # noqa: E402
from fastmlgan.data.types import LabeledImages  # noqa: E402
from fastmlgan.errors import ConfigError, DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """64 + 37 generated 64 px JPEGs (37: odd, not a multiple of any batch size used)."""
    paths = generate(tmp_path_factory.mktemp("dali") / "data", num_train=64, num_val=37, image_size=64, seed=1)
    return paths, read_coco(paths.train_ann, paths.train_images), read_coco(paths.val_ann, paths.val_images)


def check_crops_against_torch(images: LabeledImages, image_size: int, batch_size: int) -> None:
    """Each DALI sample against the torch loader's crop of the same image with DALI's (position, size)."""
    batch = next(iter(build_dali_train_loader(images, image_size, batch_size, 0, 1, seed=0)))
    assert batch["image"].shape == (batch_size, 3, image_size, image_size)
    assert batch["image"].dtype == torch.float32 and not batch["bad"].any()
    shifted = []
    for image, crop, index in zip(batch["image"], batch["crop"].tolist(), batch["index"].tolist()):
        position, size_index = crop
        decoded = decode_rgb(images.paths[index])
        ours = denormalize(image)
        diff = (ours - five_crop(decoded, position, size_index, image_size).long()).abs()
        assert diff.float().mean() <= MEAN_ABS_TOLERANCE, (images.paths[index], crop)
        assert diff.max() <= MAX_ABS_TOLERANCE, (images.paths[index], crop)
        if size_index > 0:  # the full-size window cannot move
            shifted.append((ours - shifted_crop(decoded, position, size_index, image_size).long()).abs().float().mean())
    # The tolerance sees a window one pixel off.
    assert len(shifted) >= 3 and float(np.mean(shifted)) > 3 * MEAN_ABS_TOLERANCE


@pytest.mark.parametrize("image_size", [32, 64])
def test_train_crops_match_torch_on_generated_jpegs(generated, image_size):
    check_crops_against_torch(generated[1], image_size, batch_size=16)


@pytest.mark.realdata
def test_train_crops_match_torch_on_coco128(shared_data):
    root = shared_data / "coco128"
    images = read_coco(root / "instances_coco128.json", root / "images" / "train2017")
    check_crops_against_torch(images, 224, batch_size=8)


def test_eval_matches_torch_eval_resize(generated):
    _, _, val = generated
    batches = list(build_dali_eval_loader(val, 48, 8, 0, 1))
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(len(val)))  # in order
    for batch in batches:
        assert (batch["crop"] == -1).all()
        for image, i in zip(batch["image"], batch["index"].tolist()):
            diff = (denormalize(image) - eval_resize(decode_rgb(val.paths[i]), 48).long()).abs()
            assert diff.float().mean() <= MEAN_ABS_TOLERANCE and diff.max() <= MAX_ABS_TOLERANCE


def test_roi_decode_matches_one_resize_of_the_window(generated):
    """``decode="roi"`` resamples the window of the original image once, so it is compared with
    one resize of that window (corner positions, whose window edges fall on whole pixels of the
    64 px originals; the centre window may round differently by a pixel)."""
    images = generated[1]
    batch = next(iter(build_dali_train_loader(images, 32, 32, 0, 1, seed=2, decode="roi")))
    compared = 0
    for image, (position, size_index), index in zip(batch["image"], batch["crop"].tolist(), batch["index"].tolist()):
        if position == 4:
            continue
        decoded = decode_rgb(images.paths[index])
        h, w = decoded.shape[1:]
        y0, x0, y1, x1 = crop_window_normalized(position, size_index, 32)
        window = decoded[:, round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)]
        diff = (denormalize(image) - resize(window, 32).long()).abs()
        assert diff.float().mean() <= MEAN_ABS_TOLERANCE, (position, size_index)
        compared += 1
    assert compared >= 10


def test_crops_are_legal_and_cover_all_25_pairs(embedded_small):
    """One epoch of 2000 draws. Every pair occurs (P(a pair missing) <= 25 * (24/25)^2000 < 1e-30)
    and each count passes an exact binomial test at 1e-6 / 25 (false-failure rate <= 1e-6)."""
    images = read_coco(embedded_small.train_ann, embedded_small.train_images)
    loader = build_dali_train_loader(images, 8, 100, 0, 1, seed=4, num_threads=2)
    crops = torch.cat([b["crop"] for b in loader])
    n = len(crops)
    assert n == 2000 and crops.dtype == torch.int64
    assert ((crops[:, 0] >= 0) & (crops[:, 0] < NUM_POSITIONS) & (crops[:, 1] >= 0) & (crops[:, 1] < NUM_SIZES)).all()
    counts = Counter(map(tuple, crops.tolist()))
    assert len(counts) == NUM_POSITIONS * NUM_SIZES
    for k in counts.values():
        assert binomial_ok(k, n, 1 / 25, 1e-6 / 25)


def test_labels_match_the_annotation_file(generated):
    paths, train, _ = generated
    truth = coco_labels_by_file(paths.train_ann, paths.train_images)
    for batch in build_dali_train_loader(train, 16, 16, 0, 1, seed=0):
        for labels, index in zip(batch["labels"], batch["index"].tolist()):
            names = {train.class_names[c] for c in np.flatnonzero(labels.numpy())}
            assert names == truth[train.paths[index]]


def test_train_sharding_partitions_each_epoch(generated):
    """63 images, 2 ranks (shards of 31 and 32), batch 6: both ranks take 5 batches (30 images)
    per epoch, their samples are disjoint, and every epoch reshuffles across ranks."""
    images = generated[1].subset(range(63))
    loaders = [build_dali_train_loader(images, 16, 6, r, 2, seed=3) for r in range(2)]
    assert [len(loader) for loader in loaders] == [5, 5]
    orders = []
    for epoch in range(3):
        shards = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) and all(b["image"].shape[0] == 6 for b in batches)
            shards.append([i for b in batches for i in b["index"].tolist()])
        assert len(set(shards[0])) == len(shards[0]) == 30 and len(set(shards[1])) == 30
        assert not set(shards[0]) & set(shards[1])
        orders.append(shards[0] + shards[1])
    assert orders[0] != orders[1] != orders[2]
    # Over epochs the data is reshuffled across ranks, not stuck to one shard.
    assert len(set(orders[0][:30]) ^ set(orders[1][:30])) > 0
    with pytest.raises(ConfigError, match="batch_size=40"):
        build_dali_train_loader(images, 16, 40, 0, 2, seed=0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [4, 8, 64])
def test_eval_sharding_covers_every_image_once(generated, world_size, batch_size):
    val = generated[2]
    seen = []
    for rank in range(world_size):
        loader = build_dali_eval_loader(val, 16, batch_size, rank, world_size)
        for _ in range(2):  # the second pass is the same
            batches = list(loader)
            assert len(batches) == len(loader)
        seen += [i for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(len(val)))


def test_an_abandoned_pass_does_not_leak_into_the_next(generated):
    val = generated[2]
    loader = build_dali_eval_loader(val, 16, 4, 0, 1)
    for _ in loader:
        break
    assert [i for b in loader for i in b["index"].tolist()] == list(range(len(val)))
    train = build_dali_train_loader(generated[1], 16, 8, 0, 1, seed=0)
    next(iter(train))
    assert len({i for b in train for i in b["index"].tolist()}) == 64


def test_channels_last_and_half_precision(generated):
    val = generated[2]
    nchw = next(iter(build_dali_eval_loader(val, 24, 8, 0, 1)))["image"]
    nhwc = next(iter(build_dali_eval_loader(val, 24, 8, 0, 1, channels_last=True)))["image"]
    assert nhwc.shape == nchw.shape == (8, 3, 24, 24)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    torch.testing.assert_close(nhwc, nchw, rtol=0, atol=0)
    half = next(iter(build_dali_eval_loader(val, 24, 8, 0, 1, dtype=torch.float16)))["image"]
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), nchw, rtol=0, atol=2e-3 * nchw.abs().max().item())
    with pytest.raises(ConfigError, match="float32 or float16"):
        build_dali_eval_loader(val, 24, 8, 0, 1, dtype=torch.bfloat16)


def test_a_broken_file_is_a_data_error_naming_the_fix(generated, tmp_path):
    val = generated[2]
    broken = tmp_path / "broken.jpg"
    broken.write_text("<html>404</html>")
    images = LabeledImages("broken", [val.paths[0], str(broken)], val.labels[:2], val.class_names)
    with pytest.raises(DataError, match="fastmlgan check"):
        list(build_dali_eval_loader(images, 16, 2, 0, 1))


@pytest.mark.gpu
def test_gpu_pipeline_matches_the_cpu_pipeline(generated):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    val = generated[2]
    cpu = next(iter(build_dali_eval_loader(val, 32, 8, 0, 1)))
    gpu = next(iter(build_dali_eval_loader(val, 32, 8, 0, 1, device="cuda", channels_last=True)))
    assert gpu["image"].is_cuda and gpu["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gpu["index"], cpu["index"])
    # nvJPEG's chroma upsampling and the GPU resize differ from libjpeg-turbo + CPU resize slightly.
    diff = (denormalize(gpu["image"]) - denormalize(cpu["image"])).abs().float()
    assert diff.mean() <= 2.0
    train = next(iter(build_dali_train_loader(val, 32, 8, 0, 1, seed=0, device="cuda")))
    assert train["image"].is_cuda and train["image"].shape == (8, 3, 32, 32)


@pytest.mark.slow
def test_training_cli_runs_with_the_dali_backend(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    run = tmp_path / "run"
    args = [
        "--preset", "smoke", "--data.backend", "dali", "--out", str(run), "--data.root", str(tmp_path / "data"),
        "--train.bce_epochs", "1", "--train.max_steps_per_epoch", "8",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "fastmlgan.train", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data.backend dali" in proc.stdout + proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert "mAP" in metrics["baseline"] and "mAP" in metrics["gan"]
    assert json.loads((run / "config.json").read_text())["data"]["backend"] == "dali"


DDP_WORKER = """
import json, sys
import torch.distributed as dist
from fastmlgan.config import DataConfig
from fastmlgan.distributed import init_distributed
from fastmlgan.data.factory import build_loaders, build_splits

info = init_distributed("gloo")
cfg = DataConfig(dataset="embedded", root=sys.argv[2], embedded_num_train=61, embedded_num_val=29,
                 embedded_image_size=32, image_size=16, batch_size=8, eval_batch_size=6, backend="dali", num_threads=1)
splits = build_splits(cfg, info)
train, val = build_loaders(cfg, splits, info, seed=0)
seen = {}
for epoch in range(2):
    train.set_epoch(epoch)
    seen[f"train{epoch}"] = [i for b in train for i in b["index"].tolist()]
seen["eval"] = [i for b in val for i in b["index"].tolist()]
gathered = [None] * info.world_size
dist.all_gather_object(gathered, seen)
if info.is_main:
    open(sys.argv[1], "w").write(json.dumps(gathered))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_torchrun_shards_through_the_registry(tmp_path):
    """Two gloo ranks, the registry's DALI loaders: per epoch the ranks' training samples are
    disjoint and equally many (61 images: 30 per rank, 7 full batches of 4 each); evaluation sees each
    of the 29 images exactly once."""
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = tmp_path / "seen.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(result), str(tmp_path / "data")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(result.read_text())
    for epoch in range(2):
        a, b = ranks[0][f"train{epoch}"], ranks[1][f"train{epoch}"]
        assert len(a) == len(b) == 28 and len(set(a) | set(b)) == 56
    assert sorted(ranks[0]["eval"] + ranks[1]["eval"]) == list(range(29))
