"""A faster road through FakeTensorMode for the ops a training step runs.

FakeTensorMode caches the output metadata of an op by the metadata of its inputs, but
building and checking that key is written in Python for every possible case (symbolic
shapes, constants, sparse tensors, ...) and costs about 150 µs per op; a first call runs
the op's meta kernel, many of them Python decompositions (batch norm: ~30 sub-ops, 15 ms).
Together that was most of a trace. The tracer only runs plain fake tensors with concrete
shapes, so :class:`FastFake` stands in front of FakeTensorMode with three shortcuts:

* **Exact cache.** Key: the op, the default dtype and, per argument, its value (numbers,
  dtypes, ...) or, for a fake tensor, ``(shape, strides, dtype, storage offset, device)``.
  The first call with a key goes through FakeTensorMode; a repeat rebuilds what it made
  (about 20 µs). Only for *functional* ops whose outputs were fresh, plain fake tensors
  (no constant, offset 0, storage exactly as large as shape and strides need), *views*
  of their first argument, and *in-place* ops that return their first argument unchanged.
* **In-place ops** (not resize/set/copy/view-changing ones) return their first argument with
  its metadata untouched: once their tensor arguments are seen to broadcast to it, nothing
  needs computing.
* **Shape rules** for the ops that dominate a first trace (batch/layer norm and their
  backward, convolution and its backward, pointwise ops, cat, mm, the common views):
  output shapes and strides from input shapes. A rule is trusted for a *class* of calls
  (op, dtypes, ranks, memory formats, non-numeric arguments) only after it agreed exactly
  with FakeTensorMode on ``_VERIFY`` calls of that class with different shapes; one
  disagreement and the class always goes to FakeTensorMode.

Anything else (a real tensor, a fake tensor holding a constant, a symbolic size, an
unknown object, a call outside this FakeTensorMode) goes to FakeTensorMode unchanged.
``tests/test_fastfake.py`` checks traces with and without it are identical;
``MEMPROF_FAST_FAKE=0`` turns it off.
"""

from __future__ import annotations

import os
from typing import Any

_NUMBER_TYPES = (int, float, bool, str, type(None))


_FUNCS: dict[Any, str | None] = {}  # func -> its kind (see FastFake._kind); None: never cached
_CACHE: dict[tuple, Any] = {}


_RETURNS: dict[Any, bool] = {}
_RULE_CLASSES: dict[tuple, Any] = {}  # rule class -> [verified count, last arg-0 shape, dtypes/devices] or False
_VERIFY = 2  # calls of a class checked against FakeTensorMode (with different shapes) before its rule is used
_NONE = ("none",)  # an output that is None (e.g. a bias gradient not asked for)


class _Skip(Exception):
    """This call cannot use the fast cache."""


def enabled() -> bool:
    return os.environ.get("MEMPROF_FAST_FAKE", "1").strip().lower() not in ("0", "false", "no", "off")


def mode(fast: FastFake | None):
    """A dispatch mode that runs every op through ``fast`` (a no-op context when it is None)."""
    import contextlib

    if fast is None:
        return contextlib.nullcontext()
    from torch.utils._python_dispatch import TorchDispatchMode

    run = fast.run

    class _FastMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return run(func, args, kwargs)

    return _FastMode()


