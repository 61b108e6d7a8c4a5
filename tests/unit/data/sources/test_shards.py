"""WebDataset shards (``fastmlgan shards build``, ``--data.dataset shards``): the shards hold the
files' own bytes, DALI's index as DALI writes it, and a manifest whose checksums catch a changed
byte; training from shards serves every sample with the labels, crop and pixels the torch backend
serves from the folder; the rank split serves each sample at most once an epoch (exactly once in
evaluation) with equal batch counts for a shard count not divisible by the world size; a pass
started mid-epoch equals the rest of a whole pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import import_extra

import_extra("shards", "webdataset")  # a skip without the extra; a failure under make test, which installs it

from fastmlgan.commands import shards as shards_command  # noqa: E402
from fastmlgan.config import DataConfig  # noqa: E402
from fastmlgan.data import factory  # noqa: E402
from fastmlgan.data.backends import shards as shard_backend  # noqa: E402
from fastmlgan.data.backends.shards import ShardLoader, ShardPlan  # noqa: E402
from fastmlgan.data.backends.torch_dataloader import FiveCropDataset  # noqa: E402
from fastmlgan.data.check import check  # noqa: E402
from fastmlgan.data.imagecache.build import build_cache  # noqa: E402
from fastmlgan.data.imagecache.format import Geometry  # noqa: E402
from fastmlgan.data.shardbuild import build_shards, verify  # noqa: E402
from fastmlgan.data.sources.coco import read_coco  # noqa: E402
from fastmlgan.data.sources.embedded import generate  # noqa: E402
from fastmlgan.data.sources.shards import open_split, read_manifest, sample_key  # noqa: E402
from fastmlgan.data.types import Splits  # noqa: E402
from fastmlgan.distributed import DistInfo  # noqa: E402
from fastmlgan.errors import ConfigError, DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[4]
SIZE = 32
NUM_TRAIN, PER_SHARD = 300, 28  # 11 shards (10 of 28, one of 20): divisible by neither 2 nor 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Splits:
    paths = generate(tmp_path_factory.mktemp("shards") / "data", num_train=NUM_TRAIN, num_val=61, image_size=40, seed=3)
    return Splits(read_coco(paths.train_ann, paths.train_images, name="train"),
                  read_coco(paths.val_ann, paths.val_images, name="val"))


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "shards"
    build_shards({"train": folder.train, "val": folder.val}, out, max_samples=PER_SHARD, progress=False)
    return out


def train_pattern(out: Path, n: int = 11) -> str:
    return f"{out}/train-{{000000..{n - 1:06d}}}.tar"


def val_pattern(out: Path) -> str:
    return f"{out}/val-{{000000..000002}}.tar"


def served(loader, epoch: int, start_batch: int = 0) -> list[dict]:
    loader.set_epoch(epoch, start_batch)
    return list(loader)


# -- the build --------------------------------------------------------------------------------


def test_shards_hold_the_files_bytes_labels_and_the_manifest_sums(folder, built):
    manifest = read_manifest(built)
    entry = manifest["splits"]["train"]
    assert [s["num_samples"] for s in entry["shards"]] == [PER_SHARD] * 10 + [NUM_TRAIN - 10 * PER_SHARD]
    assert entry["num_samples"] == NUM_TRAIN and manifest["splits"]["val"]["num_samples"] == len(folder.val)
    assert (built / "classes.txt").read_text().splitlines() == folder.train.class_names
    import hashlib
    import tarfile

    for s in entry["shards"]:
        data = (built / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    with tarfile.open(built / "train-000003.tar") as tar:  # an independent reader: the standard library's
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
    for i in range(3 * PER_SHARD, 4 * PER_SHARD):
        key = sample_key(i)
        assert members[f"{key}.jpg"] == Path(folder.train.paths[i]).read_bytes()  # not re-encoded
        assert members[f"{key}.labels"] == folder.train.labels[i].tobytes()
        meta = json.loads(members[f"{key}.json"])
        assert meta["index"] == i and meta["path"] == folder.train.paths[i]
        assert meta["labels"] == [folder.train.class_names[c] for c in np.flatnonzero(folder.train.labels[i])]
    assert np.array_equal(np.load(built / "train-labels.npy"), folder.train.labels)


def test_dali_index_files_equal_what_dalis_wds2idx_writes(built, tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="DALI's wds2idx tool (installed with DALI) is absent")
    for name in ("train-000000", "train-000010", "val-000001"):
        ref = tmp_path / f"{name}.idx"
        with wds2idx.IndexCreator(str(built / f"{name}.tar"), str(ref), verbose=False) as creator:
            creator.create_index()
        assert (built / f"{name}.idx").read_text() == ref.read_text(), name


def test_a_changed_byte_in_a_shard_is_caught_by_verify_check_and_the_cli(built, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    assert verify(copy, progress=False) == []
    shard = copy / "train-000004.tar"
    data = bytearray(shard.read_bytes())
    jpg = (copy / "train-000004.idx").read_text().splitlines()[6].split()  # sample 5: jpg OFFSET SIZE NAME ...
    assert jpg[0] == "jpg"
    data[int(jpg[1]) + int(jpg[2]) // 2] ^= 0x01  # inside a JPEG's data: the tar and its index are unchanged
    shard.write_bytes(bytes(data))
    problems = verify(copy, progress=False)
    assert len(problems) == 1 and "train-000004.tar" in problems[0] and "SHA-256" in problems[0], problems
    assert shards_command.main(["verify", str(copy)]) == 1
    assert "train-000004.tar" in capsys.readouterr().out
    cfg = DataConfig(dataset="shards", shards=train_pattern(copy), shards_val=val_pattern(copy), backend="torch")
    report = check(cfg, threads=2, progress=False)
    assert any("train-000004.tar" in f for f in report.offenders["unknown_label"]) and report.fatal, report.fatal


def test_check_passes_intact_shards_and_reports_a_broken_jpeg_inside_one(folder, tmp_path):
    import shutil

    images = folder.train.subset(range(40), name="train")
    src = tmp_path / "img"
    src.mkdir()
    paths = []
    for i, p in enumerate(images.paths):
        dest = src / f"{i:03d}.jpg"
        shutil.copy(p, dest)
        paths.append(str(dest))
    Path(paths[7]).write_bytes(Path(paths[7]).read_bytes()[:200])  # truncated
    images.paths = paths
    out = tmp_path / "sh"
    build_shards({"train": images, "val": folder.val.subset(range(10), name="val")}, out, max_samples=16, progress=False)
    cfg = DataConfig(dataset="shards", shards=f"{out}/train-{{000000..000002}}.tar", shards_val=f"{out}/val-000000.tar")
    report = check(cfg, threads=2, progress=False)
    assert report.counts["train"]["truncated"] == 1 and report.counts["train"]["unknown_label"] == 0
    assert sample_key(7) in report.offenders["truncated"][0] and not report.fatal


# -- the same samples as the folder -------------------------------------------------------------


def test_each_sample_has_the_folders_labels_crop_and_pixels(folder, built):
    images = open_split(train_pattern(built), "", "shards")
    loader = ShardLoader(images, SIZE, 16, 0, 1, train=True, seed=11, num_threads=2, window=50)
    reference = FiveCropDataset(folder.train, SIZE, train=True, seed=11)
    for epoch in (0, 3):
        seen = []
        for batch in served(loader, epoch):
            for j, index in enumerate(batch["index"].tolist()):
                expected = reference[(epoch, index)]
                assert torch.equal(batch["labels"][j], expected["labels"])
                assert torch.equal(batch["crop"][j], expected["crop"])
                assert torch.equal(batch["image"][j], expected["image"]), (epoch, index)
                seen.append(index)
        assert len(seen) == len(set(seen)) == (NUM_TRAIN // 16) * 16
        assert seen != sorted(seen)  # shuffled
    evaluation = ShardLoader(open_split(val_pattern(built), "", "shards_val"), SIZE, 16, 0, 1, train=False)
    reference = FiveCropDataset(folder.val, SIZE, train=False)
    batches = served(evaluation, 0)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(folder.val)))
    rows = [(batch, j) for batch in batches for j in range(len(batch["index"]))]
    for i, (batch, j) in enumerate(rows):
        assert torch.equal(batch["image"][j], reference[i]["image"])
        assert torch.equal(batch["labels"][j], reference[i]["labels"])


def test_real_coco_jpegs_from_shards_equal_the_folder(shared_data, tmp_path):
    coco = shared_data / "coco128"
    images = read_coco(coco / "instances_coco128.json", coco / "images" / "train2017", name="train")
    out = tmp_path / "coco"
    build_shards({"train": images, "val": images.subset(range(20), name="val")}, out, max_bytes=2 * 10**6,
                 progress=False)
    n = len(read_manifest(out)["splits"]["train"]["shards"])
    shard_images = open_split(f"{out}/train-{{000000..{n - 1:06d}}}.tar", "", "shards")
    loader = ShardLoader(shard_images, 64, 8, 0, 1, train=True, seed=2, num_threads=2, window=32)
    reference = FiveCropDataset(images, 64, train=True, seed=2)
    count = 0
    for batch in served(loader, 1):
        for j, index in enumerate(batch["index"].tolist()):
            expected = reference[(1, index)]
            assert torch.equal(batch["image"][j], expected["image"]) and torch.equal(batch["labels"][j], expected["labels"])
            assert torch.equal(batch["crop"][j], expected["crop"])
            count += 1
    assert count == len(images) // 8 * 8 and n > 2


def test_cache_built_from_shards_equals_the_cache_built_from_the_folder(folder, built, tmp_path):
    images = open_split(val_pattern(built), "", "shards_val")
    geometry = Geometry("eval", SIZE)
    from_shards = build_cache(images, geometry, tmp_path / "a.fmlc", progress=False, num_threads=2)
    from_folder = build_cache(folder.val, geometry, tmp_path / "b.fmlc", decoder="cpu", progress=False, num_threads=2)
    assert from_shards.header["decoder"] == "shards"
    assert np.array_equal(np.asarray(from_shards.pixels), np.asarray(from_folder.pixels))
    assert np.array_equal(from_shards.labels, from_folder.labels)


def test_pipe_urls_read_the_same_samples(built):
    local = ShardLoader(open_split(train_pattern(built, 4), "", "shards"), SIZE, 8, 0, 1, True, seed=1, window=20)
    piped = ShardLoader(open_split(f"pipe:cat {built}/train-{{000000..000003}}.tar", str(built / "manifest.json"),
                                   "shards"), SIZE, 8, 0, 1, True, seed=1, window=20)
    for a, b in zip(served(local, 2), served(piped, 2), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="shards_manifest"):
        open_split(f"pipe:cat {built}/train-000000.tar", "", "shards")


# -- the rank split ---------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("batch", [1, 7])
def test_every_sample_at_most_once_an_epoch_across_ranks_with_equal_batches(built, world_size, batch):
    images = open_split(train_pattern(built), "", "shards")
    assert len(images.shards) % world_size != 0
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world_size):
            # pixels_per_batch=0: the samples' indices and labels only, nothing decoded
            loader = ShardLoader(images, SIZE, batch, rank, world_size, True, seed=4, window=13, pixels_per_batch=0)
            batches = served(loader, epoch)
            assert len(batches) == len(loader) == (NUM_TRAIN // world_size) // batch
            indices = torch.cat([b["index"] for b in batches]).tolist()
            for b in batches:
                assert torch.equal(b["labels"], torch.from_numpy(images.labels[b["index"].numpy()].astype(np.float32)))
            per_rank.append(indices)
        everything = [i for indices in per_rank for i in indices]
        assert len(everything) == len(set(everything)), "a sample served twice in one epoch"
        # DistributedSampler(drop_last)'s count: floor(N / W) per rank, then whole batches only.
        assert len(everything) == world_size * ((NUM_TRAIN // world_size) // batch * batch)
        if batch == 1:
            assert len(set(range(NUM_TRAIN)) - set(everything)) == NUM_TRAIN % world_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_serves_every_sample_exactly_once_across_ranks(built, world_size):
    images = open_split(val_pattern(built), "", "shards_val")
    everything = []
    for rank in range(world_size):
        loader = ShardLoader(images, SIZE, 8, rank, world_size, False, pixels_per_batch=0)
        everything += torch.cat([b["index"] for b in served(loader, 0)]).tolist()
    assert sorted(everything) == list(range(len(images)))


def test_rank_ranges_split_shards_by_samples(built):
    """A hand-computed case: 11 shards (10 x 28 + 20), 3 ranks: 100 positions each, so rank 1
    starts inside the epoch's 4th shard at sample 100 - 3 * 28 = 16."""
    images = open_split(train_pattern(built), "", "shards")
    plan = ShardPlan(images, 10, 1, 3, train=True, seed=0)
    order = plan.order()
    pieces = plan.pieces(0, 100)
    sizes = [images.shards[k].num_samples for k in order]
    before = np.cumsum([0] + sizes)
    first = int(np.searchsorted(before, 100, side="right")) - 1
    assert pieces[0] == (order[first], 100 - before[first], min(sizes[first], before[first + 1] - 100))
    assert sum(count for _, _, count in pieces) == 100


