"""Checkpoints: verified, finite, atomic, the last K kept; read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so loading it can never run
code. State dicts are always taken from the unwrapped modules (no DDP/compile prefixes).

Layout of a run directory's ``checkpoints/`` folder::

    step-000001234.pt   one file per saved optimizer step; the newest ``--checkpoint.keep`` are kept
    last.pt             the newest of them: a hard link to it (a copy where the file system has none)
    baseline.pt         the end of phase 1 (written by the trainer, never pruned)

Every file is written to ``.<name>.<random>.tmp`` beside it, fsync'd, and renamed over the final
name (a crash leaves the old file or the new one, never a torn file); leftover temporary files of
an earlier process are removed at the next save or resume. Nothing with a non-finite floating
tensor is ever written (``assert_finite_state``). Replacing ``last.pt`` commits a save: a resume
reads ``last.pt`` first and the step files (newest step first) only when it fails its check, so a
step file written just before a crash, with ``last.pt`` not yet pointing at it, is discarded.

Integrity record: a torch checkpoint is a zip file. Its CRCs cover the tensor data but not the
zip's own headers and padding: of the 2,025 single-bit flips of a small checkpoint, 764 loaded
without complaint after ``ZipFile.testzip()`` (measured here). So ``save_atomic`` also stores a
CRC-32 of the whole file, up to the record itself, as the zip comment (torch never writes one,
and zip readers, torch's included, skip it); every single-bit flip then fails the check (CRC-32
detects any error burst up to 32 bits). Reading the record costs one pass over the file, about
0.3 s for 200 MB here, as ``testzip`` does; files without a record (older checkpoints) get
``testzip``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import secrets
import shutil
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmlgan.config import Config
from fastmlgan.errors import ConfigError, FastMLGANError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BASELINE = "baseline.pt"
STEP_NAME = "step-{step:09d}.pt"
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")
# mkstemp(prefix=".<name>.", suffix=".tmp") names: only these are ever removed as leftovers.
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
# Leftover temporary files are those older than this process (its own are never touched).
_PROCESS_START = time.time()

# Keys every reader of a training checkpoint uses (evaluate, predict, export); a file lacking one is
# not used. A resume reads all of RESUME_KEYS (Trainer.load_state_dict).
REQUIRED_KEYS: tuple[str, ...] = ("config", "class_names", "generator")
RESUME_KEYS: tuple[str, ...] = REQUIRED_KEYS + (
    "phase", "epoch", "global_step", "data_epoch", "discriminator", "feature_extractor", "feature_extractor_source",
    "opt_g", "opt_d", "rng", "baseline_metrics", "gan_metrics",
)

# The integrity record: zip comment "fastmlgan-crc32 <8 hex digits>" (fixed length) at the very end.
_EOCD = b"PK\x05\x06"
_EOCD_LEN = 22
_RECORD_MAGIC = b"fastmlgan-crc32 "
_RECORD_LEN = len(_RECORD_MAGIC) + 8


class CheckpointError(FastMLGANError):
    """A checkpoint that cannot be written or read."""


class NonFiniteStateError(CheckpointError):
    """The state to save holds a NaN or inf; ``tensor`` names the first bad tensor."""

    def __init__(self, message: str, tensor: str):
        super().__init__(message)
        self.tensor = tensor


# ----------------------------------------------------------------------------------------------
# finiteness


def _floating_tensors(obj: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _floating_tensors(value, f"{name}/{key}" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _floating_tensors(value, f"{name}/{i}" if name else str(i))


def _is_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on ``t``'s device. min and max propagate NaN, so both finite means every
    element is: one reduction, 0.06 s for 200 MB here against 1.6 s for isfinite(t).all()."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    if t.is_complex():
        return torch.isfinite(t).all()
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()


def assert_finite_state(state: Any) -> None:
    """Raise ``NonFiniteStateError`` naming the first floating tensor (in state order: model and
    optimizer state dicts, ...) holding a NaN or inf. One host sync per device, not per tensor."""
    named = list(_floating_tensors(state, ""))
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for indices in by_device.values():
        flags = torch.stack([_is_finite(named[i][1]) for i in indices]).cpu()
        bad += [i for i, ok in zip(indices, flags.tolist()) if not ok]
    if bad:
        name, t = named[min(bad)]
        finite = torch.isfinite(t)
        first = int((~finite).flatten().nonzero()[0])
        raise NonFiniteStateError(
            f"{name} has {int((~finite).sum())} non-finite values of {t.numel()} "
            f"(first at flat index {first}: {t.flatten()[first].item()})",
            name,
        )


# ----------------------------------------------------------------------------------------------
# writing


class _RecordingWriter:
    """The file object ``torch.save`` writes to: writes through ``os.write`` and keeps the CRC-32
    of every byte but the last two (the zip's comment length, replaced by the record's)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.crc = 0
        self.size = 0
        self.tail = b""
        self.error: OSError | None = None  # torch's zip writer turns it into a RuntimeError

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        done = 0
        try:
            while done < n:
                done += os.write(self.fd, view[done:])
        except OSError as e:
            self.error = e
            raise
        if n >= 2:
            self.crc = zlib.crc32(view[:-2], zlib.crc32(self.tail, self.crc))
            self.tail = bytes(view[-2:])
        else:
            joined = self.tail + bytes(view)
            self.crc = zlib.crc32(joined[:-2], self.crc)
            self.tail = joined[-2:]
        self.size += n
        return n

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        """Replace the zip's empty comment by the integrity record."""
        end = os.pread(self.fd, _EOCD_LEN, self.size - _EOCD_LEN)
        if not end.startswith(_EOCD) or self.tail != b"\x00\x00":
            raise CheckpointError("torch.save wrote an unexpected zip end record; cannot add the integrity record")
        record = _RECORD_MAGIC + b"%08x" % self.crc
        os.pwrite(self.fd, struct.pack("<H", len(record)) + record, self.size - 2)


def _mkstemp(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk too, or a power loss could undo it.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _estimate_size(obj: Any) -> int:
    """Bytes ``torch.save`` needs for ``obj``: its tensors' storages plus a margin for the zip
    headers, 64-byte alignment and pickle (a few hundred bytes per tensor)."""
    seen, total, count = set(), 0, 0
    for _, t in _tensors(obj):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        count += 1
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total + 512 * count + 65536


def _tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield "", obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _write_error(e: OSError, path: Path, needed: int) -> CheckpointError:
    folder = path.parent
    intact = f"; {_last_good(path)} (untouched)" if path.is_file() or (folder / LAST).is_file() else ""
    if e.errno == errno.EFBIG:
        return CheckpointError(
            f"cannot write {path.name} in {folder}: the file size limit of this process (ulimit -f) is below the "
            f"about {needed:,} bytes ({needed / 2**20:.1f} MiB) it needs; raise the limit{intact}"
        )
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f", {shutil.disk_usage(folder).free:,} bytes free"
        except OSError:
            free = ""
        return CheckpointError(
            f"no space left in {folder} to write {path.name}: it needs about {needed:,} bytes "
            f"({needed / 2**20:.1f} MiB){free}; free some space or continue the run elsewhere{intact}"
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CheckpointError(
            f"cannot write {path.name} in {folder}: {e.strerror} (a read-only or foreign folder); "
            f"make it writable or choose another --out (about {needed:,} bytes needed){intact}"
        )
    return CheckpointError(f"cannot write {path}: {e.strerror or e}{intact}")


def _last_good(path: Path) -> str:
    for good in (path, path.parent / LAST):
        if good.is_file():
            return f"the last good checkpoint is {good}"
    return f"there is no earlier checkpoint in {path.parent}"


def save_atomic(obj: Any, path: str | os.PathLike) -> int:
    """Check every floating tensor is finite, write to a temporary file in the same folder with
    the integrity record, fsync, then rename over ``path``. Returns the bytes written.

    A crash leaves the old file or the new one; a full disk or read-only folder raises a
    ``CheckpointError`` naming the folder and the bytes needed, the old file untouched."""
    path = Path(path)
    try:
        assert_finite_state(obj)
    except NonFiniteStateError as e:
        raise NonFiniteStateError(f"{path} not written: {e}; {_last_good(path)}", e.tensor) from None
    needed = _estimate_size(obj)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_temp_files(path.parent)
        fd, tmp = _mkstemp(path)
        try:
            writer = _RecordingWriter(fd)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                # torch's zip writer reports a failed write as "[enforce fail at inline_container.cc]
                # ... unexpected pos"; the OSError behind it (ENOSPC, EFBIG under ulimit -f) is the news.
                if writer.error is None:
                    raise
                raise writer.error from None
            writer.finish()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
        return writer.size + _RECORD_LEN
    except OSError as e:
        raise _write_error(e, path, needed) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _point_last_at(src: Path) -> None:
    """Make ``last.pt`` the file ``src`` atomically: a hard link, or a copy where links fail."""
    folder = src.parent
    last = folder / LAST
    tmp = folder / f".{LAST}.{secrets.token_hex(4)}.tmp"
    try:
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            shutil.copyfile(src, tmp)  # no hard links here (FAT, some network file systems)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, last)
        _fsync_dir(folder)
    except OSError as e:
        raise _write_error(e, last, src.stat().st_size) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def step_files(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the ``step-*.pt`` files in a checkpoints folder, newest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := _STEP_RE.match(name))]
    return sorted(found, reverse=True)


def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Write ``checkpoints/step-<step>.pt`` (see ``save_atomic``), make ``last.pt`` that file, and
    keep only the ``keep`` newest step files. Files of steps after ``step`` belong to a
    continuation this run abandoned (it resumed from an older checkpoint) and are removed.
    Call it on one rank only. Returns the step file's path."""
    if keep < 1:
        raise ConfigError(f"--checkpoint.keep {keep}: must be >= 1")
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / STEP_NAME.format(step=step)
    save_atomic(state, path)
    _point_last_at(path)
    newer = [p for s, p in step_files(folder) if s > step]
    older = [p for s, p in step_files(folder) if s <= step][keep:]
    if newer:
        logger.warning(
            "removing %d checkpoint(s) after step %d, of a continuation abandoned by this resume: %s",
            len(newer), step, ", ".join(p.name for p in newer),
        )
    for old in newer + older:
        try:
            old.unlink()
        except OSError as e:
            logger.warning("could not remove old checkpoint %s: %s", old, e.strerror)
    return path


def clean_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (``.<name>.<random>.tmp``) an earlier process left in ``folder``
    when it died mid-write; returns them. Files of this process (newer than it) are kept."""
    folder = Path(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not _TEMP_RE.match(name):
            continue
        path = folder / name
        try:
            if path.is_file() and path.stat().st_mtime < _PROCESS_START:
                path.unlink()
                removed.append(path)
        except OSError:
            continue  # another rank removed it first, or it cannot be removed: harmless
    if removed:
        logger.info("removed %d leftover temporary file(s) in %s: %s", len(removed), folder, removed[0].name)
    return removed


# ----------------------------------------------------------------------------------------------
# reading


def verify(path: str | os.PathLike) -> None:
    """Check the file's integrity record (or, for files without one, its zip CRCs); raise
    ``CheckpointError`` saying what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    if size < _EOCD_LEN:
        raise CheckpointError(f"{path}: {size} bytes, too short for a checkpoint")
    with open(path, "rb") as f:
        f.seek(max(0, size - _EOCD_LEN - _RECORD_LEN))
        tail = f.read()
        with_record = (
            len(tail) == _EOCD_LEN + _RECORD_LEN
            and tail.startswith(_EOCD)
            and tail[_EOCD_LEN - 2 : _EOCD_LEN] == struct.pack("<H", _RECORD_LEN)
            and tail[_EOCD_LEN:].startswith(_RECORD_MAGIC)
        )
        if with_record:
            # Compared as bytes, not parsed: int(..., 16) would take an 'A' flipped from 'a'.
            stored = tail[_EOCD_LEN + len(_RECORD_MAGIC) :]
            f.seek(0)
            crc, left = 0, size - _RECORD_LEN - 2
            while left > 0:
                chunk = f.read(min(left, 1 << 22))
                if not chunk:
                    break
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            if b"%08x" % crc != stored:
                raise CheckpointError(
                    f"{path}: CRC-32 mismatch (stored {stored.decode('latin-1')!r}, file {crc:08x}): the file is corrupt"
                )
            return
    if not tail.endswith(b"\x00\x00") or tail[-_EOCD_LEN:][:4] != _EOCD:
        raise CheckpointError(f"{path}: zip end record missing or damaged (truncated, corrupt, or not a torch checkpoint)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable zip ({e}): the file is corrupt") from None
    if bad is not None:
        raise CheckpointError(f"{path}: CRC mismatch in {bad}: the file is corrupt")


def _read(path: Path, required: Sequence[str]) -> dict[str, Any]:
    verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign file, or one torch cannot unpickle safely
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a fastmlgan training state")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: no {missing[0]!r} key" + (f" (nor {', '.join(map(repr, missing[1:]))})" if missing[1:] else "")
            + ": not a fastmlgan training checkpoint, or one of another version"
        )
    if "config" in required and not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: its 'config' is a {type(state['config']).__name__}, not a dict")
    return state


def _candidates(path: Path) -> tuple[list[Path], bool]:
    """Files to try, newest first, and whether falling back past the first is allowed: a run
    directory, its checkpoints folder or its last.pt fall back; any other named file does not."""
    if path.is_dir():
        folder = path if _is_checkpoint_dir(path) else path / CHECKPOINT_DIR
    elif path.name == LAST:
        folder = path.parent
    else:
        return [path], False
    clean_temp_files(folder)
    last = folder / LAST
    files = [last] if last.is_file() else []
    for _, p in step_files(folder):
        if not (files and _samefile(p, last)):
            files.append(p)  # a dangling link among them fails its read, named, like a damaged file
    return files, True


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_checkpoint_dir(path: Path) -> bool:
    return path.name == CHECKPOINT_DIR and not (path / CHECKPOINT_DIR).is_dir()


def _linked_step(last: Path) -> str:
    """`` (= step-N.pt)`` when ``last`` is a hard link to a step file, else ''."""
    for _, p in step_files(last.parent):
        try:
            if os.path.samefile(p, last):
                return f" (= {p.name})"
        except OSError:
            return ""
    return ""


def load_latest_good(
    path: str | os.PathLike, required: Sequence[str] = REQUIRED_KEYS
) -> tuple[dict[str, Any], Path, list[tuple[Path, str]]]:
    """The newest good checkpoint of a run: ``(state, its path, [(skipped path, reason), ...])``.

    ``path`` is a run directory, its ``checkpoints/`` folder or its ``last.pt``: ``last.pt`` is
    tried first, then the step files newest first; a file failing the integrity check, ``torch.load``
    or lacking a ``required`` key is skipped with a warning naming it. Any other file is read as
    given, without fallback. No good file: a one-line ``CheckpointError``."""
    path = Path(path)
    if not path.exists():
        loop = os.path.lexists(path)
        raise CheckpointError(f"checkpoint {path} {'is a symbolic link loop' if loop else 'not found'}")
    files, fallback = _candidates(path)
    if not files:
        raise CheckpointError(f"checkpoint {path} not found (no {LAST} or step-*.pt in it)")
    skipped: list[tuple[Path, str]] = []
    for candidate in files:
        try:
            state = _read(candidate, required)
        except (CheckpointError, OSError) as e:
            if not fallback:
                raise CheckpointError(str(e)) from None
            reason = str(e).removeprefix(f"{candidate}: ")
            if candidate.name == LAST:
                reason += _linked_step(candidate)
            skipped.append((candidate, reason))
            continue
        for bad, reason in skipped:
            logger.warning("skipped checkpoint %s (%s); resuming from %s", bad, reason, candidate)
        return state, candidate, skipped
    detail = "; ".join(f"{p.name}: {r}" for p, r in skipped)
    raise CheckpointError(f"no good checkpoint in {files[0].parent}: {detail}")


def load(path: str | os.PathLike, required: Sequence[str] = REQUIRED_KEYS) -> dict[str, Any]:
    """``load_latest_good(path, required)``'s state (the skipped files are logged)."""
    return load_latest_good(path, required)[0]


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run directory of ``path``: a run directory itself, or one of its checkpoint files."""
    path = Path(path)
    if path.is_file() and path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent
    if path.is_dir() and _is_checkpoint_dir(path):
        return path.parent
    return path


# ----------------------------------------------------------------------------------------------
# resume compatibility

# Options that change a parameter's shape or the data a run trains on: a resume cannot change them.
SHAPE_AND_DATA_OPTIONS: tuple[str, ...] = (
    "model.backbone", "model.width", "model.depth",
    "gan.proj_dim", "gan.hidden_dim", "gan.num_layers", "gan.conditional",
    "data.dataset", "data.root", "data.image_size", "data.drop_unlabeled",
    "data.train_annotations", "data.train_images", "data.val_annotations", "data.val_images",
    "data.nuswide_root", "data.nuswide_split", "data.nuswide_num_train", "data.nuswide_seed",
    "data.list_train", "data.list_val", "data.label_names", "data.image_root",
    "data.embedded_num_train", "data.embedded_num_val", "data.embedded_image_size", "data.embedded_seed",
    "data.features_train", "data.features_test", "data.features_xml",
    "data.labelsets_train", "data.labelsets_test", "data.labelsets_names", "data.labelsets_evidence",
    "data.labelsets_hidden_fraction", "data.labelsets_hidden", "data.labelsets_hidden_evidence", "data.labelsets_seed",
    "data.val_fraction", "data.val_seed",
    "data.shards", "data.shards_val", "data.shards_window",  # the window: the shards' sample order
)  # fmt: skip
# The data options a resume may change: how the same images are read and served, not which.
# Every data.* option is in one list or the other (tests/integration/test_data_safety.py checks it).
DATA_OPTIONS_A_RESUME_MAY_CHANGE: tuple[str, ...] = (
    "data.batch_size", "data.eval_batch_size", "data.num_workers", "data.on_bad_image", "data.backend",
    "data.num_threads", "data.cache_dir", "data.cache_device", "data.cache_auto_share", "data.dali_decode", "data.dali_hw_decoder_load",
    "data.allow_outside_root", "data.shards_manifest",
)  # fmt: skip


def _same(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b and key.startswith("data."):
        if os.path.normpath(a) == os.path.normpath(b):
            return True
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return False


def check_resume_compatible(saved: Config, new: Config) -> None:
    """Raise a one-line ``ConfigError`` when ``new`` (a resume's config) changes an option of
    ``SHAPE_AND_DATA_OPTIONS`` from the checkpoint's ``saved`` config."""
    for key in SHAPE_AND_DATA_OPTIONS:
        section, _, name = key.partition(".")
        old, value = getattr(getattr(saved, section), name), getattr(getattr(new, section), name)
        if not _same(key, old, value):
            raise ConfigError(
                f"--{key} {value!r}: the run being resumed was trained with {old!r}, and a resume cannot "
                "change the model's shapes or the data set; drop the option, or start a new run with --out"
            )


# ----------------------------------------------------------------------------------------------
# random streams


def rng_state() -> dict[str, Any]:
    """Every random stream the run uses, in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
