"""A generic list format for your own multi-label images.

A label-names file, one class name a line (the line order is the class order; blank lines are
ignored), and one list file per split, either

* CSV (any extension but ``.jsonl``/``.ndjson``): ``path,labels`` with the labels separated by
  ``;`` or ``|``; an optional header row ``path,labels`` (the first row); a row with no labels is
  an unlabelled image; paths and labels are stripped of surrounding spaces. Quote paths that
  contain commas::

      path,labels
      kitchen/0001.jpg,cup;plate;person
      street/0002.jpg,car|traffic light

* JSONL (``.jsonl`` or ``.ndjson``): one object a line, ``{"path": "...", "labels": [...]}``.

Paths are relative to ``image_root`` (default: the list file's folder); an absolute path, or one
climbing out of it with ``..``, is an error unless ``allow_outside_root`` (``--data.allow_outside_root``).
Files are UTF-8 (a byte-order mark is allowed); lines end at ``\n``, ``\r\n`` or ``\r``, and no
field may span lines (a stray ``"`` would otherwise swallow the rows up to the next one). A label
name that is not in the names file, a malformed row, an empty path or a NUL character is an error
naming the file and line; images without labels are dropped and counted (``drop_unlabeled``);
missing image files are listed and left out.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastmlgan.data.sources.base import Listing, Source
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.safeio import inside_root, read_bytes

logger = logging.getLogger(__name__)

_SEPARATORS = re.compile(r"[;|]")
# Lines end at \n, \r\n or \r only: str.splitlines() would also split at \x0c, \x1c, U+2028...,
# which may appear inside a path or a JSON string, and then the line numbers would be wrong.
_NEWLINES = re.compile(r"\r\n|\r|\n")


def _read_utf8(path: Path) -> str:
    """The file's text (a leading UTF-8 byte-order mark dropped); NUL bytes are an error naming the line."""
    data = read_bytes(path, "list file")  # not a FIFO, a device or a folder
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if "\x00" in text:
        line = len(_NEWLINES.findall(text[: text.index("\x00")])) + 1
        raise DataError(f"{path}:{line}: NUL character (a binary file, or UTF-16 text?); save the file as UTF-8")
    return text.removeprefix("\ufeff")


def _lines(text: str) -> list[str]:
    lines = _NEWLINES.split(text)
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_label_names(path) -> list[str]:
    """Class names, one a line, in file order."""
    path = Path(path)
    if not os.path.lexists(path):  # a symbolic link loop is named by read_bytes
        raise DataError(f"{path}: label-names file not found")
    names, first_line = [], {}
    for lineno, line in enumerate(_lines(_read_utf8(path)), 1):
        name = line.strip()
        if not name:
            continue
        if name in first_line:
            raise DataError(f"{path}:{lineno}: label {name!r} repeats line {first_line[name]}")
        first_line[name] = lineno
        names.append(name)
    if not names:
        raise DataError(f"{path}: no label names")
    return names


@dataclass
class ListScan:
    """Every row of a list file, whatever its problems: what ``read_list`` and the check command use."""

    paths: list[str]
    labels: np.ndarray  # (N, C) uint8
    class_names: list[str]
    problems: list[str] = field(default_factory=list)
    """One message per malformed row or unknown label name, naming file and line."""
    unknown_labels: list[str] = field(default_factory=list)
    """The subset of ``problems`` that are unknown label names."""


def _rows(list_file: Path):
    """(line number, path, [label names]) per row, or (line number, None, error message)."""
    text = _read_utf8(list_file)
    if list_file.suffix.lower() in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"not valid JSON ({e.msg})"
                continue
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                yield lineno, None, 'expected an object with a "path" string and a "labels" list'
                continue
            labels = row.get("labels", [])
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                yield lineno, None, '"labels" must be a list of label names'
                continue
            yield lineno, row["path"], [x.strip() for x in labels if x.strip()]
        return
    # newline="": the csv module sees the line ends itself, so a quoted field may span lines and
    # reader.line_num counts real lines (a row is named by the line it starts on).
    reader = csv.reader(io.StringIO(text, newline=""))
    first, lineno = True, 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # an unclosed quote or an overlong field: the rest cannot be split into rows
            yield lineno, None, f"{e}; the rest of the file is not read"
            return
        start, lineno = lineno, reader.line_num + 1
        if any("\n" in cell or "\r" in cell for cell in row):
            yield start, None, (
                f"a quoted field runs from line {start} to line {lineno - 1} (a stray '\"'?): paths and labels "
                "cannot span lines"
            )
            continue
        if not row or not "".join(row).strip():
            continue
        if first and row[0].strip().lower() == "path":
            first = False
            continue  # header
        first = False
        if len(row) > 2:
            yield start, None, f"expected 'path,labels' (2 columns), got {len(row)}; quote paths with commas"
            continue
        labels = row[1] if len(row) == 2 else ""
        yield start, row[0].strip(), [x.strip() for x in _SEPARATORS.split(labels) if x.strip()]


