"""``--data.backend auto`` builds the decoded-image caches where they pay (issue 20): when the
missing caches take at most ``--data.cache_auto_share`` of the free disk (and of the free GPU
memory with ``--data.cache_device cuda``), on first use, saying so in one line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from fastmlgan.config import DataConfig
from fastmlgan.data import factory
from fastmlgan.data.factory import build_loaders, cache_bytes, worth_building
from fastmlgan.data.imagecache.format import Geometry, cache_path
from fastmlgan.data.imagecache.loader import CacheLoader
from fastmlgan.data.sources.coco import read_coco
from fastmlgan.data.sources.embedded import generate
from fastmlgan.data.types import Splits
from fastmlgan.distributed import DistInfo

SIZE = 24
INFO = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    paths = generate(tmp_path_factory.mktemp("auto") / "data", num_train=24, num_val=10, image_size=40, seed=2)
    return Splits(read_coco(paths.train_ann, paths.train_images), read_coco(paths.val_ann, paths.val_images))


def needed(splits) -> int:
    # By hand: 24 training rows of 27x27x3 (base 27 for 24 crops) and 10 evaluation rows of 24x24x3.
    assert cache_bytes(splits.train, Geometry("train", SIZE)) == 24 * 27 * 27 * 3
    return 24 * 27 * 27 * 3 + 10 * 24 * 24 * 3


def config(tmp_path, share=0.25) -> DataConfig:
    return DataConfig(backend="auto", cache_dir=str(tmp_path), image_size=SIZE, batch_size=4, eval_batch_size=4,
                      num_workers=0, cache_auto_share=share)


def test_auto_builds_the_caches_when_they_fit_the_share_of_free_disk(splits, tmp_path, monkeypatch, caplog):
    free = needed(splits) * 4  # exactly 25 %: fits (at most the share)
    monkeypatch.setattr(factory, "free_disk_bytes", lambda directory: free)
    with caplog.at_level(logging.INFO):
        train, val = build_loaders(config(tmp_path), splits, INFO, 0, output="uint8")
    assert isinstance(train, CacheLoader) and isinstance(val, CacheLoader) and train.output == "uint8"
    assert cache_path(splits.train, Geometry("train", SIZE), tmp_path).is_file()
    assert cache_path(splits.val, Geometry("eval", SIZE), tmp_path).is_file()
    lines = [r.getMessage() for r in caplog.records if "data.backend auto" in r.getMessage()]
    assert len(lines) == 1 and "auto -> cache (building the decoded-image caches on first use" in lines[0]
    assert f"within 25% of the {free / 2**30:.2f} GiB free in {tmp_path}" in lines[0]
    # Built once: the next run takes them as current caches.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_loaders(config(tmp_path), splits, INFO, 0)
    assert f"auto -> cache (current caches of both splits in {tmp_path})" in caplog.text


@pytest.mark.parametrize("share", [0.25, 0.0])
def test_auto_does_not_build_beyond_the_share(splits, tmp_path, monkeypatch, caplog, share):
    monkeypatch.setattr(factory, "free_disk_bytes", lambda directory: needed(splits) * 4 - 1)  # one byte short of 25 %
    with caplog.at_level(logging.INFO):
        train, _ = build_loaders(config(tmp_path, share), splits, INFO, 0)
    assert isinstance(train, torch.utils.data.DataLoader)
    assert not any(tmp_path.iterdir())  # nothing built
    if share:
        assert "not building the decoded-image cache" in caplog.text and "more than 25% of the" in caplog.text
    assert "data.backend auto -> torch (no GPU)" in caplog.text


def test_the_gpu_memory_share():
    gib = 2**30
    assert worth_building(2 * gib, 8 * gib, 0.25, "on cuda:0")[0]
    fits, why = worth_building(2 * gib + 1, 8 * gib, 0.25, "on cuda:0")
    assert not fits and "more than 25% of the 8.00 GiB free on cuda:0" in why


def test_the_embedded_default_trains_with_the_cache_it_builds(tmp_path):
    """The first user: a smoke run of the default (auto) builds its caches and trains on them."""
    env = {**os.environ, "FASTMLGAN_CACHE": str(tmp_path / "caches"), "PYTHONPATH": os.getcwd()}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastmlgan", "train", "--preset", "smoke", "--out", str(out),
                           "--data.root", str(tmp_path / "data"), "--log.plots", "false"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stderr + (out / "train.log").read_text()
    assert "data.backend auto -> cache (building the decoded-image caches on first use" in log
    assert len(list((tmp_path / "caches").glob("*.fmlc"))) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"baseline", "gan"} <= set(metrics)
