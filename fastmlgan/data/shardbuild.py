"""Writing a data set as WebDataset shards (``fastmlgan shards build``; the format and the reader:
``sources.shards``), and checking written shards against their manifest (``verify``).

Each split's images go, in index order, into ``<split>-NNNNNN.tar`` files of at most
``max_bytes`` bytes or ``max_samples`` samples, each image as the bytes of its file (never
re-encoded: the pixels a run decodes from a shard are the ones it would decode from the folder).
Every file is written under a temporary name and renamed when complete; the manifest is written
last, so a folder without ``manifest.json`` is an interrupted build and is never read. Tars are
reproducible (fixed owner, mode and mtime): the same data set gives the same SHA-256 sums.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from fastmlgan.data.sources.shards import (
    CLASSES,
    FORMAT,
    MANIFEST,
    VERSION,
    Shard,
    iter_shard,
    read_manifest,
    sample_key,
    sha256_file,
)
from fastmlgan.data.types import LabeledImages
from fastmlgan.errors import ConfigError, DataError
from fastmlgan.logs import Progress
from fastmlgan.safeio import describe_os_error, read_bytes, replace_atomically

logger = logging.getLogger(__name__)

_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"II*\x00", "tif"), (b"MM\x00*", "tif"))
_BLOCK = 512  # a tar member: a 512-byte header, then its data padded to 512


def image_extension(data: bytes) -> str:
    """The member extension of an image's bytes, by their format (``img`` when unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "img")


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _tar_bytes(members: int) -> int:
    """A tar's size from its members' bytes: two zero blocks end it, padded to tarfile's 10 KB records."""
    return -(-(members + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def dali_index(tar_path) -> str:
    """The tar's index in DALI's ``wds2idx`` format (v1.2): a line ``v1.2 <samples>``, then per
    sample ``<ext> <data offset> <size> <member name>`` for each of its members, in tar order."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            name = member.name
            dot = name.find(".", name.rfind("/") + 1)
            base, ext = name[:dot], name[dot + 1:]
            entry = f"{ext} {member.offset_data} {member.size} {name}"
            if base != last:
                samples.append([entry])
                last = base
            else:
                samples[-1].append(entry)
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


class _ShardWriter:
    """One split's shards: ``add`` a sample, a new tar when the current one is full."""

    def __init__(self, out: Path, split: str, class_names: list[str], max_bytes: int | None, max_samples: int | None):
        self.out, self.split, self.class_names = out, split, class_names
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.shards: list[dict] = []
        self._tar = self._file = self._tmp = None
        self._count = self._bytes = 0

    def _open(self, first: int) -> None:
        import webdataset  # optional and heavy: the ``shards`` extra

        name = f"{self.split}-{len(self.shards):06d}.tar"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out)
        self._file, self._tmp = os.fdopen(fd, "wb"), Path(tmp)
        # encoder=False: members are stored as given; a fixed owner, mode and mtime make the bytes
        # reproducible (an integer mtime: a float one adds a 1 KB PAX header to every member).
        self._tar = webdataset.TarWriter(self._file, encoder=False, mtime=0, user="fastmlgan", group="fastmlgan",
                                         mode=0o444)
        self.shards.append({"name": name, "index": name[:-4] + ".idx", "first": first, "num_samples": 0})
        self._count = self._bytes = 0

    def add(self, index: int, image: bytes, labels: np.ndarray, path: str) -> None:
        meta = json.dumps({"index": index, "path": path,
                           "labels": [self.class_names[c] for c in np.flatnonzero(labels)]}, ensure_ascii=False).encode()
        row = np.ascontiguousarray(labels, dtype=np.uint8).tobytes()
        size = _member_bytes(len(image)) + _member_bytes(len(row)) + _member_bytes(len(meta))
        full = self._tar is not None and (
            (self.max_samples is not None and self._count >= self.max_samples)
            or (self.max_bytes is not None and _tar_bytes(self._bytes + size) > self.max_bytes))
        if full:
            self._close()
        if self._tar is None:
            self._open(index)
        self._tar.write({"__key__": sample_key(index), image_extension(image): image, "labels": row, "json": meta})
        self._count += 1
        self._bytes += size
        self.shards[-1]["num_samples"] = self._count

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        entry = self.shards[-1]
        entry["bytes"] = self._tmp.stat().st_size
        entry["sha256"] = sha256_file(self._tmp)
        with replace_atomically(self.out / entry["index"]) as f:
            f.write(dali_index(self._tmp))
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.out / entry["name"])
        self._tar = self._file = self._tmp = None

    def finish(self) -> list[dict]:
        self._close()
        return self.shards

    def abandon(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


def build_shards(splits: dict[str, LabeledImages], out, max_bytes: int | None = None, max_samples: int | None = None,
                 source: dict | None = None, progress: bool = True) -> dict:
    """Write ``splits`` (name -> images, all with one class list) as shards in ``out``; returns the manifest."""
    if (max_bytes is None) == (max_samples is None):
        raise ConfigError("give the shard size in bytes or in samples (one of them)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    taken = [p.name for p in out.iterdir() if p.name == MANIFEST or p.suffix in (".tar", ".idx")]
    if taken:
        raise ConfigError(f"--out {out}: already holds shards ({taken[0]}); choose an empty folder or remove them")
    names = next(iter(splits.values())).class_names
    if any(images.class_names != names for images in splits.values()):
        raise DataError("the splits have different class lists; shards hold one")
    manifest = {"format": FORMAT, "version": VERSION, "class_names": list(names), "classes": CLASSES,
                "source": source or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "splits": {}}
    start = time.perf_counter()
    for split, images in splits.items():
        writer = _ShardWriter(out, split, list(names), max_bytes, max_samples)
        bar = Progress(len(images), f"shards {split}", enabled=progress)
        try:
            for i, path in enumerate(images.paths):
                writer.add(i, read_bytes(path, "image file"), images.labels[i], str(path))
                bar.update(1)
            shards = writer.finish()
        except OSError as e:
            raise DataError(f"--out {out}: cannot write the shards ({describe_os_error(e)})") from None
        finally:
            writer.abandon()
            bar.close()
        labels_name = f"{split}-labels.npy"
        with replace_atomically(out / labels_name, "wb") as f:
            np.save(f, np.ascontiguousarray(images.labels, dtype=np.uint8), allow_pickle=False)
        manifest["splits"][split] = {
            "num_samples": len(images), "labels": labels_name, "labels_sha256": sha256_file(out / labels_name),
            "bytes": sum(s["bytes"] for s in shards), "shards": shards,
            "pattern": f"{split}-{{000000..{len(shards) - 1:06d}}}.tar",
        }
        logger.info("%s: %d images in %d shards (%.1f MB)", split, len(images), len(shards),
                    manifest["splits"][split]["bytes"] / 1e6)
    with replace_atomically(out / CLASSES) as f:
        f.write("".join(n + "\n" for n in names))
    manifest["build_seconds"] = round(time.perf_counter() - start, 3)
    with replace_atomically(out / MANIFEST) as f:  # last: its presence means the build completed
        json.dump(manifest, f, indent=1)
    return manifest


def verify(folder, progress: bool = True) -> list[str]:
    """Every shard, label file and index of the manifest in ``folder`` checked (size, SHA-256,
    sample count and keys, DALI index); the problems found, one line each (empty: all good)."""
    manifest = read_manifest(folder)
    root = Path(manifest["_path"]).parent
    problems = []
    total = sum(entry["num_samples"] for entry in manifest["splits"].values())
    bar = Progress(total, "verify", enabled=progress)
    for entry in manifest["splits"].values():
        labels_path = root / entry["labels"]
        if not labels_path.is_file() or sha256_file(labels_path) != entry.get("labels_sha256"):
            problems.append(f"{labels_path}: missing, or its SHA-256 differs from the manifest's")
        for s in entry["shards"]:
            path = root / s["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            if path.stat().st_size != s["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {s['bytes']}")
            shard = Shard(s["name"], str(path), s["first"], s["num_samples"], s["bytes"], s["sha256"])
            count = 0
            try:
                for j, sample in enumerate(iter_shard(shard, verify=True)):
                    if sample["__key__"] != sample_key(s["first"] + j):
                        raise DataError(f"{path}: sample {j} has key {sample['__key__']!r}, "
                                        f"expected {sample_key(s['first'] + j)}")
                    count += 1
                    bar.update(1)
                if count != s["num_samples"]:
                    raise DataError(f"{path}: {count} samples, the manifest says {s['num_samples']}")
            except DataError as e:
                problems.append(str(e))
            index = root / s.get("index", s["name"][:-4] + ".idx")
            if not index.is_file() or index.read_text() != dali_index(path):
                problems.append(f"{index}: missing, or not the DALI index of {s['name']}")
    bar.close()
    return problems


def source_description(cfg) -> dict:
    """What the manifest records about the data set the shards were built from."""
    keys = [k for k in vars(cfg) if getattr(cfg, k) and k not in ("batch_size", "eval_batch_size", "num_workers",
                                                                   "num_threads", "backend", "cache_dir")]
    return {k: getattr(cfg, k) for k in keys if isinstance(getattr(cfg, k), (str, int, float, bool))}
