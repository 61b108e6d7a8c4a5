"""NUS-WIDE reader (81 concepts) in the dataset's official layout::

    <root>/Concepts81.txt                                  81 concept names, one a line
    <root>/ImageList/Imagelist.txt                         269,648 lines: C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg
    <root>/ImageList/TrainImagelist.txt, TestImagelist.txt the official 161,789 / 107,859 split
    <root>/Groundtruth/AllLabels/Labels_<concept>.txt      one 0/1 a line, aligned with Imagelist.txt
    <root>/Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt, _Test.txt   aligned with the split lists
    <image_root>/actor/0001_2124494179.jpg                 the images (default image_root: <root>/Flickr)

An image list entry names its file by the last two parts of the Windows path (concept folder and
file name), relative to ``image_root``.

Splits (``split``):

* ``paper`` (default): the paper's protocol (§4.2.2, after WARP and Att-RNN): images without any
  of the 81 labels are dropped (60,301 of 269,648), and the 209,347 labelled images are split
  150,000 / 59,347 by a seeded subsample. The rule, so that anyone can reproduce it: take the
  row numbers (0-based, in Imagelist.txt order) of the labelled images, permute them with
  ``numpy.random.default_rng(seed).permutation``, the first ``num_train`` are the training set
  and the rest the test set, each kept in Imagelist.txt order. The split is drawn before looking
  at the image folder, so it does not depend on which Flickr images could be downloaded; missing
  files are then left out of their split, listed and counted.
* ``official``: the dataset's own TrainImagelist/TestImagelist with the TrainTestLabels files,
  unlabelled images dropped (when ``drop_unlabeled``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fastmlgan.data.sources.base import Listing, Source
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.safeio import entry_is_dir, entry_is_file, inside_root, list_folder, read_bytes

logger = logging.getLogger(__name__)

NUM_CONCEPTS = 81
PAPER_NUM_TRAIN = 150_000
SPLITS = ("paper", "official")


def _all_lines(path: Path) -> list[str]:
    """Every line, stripped (blank ones as ''), so that index + 1 is the line number. Lines end at
    \n, \r\n or \r only: str.splitlines would also split at \x0c, U+2028... and shift the numbers."""
    if not path.exists():
        raise DataError(f"{path}: NUS-WIDE file not found (expected the official layout; see fastmlgan.data.sources.nuswide)")
    text = read_bytes(path, "NUS-WIDE file").decode("utf-8", errors="replace")  # not a FIFO or a device
    return [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines."""
    return [(n, line) for n, line in enumerate(_all_lines(path), 1) if line]


def _lines(path: Path) -> list[str]:
    return [line for line in _all_lines(path) if line]


def read_concepts(root) -> list[str]:
    """The 81 concept names of ``Concepts81.txt``, in file order (the class order)."""
    path = Path(root) / "Concepts81.txt"
    numbered = _numbered_lines(path)
    if len(numbered) != NUM_CONCEPTS:
        raise DataError(f"{path}: expected {NUM_CONCEPTS} concept names, found {len(numbered)}")
    first: dict[str, int] = {}
    for lineno, name in numbered:
        if name in first:
            raise DataError(f"{path}:{lineno}: concept {name!r} repeats line {first[name]}")
        # The name is part of its label files' names (Labels_<concept>.txt).
        if any(c in name for c in "/\\\x00") or name in (".", ".."):
            raise DataError(f"{path}:{lineno}: concept {name!r} cannot be part of a file name (Labels_<concept>.txt)")
        first[name] = lineno
    return [name for _, name in numbered]


def image_relpath(entry: str) -> str:
    """``C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg`` -> ``actor/0001_2124494179.jpg``."""
    parts = [p for p in entry.replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:])


def _label_column(path: Path, num_images: int) -> np.ndarray:
    lines = _all_lines(path)
    values = [line for line in lines if line]  # 81 files of 269,648 lines: no per-line tuples
    if len(values) != num_images:
        raise DataError(f"{path}: {len(values)} lines, but the image list has {num_images} images")
    column = np.asarray(values, dtype=str)
    ones = column == "1"
    if not (ones | (column == "0")).all():
        lineno, value = next((n, v) for n, v in enumerate(lines, 1) if v and v not in ("0", "1"))
        raise DataError(f"{path}: line {lineno} is {value!r}, expected 0 or 1")
    return ones


def _read_matrix(root: Path, list_file: Path, label_pattern: str, concepts: list[str]) -> tuple[list[str], np.ndarray]:
    entries = [image_relpath(e) for e in _lines(list_file)]
    labels = np.zeros((len(entries), len(concepts)), dtype=np.uint8)
    for c, concept in enumerate(concepts):
        labels[:, c] = _label_column(root / label_pattern.format(concept=concept), len(entries))
    return entries, labels


def read_listing(root, which: str = "all") -> tuple[list[str], np.ndarray, list[str]]:
    """(relative image paths, (N, 81) labels, concept names) of one image list, unlabelled images
    included: ``which`` is all (Imagelist.txt, AllLabels), train or test (the official split)."""
    root = Path(root)
    concepts = read_concepts(root)
    if which == "all":
        entries, labels = _read_matrix(
            root, root / "ImageList" / "Imagelist.txt", "Groundtruth/AllLabels/Labels_{concept}.txt", concepts
        )
    elif which in ("train", "test"):
        suffix = which.capitalize()
        entries, labels = _read_matrix(
            root,
            root / "ImageList" / f"{suffix}Imagelist.txt",
            f"Groundtruth/TrainTestLabels/Labels_{{concept}}_{suffix}.txt",
            concepts,
        )
    else:
        raise ValueError(f"which must be all, train or test, got {which!r}")
    return entries, labels, concepts


