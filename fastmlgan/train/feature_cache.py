"""The frozen-feature cache (``--gan.feature_cache PATH``): f_ext of every training image under
each of its 25 five-crop windows, computed once and read by every later phase-2 run.

f_ext is frozen (§4.1), and with ImageNet weights it is the same network in every run on the same
data, while a phase-2 iteration spends 10 of its ~16 ResNet forwards on it. f_ext(x) depends only
on the image and its crop window (5 positions × 5 sides, ``data.geometry``), so a table of
N × 25 feature vectors replaces every one of those forwards by a lookup, and the matched and
mismatched pairs need no decoded pixels at all.

File layout (one file): ``MAGIC``, the header length (8 bytes, little endian), a JSON header, zero
padding to ``ALIGN`` bytes; ``N`` int64 (the image each row's features were computed from: itself,
or the stand-in for an undecodable image under ``--data.on_bad_image skip``); the N × C uint8 label
matrix; then ``N × 25 × feature_dim`` bf16 values (row ``i * 25 + k`` is image ``i`` under window
``k = position * 5 + size_index``), each section aligned to ``ALIGN``. The header holds what the
features depend on: a digest of f_ext's weights, the geometry (image size, base, crop sides,
normalisation), the compute dtype, and every image's path, size and modification time.

A run may use any subset of the images a cache was built for (the reproduction harness builds one
cache over the training split and each seed trains on its own part of it): ``attach`` maps the
run's images to cache rows. A cache built for other weights or geometry, lacking one of the run's
images, or holding one that changed since, is refused by name, never silently used; a file whose
size disagrees with its header is refused as truncated or edited. It is written to a temporary
file and renamed when complete, so a crash mid-build leaves no cache that looks whole.

The crops are the torch loader's (decode with PIL, resize to base × base, crop, resize, all uint8
antialiased bilinear): other backends' pixels differ from them by decoder rounding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmlgan.data.backends.torch_dataloader import FiveCropDataset
from fastmlgan.data.backends.torchvision_gpu import five_crop_batch, normalize_batch
from fastmlgan.data.geometry import IMAGENET_MEAN, IMAGENET_STD, NUM_POSITIONS, NUM_SIZES, base_size, crop_sides, resize
from fastmlgan.data.sources import SOURCES
from fastmlgan.distributed import barrier
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.logs import Progress
from fastmlgan.safeio import open_regular

logger = logging.getLogger(__name__)

MAGIC = b"FMLGFEAT"
FORMAT = 1
ALIGN = 4096
NUM_WINDOWS = NUM_POSITIONS * NUM_SIZES


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, shapes, dtypes and bytes of every tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_stat(path: str) -> list[int]:
    """[size, mtime in ns] of a file ([-1, -1] when it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def geometry(image_size: int) -> dict[str, Any]:
    return {
        "image_size": int(image_size),
        "base": base_size(image_size),
        "crop_sides": list(crop_sides(image_size)),
        "windows": "position * 5 + size_index",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


def expected_header(feature_extractor, image_size: int, compute_dtype: str) -> dict[str, Any]:
    """What the features depend on besides the images (checked by ``FeatureCache.check``)."""
    return {
        "format": FORMAT,
        "weights": weights_digest(feature_extractor),
        "feature_dim": int(feature_extractor.feature_dim),
        "geometry": geometry(image_size),
        "compute_dtype": compute_dtype,
    }


# What the header must agree on, with the words the refusal uses.
_CHECKS = (
    ("format", "file format"),
    ("weights", "f_ext weights"),
    ("feature_dim", "feature dimension"),
    ("geometry", "crop geometry"),
    ("compute_dtype", "f_ext compute dtype"),
)


class FeatureCache:
    """A built cache, memory-mapped: ``lookup(index, crop, device)`` gives f_ext features."""

    def __init__(self, path: Path, header: dict[str, Any], header_length: int) -> None:
        self.path = path
        self.header = header
        n, d, c = header["num_images"], header["feature_dim"], header["num_classes"]
        used_at, labels_at, rows_at, _ = _offsets(header_length, n, d, c)
        # The image each row was computed from: itself, or its stand-in (the loaders' skip policy).
        self.used_index = np.array(np.memmap(path, dtype=np.int64, mode="r", offset=used_at, shape=(n,)))
        self.labels = np.array(np.memmap(path, dtype=np.uint8, mode="r", offset=labels_at, shape=(n, c)))
        self._rows = np.memmap(path, dtype=np.uint16, mode="r", offset=rows_at, shape=(n * NUM_WINDOWS, d))
        self.substituted = np.flatnonzero(self.used_index != np.arange(n))
        self.row_of = np.arange(n)  # the run's image i -> cache row (``attach``)

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureCache:
        path = Path(path)
        try:
            with open_regular(path, "--gan.feature_cache") as f:  # a FIFO: refused, not waited on
                if f.read(len(MAGIC)) != MAGIC:
                    raise DataError(f"--gan.feature_cache {path}: not a fastmlgan feature cache")
                length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(length))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise DataError(f"--gan.feature_cache {path}: unreadable header ({e})") from None
        try:
            need = _offsets(length, int(header["num_images"]), int(header["feature_dim"]), int(header["num_classes"]))[-1]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"--gan.feature_cache {path}: its header lacks the image count or feature size") from None
        if path.stat().st_size != need:
            raise DataError(
                f"--gan.feature_cache {path}: {path.stat().st_size} bytes where its header promises {need} "
                "(truncated or edited); delete it to rebuild"
            )
        return cls(path, header, length)

    def check(self, expected: dict[str, Any]) -> None:
        """Refuse a cache built from other weights or geometry, naming what differs."""
        for key, what in _CHECKS:
            if self.header.get(key) != expected[key]:
                raise ConfigError(
                    f"--gan.feature_cache {self.path} was built for another {what} "
                    f"({_short(self.header.get(key))} there, {_short(expected[key])} in this run); "
                    "pass a new path or delete the file to rebuild it"
                )

    def attach(self, images) -> None:
        """Map the run's images (a ``LabeledImages``, the cache's own or a subset of them) to cache
        rows; refuse an image the cache lacks or one whose file changed since it was built."""
        row = {path: i for i, path in enumerate(self.header["paths"])}
        stats = self.header["stats"]
        row_of = np.empty(len(images), dtype=np.int64)
        for i, path in enumerate(images.paths):
            j = row.get(str(path))
            if j is None:
                raise ConfigError(
                    f"--gan.feature_cache {self.path} holds no features of {path} (built for another data set); "
                    "pass a new path or delete the file to rebuild it"
                )
            if file_stat(str(path)) != stats[j]:
                raise ConfigError(
                    f"--gan.feature_cache {self.path}: {path} changed since the cache was built (size or "
                    "modification time); delete the file to rebuild it"
                )
            row_of[i] = j
        self.row_of = row_of

    def lookup(self, index: torch.Tensor, crop: torch.Tensor, device: torch.device) -> torch.Tensor:
        """fp32 features (R, feature_dim) of the run's images ``index`` (R,) under windows ``crop`` (R, 2)."""
        rows = self.row_of[index.cpu().numpy()] * NUM_WINDOWS + crop[:, 0].cpu().numpy() * NUM_SIZES + crop[:, 1].cpu().numpy()
        host = torch.from_numpy(np.ascontiguousarray(self._rows[rows])).view(torch.bfloat16)
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True).float()


    def stand_in_labels(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with the rows of undecodable images replaced by their stand-in's labels: the
        features of those rows are the stand-in's (rows the loader decoded already carry them)."""
        if not len(self.substituted):
            return labels
        rows = self.row_of[index.cpu().numpy()]
        hit = np.isin(rows, self.substituted)
        if not hit.any():
            return labels
        labels = labels.clone()
        labels[torch.from_numpy(hit)] = torch.from_numpy(self.labels[self.used_index[rows[hit]]].astype(np.float32))
        return labels


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:16] + "…" if len(text) > 16 else text


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _offsets(header_length: int, num_images: int, feature_dim: int, num_classes: int) -> tuple[int, int, int, int]:
    """(where the used-index table starts, the labels, the features; the file size)."""
    used_at = _align(len(MAGIC) + 8 + header_length)
    labels_at = _align(used_at + 8 * num_images)
    rows_at = _align(labels_at + num_images * num_classes)
    return used_at, labels_at, rows_at, rows_at + num_images * NUM_WINDOWS * feature_dim * 2