class FastFake:
    """``run(func, args, kwargs)``: the op's result, from the cache when it can be."""

    def __init__(self, fake_mode):
        import torch
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils._mode_utils import no_dispatch

        self.mode = fake_mode
        self._active_fake = torch._C._get_dispatch_mode
        self._fake_key = torch._C._TorchDispatchModeKey.FAKE
        self._FakeTensor = FakeTensor
        self._Tensor = torch.Tensor
        self._no_dispatch = no_dispatch
        self._empty_strided = torch.empty_strided
        self._strided = torch.strided
        self._default_dtype = torch.get_default_dtype
        self._atom_types = _NUMBER_TYPES + (torch.dtype, torch.device, torch.memory_format, torch.layout)
        self._funcs = _FUNCS  # shared by every trace in the process: entries hold no fake tensor
        self._cache = _CACHE
        self._classes = _RULE_CLASSES
        self._returns = _RETURNS  # func -> whether it returns its first argument
        self._rules = _rules(torch)
        self._pointwise = getattr(torch.Tag, "pointwise", None)
        self._prim_device = torch.ops.prim.device.default
        self._meta = torch.device("meta")
        self.predicted = 0
        self.hits = 0
        self.misses = 0
        self.passed = 0

    # -- eligibility ----------------------------------------------------------------
    def _kind(self, func) -> str | None:
        """``"fresh"`` (functional), ``"inplace"`` (writes its first argument only), ``"view"``, or None."""
        import torch

        schema = getattr(func, "_schema", None)
        if schema is None or not isinstance(func, torch._ops.OpOverload):
            return None
        tags = set(getattr(func, "tags", ()))
        for tag in ("dynamic_output_shape", "data_dependent_output", "inplace_view", "nondeterministic_bitwise"):
            t = getattr(torch.Tag, tag, None)
            if t is not None and t in tags:
                return None
        if func.name().split("::")[-1].split(".")[0] in (
            "resize_",
            "resize_as_",
            "set_",
            "copy_",
            "lift_fresh",
            "_local_scalar_dense",
            "_to_copy",
            "to",
            "lift",
        ):
            return None  # metadata or device changes, or values read
        if func.name() == "aten::_unsafe_view":
            return "view"  # no alias annotation, but it returns a view of its input's storage
        args, rets = schema.arguments, schema.returns
        if any(a.is_out for a in args):
            return None
        types = [str(r.type) for r in rets]
        if any(t not in ("Tensor", "List[Tensor]", "Tensor[]", "Optional[Tensor]", "Tensor?") for t in types):
            return None
        written = [i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]
        aliased = [i for i, a in enumerate(args) if a.alias_info is not None]
        if getattr(func, "is_view", False):
            if aliased != [0] or written or len(rets) != 1 or rets[0].alias_info is None:
                return None
            return "view"
        if written:
            if written != [0] or aliased != [0]:
                return None
            if len(rets) > 1 or (rets and rets[0].alias_info is None):
                return None
            _RETURNS[func] = bool(rets)
            return "inplace"
        if aliased or not rets or any(r.alias_info is not None for r in rets):
            return None
        return "fresh"

    # -- keys -------------------------------------------------------------------------
    def _key(self, value) -> Any:
        kind = type(value)
        if kind is self._FakeTensor:
            if value.constant is not None or value.layout is not self._strided:
                raise _Skip
            return (value.shape, value.stride(), value.dtype, value.storage_offset(), value.fake_device)
        if kind in self._atom_types:
            return (kind, value)
        if kind is list or kind is tuple:
            return (kind, tuple(self._key(v) for v in value))
        raise _Skip

    # -- cache entries ------------------------------------------------------------------
    def _plain(self, t) -> bool:
        return (
            type(t) is self._FakeTensor
            and t.constant is None
            and t.layout is self._strided
            and not t.requires_grad
            and not t.is_conj()
            and not t.is_neg()
        )

    def _spec(self, kind: str, out, args, kwargs, before):
        """How to rebuild ``out`` on a repeat, or None when this call must always go through FakeTensorMode."""
        if kind == "inplace":
            first = args[0] if args else None
            if not isinstance(first, (self._Tensor, list)) or self._key(first) != before:
                return None  # the op changed its argument's metadata
            if out is None:
                return ("none",)
            if out is first:
                return ("self",)
            return None
        if kind == "view":
            base = args[0] if args else None
            if not self._plain(out) or not isinstance(base, self._Tensor):
                return None
            if out.untyped_storage()._cdata != base.untyped_storage()._cdata:
                return None
            return ("view", tuple(out.shape), out.stride(), out.storage_offset(), out.dtype, out.fake_device)
        inputs = self._inputs(args, kwargs)
        seen: set[int] = set()

        def one(t):
            if t is None:
                return _NONE
            if not self._plain(t) or t.storage_offset() != 0:
                return None
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs or key in seen:
                return None
            seen.add(key)
            shape, stride = tuple(t.shape), t.stride()
            need = 0
            if all(n > 0 for n in shape):
                need = (1 + sum((n - 1) * m for n, m in zip(shape, stride, strict=False))) * t.element_size()
            if st.nbytes() != need:
                return None
            return (shape, stride, t.dtype, t.fake_device)

        if isinstance(out, self._Tensor):
            spec = one(out)
            return None if spec is None or spec is _NONE else ("fresh", None, spec)
        if type(out) in (list, tuple):
            specs = tuple(one(t) for t in out)
            if any(s is None for s in specs):
                return None
            return ("fresh", type(out), specs)
        return None

    def _inputs(self, args, kwargs) -> set[int]:
        tensors = _tensors(args) + (_tensors(kwargs.values()) if kwargs else [])
        return {t.untyped_storage()._cdata for t in tensors}

    def _build(self, entry, args):
        kind = entry[0]
        if kind == "self":
            return args[0]
        if kind == "none":
            return None
        FakeTensor, mode, empty = self._FakeTensor, self.mode, self._empty_strided
        if kind == "view":
            _, shape, stride, offset, dtype, device = entry
            storage = args[0].untyped_storage()
            with self._no_dispatch():
                elem = empty((0,), (1,), dtype=dtype, device="meta")
                elem.set_(storage, offset, shape, stride)
            return FakeTensor(mode, elem, device)
        _, container, specs = entry
        if container is None:  # a single tensor
            specs = (specs,)
        with self._no_dispatch():
            elems = [None if s is _NONE else empty(s[0], s[1], dtype=s[2], device="meta") for s in specs]
        outs = [None if e is None else FakeTensor(mode, e, s[3]) for e, s in zip(elems, specs, strict=False)]
        return outs[0] if container is None else container(outs)

    # -- the call -----------------------------------------------------------------------
    def _pass(self, func, args, kwargs):
        """Let FakeTensorMode (or whatever is below) run the call."""
        self.passed += 1
        return func(*args, **(kwargs or {}))

    def run(self, func, args, kwargs):
        if func is self._prim_device and len(args) == 1 and type(args[0]) is self._FakeTensor:
            # the autograd engine asks every tensor's device; FakeTensorMode's own answer, without its dispatch
            return self._meta if args[0].fake_mode.in_kernel_invocation else args[0].fake_device
        if self._active_fake(self._fake_key) is not self.mode:
            # outside FakeTensorMode (a constructor that reads values is being built on real tensors):
            # the same call makes real tensors there
            return self._pass(func, args, kwargs)
        try:
            kind = self._funcs[func]
        except KeyError:
            try:
                kind = self._kind(func)
            except Exception:
                kind = None
            self._funcs[func] = kind
        if kind is None:
            return self._pass(func, args, kwargs)
        try:
            key = (
                func,
                self._key(args),
                self._key(tuple(kwargs.items())) if kwargs else None,
                self._default_dtype(),
            )  # factories and Python floats follow it
            entry = self._cache.get(key)
        except (_Skip, TypeError):  # TypeError: an unhashable argument
            return self._pass(func, args, kwargs)
        if entry is not None:
            if entry is False:
                return self._pass(func, args, kwargs)
            self.hits += 1
            return self._build(entry, args)
        if kind == "inplace" and _inplace_ok(args, kwargs, self._FakeTensor):
            # an in-place op that is not a view/resize op returns its first argument (or nothing) with
            # the same metadata: nothing to compute once its arguments are known to broadcast
            self.predicted += 1
            return args[0] if self._returns[func] else None
        rule = self._rule(func, kind)
        sketch = cls = None
        if rule is not None:
            try:
                sketch = rule(args, kwargs)
                if sketch is not None:
                    cls = (
                        func,
                        self._class_key(args),
                        self._class_key(tuple(kwargs.items())) if kwargs else None,
                        key[3],
                    )
            except (_Skip, TypeError, IndexError, ValueError, AttributeError):
                sketch = cls = None
            state = self._classes.get(cls) if cls is not None else None
            if state and state[0] >= _VERIFY:
                self.predicted += 1
                entry = _entry(kind, sketch, state)
                self._cache[key] = entry
                return self._build(entry, args)
        before = key[1][1][0] if kind == "inplace" and key[1][1] else None
        out = func(*args, **(kwargs or {}))
        self.misses += 1
        try:
            spec = self._spec(kind, out, args, kwargs, before)
        except Exception:
            spec = None
        self._cache[key] = spec if spec is not None else False
        if cls is not None and self._classes.get(cls) is not False:
            self._learn(cls, kind, sketch, spec, args)
        return out

    # -- rules: output shapes from input shapes, checked against FakeTensorMode ------------
    def _rule(self, func, kind):
        rule = self._rules.get((func.overloadpacket.__name__, kind))
        if rule is None and kind == "fresh" and self._pointwise is not None and self._pointwise in func.tags:
            rule = _pointwise_rule
        return rule

    def _class_key(self, value) -> Any:
        """Like :meth:`_key` with each fake tensor reduced to what a rule's verdict may depend on."""
        kind = type(value)
        if kind is self._FakeTensor:
            if value.constant is not None or value.layout is not self._strided:
                raise _Skip
            return (value.dtype, value.dim(), value.fake_device, _dense_format(value))
        if kind is int or kind is float:
            return kind  # sizes, offsets, scale factors: the rule reads them; the verdict cannot depend on them
        if kind in self._atom_types:
            return (kind, value)
        if kind is list or kind is tuple:
            keys = tuple(self._class_key(v) for v in value)
            if len(keys) > 2 and value and type(value[0]) is self._FakeTensor:
                return (kind, keys[0], frozenset(keys))  # a list of tensors (cat): its length is not the class
            return (kind, keys)
        raise _Skip

    def _learn(self, cls, kind, sketch, spec, args) -> None:
        """Check a rule's sketch against what FakeTensorMode made; trust the class after ``_VERIFY`` checks."""
        state = self._classes.get(cls)
        types: tuple | None = None
        container = None
        ok = spec is not None and spec[0] == kind
        if ok and kind == "view":
            ok = (tuple(sketch[0]), tuple(sketch[1]), sketch[2]) == (spec[1], tuple(spec[2]), spec[3])
            types = (spec[4], spec[5])
        elif ok:
            container, specs = spec[1], (spec[2],) if spec[1] is None else spec[2]
            ok = len(specs) == len(sketch) and all(
                (s is _NONE) == (sh is None) and (sh is None or (tuple(sh[0]) == s[0] and tuple(sh[1]) == tuple(s[1])))
                for s, sh in zip(specs, sketch, strict=False)
            )
            types = tuple((None, None) if s is _NONE else (s[2], s[3]) for s in specs)
        if ok:
            shape0 = _shape_of(args[0]) if args else None
            if state is None:
                self._classes[cls] = [1, shape0, types, container]
                return
            if state[2] == types and state[3] == container:
                if shape0 != state[1]:
                    state[0] += 1
                    state[1] = shape0
                return
        self._classes[cls] = False  # the rule does not hold for this class: always ask FakeTensorMode


