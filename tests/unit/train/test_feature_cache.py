"""The frozen-feature cache: features equal f_ext on the loaders' crops, a cache built for other
weights, data or geometry is refused by name, a broken build leaves nothing behind, and a phase-2
iteration reading it equals one computing f_ext."""

from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import pytest
import torch

from fastmlgan.config import build_config
from fastmlgan.data.geometry import NUM_SIZES, decode_rgb, five_crop, normalize
from fastmlgan.data.sources.coco import read_coco
from fastmlgan.data.stream import BatchStream
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.models import build_feature_extractor, build_generator
from fastmlgan.train import feature_cache
from fastmlgan.train.trainer import Trainer

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """24 + 8 embedded images (a copy the tests may damage) and a frozen smallcnn f_ext."""
    from fastmlgan.data.sources import embedded

    root = tmp_path_factory.mktemp("fcache") / "embedded"
    paths = embedded.ensure(root, num_train=24, num_val=8, image_size=40, seed=0)
    torch.manual_seed(0)
    f_ext = build_feature_extractor(build_generator("smallcnn", 16, width=4), "test")
    return root, paths, f_ext


def _images(paths):
    return read_coco(paths.train_ann, paths.train_images, True, name="train")


def _build(tmp_path, paths, f_ext, **kw):
    return feature_cache.build(
        tmp_path / "features.cache", f_ext, _images(paths), IMAGE_SIZE, torch.device("cpu"), None, progress=False, **kw
    )


def test_cached_features_equal_f_ext_on_the_loader_crops(tiny, tmp_path):
    _, paths, f_ext = tiny
    images = _images(paths)
    cache = _build(tmp_path, paths, f_ext)
    rng = np.random.default_rng(0)
    index = torch.from_numpy(rng.integers(len(images), size=40))
    crop = torch.from_numpy(np.stack([rng.integers(5, size=40), rng.integers(NUM_SIZES, size=40)], 1))
    got = cache.lookup(index, crop, torch.device("cpu"))
    # Independently: the torch loader's decode and five-crop of each (image, window), then f_ext.
    x = torch.stack(
        [normalize(five_crop(decode_rgb(images.paths[i]), p, s, IMAGE_SIZE)) for i, (p, s) in zip(index.tolist(), crop.tolist())]
    )
    with torch.no_grad():
        want = f_ext(x).float()
    assert got.shape == want.shape == (40, f_ext.feature_dim)
    # bf16 storage: 8 bits of mantissa, relative error <= 2^-9 per value.
    torch.testing.assert_close(got, want, rtol=2**-8, atol=1e-6)
    # The windows are not interchangeable: a wrong window id gives other features.
    shifted = cache.lookup(index, torch.stack([crop[:, 0], (crop[:, 1] + 1) % NUM_SIZES], 1), torch.device("cpu"))
    assert not torch.allclose(shifted, want, rtol=2**-8, atol=1e-6)


def test_a_cache_for_other_weights_data_or_geometry_is_refused_by_name(tiny, tmp_path):
    _, paths, f_ext = tiny
    images = _images(paths)
    cache = _build(tmp_path, paths, f_ext)
    cache.check(feature_cache.expected_header(f_ext, IMAGE_SIZE, "float32"))  # the right one passes
    cache.attach(images)
    other = copy.deepcopy(f_ext)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ConfigError, match="another f_ext weights"):
        cache.check(feature_cache.expected_header(other, IMAGE_SIZE, "float32"))
    with pytest.raises(ConfigError, match="another crop geometry"):
        cache.check(feature_cache.expected_header(f_ext, IMAGE_SIZE + 8, "float32"))
    with pytest.raises(ConfigError, match="another f_ext compute dtype"):
        cache.check(feature_cache.expected_header(f_ext, IMAGE_SIZE, "bfloat16"))
    touched = images.paths[3]
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        with pytest.raises(ConfigError, match=f"{touched} changed since the cache was built"):
            cache.attach(images)
    finally:
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns))
    val = read_coco(paths.val_ann, paths.val_images, True, name="val")
    with pytest.raises(ConfigError, match="holds no features of .* \\(built for another data set\\)"):
        cache.attach(val)


def test_a_subset_of_the_cached_images_reads_its_own_rows(tiny, tmp_path):
    """The reproduction harness builds one cache over the training split; each seed trains on a
    subset: the subset's index i must read the features of its own image, not of row i."""
    _, paths, f_ext = tiny
    images = _images(paths)
    cache = _build(tmp_path, paths, f_ext)
    full = cache.lookup(torch.arange(len(images)), torch.zeros(len(images), 2, dtype=torch.int64), torch.device("cpu"))
    picked = [17, 3, 9, 0]
    cache.attach(images.subset(picked))
    sub = cache.lookup(torch.arange(len(picked)), torch.zeros(len(picked), 2, dtype=torch.int64), torch.device("cpu"))
    torch.testing.assert_close(sub, full[picked], rtol=0, atol=0)