def paper_split(labels: np.ndarray, num_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of the training and test images of the paper's protocol (see the module docstring)."""
    labelled = np.flatnonzero(labels.any(axis=1))
    if num_train >= len(labelled):
        raise ConfigError(
            f"--data.nuswide_num_train {num_train} leaves no test images: only {len(labelled)} images are labelled"
        )
    perm = np.random.default_rng(seed).permutation(labelled)
    return np.sort(perm[:num_train]), np.sort(perm[num_train:])


def _build(name: str, entries: list[str], labels: np.ndarray, rows, concepts, image_root: Path, num_dropped: int,
           allow_outside_root: bool = False):
    listed = _listed_files(image_root)
    paths, keep, missing = [], [], []
    for row in rows:
        if allow_outside_root:
            path = image_root / entries[row]
        else:
            where = f"NUS-WIDE {name}: image list entry {row + 1}"
            path = inside_root(image_root, entries[row], where, "--data.allow_outside_root")
        if entries[row] in listed:
            paths.append(str(path))
            keep.append(row)
        else:
            missing.append(str(path))
    if missing:
        logger.warning(
            "NUS-WIDE %s: %d of %d images are absent from %s and left out (first: %s)",
            name, len(missing), len(rows), image_root, missing[0],
        )
    if not paths:
        raise DataError(f"NUS-WIDE {name}: none of the {len(rows)} images is in {image_root}")
    return LabeledImages(
        name=name,
        paths=paths,
        labels=labels[np.asarray(keep, dtype=np.int64)],
        class_names=list(concepts),
        num_dropped_unlabeled=num_dropped,
        missing=missing,
    )


def _listed_files(image_root: Path) -> set[str]:
    """``concept/file`` names under ``image_root`` from one listing per concept folder (a stat
    per image is slow on network file systems)."""
    if not image_root.is_dir():
        raise DataError(f"{image_root}: NUS-WIDE image folder not found (set --data.image_root)")
    found: set[str] = set()
    for entry in list_folder(image_root, "NUS-WIDE image folder"):
        if entry_is_dir(entry):
            found.update(f"{entry.name}/{f.name}" for f in list_folder(entry.path, "NUS-WIDE image folder") if entry_is_file(f))
        elif entry_is_file(entry):
            found.add(entry.name)
    return found


def read_nuswide(
    root,
    split: str = "paper",
    num_train: int = PAPER_NUM_TRAIN,
    seed: int = 0,
    image_root=None,
    drop_unlabeled: bool = True,
    allow_outside_root: bool = False,
) -> tuple[LabeledImages, LabeledImages]:
    """(train, test) of NUS-WIDE's 81 concepts under ``root`` (see the module docstring).

    ``paper`` split: the unlabelled images are counted in the training split's
    ``num_dropped_unlabeled`` (they are dropped before splitting); it always drops them."""
    if split not in SPLITS:
        raise ConfigError(f"--data.nuswide_split: {split!r} is not one of {', '.join(SPLITS)}")
    root = Path(root)
    image_root = Path(image_root) if image_root else root / "Flickr"
    if split == "paper":
        entries, labels, concepts = read_listing(root, "all")
        train_rows, test_rows = paper_split(labels, num_train, seed)
        num_dropped = int(len(entries) - len(train_rows) - len(test_rows))
        logger.info(
            "NUS-WIDE: %d images listed, %d without any of the %d labels dropped, %d labelled split "
            "%d train / %d test (seed %d)",
            len(entries), num_dropped, len(concepts), len(train_rows) + len(test_rows),
            len(train_rows), len(test_rows), seed,
        )
        train = _build("nuswide-train", entries, labels, train_rows, concepts, image_root, num_dropped, allow_outside_root)
        test = _build("nuswide-test", entries, labels, test_rows, concepts, image_root, 0, allow_outside_root)
        return train, test
    out = []
    for which in ("train", "test"):
        entries, labels, concepts = read_listing(root, which)
        labelled = labels.any(axis=1)
        rows = np.flatnonzero(labelled) if drop_unlabeled else np.arange(len(entries))
        num_dropped = int(len(entries) - len(rows))
        logger.info("NUS-WIDE official %s: %d images listed, %d without labels dropped", which, len(entries), num_dropped)
        out.append(_build(f"nuswide-{which}", entries, labels, rows, concepts, image_root, num_dropped, allow_outside_root))
    return out[0], out[1]


class NuswideSource(Source):
    """NUS-WIDE in its official layout (``--data.dataset nuswide --data.nuswide_root DIR``)."""

    kind = "nuswide"
    required = ("nuswide_root",)

    def read(self, cfg) -> tuple[LabeledImages, LabeledImages]:
        return read_nuswide(
            cfg.nuswide_root, cfg.nuswide_split, cfg.nuswide_num_train, cfg.nuswide_seed,
            image_root=cfg.image_root or None, drop_unlabeled=cfg.drop_unlabeled, allow_outside_root=cfg.allow_outside_root,
        )

    def listings(self, cfg) -> list[Listing]:
        self.check_options(cfg)
        image_root = Path(cfg.image_root or Path(cfg.nuswide_root) / "Flickr")
        splits = ("all",) if cfg.nuswide_split == "paper" else ("train", "test")
        out = []
        for which in splits:
            entries, labels, _ = read_listing(cfg.nuswide_root, which)
            out.append(Listing(which, [str(image_root / e) for e in entries], labels.any(axis=1)))
        return out
