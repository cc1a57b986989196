"""memprof: where a PyTorch training step's memory goes, and how large a batch fits.

The Python API (:mod:`memprof.api`): :func:`estimate`, :func:`scale`, :func:`find_batch`, :func:`compare`
and :func:`profile` return frozen dataclasses (bytes as ints; :mod:`memprof.results`) and raise
:class:`MemprofError` (a one-line ``message`` and ``hint``). They never print; the ``memprof``
command renders the same results.

The names below are loaded on first use, so that ``import memprof`` (and the ``memprof`` command's
start, during which Ctrl-C must already be handled) costs next to nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .api import compare, estimate, find_batch, profile, scale
    from .errors import MemprofError
    from .results import MemCategory

__all__ = ["__version__", "estimate", "scale", "find_batch", "compare", "profile", "MemprofError", "MemCategory"]

_LAZY = {
    "estimate": "api",
    "scale": "api",
    "find_batch": "api",
    "compare": "api",
    "profile": "api",
    "MemprofError": "errors",
    "MemCategory": "results",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
