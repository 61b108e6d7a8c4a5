"""tests/helpers/extras.py: a missing optional extra skips its tests, unless the run (make test) declared
it installed, where it fails them; and the Makefile hands its EXTRAS to the suite."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from extras import ENV_VAR, declared, import_extra

REPO = Path(__file__).resolve().parents[2]


def test_missing_extra_skips_unless_declared_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if tensorboard were not installed
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"tensorboard \(the 'tb' extra\) cannot be imported"):
        import_extra("tb", "tensorboard")
    monkeypatch.setenv(ENV_VAR, "dev,plots")
    assert not declared("tb") and declared("plots")
    with pytest.raises(pytest.skip.Exception):
        import_extra("tb", "tensorboard")
    monkeypatch.setenv(ENV_VAR, "dev,plots,tb")
    with pytest.raises(pytest.fail.Exception, match="make install"):
        import_extra("tb", "tensorboard")
    assert import_extra("dev", "pytest") is pytest


def test_make_test_declares_the_extras_it_installs():
    text = (REPO / "Makefile").read_text()
    assert re.search(r"^test: install\n\tFASTMLGAN_TEST_EXTRAS=\$\(EXTRAS\) \$\(PY\) -m pytest", text, re.M)
    # The install stamp depends on what is installed (EXTRAS, TORCH_SPEC), not only on the two files.
    assert re.search(r"^\$\(VENV\)/\.installed: setup\.py pyproject\.toml \$\(VENV\)/\.install-spec$", text, re.M)
    assert "INSTALL_SPEC := $(TORCH_SPEC) [$(EXTRAS)]" in text