# =========================================================================== rules
def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _dense_format(t) -> str:
    import torch

    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return "other"


def _dim(dim, n: int) -> int:
    """``dim`` wrapped into ``range(n)`` as PyTorch does, or _Skip when PyTorch would raise."""
    if type(dim) is not int or n <= 0 or not -n <= dim < n:
        raise IndexError(f"dimension {dim} out of range for {n} dimensions")
    return dim % n


def _shape_of(value):
    """What tells two calls of a rule class apart: the first argument's shape (each shape, for a list)."""
    if type(value) in (list, tuple):
        return tuple(tuple(t.shape) if hasattr(t, "shape") else None for t in value)
    return tuple(value.shape) if hasattr(value, "shape") else None


def _tensors(args) -> list:
    import torch

    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif type(a) in (list, tuple):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _pointwise_rule(args, kwargs):
    """Pointwise op on tensors of one shape and strides, dense: the output has that shape and those strides."""
    if kwargs and kwargs.get("memory_format") is not None:
        # clone(x, memory_format=...): the layout asked for, not the inputs', decides the strides (and a
        # class of calls cannot tell a permuted dense input from an expanded one)
        return None
    tensors = _tensors(args) + (_tensors(kwargs.values()) if kwargs else [])
    if not tensors or type(args[0]) is list:
        return None
    if len(tensors) > 1:
        tensors = [t for t in tensors if t.dim()] or tensors[:1]  # 0-dim tensors broadcast like numbers
    first = tensors[0]
    shape, _stride = tuple(first.shape), first.stride()
    for t in tensors[1:]:
        if tuple(t.shape) != shape:
            return None
    from torch._prims_common import compute_elementwise_output_strides

    return ((shape, tuple(compute_elementwise_output_strides(*tensors))),)