def _window_table() -> torch.Tensor:
    return torch.tensor([[k // NUM_SIZES, k % NUM_SIZES] for k in range(NUM_WINDOWS)], dtype=torch.int64)


class _AllWindows(torch.utils.data.Dataset):
    """Image i -> its 25 training crops, uint8 (25, 3, S, S): the torch loader's geometry."""

    def __init__(self, images, image_size: int, on_bad_image: str) -> None:
        self.source = FiveCropDataset(images, image_size, train=True, on_bad_image=on_bad_image)
        self.image_size = image_size
        self.windows = _window_table()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        used, image, _ = self.source.decode(i)
        base = resize(image, base_size(self.image_size))
        crops = five_crop_batch(base.expand(NUM_WINDOWS, *base.shape), self.windows, self.image_size)
        return {"crops": crops, "index": torch.tensor(i), "used": torch.tensor(used)}


def build(
    path: str | os.PathLike,
    feature_extractor: torch.nn.Module,
    images,
    image_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    on_bad_image: str = "skip",
    batch_images: int = 8,
    num_workers: int = 0,
    progress: bool = True,
) -> FeatureCache:
    """Compute the cache for ``images`` (a ``LabeledImages``) and write it to ``path`` atomically."""
    path = Path(path)
    compute_dtype = str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"
    n, c = len(images), images.num_classes
    header = {
        **expected_header(feature_extractor, image_size, compute_dtype),
        "num_images": n,
        "num_classes": c,
        "paths": [str(path) for path in images.paths],
        "stats": [file_stat(str(path)) for path in images.paths],
    }
    d = header["feature_dim"]
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = n * NUM_WINDOWS * d * 2
    free = _free_bytes(path.parent)
    if free is not None and free < payload + 9 * n + images.num_classes * n + 4 * ALIGN:
        raise DataError(
            f"--gan.feature_cache {path}: needs {payload / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free in {path.parent}"
        )
    loader = torch.utils.data.DataLoader(
        _AllWindows(images, image_size, on_bad_image), batch_size=batch_images, num_workers=num_workers
    )
    blob = json.dumps(header).encode()
    used_at, labels_at, rows_at, size = _offsets(len(blob), n, d, c)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
            f.truncate(size)
            used = np.memmap(f, dtype=np.int64, mode="r+", offset=used_at, shape=(n,))
            labels = np.memmap(f, dtype=np.uint8, mode="r+", offset=labels_at, shape=(n, c))
            labels[:] = images.labels
            labels.flush()
            del labels
            rows = np.memmap(f, dtype=np.uint16, mode="r+", offset=rows_at, shape=(n * NUM_WINDOWS, d))
            bar = Progress(len(loader), f"feature cache {path.name}", enabled=progress)
            feature_extractor.eval()
            for batch in loader:
                crops = batch["crops"].flatten(0, 1).to(device, non_blocking=True)
                x = normalize_batch(crops)
                with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    z = feature_extractor(x).float()
                first = int(batch["index"][0])
                rows[first * NUM_WINDOWS : first * NUM_WINDOWS + z.shape[0]] = (
                    z.to(torch.bfloat16).cpu().view(torch.uint16).numpy()
                )
                used[first : first + len(batch["used"])] = batch["used"].numpy()
                bar.update(1)
            bar.close()
            rows.flush()
            used.flush()
            del rows, used
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    logger.info("feature cache %s: %d images x %d windows x %d features (%.2f GiB)", path, n, NUM_WINDOWS, d, payload / 2**30)
    return FeatureCache.open(path)


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def open_feature_cache(
    path: str | os.PathLike,
    feature_extractor: torch.nn.Module,
    images,
    *,
    dataset: str,
    image_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    on_bad_image: str,
    num_workers: int,
    is_main: bool,
    source: str = "",
) -> FeatureCache:
    """The cache ``--gan.feature_cache`` names (``path``) for ``feature_extractor`` (frozen from
    ``source``) and the run's training images (a ``LabeledImages`` of data set kind ``dataset``):
    opened, checked and attached to those images, or built (rank 0, ``is_main``; the others wait)
    when the file does not exist. ``image_size``, ``on_bad_image``, ``num_workers``: the
    ``data.*`` options of the run; ``device``, ``amp_dtype``: where and in what f_ext runs."""
    path = Path(path)
    if SOURCES[dataset].holds_features:
        raise ConfigError(f"--gan.feature_cache caches image crops; data.dataset={dataset} has none (leave it empty)")
    compute_dtype = str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"
    if not path.exists() and is_main:
        logger.info("building the feature cache %s (f_ext from %s)", path, source)
        build(path, feature_extractor, images, image_size, device, amp_dtype, on_bad_image=on_bad_image, num_workers=num_workers)
    barrier()
    cache = FeatureCache.open(path)
    cache.check(expected_header(feature_extractor, image_size, compute_dtype))
    cache.attach(images)
    if is_main:
        logger.info("feature cache %s: f_ext is read from it, not computed", path)
    return cache
