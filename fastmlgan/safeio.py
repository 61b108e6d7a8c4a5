"""Reading and writing files a user names without hanging, reading forever, leaving torn files or
overwriting what must survive (issue 18).

- ``open_regular``: open a file for reading only when it is a regular file. A FIFO named as an
  image or a config would block ``open()`` until a writer appears (forever), and ``/dev/zero``
  would be read until memory runs out; both are opened non-blocking and refused by name.
- ``replace_atomically``: write a file to a temporary beside it, then ``os.replace`` it over the
  name: a failure (full disk, Ctrl-C) leaves the previous file as it was.
- ``inside_root``: a path read from an annotation or sidecar file must stay inside its root folder.
- ``RunLock``: one run per run folder: ``fcntl.flock`` on a lock file beside the folder, taken
  before anything else; a second run is refused naming the pid and host of the first.
- ``one_line``: a message without the 20-line wrapping a DataLoader worker adds to an error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from fastmlgan.errors import DataError, FastMLGANError


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def describe_os_error(e: OSError) -> str:
    """``strerror`` of an ``OSError`` in words a user can act on."""
    if e.errno == errno.ELOOP:
        return "a symbolic link loop (too many levels of symbolic links)"
    return e.strerror or str(e)


def open_regular(path: str | os.PathLike, what: str = "file", error: type[FastMLGANError] = DataError) -> IO[bytes]:
    """``path`` opened for binary reading; ``error`` naming it when it is missing, unreadable, or
    not a regular file (a FIFO, a device, a folder). Never blocks: the open is non-blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError:  # a NUL character in the path
        raise error(f"{what} {path!r}: the path contains a NUL character") from None
    except FileNotFoundError:
        raise error(f"{what} {path} not found") from None
    except OSError as e:
        raise error(f"{what} {path}: cannot open it ({describe_os_error(e)})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what} {path} is {_kind(mode)}, not a regular file")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike, what: str = "file", error: type[FastMLGANError] = DataError) -> bytes:
    with open_regular(path, what, error) as f:
        try:
            return f.read()
        except OSError as e:
            raise error(f"{what} {path}: cannot read it ({describe_os_error(e)})") from None


def read_text(path: str | os.PathLike, what: str = "file", error: type[FastMLGANError] = DataError) -> str:
    data = read_bytes(path, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path}: not UTF-8 text (byte {e.start})") from None


def read_json(path: str | os.PathLike, what: str = "file", error: type[FastMLGANError] = DataError):
    """A JSON file's value; one-line ``error`` for a missing, special, non-UTF-8, invalid or too deeply
    nested file (``json`` recurses once per level: 100,000 levels raise ``RecursionError``)."""
    text = read_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} {path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise error(f"{what} {path}: JSON nested too deeply") from None


def list_folder(path: str | os.PathLike, what: str = "folder") -> list[os.DirEntry]:
    """The entries of a folder; ``DataError`` naming it when it cannot be listed."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as e:
        raise DataError(f"{what} {path}: cannot list it ({describe_os_error(e)})") from None


def entry_is_file(entry: os.DirEntry) -> bool:
    """``entry.is_file()``, False for a symbolic link loop or a broken entry (Python 3.11 raises)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def regular_or_absent(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be replaced by a new regular file (None: it is absent or a regular file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except ValueError:
        return "the path contains a NUL character"
    except OSError as e:
        return describe_os_error(e)
    return None if stat.S_ISREG(st.st_mode) else f"it is {_kind(st.st_mode)}"


# ----------------------------------------------------------------------------------------------
# atomic replacement


@contextlib.contextmanager
def replace_atomically(path: str | os.PathLike, mode: str = "w", suffix: str = ".tmp") -> Iterator[IO]:
    """``with replace_atomically(p) as f: f.write(...)``: the content goes to ``.<name>.<random><suffix>``
    beside ``p``, is fsync'd and renamed over ``p`` only when the block ends without an exception;
    otherwise the temporary is removed and ``p`` is untouched. The file gets mode 0644."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        kwargs = {"newline": ""} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_then_replace(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
    """``write(tmp)`` to a temporary beside ``path`` (it may write it by name), then rename over
    ``path``; on any failure the temporary is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # safetensors and mkstemp create owner-only files; exports are shared
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ----------------------------------------------------------------------------------------------
# paths from data files


def inside_root(root: str | os.PathLike, name: str, where: str, option: str | None) -> Path:
    """``root / name`` when ``name`` stays inside ``root``; ``DataError`` naming ``where`` (the file and
    entry it came from) and ``option`` (the one that allows it; None: nothing does) otherwise. The
    test is on the spelling (absolute, or ``..`` climbing above the root), not on symbolic links: a
    root whose images are links to another disk is a usual layout."""
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
        allow = f"pass {option} true to allow paths outside it" if option else "it must name a file in that folder"
        raise DataError(f"{where}: path {name!r} points outside its folder {root}; {allow}")
    return Path(root) / name


# ----------------------------------------------------------------------------------------------
# the run folder lock


class RunInUse(FastMLGANError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive ``flock`` on ``<parent>/.<name>.lock``, beside the run folder (the folder itself
    may not exist yet, and ``--overwrite`` renames it). The file holds the holder's pid, host and
    start time; it is removed when the lock is released. Parent folders created for it are removed
    again when empty."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        run_dir = Path(run_dir)
        self.run_dir = run_dir
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self, option: str = "--out") -> RunLock:
        parent = self.path.parent
        missing = []
        for folder in [parent, *parent.parents]:
            if folder.exists():
                break
            missing.append(folder)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._created = missing
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunInUse(
                        f"{option} {self.run_dir} is in use by another fastmlgan run ({holder}; lock file "
                        f"{self.path}): wait for it to finish, or give another {option}"
                    ) from None
                # The holder before us may have removed the file after we opened it: lock the one on disk.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.write(fd, (json.dumps(record) + "\n").encode())
            self._fd = fd
        except RunInUse:
            self._remove_created()
            raise
        except OSError as e:
            self._remove_created()
            raise FastMLGANError(
                f"{option} {self.run_dir}: cannot write the run directory (its lock file {self.path}: "
                f"{describe_os_error(e)}); pick another {option}"
            ) from None
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: a waiting process re-checks the file it locked
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is starting"


# ----------------------------------------------------------------------------------------------
# messages


def stdout_failed(e: OSError) -> str:
    """After a failed write to standard output (a full disk, /dev/full, a closed pipe): point it at
    /dev/null, so that the interpreter's final flush does not fail again with a traceback, and
    return the one line to print."""
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    return f"error: cannot write to standard output ({describe_os_error(e)})"


def nul_argument(argv) -> str | None:
    """The one-line error for a command-line argument holding a NUL character (no file name can;
    only a caller in Python can pass one, the operating system cannot), or None."""
    for arg in argv:
        if "\x00" in str(arg):
            return f"error: argument {str(arg)!r} contains a NUL character"
    return None


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line. A DataLoader worker re-raises an error in the main process
    as ``Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...`` (20 lines): its
    last line holds the original message."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        name, sep, message = last.partition(": ")
        is_exception_name = bool(sep) and name.replace(".", "").replace("_", "").isalnum()
        text = message if is_exception_name and name.endswith(("Error", "Exception", "Exit")) else last
    return " ".join(text.split("\n")).strip()
