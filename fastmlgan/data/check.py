"""Scan a dataset before training (the library of ``fastmlgan check``: ``commands/check.py``).

Every image listed by the dataset's source (``Source.listings``: its annotation or list files) is
opened and classified:

* ``missing``: listed but not on disk;
* ``unreadable``: cannot be read (I/O error, a folder, empty), or bytes no decoder recognises;
* ``truncated``: a JPEG without its end-of-image marker after the last scan, or that fails a full
  decode (skip the decode with ``--no-decode``: magic bytes and markers only);
* ``non_jpeg``: an image in another format (PNG, GIF, ...), found by its magic bytes;
* ``unlabeled``: an image without any label (dropped when ``--data.drop_unlabeled`` is true);
* ``unknown_label``: a label that is not one of the dataset's classes (a COCO category id not in
  ``categories``, a list-file label not in the label-names file), and other malformed rows.

Exit status: 1 when training would fail: any unknown label or malformed row, or, with the DALI
backend (which cannot skip a bad image) or ``--data.on_bad_image error``, any missing, unreadable,
truncated or non-JPEG image among those training reads; 2 for a bad option or an unreadable
annotation file; 0 otherwise (the torch and torchvision-gpu backends skip bad images, and
readers leave missing files out, both with a warning).
"""

from __future__ import annotations

import io
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fastmlgan.data.backends.dali import dali_available
from fastmlgan.data.geometry import image_to_rgb8
from fastmlgan.data.sources import SOURCES, Listing
from fastmlgan.errors import DataError
from fastmlgan.logs import Progress
from fastmlgan.safeio import read_bytes

logger = logging.getLogger(__name__)

KINDS = ("missing", "unreadable", "truncated", "non_jpeg", "unlabeled", "unknown_label")
FILE_KINDS = ("missing", "unreadable", "truncated", "non_jpeg")
JPEG_SOI = b"\xff\xd8\xff"
JPEG_SOS = b"\xff\xda"
JPEG_EOI = b"\xff\xd9"
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "WEBP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def inspect_image(path: str, decode: bool = True) -> tuple[str, str] | None:
    """(kind, detail) of a bad image file, or None for a complete JPEG. A FIFO or a device (say a
    COCO file_name of /dev/zero) is unreadable, never opened for a blocking or endless read."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return "missing", "no such file"
    except (OSError, ValueError):
        pass  # open_regular names the problem (a symbolic link loop, a NUL in the name)
    try:
        data = read_bytes(path, "image file")
    except DataError as e:
        return "unreadable", str(e).removeprefix(f"image file {path}").removeprefix(" ").removeprefix(": ")
    return inspect_data(data, path, decode)


def inspect_data(data: bytes | None, path: str, decode: bool = True) -> tuple[str, str] | None:
    """``inspect_image`` of an image's bytes (None: could not be read, e.g. from a broken shard)."""
    if data is None:
        return "unreadable", "could not be read"
    if not data:
        return "unreadable", "empty file"
    if data[:3] == JPEG_SOI:
        # Entropy-coded data never holds FF D9 (0xFF is always stuffed), so the image is complete
        # when an EOI follows the last start-of-scan (an EXIF thumbnail's markers come before it).
        sos, eoi = data.rfind(JPEG_SOS), data.rfind(JPEG_EOI)
        if sos < 0 or eoi < sos:
            return "truncated", "JPEG without end-of-image marker"
        if decode:
            error = _decode_error(data, path)
            if error:
                return "truncated", f"JPEG fails to decode: {error}"
        return None
    error = _decode_error(data, path) if decode else _identify_error(data)
    if error:
        return "unreadable", f"not a decodable image: {error}"
    fmt = next((name for magic, name in _MAGIC if data.startswith(magic)), "not JPEG")
    return "non_jpeg", fmt


