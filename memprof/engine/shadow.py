"""Known values for the small integer tensors of a trace ("shadows").

A fake tensor has a shape but no values, so a model that decides something from a value fails
under the tracer, or takes another path than a real run would. The values that steer a
training or generation step are nearly always small integer or boolean tensors built from the
inputs: attention masks, positions, cache positions, "which sequences are finished", the routing
of a mixture-of-experts layer. memprof knows those values, because it made the inputs.

:class:`Shadows` stands in front of the tracer's op runner. A fake integer/boolean tensor with at
most :data:`LIMIT` elements made by an op whose tensor inputs all have known values (a factory
such as ``torch.ones`` or ``torch.arange`` has none) gets a *shadow*: the same op run on real
CPU tensors. Then:

* ``.item()``/``bool()`` of such a tensor returns the shadow's value instead of failing;
* ops FakeTensorMode cannot size (``nonzero``, ``masked_select``, ...) get their size from the
  shadow, and fake outputs of that size (tracked like any other allocation);
* an op that writes to a tensor from unknown values (a float result, an unshadowed input)
  forgets the shadows of its storage, so a value is never read stale: reading an unknown value
  still fails as before.

Shadows live outside the tracked memory (real, small, never counted). Floating tensors are
never shadowed: their values come from weights the trace does not have.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from typing import Any

#: the largest integer/boolean tensor (elements) memprof keeps real values for
LIMIT = 1 << 21

_ACTIVE: contextvars.ContextVar[Shadows | None] = contextvars.ContextVar("memprof_shadows", default=None)


def known(tensor: Any) -> bool:
    """Whether the trace running now knows ``tensor``'s values."""
    shadows = _ACTIVE.get()
    return shadows is not None and shadows.value(tensor) is not None


