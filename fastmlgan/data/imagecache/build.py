"""Writing a decoded-image cache (the format: ``imagecache.format``): ``build_cache`` decodes every
image of a split into a new file, ``ensure_cache`` gives a run its current cache (building it when
missing or stale; under torchrun rank 0 builds, the others wait and open it), ``find_current``
tells ``--data.backend auto`` whether one exists.

Built on first use of ``--data.backend cache`` or ahead of time with ``fastmlgan cache build``.
Decoders (fastest first, ``imagecache.decode``): DALI on a GPU, torchvision (nvJPEG) on a GPU, else
CPU threads with the torch backend's ``decode_rgb`` and uint8 antialiased resize, so rows built on
a CPU equal the torch backend's pixels exactly.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from fastmlgan.data.backends.dali import dali_available
from fastmlgan.data.backends.shards import rows_shards
from fastmlgan.data.geometry import ON_BAD_IMAGE
from fastmlgan.data.imagecache.decode import DaliFailed, rows_cpu, rows_dali, rows_torchvision
from fastmlgan.data.imagecache.format import (
    CHUNK_BYTES,
    FORMAT_VERSION,
    MAGIC,
    PREAMBLE,
    PREAMBLE_BYTES,
    CacheError,
    Geometry,
    ImageCache,
    OldFormatError,
    cache_path,
    file_stats,
    fingerprint,
    gib,
    layout,
    read_header,
    sha256_hex,
)
from fastmlgan.data.sources.shards import ShardImages
from fastmlgan.data.types import LabeledImages
from fastmlgan.distributed import broadcast_object
from fastmlgan.errors import ConfigError, DataError, FastMLGANError
from fastmlgan.logs import Progress
from fastmlgan.safeio import describe_os_error

logger = logging.getLogger(__name__)

DECODERS = ("auto", "dali", "torchvision-gpu", "cpu")


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def resolve_decoder(decoder: str, device) -> str:
    """``auto``: DALI on a GPU when installed, else torchvision (nvJPEG) on a GPU, else CPU threads."""
    if decoder not in DECODERS:
        raise ConfigError(f"cache decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder in ("cpu", "dali"):
        return decoder
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if decoder == "auto":
        return ("dali" if dali_available() else "torchvision-gpu") if on_gpu else "cpu"
    if decoder == "torchvision-gpu" and not on_gpu:
        raise ConfigError("cache decoder torchvision-gpu needs a CUDA device")
    return decoder


_ROW_SOURCES = {"cpu": rows_cpu, "torchvision-gpu": rows_torchvision, "dali": rows_dali, "shards": rows_shards}
"""decoder -> generator of (first row, [HWC uint8 row | DataError, ...]) chunks, in file order."""


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _no_room(path: Path, needed: int, free: int | None, cause: str) -> CacheError:
    kept = f"; the existing {path.name} is kept" if path.exists() else ""
    have = f", {free} bytes ({gib(free)}) free" if free is not None else ""
    return CacheError(
        f"{path.parent}: not enough disk space for the cache {path.name} ({cause}): it needs {needed} bytes "
        f"({gib(needed)}){have}{kept}; free some space or point --data.cache_dir (or $FASTMLGAN_CACHE) elsewhere"
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
    # Images in shards are read as a stream, in order, and decoded on CPU threads.
    decoder = "shards" if isinstance(images, ShardImages) else resolve_decoder(decoder, device)
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
    n, side = len(images), geometry.side
    row = side * side * 3
    chunk_rows = max(1, CHUNK_BYTES // row)
    json_offset, sections = layout(n, images.num_classes, side)
    needed = json_offset + 64 * 2**10 + 64 * (n // chunk_rows + 1)  # + the JSON header, generously
    free = _free_bytes(path.parent)
    if free < needed:
        raise _no_room(path, needed, free, "checked before building")
    stats = file_stats(images)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    start_time = time.perf_counter()
    logger.info("building %s: %d images, %s, %s decoder, %s", path, n, geometry.describe(), decoder, gib(needed))
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
                "fingerprint": fingerprint(images, stats),
                "sections": {},
                "build_seconds": round(time.perf_counter() - start_time, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            for key, (offset, nbytes, dtype, shape) in sections.items():
                header["sections"][key] = {"offset": offset, "nbytes": nbytes, "dtype": dtype, "shape": shape}
                if key != "pixels":
                    raw = np.ascontiguousarray(arrays[key], dtype=np.dtype(dtype)).tobytes()
                    header["sections"][key]["sha256"] = sha256_hex(raw)
                    _pwrite_all(fd, raw, offset)
            header["sections"]["pixels"].update(chunk_rows=chunk_rows, crc32=crcs)
            raw = json.dumps(header, indent=1).encode()
            _pwrite_all(fd, raw, json_offset)
            os.ftruncate(fd, json_offset + len(raw))
            os.fsync(fd)
            # The preamble last, then fsync again: before it lands the file is not a cache.
            _pwrite_all(fd, PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, json_offset, len(raw), hashlib.sha256(raw).digest()), 0)
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
                "process sees (or build the cache on every node first with fastmlgan cache build)"
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


def describe(path: Path) -> str:
    try:
        header = read_header(path)
    except CacheError as e:
        return f"{path}: UNUSABLE: {e}"
    g = Geometry(header["geometry"]["purpose"], int(header["geometry"]["image_size"]))
    return (f"{path}: {header['name']}, {header['num_images']} images ({header['num_bad']} bad), {g.describe()}, "
            f"{gib(path.stat().st_size)}, {header['decoder']} decoder, built {header.get('created', '?')} "
            f"in {header.get('build_seconds', 0):.0f} s")