def _decode_error(data: bytes, path: str) -> str | None:
    """Why training's decoder (``geometry.image_to_rgb8``: EXIF, 16-bit and float pixels) would
    refuse the image, or None."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            image_to_rgb8(img, path)
    except DataError as e:
        return str(e).removeprefix(f"{path}: ")
    except Exception as e:  # PIL raises many types for broken files; any of them means "broken"
        return str(e) or type(e).__name__
    return None


def _identify_error(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except Exception as e:
        return str(e) or type(e).__name__
    return None


def listings(cfg) -> list[Listing]:
    """The listings of ``cfg`` (a ``DataConfig``) for every split training reads."""
    return SOURCES[cfg.dataset].listings(cfg)


# ----------------------------------------------------------------------------------------------


@dataclass
class Report:
    offenders: dict[str, list[str]]  # kind -> "path: detail" messages, split-prefixed
    counts: dict[str, dict[str, int]]  # split -> kind -> count
    num_images: dict[str, int]
    fatal: list[str]  # why training would fail (empty: it would not)
    backend: str


def uses_dali(backend: str) -> bool:
    if backend == "dali":
        return True
    if backend != "auto":
        return False
    return torch.cuda.is_available() and dali_available()


def check(cfg, threads: int = 8, decode: bool = True, progress: bool = True) -> Report:
    """Scan every image of every split of ``cfg`` (a ``DataConfig``)."""
    splits = listings(cfg)
    offenders: dict[str, list[str]] = {k: [] for k in KINDS}
    counts: dict[str, dict[str, int]] = {}
    strict = uses_dali(cfg.backend) or cfg.on_bad_image == "error"
    fatal = []
    total = sum(len(s.paths) for s in splits)
    bar = Progress(total, "check", enabled=progress)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for listing in splits:
            n = {k: 0 for k in KINDS}
            for i in np.flatnonzero(~listing.labelled):
                n["unlabeled"] += 1
                offenders["unlabeled"].append(f"[{listing.split}] {listing.paths[i]}")
            used = listing.labelled if cfg.drop_unlabeled else np.ones(len(listing.paths), dtype=bool)
            fatal_files = 0
            usable = used.copy()
            if listing.read_images is not None:  # shards: the bytes come from a stream, not from files
                results = _map_ahead(pool, lambda d: inspect_data(d, "", decode), listing.read_images())
            else:
                results = pool.map(lambda p: inspect_image(p, decode), listing.paths, chunksize=64)
            for i, result in enumerate(results):
                bar.update(1)
                if result is None:
                    continue
                kind, detail = result
                n[kind] += 1
                offenders[kind].append(f"[{listing.split}] {listing.paths[i]}: {detail}")
                fatal_files += int(bool(used[i]))
                usable[i] &= kind == "non_jpeg"  # the torch loader decodes PNG, GIF...; DALI is strict below
            for message in listing.unknown_labels:  # after the images: a stream adds what it finds
                n["unknown_label"] += 1
                offenders["unknown_label"].append(f"[{listing.split}] {message}")
            counts[listing.split] = n
            if not usable.any():
                # Nothing left to train on: every image unlabelled, missing or broken (an image folder
                # that is a symbolic link loop, say). The readers stop on this; so does training.
                fatal.append(
                    f"{listing.split}: no usable image among the {len(listing.paths)} listed ({n['unlabeled']} unlabelled"
                    f"{' and dropped' if cfg.drop_unlabeled else ''}, {n['missing']} missing, "
                    f"{n['unreadable'] + n['truncated']} unreadable or truncated)"
                )
            if n["unknown_label"]:
                fatal.append(f"{listing.split}: {n['unknown_label']} unknown label(s) or malformed row(s)")
            if strict and fatal_files:
                why = "the DALI backend cannot skip them" if uses_dali(cfg.backend) else "--data.on_bad_image is error"
                fatal.append(f"{listing.split}: {fatal_files} missing/unreadable/truncated/non-JPEG image(s) ({why})")
    bar.close()
    return Report(offenders, counts, {s.split: len(s.paths) for s in splits}, fatal, cfg.backend)


def _map_ahead(pool, fn, items, ahead: int = 256):
    """``pool.map`` over a stream with at most ``ahead`` items in flight (``map`` would read it all first)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def format_report(report: Report, first: int = 10) -> str:
    lines = [f"{'split':<8}{'images':>9}" + "".join(f"{k:>15}" for k in KINDS)]
    for split, n in report.counts.items():
        lines.append(f"{split:<8}{report.num_images[split]:>9}" + "".join(f"{n[k]:>15}" for k in KINDS))
    for kind in KINDS:
        found = report.offenders[kind]
        if found:
            lines.append(f"\n{kind}: {len(found)}" + (f" (first {first})" if len(found) > first else ""))
            lines += [f"  {m}" for m in found[:first]]
    lines.append("")
    if report.fatal:
        lines.append("training would FAIL:")
        lines += [f"  {f}" for f in report.fatal]
    else:
        bad = sum(len(report.offenders[k]) for k in FILE_KINDS)
        lines.append(
            "training would run" + (f" ({bad} bad/missing image(s) are skipped or left out with a warning)" if bad else "")
        )
    return "\n".join(lines)
