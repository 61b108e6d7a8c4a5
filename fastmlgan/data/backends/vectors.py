"""The features backend: a ``FeatureSet`` (MULAN/MEKA tables, label sets with synthetic evidence)
held in memory as standardised tensors, served through the torch backend's sharded loaders
(worker processes would only add overhead)."""

from __future__ import annotations

import numpy as np
import torch

from fastmlgan.data.backends.torch_dataloader import build_eval_loader, build_train_loader
from fastmlgan.data.sources.tables import FeatureSet


class Standardizer:
    """Per-column z-scoring with the mean/std of the TRAINING rows; a missing (NaN) value becomes the
    training mean, i.e. 0 after centring, so no statistic of the test split leaks into it."""

    def __init__(self, mean=None, std=None) -> None:
        self.mean = None if mean is None else np.asarray(_to_numpy(mean), dtype=np.float32).reshape(-1)
        self.std = None if std is None else np.asarray(_to_numpy(std), dtype=np.float32).reshape(-1)
        if (self.mean is None) != (self.std is None) or (self.mean is not None and self.mean.shape != self.std.shape):
            raise ValueError("Standardizer needs both mean and std, of the same length")

    def fit(self, features) -> Standardizer:
        x = np.asarray(_to_numpy(features), dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"Standardizer.fit expects a non-empty (N, D) matrix, got shape {x.shape}")
        present = ~np.isnan(x)
        count = present.sum(axis=0)
        x0 = np.where(present, x, 0.0)
        mean = x0.sum(axis=0) / np.maximum(count, 1)  # an all-missing column gets mean 0
        var = (np.where(present, x - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count, 1)
        std = np.sqrt(var)
        # A constant column has std 0 up to float64 rounding of its mean: leave it unscaled.
        std = np.where(std > 1e-10 * np.abs(mean), std, 1.0)
        std = np.where(std > 0, std, 1.0)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        return self

    def transform(self, features):
        """Standardised copy of ``features`` (numpy in → numpy float32 out; tensor in → tensor out)."""
        if self.mean is None:
            raise RuntimeError("Standardizer.transform called before fit")
        if features.shape[-1] != len(self.mean):
            raise ValueError(f"expected {len(self.mean)} feature columns, got {features.shape[-1]}")
        if isinstance(features, np.ndarray):
            z = (features.astype(np.float32) - self.mean) / self.std
            return np.where(np.isnan(z), np.float32(0), z)
        mean = torch.as_tensor(self.mean, device=features.device)
        std = torch.as_tensor(self.std, device=features.device)
        z = (features.float() - mean) / std
        return torch.where(torch.isnan(z), torch.zeros_like(z), z)

    def state_dict(self) -> dict:
        if self.mean is None:
            raise RuntimeError("Standardizer.state_dict called before fit")
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> Standardizer:
        return cls(state["mean"], state["std"])


def _to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class FeatureDataset:
    """A ``FeatureSet`` as loader samples with the same keys as the image loaders.

    ``image`` holds the standardised feature vector (the generator's input whatever its kind),
    ``crop`` is [-1, -1] (no augmentation), ``bad`` is always False. Accepts ``ds[i]`` and the
    ``ds[(epoch, i)]`` form the training loader's sampler uses.
    """

    def __init__(self, features: FeatureSet, standardizer: Standardizer) -> None:
        self.features = features
        self._x = torch.from_numpy(np.asarray(standardizer.transform(features.features), dtype=np.float32))
        self._y = torch.from_numpy(features.labels.astype(np.float32))

    def __len__(self) -> int:
        return len(self.features)

    def set_epoch(self, epoch: int) -> None:  # no per-epoch randomness: nothing to do
        pass

    def __getitem__(self, item) -> dict:
        index = int(item[1] if isinstance(item, tuple) else item)
        return {
            "image": self._x[index],
            "labels": self._y[index],
            "crop": torch.tensor([-1, -1], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
            "bad": torch.tensor(False),
        }


def standardizer_of(splits) -> Standardizer:
    """The training split's standardisation, fitted once (training rows only) and kept on ``splits``."""
    if splits.standardizer is None:
        splits.standardizer = Standardizer().fit(splits.train.features)
    return splits.standardizer


def train_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False,
                             pixels_per_batch: int | None = None):
    """``factory.BACKENDS["features"]``: standardised in-memory vectors; no worker processes."""
    return build_train_loader(FeatureDataset(splits.train, standardizer_of(splits)), batch, info.rank, info.world_size, seed, 0)


def eval_loader_from_config(cfg, splits, info, seed: int, batch: int, channels_last: bool = False):
    return build_eval_loader(FeatureDataset(splits.val, standardizer_of(splits)), batch, info.rank, info.world_size, 0)
