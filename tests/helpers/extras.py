"""Optional extras in the tests: a test that needs one skips where the extra is not installed,
except in a run that declares it installed. ``make test`` exports ``FASTMLGAN_TEST_EXTRAS`` with
the extras ``make install`` installed (its ``EXTRAS``); there a missing module fails the test,
so a venv that lacks an extra it was meant to have cannot pass with the extra's tests skipped."""

from __future__ import annotations

import importlib
import os

import pytest

ENV_VAR = "FASTMLGAN_TEST_EXTRAS"


def declared(extra: str) -> bool:
    """Whether this run says ``extra`` is installed (``make test``: every extra of ``EXTRAS``)."""
    return extra in {e.strip() for e in os.environ.get(ENV_VAR, "").split(",")}


def import_extra(extra: str, module: str):
    """``module`` (of the optional dependency ``extra``), imported; a skip without it, or a
    failure where the run declared ``extra`` installed. Works at module level too."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = f"{module} (the '{extra}' extra) cannot be imported: {e}"
        if declared(extra):
            pytest.fail(f"{message}; {ENV_VAR} says `make install` installed it: run `make install` again", pytrace=False)
        pytest.skip(f"{message} (pip install '.[{extra}]')", allow_module_level=True)
