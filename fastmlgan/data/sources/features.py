"""Multi-label feature tables (MULAN / MEKA ARFF, .npz, .csv) as one train/test pair of
``FeatureSet``s (served by ``data.backends.vectors``, standardised with the training split's statistics).

These are the standard non-image benchmarks (scene, emotions, medical, ...): the classifier of §3
sees a fixed feature vector instead of CNN features, and the label sets are what the
discriminator models. The ARFF reader and its encoding rules are in ``sources.arff``;
this module reads .npz and .csv tables and picks the reader of a pair.
Every malformed file raises a ``DataError`` naming the file (and the line, for text files).
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np

from fastmlgan.data.sources.arff import load_arff_pair
from fastmlgan.data.sources.base import Source
from fastmlgan.data.sources.tables import MISSING, FeatureSet, check_labels, read_text, to_float
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.safeio import open_regular

__all__ = ["FeatureSet", "load_feature_dataset", "read_matrix"]


# ----------------------------------------------------------------------------------------------
# .npz / .csv


def _read_npz(path: Path, num_labels, label_columns) -> FeatureSet:
    try:
        with open_regular(path, "data file") as f:  # a FIFO: never waited on
            z = np.load(f, allow_pickle=False)
            if not hasattr(z, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            with z:
                arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz archive: {e}") from None

    def pick(*keys):
        for k in keys:
            if k in arrays:
                return k, arrays[k]
        raise DataError(f"{path}: needs an array named {' or '.join(map(repr, keys))}; found {sorted(arrays)}")

    x_key, x = pick("X", "features")
    y_key, y = pick("Y", "labels")
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise DataError(f"{path}: {x_key} {x.shape} and {y_key} {y.shape} must be 2-D with the same number of rows")
    feature_names = [str(s) for s in arrays.get("feature_names", [f"f{j}" for j in range(x.shape[1])])]
    class_names = [str(s) for s in arrays.get("class_names", [f"c{j}" for j in range(y.shape[1])])]
    if len(feature_names) != x.shape[1] or len(class_names) != y.shape[1]:
        raise DataError(f"{path}: feature_names/class_names do not match the columns of {x_key}/{y_key}")
    if num_labels is not None and num_labels != y.shape[1]:
        raise DataError(f"{path}: {y_key} has {y.shape[1]} label columns, num_labels={num_labels} was asked")
    if label_columns is not None and list(label_columns) != class_names:
        raise DataError(f"{path}: class_names {class_names} differ from label_columns={list(label_columns)}")
    try:
        x = x.astype(np.float32)
        y = y.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {x_key}/{y_key} are not numeric: {e}") from None
    bad = np.argwhere(~((y == 0) | (y == 1)))
    if len(bad):
        i, c = bad[0]
        raise DataError(f"{path}: {y_key}[{i}, {c}] = {y[i, c]:g}; labels must be 0 or 1")
    return FeatureSet(path.stem, x, y.astype(np.uint8), feature_names, class_names)


def _read_csv(path: Path, num_labels, label_columns) -> FeatureSet:
    text = read_text(path)
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{path}:1: empty file; expected a header row of column names")
        header = [h.strip() for h in header]
        if label_columns is not None:
            label_columns = list(label_columns)
            unknown = [c for c in label_columns if c not in header]
            if unknown:
                raise DataError(f"{path}:1: label column {unknown[0]!r} is not in the header")
            label_idx = [header.index(c) for c in label_columns]
        elif num_labels is not None:
            if not 1 <= num_labels < len(header):
                raise DataError(f"{path}:1: num_labels={num_labels} but the header has {len(header)} columns")
            label_idx = list(range(len(header) - num_labels, len(header)))
        else:
            raise ConfigError(f"read_matrix({path}): pass num_labels or label_columns to say which columns are labels")
        rows, lines = [], []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: expected {len(header)} values, got {len(row)}")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: {e}") from None
    if not rows:
        raise DataError(f"{path}:{reader.line_num}: no data rows after the header")
    cells, line_arr = np.array(rows, dtype=str), np.asarray(lines)
    values = to_float(cells, header, line_arr, path, missing=("", MISSING))
    feature_idx = [j for j in range(len(header)) if j not in set(label_idx)]
    labels = check_labels(values[:, label_idx], [header[j] for j in label_idx], line_arr, path)
    return FeatureSet(
        path.stem, values[:, feature_idx], labels, [header[j] for j in feature_idx], [header[j] for j in label_idx]
    )


def read_matrix(path, num_labels: int | None = None, label_columns=None) -> FeatureSet:
    """A ``.npz`` (arrays ``X``/``features`` and ``Y``/``labels``, optional ``feature_names`` and
    ``class_names``) or a ``.csv`` with a header row whose label columns are ``label_columns`` (names)
    or the last ``num_labels``; empty or ``?`` cells are missing features."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, num_labels, label_columns)
    if suffix == ".csv":
        return _read_csv(path, num_labels, label_columns)
    raise DataError(f"{path}: read_matrix reads .npz or .csv files, not {suffix or 'files without a suffix'}")


# ----------------------------------------------------------------------------------------------
# Train/test pairs


_FORMATS = ("auto", "mulan", "meka", "matrix")


def _check_same_columns(train: FeatureSet, test: FeatureSet, train_path, test_path) -> None:
    for what, a, b in (
        ("feature", train.feature_names, test.feature_names),
        ("label", train.class_names, test.class_names),
    ):
        if a != b:
            k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            got = repr(b[k]) if k < len(b) else "nothing"
            want = repr(a[k]) if k < len(a) else "nothing"
            raise DataError(
                f"{test_path}:1: {what} column {k + 1} is {got} but {train_path} has {want} "
                f"({len(b)} vs {len(a)} {what} columns); train and test must have the same columns"
            )


def load_feature_dataset(
    train, test, xml=None, format: str = "auto", num_labels: int | None = None, label_columns=None
) -> tuple[FeatureSet, FeatureSet]:
    """Read a train/test pair and check that both splits have the same columns and labels.

    ``format="auto"`` picks MULAN when ``xml`` is given, the matrix reader for .npz/.csv, and MEKA
    when the ARFF @relation holds ``-C``.
    """
    if format not in _FORMATS:
        raise ConfigError(f"format={format!r}: choose one of {', '.join(_FORMATS)}")
    matrix_file = xml is None and Path(train).suffix.lower() in (".npz", ".csv")
    if format == "matrix" or (format == "auto" and matrix_file):
        train_set = read_matrix(train, num_labels, label_columns)
        test_set = read_matrix(test, num_labels, label_columns)
    else:
        train_set, test_set = load_arff_pair(train, test, xml, format)
    _check_same_columns(train_set, test_set, train, test)
    return train_set, test_set


class FeaturesSource(Source):
    """Feature tables: MULAN/MEKA ARFF, .npz or CSV (``--data.dataset features``, the mlp backbone)."""

    kind = "features"
    required = ("features_train", "features_test")
    holds_features = True

    def read(self, cfg) -> tuple[FeatureSet, FeatureSet]:
        return load_feature_dataset(cfg.features_train, cfg.features_test, xml=cfg.features_xml or None)

    def title(self, cfg) -> str:
        return Path(cfg.features_train).stem.replace("-train", "")
