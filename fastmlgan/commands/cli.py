"""The ``fastmlgan`` command (and ``python -m fastmlgan``): one entry point for every tool.

``fastmlgan COMMAND [ARGS...]`` hands ARGS to the ``main(argv)`` of the command's module in
``fastmlgan.commands``, imported only when it runs (``COMMANDS``), so ``fastmlgan --help`` and
``fastmlgan embedded`` do not import torch. ``python -m fastmlgan.train`` (and torchrun) and
``python -m fastmlgan.reproduce`` keep working; every command also runs as ``python -m
fastmlgan.commands.COMMAND``.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastmlgan.safeio import nul_argument, one_line

PROG = "fastmlgan"
REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO_ROOT / "bench"

# name -> (module whose main(argv) -> int runs it, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fastmlgan.commands.train", "train a model (BCE, then WGAN-GP); --nproc N runs N processes here, --nnodes M joins M machines"),
    "evaluate": ("fastmlgan.commands.evaluate", "re-evaluate a checkpoint on its evaluation split or other data"),
    "predict": ("fastmlgan.commands.predict", "label images with a checkpoint or an exported model (CSV or JSONL)"),
    "export": ("fastmlgan.commands.export", "export a checkpoint's generator (safetensors + JSON sidecar)"),
    "check": ("fastmlgan.commands.check", "scan a dataset for missing, broken or unlabelled images before training"),
    "cache": ("fastmlgan.commands.cache", "build, list or verify the decoded-image caches of --data.backend cache"),
    "shards": ("fastmlgan.commands.shards", "write a data set as WebDataset shards (--data.dataset shards), verify them"),
    "embedded": ("fastmlgan.commands.embedded", "write the embedded synthetic dataset to a folder (or describe it)"),
    "metrics": ("fastmlgan.commands.metrics", "score saved predictions (.npy) against targets: the paper's metrics as JSON"),
    "reproduce": ("fastmlgan.commands.reproduce", "run the paper's Tables 1 and 3 over several seeds"),
    "sweep": ("fastmlgan.commands.sweep", "compare one harness row across several reproduce results folders"),
    "bench": ("", "run a benchmark of the source checkout's bench/ folder (loader, kernels, train, gpu_check)"),
}


def usage() -> str:
    lines = [
        f"usage: {PROG} [--version] [-h] COMMAND [ARGS...]",
        "",
        "Adversarial learning of label dependency (Tsai & Lee) for multi-label classification.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", f"'{PROG} COMMAND --help' gives a command's options."]
    return "\n".join(lines)


def version_text() -> str:
    """fastmlgan, torch, torchvision, CUDA and the git revision (in a checkout)."""
    from fastmlgan.environment import git_revision, versions

    v = versions()
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
    lines = [
        f"fastmlgan {v['fastmlgan']}",
        f"torch {v['torch']} (CUDA {v['cuda'] or 'none: a CPU build'}; {gpu})",
        f"torchvision {v['torchvision']}",
        f"python {v['python']}",
    ]
    if v.get("dali"):
        lines.append(f"DALI {v['dali']}")
    revision = git_revision()
    lines.append(f"git {revision}" if revision else "git: not a checkout")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version_text())
        return 0
    command, args = argv[0], argv[1:]
    if nul_argument(argv):
        print(nul_argument(argv), file=sys.stderr)
        return 2
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        print(f"error: unknown command {command!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if command == "bench":
        return run_bench(args)
    if command == "train":
        try:
            launch, args = take_launch_options(args)
        except ValueError as e:
            return _fail(str(e))
        if launch.nproc > 1 or launch.nnodes > 1:
            return launch_torchrun(launch, args)
    return _run_module(command, args)


def _run_module(command: str, args: list[str]) -> int:
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the module exists but one of its imports is missing
            raise
        print(
            f"error: '{PROG} {command}' is not available in this installation ({module_name} is missing)",
            file=sys.stderr,
        )
        return 2
    code = module.main(args)
    return int(code or 0)


@dataclass(frozen=True)
class Launch:
    """``train``'s launcher options: processes on this machine, and the nodes of a multi-node run."""

    nproc: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = ""
    rdzv_id: str = "fastmlgan"
    rdzv_timeout: int = 600  # torchrun's own join timeout
    node_addr: str = ""
    max_restarts: int = 0


# option -> (field, smallest value; None: a string)
_LAUNCH_OPTIONS = {
    "--nproc": ("nproc", 1), "--nnodes": ("nnodes", 1), "--rdzv-endpoint": ("rdzv_endpoint", None),
    "--rdzv-id": ("rdzv_id", None), "--rdzv-timeout": ("rdzv_timeout", 1), "--node-addr": ("node_addr", None),
    "--max-restarts": ("max_restarts", 0),
}


