"""Fixtures of the SAE source tests (the shared tiny models are in ``tests/conftest.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from saes_helpers import BAD_TOY


@pytest.fixture()
def bad_toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "bad_toy_sae.py").write_text(BAD_TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_toy_sae", raising=False)
    return tmp_path
