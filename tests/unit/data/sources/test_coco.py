"""COCO instances reader: real coco128 counts and label sets, error messages, dropped/missing images."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from fastmlgan.data.sources.coco import read_coco
from fastmlgan.errors import DataError


@pytest.mark.realdata
def test_coco128_counts_and_label_sets(shared_data):
    root = shared_data / "coco128"
    images = read_coco(root / "instances_coco128.json", root / "images" / "train2017")
    assert len(images) == 126
    assert images.num_dropped_unlabeled == 2
    assert images.missing == []
    assert images.name == "instances_coco128"
    # Official category-id order is the YOLO/coco80 order.
    with open(root / "coco80_names.tsv") as f:
        names = [line.rstrip("\n").split("\t")[1] for line in f if line.strip()]
    assert images.class_names == names and len(names) == 80
    with open(root / "coco128_multilabel.csv") as f:
        expected = {row["image_id"]: {int(c) for c in row["labels"].split()} for row in csv.DictReader(f)}
    unlabelled = {k for k, v in expected.items() if not v}
    assert len(unlabelled) == 2
    got = {Path(p).stem: set(np.flatnonzero(row).tolist()) for p, row in zip(images.paths, images.labels)}
    assert got == {k: v for k, v in expected.items() if v}
    assert all(Path(p).is_file() for p in images.paths)

    kept = read_coco(root / "instances_coco128.json", root / "images" / "train2017", drop_unlabeled=False)
    assert len(kept) == 128 and kept.num_dropped_unlabeled == 0
    assert {Path(p).stem for p, row in zip(kept.paths, kept.labels) if not row.any()} == unlabelled


def write_coco(folder: Path, data, name: str = "ann.json") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def small_coco() -> dict:
    """4 images (b unlabelled, d absent from disk), 3 categories listed out of id order."""
    return {
        "images": [
            {"id": 10, "file_name": "a.jpg"},
            {"id": 11, "file_name": "b.jpg"},
            {"id": 12, "file_name": "c.jpg"},
            {"id": 13, "file_name": "d.jpg"},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 2, "name": "two"}, {"id": 40, "name": "forty"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7},
            {"id": 2, "image_id": 10, "category_id": 7},
            {"id": 3, "image_id": 10, "category_id": 40},
            {"id": 4, "image_id": 12, "category_id": 2},
            {"id": 5, "image_id": 13, "category_id": 2},
        ],
    }


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / name).write_bytes(b"not decoded by the reader")
    return folder


def test_labels_dropped_and_missing(tmp_path, image_dir, caplog):
    ann = write_coco(tmp_path, small_coco())
    with caplog.at_level(logging.WARNING, logger="fastmlgan.data.sources.coco"):
        images = read_coco(ann, image_dir, name="tiny")
    assert images.name == "tiny"
    assert images.class_names == ["two", "seven", "forty"]  # category-id order
    assert [Path(p).name for p in images.paths] == ["a.jpg", "c.jpg"]
    np.testing.assert_array_equal(images.labels, [[0, 1, 1], [1, 0, 0]])
    assert images.num_dropped_unlabeled == 1
    assert images.missing == [str(image_dir / "d.jpg")]
    assert "1 of 3 images" in caplog.text and "d.jpg" in caplog.text

    kept = read_coco(ann, image_dir, drop_unlabeled=False)
    assert [Path(p).name for p in kept.paths] == ["a.jpg", "b.jpg", "c.jpg"]
    np.testing.assert_array_equal(kept.labels[1], [0, 0, 0])
    assert kept.num_dropped_unlabeled == 0 and len(kept.missing) == 1


def test_file_names_with_subfolders(tmp_path, image_dir):
    data = small_coco()
    (image_dir / "sub").mkdir()
    (image_dir / "sub" / "d.jpg").write_bytes(b"x")
    data["images"][3]["file_name"] = "sub/d.jpg"
    images = read_coco(write_coco(tmp_path, data), image_dir)
    assert [Path(p).name for p in images.paths] == ["a.jpg", "c.jpg", "d.jpg"] and images.missing == []


def mutate(change) -> dict:
    data = small_coco()
    change(data)
    return data


@pytest.mark.parametrize(
    "data, fragments",
    [
        ('{"images": [\n  {"id": 1,, "file_name": "a.jpg"}]}', ["not valid JSON", "line 2 column"]),
        ("[1, 2]", ["JSON object at the top level"]),
        (mutate(lambda d: d.pop("categories")), ["'categories'", "missing"]),
        (mutate(lambda d: (d.pop("images"), d.pop("annotations"))), ["'images'", "'annotations'"]),
        (mutate(lambda d: d["images"][2].pop("file_name")), ["images[2]", "'file_name'"]),
        (mutate(lambda d: d["categories"][1].pop("name")), ["categories[1]", "'name'"]),
        (mutate(lambda d: d["annotations"][3].pop("category_id")), ["annotations[3]", "'category_id'"]),
        (mutate(lambda d: d["annotations"][4].update(image_id=99)), ["annotations[4]", "image_id 99", "'images'"]),
        (mutate(lambda d: d["annotations"][0].update(category_id=3)), ["annotations[0]", "category_id 3"]),
        (mutate(lambda d: d["images"][3].update(id=10)), ["images[3]", "repeats id 10"]),
        (mutate(lambda d: d["categories"][2].update(id=7)), ["categories[2]", "repeats id 7"]),
        (mutate(lambda d: d.update(annotations={})), ["'annotations' must be a list"]),
        # Types and duplicates (issue 11): each one line naming the entry, none a traceback or a run.
        (mutate(lambda d: d["categories"][1].update(id="2")), ["categories[1]", "'id' \"2\"", "expected an integer"]),
        (mutate(lambda d: d["categories"][0].update(id=None)), ["categories[0]", "'id' null", "expected an integer"]),
        (mutate(lambda d: d["categories"][2].update(id=40.0)), ["categories[2]", "'id' 40.0"]),
        (mutate(lambda d: d["categories"][2].update(id=True)), ["categories[2]", "'id' true"]),
        (mutate(lambda d: d["categories"][2].update(name="seven")), ["categories[2]", "repeats name 'seven' of categories[0]"]),
        (mutate(lambda d: d["categories"][1].update(name=" ")), ["categories[1]", "'name' \" \"", "non-empty string"]),
        (mutate(lambda d: d["categories"][1].update(name=2)), ["categories[1]", "'name' 2", "non-empty string"]),
        (mutate(lambda d: d["images"][1].update(id="11")), ["images[1]", "'id' \"11\"", "expected an integer"]),
        (mutate(lambda d: d["images"][3].update(id=None)), ["images[3]", "'id' null"]),
        (mutate(lambda d: d["images"][0].update(file_name=5)), ["images[0]", "'file_name' 5"]),
        (mutate(lambda d: d["images"][0].update(file_name="a\u0000.jpg")), ["images[0]", "NUL"]),
        (mutate(lambda d: d["annotations"][2].update(image_id="10")), ["annotations[2]", "'image_id' \"10\""]),
        (mutate(lambda d: d["annotations"][1].update(category_id=[7])), ["annotations[1]", "'category_id' [7]"]),
        (mutate(lambda d: d["annotations"][4].update(category_id=None)), ["annotations[4]", "'category_id' null"]),
        ('"images"', ["JSON object at the top level, got str"]),
        ("null", ["JSON object at the top level, got NoneType"]),
        ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ],
    ids=[
        "bad-json",
        "not-object",
        "no-categories",
        "no-images-annotations",
        "image-field",
        "category-field",
        "annotation-field",
        "unknown-image",
        "unknown-category",
        "duplicate-image",
        "duplicate-category",
        "not-list",
        "category-id-string",
        "category-id-null",
        "category-id-float",
        "category-id-bool",
        "duplicate-category-name",
        "blank-category-name",
        "category-name-int",
        "image-id-string",
        "image-id-null",
        "file-name-int",
        "file-name-nul",
        "annotation-image-id-string",
        "annotation-category-id-list",
        "annotation-category-id-null",
        "top-level-string",
        "top-level-null",
        "deep-nesting",
    ],
)
def test_error_messages_name_file_and_problem(tmp_path, image_dir, data, fragments):
    ann = write_coco(tmp_path, data)
    with pytest.raises(DataError) as info:
        read_coco(ann, image_dir)
    message = str(info.value)
    assert str(ann) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_annotation_file_and_image_root(tmp_path, image_dir):
    with pytest.raises(DataError, match="annotation file not found") as info:
        read_coco(tmp_path / "nope.json", image_dir)
    assert str(tmp_path / "nope.json") in str(info.value)
    ann = write_coco(tmp_path, small_coco())
    with pytest.raises(DataError, match="image folder not found") as info:
        read_coco(ann, tmp_path / "no_images")
    assert str(tmp_path / "no_images") in str(info.value)


def test_no_usable_image_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no usable images.*3 absent"):
        read_coco(write_coco(tmp_path, small_coco()), empty)
