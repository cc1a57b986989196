"""Gradient accumulation in place, as autograd's engine does it on real tensors, for the fake trace.

When a tensor feeds several ops (a residual, LoRA's base layer and adapter reading the same
input, tied weights), backward sums the gradients flowing back to it in the consumer's input
buffer: ``InputBuffer::add`` -> ``accumulate`` (``torch/csrc/autograd/input_buffer.cpp``). On
real tensors ``accumulate`` adds the new gradient INTO the buffered one
(``old_var.add_(var)``) when ``can_accumulate_inplace(old_var)``: grad mode is off, the tensor
is a plain dense one (not a tensor subclass, ZeroTensor or nested; non-overlapping and dense),
and the buffer holds the last reference to it and to its storage (never so for a view, such as
the ``t()`` a shared Linear's weight gradient comes out of ``TBackward0`` as: its view metadata
holds the base tensor, a second reference to the storage). Otherwise it computes
``old_var + var``, a new buffer. Fake tensors are tensor subclasses (they carry the Python
dispatch key), so under FakeTensorMode autograd always takes the out-of-place road and a trace
held one gradient more than the real step for the length of every such add (LoRA without
dropout on an MLP: +5 % at the peak).

:class:`InputBufferMirror` gives the trace the real engine's answer. It follows the engine's
input buffers from autograd node post hooks (which run after a node's ``apply`` and before
``InputBuffer::add`` hands its outputs on, with the same tensor objects): for each output it
knows which buffer it lands in and whether that buffer already holds a gradient, so the
``aten.add.Tensor`` that follows, under the same node, is known to be that accumulation. If
the real engine would add in place (the buffered gradient is referenced by no other buffer and
by none of the node's outputs still to be handed on; grad mode off; dense), the tracer runs
``aten.add_.Tensor`` instead and returns the buffered tensor, exactly what
``buffer[pos] = old_var.add_(var)`` leaves.

Hooks are registered when backward starts, on every node reachable from the first node that
runs an op (the loss's ``grad_fn`` in practice), and on each node's successors as it finishes;
accumulations under a node never seen (possible only upstream of that first node) stay out of
place, as before. Nodes are keyed by their sequence number (``AccumulateGrad`` by its
variable), and tensors are held only by weak reference, so the mirror never keeps anything
alive that the real step would free.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any


def _node_key(node) -> tuple[str, int]:
    variable = getattr(node, "variable", None)
    if variable is not None:  # AccumulateGrad: all share one sequence number
        return ("leaf", id(variable))
    return ("node", node._sequence_nr())


def _non_overlapping_and_dense(t) -> bool:
    """``TensorImpl::is_non_overlapping_and_dense``: the strides, sorted, are those of a contiguous tensor."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride(), strict=True) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


class _Pending:
    __slots__ = ("target", "slot", "old", "new", "later")

    def __init__(self, target, slot, old, new, later):
        self.target = target  # key of the node whose buffer receives it
        self.slot = slot  # its input number
        self.old = old  # weakref: the gradient already in the buffer
        self.new = new  # weakref: the one being added
        self.later = later  # weakrefs: outputs of the same node not handed on yet


class InputBufferMirror:
    """Follows autograd's input buffers during a traced backward; says which adds the engine does in place."""

    def __init__(self) -> None:
        import torch

        current = getattr(torch._C, "_current_autograd_node", None)  # torch >= 2.1
        self.available = current is not None and hasattr(torch.autograd.graph, "Node")
        self._current: Callable[[], Any] = current if current is not None else (lambda: None)
        self._hooked: set[tuple[str, int]] = set()
        self._buffers: dict[tuple[str, int], dict[int, Any]] = {}  # node key -> input number -> weakref
        self._window: tuple[str, int] | None = None  # the node whose outputs are being handed on
        self.pending: list[_Pending] = []
        self.started = False
        self.inplace_adds = 0

    def reset(self) -> None:
        """Forget everything (call when a backward pass starts and when it ends)."""
        self._hooked.clear()
        self._buffers.clear()
        self._window = None
        self.pending = []
        self.started = False

    # -- hooks ---------------------------------------------------------------------------
    def start(self) -> None:
        """Called for ops in backward until it returns: hook the graph from the node running now."""
        if not self.available:
            self.started = True
            return
        node = self._current()
        if node is None:
            return
        self.started = True
        self._hook_from([node])

    def _hook_from(self, nodes: list) -> None:
        stack = list(nodes)
        while stack:
            node = stack.pop()
            if node is None:
                continue
            key = _node_key(node)
            if key in self._hooked:
                continue
            self._hooked.add(key)
            if key[0] == "leaf":  # AccumulateGrad hands nothing on (and a post hook changes its refcounts)
                continue
            node.register_hook(self._post_hook)
            stack.extend(child for child, _ in node.next_functions)

    def _post_hook(self, grad_inputs, grad_outputs) -> None:
        node = self._current()
        if node is None:
            return
        key = _node_key(node)
        self._buffers.pop(key, None)  # its own input buffer was consumed when it started
        self._window = key
        self.pending = []
        edges = node.next_functions
        outputs = list(grad_inputs)
        for i, out in enumerate(outputs):
            if out is None or i >= len(edges):
                continue
            child, slot = edges[i]
            if child is None:
                continue
            target = _node_key(child)
            if target not in self._hooked:
                self._hook_from([child])
            buffers = self._buffers.setdefault(target, {})
            ref = buffers.get(slot)
            old = ref() if ref is not None else None
            if old is None:  # the first gradient for this input: stored as it is
                buffers[slot] = weakref.ref(out)
                continue
            later = [weakref.ref(t) for t in outputs[i + 1 :] if t is not None]
            self.pending.append(_Pending(target, slot, ref, weakref.ref(out), later))

    # -- dispatch --------------------------------------------------------------------------
    def match(self, args) -> _Pending | None:
        """The pending accumulation this ``aten.add.Tensor(*args)`` performs, if it is one."""
        if len(args) != 2:
            return None
        node = self._current()
        if node is None or _node_key(node) != self._window:
            self.pending = []
            return None
        old, new = args
        for item in self.pending:
            if item.old() is old and item.new() is new:
                self.pending.remove(item)
                return item
        return None

    def inplace(self, item: _Pending, old, new) -> bool:
        """Whether ``accumulate`` adds ``new`` into ``old`` in place (``can_accumulate_inplace``)."""
        import torch

        if torch.is_grad_enabled() or type(old) is torch.Tensor:  # a plain tensor: the engine decided itself
            return False
        if old.layout != torch.strided or old.is_nested or old._is_zerotensor():
            return False
        if old.shape != new.shape or old.dtype != new.dtype or old.device != new.device:
            return False
        if not _non_overlapping_and_dense(old) or old is new:
            return False
        if old._is_view():  # its view metadata keeps the base, and with it a second reference to the storage
            return False
        for ref in item.later:  # still in the node's outputs: a second reference
            if ref() is old:
                return False
        for target, buffers in self._buffers.items():  # held by another buffer: a second reference
            for slot, ref in buffers.items():
                if (target, slot) != (item.target, item.slot) and ref() is old:
                    return False
        self.inplace_adds += 1
        return True

    def delivered(self, item: _Pending, result) -> None:
        """After the add: ``result`` is what the buffer holds now."""
        self._buffers.setdefault(item.target, {})[item.slot] = weakref.ref(result)
