"""Scan a dataset before training: ``fastmlgan check [--first N] [--threads T] [--no-decode]
--data.dataset ... --data.*`` (the same ``--data.*`` options as training; also ``python -m
fastmlgan.loaders.check``). With no dataset option it prints its usage and exits with status 2.

Every image listed by the dataset's annotation or list files is opened and classified:

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

import dataclasses
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastmlgan.errors import ConfigError, DataError, FastMLGANError
from fastmlgan.progress import setup_logging
from fastmlgan.safeio import (
    describe_os_error,
    inside_root,
    read_bytes,
    regular_or_absent,
    replace_atomically,
    stdout_failed,
)

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


@dataclass
class Listing:
    """Every image one split lists, present or not, with its labels' status."""

    split: str
    paths: list[str]
    labelled: np.ndarray  # (N,) bool
    unknown_labels: list[str] = field(default_factory=list)


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
    """Why training's decoder (``torch_loader.image_to_rgb8``: EXIF, 16-bit and float pixels) would
    refuse the image, or None."""
    import io

    from PIL import Image

    from fastmlgan.loaders.torch_loader import image_to_rgb8

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
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)):
            pass
    except Exception as e:
        return str(e) or type(e).__name__
    return None


# ----------------------------------------------------------------------------------------------
# Listings: what each dataset kind lists, unlabelled images and unknown labels included.


def _coco_listing(split: str, annotation_file, image_root, allow_outside_root: bool = False) -> Listing:
    from fastmlgan.loaders.coco import _load_json

    annotation_file = Path(annotation_file)
    data = _load_json(annotation_file)
    categories = {c["id"] for c in data["categories"]}
    row = {img["id"]: i for i, img in enumerate(data["images"])}
    labelled = np.zeros(len(data["images"]), dtype=bool)
    unknown = []
    for i, ann in enumerate(data["annotations"]):
        if ann["category_id"] not in categories:
            unknown.append(f"{annotation_file}: annotations[{i}] has category_id {ann['category_id']!r}, not in 'categories'")
        elif ann["image_id"] not in row:
            unknown.append(f"{annotation_file}: annotations[{i}] refers to image_id {ann['image_id']!r}, not in 'images'")
        else:
            labelled[row[ann["image_id"]]] = True
    paths = []
    for i, img in enumerate(data["images"]):
        if not allow_outside_root:  # training refuses it: a malformed row
            try:
                inside_root(image_root, img["file_name"], f"{annotation_file}: images[{i}] 'file_name'", "--data.allow_outside_root")
            except DataError as e:
                unknown.append(str(e))
        paths.append(str(Path(image_root) / str(img["file_name"])))
    return Listing(split, paths, labelled, unknown)


def listings(cfg) -> list[Listing]:
    """The listings of ``cfg`` (a ``DataConfig``) for every split training reads."""
    if cfg.dataset == "embedded":
        from fastmlgan.loaders import embedded

        paths = embedded.ensure(
            cfg.root, num_train=cfg.embedded_num_train, num_val=cfg.embedded_num_val,
            image_size=cfg.embedded_image_size, seed=cfg.embedded_seed,
        )
        return [
            _coco_listing("train", paths.train_ann, paths.train_images),
            _coco_listing("val", paths.val_ann, paths.val_images),
        ]
    if cfg.dataset == "coco":
        # Each split is checked on its own when only it is given (a training split before its
        # evaluation split exists, say); a split needs both its annotations and its images.
        given = []
        for split in ("train", "val"):
            annotations, images = getattr(cfg, f"{split}_annotations"), getattr(cfg, f"{split}_images")
            if bool(annotations) != bool(images):
                missing = f"{split}_images" if annotations else f"{split}_annotations"
                raise ConfigError(f"data.dataset=coco: the {split} split needs --data.{missing} too")
            if annotations:
                given.append(_coco_listing(split, annotations, images, cfg.allow_outside_root))
        if not given:
            raise ConfigError(
                "data.dataset=coco needs --data.train_annotations and --data.train_images (the training split), "
                "--data.val_annotations and --data.val_images (the evaluation split), or both"
            )
        return given
    if cfg.dataset == "nuswide":
        from fastmlgan.loaders.nuswide import read_listing

        if not cfg.nuswide_root:
            raise ConfigError("data.dataset=nuswide needs --data.nuswide_root")
        image_root = Path(cfg.image_root or Path(cfg.nuswide_root) / "Flickr")
        splits = ("all",) if cfg.nuswide_split == "paper" else ("train", "test")
        out = []
        for which in splits:
            entries, labels, _ = read_listing(cfg.nuswide_root, which)
            out.append(Listing(which, [str(image_root / e) for e in entries], labels.any(axis=1)))
        return out
    if cfg.dataset == "list":
        from fastmlgan.loaders.listfile import read_label_names, scan_list

        if not cfg.label_names:
            raise ConfigError("data.dataset=list needs --data.label_names")
        if not (cfg.list_train or cfg.list_val):
            raise ConfigError("data.dataset=list needs --data.list_train, --data.list_val or both")
        names = read_label_names(cfg.label_names)
        out = []
        for split, list_file in (("train", cfg.list_train), ("val", cfg.list_val)):
            if not list_file:
                continue
            scan = scan_list(list_file, names, cfg.image_root or None, cfg.allow_outside_root)
            out.append(Listing(split, scan.paths, scan.labels.any(axis=1), scan.problems))
        return out
    raise ConfigError(f"data.dataset={cfg.dataset!r} has no image files to check")


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
    import torch

    from fastmlgan.loaders.dali import dali_available

    return torch.cuda.is_available() and dali_available()


