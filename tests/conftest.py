"""Shared test helpers: golden files and the GPU marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"
REGEN = os.environ.get("MEMPROF_REGEN_GOLDEN") == "1"


def assert_golden(name: str, text: str) -> None:
    """Compare ``text`` with ``tests/golden/<name>``; ``MEMPROF_REGEN_GOLDEN=1`` rewrites it (review the diff!)."""
    path = GOLDEN_DIR / name
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing golden file {path}; run with MEMPROF_REGEN_GOLDEN=1 and review it"
    expected = path.read_text()
    assert text == expected, f"output differs from {path}; if intended, regenerate with MEMPROF_REGEN_GOLDEN=1"


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    # stable Rich rendering in CliRunner / golden tests
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