# -- resuming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("start_batch", [1, 5, 9])
def test_a_pass_started_mid_epoch_equals_the_rest_of_a_whole_pass(built, start_batch):
    images = open_split(train_pattern(built), "", "shards")
    loader = ShardLoader(images, SIZE, 12, 1, 2, True, seed=9, num_threads=2, window=40)
    whole = served(loader, 4)
    resumed = served(loader, 4, start_batch)
    assert len(resumed) == len(whole) - start_batch
    for a, b in zip(whole[start_batch:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_loader_stopped_early_leaves_no_reader_thread(built):
    import threading

    loader = ShardLoader(open_split(train_pattern(built), "", "shards"), SIZE, 4, 0, 1, True, window=8)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "fastmlgan-shards-reader"]
    loader.close()


# -- bad images and bad input -----------------------------------------------------------------


def test_undecodable_image_skip_stands_in_and_error_names_it(folder, tmp_path):
    import shutil

    images = folder.train.subset(range(24), name="train")
    paths = []
    for i, p in enumerate(images.paths):
        dest = tmp_path / f"{i:03d}.jpg"
        shutil.copy(p, dest)
        paths.append(str(dest))
    Path(paths[5]).write_bytes(b"not a jpeg at all")
    images.paths = paths
    out = tmp_path / "sh"
    build_shards({"train": images, "val": images}, out, max_samples=10, progress=False)
    split = open_split(f"{out}/train-{{000000..000002}}.tar", "", "shards")
    loader = ShardLoader(split, SIZE, 8, 0, 1, True, seed=0, window=24)
    batches = served(loader, 0)
    rows = [(b, j) for b in batches for j in range(8) if b["bad"][j]]
    assert len(rows) == 1
    b, j = rows[0]
    stand_in = int(b["index"][j])
    assert stand_in != 5 and torch.equal(b["labels"][j], torch.from_numpy(images.labels[stand_in].astype(np.float32)))
    reference = FiveCropDataset(images, SIZE, train=True, seed=0)
    position, size = b["crop"][j].tolist()  # the slot's crop, applied to the stand-in's image
    expected = reference[(0, stand_in)]
    if expected["crop"].tolist() == [position, size]:
        assert torch.equal(b["image"][j], expected["image"])
    strict = ShardLoader(split, SIZE, 8, 0, 1, True, seed=0, window=24, on_bad_image="error")
    with pytest.raises(DataError, match=rf"train-000000\.tar@\w+/{sample_key(5)}: cannot decode"):
        served(strict, 0)


def test_bad_options_are_one_line_errors(built, tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        open_split(f"{tmp_path}/train-000000.tar", "", "shards")
    with pytest.raises(ConfigError, match="not a shard of"):
        open_split(f"{built}/train-000099.tar", "", "shards")
    with pytest.raises(ConfigError, match="mix the splits"):
        open_split(f"{built}/train-000000.tar::{built}/val-000000.tar", "", "shards")
    cfg = DataConfig(dataset="shards", shards=train_pattern(built), shards_val=val_pattern(built), backend="dali")
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match="--data.backend dali reads image files"):
        factory.data_backend(cfg, factory.build_splits(cfg, info), info)
    with pytest.raises(ConfigError, match="already holds shards"):
        build_shards({"train": factory.build_splits(cfg, info).val}, built, max_samples=5, progress=False)
    with pytest.raises(ConfigError, match="--shard-size"):
        shards_command.parse_size("12 parsecs")
    assert shards_command.parse_size("256MB") == (256 * 10**6, None) and shards_command.parse_size("1000") == (None, 1000)


def test_factory_picks_the_shards_loader_and_training_order_is_seeded(built):
    cfg = DataConfig(dataset="shards", shards=train_pattern(built), shards_val=val_pattern(built), batch_size=8,
                     image_size=SIZE, num_threads=2)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    splits = factory.build_splits(cfg, info)
    train, evaluation = factory.build_loaders(cfg, splits, info, seed=5)
    assert isinstance(train, shard_backend.ShardLoader) and isinstance(evaluation, shard_backend.ShardLoader)
    other = factory.build_loaders(cfg, splits, info, seed=6)[0]
    first = torch.cat([b["index"] for b in served(train, 0)])
    assert torch.equal(torch.cat([b["index"] for b in served(train, 0)]), first)  # the same seed, the same order
    assert not torch.equal(torch.cat([b["index"] for b in served(other, 0)]), first)  # another seed, another


def test_cli_builds_shards_from_a_coco_folder(folder, tmp_path):
    out = tmp_path / "cli"
    ann = Path(folder.train.paths[0]).parents[1] / "annotations"
    cmd = [sys.executable, "-m", "fastmlgan", "shards", "build", "--out", str(out), "--shard-size", "64KB",
           "--data.dataset", "coco", "--data.train_annotations", str(ann / "instances_train.json"),
           "--data.train_images", str(Path(folder.train.paths[0]).parent),
           "--data.val_annotations", str(ann / "instances_val.json"), "--data.val_images", str(Path(folder.val.paths[0]).parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = read_manifest(out)
    assert manifest["splits"]["train"]["num_samples"] == NUM_TRAIN
    assert all(s["bytes"] <= 64 * 10**3 or s["num_samples"] == 1 for s in manifest["splits"]["train"]["shards"])
    again = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: --out")
