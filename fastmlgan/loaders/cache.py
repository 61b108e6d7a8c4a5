"""A decoded-image cache (FFCV style): every image of a split decoded and resized once, stored as
uint8 rows in one memory-mapped file, served by ``cache_loader.CacheLoader`` with no JPEG decoding.

What a row holds. The paper's training geometry (§4.1) starts by resizing the whole image to
base x base (256 for 224 crops); everything after that is a crop and a resize. So the training
cache stores that first resize (``Geometry("train", 224)``: 256x256 rows) and the five-crop is cut
when served; the evaluation cache stores the test input itself, the whole image resized to
image_size (``Geometry("eval", 224)``: 224x224 rows). COCO-2014 train at 224 is 82,081 x 192 KiB
= 16 GB, val 40,137 x 147 KiB = 6 GB.

File layout (``*.fmlc``, little endian):

* bytes [0, 4096): the preamble: ``MAGIC``, format version (u32), reserved (u32), offset and
  length (u64, u64) of the JSON header, SHA-256 of the JSON header (32 bytes), zeros. It is
  written last, so a file whose writing stopped early has no valid preamble.
* bytes [4096, ...): the pixels, (N, side, side, 3) uint8 (NHWC: a row is one image's HxWx3
  bytes, contiguous, so one memcpy per sample; viewed as NCHW it is a channels_last tensor, the
  layout torch's uint8 antialiased resize runs fastest on).
* then four small sections: the label matrix (N, C) uint8 in ``class_names`` order, ``source``
  (N,) int64 (the image whose pixels row i holds: i, or for an undecodable image the next
  decodable one), ``bad`` (N,) uint8, and the files' (size, mtime_ns) (N, 2) int64.
* last, the JSON header: format version, name, geometry, decoder, counts, class names, the data
  set fingerprint, offsets/sizes/SHA-256 of each section, CRC-32 of each pixel chunk.

Safety: a cache is written to ``.<name>.<pid>.tmp`` in the same folder, fsync'd and renamed only
when complete; a builder holds ``<name>.lock`` (flock), so two processes never build one cache at
once. Opening checks the preamble, the file size against the header, the header's SHA-256, the
geometry and each section's SHA-256; ``ensure_cache`` (every training run) and ``verify`` also
check every pixel chunk's CRC-32 (``cache_read``: pixels are read with pread, never SIGBUS). The file
name hashes the split's identity (its ordered file list) and the geometry, so a run finds its
cache without reading anything; the header's fingerprint (file sizes, mtimes, label matrix) says
whether it is still current. A stale cache is rebuilt (logged, with the reason), never used.

Where: ``--data.cache_dir``, default ``$FASTMLGAN_CACHE`` or ``~/.cache/fastmlgan``: a per-user
cache folder, not the project or a run folder, because a cache is large, derived from the data
and reused by every run and preset; point the variable at fast local disk on a cluster.

Build: ``python -m fastmlgan.loaders.cache build --data.* ...`` or on first use of
``--data.backend cache``. Decoders (fastest first): DALI on a GPU, torchvision (nvJPEG) on a GPU,
else CPU threads with the torch loader's ``decode_rgb`` and uint8 antialiased resize, so rows
built on a CPU equal the torch backend's pixels exactly.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmlgan.errors import ConfigError, DataError, FastMLGANError
from fastmlgan.loaders.base import LabeledImages
from fastmlgan.loaders.cache_decode import DaliFailed, rows_cpu, rows_dali, rows_torchvision
from fastmlgan.loaders.five_crop import base_size
from fastmlgan.safeio import describe_os_error, nul_argument, open_regular

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"FMLGCACH"
PREAMBLE_BYTES = 4096
_PREAMBLE = struct.Struct("<8sIIQQ32s")
SUFFIX = ".fmlc"
CHUNK_BYTES = 32 * 2**20
"""Pixel rows are decoded, written and checksummed in chunks of about this size."""
DECODERS = ("auto", "dali", "torchvision-gpu", "cpu")
PURPOSES = ("train", "eval")
ON_BAD_IMAGE = ("skip", "error")  # torch_loader.ON_BAD_IMAGE, without importing torch
RESIZE = "bilinear, antialiased, uint8 (torchvision TF.resize)"
_SECTIONS = ("labels", "source", "bad", "stats")


class CacheError(DataError):
    """A cache file that cannot be used: truncated, edited, for another geometry, or no room to build."""


class OldFormatError(CacheError):
    """A cache written by another format version: rebuilt, not refused."""


@dataclass(frozen=True)
class Geometry:
    """What the rows of a cache are for: ``train`` (base x base, cropped when served) or ``eval``."""

    purpose: str
    image_size: int

    def __post_init__(self) -> None:
        if self.purpose not in PURPOSES:
            raise ConfigError(f"cache purpose must be one of {PURPOSES}, got {self.purpose!r}")
        if self.image_size < 1:
            raise ConfigError(f"image_size must be positive, got {self.image_size}")

    @property
    def side(self) -> int:
        return base_size(self.image_size) if self.purpose == "train" else self.image_size

    def describe(self) -> str:
        what = "five-crop training" if self.purpose == "train" else "evaluation"
        return f"{what} at {self.image_size} px ({self.side}x{self.side} rows)"

    def as_dict(self) -> dict:
        return {"purpose": self.purpose, "image_size": self.image_size, "side": self.side, "layout": "NHWC uint8",
                "resize": RESIZE}


def default_cache_dir() -> Path:
    env = os.environ.get("FASTMLGAN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastmlgan"


def resolve_cache_dir(cache_dir: str = "") -> Path:
    """``--data.cache_dir`` ('' = ``$FASTMLGAN_CACHE``, else ``~/.cache/fastmlgan``)."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_digest(images: LabeledImages) -> str:
    return _sha256("\n".join(os.path.abspath(p) for p in images.paths).encode())


