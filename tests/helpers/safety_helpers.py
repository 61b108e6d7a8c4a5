"""Helpers of the data-safety tests (issue 18): commands run as a new user runs them, file-system
faults a root test process can make (a small tmpfs, a read-only bind mount), and the one-line check."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_cli(args: list[str], timeout: float = 300, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m fastmlgan ARGS`` in a fresh process. A hang raises ``TimeoutExpired`` (the bound
    that turns a hang into a failure; no test asserts on a duration)."""
    return subprocess.run([sys.executable, "-m", "fastmlgan", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env(), stdin=subprocess.DEVNULL, **kwargs)


def run_python(code: str, timeout: float = 300, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env(), stdin=subprocess.DEVNULL, **kwargs)


def error_line(stderr: str, *fragments: str) -> str:
    """The one ``error:`` line of ``stderr``; fails on a traceback, on no or several error lines,
    or when a fragment is missing from it."""
    assert "Traceback" not in stderr and '  File "' not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mount {' '.join(args)} is not permitted here ({done.stderr.strip()}): needs root in a "
                    "container that allows mounts")


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m"):
    """A tmpfs of ``size`` at ``path`` (a full disk for what is written there); skips without mounts."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def make_read_only(path: Path) -> None:
    """Bind-mount ``path`` read-only over itself (chmod does not stop root); ``undo_read_only`` ends it."""
    _mount("--bind", str(path), str(path))
    _mount("-o", "remount,ro,bind", str(path))


def undo_read_only(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def smoke_args(out: Path, data: Path, *extra: str) -> list[str]:
    """The smoke preset on a shared embedded set, short epochs: seconds per run."""
    return ["--preset", "smoke", "--out", str(out), "--data.root", str(data), "--train.max_steps_per_epoch", "4",
            "--data.embedded_num_val", "64", *extra]