def take_launch_options(args: list[str]) -> tuple[Launch, list[str]]:
    """The launcher options (``--nproc N``, ``--nnodes M --rdzv-endpoint HOST:PORT`` ...; also as
    ``--opt=value``) out of the train options; ValueError naming the option for a bad value."""
    rest: list[str] = []
    given: dict[str, object] = {}
    i = 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if key not in _LAUNCH_OPTIONS:
            rest.append(args[i])
            i += 1
            continue
        name, low = _LAUNCH_OPTIONS[key]
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"{key} needs a value" if key != "--nproc" else "--nproc needs a number of processes")
            value = args[i + 1]
            i += 1
        i += 1
        if low is None:
            given[name] = value
            continue
        try:
            number = int(value)
        except ValueError:
            what = "a number of processes" if key == "--nproc" else "a whole number"
            raise ValueError(f"{key}: expected {what}, got {value!r}") from None
        if number < low:
            raise ValueError(f"{key} must be >= {low}, got {number}")
        given[name] = number
    launch = Launch(**given)  # type: ignore[arg-type]
    if launch.nnodes == 1:
        extra = [k for k, (name, _) in _LAUNCH_OPTIONS.items() if name in given and k not in ("--nproc", "--nnodes")]
        if extra:
            raise ValueError(f"{extra[0]} is for a multi-node run: give --nnodes M (M > 1) as well")
    else:
        host, _, port = launch.rdzv_endpoint.rpartition(":")
        if not launch.rdzv_endpoint:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT, the same on every node")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--rdzv-endpoint: expected HOST:PORT, got {launch.rdzv_endpoint!r}")
    return launch, rest


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def torchrun_command(launch: Launch, args: Sequence[str]) -> list[str]:
    """The launch of ``train --nproc N``: torchrun (as ``python -m torch.distributed.run``, the
    same interpreter), with a local rendezvous on one node; with ``--nnodes M`` the c10d
    rendezvous at ``--rdzv-endpoint``, hosted by the node whose ``--node-addr`` is its host."""
    command = [sys.executable, "-m", "torch.distributed.run"]
    if launch.nnodes == 1:
        command += ["--standalone"]
    else:
        conf = f"join_timeout={launch.rdzv_timeout}"
        if launch.node_addr:
            # Which torchrun keeps the store: torchrun guesses from the host name, which fails where
            # hosts share one (containers, network namespaces; issue 22).
            conf += f",is_host={int(launch.node_addr == launch.rdzv_endpoint.rpartition(':')[0])}"
        command += ["--nnodes", str(launch.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", launch.rdzv_endpoint,
                    "--rdzv-id", launch.rdzv_id, "--rdzv-conf", conf]
        if launch.node_addr:
            command += ["--local-addr", launch.node_addr]
    if launch.max_restarts:
        command += ["--max-restarts", str(launch.max_restarts)]
    return [*command, "--nproc-per-node", str(launch.nproc), "-m", "fastmlgan.train", *args]


ERROR_DIR_ENV = "FASTMLGAN_ERROR_DIR"
"""Set by ``train --nproc``: each rank writes its closing line (an error, a stop) there, not to stderr."""


def launch_torchrun(launch: Launch, args: Sequence[str]) -> int:
    """torchrun (``torch.distributed.run``) in this process, so that a failed worker ends with the
    kit's own line and exit status, not torchrun's traceback and failure summary. Each rank leaves
    its closing line in a temporary folder; the distinct lines are printed once, rank 0's first.
    SIGTERM and Ctrl-C reach torchrun's agent here, which forwards them to the workers as before."""
    # c10d's C++ warnings in this process (a client whose host name has no reverse lookup) would
    # come before the one closing line: c10 reads the level when torch loads. The workers keep
    # the user's level (the variable is restored before they start).
    quiet = "torch" not in sys.modules and "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    try:
        from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError
        from torch.distributed.run import get_args_parser, run
    finally:
        if quiet:
            os.environ.pop("TORCH_CPP_LOG_LEVEL")

    _ignore_torchrun_timer_race()
    command = torchrun_command(launch, args)[3:]  # torchrun's own arguments: --standalone ... -m fastmlgan.train ...
    torchrun_args = get_args_parser().parse_args(command)
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):  # its banner, "closing signal" and "failed (exitcode)" lines
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="fastmlgan-ranks-") as folder:
        os.environ[ERROR_DIR_ENV] = folder
        try:
            run(torchrun_args)
            code = 0
        except RendezvousTimeoutError:
            print(f"error: --rdzv-endpoint {launch.rdzv_endpoint}: not all {launch.nnodes} nodes (--nnodes) joined "
                  f"within --rdzv-timeout {launch.rdzv_timeout} s; start the same train command on every node, "
                  "each able to reach that address", file=sys.stderr)
            code = 1
        except RendezvousConnectionError as e:
            cause = e.__cause__ or e.__context__
            print(f"error: --rdzv-endpoint {launch.rdzv_endpoint}: cannot reach the rendezvous store "
                  f"({one_line(cause) if cause else 'no answer'}); check the address and that the node hosting it "
                  "(--node-addr HOST) runs", file=sys.stderr)
            code = 1
        except Exception as e:  # noqa: BLE001 - ChildFailedError, SignalException: their text is torchrun's
            code = _torchrun_exit_code(e)
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)
            _print_rank_lines(Path(folder))
    return code