def check(cfg, threads: int = 8, decode: bool = True, progress: bool = True) -> Report:
    """Scan every image of every split of ``cfg`` (a ``DataConfig``)."""
    from fastmlgan.progress import Progress

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
            for message in listing.unknown_labels:
                n["unknown_label"] += 1
                offenders["unknown_label"].append(f"[{listing.split}] {message}")
            for i in np.flatnonzero(~listing.labelled):
                n["unlabeled"] += 1
                offenders["unlabeled"].append(f"[{listing.split}] {listing.paths[i]}")
            used = listing.labelled if cfg.drop_unlabeled else np.ones(len(listing.paths), dtype=bool)
            fatal_files = 0
            usable = used.copy()
            for i, result in enumerate(pool.map(lambda p: inspect_image(p, decode), listing.paths, chunksize=64)):
                bar.update(1)
                if result is None:
                    continue
                kind, detail = result
                n[kind] += 1
                offenders[kind].append(f"[{listing.split}] {listing.paths[i]}: {detail}")
                fatal_files += int(bool(used[i]))
                usable[i] &= kind == "non_jpeg"  # the torch loader decodes PNG, GIF...; DALI is strict below
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


USAGE = """usage: fastmlgan check [--first N] [--threads T] [--no-decode] [--json FILE] --data.dataset KIND --data.KEY VALUE ...
       (also python -m fastmlgan.loaders.check)

Scans every image of a dataset given by the training options (--data.dataset coco|nuswide|list|embedded
and the options it needs, or --preset NAME / --config FILE; see fastmlgan train --help) and reports
missing, unreadable, truncated and non-JPEG files, images without labels and unknown labels. For
coco and list data, a split given alone (say only --data.train_annotations and --data.train_images)
is checked alone. Exit status 1 when training would fail, 2 for bad options, 0 otherwise.

  fastmlgan check --data.dataset coco --data.train_annotations ann.json --data.train_images images/

  --first N      offenders printed per kind (default 10)
  --threads T    reader threads (default 8)
  --no-decode    check magic bytes and JPEG markers only, without decoding (faster)
  --json FILE    also write the full report as JSON
"""


def main(argv: list[str] | None = None) -> int:
    from fastmlgan.config import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    first, threads, decode, json_out, rest = 10, 8, True, None, []
    i = 0
    try:
        while i < len(argv):
            arg = argv[i]
            if arg in ("-h", "--help"):
                print(USAGE)
                return 0
            if arg == "--no-decode":
                decode = False
            elif arg in ("--first", "--threads", "--json"):
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value")
                value = argv[i + 1]
                i += 1
                if arg == "--json":
                    json_out = value
                else:
                    try:
                        number = int(value)
                    except ValueError:
                        raise ConfigError(f"{arg}: expected an integer, got {value!r}") from None
                    lo, hi = (0, 10**9) if arg == "--first" else (1, 1024)
                    if not lo <= number <= hi:
                        raise ConfigError(f"{arg} must be in [{lo}, {hi}], got {number}")
                    first, threads = (number, threads) if arg == "--first" else (first, number)
            else:
                rest.append(arg)
            i += 1
        if not any(a.startswith(("--data.", "--preset", "--config")) for a in rest):
            # Without a dataset the defaults would generate and check the embedded set: name one.
            print(USAGE, file=sys.stderr)
            raise ConfigError("name the dataset to check: --data.dataset coco|nuswide|list|embedded and its files")
        cfg = parse_args(rest, prog="fastmlgan check")
        if cfg is None:
            return 0
        if json_out is not None:
            why = regular_or_absent(json_out)
            if why or not Path(json_out).parent.is_dir():
                raise ConfigError(f"--json {json_out}: cannot write a report there ({why or 'no such folder'})")
        setup_logging(stream="stderr", level=logging.WARNING, fmt="%(levelname)s %(name)s: %(message)s")
        report = check(cfg.data, threads=threads, decode=decode)
        print(format_report(report, first), flush=True)
        if json_out:
            try:
                with replace_atomically(json_out) as f:
                    f.write(json.dumps(dataclasses.asdict(report), indent=1) + "\n")
            except OSError as e:
                raise ConfigError(f"--json {json_out}: cannot write it ({describe_os_error(e)})") from None
    except FastMLGANError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # standard output full or closed
        print(stdout_failed(e), file=sys.stderr)
        return 2
    return 1 if report.fatal else 0


if __name__ == "__main__":
    sys.exit(main())