class Shadows:
    """``run(func, args, kwargs)``: the fake result from ``inner``, with real values kept beside small integer ones."""

    def __init__(self, inner: Callable[[Any, tuple, dict | None], Any] | None = None):
        import torch
        from torch.utils._pytree import tree_leaves

        self.inner = inner or (lambda func, args, kwargs: func(*args, **(kwargs or {})))
        self._values: dict[int, tuple[weakref.ref, Any]] = {}
        self._by_storage: dict[int, set[int]] = {}
        self._tree_leaves = tree_leaves
        self._Tensor = torch.Tensor
        self._local_scalar = torch.ops.aten._local_scalar_dense.default
        self._writes: dict[Any, tuple[int, ...] | None] = {}
        self._exact = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
        aten = torch.ops.aten
        self._no_value = {
            getattr(aten, n).default
            for n in ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")
            if hasattr(getattr(aten, n), "default")
        }
        self._no_value.add(aten.empty.memory_format)
        self.real_ops = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[Shadows]:
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    # -- bookkeeping ------------------------------------------------------------------------------
    def value(self, t: Any) -> Any:
        """The real values of ``t``: its shadow, or ``t`` itself when it is a real tensor (a lifted constant)."""
        entry = self._values.get(id(t))
        if entry is None or entry[0]() is not t:
            if type(t) is self._Tensor and t.device.type == "cpu":
                return t
            return None
        return entry[1]

    def _attach(self, fake: Any, real: Any) -> None:
        if not isinstance(fake, self._Tensor) or not isinstance(real, self._Tensor):
            return
        if real.dtype not in self._exact or real.numel() > LIMIT or tuple(real.shape) != tuple(fake.shape):
            return
        key = id(fake)
        storage = fake.untyped_storage()._cdata
        values, by_storage = self._values, self._by_storage

        def gone(_ref: Any, key: int = key, storage: int = storage) -> None:
            values.pop(key, None)
            ids = by_storage.get(storage)
            if ids is not None:
                ids.discard(key)
                if not ids:
                    by_storage.pop(storage, None)

        values[key] = (weakref.ref(fake, gone), real)
        by_storage.setdefault(storage, set()).add(key)

    def _forget_storage(self, t: Any) -> None:
        storage = t.untyped_storage()._cdata
        for key in self._by_storage.pop(storage, set()):
            self._values.pop(key, None)

    def _written(self, func: Any) -> tuple[int, ...] | None:
        """Positions of the arguments ``func`` writes to (None: none)."""
        if func not in self._writes:
            schema = getattr(func, "_schema", None)
            pos: tuple[int, ...] = ()
            if schema is not None:
                pos = tuple(
                    i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write
                )
            self._writes[func] = pos or None
        return self._writes[func]

    def _forget_writes(self, func: Any, args: tuple, kwargs: dict | None) -> None:
        written = self._written(func)
        if not written or not self._values:
            return
        schema = func._schema
        for i in written:
            name = schema.arguments[i].name
            target = args[i] if i < len(args) else (kwargs or {}).get(name)
            for t in self._tree_leaves(target):
                if isinstance(t, self._Tensor):
                    self._forget_storage(t)

    def _real(self, x: Any) -> Any:
        if isinstance(x, self._Tensor):
            return self.value(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self._real(v) for v in x)
        if isinstance(x, dict):
            return {k: self._real(v) for k, v in x.items()}
        return x

    def _fake_like(self, real: Any) -> Any:
        import torch

        if isinstance(real, torch.Tensor):
            return self.inner(
                torch.ops.aten.empty_strided.default,
                (tuple(real.shape), real.stride()),
                {"dtype": real.dtype, "device": torch.device("cpu")},
            )
        if isinstance(real, (list, tuple)):
            return type(real)(self._fake_like(v) for v in real)
        return real

    def _known_inputs(self, args: tuple, kwargs: dict | None) -> bool:
        """Whether every tensor argument has known values (aten arguments are flat: tensors or lists of them)."""
        T, value = self._Tensor, self.value
        for group in (args, kwargs.values() if kwargs else ()):
            for a in group:
                if isinstance(a, T):
                    if value(a) is None:
                        return False
                elif type(a) in (list, tuple):
                    for b in a:
                        if isinstance(b, T) and value(b) is None:
                            return False
        return True

    # -- the op ------------------------------------------------------------------------------------
    def run(self, func: Any, args: tuple, kwargs: dict | None) -> Any:
        if func is self._local_scalar:
            real = self.value(args[0]) if args else None
            if real is None:
                return self.inner(func, args, kwargs)
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return real.item()
        known_inputs = self._known_inputs(args, kwargs)
        if not known_inputs or func in self._no_value:
            out = self.inner(func, args, kwargs)
            self._forget_writes(func, args, kwargs)
            return out
        failure: BaseException | None = None
        try:
            out = self.inner(func, args, kwargs)
        except Exception as exc:  # FakeTensorMode cannot size or read it: the real values can
            if not _value_question(exc):
                raise
            # without its traceback: frames -> this frame -> the exception is a cycle, and the tracer runs
            # with the garbage collector off, so the tensors those frames hold would never be freed
            failure, out = exc.with_traceback(None), None
        leaves = [x for x in self._tree_leaves(out)] if failure is None else []
        wants = failure is not None or any(
            isinstance(x, self._Tensor) and x.dtype in self._exact and x.numel() <= LIMIT for x in leaves
        )
        if not wants:
            self._forget_writes(func, args, kwargs)
            return out
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        real_args, real_kwargs = self._real(args), self._real(kwargs or {})
        try:
            with unset_fake_temporarily():
                real_out = func(*real_args, **real_kwargs)
        except Exception:
            if failure is not None:
                raise failure from None
            self._forget_writes(func, args, kwargs)
            return out
        self.real_ops += 1
        if failure is not None:
            out = self._fake_like(real_out)
        fakes = self._tree_leaves(out)
        reals = self._tree_leaves(real_out)
        if len(fakes) == len(reals):
            for fake, real in zip(fakes, reals, strict=True):
                self._attach(fake, real)
        return out


def _value_question(exc: BaseException) -> bool:
    name = type(exc).__name__
    return any(k in name for k in ("DataDependent", "DynamicOutputShape", "Unsupported")) or "item()" in str(exc)