def _batch_norm_rule(args, kwargs):
    """native_batch_norm (training): output like the input; saved mean and inverse std of size C."""
    if kwargs or len(args) < 6 or args[5] is not True:
        return None
    x = args[0]
    if _dense_format(x) == "other" or x.dim() < 2:
        return None
    c = x.shape[1]
    return ((tuple(x.shape), x.stride()), ((c,), (1,)), ((c,), (1,)))


def _batch_norm_backward_rule(args, kwargs):
    """native_batch_norm_backward (training): grad_input like the input; weight/bias gradients of size C."""
    if kwargs or len(args) < 10 or args[7] is not True:
        return None
    grad, x, mask = args[0], args[1], args[9]
    if _dense_format(x) == "other" or tuple(grad.shape) != tuple(x.shape) or grad.stride() != x.stride():
        return None
    c = x.shape[1]
    vec = ((c,), (1,))
    return ((tuple(x.shape), x.stride()) if mask[0] else None, vec if mask[1] else None, vec if mask[2] else None)


def _slice_rule(args, kwargs):
    """slice(self, dim, start, end, step): a view, Python's slice semantics on one dimension."""
    if kwargs or not args:
        return None
    x = args[0]
    dim = args[1] if len(args) > 1 else 0
    start = args[2] if len(args) > 2 else None
    end = args[3] if len(args) > 3 else None
    step = args[4] if len(args) > 4 else 1
    if type(dim) is not int or type(step) is not int or step < 1 or x.dim() == 0:
        return None
    if start is not None and type(start) is not int or end is not None and type(end) is not int:
        return None
    shape, stride = list(x.shape), list(x.stride())
    dim = _dim(dim, len(shape))
    lo, hi, _ = slice(start, end, step).indices(shape[dim])
    n = max(0, (hi - lo + step - 1) // step)
    offset = x.storage_offset() + lo * stride[dim]
    shape[dim] = n
    stride[dim] = stride[dim] * step
    return (tuple(shape), tuple(stride), offset)


def _view_rule(args, kwargs):
    """view / _unsafe_view of a contiguous tensor: the new shape, contiguous strides."""
    if kwargs or len(args) != 2 or not args[0].is_contiguous():
        return None
    x, size = args
    size = list(size)
    if size.count(-1) > 1:
        return None
    if -1 in size:
        known = 1
        for n in size:
            if n != -1:
                known *= n
        if known == 0:
            return None
        size[size.index(-1)] = x.numel() // known
    total = 1
    for n in size:
        total *= n
    if total != x.numel():
        return None
    return (tuple(size), _contiguous_strides(size), x.storage_offset())


def _same_view_rule(args, kwargs):
    """detach / alias: the same shape, strides and offset."""
    x = args[0]
    return (tuple(x.shape), x.stride(), x.storage_offset())


def _t_rule(args, kwargs):
    x = args[0]
    if kwargs or x.dim() > 2:
        return None
    return (tuple(reversed(x.shape)), tuple(reversed(x.stride())), x.storage_offset())


def _transpose_rule(args, kwargs):
    if kwargs or len(args) != 3:
        return None
    x, a, b = args
    shape, stride = list(x.shape), list(x.stride())
    a, b = _dim(a, len(shape)), _dim(b, len(shape))
    shape[a], shape[b] = shape[b], shape[a]
    stride[a], stride[b] = stride[b], stride[a]
    return (tuple(shape), tuple(stride), x.storage_offset())


def _permute_rule(args, kwargs):
    if kwargs or len(args) != 2:
        return None
    x, dims = args
    n = x.dim()
    dims = [_dim(d, n) for d in dims]
    if sorted(dims) != list(range(n)):
        return None
    return (tuple(x.shape[d] for d in dims), tuple(x.stride()[d] for d in dims), x.storage_offset())


def _unsqueeze_rule(args, kwargs):
    if kwargs or len(args) != 2:
        return None
    x, dim = args
    shape, stride = list(x.shape), list(x.stride())
    dim = _dim(dim, len(shape) + 1)
    new_stride = 1 if dim >= len(shape) else shape[dim] * stride[dim]
    shape.insert(dim, 1)
    stride.insert(dim, new_stride)
    return (tuple(shape), tuple(stride), x.storage_offset())


def _expand_rule(args, kwargs):
    """expand: ATen's inferExpandGeometry."""
    if kwargs or len(args) not in (2, 3):
        return None
    x, size = args[0], list(args[1])
    n, have = len(size), x.dim()
    if n < have or have == 0:
        return None
    shape, stride = [0] * n, [0] * n
    for i in range(n - 1, -1, -1):
        d = have - (n - i)
        if d >= 0:
            cur, st = x.shape[d], x.stride()[d]
        else:
            cur, st = 1, shape[i + 1] * stride[i + 1] if i + 1 < n else 1
        want = size[i]
        if want == -1:
            if d < 0:
                return None
            want = cur
        if cur != want:
            if cur != 1 or want < 0:
                return None
            cur, st = want, 0
        shape[i], stride[i] = cur, st
    return (tuple(shape), tuple(stride), x.storage_offset())


def _as_strided_rule(args, kwargs):
    if kwargs or len(args) not in (3, 4):
        return None
    x, size, stride = args[0], args[1], args[2]
    offset = args[3] if len(args) == 4 and args[3] is not None else x.storage_offset()
    return (tuple(size), tuple(stride), offset)


def _select_rule(args, kwargs):
    if kwargs or len(args) != 3:
        return None
    x, dim, index = args
    shape, stride = list(x.shape), list(x.stride())
    dim = _dim(dim, len(shape))
    if type(index) is not int or not -shape[dim] <= index < shape[dim]:
        return None
    index %= shape[dim]
    offset = x.storage_offset() + index * stride[dim]
    del shape[dim], stride[dim]
    return (tuple(shape), tuple(stride), offset)


def _layer_norm_rule(args, kwargs):
    """native_layer_norm: output of the input's shape, contiguous; mean and rstd over the leading dims."""
    if kwargs or len(args) != 5:
        return None
    x, normalized = args[0], list(args[1])
    axis = x.dim() - len(normalized)
    if axis < 0 or list(x.shape[axis:]) != normalized:
        return None
    stats = tuple(x.shape[:axis]) + (1,) * len(normalized)
    return (
        (tuple(x.shape), _contiguous_strides(x.shape)),
        (stats, _contiguous_strides(stats)),
        (stats, _contiguous_strides(stats)),
    )


def _layer_norm_backward_rule(args, kwargs):
    if kwargs or len(args) != 8:
        return None
    grad, x, weight, bias, mask = args[0], args[1], args[5], args[6], args[7]
    if tuple(grad.shape) != tuple(x.shape):
        return None
    out = [(tuple(x.shape), _contiguous_strides(x.shape)) if mask[0] else None]
    for t, m in ((weight, mask[1]), (bias, mask[2])):
        out.append((tuple(t.shape), _contiguous_strides(t.shape)) if m and t is not None else None)
    return tuple(out)


def _mm_rule(args, kwargs):
    """mm / addmm / bmm: a contiguous product."""
    a, b = (args[1], args[2]) if len(args) >= 3 else (args[0], args[1])
    shape: tuple
    if a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0]:
        shape = (a.shape[0], b.shape[1])
    elif a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0] and a.shape[2] == b.shape[1]:
        shape = (a.shape[0], a.shape[1], b.shape[2])
    else:
        return None
    return ((shape, _contiguous_strides(shape)),)


