"""memprof: where a PyTorch training step's memory goes, and how large a batch fits.

The library returns data (frozen dataclasses, bytes as ints) and raises
:class:`memprof.errors.MemprofError` with a hint; the ``memprof`` command renders it.
"""

from ._version import __version__
from .engine.loading import load_model  # noqa: E402
from .engine.workload import Workload, get_precision  # noqa: E402
from .errors import MemprofError  # noqa: E402
from .results import MemCategory  # noqa: E402

__all__ = ["__version__", "MemprofError", "MemCategory", "Workload", "get_precision", "load_model"]
