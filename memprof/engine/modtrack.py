"""Which ``nn.Module`` is running: one tracker for the tracer, the analytic estimate and the profiler.

Forward: module pre- and post-hooks keep a stack of :class:`ModuleFrame` (the innermost call on top).
Backward: every autograd node keeps the sequence number it got when the forward created it; at each
module entry and exit the tracker notes the thread's sequence counter and the innermost module, so the
node autograd is executing maps back to the innermost module whose forward created it. Nodes made
outside any forward (AccumulateGrad, the loss computed after the model) map to no module.

Hooks go on the modules of one model (``ModuleTracker().attach(model)``: names are the qualified names,
as in ``state_dict``, the root is ``root_name``) or, with no model, on every module that runs (global
hooks, for a script whose models are not known in advance: ``Root.qualified.name``; a module met
inside another but not in its tree is ``parent.<Type>``).

Why not PyTorch's ``torch.distributed._tools.mod_tracker.ModTracker`` or
``torch.utils.module_tracker.ModuleTracker`` (both read in torch 2.14, ModTracker exists from 2.4 on):
they keep ``parents``, a *set* of names, so the innermost module is not known; in backward they
mark a module from the gradient of its outputs to the gradient of its inputs (multi-grad hooks
registered on every module call), which attributes AccumulateGrad and everything autograd runs
meanwhile to the modules then open, where the sequence numbers name the module that created each
node. ModTracker also lives in ``torch.distributed``, which some builds leave out. Using them would
change the traced per-module attribution, so memprof keeps this small tracker.
"""

from __future__ import annotations

import bisect
import sys
import weakref
from collections.abc import Callable
from typing import Any

#: autograd gives nodes made outside the sequence (AccumulateGrad) UINT64_MAX
_NO_SEQUENCE = 1 << 62


class ModuleFrame:
    """One module call in progress: the module, its name, and what the tracker's user keeps for it."""

    __slots__ = ("module", "name", "data")

    def __init__(self, module: Any, name: str, data: Any = None):
        self.module = module
        self.name = name
        self.data = data


class ModuleTracker:
    """The forward stack of module calls, and the module behind each autograd node in backward.

    ``on_enter(module, name, args, kwargs)`` runs before a call is pushed (``stack[-1]`` is its caller)
    and returns the frame's ``data``; ``on_exit(frame, output)`` runs after it is popped. ``backward=False``
    skips the sequence bookkeeping (a forward-only run). ``failed`` is the innermost frame whose forward
    raised (for error messages), reset at every module entry.

    Example::

        with ModuleTracker().attach(model) as modules:
            loss = model(x).sum()      # during forward: modules.current() -> "layer1.0.conv1"
            loss.backward()            # during backward: the module that made the running node
    """

    def __init__(
        self,
        on_enter: Callable[[Any, str, tuple, dict], Any] | None = None,
        on_exit: Callable[[ModuleFrame, Any], None] | None = None,
        backward: bool = True,
    ):
        import torch

        self.on_enter = on_enter
        self.on_exit = on_exit
        self.backward = backward
        self.stack: list[ModuleFrame] = []
        self.failed: ModuleFrame | None = None
        self._marks: list[int] = []  # sequence counter at each change of the innermost module ...
        self._mark_names: list[str | None] = []  # ... and that module (None: outside any forward)
        self._seq_nr = torch._C._autograd._get_sequence_nr
        self._current_node = torch._C._current_autograd_node
        self._handles: list[Any] = []
        self._names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # global hooks: module -> name
        self._unhooked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attach(fast_paths): module -> name

    # -- queries ------------------------------------------------------------------------------------
    def current(self) -> str | None:
        """The innermost module in forward; otherwise, in backward, the module that made the running node."""
        if self.stack:
            return self.stack[-1].name
        return self.backward_module()

    def backward_module(self) -> str | None:
        """The innermost module whose forward created the autograd node running now (None outside backward)."""
        node = self._current_node()
        if node is None:
            return None
        seq = node._sequence_nr()
        i = bisect.bisect_right(self._marks, seq) - 1
        if i < 0 or seq >= _NO_SEQUENCE:
            return None
        return self._mark_names[i]

    def clear(self) -> None:
        """Forget the calls in progress (between training phases; after a forward that raised)."""
        self.stack.clear()

    # -- install ------------------------------------------------------------------------------------
    def attach(self, model: Any = None, root_name: str | None = None, fast_paths: bool = False) -> ModuleTracker:
        """Hook ``model``'s modules (each once, named by its first qualified name; the root ``root_name``,
        by default its class name), or with no model every module that runs (global hooks).

        With ``fast_paths``, modules whose forward looks for hooks and leaves its fused kernels when it
        finds any (``nn.TransformerEncoderLayer``'s inference fast path, and everything inside it) get
        none: global hooks follow them instead, so the model runs the kernels it runs unwatched.
        """
        from torch.nn.modules import module as nn_module

        if model is None:
            self._handles.append(nn_module.register_module_forward_pre_hook(self._global_pre))
            self._handles.append(_always(nn_module.register_module_forward_hook, self._global_post))
            return self
        root = root_name or type(model).__name__
        unhooked = _reads_hooks(model) if fast_paths else set()
        if unhooked:
            self._handles.append(nn_module.register_module_forward_pre_hook(self._unhooked_pre))
            self._handles.append(_always(nn_module.register_module_forward_hook, self._unhooked_post))
        for qual, module in model.named_modules():  # each module once: the first name it is reached by
            if id(module) in unhooked:
                self._unhooked[module] = qual or root
                continue

            def pre(mod, args, kwargs, _name=qual or root):
                self._enter(mod, _name, args, kwargs)

            def post(mod, args, kwargs, output):
                self._exit(mod, output)

            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(_always(module.register_forward_hook, post, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ModuleTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- hooks --------------------------------------------------------------------------------------
    def _enter(self, module: Any, name: str, args: tuple, kwargs: dict) -> None:
        self.failed = None
        data = self.on_enter(module, name, args, kwargs) if self.on_enter is not None else None
        self.stack.append(ModuleFrame(module, name, data))
        if self.backward:
            self._mark(name)

    def _exit(self, module: Any, output: Any) -> None:
        stack = self.stack
        for i in range(len(stack) - 1, -1, -1):  # pop down to this module (inner calls that raised included)
            if stack[i].module is module:
                break
        else:
            return  # not entered while hooked
        frame = stack[i]
        del stack[i:]
        if self.failed is None and sys.exc_info()[1] is not None:
            self.failed = frame  # always_call: the forward raised; the innermost frame to say so is first
        if self.on_exit is not None:
            self.on_exit(frame, output)
        if self.backward:
            self._mark(stack[-1].name if stack else None)

    def _mark(self, name: str | None) -> None:
        seq = self._seq_nr()
        marks, names = self._marks, self._mark_names
        if marks and marks[-1] == seq:  # no node made since the last change: only the newest name counts
            names[-1] = name
        elif not names or names[-1] != name:
            marks.append(seq)
            names.append(name)

    def _global_pre(self, module: Any, args: tuple) -> None:
        self._enter(module, self._global_name(module), args, {})

    def _global_post(self, module: Any, args: tuple, output: Any) -> None:
        self._exit(module, output)

    def _unhooked_pre(self, module: Any, args: tuple) -> None:
        name = self._unhooked.get(module)
        if name is not None:
            self._enter(module, name, args, {})

    def _unhooked_post(self, module: Any, args: tuple, output: Any) -> None:
        if module in self._unhooked:
            self._exit(module, output)

    def _global_name(self, module: Any) -> str:
        name = self._names.get(module)
        if name is None:
            root = type(module).__name__
            if not self.stack:  # a root call: name its whole tree
                for qual, sub in module.named_modules():
                    if sub not in self._names:
                        self._names[sub] = f"{root}.{qual}" if qual else root
                name = self._names[module]
            else:
                name = f"{self.stack[-1].name}.<{root}>"
                self._names[module] = name
        return name


def _reads_hooks(model: Any) -> set[int]:
    """ids of the modules of ``model`` that a per-module hook would push off a fused kernel: every module
    inside an ``nn.TransformerEncoderLayer``, whose forward takes its inference fast path
    (``torch._transformer_encoder_layer_fwd``) only when none of them has forward hooks."""
    import torch

    found: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.TransformerEncoderLayer) and id(module) not in found:
            found.update(id(m) for m in module.modules())
    return found


def _always(register: Callable[..., Any], hook: Callable[..., Any], **kwargs: Any) -> Any:
    """A forward hook that also runs when forward raises (torch >= 2.1), so the stack stays balanced."""
    try:
        return register(hook, always_call=True, **kwargs)
    except TypeError:  # torch < 2.1
        return register(hook, **kwargs)
