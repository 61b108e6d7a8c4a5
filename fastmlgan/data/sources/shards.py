"""WebDataset shards (``--data.dataset shards``): tar files written by ``fastmlgan shards build``,
read as a stream (from local disk or, through the ``webdataset`` package's ``pipe:`` URLs, from an
object store), for data sets no node can hold.

A shard folder holds, per split (``train``, ``val``): ``<split>-NNNNNN.tar`` (one sample = three
tar members with one key, the sample's index in its split: ``<key>.jpg`` (or ``.png`` ...), the
original image bytes, never re-encoded; ``<key>.labels``, the multi-hot label row as C bytes, which
DALI's ``fn.readers.webdataset`` reads as a uint8 tensor; ``<key>.json``, the index, source path
and label names), ``<split>-NNNNNN.idx`` (DALI's index of the tar, ``wds2idx``'s v1.2 format),
``<split>-labels.npy`` (every sample's label row, in index order: the trainer's negative sampling
draws from the training labels without reading the images), ``classes.txt`` (one class a line)
and ``manifest.json`` (per shard: samples, first index, bytes, SHA-256), written last.

This module reads the manifest and the label rows (``ShardImages``, a ``LabeledImages`` whose
``paths`` name ``<folder>/<shard>@<sha256 prefix>/<key>``: unique, stable, and never a file) and
iterates a shard's samples through ``webdataset`` (``iter_shard``); the training stream, crops and
decoding are ``backends.shards``, the writer ``data.shardbuild``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastmlgan.data.sources.base import Listing, Source
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.safeio import read_json

logger = logging.getLogger(__name__)

FORMAT = "fastmlgan webdataset shards"
VERSION = 1
MANIFEST = "manifest.json"
CLASSES = "classes.txt"
SPLITS = ("train", "val")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "img")
"""The member extensions an image may have (the source file's format; ``img`` when unknown)."""
KEY_DIGITS = 9
_SHARD_NAME = re.compile(r"[^/\s'\"=]+\.tar")


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


@dataclass(frozen=True)
class Shard:
    """One tar file of a split as the manifest lists it, and where this run reads it from."""

    name: str
    url: str  # what webdataset opens: a path, file:..., pipe:...
    first: int  # the index (key) of its first sample in the split
    num_samples: int
    nbytes: int
    sha256: str
    offset: int = 0  # its first sample's position in this run's selection of the split's shards


@dataclass
class ShardImages(LabeledImages):
    """A split read from shards: ``labels`` (a memory map of ``<split>-labels.npy`` when every
    shard is read), ``shards`` in the order given, ``paths`` virtual (never opened)."""

    shards: list[Shard] = field(default_factory=list)
    folder: str = ""

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number in ``shards``, sample number inside it) of sample ``index``."""
        starts = np.fromiter((s.offset for s in self.shards), dtype=np.int64, count=len(self.shards))
        k = int(np.searchsorted(starts, index, side="right")) - 1
        return k, index - self.shards[k].offset


def read_manifest(path) -> dict:
    """The manifest at ``path`` (a file, or a shard folder holding ``manifest.json``), checked."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not os.path.lexists(path):
        raise DataError(f"{path}: shard manifest not found (fastmlgan shards build writes it beside the shards)")
    data = read_json(path, "shard manifest")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{path}: not a fastmlgan shard manifest (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise DataError(f"{path}: shard manifest version {data.get('version')!r}; this fastmlgan reads version {VERSION}")
    names = data.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: 'class_names' must be a non-empty list of names")
    splits = data.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise DataError(f"{path}: 'splits' must be an object naming at least one split")
    for split, entry in splits.items():
        where = f"{path}: splits.{split}"
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not shards:
            raise DataError(f"{where}: 'shards' must be a non-empty list")
        expected = 0
        for i, shard in enumerate(shards):
            for key, kind in (("name", str), ("first", int), ("num_samples", int), ("bytes", int), ("sha256", str)):
                if not isinstance(shard, dict) or not isinstance(shard.get(key), kind) or isinstance(shard.get(key), bool):
                    raise DataError(f"{where}.shards[{i}]: '{key}' missing or not a {kind.__name__}")
            if shard["first"] != expected or shard["num_samples"] < 1:
                raise DataError(f"{where}.shards[{i}] ({shard['name']}): first {shard['first']}, expected {expected} "
                                "(shards hold consecutive, non-empty index ranges)")
            expected += shard["num_samples"]
        if entry.get("num_samples") != expected:
            raise DataError(f"{where}: num_samples {entry.get('num_samples')!r} but its shards hold {expected}")
    data["_path"] = str(path)
    return data


def expand_urls(pattern: str, option: str) -> list[str]:
    """The shard URLs of a webdataset pattern (brace ranges ``{000000..000123}``, ``::`` between
    several), as the ``webdataset`` package expands them."""
    if not pattern.strip():
        raise ConfigError(f"--data.{option}: no shard URL given")
    import webdataset  # optional and heavy: the ``shards`` extra

    urls = webdataset.shardlists.expand_urls(pattern)
    if not urls:
        raise ConfigError(f"--data.{option} {pattern!r}: expands to no shard")
    return urls


def shard_name(url: str) -> str | None:
    """The ``NAME.tar`` a URL reads (its last ``*.tar`` token: ``pipe:aws s3 cp s3://b/x.tar -`` reads ``x.tar``)."""
    found = _SHARD_NAME.findall(url)
    return os.path.basename(found[-1]) if found else None


def manifest_for(urls: list[str], given: str, option: str) -> Path:
    """``--data.shards_manifest`` when given, else ``manifest.json`` beside the first (local) shard."""
    if given:
        return Path(given)
    first = urls[0].removeprefix("file:")
    if ":" in first.split("/")[0]:  # pipe:, http:, s3: ...: no local folder to look in
        raise ConfigError(f"--data.{option} {urls[0]!r} is not a local path: give --data.shards_manifest "
                          "(a local copy of the shards' manifest.json, beside its classes.txt and *-labels.npy)")
    return Path(first).parent / MANIFEST


def open_split(pattern: str, manifest_path: str, option: str) -> ShardImages:
    """The shards ``pattern`` names (all of one split of one manifest), with their label rows."""
    urls = expand_urls(pattern, option)
    path = manifest_for(urls, manifest_path, option)
    manifest = read_manifest(path)
    folder = Path(manifest["_path"]).parent
    by_name = {s["name"]: (split, s) for split, entry in manifest["splits"].items() for s in entry["shards"]}
    splits, shards, offset = set(), [], 0
    for url in urls:
        name = shard_name(url)
        if name not in by_name:
            raise ConfigError(f"--data.{option}: {url!r} is not a shard of {manifest['_path']} "
                              f"(it lists {', '.join(sorted(by_name)[:3])}{' ...' if len(by_name) > 3 else ''})")
        split, s = by_name[name]
        splits.add(split)
        shards.append(Shard(name, url, s["first"], s["num_samples"], s["bytes"], s["sha256"], offset))
        offset += s["num_samples"]
    if len(splits) > 1:
        raise ConfigError(f"--data.{option}: the shards mix the splits {', '.join(sorted(splits))} of {manifest['_path']}")
    if len({s.name for s in shards}) != len(shards):
        raise ConfigError(f"--data.{option}: a shard is listed twice")
    split = splits.pop()
    entry = manifest["splits"][split]
    names = list(manifest["class_names"])
    labels = _labels(folder / entry["labels"], entry["num_samples"], len(names))
    if offset != entry["num_samples"] or any(s.first != s.offset for s in shards):  # a subset, or another order
        labels = np.concatenate([labels[s.first: s.first + s.num_samples] for s in shards])
    paths = [f"{folder}/{s.name}@{s.sha256[:12]}/{sample_key(s.first + j)}" for s in shards for j in range(s.num_samples)]
    return ShardImages(split, paths, labels, names, shards=shards, folder=str(folder))


def _labels(path: Path, n: int, c: int) -> np.ndarray:
    try:
        labels = np.load(path, mmap_mode="c", allow_pickle=False)  # copy-on-write: writable for torch.from_numpy, pages shared
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the label rows ({e})") from None
    if labels.dtype != np.uint8 or labels.shape != (n, c):
        raise DataError(f"{path}: label rows {labels.dtype}{labels.shape}, the manifest says uint8({n}, {c})")
    return labels


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Hashing:
    """A read-only stream that hashes what is read through it (a shard's SHA-256 in the same pass)."""

    def __init__(self, stream):
        self.stream, self.sha = stream, hashlib.sha256()

    def read(self, size=-1):
        data = self.stream.read(size)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def iter_shard(shard: Shard, skip: int = 0, limit: int | None = None, verify: bool = False) -> Iterator[dict]:
    """The samples of ``shard`` (webdataset's tar iteration and grouping by key: dicts of
    ``__key__`` and one bytes value per member extension), from its ``skip``-th, at most
    ``limit``. ``verify``: read to the end and compare the SHA-256 with the manifest's (a
    ``DataError`` naming the shard after its last sample)."""
    import webdataset  # optional and heavy: the ``shards`` extra

    try:
        stream = webdataset.gopen(shard.url, "rb")
    except Exception as e:  # noqa: BLE001 - gopen raises what the scheme's opener raises
        raise DataError(f"{shard.url}: cannot open shard ({e})") from None
    source = _Hashing(stream) if verify else stream
    files = webdataset.tariterators.tar_file_expander([{"url": shard.url, "stream": source}])
    samples = webdataset.tariterators.group_by_keys(files)
    try:
        stop = None if limit is None else skip + limit
        count = 0
        try:
            for sample in itertools.islice(samples, skip, stop):
                count += 1
                yield sample
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - tarfile, gzip and the pipe raise many kinds
            raise DataError(f"{shard.url}: cannot read shard after {skip + count} samples ({e})") from None
        if verify:
            digest = source.drain()
            if digest != shard.sha256:
                raise DataError(f"{shard.url}: SHA-256 {digest[:16]}... differs from the manifest's "
                                f"{shard.sha256[:16]}...: the shard is corrupt or was rewritten")
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - a pipe stopped early exits with SIGPIPE; nothing is lost
            pass


def image_member(sample: dict) -> tuple[str, bytes] | None:
    """(extension, bytes) of the sample's image member, or None."""
    return next(((ext, sample[ext]) for ext in IMAGE_EXTS if ext in sample), None)


def label_row(sample: dict, num_classes: int, where: str) -> np.ndarray:
    raw = sample.get("labels")
    if raw is None or len(raw) != num_classes:
        raise DataError(f"{where}: its 'labels' member has {len(raw) if raw is not None else 'no'} bytes, "
                        f"expected {num_classes} (one per class)")
    return np.frombuffer(raw, dtype=np.uint8)


class ShardsSource(Source):
    """WebDataset shards written by ``fastmlgan shards build`` (``--data.dataset shards``)."""

    kind = "shards"
    required = ("shards", "shards_val")
    streams = True

    def read(self, cfg) -> tuple[ShardImages, ShardImages]:
        train = open_split(cfg.shards, cfg.shards_manifest, "shards")
        val = open_split(cfg.shards_val, cfg.shards_manifest, "shards_val")
        if val.class_names != train.class_names:
            raise DataError("--data.shards and --data.shards_val come from manifests with other classes")
        return train, val

    def title(self, cfg) -> str:
        return "shards"

    def listings(self, cfg) -> list[Listing]:
        given = [(o, p) for o, p in (("shards", cfg.shards), ("shards_val", cfg.shards_val)) if p]
        if not given:
            raise ConfigError("data.dataset=shards needs --data.shards, --data.shards_val or both")
        out = []
        for option, pattern in given:
            images = open_split(pattern, cfg.shards_manifest, option)
            problems: list[str] = []
            out.append(Listing(images.name, list(images.paths), images.labels.any(axis=1), problems,
                               read_images=_reader(images, problems)))
        return out


def _reader(images: ShardImages, problems: list[str]):
    """For ``check``: every sample's (image bytes or None) in index order, each shard's checksum
    verified on the way (a mismatch, a broken tar or a wrong key is added to ``problems``)."""

    def read() -> Iterator[bytes | None]:
        for shard in images.shards:
            served = 0
            try:
                for j, sample in enumerate(iter_shard(shard, verify=True)):
                    key = sample_key(shard.first + j)
                    if sample["__key__"] != key or j >= shard.num_samples:
                        raise DataError(f"{shard.url}: sample {j} has key {sample['__key__']!r}, expected {key}")
                    label_row(sample, images.num_classes, f"{shard.url}#{key}")
                    member = image_member(sample)
                    served += 1
                    yield None if member is None else member[1]
                if served != shard.num_samples:
                    raise DataError(f"{shard.url}: {served} samples, the manifest says {shard.num_samples}")
            except DataError as e:
                problems.append(str(e))
            yield from itertools.repeat(None, shard.num_samples - served)  # counted as unreadable

    return read
