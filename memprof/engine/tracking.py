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
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st._cdata, st.nbytes()


#: tensor types that own their storage (anything else may be a wrapper such as DTensor)
_PLAIN = (torch.Tensor, torch.nn.Parameter, FakeTensor)

#: the ``func`` an allocation made by resizing a storage (``UntypedStorage.resize_``) is reported with
RESIZE = "UntypedStorage.resize_"
_resize_watchers: list[StorageTracker] = []
_real_resize: Callable[..., Any] | None = None


def _resize(storage: torch.UntypedStorage, size: int) -> Any:
    assert _real_resize is not None
    out = _real_resize(storage, size)
    for tracker in list(_resize_watchers):
        tracker.resized(storage)
    return out


def _watch_resizes(tracker: StorageTracker) -> None:
    """FSDP2 frees and re-allocates gathered parameters by resizing their storages (no op is dispatched)."""
    global _real_resize
    if not _resize_watchers:
        _real_resize = torch.UntypedStorage.resize_
        setattr(torch.UntypedStorage, "resize_", _resize)  # noqa: B010 - swapped while watched
    _resize_watchers.append(tracker)


def _unwatch_resizes(tracker: StorageTracker) -> None:
    global _real_resize
    if tracker in _resize_watchers:
        _resize_watchers.remove(tracker)
    if not _resize_watchers and _real_resize is not None:
        setattr(torch.UntypedStorage, "resize_", _real_resize)  # noqa: B010
        _real_resize = None


def nested_metadata(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a (strided) nested tensor keeps its layout in: ``aten._nested_tensor_size`` and its
    strides and offsets return them themselves (shared with the nested tensors made from it)."""
    getters = ("_nested_tensor_size", "_nested_tensor_strides", "_nested_tensor_storage_offsets")
    try:
        return [getattr(t, name)() for name in getters]
    except (AttributeError, RuntimeError):  # a jagged-layout nested tensor: its offsets are ordinary tensors
        return []


class StorageTracker(TorchDispatchMode):
    """Sees every storage that ops create while active, and when each one dies.

    ``on_alloc(key, nbytes, func)`` / ``on_free(key, nbytes)`` are called as that
    happens; ``current_bytes`` / ``peak_bytes`` follow the live total of every storage
    registered (by an op, or beforehand with :meth:`register`). A storage resized while the
    tracker is active (``UntypedStorage.resize_``, how FSDP2 frees and re-gathers parameters)
    counts as a free of its old size and an allocation of the new one (``func`` :data:`RESIZE`).
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
        self._watched: set[int] = set()  # storages with a finalizer
        self.run_op: Callable[[Any, tuple, dict | None], Any] | None = None  # runs each op (default: call it)

    # -- registration ---------------------------------------------------------------
    def register(self, tensors: Iterable[torch.Tensor], func: Any = None) -> list[int]:
        """Count these tensors' storages as live (those already known are skipped); returns new keys."""
        new = []
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            if type(t) not in _PLAIN and is_traceable_wrapper_subclass(t):
                # a DTensor's storage is a stand-in of the whole tensor's size: count what it wraps
                attrs, _ = t.__tensor_flatten__()
                new.extend(self.register([getattr(t, a) for a in attrs], func))
                continue
            st = t.untyped_storage()
            if self._register_storage(st, func):
                new.append(st._cdata)
            if t.is_nested:  # its buffer, and the sizes, strides and offsets it keeps in tensors of their own
                new.extend(self.register(nested_metadata(t), func))
        return new

    def _register_storage(self, st: torch.UntypedStorage, func: Any) -> bool:
        key = st._cdata
        if key in self.live:
            return False
        nbytes = st.nbytes()
        self.live[key] = nbytes
        self.current_bytes += nbytes
        if key not in self._watched:  # one finalizer per storage, however often it is resized
            self._watched.add(key)
            self._finalizers.append(weakref.finalize(st, self._died, key))
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
        if self._on_alloc is not None:
            self._on_alloc(key, nbytes, func)
        return True

    def resized(self, st: torch.UntypedStorage) -> None:
        """``st`` was resized: free its old size (if counted), count the new one (if any)."""
        key = st._cdata
        nbytes = st.nbytes()
        known = key in self.live
        if known and self.live[key] == nbytes:
            return
        if known:
            self._freed(key)
        if nbytes > 0:
            self._register_storage(st, RESIZE)

    def _died(self, key: int) -> None:
        self._watched.discard(key)
        self._freed(key)

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

    def __enter__(self):
        _watch_resizes(self)
        try:
            return super().__enter__()
        except BaseException:
            _unwatch_resizes(self)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            _unwatch_resizes(self)

    # -- dispatch -----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        run = self.run_op
        out = run(func, args, kwargs) if run is not None else func(*args, **(kwargs or {}))
        self.op_count += 1
        self.register(tree_leaves(out), func)
        return out
