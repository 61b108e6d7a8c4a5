"""The multi-label table every feature reader returns (ARFF in ``arff``, .npz/.csv in
``features``), and the rules for turning text cells into numbers that the text readers share."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmlgan.errors import DataError
from fastmlgan.safeio import read_bytes

MISSING = "?"
"""The ARFF token of a missing value (a .csv cell may also be empty)."""

_FLOAT32_MAX = float(np.finfo(np.float32).max)
# What a number cell may hold: a plain decimal. Python's float() (and numpy's, which uses it) also
# takes 'inf', 'nan', '1_000' and non-ASCII digits, none of which a MULAN/MEKA file means.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_UNDERSCORE = ord("_")


@dataclass
class FeatureSet:
    """A multi-label table: ``features[i]`` is the input of row ``i``, ``labels[i, c] == 1`` when it
    carries class ``c`` (``class_names[c]``). NaN in ``features`` marks a missing value."""

    name: str
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N, C) uint8
    feature_names: list[str]
    class_names: list[str]

    def __post_init__(self) -> None:
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.uint8)
        if self.features.ndim != 2 or self.features.shape[1] != len(self.feature_names):
            raise ValueError(
                f"{self.name}: features must have shape (N, {len(self.feature_names)}), got {self.features.shape}"
            )
        if self.labels.ndim != 2 or self.labels.shape != (len(self.features), len(self.class_names)):
            raise ValueError(
                f"{self.name}: labels must have shape ({len(self.features)}, {len(self.class_names)}), "
                f"got {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.features)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_dim(self) -> int:
        return len(self.feature_names)

    def subset(self, indices, name: str | None = None) -> FeatureSet:
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            name=name or self.name,
            features=self.features[idx],
            labels=self.labels[idx],
            feature_names=list(self.feature_names),
            class_names=list(self.class_names),
        )


def read_text(path: Path) -> str:
    """The file as UTF-8 text; a DataError names the line of the first byte that is not."""
    if not os.path.lexists(path):
        raise DataError(f"{path}: no such file")
    raw = read_bytes(path, "data file")  # a FIFO, a device or a folder: one line, never a wait
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def to_float(cells: np.ndarray, names, lines: np.ndarray, path, missing=(MISSING,)) -> np.ndarray:
    """(N, k) float64 from string cells; a ``missing`` token is NaN.

    Every other cell must be a plain decimal that fits float32 (the features' dtype): a cell that
    is not, 'inf' and 'nan' included, raises a DataError naming the file, the line (the row) and
    the column. Left alone, an inf feature turns the standardised inputs into NaN and shows up much later as
    a non-finite loss that the trainer blames on the learning rate.
    """
    is_missing = None
    try:
        values = cells.astype(np.float64)  # the common case: one vectorised pass, no missing value
    except ValueError:
        is_missing = np.isin(np.char.strip(cells), list(missing))
        try:
            values = np.where(is_missing, "nan", cells).astype(np.float64)
        except ValueError:
            values = None
    if values is not None:
        suspect = ~np.isfinite(values) | (np.abs(values) > _FLOAT32_MAX)
        if is_missing is not None:
            suspect &= ~is_missing
        if not suspect.any() and not _odd_characters(cells).any():
            return values
    return _to_float_checked(cells, names, lines, path, missing)


def _odd_characters(cells: np.ndarray) -> np.ndarray:
    """Cells holding '_' or a non-ASCII character, which float() reads but a decimal has not."""
    if cells.size == 0:
        return np.zeros(cells.shape, dtype=bool)
    codes = np.ascontiguousarray(cells).view(np.uint32).reshape(*cells.shape, -1)
    return ((codes == _UNDERSCORE) | (codes > 127)).any(axis=-1)


def _to_float_checked(cells: np.ndarray, names, lines: np.ndarray, path, missing) -> np.ndarray:
    """``to_float`` cell by cell, in file order, to name the first bad cell."""
    out = np.full(cells.shape, np.nan)
    for i in range(cells.shape[0]):
        for j in range(cells.shape[1]):
            text = str(cells[i, j]).strip()
            if text in missing:
                continue
            where = f"{path}:{lines[i]}: {names[j]!r}"  # the line is the row, the name the column
            if not _DECIMAL.fullmatch(text):
                try:
                    float(text)
                except ValueError:
                    raise DataError(f"{where}: {text!r} is not a number") from None
                what = "a finite number" if text.lstrip("+-").lower() in ("inf", "infinity", "nan") else "a decimal"
                raise DataError(
                    f"{where}: {text!r} is not {what} (data row {i + 1}; a missing value is written {MISSING!r})"
                )
            value = float(text)
            if not abs(value) <= _FLOAT32_MAX:
                raise DataError(f"{where}: {text!r} is beyond float32's range, ±{_FLOAT32_MAX:.4g} (data row {i + 1})")
            out[i, j] = value
    return out


def check_labels(values: np.ndarray, names, lines: np.ndarray, path) -> np.ndarray:
    """(N, C) uint8 from label values that must be 0 or 1 (NaN, a missing label, is refused too)."""
    bad = ~((values == 0) | (values == 1))  # NaN (missing) is bad too
    if bad.any():
        i, c = np.argwhere(bad)[0]
        v = values[i, c]
        what = "is missing" if np.isnan(v) else f"must be 0 or 1, got {v:g}"
        raise DataError(f"{path}:{lines[i]}: label {names[c]!r} {what}")
    return values.astype(np.uint8)
