"""Helpers shared by the loader-backend tests (dali, torchvision-gpu, backends, check)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastmlgan.data.geometry import IMAGENET_MEAN, IMAGENET_STD, base_size, crop_window, resize

# Backends against the torch loader, for the same (position, size index): the two resizes of
# DALI's antialiased linear filter and torchvision's differ by 0.1-0.35 grey levels on average
# per image (measured on generated 40-64 px JPEGs and coco128 at 224: worst image 0.34), by up to
# 8 levels at a few edge pixels. A window one pixel off moves the average to >= 1.4 per image and
# 4-7 over a batch, so MEAN_ABS_TOLERANCE separates a right window from a wrong one.
MEAN_ABS_TOLERANCE = 0.6
MAX_ABS_TOLERANCE = 24


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised float (..., 3, H, W) -> the uint8 grey levels as int64 (rounded)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255.0
    return (images.float().cpu() * std + mean).round().clamp(0, 255).to(torch.int64)


def shifted_crop(image: torch.Tensor, position: int, size_index: int, image_size: int, shift: int = 1) -> torch.Tensor:
    """The torch loader's crop with the window moved ``shift`` pixels sideways (inside the image)."""
    top, left, side = crop_window(position, size_index, image_size)
    base = base_size(image_size)
    left = left + shift if left + shift + side <= base else left - shift
    resized = resize(image, base)
    return resize(resized[:, top : top + side, left : left + side], image_size)


def binomial_ok(k: int, n: int, p: float, alpha: float) -> bool:
    """Two-sided exact binomial test: False when ``k`` of ``n`` is too unlikely at level ``alpha``."""
    x = np.arange(n + 1)
    log_pmf = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in x])
    pmf = np.exp(log_pmf + x * math.log(p) + (n - x) * math.log1p(-p))
    return 2 * min(pmf[: k + 1].sum(), pmf[k:].sum()) > alpha


def coco_labels_by_file(annotation_file, image_root) -> dict[str, set[str]]:
    """Independent of ``read_coco``: image path -> set of category names, straight from the JSON."""
    data = json.loads(Path(annotation_file).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {img["id"]: str(Path(image_root) / img["file_name"]) for img in data["images"]}
    out: dict[str, set[str]] = {path: set() for path in files.values()}
    for ann in data["annotations"]:
        out[files[ann["image_id"]]].add(names[ann["category_id"]])
    return out


def copy_coco(annotation_file, image_root, dest: Path) -> tuple[Path, Path]:
    """A writable copy of a COCO-format set: (annotation file, image folder) under ``dest``."""
    images = dest / "images"
    shutil.copytree(image_root, images)
    ann = dest / "instances.json"
    shutil.copy(annotation_file, ann)
    return ann, images


def plant_bad_files(ann: Path, images: Path) -> dict[str, str]:
    """Damage a COCO-format copy in place, one file per kind; returns kind -> file name planted.

    Picks labelled images in file order: 0 removed (missing), 1 cut in half (truncated), 2
    replaced by a PNG (non_jpeg), 3 replaced by random bytes (unreadable); 4 loses its
    annotations (unlabeled); image 5 gets an extra annotation whose category id no category has
    (unknown_label)."""
    data = json.loads(ann.read_text())
    labelled = sorted({a["image_id"] for a in data["annotations"]})
    by_id = {img["id"]: img for img in data["images"]}
    names = [by_id[i]["file_name"] for i in labelled[:5]]
    (images / names[0]).unlink()
    raw = (images / names[1]).read_bytes()
    (images / names[1]).write_bytes(raw[: len(raw) // 2])
    with Image.open(images / names[2]) as img:
        img.convert("RGB").save(images / names[2], format="PNG")
    (images / names[3]).write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != labelled[4]]
    next_id = max(a.get("id", 0) for a in data["annotations"]) + 1
    data["annotations"].append({"id": next_id, "image_id": labelled[5], "category_id": 999_999, "iscrowd": 0})
    ann.write_text(json.dumps(data))
    return {
        "missing": names[0],
        "truncated": names[1],
        "non_jpeg": names[2],
        "unreadable": names[3],
        "unlabeled": names[4],
        "unknown_label": "999999",
    }
