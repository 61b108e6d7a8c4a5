"""What a result was measured on: versions, git revision, device. Every results file (benchmarks,
run directories, the reproduction harness) records these beside its numbers."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def git_revision(repo: Path = REPO) -> str:
    """``HEAD``'s hash with ``-dirty`` when the tree has changes; "unknown" outside a checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str | None]:
    import numpy
    import torchvision

    import fastmlgan

    out: dict[str, str | None] = {
        "fastmlgan": fastmlgan.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
    }
    for name, module in (("triton", "triton"), ("dali", "nvidia.dali")):
        try:
            out[name] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            out[name] = None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


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
        "git_revision": git_revision(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }
