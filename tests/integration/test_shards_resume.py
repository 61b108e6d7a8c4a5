"""A run trained from shards, killed (SIGKILL: no warning) mid-way through a data epoch and a
shuffle window, and resumed, ends exactly as an uninterrupted run: the same metrics.json, byte
for byte, and the same final weights (CPU)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from extras import import_extra
from fault_runs import _env, _newest_step, _result

import_extra("shards", "webdataset")  # a skip without the extra; a failure under make test, which installs it

from fastmlgan.data.shardbuild import build_shards  # noqa: E402
from fastmlgan.data.sources.coco import read_coco  # noqa: E402
from fastmlgan.data.sources.embedded import generate  # noqa: E402

# The smoke preset at batch 8 from 9 shards of <= 30 samples: 32 batches per data epoch, 20 steps
# per BCE epoch, so BCE epoch 2 starts mid-way through data epoch 1; then 3 GAN epochs of 2
# iterations of 80 images. Shuffle windows of 50 samples, so a resume lands inside a window.
RUN = ["--preset", "smoke", "--data.batch_size", "8", "--train.max_steps_per_epoch", "20", "--train.gan_epochs", "3",
       "--checkpoint.every_steps", "1", "--checkpoint.every_minutes", "0", "--log.plots", "false",
       "--data.dataset", "shards", "--data.shards_window", "50", "--data.num_threads", "2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards-resume")
    paths = generate(root / "data", num_train=256, num_val=128, image_size=40, seed=0)
    out = root / "shards"
    build_shards({"train": read_coco(paths.train_ann, paths.train_images, name="train"),
                  "val": read_coco(paths.val_ann, paths.val_images, name="val")}, out, max_samples=30, progress=False)
    return out


def _train(out: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastmlgan", "train", *RUN, "--out", str(out),
            "--data.shards", f"{shards}/train-{{000000..000008}}.tar", "--data.shards_val", f"{shards}/val-{{000000..000004}}.tar",
            *extra]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("shards-reference") / "run"
    proc = subprocess.run(_train(run, shards), env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.backend auto -> shards" in (run / "train.log").read_text()
    return _result(run)


@pytest.mark.slow
@pytest.mark.parametrize("step", [27, 43], ids=["bce-mid-data-epoch", "gan"])
def test_killed_run_from_shards_resumes_to_the_same_bytes(shards, reference, tmp_path, step):
    metrics, weights = reference
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train(run, shards), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while proc.poll() is None and _newest_step(run) < step and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=600)
    assert _newest_step(run) < 46, "nothing left to resume"
    resumed = subprocess.run(_train(run, shards, "--resume", str(run)), env=_env(), capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got_metrics, got_weights = _result(run)
    assert got_metrics == metrics, f"metrics.json differs after a SIGKILL at step {step}"
    assert got_weights.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(got_weights[name], value), f"{name} differs after a SIGKILL at step {step}"
