"""The decoded-image cache: the same batches as the torch backend, and every way a cache file can
be wrong (stale, other geometry, truncated, edited, interrupted, no disk space, bad images)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_helpers import MAX_ABS_TOLERANCE, MEAN_ABS_TOLERANCE, denormalize, shifted_crop

from fastmlgan.commands import cache as cache_command
from fastmlgan.config import DataConfig, build_config
from fastmlgan.data import factory
from fastmlgan.data.backends.dali import dali_available
from fastmlgan.data.backends.torch_dataloader import FiveCropDataset, build_eval_loader, build_train_loader
from fastmlgan.data.factory import build_loaders, resolve_backend
from fastmlgan.data.geometry import decode_rgb
from fastmlgan.data.imagecache import build as cache_mod
from fastmlgan.data.imagecache import decode as cache_decode
from fastmlgan.data.imagecache.build import build_cache, ensure_cache
from fastmlgan.data.imagecache.format import CacheError, Geometry, ImageCache, cache_path
from fastmlgan.data.imagecache.loader import CacheLoader, check_gpu_fit, usable_gpu_memory
from fastmlgan.data.sources.coco import read_coco
from fastmlgan.data.sources.embedded import generate
from fastmlgan.data.types import LabeledImages, Splits
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[4]
CPU = torch.device("cpu")
SIZE = 32  # training rows 37x37, evaluation rows 32x32


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Splits:
    paths = generate(tmp_path_factory.mktemp("cache") / "data", num_train=45, num_val=23, image_size=48, seed=5)
    return Splits(read_coco(paths.train_ann, paths.train_images), read_coco(paths.val_ann, paths.val_images))


@pytest.fixture(scope="module")
def built(splits, tmp_path_factory):
    """Both caches of ``splits`` at SIZE, built once for the read-only tests."""
    directory = tmp_path_factory.mktemp("built")
    return (ensure_cache(splits.train, Geometry("train", SIZE), directory, progress=False),
            ensure_cache(splits.val, Geometry("eval", SIZE), directory, progress=False))


def copy_images(images: LabeledImages, dest: Path) -> LabeledImages:
    """A writable copy of the image files (same labels), for tests that damage or touch them."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, p in enumerate(images.paths):
        paths.append(str(dest / f"{i:03d}{Path(p).suffix}"))
        shutil.copy(p, paths[-1])
    return LabeledImages(images.name, paths, images.labels.copy(), list(images.class_names))


def assert_same_batches(cache_loader, torch_loader, epochs=(0, 1)) -> int:
    """Batch for batch, the same order, crops, labels and pixels (bit for bit)."""
    n = 0
    for epoch in epochs:
        cache_loader.set_epoch(epoch)
        torch_loader.set_epoch(epoch)
        ours, theirs = list(cache_loader), list(torch_loader)
        assert len(ours) == len(theirs) == len(cache_loader)
        for a, b in zip(ours, theirs):
            assert set(a) == set(b) == {"image", "labels", "crop", "index", "bad"}
            for key in ("labels", "crop", "index", "bad"):
                assert torch.equal(a[key], b[key]), key
            assert a["image"].dtype == torch.float32 and torch.equal(a["image"], b["image"])
            n += len(a["index"])
    return n


# -- the same batches as the torch backend -------------------------------------------------------


def test_batches_equal_the_torch_backend(splits, built):
    train_cache, val_cache = built
    ours = CacheLoader(train_cache, SIZE, 8, 0, 1, train=True, seed=3, num_threads=2)
    ref = build_train_loader(FiveCropDataset(splits.train, SIZE, True, seed=3), 8, 0, 1, seed=3)
    assert assert_same_batches(ours, ref) == 2 * 40  # 45 images, batch 8, the partial batch dropped
    ours = CacheLoader(val_cache, SIZE, 8, 0, 1, train=False, num_threads=2)
    ref = build_eval_loader(FiveCropDataset(splits.val, SIZE, False), 8, 0, 1)
    assert assert_same_batches(ours, ref, epochs=(0,)) == 23
    assert train_cache.pixels.shape == (45, 37, 37, 3) and val_cache.pixels.shape == (23, 32, 32, 3)


