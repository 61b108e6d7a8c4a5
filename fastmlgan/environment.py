"""What a result was measured on: versions, git revision, device. Every results file (benchmarks,
run directories, the reproduction harness, ``fastmlgan --version``) records these beside its
numbers, from this one module."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy
import torch
import torchvision

from fastmlgan import __version__

REPO = Path(__file__).resolve().parents[1]


REVISION_FILE = Path(".gpu-check") / "revision"
"""Written beside the code where no ``.git`` travels with it (``bash bench/gpu_check.sh prepare``
writes it before the GPU check's call; the GPU machine gets the work tree without ``.git``)."""


def git_revision(root: Path = REPO) -> str | None:
    """HEAD of the checkout holding this package, with ``-dirty`` when tracked files differ from
    it or the package has files git does not track; without ``.git``, the revision recorded in
    ``REVISION_FILE``; else None (an installed package, the Docker image)."""
    if not (root / ".git").exists():
        try:
            recorded = (root / REVISION_FILE).read_text().strip()
        except OSError:
            return None
        return recorded or None

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        revision = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no") or git(
            "status", "--porcelain", "--untracked-files=all", "--", "fastmlgan"
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (revision + ("-dirty" if dirty else "")) if revision else None


def versions() -> dict[str, str | None]:
    """fastmlgan, Python, torch, torchvision, numpy, CUDA (torch's build; None for a CPU build) and
    the optional packages that change what a run does, when installed."""
    out: dict[str, str | None] = {
        "fastmlgan": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
    }
    # Read from the installed metadata: importing DALI or Triton just to print a version costs seconds.
    for name, dists in (("dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120")), ("triton", ("triton",)), ("timm", ("timm",))):
        for dist in dists:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """The GPU's name (``NVIDIA H100 80GB HBM3``) or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device | str) -> str:
    """A file-name form of the device: ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device | str) -> dict:
    """Device, CPU threads, versions, git revision and the command line of this process."""
    device = torch.device(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "versions": versions(),
        "git_revision": git_revision() or "unknown",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }
