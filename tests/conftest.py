"""Shared test helpers: golden files, the GPU marker and the slow marker."""

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


def _run_slow(config) -> bool:
    """Slow tests run in CI (CI=true), with --runslow or MEMPROF_SLOW=1, or when selected with -m."""
    if config.getoption("--runslow") or os.environ.get("MEMPROF_SLOW") == "1":
        return True
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return True
    return "slow" in (config.getoption("-m") or "")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    gpu = not _has_cuda()
    slow = not _run_slow(config)
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_slow = pytest.mark.skip(reason="slow: runs in CI, or with --runslow / MEMPROF_SLOW=1")
    for item in items:
        if gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if slow and "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    # stable Rich rendering in CliRunner / golden tests
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