def test_list_file_reader(splits, tmp_path):
    """Any reader's ``LabeledImages`` (here a list file) caches and serves like the torch backend."""
    from fastmlgan.data.sources.listfile import read_list

    (tmp_path / "names.txt").write_text("\n".join(splits.train.class_names) + "\n")
    rows = [f"{p},{';'.join(n for n, on in zip(splits.train.class_names, lab) if on)}"
            for p, lab in zip(splits.train.paths[:20], splits.train.labels[:20])]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    # Absolute paths into another folder: allowed by name (issue 18).
    images = read_list(tmp_path / "train.csv", splits.train.class_names, None, True, name="list", allow_outside_root=True)
    cache = ensure_cache(images, Geometry("train", SIZE), tmp_path / "c", progress=False)
    ours = CacheLoader(cache, SIZE, 4, 0, 1, train=True, seed=1)
    assert assert_same_batches(ours, build_train_loader(FiveCropDataset(images, SIZE, True, seed=1), 4, 0, 1, seed=1)) == 40


@pytest.mark.realdata
def test_crops_and_eval_images_equal_torch_on_coco128(shared_data, tmp_path):
    root = shared_data / "coco128"
    images = read_coco(root / "instances_coco128.json", root / "images" / "train2017").subset(range(24))
    train = ensure_cache(images, Geometry("train", 224), tmp_path, progress=False)
    val = ensure_cache(images, Geometry("eval", 224), tmp_path, progress=False)
    assert train.pixels.shape[1:] == (256, 256, 3)
    ours = CacheLoader(train, 224, 8, 0, 1, train=True, seed=7, num_threads=2)
    ref = build_train_loader(FiveCropDataset(images, 224, True, seed=7), 8, 0, 1, seed=7)
    assert assert_same_batches(ours, ref, epochs=(0,)) == 24
    ours = CacheLoader(val, 224, 12, 0, 1, train=False)
    assert assert_same_batches(ours, build_eval_loader(FiveCropDataset(images, 224, False), 12, 0, 1), epochs=(0,)) == 24


def test_other_decoders_within_the_dali_tolerance(splits):
    """The GPU decoders' code paths run here on CPU: torchvision's libjpeg-turbo decode, and (when
    installed) DALI's CPU pipeline; their rows against the torch loader's decode and resize."""
    images = splits.train.subset(range(16))
    side = Geometry("train", SIZE).side
    reference = [torch.from_numpy(r) for _, rows in cache_decode.rows_cpu(images, side, 16, 1) for r in rows]
    sources = [cache_decode.rows_torchvision]
    if dali_available():
        sources.append(cache_decode.rows_dali)
    for rows_of in sources:
        rows = [torch.from_numpy(np.asarray(r)) for _, chunk in rows_of(images, side, 5, 2, "cpu") for r in chunk]
        assert len(rows) == 16
        diff = torch.stack([(a.long() - b.long()).abs() for a, b in zip(rows, reference)])
        assert diff.float().mean() <= MEAN_ABS_TOLERANCE and diff.max() <= MAX_ABS_TOLERANCE, rows_of.__name__
        # A row of another image is far outside the tolerance.
        assert (rows[0].long() - reference[1].long()).abs().float().mean() > 3 * MEAN_ABS_TOLERANCE


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed (pip install '.[dali]')")
def test_dali_built_cache_serves_crops_within_tolerance(splits, tmp_path):
    images = splits.train.subset(range(16))
    cache = build_cache(images, Geometry("train", SIZE), tmp_path / "d.fmlc", decoder="dali", progress=False)
    assert cache.header["decoder"] == "dali"
    batch = next(iter(CacheLoader(cache, SIZE, 16, 0, 1, train=True, seed=2)))
    shifted = []
    for image, crop, index in zip(batch["image"], batch["crop"].tolist(), batch["index"].tolist()):
        from fastmlgan.data.geometry import five_crop

        decoded = decode_rgb(images.paths[index])
        diff = (denormalize(image) - five_crop(decoded, *crop, SIZE).long()).abs()
        assert diff.float().mean() <= MEAN_ABS_TOLERANCE and diff.max() <= MAX_ABS_TOLERANCE
        if crop[1] > 0:
            shifted.append((denormalize(image) - shifted_crop(decoded, *crop, SIZE).long()).abs().float().mean())
    assert float(np.mean(shifted)) > 3 * MEAN_ABS_TOLERANCE  # the tolerance sees a window one pixel off