def scan_list(list_file, class_names: list[str], image_root=None, allow_outside_root: bool = False) -> ListScan:
    """Parse a list file, collecting (not raising on) malformed rows, unknown label names and
    paths outside ``image_root``."""
    list_file = Path(list_file)
    if not os.path.lexists(list_file):
        raise DataError(f"{list_file}: list file not found")
    root = Path(image_root) if image_root else list_file.parent
    column = {name: c for c, name in enumerate(class_names)}
    paths, rows, problems, unknown = [], [], [], []
    for lineno, path, labels in _rows(list_file):
        if path is None:
            problems.append(f"{list_file}:{lineno}: {labels}")
            continue
        if not path:
            problems.append(f"{list_file}:{lineno}: empty path")
            continue
        if "\x00" in path:
            problems.append(f"{list_file}:{lineno}: the path contains a NUL character")
            continue
        if not allow_outside_root:
            try:
                inside_root(root, path, f"{list_file}:{lineno}", "--data.allow_outside_root")
            except DataError as e:
                problems.append(str(e))
                continue
        row = np.zeros(len(class_names), dtype=np.uint8)
        for name in labels:
            if name in column:
                row[column[name]] = 1
            else:
                message = f"{list_file}:{lineno}: unknown label {name!r} (not in the label-names file)"
                problems.append(message)
                unknown.append(message)
        paths.append(str(root / path))
        rows.append(row)
    labels = np.stack(rows) if rows else np.zeros((0, len(class_names)), dtype=np.uint8)
    return ListScan(paths, labels, list(class_names), problems, unknown)


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long for the file system (is_file raises for that): not there
        return False


def read_list(
    list_file, label_names, image_root=None, drop_unlabeled: bool = True, name: str | None = None,
    allow_outside_root: bool = False,
) -> LabeledImages:
    """A list file (CSV or JSONL, see the module docstring) as ``LabeledImages``.

    ``label_names`` is the label-names file (or the list of names itself)."""
    class_names = label_names if isinstance(label_names, list) else read_label_names(label_names)
    scan = scan_list(list_file, class_names, image_root, allow_outside_root)
    if scan.problems:
        more = f" (and {len(scan.problems) - 1} more problems)" if len(scan.problems) > 1 else ""
        raise DataError(scan.problems[0] + more)
    labelled = scan.labels.any(axis=1)
    keep = labelled if drop_unlabeled else np.ones(len(scan.paths), dtype=bool)
    num_dropped = int(len(scan.paths) - keep.sum())
    paths, rows, missing = [], [], []
    for row in np.flatnonzero(keep):
        if _is_file(scan.paths[row]):
            paths.append(scan.paths[row])
            rows.append(row)
        else:
            missing.append(scan.paths[row])
    if missing:
        logger.warning("%s: %d of %d images are absent and left out (first: %s)", list_file, len(missing), int(keep.sum()), missing[0])
    if num_dropped:
        logger.info("%s: dropped %d images without labels", list_file, num_dropped)
    if not paths:
        raise DataError(f"{list_file}: no usable images ({len(scan.paths)} listed, {num_dropped} without labels, {len(missing)} absent)")
    return LabeledImages(
        name=name or Path(list_file).stem,
        paths=paths,
        labels=scan.labels[np.asarray(rows, dtype=np.int64)],
        class_names=class_names,
        num_dropped_unlabeled=num_dropped,
        missing=missing,
    )


class ListSource(Source):
    """Your own data: CSV or JSONL lists of ``path, labels`` and a label-names file (``--data.dataset list``)."""

    kind = "list"
    required = ("list_train", "list_val", "label_names")

    def read(self, cfg) -> tuple[LabeledImages, LabeledImages]:
        names = read_label_names(cfg.label_names)
        root, outside = cfg.image_root or None, cfg.allow_outside_root
        train = read_list(cfg.list_train, names, root, cfg.drop_unlabeled, name="train", allow_outside_root=outside)
        val = read_list(cfg.list_val, names, root, cfg.drop_unlabeled, name="val", allow_outside_root=outside)
        return train, val

    def listings(self, cfg) -> list[Listing]:
        if not cfg.label_names:
            raise ConfigError("data.dataset=list needs --data.label_names")
        if not (cfg.list_train or cfg.list_val):
            raise ConfigError("data.dataset=list needs --data.list_train, --data.list_val or both")
        names = read_label_names(cfg.label_names)
        out = []
        for split, list_file in (("train", cfg.list_train), ("val", cfg.list_val)):
            if not list_file:
                continue
            scan = scan_list(list_file, names, cfg.image_root or None, cfg.allow_outside_root)
            out.append(Listing(split, scan.paths, scan.labels.any(axis=1), scan.problems))
        return out
