"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# The suite's layout (issue 19): tests/unit/<mirror of the package>/, tests/integration/ (processes,
# command lines, end to end), tests/helpers/ (shared helpers and worker scripts, imported by module
# name from here), tests/assets/ (golden records).
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

# Triton kernels run on a CPU only through Triton's interpreter, which must be switched on before
# anything imports triton (torchvision and torch.compile do): set it before any test module loads.
# On a GPU machine the kernels compile for the GPU as usual.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logging

import pytest

# Under pytest-xdist (make test runs `-n auto`), the workers share the cores: each worker and the
# processes its tests start (torchrun ranks, CLI runs) get an even share of the threads instead of
# all of them, which would oversubscribe the CPU.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)

REPO_ROOT = Path(__file__).resolve().parents[1]

# --data.backend auto builds decoded-image caches on first use (issue 20), in $FASTMLGAN_CACHE or
# ~/.cache/fastmlgan: every test's runs (and the CLI runs they start) build theirs in one folder
# of this test session instead, removed at its end.
if "FASTMLGAN_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["FASTMLGAN_CACHE"] = tempfile.mkdtemp(prefix="fastmlgan-test-caches-")
    atexit.register(shutil.rmtree, os.environ["FASTMLGAN_CACHE"], True)


@pytest.fixture(autouse=True)
def _isolated_logging():
    """Each command's main configures the root logger (level, handler) for its process; in one
    pytest process that would leak into the next test (INFO lines in an error-output check)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True, scope="module")
def _isolated_module_logging():
    """The same for a module's fixtures (test_reproduce's harness run configures the root logger
    for stdout): without it a later module in the same xdist worker prints its INFO lines to stdout."""
    root, package = logging.getLogger(), logging.getLogger("fastmlgan")
    handlers, level, package_level = list(root.handlers), root.level, package.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    package.setLevel(package_level)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder kept beside the project (``../shared/data``); skips when absent."""
    path = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"../shared/data is absent: real-data tests need it at {path} (see its README.md)")
    return path


@pytest.fixture(scope="session")
def embedded_small(tmp_path_factory):
    """A 2000 + 200 image embedded dataset at 32 px (about a second to write), shared by the session."""
    from fastmlgan.data.sources.embedded import generate

    return generate(tmp_path_factory.mktemp("embedded") / "data", num_train=2000, num_val=200, image_size=32, seed=0)


# What bench/gpu_check.sh's GPU-tests step selects besides the ``gpu`` tests (``-m "gpu or
# gpucheck"``): the Triton path of the kernel tests (compiled for the GPU there, interpreted on a
# CPU) and the DALI tests. The rest of the suite is CI's: on the GPU machine ``-m "gpu or not
# slow"`` ran some 200 CPU tests first and the step was stopped before reaching these.
_TRITON_TEST_FILES = ("test_gumbel_sigmoid.py", "test_gradient_penalty.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        ids = item.callspec.id if hasattr(item, "callspec") else ""
        if (name in _TRITON_TEST_FILES and "triton" in ids) or name == "test_dali.py" or "dali" in item.name:
            item.add_marker(pytest.mark.gpucheck)