def test_two_ranks_and_pixels_per_batch(splits, built):
    """45 images, 2 ranks, batch 4: 5 batches each, disjoint, in the torch loader's order; the 23
    evaluation images exactly once across ranks. ``pixels_per_batch``: only the first K images."""
    train_cache, val_cache = built
    for epoch in (0, 1):
        shards = []
        for rank in range(2):
            ours = CacheLoader(train_cache, SIZE, 4, rank, 2, train=True, seed=1)
            ref = build_train_loader(FiveCropDataset(splits.train, SIZE, True, seed=1), 4, rank, 2, seed=1)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            got = [i for b in ours for i in b["index"].tolist()]
            assert got == [i for b in ref for i in b["index"].tolist()]
            shards.append(got)
        assert len(set(shards[0])) == len(set(shards[1])) == 20 and not set(shards[0]) & set(shards[1])
    seen = [i for rank in range(2) for b in CacheLoader(val_cache, SIZE, 4, rank, 2, train=False) for i in b["index"].tolist()]
    assert sorted(seen) == list(range(23))
    full = list(CacheLoader(train_cache, SIZE, 8, 0, 1, train=True, seed=4))
    part = list(CacheLoader(train_cache, SIZE, 8, 0, 1, train=True, seed=4, pixels_per_batch=3))
    for a, b in zip(full, part):
        assert b["image"].shape == (3, 3, SIZE, SIZE) and torch.equal(b["image"], a["image"][:3])
        assert all(torch.equal(a[k], b[k]) for k in ("labels", "crop", "index", "bad"))
    evaluation = list(CacheLoader(val_cache, SIZE, 8, 0, 1, train=False, pixels_per_batch=0))
    assert [b["image"].shape[0] for b in evaluation] == [0, 0, 0] and sum(len(b["index"]) for b in evaluation) == 23


def test_rank0_builds_the_others_wait(splits, tmp_path, monkeypatch):
    """ensure_cache under 2 ranks: rank 0 builds; rank 1 never builds, opens rank 0's file after
    the broadcast (stands in for the collective), and stops with rank 0's reason when it failed."""

    geometry = Geometry("train", SIZE)
    rank1 = DistInfo(1, 2, 0, CPU)
    told = []
    monkeypatch.setattr(cache_mod, "broadcast_object", lambda obj, info: told.append(obj) or told[0])
    monkeypatch.setattr(cache_mod, "build_cache", lambda *a, **k: pytest.fail("rank 1 must not build"))
    with pytest.raises(CacheError, match=r"rank 1: .*\.fmlc is missing after rank 0 built it: --data.cache_dir must be"):
        ensure_cache(splits.train, geometry, tmp_path, info=rank1)  # rank 0 said OK, but this process sees no file
    monkeypatch.undo()
    monkeypatch.setattr(cache_mod, "broadcast_object", lambda obj, info: obj)
    built = ensure_cache(splits.train, geometry, tmp_path, info=DistInfo(0, 2, 0, CPU), progress=False)
    monkeypatch.setattr(cache_mod, "build_cache", lambda *a, **k: pytest.fail("rank 1 must not build"))
    monkeypatch.setattr(cache_mod, "broadcast_object", lambda obj, info: None)
    assert ensure_cache(splits.train, geometry, tmp_path, info=rank1).path == built.path
    monkeypatch.setattr(cache_mod, "broadcast_object", lambda obj, info: "DataError: x.jpg: cannot decode image")
    with pytest.raises(CacheError, match="rank 0 could not provide the cache .*: DataError: x.jpg: cannot decode image"):
        ensure_cache(splits.train, geometry, tmp_path, info=rank1)


# -- auto, config, registry ------------------------------------------------------------------------