def _conv_rule(args, kwargs):
    """convolution (not transposed): the standard output size; strides checked against FakeTensorMode's."""
    if kwargs or len(args) != 9:
        return None
    x, w, _, stride, padding, dilation, transposed, _, groups = args
    if transposed or x.dim() < 3 or w.dim() != x.dim():
        return None
    spatial = []
    for i, n in enumerate(x.shape[2:]):
        k = w.shape[2 + i]
        s_, p_, d_ = (v[i] if len(v) > 1 else v[0] for v in (stride, padding, dilation))
        out = (n + 2 * p_ - d_ * (k - 1) - 1) // s_ + 1
        if out <= 0:
            return None
        spatial.append(out)
    shape = (x.shape[0], w.shape[0], *spatial)
    return ((shape, _format_strides(shape, x, w)),)


def _conv_backward_rule(args, kwargs):
    """convolution_backward: gradients of the input's and the weight's shapes, bias gradient of size C_out."""
    if kwargs or len(args) != 11:
        return None
    _grad, x, w, mask = args[0], args[1], args[2], args[10]
    if args[7]:  # transposed
        return None
    return (
        (tuple(x.shape), _format_strides(tuple(x.shape), x, w)) if mask[0] else None,
        (tuple(w.shape), _format_strides(tuple(w.shape), x, w)) if mask[1] else None,
        ((w.shape[0],), (1,)) if mask[2] else None,
    )


