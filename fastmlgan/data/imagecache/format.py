"""A decoded-image cache (FFCV style): every image of a split decoded and resized once, stored as
uint8 rows in one file, served by ``imagecache.loader.CacheLoader`` with no JPEG decoding. This
module is the format: the layout, opening and checking a file, reading rows (``build`` writes it).

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
check every pixel chunk's CRC-32 (``verify_pixels``; rows are read with pread, never SIGBUS: ``read_rows``). The file
name hashes the split's identity (its ordered file list) and the geometry, so a run finds its
cache without reading anything; the header's fingerprint (file sizes, mtimes, label matrix) says
whether it is still current. A stale cache is rebuilt (logged, with the reason), never used.

Where: ``--data.cache_dir``, default ``$FASTMLGAN_CACHE`` or ``~/.cache/fastmlgan``: a per-user
cache folder, not the project or a run folder, because a cache is large, derived from the data
and reused by every run and preset; point the variable at fast local disk on a cluster.

Reading pixels: rows are read with ``pread`` into the caller's buffer, not through the memory map:
a cache truncated while a run reads it answers with a short read (a one-line ``CacheError``), where
a memory map raises SIGBUS and kills the process with no message (issue 18). Pixel checksums are
checked when a run opens its cache (``ensure_cache``), not lazily: an edited cache is refused by
name before the run folder exists. The pass reads every 32 MiB chunk once and CRC-32s it on
``num_threads`` threads (``pread`` and ``zlib.crc32`` release the GIL); its cost is in
docs/faults.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastmlgan.data.geometry import base_size
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.safeio import open_regular

FORMAT_VERSION = 1
MAGIC = b"FMLGCACH"
PREAMBLE_BYTES = 4096
PREAMBLE = struct.Struct("<8sIIQQ32s")
SUFFIX = ".fmlc"
CHUNK_BYTES = 32 * 2**20
"""Pixel rows are decoded, written and checksummed in chunks of about this size."""
PURPOSES = ("train", "eval")
RESIZE = "bilinear, antialiased, uint8 (torchvision TF.resize)"
SECTIONS = ("labels", "source", "bad", "stats")


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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_digest(images: LabeledImages) -> str:
    return sha256_hex("\n".join(os.path.abspath(p) for p in images.paths).encode())


def cache_path(images: LabeledImages, geometry: Geometry, directory) -> Path:
    """``<dir>/<name>-<purpose><side>-<hash>.fmlc``; the hash covers the ordered file list and the geometry."""
    identity = sha256_hex(json.dumps([FORMAT_VERSION, geometry.as_dict(), _files_digest(images)]).encode())[:16]
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


def fingerprint(images: LabeledImages, stats: np.ndarray) -> dict:
    fp = {
        "files_sha256": _files_digest(images),
        "stats_sha256": sha256_hex(np.ascontiguousarray(stats, dtype="<i8").tobytes()),
        "labels_sha256": sha256_hex(images.labels.tobytes() + json.dumps(images.class_names).encode()),
    }
    fp["sha256"] = sha256_hex(json.dumps(fp, sort_keys=True).encode())
    return fp


def gib(n: int) -> str:
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
        # mode "c" (copy-on-write), for inspection: loaders use read_rows (pread: no SIGBUS when truncated).
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
            for key in SECTIONS:
                sec = header["sections"][key]
                f.seek(int(sec["offset"]))
                raw = f.read(int(sec["nbytes"]))
                if sha256_hex(raw) != sec["sha256"]:
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
        verify_pixels(self, num_threads)


def read_header(path) -> dict:
    """The JSON header of a cache file, after checking the preamble, the size and the header checksum."""
    path = Path(path)
    try:
        with open_regular(path, "cache file", CacheError) as f:  # a FIFO: refused, not waited on
            size = os.fstat(f.fileno()).st_size
            pre = f.read(PREAMBLE.size)
            if size < PREAMBLE_BYTES or len(pre) < PREAMBLE.size:
                raise CacheError(f"{path}: truncated ({size} bytes): not a complete fastmlgan cache; delete it to rebuild")
            magic, version, _, json_offset, json_len, digest = PREAMBLE.unpack(pre)
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
        _ = [header["sections"][k]["offset"] for k in ("pixels", *SECTIONS)], header["geometry"]["purpose"]
    except (ValueError, KeyError, TypeError):  # a consistent file of another program
        raise CacheError(f"{path}: not a fastmlgan cache header; delete it to rebuild") from None
    return header


def layout(n: int, num_classes: int, side: int) -> tuple[int, dict]:
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


def read_rows(cache, rows, out: np.ndarray) -> None:
    """Copy pixel rows ``rows`` of ``cache`` into ``out`` (k, side, side, 3) uint8, one pread each."""
    size = cache._row_bytes
    for j, r in enumerate(rows):
        got = os.preadv(cache._fd, [memoryview(out[j]).cast("B")], cache._offset + int(r) * size)
        if got != size:
            raise CacheError(
                f"{cache.path}: row {r} is cut short ({got} of {size} bytes): the file was truncated while this "
                "run read it; delete it to rebuild"
            )


def verify_pixels(cache, num_threads: int = 1) -> None:
    """Every pixel chunk's CRC-32 against the header; ``CacheError`` naming the first bad rows."""
    px = cache.header["sections"]["pixels"]
    rows, crcs, n = int(px["chunk_rows"]), px["crc32"], len(cache)
    if len(crcs) != -(-n // rows):
        raise CacheError(f"{cache.path}: the header lists {len(crcs)} pixel checksums for {n} rows; delete it to rebuild")

    def chunk_ok(c: int) -> bool:
        lo, hi = c * rows, min(n, (c + 1) * rows)
        size = (hi - lo) * cache._row_bytes
        data = os.pread(cache._fd, size, cache._offset + lo * cache._row_bytes)
        return len(data) == size and zlib.crc32(data) == crcs[c]

    with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="fastmlgan-verify") as pool:
        for c, ok in enumerate(pool.map(chunk_ok, range(len(crcs)))):
            if not ok:
                raise CacheError(
                    f"{cache.path}: pixel rows {c * rows}-{min(n, (c + 1) * rows) - 1} fail their checksum "
                    "(corrupt or edited); delete the file to rebuild"
                )