def test_auto_takes_the_cache_only_when_current_caches_exist(splits, tmp_path, caplog):
    cfg = DataConfig(backend="auto", cache_dir=str(tmp_path), image_size=SIZE, batch_size=8, eval_batch_size=8, num_workers=0,
                     cache_auto_share=0)  # never build: tests/test_auto_cache.py has the building
    info = DistInfo(0, 1, 0, CPU)
    with caplog.at_level(logging.INFO):
        assert isinstance(build_loaders(cfg, splits, info, 0)[0], torch.utils.data.DataLoader)
        ensure_cache(splits.train, Geometry("train", SIZE), tmp_path, progress=False)
        assert isinstance(build_loaders(cfg, splits, info, 0)[0], torch.utils.data.DataLoader)  # eval cache missing
        ensure_cache(splits.val, Geometry("eval", SIZE), tmp_path, progress=False)
        caplog.clear()
        train, val = build_loaders(cfg, splits, info, 0)
        assert isinstance(train, CacheLoader) and isinstance(val, CacheLoader)
        assert f"data.backend auto -> cache (current caches of both splits in {tmp_path})" in caplog.text
    # A cache for another image size is not "a cache for this geometry".
    other = DataConfig(backend="auto", cache_dir=str(tmp_path), image_size=24, batch_size=8, num_workers=0, cache_auto_share=0)
    assert isinstance(build_loaders(other, splits, info, 0)[0], torch.utils.data.DataLoader)
    assert resolve_backend("auto", CPU, cached="") == "torch" and resolve_backend("auto", CPU, cached="d") == "cache"


def test_config_options():
    assert build_config({"data.backend": "cache", "data.cache_device": "cuda"}).data.cache_device == "cuda"
    with pytest.raises(ConfigError, match="--data.cache_device: 'gpu' is not one of cpu, cuda"):
        DataConfig(cache_device="gpu")
    with pytest.raises(ConfigError, match="--data.backend cache stores decoded images.*features"):
        DataConfig(dataset="features", backend="cache")
    check_gpu_fit(2**30, free=70 * 2**30, total=80 * 2**30, what="x", device="cuda:0")
    with pytest.raises(ConfigError, match=r"x needs 16.00 GiB of GPU memory, but cuda:0 has 10.00 GiB free.*cache_device cpu"):
        check_gpu_fit(16 * 2**30, free=10 * 2**30, total=80 * 2**30, what="x", device="cuda:0")
    with pytest.raises(ConfigError, match="8.00 GiB must stay free"):  # fits in free memory, but not with the headroom
        check_gpu_fit(70 * 2**30, free=75 * 2**30, total=80 * 2**30, what="x", device="cuda:0")


def test_registry_refuses_cuda_cache_device_on_cpu(splits, tmp_path):
    cfg = DataConfig(backend="cache", cache_device="cuda", cache_dir=str(tmp_path), image_size=SIZE, batch_size=8)
    with pytest.raises(ConfigError, match="--data.cache_device cuda keeps the cache in GPU memory, but this process runs on cpu"):
        build_loaders(cfg, splits, DistInfo(0, 1, 0, CPU), 0)
    assert not list(tmp_path.iterdir())  # refused before building anything


# -- files that must not be used -----------------------------------------------------------------


