"""CPU allocations as ``torch.profiler`` sees them: every allocation and free of PyTorch's CPU allocator.

A dispatch mode (:class:`memprof.engine.tracking.StorageTracker`) sees the storages an op returns,
not the buffers its kernel allocates and frees inside. For most ops there are none; PyTorch's fused
transformer kernels and its nested-tensor kernels are the exception: ``nn.TransformerEncoderLayer``'s
inference fast path (``aten._transformer_encoder_layer_fwd``) computes attention, both residual adds,
both layer norms and the feed-forward block inside one op, and the nested-tensor kernels that
``nn.TransformerEncoder`` uses for a padded batch in eval mode pad, unpad and copy their buffers
inside theirs. On the CPU those buffers are measured here instead of modelled: the op runs under
``torch.profiler``'s memory events, and its peak above what it returns becomes a temporary of the
trace (:data:`FUSED`). A real CPU run measures the op as it runs; a fake-tensor trace runs the op
once per distinct signature on zero-filled CPU tensors of the same shapes and strides
(:class:`OpProbe`), which is exact wherever the op's allocations depend on shapes only (dense
tensors; nested tensors, whose sizes are values, only occur in real runs).

:func:`measure_cpu_step <memprof.engine.measure.measure_cpu_step>` reads the same events for a whole step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from . import overheads

#: the temporary a fused kernel holds inside its op on the CPU (measured, not modelled)
FUSED = overheads.Kind(
    "fused kernel buffers (measured)",
    "buffers PyTorch's fused transformer and nested-tensor kernels allocate inside one op "
    "(aten._transformer_encoder_layer_fwd, _native_multi_head_attention, _nested_tensor_from_mask, ...), "
    "measured on the CPU with torch.profiler's memory events while the op ran (memprof.engine.cpumem)",
    verified=True,
)

#: ops that compute a whole block inside one kernel (aten names; overloads that exist in this torch)
_FUSED_NAMES = (
    "_transformer_encoder_layer_fwd",
    "_native_multi_head_attention",
    "_transformer_decoder_only_layer_fwd",
    "_native_decoder_only_multi_head_attention",
    "_nested_tensor_from_mask",
    "_nested_tensor_from_tensor_list",
    "_nested_from_padded",
    "_nested_from_padded_and_nested_example",
)
_FUSED_OPS: frozenset | None = None


def fused_ops() -> frozenset:
    """The overloads of the fused transformer ops and of the ops that make nested tensors from dense ones."""
    global _FUSED_OPS
    if _FUSED_OPS is None:
        import torch

        ops: list[Any] = []
        for name in _FUSED_NAMES:
            packet = getattr(torch.ops.aten, name, None)
            if packet is not None:
                ops.extend(getattr(packet, o) for o in packet.overloads())
        _FUSED_OPS = frozenset(ops)
    return _FUSED_OPS


def has_nested(args: Any, kwargs: Any) -> bool:
    """Whether an op's arguments include a nested tensor (whose kernels allocate inside the op)."""
    import torch
    from torch.utils._pytree import tree_leaves

    return any(isinstance(a, torch.Tensor) and a.is_nested for a in tree_leaves((args, kwargs)))


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for a while: the profiler's C++ layer (kineto) writes status lines
    ("profiler_start", "gpuGetDeviceCount failed" on machines without a GPU) straight to it."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2: nothing to hide
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def memory_events(prof: Any) -> list[tuple[int, int]]:
    """``(time_ns, bytes)`` of a finished profile's CPU allocations (+) and frees (-), in time order."""
    from torch._C._autograd import DeviceType

    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e[0])
    return events


def can_measure() -> bool:
    """Whether a profile can start now (one is not already running: the user's, or a step's measurement)."""
    import torch

    return not torch.autograd.profiler._is_profiler_enabled


def measure_call(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` under torch.profiler's memory events: its result, and the peak of CPU bytes allocated
    above the start while it ran (0 when a profile is already running and none can start)."""
    if not can_measure():
        return fn(), 0
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    cur = peak = 0
    for _, nbytes in memory_events(prof):
        cur += nbytes
        peak = max(peak, cur)
    return out, peak


def new_storage_bytes(out: Any, known: Any = ()) -> int:
    """Bytes of the distinct storages among ``out``'s tensors (a nested tensor's layout tensors included,
    as :class:`memprof.engine.tracking.StorageTracker` counts them) that are not in ``known`` (storage keys)."""
    import torch
    from torch.utils._pytree import tree_leaves

    from .tracking import nested_metadata

    seen: set[int] = set()
    total = 0
    tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    tensors += [m for t in tensors if t.is_nested for m in nested_metadata(t)]
    for t in tensors:
        st = t.untyped_storage()
        key = st._cdata
        if key not in seen and key not in known:
            seen.add(key)
            total += st.nbytes()
    return total


def measure_op(run: Callable[[], Any], known: Any) -> tuple[Any, int]:
    """Run one op (``run()``) on real CPU tensors, measured: its output, and the bytes its kernel held
    inside the op beyond the new storages it returns (``known``: storage keys already counted)."""
    out, peak = measure_call(run)
    return out, max(0, peak - new_storage_bytes(out, known))


class OpProbe:
    """The bytes a fused op holds inside itself on the CPU, for a fake-tensor trace: the op runs once per
    signature (shapes, strides, dtypes, which arguments share a tensor or a storage, the other arguments)
    on zero-filled real CPU tensors, under torch.profiler. Real memory: about one layer's forward."""

    def __init__(self) -> None:
        self._cache: dict[tuple, int] = {}

    def scratch(self, func: Any, args: tuple, kwargs: dict | None) -> int:
        import torch
        from torch.utils._pytree import tree_flatten, tree_unflatten

        leaves, spec = tree_flatten((args, kwargs or {}))
        storages: dict[int, int] = {}  # storage key -> index among the arguments' storages
        tensors: dict[int, int] = {}  # id -> index among the arguments' tensors
        signature: list[Any] = [func]
        for a in leaves:
            if isinstance(a, torch.Tensor):
                st = a.untyped_storage()
                s = storages.setdefault(st._cdata, len(storages))
                i = tensors.setdefault(id(a), len(tensors))
                signature.append((tuple(a.shape), a.stride(), a.dtype, a.storage_offset(), st.nbytes(), s, i))
            else:
                signature.append(repr(a))
        key = tuple(signature)
        if key not in self._cache:
            self._cache[key] = self._measure(func, leaves, spec, tree_unflatten)
        return self._cache[key]

    @staticmethod
    def _measure(func: Any, leaves: list, spec: Any, unflatten: Callable[[list, Any], Any]) -> int:
        import torch
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), torch.no_grad():
            buffers: dict[int, torch.Tensor] = {}
            made: dict[int, torch.Tensor] = {}
            real: list[Any] = []
            for a in leaves:
                if not isinstance(a, torch.Tensor):
                    real.append(a)
                    continue
                if id(a) not in made:
                    st = a.untyped_storage()
                    flat = buffers.get(st._cdata)
                    if flat is None:
                        flat = torch.zeros(max(1, st.nbytes() // a.element_size()), dtype=a.dtype)
                        buffers[st._cdata] = flat
                    made[id(a)] = flat.as_strided(tuple(a.shape), a.stride(), a.storage_offset())
                real.append(made[id(a)])
            args, kwargs = unflatten(real, spec)
            known = {t.untyped_storage()._cdata for t in buffers.values()}
            _, scratch = measure_op(lambda: func(*args, **kwargs), known)
        return scratch
