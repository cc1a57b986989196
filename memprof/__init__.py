"""memprof: where a PyTorch training step's memory goes, and how large a batch fits.

The Python API (:mod:`memprof.api`): :func:`estimate`, :func:`scale`, :func:`find_batch`, :func:`compare`
and :func:`profile` return frozen dataclasses (bytes as ints; :mod:`memprof.results`) and raise
:class:`MemprofError` (a one-line ``message`` and ``hint``). They never print; the ``memprof``
command renders the same results.
"""

from ._version import __version__
from .api import compare, estimate, find_batch, profile, scale
from .errors import MemprofError
from .results import MemCategory

__all__ = ["__version__", "estimate", "scale", "find_batch", "compare", "profile", "MemprofError", "MemCategory"]