def _format_strides(shape, *tensors) -> tuple:
    """Contiguous strides, or channels-last ones when an input is channels-last (the class check confirms which)."""
    if len(shape) == 4 and any(_dense_format(t) == "channels_last" and not t.is_contiguous() for t in tensors):
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    return _contiguous_strides(shape)


def _cat_rule(args, kwargs):
    """cat of contiguous tensors: the sizes add up along ``dim``; contiguous result."""
    if kwargs or not args or type(args[0]) not in (list, tuple) or not args[0]:
        return None
    tensors = args[0]
    dim = args[1] if len(args) > 1 else 0
    first = tensors[0]
    if first.dim() == 0 or any(not t.is_contiguous() or t.dim() != first.dim() for t in tensors):
        return None
    dim = _dim(dim, first.dim())
    shape = list(first.shape)
    for t in tensors[1:]:
        if any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape, strict=False)) if i != dim):
            return None
        shape[dim] += t.shape[dim]
    return ((tuple(shape), _contiguous_strides(shape)),)


def _entry(kind: str, sketch, state) -> tuple:
    """The cache entry for a verified rule's sketch."""
    if kind == "view":
        dtype, device = state[2]
        return ("view", tuple(sketch[0]), tuple(sketch[1]), sketch[2], dtype, device)
    specs = tuple(
        _NONE if sh is None else (tuple(sh[0]), tuple(sh[1]), dt, dev)
        for sh, (dt, dev) in zip(sketch, state[2], strict=False)
    )
    if state[3] is None:
        return ("fresh", None, specs[0])
    return ("fresh", state[3], specs)


