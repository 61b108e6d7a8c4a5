"""Dataset readers on small fixture folders written in each dataset's official layout: MS-COCO
2014, NUS-WIDE, and the generic CSV/JSONL list format; and their wiring through the config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmlgan.config import DataConfig
from fastmlgan.data.factory import build_splits
from fastmlgan.data.sources.coco import read_coco
from fastmlgan.data.sources.listfile import read_label_names, read_list, scan_list
from fastmlgan.data.sources.nuswide import image_relpath, paper_split, read_listing, read_nuswide
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import ConfigError, DataError

CPU = DistInfo(0, 1, 0, __import__("torch").device("cpu"))


def write_jpeg(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (value, 255 - value, 30)).save(path, quality=90)


# ----------------------------------------------------------------------------------------------
# MS-COCO 2014


@pytest.fixture
def coco2014(tmp_path) -> Path:
    """annotations/instances_{train,val}2014.json + {train,val}2014/COCO_<split>2014_<id:012d>.jpg.

    Categories are listed out of id order with COCO's gaps (ids 1, 3, 90); train has 6 images:
    one unlabelled, one listed but absent from the folder; a crowd annotation counts."""
    categories = [
        {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
    ]
    for split, n in (("train", 6), ("val", 3)):
        images, annotations = [], []
        for i in range(n):
            image_id = 1000 * (split == "val") + i + 1
            file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": file_name, "width": 8, "height": 6})
            if not (split == "train" and i == 3):  # train image 3 is absent from the folder
                write_jpeg(tmp_path / f"{split}2014" / file_name, 20 * i)
        labels = {0: [1, 3], 1: [90], 2: [], 3: [1], 4: [3, 3], 5: [90]} if split == "train" else {0: [1], 1: [3], 2: [90, 1]}
        for i, cats in labels.items():
            for c in cats:
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": images[i]["id"], "category_id": c, "iscrowd": int(i == 5)}
                )
        (tmp_path / "annotations").mkdir(exist_ok=True)
        (tmp_path / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories})
        )
    return tmp_path


def test_coco2014_counts_class_order_and_dropped(coco2014, caplog):
    with caplog.at_level(logging.INFO, logger="fastmlgan.data.sources.coco"):
        train = read_coco(coco2014 / "annotations" / "instances_train2014.json", coco2014 / "train2014")
    assert train.class_names == ["person", "car", "toothbrush"]  # category-id order, not file order
    assert train.num_dropped_unlabeled == 1
    assert [Path(p).name for p in train.missing] == ["COCO_train2014_000000000004.jpg"]
    assert [Path(p).name[-8:] for p in train.paths] == ["0001.jpg", "0002.jpg", "0005.jpg", "0006.jpg"]
    np.testing.assert_array_equal(train.labels, [[1, 1, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]])
    assert "dropped 1 images without labels" in caplog.text and "absent" in caplog.text
    kept = read_coco(coco2014 / "annotations" / "instances_train2014.json", coco2014 / "train2014", drop_unlabeled=False)
    assert len(kept) == 5 and kept.num_dropped_unlabeled == 0 and not kept.labels[2].any()


def test_coco2014_through_the_config(coco2014, caplog):
    cfg = DataConfig(
        dataset="coco",
        train_annotations=str(coco2014 / "annotations" / "instances_train2014.json"),
        train_images=str(coco2014 / "train2014"),
        val_annotations=str(coco2014 / "annotations" / "instances_val2014.json"),
        val_images=str(coco2014 / "val2014"),
    )
    with caplog.at_level(logging.INFO, logger="fastmlgan.data.factory"):
        splits = build_splits(cfg, CPU)
    assert (len(splits.train), len(splits.val)) == (4, 3)
    assert "4 train samples (1 unlabelled dropped, 1 missing), 3 val samples" in caplog.text


# ----------------------------------------------------------------------------------------------
# NUS-WIDE


CONCEPTS = sorted(f"concept{i:02d}" for i in range(81))


@pytest.fixture
def nuswide(tmp_path) -> tuple[Path, np.ndarray]:
    """The official layout with 40 images in 4 concept folders: rows 0, 7, 14, 21, 28, 35 are
    unlabelled, labelled rows 3 and 10 are absent from Flickr/; labels end lines with a space."""
    root = tmp_path / "NUS-WIDE"
    rng = np.random.default_rng(0)
    n = 40
    labels = (rng.random((n, 81)) < 0.03).astype(np.uint8)
    labels[::7] = 0  # 0, 7, 14, 21, 28, 35: unlabelled
    for i in range(n):
        if i % 7 and not labels[i].any():
            labels[i, i % 81] = 1
    folders = ["actor", "airport", "animal", "beach"]
    entries = [f"C:\\ImageData\\Flickr\\{folders[i % 4]}\\{i:04d}_{1000 + i}.jpg" for i in range(n)]
    absent = {3, 10}
    for i in range(n):
        if i not in absent:
            write_jpeg(root / "Flickr" / image_relpath(entries[i]), 5 * i)
    (root / "ImageList").mkdir(parents=True)
    (root / "Concepts81.txt").write_text("\r\n".join(CONCEPTS) + "\r\n")  # the official files have CRLF
    (root / "ImageList" / "Imagelist.txt").write_text("\n".join(entries) + "\n")
    train_rows, test_rows = np.arange(0, 24), np.arange(24, n)
    (root / "ImageList" / "TrainImagelist.txt").write_text("\n".join(entries[i] for i in train_rows) + "\n")
    (root / "ImageList" / "TestImagelist.txt").write_text("\n".join(entries[i] for i in test_rows) + "\n")
    for c, concept in enumerate(CONCEPTS):
        all_dir = root / "Groundtruth" / "AllLabels"
        tt_dir = root / "Groundtruth" / "TrainTestLabels"
        all_dir.mkdir(parents=True, exist_ok=True)
        tt_dir.mkdir(parents=True, exist_ok=True)
        (all_dir / f"Labels_{concept}.txt").write_text("".join(f"{v} \n" for v in labels[:, c]))
        (tt_dir / f"Labels_{concept}_Train.txt").write_text("".join(f"{v}\n" for v in labels[train_rows, c]))
        (tt_dir / f"Labels_{concept}_Test.txt").write_text("".join(f"{v}\n" for v in labels[test_rows, c]))
    return root, labels


def test_nuswide_listing_reads_the_official_layout(nuswide):
    root, labels = nuswide
    entries, read, concepts = read_listing(root, "all")
    assert concepts == CONCEPTS and len(entries) == 40
    assert entries[5] == "airport/0005_1005.jpg"
    np.testing.assert_array_equal(read, labels)


def test_nuswide_paper_split(nuswide, caplog):
    root, labels = nuswide
    labelled = set(np.flatnonzero(labels.any(axis=1)).tolist())
    assert len(labelled) == 34
    with caplog.at_level(logging.INFO, logger="fastmlgan.data.sources.nuswide"):
        train, test = read_nuswide(root, "paper", num_train=25, seed=3)
    assert "6 without any of the 81 labels dropped" in caplog.text and "25 train / 9 test" in caplog.text
    assert train.class_names == CONCEPTS and train.num_dropped_unlabeled == 6
    row_of = {f"{i:04d}_{1000 + i}.jpg": i for i in range(40)}
    rows = {s: [row_of[Path(p).name] for p in split.paths] for s, split in (("train", train), ("test", test))}
    missing = {s: [row_of[Path(p).name] for p in split.missing] for s, split in (("train", train), ("test", test))}
    assert sorted(missing["train"] + missing["test"]) == [3, 10]
    # Train + test (+ their missing files) partition the labelled images, 25 / 9 before removal.
    assert len(rows["train"]) + len(missing["train"]) == 25 and len(rows["test"]) + len(missing["test"]) == 9
    assert set(rows["train"]) | set(rows["test"]) | {3, 10} == labelled
    assert not set(rows["train"]) & set(rows["test"])
    assert rows["train"] == sorted(rows["train"])  # Imagelist order
    np.testing.assert_array_equal(train.labels, labels[rows["train"]])
    # The documented rule, computed by hand.
    perm = np.random.default_rng(3).permutation(sorted(labelled))
    assert set(rows["train"]) | set(missing["train"]) == set(perm[:25].tolist())
    again, _ = read_nuswide(root, "paper", num_train=25, seed=3)
    other, _ = read_nuswide(root, "paper", num_train=25, seed=4)
    assert again.paths == train.paths and other.paths != train.paths


def test_nuswide_paper_split_numbers():
    """The paper's 150,000 / 59,347 from 209,347 labelled of 269,648 listed (row rule only)."""
    labels = np.zeros((269_648, 81), dtype=np.uint8)
    labels[np.random.default_rng(0).permutation(269_648)[:209_347], 0] = 1
    train, test = paper_split(labels, 150_000, seed=0)
    assert (len(train), len(test)) == (150_000, 59_347) and not np.intersect1d(train, test).size
    with pytest.raises(ConfigError, match="nuswide_num_train"):
        paper_split(labels[:10], 10, seed=0)


