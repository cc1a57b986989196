"""Storage-level allocation tracking under a TorchDispatchMode, for real and fake tensors.

Counts storages, not tensors: views and tied weights share one storage and are
counted once. A storage is "freed" when its last reference dies (a weakref
finalizer on the storage object, which PyTorch keeps alive exactly as long as
the C++ storage). Used by the tracer (fake tensors, no memory) and by the CPU
memory cap (real tensors).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st._cdata, st.nbytes()


class StorageTracker(TorchDispatchMode):
    """Sees every storage that ops create while active, and when each one dies.

    ``on_alloc(key, nbytes, func)`` / ``on_free(key, nbytes)`` are called as that
    happens; ``current_bytes`` / ``peak_bytes`` follow the live total of every storage
    registered (by an op, or beforehand with :meth:`register`).
    """

    def __init__(
        self, on_alloc: Callable[[int, int, Any], None] | None = None, on_free: Callable[[int, int], None] | None = None
    ):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.op_count = 0
        self._on_alloc = on_alloc
        self._on_free = on_free
        self._finalizers: list[weakref.finalize] = []
        self.run_op: Callable[[Any, tuple, dict | None], Any] | None = None  # runs each op (default: call it)

    # -- registration ---------------------------------------------------------------
    def register(self, tensors: Iterable[torch.Tensor], func: Any = None) -> list[int]:
        """Count these tensors' storages as live (those already known are skipped); returns new keys."""
        new = []
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self.live:
                continue
            nbytes = st.nbytes()
            self.live[key] = nbytes
            self.current_bytes += nbytes
            new.append(key)
            self._finalizers.append(weakref.finalize(st, self._freed, key))
            if self._on_alloc is not None:
                self._on_alloc(key, nbytes, func)
            if self.current_bytes > self.peak_bytes:
                self.peak_bytes = self.current_bytes
        return new

    def _freed(self, key: int) -> None:
        nbytes = self.live.pop(key, None)
        if nbytes is None:
            return
        self.current_bytes -= nbytes
        if self._on_free is not None:
            self._on_free(key, nbytes)

    def detach(self) -> None:
        """Stop listening for frees (call when done; later frees are ignored)."""
        for fin in self._finalizers:
            fin.detach()
        self._finalizers.clear()
        self._on_free = None

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    # -- dispatch -----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        run = self.run_op
        out = run(func, args, kwargs) if run is not None else func(*args, **(kwargs or {}))
        self.op_count += 1
        self.register(tree_leaves(out), func)
        return out
