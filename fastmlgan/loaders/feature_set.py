"""The multi-label table every feature reader returns (ARFF in ``arff``, .npz/.csv in
``features``), and the rules for turning text cells into numbers that the text readers share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmlgan.errors import DataError

MISSING = "?"
"""The ARFF token of a missing value (a .csv cell may also be empty)."""



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
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def to_float(cells: np.ndarray, names, lines: np.ndarray, path, missing=(MISSING,)) -> np.ndarray:
    """(N, k) float64 from string cells; a ``missing`` token is NaN; a bad number names its line."""
    try:
        return cells.astype(np.float64)  # the common case: one vectorised pass, blanks allowed
    except ValueError:
        pass
    stripped = np.char.strip(cells)
    is_missing = np.isin(stripped, list(missing))
    try:
        return np.where(is_missing, "nan", stripped).astype(np.float64)
    except ValueError:
        pass
    # Slow path, only to report the first bad value in file order.
    out = np.full(cells.shape, np.nan)
    for i in range(cells.shape[0]):
        for j in range(cells.shape[1]):
            if is_missing[i, j]:
                continue
            try:
                out[i, j] = float(stripped[i, j])
            except ValueError:
                raise DataError(f"{path}:{lines[i]}: {names[j]!r}: {str(stripped[i, j])!r} is not a number") from None
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
