"""A validation split carved out of the training split: one rule for ``fastmlgan train
--data.val_fraction`` (its thresholds and raw-or-EMA choice) and for ``fastmlgan reproduce``'s
protocol (its epoch selection). The evaluation split stays the test split: nothing is chosen on it.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fastmlgan.data.types import LabeledImages, Splits
from fastmlgan.errors import ConfigError

VAL_STREAM = 20190512  # first entry of the validation-split seed sequence (any fixed constant)


def carve_validation(num_train: int, fraction: float, seed: int, option: str = "--val-fraction") -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices) into the training split: a seeded random ``fraction``
    (``numpy.random.default_rng([VAL_STREAM, seed])``). ``option`` names the knob in the error."""
    num_val = int(round(fraction * num_train))
    if not 0 < num_val < num_train:
        raise ConfigError(f"{option} {fraction} leaves no validation or no fit rows of {num_train}")
    order = np.random.default_rng([VAL_STREAM, seed]).permutation(num_train)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def index_digest(indices: np.ndarray) -> str:
    """A short fingerprint of a set of row indices (which rows a split holds)."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def hold_out(splits: Splits, fraction: float, seed: int, option: str = "--data.val_fraction") -> tuple[Splits, LabeledImages, dict]:
    """(``Splits(fit, test)``, the validation split, a record of the draw) from ``splits``."""
    fit_idx, val_idx = carve_validation(len(splits.train), fraction, seed, option)
    fit = splits.train.subset(fit_idx, name=f"{splits.train.name}-fit")
    val = splits.train.subset(val_idx, name=f"{splits.train.name}-selection")
    record = {
        "fraction": fraction,
        "seed": seed,
        "train_rows": len(splits.train),
        "fit_rows": len(fit_idx),
        "val_rows": len(val_idx),
        "val_indices_sha": index_digest(val_idx),
    }
    return Splits(fit, splits.val), val, record