def cache_path(images: LabeledImages, geometry: Geometry, directory) -> Path:
    """``<dir>/<name>-<purpose><side>-<hash>.fmlc``; the hash covers the ordered file list and the geometry."""
    identity = _sha256(json.dumps([FORMAT_VERSION, geometry.as_dict(), _files_digest(images)]).encode())[:16]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in images.name)[:40] or "images"
    return Path(directory) / f"{name}-{geometry.purpose}{geometry.side}-{identity}{SUFFIX}"


def file_stats(images: LabeledImages) -> np.ndarray:
    """(N, 2) int64: each file's size and mtime in ns ((-1, -1) for a file that cannot be stat'ed)."""
    stats = np.full((len(images), 2), -1, dtype=np.int64)
    for i, path in enumerate(images.paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        stats[i] = (st.st_size, st.st_mtime_ns)
    return stats


def _fingerprint(images: LabeledImages, stats: np.ndarray) -> dict:
    fp = {
        "files_sha256": _files_digest(images),
        "stats_sha256": _sha256(np.ascontiguousarray(stats, dtype="<i8").tobytes()),
        "labels_sha256": _sha256(images.labels.tobytes() + json.dumps(images.class_names).encode()),
    }
    fp["sha256"] = _sha256(json.dumps(fp, sort_keys=True).encode())
    return fp


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class ImageCache:
    """An opened, validated cache: ``pixels`` (N, side, side, 3) uint8 memory map, ``labels``,
    ``source``, ``bad``, ``header``. Open with ``ImageCache.open``."""

    def __init__(self, path: Path, header: dict, arrays: dict[str, np.ndarray]):
        self.path = Path(path)
        self.header = header
        self.labels, self.source, self.stats = arrays["labels"], arrays["source"], arrays["stats"]
        self.bad = arrays["bad"].astype(bool)
        g = header["geometry"]
        self.geometry = Geometry(g["purpose"], int(g["image_size"]))
        n, side = int(header["num_images"]), self.geometry.side
        px = header["sections"]["pixels"]
        # mode "c" (copy-on-write), for inspection: loaders use cache_read.read_rows (pread: no SIGBUS when truncated).
        self.pixels = np.memmap(self.path, dtype=np.uint8, mode="c", offset=int(px["offset"]), shape=(n, side, side, 3))
        self._offset, self._row_bytes = int(px["offset"]), side * side * 3
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self):
        os.close(self._fd) if getattr(self, "_fd", None) is not None else None

    def __len__(self) -> int:
        return int(self.header["num_images"])

    @property
    def num_bad(self) -> int:
        return int(self.header["num_bad"])

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    @classmethod
    def open(cls, path, geometry: Geometry | None = None) -> ImageCache:
        """Validate and map a cache file; ``CacheError`` naming the file when it cannot be used."""
        path = Path(path)
        header = read_header(path)
        if header["version"] != FORMAT_VERSION:
            raise OldFormatError(f"{path}: cache format version {header['version']}, this fastmlgan reads {FORMAT_VERSION}")
        if geometry is not None:
            g = header["geometry"]
            if (g["purpose"], int(g["image_size"]), int(g["side"])) != (geometry.purpose, geometry.image_size, geometry.side):
                found = Geometry(g["purpose"], int(g["image_size"]))
                raise CacheError(
                    f"{path}: a cache for {found.describe()}, but this run needs {geometry.describe()}; "
                    "it is not used (caches of other geometries have other file names: was it renamed?)"
                )
        arrays = {}
        with open(path, "rb") as f:
            for key in _SECTIONS:
                sec = header["sections"][key]
                f.seek(int(sec["offset"]))
                raw = f.read(int(sec["nbytes"]))
                if _sha256(raw) != sec["sha256"]:
                    raise CacheError(f"{path}: the {key} section fails its checksum (corrupt or edited); delete the file to rebuild")
                arrays[key] = np.frombuffer(raw, dtype=np.dtype(sec["dtype"])).reshape(sec["shape"]).copy()
        return cls(path, header, arrays)

    def stale_reason(self, images: LabeledImages) -> str | None:
        """Why this cache no longer matches ``images`` (None when it is current)."""
        fp = self.header["fingerprint"]
        if len(images) != len(self) or _files_digest(images) != fp["files_sha256"]:
            return f"the file list changed ({len(self)} cached, {len(images)} now)"
        if images.class_names != self.header["class_names"] or not np.array_equal(images.labels, self.labels):
            return "the labels or the class order changed"
        stats = file_stats(images)
        changed = np.flatnonzero((stats != self.stats).any(axis=1))
        if len(changed):
            i = int(changed[0])
            (s0, m0), (s1, m1) = self.stats[i].tolist(), stats[i].tolist()
            what = "size" if s0 != s1 else "modification time"
            return f"{len(changed)} file(s) changed since it was built, first {images.paths[i]} ({what}: {s0}/{m0} -> {s1}/{m1})"
        return None

    def verify(self, num_threads: int = 1) -> None:
        """Check every pixel chunk's CRC-32 on ``num_threads`` threads; ``CacheError`` naming the first bad rows."""
        from fastmlgan.loaders.cache_read import verify_pixels
        verify_pixels(self, num_threads)