def test_nuswide_official_split_and_config(nuswide):
    root, labels = nuswide
    cfg = DataConfig(dataset="nuswide", nuswide_root=str(root), nuswide_split="official")
    splits = build_splits(cfg, CPU)
    # Train rows 0-23: 0, 7, 14, 21 unlabelled, 3 and 10 absent -> 18; test rows 24-39: 28, 35 unlabelled -> 14.
    assert (len(splits.train), len(splits.val)) == (18, 14)
    assert (splits.train.num_dropped_unlabeled, splits.val.num_dropped_unlabeled) == (4, 2)
    assert len(splits.train.missing) == 2 and not splits.val.missing
    with pytest.raises(ConfigError, match="nuswide_root"):
        build_splits(DataConfig(dataset="nuswide"), CPU)
    (root / "Groundtruth" / "AllLabels" / f"Labels_{CONCEPTS[5]}.txt").write_text("0\n" * 39)
    with pytest.raises(DataError, match=f"Labels_{CONCEPTS[5]}.txt: 39 lines"):
        read_nuswide(root, "paper", num_train=20)


# ----------------------------------------------------------------------------------------------
# List files


@pytest.fixture
def listed(tmp_path) -> Path:
    for name in ("a.jpg", "b.jpg", "c,d.jpg", "e.jpg", "sub/f.jpg"):
        write_jpeg(tmp_path / "img" / name)
    (tmp_path / "names.txt").write_text("cat\ndog\n\nbird\n")
    (tmp_path / "train.csv").write_text(
        'path,labels\na.jpg,cat;dog\nb.jpg,bird|cat\n"c,d.jpg",dog\ne.jpg,\nsub/f.jpg, bird \nabsent.jpg,cat\n'
    )
    (tmp_path / "val.jsonl").write_text(
        '{"path": "a.jpg", "labels": ["bird"]}\n\n{"path": "e.jpg", "labels": []}\n{"path": "b.jpg", "labels": ["dog", "cat"]}\n'
    )
    return tmp_path


