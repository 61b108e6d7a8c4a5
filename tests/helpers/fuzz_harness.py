"""The runner of the command fuzz (``tests/integration/test_fuzz_cli.py``, issue 18).

A case is one command line (and the files it names) run as a new user would run it: the
command's ``main`` in a forked child of the test process (fast: no interpreter or torch start-up),
standard output and error sent to files (or stdout to ``/dev/full``), standard input from
``/dev/null``, the address space capped (an endless read fails there, not on the machine) and
the wall clock bounded (a hang is killed and counted). Its outcome is one of:

- ``one line``: an expected error, exit status 2, exactly one ``error:`` line, no traceback;
- ``handled``: an input the command documents a non-error outcome for (a row with the error in
  ``predict``, the report in ``check``), with that exit status and no traceback;
- ``traceback``: a traceback on stderr, an exception out of ``main``, or death by a signal;
- ``hang``: still running at the case's bound;
- ``silent``: exit status 0 where an error was due;
- ``lost``: a protected file (the trained run, the export, the data, the inputs) changed or gone;
- ``unclear``: anything else (several error lines, another exit status): a failure too.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("one line", "handled", "traceback", "hang", "silent", "lost", "unclear")
BAD = ("traceback", "hang", "silent", "lost", "unclear")
COMMANDS = ("train", "evaluate", "predict", "export", "check", "cache", "reproduce", "metrics", "embedded")


@dataclass(frozen=True)
class Special:
    """A file that is not plain bytes: a FIFO, a folder, a symbolic link (to ``target``)."""

    kind: str  # fifo | dir | link
    target: str = ""


@dataclass
class Case:
    command: str
    argv: list[str]
    expect: str = "error"  # error | handled
    codes: tuple[int, ...] = (2,)
    files: dict[str, bytes | str | Special] = field(default_factory=dict)  # relative to the case's folder
    stdout: str = "file"  # file | full
    lock: str = ""  # a run folder (relative) whose lock the parent holds while the case runs
    timeout: float = 90.0


@dataclass
class Kind:
    """One kind of bad input; hypothesis draws its concrete cases (``strategy`` yields ``Case``)."""

    command: str
    name: str
    strategy: object
    examples: int = 1


def _main(command: str):
    if command in ("train", "evaluate", "predict", "export", "check", "reproduce"):
        from fastmlgan.commands.cli import main

        return lambda argv: main([command, *argv])
    if command == "cache":
        from fastmlgan.commands.cache import main
    elif command == "metrics":
        from fastmlgan.commands.metrics import main
    else:
        from fastmlgan.commands.embedded import main
    return main


def fill(text: str, folder: Path, ws: Path) -> str:
    return text.replace("{case}", str(folder)).replace("{ws}", str(ws))


def materialize(case: Case, folder: Path, ws: Path) -> list[str]:
    """Create the case's files in ``folder``; its argv with ``{case}`` and ``{ws}`` filled in."""
    for rel, content in case.files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Special):
            if content.kind == "fifo":
                os.mkfifo(path)
            elif content.kind == "dir":
                path.mkdir(exist_ok=True)
            else:
                os.symlink(fill(content.target, folder, ws), path)
        elif hasattr(content, "render"):  # a workspace file, edited
            path.write_text(content.render(json.loads((ws / "model" / "fastmlgan.json").read_text())))
        else:
            data = fill(content, folder, ws) if isinstance(content, str) else content
            path.write_bytes(data.encode() if isinstance(data, str) else data)
    return [fill(a, folder, ws) for a in case.argv]