def read_header(path) -> dict:
    """The JSON header of a cache file, after checking the preamble, the size and the header checksum."""
    path = Path(path)
    try:
        with open_regular(path, "cache file", CacheError) as f:  # a FIFO: refused, not waited on
            size = os.fstat(f.fileno()).st_size
            pre = f.read(_PREAMBLE.size)
            if size < PREAMBLE_BYTES or len(pre) < _PREAMBLE.size:
                raise CacheError(f"{path}: truncated ({size} bytes): not a complete fastmlgan cache; delete it to rebuild")
            magic, version, _, json_offset, json_len, digest = _PREAMBLE.unpack(pre)
            if magic != MAGIC:
                raise CacheError(
                    f"{path}: not a complete fastmlgan cache (no valid preamble: an interrupted build or another "
                    "file); delete it to rebuild"
                )
            if size != json_offset + json_len:
                raise CacheError(
                    f"{path}: {size} bytes but its header says {json_offset + json_len}: truncated or edited; "
                    "delete it to rebuild"
                )
            f.seek(json_offset)
            raw = f.read(json_len)
    except OSError as e:
        raise CacheError(f"{path}: cannot read cache file: {e}") from None
    if hashlib.sha256(raw).digest() != digest:
        raise CacheError(f"{path}: header checksum mismatch (edited by hand or corrupt); delete it to rebuild")
    try:
        header = json.loads(raw)
        header["version"] = version
        _ = [header["sections"][k]["offset"] for k in ("pixels", *_SECTIONS)], header["geometry"]["purpose"]
    except (ValueError, KeyError, TypeError):  # a consistent file of another program
        raise CacheError(f"{path}: not a fastmlgan cache header; delete it to rebuild") from None
    return header