def test_stale_cache_is_rebuilt_with_the_reason(splits, tmp_path, caplog):
    images = copy_images(splits.train.subset(range(6)), tmp_path / "img")
    geometry = Geometry("train", SIZE)
    first = ensure_cache(images, geometry, tmp_path, progress=False)
    old_row = first.pixels[2].copy()
    # Rewrite image 2 with image 5's bytes: same name, new size and content.
    shutil.copy(splits.train.paths[5], images.paths[2])
    with caplog.at_level(logging.INFO, logger="fastmlgan.data.imagecache.build"):
        second = ensure_cache(images, geometry, tmp_path, progress=False)
    assert f"is stale (1 file(s) changed since it was built, first {images.paths[2]} (size" in caplog.text
    assert "rebuilding it" in caplog.text
    assert not np.array_equal(second.pixels[2], old_row) and np.array_equal(second.pixels[2], second.pixels[5])
    # Only the modification time changes: stale too.
    st = os.stat(images.paths[0])
    os.utime(images.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "(modification time" in ImageCache.open(second.path).stale_reason(images)
    # New labels: stale.
    relabelled = LabeledImages(images.name, images.paths, 1 - images.labels, images.class_names)
    assert "labels" in ImageCache.open(second.path).stale_reason(relabelled)


def test_other_geometry_is_refused_by_name(built, splits, tmp_path):
    train_cache, _ = built
    with pytest.raises(CacheError, match=rf"{train_cache.path}: a cache for five-crop training at 32 px \(37x37 rows\), "
                                         r"but this run needs evaluation at 32 px \(32x32 rows\)"):
        ImageCache.open(train_cache.path, Geometry("eval", SIZE))
    # A file at the path of another geometry (renamed) is refused, not overwritten or used.
    other = cache_path(splits.train, Geometry("train", 48), tmp_path)
    shutil.copy(train_cache.path, other)
    with pytest.raises(CacheError, match=rf"{other}: a cache for five-crop training at 32 px"):
        ensure_cache(splits.train, Geometry("train", 48), tmp_path, progress=False)
    with pytest.raises(CacheError, match="this loader serves five-crop training at 48 px"):
        CacheLoader(train_cache, 48, 4, 0, 1, train=True)


def test_truncated_or_edited_files_are_refused_by_name(built, splits, tmp_path):
    source = built[0].path
    path = cache_path(splits.train, Geometry("train", SIZE), tmp_path)

    def damaged(edit) -> str:
        shutil.copy(source, path)
        data = bytearray(path.read_bytes())
        path.write_bytes(bytes(edit(data)))
        with pytest.raises(CacheError) as err:
            ensure_cache(splits.train, Geometry("train", SIZE), tmp_path, progress=False)
        assert str(path) in str(err.value)
        return str(err.value)

    assert "truncated or edited" in damaged(lambda d: d[:-1000])
    assert "truncated" in damaged(lambda d: d[:100])
    header_at = bytes(source.read_bytes()).rindex(b'"num_images": 45')
    assert "header checksum mismatch" in damaged(lambda d: d[:header_at] + b'"num_images": 44' + d[header_at + 16 :])
    labels_at = cache_mod.read_header(source)["sections"]["labels"]["offset"]

    def flip(at):
        def edit(d):
            d[at] ^= 1
            return d
        return edit

    assert "labels section fails its checksum" in damaged(flip(labels_at))
    # A pixel edited by hand passes the cheap checks on open; ``verify`` finds it by its chunk.
    shutil.copy(source, path)
    data = bytearray(path.read_bytes())
    data[cache_mod.PREAMBLE_BYTES + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"{path}: pixel rows 0-44 fail their checksum"):
        ImageCache.open(path).verify()
    built[0].verify()


def test_crash_mid_build_leaves_no_complete_looking_cache(splits, tmp_path, monkeypatch):
    images = splits.train.subset(range(12))
    geometry = Geometry("train", SIZE)
    path = cache_path(images, geometry, tmp_path)
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 4 * 37 * 37 * 3)  # 3 chunks of 4 rows
    real = cache_mod._ROW_SOURCES["cpu"]

    def crashing(*args):
        for k, chunk in enumerate(real(*args)):
            if k == 1:
                raise RuntimeError("simulated crash")
            yield chunk

    monkeypatch.setitem(cache_mod._ROW_SOURCES, "cpu", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_cache(images, geometry, tmp_path, progress=False)
    assert not path.exists() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    # A process killed (SIGKILL) mid-build leaves its temp file, which is not a cache and is
    # removed by the next build.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'helpers'}"}
    listing = tmp_path / "paths.json"
    listing.write_text(json.dumps(images.paths))
    proc = subprocess.Popen([sys.executable, "-c", HANG_AFTER_FIRST_CHUNK, str(path), str(listing)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = tmp_path / "first-chunk-written"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.stdout.read() if proc.poll() is not None else "timeout"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob(".*.tmp"))
    assert not path.exists() and len(left) == 1
    with pytest.raises(CacheError, match="not a complete fastmlgan cache"):
        ImageCache.open(left[0])
    monkeypatch.setitem(cache_mod._ROW_SOURCES, "cpu", real)
    assert len(ensure_cache(images, geometry, tmp_path, progress=False)) == 12
    assert not list(tmp_path.glob(".*.tmp"))


# Run with python -c (no torch import: starts in a fraction of a second): builds with rows of
# zeros, touches a marker after the first chunk is written, then hangs until killed.
HANG_AFTER_FIRST_CHUNK = """
import json, sys, time
from pathlib import Path
import numpy as np
from fastmlgan.data.imagecache import build as cache
from fastmlgan.data.types import LabeledImages
path, paths = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
cache.CHUNK_BYTES = 4 * 37 * 37 * 3
def rows(images, side, chunk_rows, num_threads, device):
    for start in range(0, len(images), chunk_rows):
        if start:
            (path.parent / "first-chunk-written").touch()
            time.sleep(600)
        yield start, [np.zeros((side, side, 3), np.uint8)] * min(chunk_rows, len(images) - start)
cache._ROW_SOURCES["cpu"] = rows
images = LabeledImages("x", paths, np.ones((len(paths), 1), np.uint8), ["a"])
cache.build_cache(images, cache.Geometry("train", 32), path, decoder="cpu", progress=False)
"""


def test_full_disk_keeps_the_previous_cache_and_says_how_much(splits, tmp_path, monkeypatch):
    images = copy_images(splits.train.subset(range(8)), tmp_path / "img")
    geometry = Geometry("train", SIZE)
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 4 * 37 * 37 * 3)  # 2 chunks of 4 rows
    previous = ensure_cache(images, geometry, tmp_path, progress=False)
    size, before = previous.nbytes, previous.path.read_bytes()
    os.utime(images.paths[0], ns=(0, 10**9))  # stale: the next ensure_cache rebuilds
    with monkeypatch.context() as m:
        m.setattr(cache_mod, "_free_bytes", lambda d: 1000)
        with pytest.raises(CacheError, match=r"not enough disk space .* \(checked before building\): it needs (\d+) "
                                             r"bytes .*1000 bytes .* free; the existing .* is kept") as err:
            ensure_cache(images, geometry, tmp_path, progress=False)
    needed = int(str(err.value).split("needs ")[1].split(" bytes")[0])
    assert size <= needed <= size + 2**17  # the real size, plus room for the JSON header
    calls = []

    def enospc_on_second(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    real_pwrite = cache_mod._pwrite_all
    monkeypatch.setattr(cache_mod, "_pwrite_all", enospc_on_second)
    with pytest.raises(CacheError, match=rf"the disk filled up while writing\): it needs {needed} bytes"):
        ensure_cache(images, geometry, tmp_path, progress=False)
    assert previous.path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(cache_mod, "_pwrite_all", real_pwrite)

    def no_room(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(CacheError, match=rf"\(reserving it\): it needs {needed} bytes"):
        ensure_cache(images, geometry, tmp_path, progress=False)
    assert previous.path.read_bytes() == before


@pytest.mark.realdata
def test_bad_images_at_build_time(shared_data, tmp_path, caplog):
    root = shared_data / "coco128"
    images = copy_images(read_coco(root / "instances_coco128.json", root / "images" / "train2017").subset(range(6)),
                         tmp_path / "img")
    raw = Path(images.paths[1]).read_bytes()
    Path(images.paths[1]).write_bytes(raw[: len(raw) // 3])  # truncated JPEG
    Path(images.paths[5]).write_bytes(os.urandom(2000))  # not an image; wraps to image 0
    geometry = Geometry("train", SIZE)
    with pytest.raises(DataError, match=rf"{images.paths[1]}: cannot decode image"):
        ensure_cache(images, geometry, tmp_path / "error", "error", progress=False)
    assert not list((tmp_path / "error").glob("*.fmlc"))
    with caplog.at_level(logging.WARNING):
        cache = ensure_cache(images, geometry, tmp_path / "skip", "skip", progress=False)
    assert cache.num_bad == 2 and cache.bad.tolist() == [False, True, False, False, False, True]
    assert cache.source.tolist() == [0, 2, 2, 3, 4, 0]
    assert f"skipping undecodable image {images.paths[1]}" in caplog.text and "2 of 6 images cannot be decoded" in caplog.text
    ours = CacheLoader(cache, SIZE, 3, 0, 1, train=True, seed=5)
    ref = build_train_loader(FiveCropDataset(images, SIZE, True, seed=5, on_bad_image="skip"), 3, 0, 1, seed=5)
    assert assert_same_batches(ours, ref, epochs=(0,)) == 6
    with pytest.raises(DataError, match=rf"{images.paths[1]}: cannot decode image \(2 such in .*on_bad_image error"):
        ensure_cache(images, geometry, tmp_path / "skip", "error", progress=False)
    for p in images.paths:
        Path(p).write_bytes(b"broken")
    with pytest.raises(DataError, match="none of the 6 images can be decoded"):
        ensure_cache(images, geometry, tmp_path / "none", "skip", progress=False)


def test_cli_build_info_verify(tmp_path, capsys):
    data, caches = tmp_path / "data", tmp_path / "caches"
    options = ["--preset", "smoke", "--data.root", str(data), "--data.cache_dir", str(caches)]
    assert cache_command.main(["build", *options]) == 0
    files = sorted(caches.glob("*.fmlc"))
    assert len(files) == 2 and "-train37-" in files[0].name and "-eval32-" in files[1].name
    assert cache_command.main(["info", "--data.cache_dir", str(caches)]) == 0
    out = capsys.readouterr().out
    assert "256 images (0 bad), five-crop training at 32 px (37x37 rows)" in out and "128 images (0 bad), evaluation" in out
    assert cache_command.main(["verify", *map(str, files)]) == 0
    data_bytes = bytearray(files[0].read_bytes())
    data_bytes[cache_mod.PREAMBLE_BYTES] ^= 1
    files[0].write_bytes(bytes(data_bytes))
    assert cache_command.main(["verify", str(files[0])]) == 2
    assert "fail their checksum" in capsys.readouterr().err
    assert cache_command.main(["build", "--preset", "reproduce-mulan"]) == 2
    assert "feature vectors" in capsys.readouterr().err


def test_usable_gpu_memory_counts_reserved_but_unused_memory(monkeypatch):
    # 20 GiB free for the driver, 50 GiB reserved by PyTorch of which 10 GiB hold tensors: a new
    # allocation gets the 40 GiB the caching allocator keeps plus the 20 GiB free.
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    free, total = usable_gpu_memory("cuda:0")
    assert (free, total) == (60 * gib, 80 * gib)
    check_gpu_fit(45 * gib, free, total, what="x", device="cuda:0")  # refused when reserved counted as used


def test_phase2_loader_shares_the_cache_and_its_gpu_copy(splits, built):
    train_cache, _ = built
    loader = CacheLoader(train_cache, SIZE, 4, 0, 1, train=True, seed=3)
    loader._gpu_pixels = torch.from_numpy(np.asarray(train_cache.pixels))  # stands for the GPU copy
    wide = loader.with_batch(20, pixels_per_batch=8)
    assert wide._gpu_pixels is loader._gpu_pixels and wide.cache is loader.cache
    assert (wide.batch_size, wide.pixels_per_batch, wide.seed) == (20, 8, 3)
    with pytest.raises(ConfigError, match="a batch of 60 per rank needs 60 training images"):
        loader.with_batch(60)


def test_trainer_builds_phase2_from_the_phase1_cache_loader(splits, tmp_path, monkeypatch):
    from fastmlgan.train.trainer import Trainer

    images = copy_images(splits.train, tmp_path / "train")
    both = Splits(images, copy_images(splits.val, tmp_path / "val"))
    cfg = build_config({"data.backend": "cache", "data.cache_dir": str(tmp_path / "caches"), "data.image_size": str(SIZE),
                        "data.batch_size": "4", "model.backbone": "smallcnn", "out": str(tmp_path)}, preset="smoke")
    trainer = Trainer(cfg, DistInfo(0, 1, 0, CPU), tmp_path, splits=both)
    assert isinstance(trainer.train_loader, CacheLoader)

    def second_cache(*args, **kwargs):
        raise AssertionError("phase 2 built a second cache loader (with --data.cache_device cuda: a second GPU copy)")

    monkeypatch.setattr(factory, "build_train_loader", second_cache)
    gan = trainer.build_gan_loader()
    assert gan.cache is trainer.train_loader.cache and gan.batch_size == trainer.layout.size