def _broadcasts_to(shape, target) -> bool:
    if len(shape) > len(target):
        return False
    return all(a == b or a == 1 for a, b in zip(reversed(shape), reversed(target), strict=False))


def _fits_into(other, target) -> bool:
    """``target.op_(other)`` is legal for PyTorch: ``other`` broadcasts to it, on its device (or a CPU scalar),
    and the promoted dtype casts back to ``target``'s."""
    import torch

    if not _broadcasts_to(tuple(other.shape), tuple(target.shape)):
        return False
    if other.fake_device != target.fake_device and not (other.dim() == 0 and other.fake_device.type == "cpu"):
        return False
    if other.dtype is not target.dtype and not torch.can_cast(
        torch.promote_types(other.dtype, target.dtype), target.dtype
    ):
        return False
    return True


def _inplace_ok(args, kwargs, fake_type) -> bool:
    """Every tensor argument of an in-place op is a plain fake tensor PyTorch would accept for the one written
    (see :func:`_fits_into`); scalar lists of a foreach op are as long as its tensor list."""
    if not args:
        return False
    first = args[0]
    rest = list(args[1:]) + (list(kwargs.values()) if kwargs else [])
    if type(first) is fake_type:
        for a in rest:
            if type(a) is fake_type:
                if not _fits_into(a, first):
                    return False
            elif type(a) in (list, tuple) or (hasattr(a, "shape") and not isinstance(a, (int, float, bool))):
                return False
        return True
    if type(first) is list and first and all(type(t) is fake_type for t in first):
        for a in rest:
            if type(a) in (list, tuple):
                if len(a) != len(first):
                    return False
                if a and type(a[0]) is fake_type:
                    if any(type(t) is not fake_type or not _fits_into(t, g) for t, g in zip(a, first, strict=False)):
                        return False
                elif any(type(v) not in (int, float, bool) for v in a):
                    return False
            elif type(a) is fake_type:
                if a.dim() != 0 or any(not _fits_into(a, g) for g in first):
                    return False
            elif hasattr(a, "shape"):
                return False
        return True
    return False


def _rules(torch) -> dict:
    return {
        ("native_batch_norm", "fresh"): _batch_norm_rule,
        ("native_batch_norm_backward", "fresh"): _batch_norm_backward_rule,
        ("slice", "view"): _slice_rule,
        ("view", "view"): _view_rule,
        ("_unsafe_view", "view"): _view_rule,
        ("detach", "view"): _same_view_rule,
        ("alias", "view"): _same_view_rule,
        ("t", "view"): _t_rule,
        ("transpose", "view"): _transpose_rule,
        ("permute", "view"): _permute_rule,
        ("unsqueeze", "view"): _unsqueeze_rule,
        ("expand", "view"): _expand_rule,
        ("as_strided", "view"): _as_strided_rule,
        ("select", "view"): _select_rule,
        ("native_layer_norm", "fresh"): _layer_norm_rule,
        ("native_layer_norm_backward", "fresh"): _layer_norm_backward_rule,
        ("convolution", "fresh"): _conv_rule,
        ("convolution_backward", "fresh"): _conv_backward_rule,
        ("cat", "fresh"): _cat_rule,
        ("mm", "fresh"): _mm_rule,
        ("addmm", "fresh"): _mm_rule,
        ("bmm", "fresh"): _mm_rule,
    }