def test_truncated_or_foreign_files_are_refused(tiny, tmp_path):
    _, paths, f_ext = tiny
    cache = _build(tmp_path, paths, f_ext)
    size = cache.path.stat().st_size
    with open(cache.path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DataError, match="truncated or edited"):
        feature_cache.FeatureCache.open(cache.path)
    other = tmp_path / "other.cache"
    other.write_bytes(b"not a cache at all")
    with pytest.raises(DataError, match="not a fastmlgan feature cache"):
        feature_cache.FeatureCache.open(other)


def test_a_failed_build_leaves_no_cache(tiny, tmp_path, monkeypatch):
    _, paths, f_ext = tiny
    broken = copy.deepcopy(f_ext)
    calls = []

    def failing_forward(x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-build")
        return torch.zeros(x.shape[0], broken.feature_dim)

    monkeypatch.setattr(broken, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        _build(tmp_path, paths, broken, batch_images=4)
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its temporary file


def test_undecodable_images_use_their_stand_in(tiny, tmp_path):
    root, _, f_ext = tiny
    copy_root = tmp_path / "copy"
    shutil.copytree(root, copy_root)
    from fastmlgan.data.sources import embedded

    copied = embedded.ensure(copy_root, num_train=24, num_val=8, image_size=40, seed=0)
    images = _images(copied)
    bad = 5
    type(copy_root)(images.paths[bad]).write_bytes(b"\xff\xd8\xff broken jpeg")
    cache = feature_cache.build(
        tmp_path / "f.cache", f_ext, images, IMAGE_SIZE, torch.device("cpu"), None, progress=False
    )
    assert cache.substituted.tolist() == [bad] and cache.used_index[bad] == bad + 1
    index = torch.tensor([bad, 2])
    labels = torch.from_numpy(images.labels[[bad, 2]].astype(np.float32))
    fixed = cache.stand_in_labels(index, labels)
    torch.testing.assert_close(fixed, torch.from_numpy(images.labels[[bad + 1, 2]].astype(np.float32)))
    with pytest.raises(DataError, match="cannot decode"):
        feature_cache.build(
            tmp_path / "g.cache", f_ext, images, IMAGE_SIZE, torch.device("cpu"), None, progress=False, on_bad_image="error"
        )
    assert not (tmp_path / "g.cache").exists()


def test_phase2_with_the_cache_equals_phase2_with_bf16_rounded_f_ext(tiny, tmp_path):
    """The cache changes where the features come from, nothing else: a cached iteration equals an
    uncached one whose f_ext output is rounded to bf16 as the cache stores it. The cached loader
    decodes only the generated and G-update images."""
    root, _, _ = tiny
    overrides = {"data.root": str(root), "data.embedded_num_train": "24", "data.embedded_num_val": "8",
                 "data.batch_size": "2", "data.image_size": str(IMAGE_SIZE)}
    cached = Trainer(build_config({**overrides, "gan.feature_cache": str(tmp_path / "f.cache")}, preset="smoke"), CPU, tmp_path)
    plain = Trainer(build_config(overrides, preset="smoke"), CPU, tmp_path)
    plain.steps.generator.load_state_dict(cached.steps.generator.state_dict())
    plain.steps.discriminator.load_state_dict(cached.steps.discriminator.state_dict())
    for t in (cached, plain):
        t.start_gan_phase()
    assert cached.steps.feature_cache is not None and plain.steps.feature_cache is None
    cached_batch = BatchStream(cached.build_gan_loader(), data_epoch=1).next()
    plain_batch = BatchStream(plain.build_gan_loader(), data_epoch=1).next()
    assert cached_batch["image"].shape[0] == cached.layout.pixel_rows < cached.layout.size
    torch.testing.assert_close(cached_batch["index"], plain_batch["index"])
    used: dict[str, torch.Tensor] = {}
    exact, lookup = plain.steps.iteration_features, cached.steps.iteration_features

    def rounded(batch, images):
        used["plain"] = exact(batch, images).bfloat16().float()
        return used["plain"]

    def recorded(batch, images):
        used["cached"] = lookup(batch, images)
        return used["cached"]

    plain.steps.iteration_features, cached.steps.iteration_features = rounded, recorded
    state = torch.get_rng_state()
    out_cached = {k: float(v) for k, v in cached.steps.train_step(cached_batch).items()}
    torch.set_rng_state(state)
    out_plain = {k: float(v) for k, v in plain.steps.train_step(plain_batch).items()}
    # The same features for every row (f_ext on the same crops, within bf16 and summation order)...
    torch.testing.assert_close(used["cached"], used["plain"], rtol=2**-7, atol=1e-6)
    # ...and the same losses.
    assert out_cached.keys() == out_plain.keys()
    for key in out_plain:
        assert out_cached[key] == pytest.approx(out_plain[key], rel=1e-4, abs=1e-5), key
