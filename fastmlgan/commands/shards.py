"""``fastmlgan shards build|verify|info``: write any image data set the kit reads as WebDataset
shards (``fastmlgan.data.shardbuild``), check written shards against their manifest, or describe
them. Train from them with ``--data.dataset shards --data.shards 'DIR/train-{000000..000123}.tar'
--data.shards_val 'DIR/val-{000000..000009}.tar'``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from fastmlgan.config import parse_args
from fastmlgan.data.factory import build_splits
from fastmlgan.data.shardbuild import build_shards, source_description, verify
from fastmlgan.data.sources import SOURCES
from fastmlgan.data.sources.shards import read_manifest
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.logs import setup_logging
from fastmlgan.safeio import nul_argument

USAGE = """usage: fastmlgan shards build --out DIR [--shard-size SIZE] [--split train,val] [--preset NAME] --data.KEY VALUE ...
       fastmlgan shards verify DIR
       fastmlgan shards info DIR

build   write the data set given by the training options (--data.dataset coco|nuswide|list|labelsets|embedded
        and the options it needs) into DIR as WebDataset shards: <split>-NNNNNN.tar (each sample the image
        file's own bytes, its label row and a JSON record of its index, source path and labels), DALI's
        index files <split>-NNNNNN.idx, <split>-labels.npy, classes.txt and manifest.json (samples, bytes
        and SHA-256 of every shard), written last. DIR must not hold shards already.
        --shard-size: 256MB (default), 1GB, 500KB, or a number of samples (1000).
verify  re-read every shard and check it against the manifest (SHA-256, sample keys, DALI index);
        exit status 1 when something differs.
info    the manifest's splits, shard counts, samples and bytes.

Then: fastmlgan train --data.dataset shards --data.shards 'DIR/train-{000000..000009}.tar' \\
          --data.shards_val 'DIR/val-{000000..000001}.tar'   (the patterns info prints)
"""

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str) -> tuple[int | None, int | None]:
    """``--shard-size``: (bytes, None) for ``256MB``, (None, samples) for ``1000``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]B)?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0 or (match.group(2) is None and "." in match.group(1)):
        raise ConfigError(f"--shard-size {text!r}: expected a size (256MB, 1GB, 500KB) or a number of samples (1000)")
    if match.group(2) is None:
        return None, int(match.group(1))
    nbytes = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if nbytes < 4096:
        raise ConfigError(f"--shard-size {text!r}: at least 4KB")
    return nbytes, None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in ("build", "verify", "info"):
        print(f"{USAGE}\nerror: {'unknown command ' + repr(argv[0]) if argv else 'no command'}: give build, verify or info",
              file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if nul_argument(rest):
        print(nul_argument(rest), file=sys.stderr)
        return 2
    setup_logging(True)
    try:
        if command in ("verify", "info"):
            if len(rest) != 1:
                raise ConfigError(f"fastmlgan shards {command} takes one shard folder (or its manifest.json)")
            return _verify(rest[0]) if command == "verify" else _info(rest[0])
        return _build(rest)
    except FastMLGANError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _verify(folder: str) -> int:
    problems = verify(folder)
    for line in problems:
        print(line)
    print(f"{folder}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _info(folder: str) -> int:
    manifest = read_manifest(folder)
    print(f"{manifest['_path']}: {len(manifest['class_names'])} classes, from {manifest.get('source', {}).get('dataset', '?')}")
    root = Path(manifest["_path"]).parent
    for split, entry in manifest["splits"].items():
        print(f"  {split}: {entry['num_samples']} samples in {len(entry['shards'])} shards, "
              f"{sum(s['bytes'] for s in entry['shards']) / 1e6:.1f} MB: {root}/{entry.get('pattern', '?')}")
    return 0


def _build(rest: list[str]) -> int:
    out, size, wanted, options = None, "256MB", ["train", "val"], []
    i = 0
    while i < len(rest):
        if rest[i] in ("--out", "--shard-size", "--split"):
            if i + 1 >= len(rest):
                raise ConfigError(f"{rest[i]} needs a value")
            value = rest[i + 1]
            if rest[i] == "--out":
                out = value
            elif rest[i] == "--shard-size":
                size = value
            else:
                wanted = [s.strip() for s in value.split(",") if s.strip()]
            i += 2
            continue
        options.append(rest[i])
        i += 1
    if out is None:
        raise ConfigError("fastmlgan shards build needs --out DIR (the folder the shards go to)")
    unknown = set(wanted) - {"train", "val"}
    if unknown or not wanted:
        raise ConfigError(f"--split: {sorted(unknown) or 'nothing'} not in train,val")
    max_bytes, max_samples = parse_size(size)
    if not any(a.startswith(("--data.", "--preset", "--config")) for a in options):
        raise ConfigError("name the data set to write: --data.dataset coco|nuswide|list|labelsets|embedded and its files")
    cfg = parse_args(options, prog="fastmlgan shards build")
    if cfg is None:
        return 0
    source = SOURCES[cfg.data.dataset]
    if source.holds_features or source.streams:
        raise ConfigError(f"data.dataset={cfg.data.dataset} has no image files to write as shards")
    device = torch.device("cpu")
    data = build_splits(cfg.data, DistInfo(0, 1, 0, device))
    splits = {"train": data.train, "val": data.val}
    manifest = build_shards({s: splits[s] for s in wanted}, out, max_bytes, max_samples,
                            source_description(cfg.data))
    return _info(str(Path(out) / "manifest.json")) if manifest else 1


if __name__ == "__main__":
    sys.exit(main())