# ---------------------------------------------------------------------------------------------
# Building


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def resolve_decoder(decoder: str, device) -> str:
    """``auto``: DALI on a GPU when installed, else torchvision (nvJPEG) on a GPU, else CPU threads."""
    if decoder not in DECODERS:
        raise ConfigError(f"cache decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder in ("cpu", "dali"):
        return decoder
    import torch

    from fastmlgan.loaders.dali import dali_available

    on_gpu = device is not None and torch.device(device).type == "cuda"
    if decoder == "auto":
        return ("dali" if dali_available() else "torchvision-gpu") if on_gpu else "cpu"
    if decoder == "torchvision-gpu" and not on_gpu:
        raise ConfigError("cache decoder torchvision-gpu needs a CUDA device")
    return decoder


_ROW_SOURCES = {"cpu": rows_cpu, "torchvision-gpu": rows_torchvision, "dali": rows_dali}
"""decoder -> generator of (first row, [HWC uint8 row | DataError, ...]) chunks, in file order."""


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _layout(n: int, num_classes: int, side: int) -> tuple[int, dict]:
    """(offset of the JSON header, {section: (offset, nbytes, dtype, shape)}) for a cache of n rows."""
    row = side * side * 3
    sections = {"pixels": (PREAMBLE_BYTES, n * row, "|u1", [n, side, side, 3])}
    offset = PREAMBLE_BYTES + n * row
    for key, dtype, shape in (("labels", "|u1", [n, num_classes]), ("source", "<i8", [n]), ("bad", "|u1", [n]),
                              ("stats", "<i8", [n, 2])):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        sections[key] = (offset, nbytes, dtype, shape)
        offset += nbytes
    return offset, sections


def _no_room(path: Path, needed: int, free: int | None, cause: str) -> CacheError:
    kept = f"; the existing {path.name} is kept" if path.exists() else ""
    have = f", {free} bytes ({_gib(free)}) free" if free is not None else ""
    return CacheError(
        f"{path.parent}: not enough disk space for the cache {path.name} ({cause}): it needs {needed} bytes "
        f"({_gib(needed)}){have}{kept}; free some space or point --data.cache_dir (or $FASTMLGAN_CACHE) elsewhere"
    )


def build_cache(
    images: LabeledImages,
    geometry: Geometry,
    path,
    on_bad_image: str = "skip",
    decoder: str = "auto",
    device=None,
    num_threads: int = 4,
    progress: bool = True,
) -> ImageCache:
    """Decode every image of ``images`` into a new cache file at ``path`` (atomically replacing any
    file there only once the new one is complete). Bad images follow ``on_bad_image`` like the
    torch loader: ``skip`` stores the next decodable image in the row and flags it, ``error``
    raises ``DataError`` naming the file."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    if len(images) == 0:
        raise DataError(f"{images.name}: no images to cache")
    path = Path(path)
    decoder = resolve_decoder(decoder, device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - closed by the with below
    except OSError as e:  # a file where the folder should be, a read-only folder
        why = "it is not a folder" if e.errno in (errno.EEXIST, errno.ENOTDIR) else describe_os_error(e)
        raise CacheError(
            f"--data.cache_dir {path.parent}: cannot build the cache there ({why}); "
            "point --data.cache_dir (or $FASTMLGAN_CACHE) at a writable folder"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same cache: wait for it
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            logger.info("removing %s, left by an interrupted build", leftover)
            leftover.unlink(missing_ok=True)
        try:
            return _build_locked(images, geometry, path, on_bad_image, decoder, device, num_threads, progress)
        except DaliFailed as e:
            fallback = "torchvision-gpu" if decoder == "dali" and resolve_decoder("auto", device) != "cpu" else "cpu"
            logger.warning("DALI stopped on a file it cannot decode (%s); building %s with the %s decoder instead, "
                           "which names and handles bad images", e, path.name, fallback)
            return _build_locked(images, geometry, path, on_bad_image, fallback, device, num_threads, progress)


def _build_locked(images, geometry, path, on_bad_image, decoder, device, num_threads, progress) -> ImageCache:
    from fastmlgan.progress import Progress

    n, side = len(images), geometry.side
    row = side * side * 3
    chunk_rows = max(1, CHUNK_BYTES // row)
    json_offset, sections = _layout(n, images.num_classes, side)
    needed = json_offset + 64 * 2**10 + 64 * (n // chunk_rows + 1)  # + the JSON header, generously
    free = _free_bytes(path.parent)
    if free < needed:
        raise _no_room(path, needed, free, "checked before building")
    stats = file_stats(images)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    start_time = time.perf_counter()
    logger.info("building %s: %d images, %s, %s decoder, %s", path, n, geometry.describe(), decoder, _gib(needed))
    bar = Progress(n, f"cache {path.name}", enabled=progress)
    failed: dict[int, DataError] = {}
    crcs: list[int] = []
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                os.posix_fallocate(fd, 0, json_offset)  # reserve the space now: a full disk fails here
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _no_room(path, needed, _free_bytes(path.parent), "reserving it") from None
                # EOPNOTSUPP and the like: the filesystem cannot reserve; the writes will tell.
            chunk = np.zeros((chunk_rows, side, side, 3), dtype=np.uint8)
            for start, results in _ROW_SOURCES[decoder](images, side, chunk_rows, num_threads, device):
                k = len(results)
                for j, result in enumerate(results):
                    if isinstance(result, DataError):
                        if on_bad_image == "error":
                            raise result
                        failed[start + j] = result
                        chunk[j] = 0
                    else:
                        chunk[j] = result
                crcs.append(zlib.crc32(chunk[:k]))
                _pwrite_all(fd, chunk[:k], PREAMBLE_BYTES + start * row)
                bar.update(k, postfix=f"{len(failed)} bad" if failed else None)
            source = np.arange(n, dtype=np.int64)
            bad = np.zeros(n, dtype=np.uint8)
            _substitute(fd, images, failed, source, bad, row)
            for c in sorted({i // chunk_rows for i in failed}):  # chunks whose rows were substituted
                lo, hi = c * chunk_rows, min(n, (c + 1) * chunk_rows)
                crcs[c] = zlib.crc32(os.pread(fd, (hi - lo) * row, PREAMBLE_BYTES + lo * row))
            arrays = {"labels": images.labels, "source": source, "bad": bad, "stats": stats}
            header = {
                "format": "fastmlgan decoded-image cache",
                "name": images.name,
                "geometry": geometry.as_dict(),
                "decoder": decoder,
                "num_images": n,
                "num_classes": images.num_classes,
                "num_bad": len(failed),
                "bad_files": [images.paths[i] for i in sorted(failed)][:100],
                "class_names": list(images.class_names),
                "fingerprint": _fingerprint(images, stats),
                "sections": {},
                "build_seconds": round(time.perf_counter() - start_time, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            for key, (offset, nbytes, dtype, shape) in sections.items():
                header["sections"][key] = {"offset": offset, "nbytes": nbytes, "dtype": dtype, "shape": shape}
                if key != "pixels":
                    raw = np.ascontiguousarray(arrays[key], dtype=np.dtype(dtype)).tobytes()
                    header["sections"][key]["sha256"] = _sha256(raw)
                    _pwrite_all(fd, raw, offset)
            header["sections"]["pixels"].update(chunk_rows=chunk_rows, crc32=crcs)
            raw = json.dumps(header, indent=1).encode()
            _pwrite_all(fd, raw, json_offset)
            os.ftruncate(fd, json_offset + len(raw))
            os.fsync(fd)
            # The preamble last, then fsync again: before it lands the file is not a cache.
            _pwrite_all(fd, _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, json_offset, len(raw), hashlib.sha256(raw).digest()), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_room(path, needed, None, "the disk filled up while writing") from None
        raise CacheError(
            f"--data.cache_dir {path.parent}: cannot write the cache {path.name} ({describe_os_error(e)}); "
            "point --data.cache_dir (or $FASTMLGAN_CACHE) at a writable folder"
        ) from None
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    cache = ImageCache.open(path, geometry)
    logger.info("built %s in %.1f s: %d images (%d undecodable), %d bytes", path, time.perf_counter() - start_time,
                n, len(failed), cache.nbytes)
    return cache


def _substitute(fd: int, images: LabeledImages, failed: dict, source: np.ndarray, bad: np.ndarray, row: int) -> None:
    """The torch loader's skip policy at build time: the next decodable image (i+1, i+2, ...,
    wrapping) stands in for an undecodable one; its row is flagged bad."""
    n = len(images)
    if len(failed) == n:
        raise DataError(f"{images.name}: none of the {n} images can be decoded")
    for i in sorted(failed):
        logger.warning("skipping undecodable image %s (%s)", images.paths[i], failed[i])
        j = next((i + s) % n for s in range(1, n) if (i + s) % n not in failed)
        source[i], bad[i] = j, 1
        _pwrite_all(fd, os.pread(fd, row, PREAMBLE_BYTES + j * row), PREAMBLE_BYTES + i * row)
    if failed:
        logger.warning("%s: %d of %d images cannot be decoded; each row holds the next decodable image, flagged bad",
                       images.name, len(failed), n)


def ensure_cache(
    images: LabeledImages,
    geometry: Geometry,
    directory,
    on_bad_image: str = "skip",
    info=None,
    decoder: str = "auto",
    num_threads: int = 4,
    progress: bool = True,
    device=None,
) -> ImageCache:
    """The current cache of ``images`` for ``geometry`` in ``directory``, built when missing or
    stale (decoding on ``device``, default ``info.device``). Under torchrun rank 0 builds, the
    others wait and then open it."""
    from fastmlgan.distributed import broadcast_object

    path = cache_path(images, geometry, directory)
    is_main = info is None or info.is_main
    if device is None and info is not None:
        device = info.device
    error = None
    if is_main:
        try:
            cache = _open_or_build(images, geometry, path, on_bad_image, decoder, device, num_threads, progress)
        except FastMLGANError as e:
            error = e
    if info is not None and info.enabled:
        # Instead of a bare barrier: the others learn whether rank 0 failed, and stop too.
        failure = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", info)
        if failure is not None and not is_main:
            raise CacheError(f"rank 0 could not provide the cache {path.name}: {failure}")
    if error is not None:
        raise error
    if not is_main:
        if not path.exists():
            raise CacheError(
                f"rank {info.rank}: {path} is missing after rank 0 built it: --data.cache_dir must be a folder every "
                "process sees (or build the cache on every node first with python -m fastmlgan.loaders.cache build)"
            )
        cache = ImageCache.open(path, geometry)
        reason = cache.stale_reason(images)
        if reason:
            raise CacheError(f"rank {info.rank}: {path} does not match this process's data: {reason}")
        if info.local_rank == 0:  # the first process of each node checks its node's file; rank 0 did its own
            cache.verify(num_threads)
    if on_bad_image == "error" and cache.num_bad:
        first = int(np.flatnonzero(cache.bad)[0])
        raise DataError(
            f"{images.paths[first]}: cannot decode image ({cache.num_bad} such in {path.name}, built with "
            "on_bad_image=skip); --data.on_bad_image error stops here"
        )
    return cache


def _open_or_build(images, geometry, path, on_bad_image, decoder, device, num_threads, progress) -> ImageCache:
    if path.exists():
        reason = None
        try:
            cache = ImageCache.open(path, geometry)
        except OldFormatError as e:
            reason = str(e)
        else:
            reason = cache.stale_reason(images)
            if reason is None:
                cache.verify(num_threads)  # an edited pixel is refused here, by name, before any training
                logger.info("using cache %s (%s, %d images, pixel checksums verified)", path, geometry.describe(), len(cache))
                return cache
        logger.info("cache %s is stale (%s): rebuilding it", path, reason)
    return build_cache(images, geometry, path, on_bad_image, decoder, device, num_threads, progress)


def find_current(images: LabeledImages, geometry: Geometry, directory) -> tuple[Path | None, str]:
    """(path, '') when a current cache exists, else (None, why not): for ``--data.backend auto``."""
    path = cache_path(images, geometry, directory)
    if not path.exists():
        return None, f"no cache {path.name} in {path.parent}"
    try:
        cache = ImageCache.open(path, geometry)
    except CacheError as e:
        return None, str(e)
    reason = cache.stale_reason(images)
    return (None, f"{path} is stale ({reason})") if reason else (path, "")


# ---------------------------------------------------------------------------------------------
# Command line

USAGE = """usage: python -m fastmlgan.loaders.cache build [--split train,eval] [--decoder auto|dali|torchvision-gpu|cpu]
                                           [--rebuild] [--preset NAME] --data.KEY VALUE ...
       python -m fastmlgan.loaders.cache info [FILE ...] [--data.cache_dir DIR]
       python -m fastmlgan.loaders.cache verify FILE ...