def _child(command: str, argv: list[str], folder: Path, out: str, err: str, stdout_full: bool, memory: int) -> None:
    """In the forked child: never returns."""
    code = 99
    try:
        import sys

        os.chdir(folder)  # a relative default (runs/, data/) lands in the case's folder
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(os.open("/dev/full" if stdout_full else out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        # pytest's capture replaced the streams with in-memory ones: write to the real descriptors.
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        import torch

        torch.set_num_threads(1)  # no OpenMP pool after fork (the parent may have one)
        try:
            code = int(_main(command)(argv) or 0)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                print("Exception ignored: flushing standard output failed", file=sys.__stderr__)
    except BaseException:  # noqa: BLE001 - the traceback is the outcome
        traceback.print_exc()
        code = 99
    finally:
        os._exit(code if 0 <= code < 99 else 98)


def _snapshot(roots: list[Path]) -> dict[str, tuple]:
    """(inode, size, mtime) of every file under the protected roots: a replaced, truncated or
    removed file changes it."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.name.endswith(".lock") or path.name.startswith(".") and path.name.endswith(".lock"):
                continue
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                state[str(path)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return state


@dataclass
class Result:
    kind: Kind
    case: Case
    argv: list[str]
    outcome: str
    code: int | None
    stderr: str


def classify(case: Case, code: int | None, stderr: str, lost: bool) -> str:
    if lost:
        return "lost"
    if code is None:
        return "hang"
    if code in (98, 99) or code < 0 or "Traceback (most recent call last)" in stderr or '\n  File "' in stderr \
            or "Exception ignored" in stderr:
        return "traceback"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if code not in case.codes:
        return "silent" if code == 0 else "unclear"
    if code == 2:  # the one exit status of a refusal: with exactly one line saying why
        return "one line" if len(errors) == 1 else "unclear"
    return "handled" if case.expect == "handled" and not errors else "unclear"


PRELOAD = ("fastmlgan.commands.cli", "fastmlgan.commands.train", "fastmlgan.train.trainer", "fastmlgan.commands.evaluate",
           "fastmlgan.commands.predict", "fastmlgan.commands.export", "fastmlgan.commands.check", "fastmlgan.commands.cache",
           "fastmlgan.data.imagecache.loader", "fastmlgan.data.factory", "fastmlgan.data.sources.coco",
           "fastmlgan.data.sources.listfile", "fastmlgan.data.sources.nuswide", "fastmlgan.data.sources.features",
           "fastmlgan.data.sources.labelsets", "fastmlgan.commands.reproduce", "fastmlgan.commands.metrics",
           "fastmlgan.commands.embedded", "fastmlgan.train.feature_cache", "torchvision.models", "safetensors.torch")


def run_cases(pending: list[tuple[Kind, Case]], ws: Path, protected: list[Path], lanes: int = 2) -> list[Result]:
    """Run every case, ``lanes`` children at a time. The commands' modules are imported here once,
    so that each forked child starts with them (an import of the trainer costs a second a case)."""
    import importlib

    try:
        from fastmlgan.safeio import RunLock
    except ImportError:  # the code before issue 18 (the fuzz run against it to show what it finds)
        RunLock = None
    for name in PRELOAD:
        importlib.import_module(name)
    vm = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize"))) * 1024
    memory = vm + (int(os.environ.get("FUZZ_MEMORY_GB", "6")) << 30)
    base = Path(tempfile.mkdtemp(prefix="fastmlgan-fuzz-"))
    before = _snapshot(protected)
    results: list[Result] = []
    running: dict[int, tuple] = {}
    queue = list(enumerate(pending))
    try:
        while queue or running:
            while queue and len(running) < lanes:
                n, (kind, case) = queue.pop(0)
                folder = base / f"case-{n}"
                folder.mkdir()
                argv = materialize(case, folder, ws)
                lock = RunLock(folder / case.lock).acquire() if case.lock and RunLock else None
                out, err = folder / ".stdout", folder / ".stderr"
                pid = os.fork()
                if pid == 0:
                    _child(case.command, argv, folder, str(out), str(err), case.stdout == "full", memory)
                bound = float(os.environ.get("FUZZ_TIMEOUT", case.timeout))
                running[pid] = (kind, case, argv, folder, lock, time.monotonic() + bound)
            time.sleep(0.005)
            for pid in list(running):
                kind, case, argv, folder, lock, deadline = running[pid]
                done, status = os.waitpid(pid, os.WNOHANG)
                if not done and time.monotonic() < deadline:
                    continue
                if not done:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    code = None
                else:
                    code = os.waitstatus_to_exitcode(status)
                del running[pid]
                if lock is not None:
                    lock.release()
                stderr = (folder / ".stderr").read_text(errors="replace") if (folder / ".stderr").exists() else ""
                now = _snapshot(protected)
                lost = now != before
                if lost:
                    before = now  # report it once, for this case
                results.append(Result(kind, case, argv, classify(case, code, stderr, lost), code, stderr))
                _remove(folder)
    finally:
        for pid in running:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        _remove(base)
    return results


def _remove(path: Path) -> None:
    for p in [path, *path.rglob("*")]:  # give back write permission a case took away
        try:
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def table(results: list[Result]) -> str:
    """The count table: one row per command, one column per outcome; kinds and cases per row."""
    rows = []
    width = max(len(o) for o in OUTCOMES) + 1
    rows.append(f"{'command':<10}{'kinds':>7}{'cases':>7}" + "".join(f"{o:>{width}}" for o in OUTCOMES))
    totals: Counter = Counter()
    all_kinds = set()
    for command in COMMANDS:
        mine = [r for r in results if r.kind.command == command]
        counts = Counter(r.outcome for r in mine)
        kinds = {r.kind.name for r in mine}
        all_kinds |= {(command, k) for k in kinds}
        totals.update(counts)
        rows.append(f"{command:<10}{len(kinds):>7}{len(mine):>7}" + "".join(f"{counts[o]:>{width}}" for o in OUTCOMES))
    rows.append(f"{'total':<10}{len(all_kinds):>7}{len(results):>7}" + "".join(f"{totals[o]:>{width}}" for o in OUTCOMES))
    return "\n".join(rows)