def test_list_csv_and_jsonl(listed, caplog):
    names = read_label_names(listed / "names.txt")
    assert names == ["cat", "dog", "bird"]
    with caplog.at_level(logging.INFO, logger="fastmlgan.data.sources.listfile"):
        train = read_list(listed / "train.csv", listed / "names.txt", image_root=listed / "img")
    assert [Path(p).name for p in train.paths] == ["a.jpg", "b.jpg", "c,d.jpg", "f.jpg"]
    np.testing.assert_array_equal(train.labels, [[1, 1, 0], [1, 0, 1], [0, 1, 0], [0, 0, 1]])
    assert train.num_dropped_unlabeled == 1 and [Path(p).name for p in train.missing] == ["absent.jpg"]
    assert "dropped 1 images without labels" in caplog.text
    val = read_list(listed / "val.jsonl", names, image_root=listed / "img", drop_unlabeled=False)
    np.testing.assert_array_equal(val.labels, [[0, 0, 1], [0, 0, 0], [1, 1, 0]])


def test_list_errors_name_the_line(listed):
    (listed / "bad.csv").write_text("a.jpg,cat\nb.jpg,cat;horse\n")
    with pytest.raises(DataError, match=r"bad.csv:2: unknown label 'horse'"):
        read_list(listed / "bad.csv", listed / "names.txt", image_root=listed / "img")
    (listed / "bad.jsonl").write_text('{"path": "a.jpg", "labels": ["cat"]}\n{"path": "b.jpg", "labels": "cat"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: \"labels\" must be a list"):
        read_list(listed / "bad.jsonl", listed / "names.txt", image_root=listed / "img")
    (listed / "three.csv").write_text("a.jpg,cat,dog\n")
    with pytest.raises(DataError, match=r"three.csv:1: expected 'path,labels'"):
        read_list(listed / "three.csv", listed / "names.txt")
    (listed / "dup.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match=r"dup.txt:3: label 'cat' repeats line 1"):
        read_label_names(listed / "dup.txt")
    scan = scan_list(listed / "bad.csv", ["cat", "dog"], listed / "img")
    assert len(scan.paths) == 2 and len(scan.unknown_labels) == 1  # the check command's view


def test_list_through_the_config(listed):
    cfg = DataConfig(
        dataset="list", list_train=str(listed / "train.csv"), list_val=str(listed / "val.jsonl"),
        label_names=str(listed / "names.txt"), image_root=str(listed / "img"),
    )
    splits = build_splits(cfg, CPU)
    assert (len(splits.train), len(splits.val)) == (4, 2) and splits.class_names == ["cat", "dog", "bird"]
    with pytest.raises(ConfigError, match="label_names"):
        build_splits(DataConfig(dataset="list", list_train="x", list_val="y"), CPU)


def test_list_files_that_are_not_utf8_name_the_line(tmp_path):
    from fastmlgan.data.sources.listfile import read_label_names
    from fastmlgan.errors import DataError

    names = tmp_path / "names.txt"
    names.write_bytes(b"cat\n\xff\xfedog\n")
    with pytest.raises(DataError, match=r"names.txt:2: not UTF-8"):
        read_label_names(names)


# ----------------------------------------------------------------------------------------------
# Bad rows name the file and the real line (issue 11)


@pytest.mark.parametrize(
    "name, text, message",
    [
        # A quoted path spanning two lines (issue 18: a stray quote swallowed 14 rows silently) is
        # refused, naming the lines it spans.
        ("multiline.csv", 'a.jpg,cat\n"b\nc.jpg",dog\nd.jpg,horse\n', r"multiline.csv:2: a quoted field runs from line 2 to line 3"),
        # U+2028 and form feed are not line ends (str.splitlines would make them ones).
        ("sep.csv", "a\u2028b.jpg,cat\nx\x0cy.jpg,cat\nz.jpg,horse\n", r"sep.csv:3: unknown label 'horse'"),
        ("sep.jsonl", '{"path": "a\u2028.jpg", "labels": ["cat"]}\n{"path": "b.jpg", "labels": ["horse"]}\n',
         r"sep.jsonl:2: unknown label 'horse'"),
        ("crlf.csv", "a.jpg,cat\r\nb.jpg,dog\r\nc.jpg,horse\r\n", r"crlf.csv:3: unknown label 'horse'"),
        ("nul.csv", "a.jpg,cat\nb\x00.jpg,dog\n", r"nul.csv:2: NUL character"),
        ("nul.jsonl", '{"path": "a.jpg", "labels": []}\n{"path": "b\\u0000.jpg", "labels": ["cat"]}\n',
         r"nul.jsonl:2: the path contains a NUL character"),
        ("huge.csv", "a.jpg,cat\n" + "x" * 200_000 + ",cat\n", r"huge.csv:2: field larger than field limit"),
        ("bom.csv", "\ufeffpath,labels\na.jpg,horse\n", r"bom.csv:2: unknown label 'horse'"),
    ],
    ids=["multiline-quote", "unicode-separators", "jsonl-u2028", "crlf", "nul-byte", "jsonl-nul", "huge-field", "bom"],
)
def test_list_rows_name_the_real_line(listed, name, text, message):
    (listed / name).write_text(text, encoding="utf-8", newline="")
    with pytest.raises(DataError, match=message) as info:
        read_list(listed / name, listed / "names.txt", image_root=listed / "img")
    assert "\n" not in str(info.value)


def test_list_with_a_byte_order_mark_and_overlong_paths(listed):
    (listed / "bom_names.txt").write_text("\ufeffcat\ndog\n", encoding="utf-8")
    assert read_label_names(listed / "bom_names.txt") == ["cat", "dog"]
    (listed / "bom.csv").write_text("\ufeffpath,labels\na.jpg,cat\n", encoding="utf-8")
    images = read_list(listed / "bom.csv", listed / "bom_names.txt", image_root=listed / "img")
    assert [Path(p).name for p in images.paths] == ["a.jpg"]
    # A path the file system refuses to look up (ENAMETOOLONG) is a missing image, not a traceback.
    (listed / "long.csv").write_text("a.jpg,cat\n" + "d/" + "x" * 5000 + ".jpg,dog\n")
    images = read_list(listed / "long.csv", listed / "names.txt", image_root=listed / "img")
    assert len(images) == 1 and len(images.missing) == 1


def test_nuswide_errors_name_the_real_line(nuswide):
    root, labels = nuswide
    label_file = root / "Groundtruth" / "AllLabels" / f"Labels_{CONCEPTS[2]}.txt"
    values = [f"{v}" for v in labels[:, 2]]
    values[6] = "2"
    label_file.write_text("\n" + "\n".join(values[:3]) + "\n\n" + "\n".join(values[3:]) + "\n")  # two blank lines
    with pytest.raises(DataError, match=rf"Labels_{CONCEPTS[2]}.txt: line 9 is '2', expected 0 or 1"):
        read_listing(root, "all")
    concepts = list(CONCEPTS)
    concepts[40] = concepts[3]
    (root / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
    with pytest.raises(DataError, match=rf"Concepts81.txt:41: concept '{CONCEPTS[3]}' repeats line 4"):
        read_listing(root, "all")
    for bad in ("a/b", "a\\b", "a\x00b", ".."):
        concepts[40] = bad
        (root / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
        with pytest.raises(DataError, match=r"Concepts81.txt:41: concept .* cannot be part of a file name"):
            read_listing(root, "all")
