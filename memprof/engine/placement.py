"""Where the storages made now will live on a real CUDA run: the GPU, CPU memory, or unified memory.

The tracer runs everything on fake CPU tensors. Code that, on a real GPU, would put tensors in
CPU memory (an optimizer stepping on the CPU, ``--offload optimizer``) or in CUDA unified memory
(bitsandbytes' paged optimizer state) says so by running inside :func:`on`; the tracer asks
:func:`current` for every allocation and keeps those bytes out of the GPU figures, reporting them
apart. Outside the tracer nothing reads it: a real step on the CPU counts everything.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

Place = Literal["device", "host", "paged"]
_state = threading.local()


def current() -> Place:
    return getattr(_state, "place", "device")


@contextlib.contextmanager
def on(place: Place) -> Iterator[None]:
    """Storages allocated inside live in ``place`` ("host": CPU memory; "paged": unified memory)."""
    previous = current()
    _state.place = place
    try:
        yield
    finally:
        _state.place = previous
