"""MS-COCO instances-format reader: image-level multi-hot labels from the object annotations.

The paper (§4.2.1) uses every image with at least one object label: 82,081 of train2014's 82,783
and 40,137 of val2014's 40,504. ``read_coco`` keeps that protocol by default: images without
annotations are dropped and counted in ``num_dropped_unlabeled``. Crowd annotations
(``iscrowd=1``) count as labels too: the object class is present in the image.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from fastmlgan.errors import DataError
from fastmlgan.loaders.base import LabeledImages

logger = logging.getLogger(__name__)

_REQUIRED_FIELDS = {
    "images": ("id", "file_name"),
    "categories": ("id", "name"),
    "annotations": ("image_id", "category_id"),
}


def _load_json(annotation_file: Path) -> dict:
    if not annotation_file.is_file():
        raise DataError(f"{annotation_file}: annotation file not found")
    try:
        with open(annotation_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{annotation_file}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{annotation_file}: cannot read annotation file: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{annotation_file}: expected a JSON object at the top level, got {type(data).__name__}")
    missing = [key for key in _REQUIRED_FIELDS if key not in data]
    if missing:
        raise DataError(
            f"{annotation_file}: top-level key(s) {', '.join(repr(k) for k in missing)} missing "
            "(a COCO instances file has 'images', 'categories' and 'annotations')"
        )
    for key, fields in _REQUIRED_FIELDS.items():
        entries = data[key]
        if not isinstance(entries, list):
            raise DataError(f"{annotation_file}: '{key}' must be a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise DataError(f"{annotation_file}: {key}[{i}] must be an object, got {type(entry).__name__}")
            for name in fields:
                if name not in entry:
                    raise DataError(f"{annotation_file}: {key}[{i}] has no '{name}' field")
    return data


def _unique_ids(annotation_file: Path, key: str, entries: list[dict]) -> dict:
    index: dict = {}
    for i, entry in enumerate(entries):
        if entry["id"] in index:
            raise DataError(f"{annotation_file}: {key}[{i}] repeats id {entry['id']!r} of {key}[{index[entry['id']]}]")
        index[entry["id"]] = i
    return index


def read_coco(annotation_file, image_root, drop_unlabeled: bool = True, name: str | None = None) -> LabeledImages:
    """Read a COCO instances JSON into a ``LabeledImages``.

    Classes are in category-id order (COCO's official 80-class order for the real files), images
    in the order of the file's ``images`` list. Images without any annotation are dropped (and
    counted) when ``drop_unlabeled``; images absent from ``image_root`` are left out and listed
    in ``missing``."""
    annotation_file = Path(annotation_file)
    image_root = Path(image_root)
    data = _load_json(annotation_file)
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image folder not found (images of {annotation_file})")

    categories = sorted(data["categories"], key=lambda c: c["id"])
    category_column = {c["id"]: col for col, c in enumerate(categories)}
    if len(category_column) != len(categories):
        _unique_ids(annotation_file, "categories", data["categories"])  # raises, naming the entry
    images = data["images"]
    image_row = _unique_ids(annotation_file, "images", images)

    labels = np.zeros((len(images), len(categories)), dtype=np.uint8)
    for i, ann in enumerate(data["annotations"]):
        row = image_row.get(ann["image_id"])
        if row is None:
            raise DataError(
                f"{annotation_file}: annotations[{i}] refers to image_id {ann['image_id']!r}, which is not in 'images'"
            )
        col = category_column.get(ann["category_id"])
        if col is None:
            raise DataError(
                f"{annotation_file}: annotations[{i}] refers to category_id {ann['category_id']!r}, "
                "which is not in 'categories'"
            )
        labels[row, col] = 1

    labelled = labels.any(axis=1)
    keep = labelled if drop_unlabeled else np.ones(len(images), dtype=bool)
    num_dropped = int(len(images) - keep.sum())

    # One directory listing instead of a stat per image (123k images for COCO 2014).
    listed = {entry.name for entry in os.scandir(image_root)}
    paths, rows, missing = [], [], []
    for row in np.flatnonzero(keep):
        file_name = str(images[row]["file_name"])
        path = image_root / file_name
        present = file_name in listed if os.sep not in file_name and "/" not in file_name else path.is_file()
        if present:
            paths.append(str(path))
            rows.append(row)
        else:
            missing.append(str(path))
    if missing:
        logger.warning(
            "%s: %d of %d images listed are absent from %s and left out (first: %s)",
            annotation_file,
            len(missing),
            int(keep.sum()),
            image_root,
            missing[0],
        )
    if not paths:
        raise DataError(
            f"{annotation_file}: no usable images ({len(images)} listed, {num_dropped} without labels, "
            f"{len(missing)} absent from {image_root})"
        )
    if num_dropped:
        logger.info("%s: dropped %d images without labels", annotation_file, num_dropped)
    return LabeledImages(
        name=name or annotation_file.stem,
        paths=paths,
        labels=labels[np.asarray(rows, dtype=np.int64)],
        class_names=[str(c["name"]) for c in categories],
        num_dropped_unlabeled=num_dropped,
        missing=missing,
    )