build   decode the dataset given by the training options (--data.dataset and the options it needs, the
        same --data.image_size, --data.on_bad_image and --data.cache_dir as training) into the caches
        --data.backend cache (and auto) will use: train (base x base rows) and eval (image_size rows).
        A current cache is kept unless --rebuild.
info    list the caches in the cache folder (or describe FILEs).
verify  check every pixel chunk's checksum (reads the whole file).
"""


def _describe(path: Path) -> str:
    try:
        header = read_header(path)
    except CacheError as e:
        return f"{path}: UNUSABLE: {e}"
    g = Geometry(header["geometry"]["purpose"], int(header["geometry"]["image_size"]))
    return (f"{path}: {header['name']}, {header['num_images']} images ({header['num_bad']} bad), {g.describe()}, "
            f"{_gib(path.stat().st_size)}, {header['decoder']} decoder, built {header.get('created', '?')} "
            f"in {header.get('build_seconds', 0):.0f} s")


def main(argv: list[str] | None = None) -> int:
    from fastmlgan.progress import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in ("build", "info", "verify"):
        print(f"{USAGE}\nerror: {'unknown command ' + repr(argv[0]) if argv else 'no command'}: give build, info or verify",
              file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if nul_argument(rest):
        print(nul_argument(rest), file=sys.stderr)
        return 2
    setup_logging(True)
    try:
        if command == "verify":
            for name in rest:
                ImageCache.open(name).verify(4)
                print(f"{name}: OK")
            return 0
        if command == "info":
            files = [a for a in rest if not a.startswith("--")]
            directory = resolve_cache_dir(rest[rest.index("--data.cache_dir") + 1] if "--data.cache_dir" in rest else "")
            for name in files or sorted(directory.glob(f"*{SUFFIX}")):
                print(_describe(Path(name)))
            if not files:
                print(f"({directory})")
            return 0
        splits, decoder, rebuild, options = ["train", "eval"], "auto", False, []
        i = 0
        while i < len(rest):
            if rest[i] in ("--split", "--decoder") and i + 1 < len(rest):
                if rest[i] == "--split":
                    splits = rest[i + 1].split(",")
                else:
                    decoder = rest[i + 1]
                i += 2
                continue
            if rest[i] == "--rebuild":
                rebuild = True
            else:
                options.append(rest[i])
            i += 1
        return _build_command(options, splits, decoder, rebuild)
    except FastMLGANError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _build_command(options, splits, decoder, rebuild) -> int:
    import torch

    from fastmlgan.config import parse_args
    from fastmlgan.distributed import DistInfo
    from fastmlgan.loaders.registry import build_splits

    cfg = parse_args(options, prog="python -m fastmlgan.loaders.cache build")
    if cfg is None:
        return 0
    if cfg.data.dataset == "features":
        raise ConfigError("data.dataset=features holds feature vectors, not images: there is nothing to cache")
    unknown = set(splits) - set(PURPOSES)
    if unknown:
        raise ConfigError(f"--split: {sorted(unknown)} not in {PURPOSES}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_splits(cfg.data, DistInfo(0, 1, 0, device))
    directory = resolve_cache_dir(cfg.data.cache_dir)
    for purpose in splits:
        images = data.train if purpose == "train" else data.val
        geometry = Geometry(purpose, cfg.data.image_size)
        if rebuild:
            build_cache(images, geometry, cache_path(images, geometry, directory), cfg.data.on_bad_image, decoder,
                        device, cfg.data.num_threads)
        else:
            ensure_cache(images, geometry, directory, cfg.data.on_bad_image, None, decoder, cfg.data.num_threads,
                         device=device)
        print(_describe(cache_path(images, geometry, directory)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
