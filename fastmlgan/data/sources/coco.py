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

from fastmlgan.data.sources.base import Listing, Source
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.safeio import entry_is_file, inside_root, list_folder, open_regular

logger = logging.getLogger(__name__)

_REQUIRED_FIELDS = {
    "images": ("id", "file_name"),
    "categories": ("id", "name"),
    "annotations": ("image_id", "category_id"),
}
# Fields that must be JSON integers (the COCO format's ids); a string, null, float or bool id is
# an error rather than a class or image keyed by the wrong thing (true == 1 in Python).
_INTEGER_FIELDS = {"images": ("id",), "categories": ("id",), "annotations": ("image_id", "category_id")}
# Fields that must be non-empty strings.
_STRING_FIELDS = {"images": ("file_name",), "categories": ("name",), "annotations": ()}


def load_json(annotation_file: Path) -> dict:
    if not os.path.lexists(annotation_file):  # a symbolic link loop is named by open_regular
        raise DataError(f"{annotation_file}: annotation file not found")
    try:
        with open_regular(annotation_file, "annotation file") as f:  # not a FIFO, a device or a folder
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{annotation_file}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{annotation_file}: cannot read annotation file: {e}") from None
    except RecursionError:
        raise DataError(f"{annotation_file}: JSON nested too deeply to be a COCO annotation file") from None
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
            for name in _INTEGER_FIELDS[key]:
                value = entry[name]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise DataError(
                        f"{annotation_file}: {key}[{i}] has '{name}' {_show(value)}, expected an integer"
                    )
            for name in _STRING_FIELDS[key]:
                value = entry[name]
                if not isinstance(value, str) or not value.strip() or "\x00" in value:
                    raise DataError(
                        f"{annotation_file}: {key}[{i}] has '{name}' {_show(value)}, expected a non-empty string "
                        "(without NUL characters)"
                    )
    _unique(annotation_file, "images", data["images"], "id")
    _unique(annotation_file, "categories", data["categories"], "id")
    _unique(annotation_file, "categories", data["categories"], "name")
    return data


def _show(value) -> str:
    """A JSON value as the file spells it (null, true, "1"), shortened."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unique(annotation_file: Path, key: str, entries: list[dict], name: str) -> dict:
    """{value: index} of ``entries[*][name]``; a repeated value is an error naming both entries."""
    index: dict = {}
    for i, entry in enumerate(entries):
        value = entry[name]
        if value in index:
            what = "id" if name == "id" else name
            raise DataError(f"{annotation_file}: {key}[{i}] repeats {what} {value!r} of {key}[{index[value]}]")
        index[value] = i
    return index


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system (is_file raises for that): not there
        return False


def read_coco(
    annotation_file, image_root, drop_unlabeled: bool = True, name: str | None = None, allow_outside_root: bool = False
) -> LabeledImages:
    """Read a COCO instances JSON into a ``LabeledImages``.

    Classes are in category-id order (COCO's official 80-class order for the real files), images
    in the order of the file's ``images`` list. Images without any annotation are dropped (and
    counted) when ``drop_unlabeled``; images absent from ``image_root`` are left out and listed
    in ``missing``. A ``file_name`` that is absolute or climbs out of ``image_root`` is an error
    unless ``allow_outside_root`` (``--data.allow_outside_root``)."""
    annotation_file = Path(annotation_file)
    image_root = Path(image_root)
    data = load_json(annotation_file)
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image folder not found (images of {annotation_file})")

    # Ids are unique integers and names unique strings (checked by load_json).
    categories = sorted(data["categories"], key=lambda c: c["id"])
    category_column = {c["id"]: col for col, c in enumerate(categories)}
    images = data["images"]
    image_row = {image["id"]: row for row, image in enumerate(images)}

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
    listed = {entry.name for entry in list_folder(image_root, f"image folder of {annotation_file}") if entry_is_file(entry)}
    paths, rows, missing = [], [], []
    for row in np.flatnonzero(keep):
        file_name = images[row]["file_name"]
        if allow_outside_root:
            path = image_root / file_name
        else:
            where = f"{annotation_file}: images[{row}] 'file_name'"
            path = inside_root(image_root, file_name, where, "--data.allow_outside_root")
        present = file_name in listed if os.sep not in file_name and "/" not in file_name else _is_file(path)
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
        class_names=[c["name"] for c in categories],
        num_dropped_unlabeled=num_dropped,
        missing=missing,
    )


def coco_listing(split: str, annotation_file, image_root, allow_outside_root: bool = False) -> Listing:

    annotation_file = Path(annotation_file)
    data = load_json(annotation_file)
    categories = {c["id"] for c in data["categories"]}
    row = {img["id"]: i for i, img in enumerate(data["images"])}
    labelled = np.zeros(len(data["images"]), dtype=bool)
    unknown = []
    for i, ann in enumerate(data["annotations"]):
        if ann["category_id"] not in categories:
            unknown.append(f"{annotation_file}: annotations[{i}] has category_id {ann['category_id']!r}, not in 'categories'")
        elif ann["image_id"] not in row:
            unknown.append(f"{annotation_file}: annotations[{i}] refers to image_id {ann['image_id']!r}, not in 'images'")
        else:
            labelled[row[ann["image_id"]]] = True
    paths = []
    for i, img in enumerate(data["images"]):
        if not allow_outside_root:  # training refuses it: a malformed row
            try:
                inside_root(image_root, img["file_name"], f"{annotation_file}: images[{i}] 'file_name'", "--data.allow_outside_root")
            except DataError as e:
                unknown.append(str(e))
        paths.append(str(Path(image_root) / str(img["file_name"])))
    return Listing(split, paths, labelled, unknown)


class CocoSource(Source):
    """Any COCO instances-format JSON and image folder (``--data.dataset coco``)."""

    kind = "coco"
    required = ("train_annotations", "train_images", "val_annotations", "val_images")

    def read(self, cfg) -> tuple[LabeledImages, LabeledImages]:
        outside = cfg.allow_outside_root
        train = read_coco(cfg.train_annotations, cfg.train_images, cfg.drop_unlabeled, "train", outside)
        val = read_coco(cfg.val_annotations, cfg.val_images, cfg.drop_unlabeled, "val", outside)
        return train, val

    def listings(self, cfg) -> list[Listing]:
        # Each split is checked on its own when only it is given (a training split before its
        # evaluation split exists, say); a split needs both its annotations and its images.
        given = []
        for split in ("train", "val"):
            annotations, images = getattr(cfg, f"{split}_annotations"), getattr(cfg, f"{split}_images")
            if bool(annotations) != bool(images):
                missing = f"{split}_images" if annotations else f"{split}_annotations"
                raise ConfigError(f"data.dataset=coco: the {split} split needs --data.{missing} too")
            if annotations:
                given.append(coco_listing(split, annotations, images, cfg.allow_outside_root))
        if not given:
            raise ConfigError(
                "data.dataset=coco needs --data.train_annotations and --data.train_images (the training split), "
                "--data.val_annotations and --data.val_images (the evaluation split), or both"
            )
        return given
