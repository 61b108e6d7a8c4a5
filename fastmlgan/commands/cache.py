"""``fastmlgan cache build|info|verify``: the decoded-image caches of ``--data.backend cache``
(``fastmlgan.data.imagecache``) built ahead of a run, listed, or checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastmlgan.config import parse_args
from fastmlgan.data.factory import build_splits
from fastmlgan.data.imagecache.build import build_cache, describe, ensure_cache
from fastmlgan.data.imagecache.format import PURPOSES, SUFFIX, Geometry, ImageCache, cache_path, resolve_cache_dir
from fastmlgan.data.sources import SOURCES
from fastmlgan.distributed import DistInfo
from fastmlgan.errors import ConfigError, FastMLGANError
from fastmlgan.logs import setup_logging
from fastmlgan.safeio import nul_argument

USAGE = """usage: fastmlgan cache build [--split train,eval] [--decoder auto|dali|torchvision-gpu|cpu]
                             [--rebuild] [--preset NAME] --data.KEY VALUE ...
       fastmlgan cache info [FILE ...] [--data.cache_dir DIR]
       fastmlgan cache verify FILE ...

build   decode the dataset given by the training options (--data.dataset and the options it needs, the
        same --data.image_size, --data.on_bad_image and --data.cache_dir as training) into the caches
        --data.backend cache (and auto) will use: train (base x base rows) and eval (image_size rows).
        A current cache is kept unless --rebuild.
info    list the caches in the cache folder (or describe FILEs).
verify  check every pixel chunk's checksum (reads the whole file).
"""


def main(argv: list[str] | None = None) -> int:
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
            given = rest.index("--data.cache_dir") + 1 if "--data.cache_dir" in rest else None
            files = [a for i, a in enumerate(rest) if not a.startswith("--") and i != given]
            directory = resolve_cache_dir(rest[given] if given is not None and given < len(rest) else "")
            for name in files or sorted(directory.glob(f"*{SUFFIX}")):
                print(describe(Path(name)))
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
    cfg = parse_args(options, prog="fastmlgan cache build")
    if cfg is None:
        return 0
    if SOURCES[cfg.data.dataset].holds_features:
        raise ConfigError(f"data.dataset={cfg.data.dataset} holds feature vectors, not images: there is nothing to cache")
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
        print(describe(cache_path(images, geometry, directory)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
