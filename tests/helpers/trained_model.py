"""One tiny trained run per test session, shared by the predict and export tests."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

import torch
from PIL import Image

from fastmlgan.models import build_generator

COCO128 = "coco128/images/train2017"


@contextlib.contextmanager
def restored_logging():
    """The command-line mains point the root logger at the sys.stderr of the moment (a test's
    capture stream): put the handlers back afterwards, or later tests log to a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def smoke_run(tmp_path_factory) -> Path:
    """A run directory trained with the smoke preset (both phases, 4 steps an epoch, ~10 s on 2
    cores); trained on the first call of the session, reused afterwards."""
    root = tmp_path_factory.getbasetemp() / "trained-smoke"
    run = root / "run"
    if not (run / "checkpoints" / "last.pt").is_file():
        shutil.rmtree(root, ignore_errors=True)  # a run that failed half-way
        from fastmlgan.commands.train import main

        with restored_logging():
            code = main([
                "--preset", "smoke", "--out", str(run), "--data.root", str(root / "data"),
                "--train.max_steps_per_epoch", "4", "--data.embedded_num_val", "64",
            ])
        assert code == 0
    return run


def reference_generator(checkpoint: Path) -> torch.nn.Module:
    """G rebuilt from the checkpoint by hand (independently of fastmlgan.classifier)."""
    state = torch.load(checkpoint, weights_only=True)
    model = state["config"]["model"]
    g = build_generator(model["backbone"], len(state["class_names"]), "", width=model["width"], depth=model["depth"])
    g.load_state_dict(state["generator"])
    return g.eval()


def embedded_val_images(run: Path) -> list[str]:
    """The evaluation split of the run's embedded data, in the order evaluation reads it."""
    from fastmlgan.config import config_from_dict
    from fastmlgan.data.factory import build_splits
    from fastmlgan.distributed import DistInfo

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    cfg = config_from_dict(state["config"])
    return list(build_splits(cfg.data, DistInfo(0, 1, 0, torch.device("cpu"))).val.paths)


def coco128_images(shared_data: Path, n: int) -> list[str]:
    """The first ``n`` coco128 JPEGs (sizes up to 640 px, both orientations) plus its one greyscale image."""
    paths = sorted((shared_data / COCO128).glob("*.jpg"))
    chosen = [str(p) for p in paths[:n]]
    grey = str(shared_data / COCO128 / "000000000086.jpg")
    with Image.open(grey) as img:
        assert img.mode == "L"
    return chosen if grey in chosen else [*chosen, grey]


def truncated_jpeg(source: str, dest: Path) -> Path:
    """The first half of a real JPEG: PIL fails with "image file is truncated"."""
    data = Path(source).read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest
