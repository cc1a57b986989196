"""Activation (gradient) checkpointing applied to a model in place.

Wraps regions of the model with ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)`` so that a traced or measured training step really keeps
only each region's inputs during forward and recomputes the rest in backward.
Nothing is copied: the wrapped modules keep their parameters (same tensor
objects, tied weights stay tied) and their names; only their ``forward`` is
replaced by an instance attribute that calls the original through ``checkpoint``.

Modes
-----
``blocks``
    Checkpoint each repeated block. The block type is found generically: among the
    children of every ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict``
    (plain containers nested inside are looked through), the non-leaf module type
    with the most instances in one container wins (ResNet ``Bottleneck``, ViT
    ``EncoderBlock``, GPT ``Block``, DenseNet ``_DenseLayer``, MobileNet
    ``InvertedResidual``, EfficientNet ``MBConv``...). Every instance of that type
    in the model is wrapped (UNet's bottleneck ``_DoubleConv`` too). Fallbacks:
    the non-leaf children of the module with the most of them (at least 3, e.g.
    Inception's ``Mixed_*``); then ``sqrt`` segments of the largest
    ``nn.Sequential`` (VGG ``features``, plain MLPs).
``sqrt``
    ``checkpoint_sequential``-style: a chain of ``n`` modules is cut into
    ``ceil(sqrt(n))`` segments; all but the last are checkpointed. The chain is the
    repeated blocks when they sit in ``nn.Sequential`` parents (ResNet ``layer1..4``,
    ViT ``encoder.layers``; segments never cross a parent), else the
    ``nn.Sequential`` holding the most layers (VGG ``features``).
``every-K``
    Like ``sqrt`` with segments of ``K`` modules (``every-2``, ``every-4``...).

Caveats (documented, accepted): BatchNorm running statistics are updated twice per
step (once in forward, once in the recomputation), so they drift slightly faster
than without checkpointing; gradients are unaffected. Random ops (dropout) see the
same random numbers in the recomputation (``preserve_rng_state=True``). In eval
mode / under ``torch.no_grad()`` the wrapper calls the module directly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError

#: the modes a Workload's ``checkpointing`` field may take ("every-K" for any K >= 1)
MODES = ("none", "blocks", "sqrt", "every-K")
_ALIASES = {
    "": "none",
    "off": "none",
    "no": "none",
    "false": "none",
    "block": "blocks",
    "per-block": "blocks",
    "per_block": "blocks",
    "on": "blocks",
    "true": "blocks",
    "sqrt(n)": "sqrt",
    "segments": "sqrt",
}
_MARK = "_memprof_checkpointed"
_PLAN_ATTR = "_memprof_checkpoint_plan"
_state = threading.local()


def parse_mode(name: str) -> str:
    """Normalise a checkpointing mode: 'none', 'blocks', 'sqrt' or 'every-K' (K >= 1)."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in ("none", "blocks", "sqrt"):
        return key
    if key.startswith("every-") or key.startswith("every"):
        digits = key[len("every-") :] if key.startswith("every-") else key[len("every") :]
        if digits.isdigit() and int(digits) >= 1:
            return f"every-{int(digits)}"
    raise UsageError(
        f"unknown checkpointing mode {name!r}",
        "choose none, blocks (each repeated block), sqrt (sqrt(n) segments of the largest "
        "nn.Sequential) or every-K (segments of K modules, e.g. every-2)",
    )


@dataclass(frozen=True)
class CheckpointPlan:
    """Which modules are checkpointed and how they were chosen."""

    mode: str
    #: qualified names of the checkpointed regions ("layer1.0", "features[0:5]" for segments)
    regions: tuple[str, ...]
    #: the block type for "blocks", the Sequential's name for segment modes
    what: str
    #: how it was chosen ("repeated blocks", "non-leaf children of X", "segments of X")
    rule: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def count(self) -> int:
        return len(self.regions)

    def describe(self) -> str:
        if self.rule.startswith("segments"):
            rule = self.rule.replace("segments", "segment", 1) if self.count == 1 else self.rule
            return f"{self.count} checkpointed {rule} over {self.what}"
        return f"{self.count} × {self.what} ({self.rule})"


# --------------------------------------------------------------------------- recomputation marker
def is_recomputing() -> bool:
    """True while a checkpointed region is being recomputed during backward."""
    return getattr(_state, "depth", 0) > 0


def recompute_count() -> int:
    """How many region recomputations have started in this thread (monotonic counter)."""
    return getattr(_state, "count", 0)


@contextlib.contextmanager
def _recompute_context():
    _state.depth = getattr(_state, "depth", 0) + 1
    _state.count = getattr(_state, "count", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


@contextlib.contextmanager
def counting_regions(probe: list[int]):
    """While active, each checkpointed region runs plainly and appends its forward FLOPs to ``probe``."""
    _state.probe = probe
    try:
        yield probe
    finally:
        _state.probe = None


def _context_fn():
    return contextlib.nullcontext(), _recompute_context()


# --------------------------------------------------------------------------- wrapping
_GENERIC = None


def _generic_containers():
    global _GENERIC
    if _GENERIC is None:
        import torch

        _GENERIC = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    return _GENERIC


def _is_container(module) -> bool:
    return isinstance(module, _generic_containers())


def _is_plain_container(module) -> bool:
    return type(module) in _generic_containers()


def _is_leaf(module) -> bool:
    return next(module.children(), None) is None


#: a block holds at least this many leaf modules with parameters (conv-bn-act units are too small:
#: checkpointing them saves little, and they sit inside the real blocks, e.g. GoogLeNet's branches)
_MIN_BLOCK_LEAVES = 3


def _param_leaves(module) -> int:
    return sum(1 for m in module.modules() if _is_leaf(m) and _has_params(m))


def _has_params(module) -> bool:
    return next(module.parameters(), None) is not None


def _checkpointed_call(fn, *args, **kwargs):
    import torch
    from torch.utils.checkpoint import checkpoint

    probe = getattr(_state, "probe", None)
    if probe is not None:  # recompute_cost(): count this region's forward FLOPs, no checkpoint
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            out = fn(*args, **kwargs)
        probe.append(counter.get_total_flops())
        return out
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    # fresh lists/dicts: the recomputation must see the arguments as they were, not as the caller
    # mutated them later (DenseNet's dense block appends to the feature list it passed to each layer)
    from torch.utils._pytree import tree_map

    args, kwargs = tree_map(lambda x: x, (args, kwargs))
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_context_fn, **kwargs)


def _checkpointed_forward(self, *args, **kwargs):
    return _checkpointed_call(self._memprof_original_forward, *args, **kwargs)


def _wrap_module(module) -> None:
    """Replace ``module.forward`` (instance attribute) by a checkpointed call of the original.

    Bound methods (not closures), so that ``copy.deepcopy(model)`` re-binds them to the copy.
    """
    import types

    if getattr(module, _MARK, False):
        return
    module._memprof_original_forward = module.forward
    module.forward = types.MethodType(_checkpointed_forward, module)
    setattr(module, _MARK, True)


def _run_children(seq, start: int, end: int, x):
    for m in list(seq)[start:end]:
        x = m(x)
    return x


def _segmented_forward(self, x):
    for start, end, checkpointed in self._memprof_segments:
        if checkpointed:
            x = _checkpointed_call(functools.partial(_run_children, self, start, end), x)
        else:
            x = _run_children(self, start, end, x)
    return x


def _wrap_sequential(seq, segments: list[tuple[int, int, bool]]) -> None:
    """Run ``seq`` as segments ``(start, end, checkpointed)`` of its children."""
    import types

    seq._memprof_segments = list(segments)
    seq.forward = types.MethodType(_segmented_forward, seq)
    setattr(seq, _MARK, True)


# --------------------------------------------------------------------------- planning
def _members(container) -> list[tuple[str, Any]]:
    """Children of a container, looking through plain (not subclassed) nested containers."""
    out: list[tuple[str, Any]] = []
    for name, child in container.named_children():
        if _is_plain_container(child):
            out.extend((f"{name}.{n}", m) for n, m in _members(child))
        else:
            out.append((name, child))
    return out


def _find_block_type(model):
    """(block type, container name, count) of the most repeated non-leaf type in one container, or None."""
    best = None
    for cname, container in model.named_modules():
        if not _is_container(container):
            continue
        counts: dict[type, int] = {}
        for _, child in _members(container):
            if _is_plain_container(child) or _param_leaves(child) < _MIN_BLOCK_LEAVES:
                continue
            counts[type(child)] = counts.get(type(child), 0) + 1
        for t, c in counts.items():
            depth = cname.count(".") + (1 if cname else 0)
            key = (c, -depth)
            if c >= 2 and (best is None or key > best[0]):
                best = (key, t, cname, c)
    return None if best is None else (best[1], best[2], best[3])


def _outermost_instances(model, block_type) -> list[str]:
    names: list[str] = []
    for name, module in model.named_modules():
        if type(module) is block_type and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    return names


def _largest_sequential(model):
    """The nn.Sequential (>= 2 children) holding the most layers with parameters; ties: more children."""
    import torch

    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential) and len(module) >= 2:
            key = (_param_leaves(module), len(module))
            if best is None or key > best[0]:
                best = (key, name, module)
    return None if best is None else (best[1], best[2])


def _segment_size(n: int, k: int | None) -> int:
    """``k``, or the sqrt(n) rule: ceil(sqrt(n)) segments of equal size."""
    if k is not None:
        return k
    return math.ceil(n / max(1, math.ceil(math.sqrt(n))))


def _segments_of(seq_name: str, seq, size: int, last_plain: bool) -> list[tuple[str, tuple[int, int, bool]]]:
    n = len(seq)
    out = []
    for start in range(0, n, size):
        end = min(start + size, n)
        out.append((f"{seq_name}[{start}:{end}]", (start, end, True)))
    if last_plain and out:  # its output is needed at once: checkpointing it saves nothing (checkpoint_sequential)
        name, (a, b, _) = out[-1]
        out[-1] = (name, (a, b, False))
    return out


def _plan_block_chain(model, mode: str, k: int | None):
    """Segments over repeated blocks that sit in nn.Sequential parents (ResNet layer1..4, ViT encoder.layers)."""
    import torch

    found = _find_block_type(model)
    if found is None:
        return None
    modules = dict(model.named_modules())
    names = _outermost_instances(model, found[0])
    parents: list[str] = []
    for name in names:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if not isinstance(modules[parent], torch.nn.Sequential):
            return None
        if parent not in parents:
            parents.append(parent)
    size = _segment_size(len(names), k)
    if size >= len(names):
        return None
    action: list[tuple[str, list[tuple[int, int, bool]]]] = []
    regions: list[str] = []
    for i, parent in enumerate(parents):
        segs = _segments_of(parent, modules[parent], size, last_plain=i == len(parents) - 1)
        action.append((parent, [seg for _, seg in segs]))
        regions.extend(name for name, seg in segs if seg[2])
    plan = CheckpointPlan(
        mode,
        tuple(regions),
        f"{len(names)} × {found[0].__name__} in {len(parents)} nn.Sequential",
        f"segments of {size}",
    )
    return action, plan


def _plan_segments(model, mode: str, k: int | None, notes: list[str]):
    chain = _plan_block_chain(model, mode, k)
    if chain is not None:
        return chain
    found = _largest_sequential(model)
    if found is None:
        raise UsageError(
            f"--checkpointing {mode}: the model has no nn.Sequential to cut into segments",
            "use --checkpointing blocks, or wrap the model's layers in an nn.Sequential",
        )
    name, seq = found
    n = len(seq)
    size = _segment_size(n, k)
    label = name or type(model).__name__
    segs = _segments_of(label, seq, size, last_plain=True)
    if len(segs) < 2:
        raise UsageError(
            f"--checkpointing {mode}: {label} has only {n} modules, one segment",
            "use a smaller K (every-1) or --checkpointing blocks",
        )
    total_layers, seq_layers = _param_leaves(model), _param_leaves(seq)
    if total_layers and seq_layers < 0.5 * total_layers:
        notes.append(f"only {label} is segmented ({seq_layers} of {total_layers} layers)")
    regions = tuple(r for r, seg in segs if seg[2])
    return [(name, [seg for _, seg in segs])], CheckpointPlan(
        mode, regions, f"{label} ({n} modules)", f"segments of {size}", tuple(notes)
    )


def plan_checkpointing(model, mode: str) -> tuple[Any, CheckpointPlan]:
    """Decide what to wrap; returns (an opaque action, the plan). Raises UsageError if nothing fits."""
    mode = parse_mode(mode)
    notes: list[str] = []
    if mode == "none":
        return None, CheckpointPlan("none", (), "nothing", "no checkpointing")
    if mode == "sqrt":
        action, plan = _plan_segments(model, mode, None, notes)
        return ("segments", action), plan
    if mode.startswith("every-"):
        action, plan = _plan_segments(model, mode, int(mode.split("-")[1]), notes)
        return ("segments", action), plan
    # blocks
    found = _find_block_type(model)
    if found is not None:
        block_type, _, _ = found
        names = _outermost_instances(model, block_type)
        return ("modules", names), CheckpointPlan(mode, tuple(names), block_type.__name__, "repeated blocks")
    # fallback 1: the module with the most non-leaf children (heterogeneous blocks)
    best = None
    for name, module in model.named_modules():
        kids = [n for n, c in module.named_children() if not _is_leaf(c) and _has_params(c)]
        if len(kids) >= 3 and (best is None or len(kids) > len(best[1])):
            best = (name, kids)
    if best is not None:
        prefix = f"{best[0]}." if best[0] else ""
        names = [prefix + n for n in best[1]]
        label = best[0] or type(model).__name__
        return ("modules", names), CheckpointPlan(mode, tuple(names), f"children of {label}", "non-leaf children")
    # fallback 2: segments of the largest Sequential
    try:
        action, plan = _plan_segments(model, "blocks", None, notes)
    except UsageError:
        raise UsageError(
            f"--checkpointing blocks: found no repeated blocks in {type(model).__name__}",
            "checkpointing needs blocks (nn.Sequential / nn.ModuleList of modules) to wrap; "
            "group the layers into an nn.Sequential or nn.ModuleList",
        ) from None
    plan = CheckpointPlan(
        "blocks", plan.regions, plan.what, plan.rule, ("no repeated blocks: sqrt(n) segments instead",) + plan.notes
    )
    return ("segments", action), plan


def apply_checkpointing(model, mode: str):
    """Wrap ``model``'s blocks (mode ``blocks``) or segments (``sqrt`` / ``every-K``) in place; returns ``model``.

    The plan is attached to the model and can be read back with :func:`get_plan`.
    """
    action, plan = plan_checkpointing(model, mode)
    if action is not None:
        kind, what = action
        if kind == "modules":
            modules = dict(model.named_modules())
            for name in what:
                _wrap_module(modules[name])
        else:
            modules = dict(model.named_modules())
            for name, segments in what:
                _wrap_sequential(modules[name], segments)
    object.__setattr__(model, _PLAN_ATTR, plan)
    return model


def get_plan(model) -> CheckpointPlan | None:
    """The plan :func:`apply_checkpointing` used on ``model`` (None if it was not applied)."""
    return getattr(model, _PLAN_ATTR, None)


def is_checkpointed(module) -> bool:
    return bool(getattr(module, _MARK, False))