def _ignore_torchrun_timer_race() -> None:
    """Drop one known, harmless torch traceback from the closing lines. The rendezvous handler's
    keep-alive timer (``torch.distributed.elastic.rendezvous.utils._PeriodicTimer``) stops its
    thread from a ``weakref.finalize``; when the handler's last reference goes inside that very
    thread (after a SIGTERM, by chance) the finalizer joins the current thread, and Python prints
    "Exception ignored ... RuntimeError: cannot join current thread" after the run's own line. The
    thread is a daemon and is stopped anyway; any other unraisable error is printed as before."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
        if (
            isinstance(unraisable.exc_value, RuntimeError)
            and "cannot join current thread" in str(unraisable.exc_value)
            and any(f.name == "_stop_thread" and f.filename.endswith(os.path.join("rendezvous", "utils.py")) for f in frames)
        ):
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _torchrun_exit_code(e: Exception) -> int:
    failures = getattr(e, "failures", None)
    if failures:
        # A rank's own exit status first; the others were often stopped by torchrun (SIGTERM) after it.
        codes = [failures[rank].exitcode for rank in sorted(failures)]
        exitcode = next((c for c in codes if c > 0), codes[0])
        return exitcode if exitcode > 0 else 128 - exitcode  # killed by a signal: 128 + its number
    sigval = getattr(e, "sigval", None)
    if sigval is not None:
        return 128 + int(sigval)
    print(f"error: torchrun failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})",
          file=sys.stderr)
    return 1


def _print_rank_lines(folder: Path) -> None:
    lines: dict[str, list[int]] = {}
    for path in sorted(folder.glob("rank-*.txt"), key=lambda p: int(p.stem.partition("-")[2] or 0)):
        rank = int(path.stem.partition("-")[2] or 0)
        for line in path.read_text().splitlines():
            lines.setdefault(line, []).append(rank)
    for line, ranks in lines.items():
        prefix = "" if len(lines) == 1 or ranks == [0] or 0 in ranks else f"rank {', '.join(map(str, ranks))}: "
        print(prefix + line, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# bench


def bench_scripts(bench_dir: Path = BENCH_DIR) -> dict[str, list[str]]:
    """name -> command of each benchmark in ``bench_dir`` (a source checkout's bench/ folder)."""
    scripts: dict[str, list[str]] = {}
    if not bench_dir.is_dir():
        return scripts
    for path in sorted(bench_dir.glob("*.py")):
        if not path.name.startswith(("test_", "_")):
            scripts[path.stem] = [sys.executable, str(path)]
    for path in sorted(bench_dir.glob("*.sh")):
        scripts[path.stem] = ["bash", str(path)]
    return scripts


def run_bench(args: list[str], bench_dir: Path = BENCH_DIR) -> int:
    scripts = bench_scripts(bench_dir)
    if not scripts:
        return _fail(
            f"no benchmarks here: they are scripts in a source checkout's bench/ folder ({bench_dir} is absent); "
            "clone the repository and run 'fastmlgan bench NAME' from an editable install (pip install -e .)"
        )
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: {PROG} bench NAME [ARGS...]   (NAME --help: the benchmark's options)\n\nbenchmarks in {bench_dir}:")
        for name, command in scripts.items():
            print(f"  {name:<10} {Path(command[-1]).name}")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in scripts:
        close = difflib.get_close_matches(name, scripts, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return _fail(f"no benchmark {name!r} in {bench_dir}{hint} (there are: {', '.join(scripts)})")
    # The repository root on the path: the scripts import fastmlgan and their neighbours.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(bench_dir.parent), os.environ.get("PYTHONPATH")]))}
    return subprocess.call([*scripts[name], *rest], cwd=bench_dir.parent, env=env)


def entry() -> None:
    """The console script and ``python -m fastmlgan``."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank of `torchrun -m fastmlgan train`
        # Imported here: the dispatcher stays light (no torch) for every other command.
        from fastmlgan.commands.train import exit_after_distributed_run

        exit_after_distributed_run(code)
    raise SystemExit(code)
