"""Fine-tuning levers applied to a built model: frozen parts (``freeze`` / ``train_only``) and LoRA adapters.

Both work on any ``nn.Module``. LoRA goes through the real ``peft`` package (an optional
extra, imported only when asked for): memprof traces the model ``peft.get_peft_model``
builds, so the frozen base weights, the adapter weights (``lora_A``/``lora_B`` in the dtype
peft gives them), the adapter gradients, the optimizer state for the adapters only and the
dropout masks are what PyTorch does with that model, not assumptions.

Freezing sets ``requires_grad=False`` on the matching parameters; autograd then records no
graph through a region whose inputs and weights need no gradient, so the activations
upstream of the first trainable layer are not kept (the trace shows it; see
``tests/test_finetune.py``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..results import WeightBreakdown

#: peft's defaults (peft.LoraConfig): r=8, lora_alpha=8, lora_dropout=0.0
DEFAULT_LORA_ALPHA = 8.0
ALL_LINEAR = "all-linear"
PEFT_HINT = 'pip install "memprof[peft]" (the peft package)'
#: bitsandbytes formats for the frozen linear weights
QUANT_METHODS = ("none", "int8", "nf4", "fp4")


def parse_method(name: str | None) -> str:
    """A quantization name: none, int8, nf4 or fp4."""
    key = "none" if name is None else str(name).strip().lower()
    key = {"": "none", "off": "none", "no": "none", "8bit": "int8", "4bit": "nf4", "llm.int8": "int8"}.get(key, key)
    if key not in QUANT_METHODS:
        raise UsageError(f"unknown `quantize` {name!r}", "choose int8, nf4 or fp4 (bitsandbytes' formats)")
    return key


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA configuration, as ``peft.LoraConfig`` takes it.

    ``targets``: module names (peft's ``target_modules``: ``("q_proj", "v_proj")``) or
    ``("all-linear",)``; empty: peft's default for the architecture (Hugging Face models),
    ``all-linear`` for any other module.
    """

    rank: int
    alpha: float = DEFAULT_LORA_ALPHA
    targets: tuple[str, ...] = ()
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UsageError(f"`lora_rank` must be a positive integer, got {self.rank!r}", "e.g. `lora_rank` 16")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise UsageError(f"`lora_dropout` must be in [0, 1), got {self.dropout!r}", "e.g. `lora_dropout` 0.05")
        if float(self.alpha) <= 0:
            raise UsageError(f"`lora_alpha` must be positive, got {self.alpha!r}", "e.g. `lora_alpha` 32")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "targets", parse_targets(self.targets))

    def describe(self) -> str:
        targets = ",".join(self.targets) if self.targets else "peft default"
        alpha = f"{self.alpha:g}"
        text = f"r={self.rank}, alpha={alpha}, targets={targets}"
        return text + (f", dropout={self.dropout:g}" if self.dropout else "")


def parse_targets(targets: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"q_proj,v_proj"`` / ``["q_proj", "v_proj"]`` / ``"all-linear"`` -> a tuple of names."""
    if targets is None:
        return ()
    items = targets.split(",") if isinstance(targets, str) else [str(t) for t in targets]
    names = tuple(dict.fromkeys(t.strip() for t in items if t.strip()))
    if any(n.lower() == ALL_LINEAR for n in names):
        if len(names) > 1:
            raise UsageError(
                f"`lora_targets` mixes {ALL_LINEAR} with module names: {','.join(names)}",
                f"give either {ALL_LINEAR} or a list of module names such as q_proj,v_proj",
            )
        return (ALL_LINEAR,)
    return names


def parse_patterns(patterns: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    """Module-name globs from repeated options or comma-separated text."""
    if patterns is None:
        return ()
    items: list[str] = []
    for p in [patterns] if isinstance(patterns, str) else list(patterns):
        items.extend(s.strip() for s in str(p).split(",") if s.strip())
    for item in items:
        if any(c.isspace() for c in item):
            raise UsageError(f"`{what}` pattern {item!r} has spaces", "module-name globs, e.g. backbone.* or layer1")
    return tuple(dict.fromkeys(items))


# =========================================================================== frozen parts
def _matches(param_name: str, patterns: Sequence[str]) -> bool:
    """A parameter matches when its own name or the name of a module holding it matches a glob."""
    parts = param_name.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(n, pat) for n in names for pat in patterns)


def _unmatched_error(what: str, pattern: str, model) -> UsageError:
    names = [n for n, _ in model.named_modules() if n and "." not in n]
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return UsageError(
        f"`{what}` pattern {pattern!r} matches no parameter of the model",
        f"patterns are module-name globs (fnmatch); top-level modules: {shown or 'none'}",
    )


def apply_freezing(model, freeze: Sequence[str] = (), train_only: Sequence[str] = ()) -> None:
    """``requires_grad=False`` on parameters matching ``freeze``; with ``train_only``, on all others.

    Raises UsageError for a pattern that matches nothing (a typo would otherwise freeze nothing
    silently) and when nothing is left to train.
    """
    if not freeze and not train_only:
        return
    params = list(model.named_parameters())
    for what, patterns in (("freeze", freeze), ("train_only", train_only)):
        for pat in patterns:
            if not any(_matches(name, (pat,)) for name, _ in params):
                raise _unmatched_error(what, pat, model)
    for name, p in params:
        frozen = _matches(name, freeze) if freeze else False
        if train_only and not _matches(name, train_only):
            frozen = True
        if frozen:
            p.requires_grad_(False)
    if not any(p.requires_grad for _, p in params):
        raise UsageError(
            "every parameter is frozen: nothing is left to train",
            "loosen `freeze` / `train_only`, or use --mode eval for inference",
        )


# =========================================================================== LoRA (peft)
def import_peft():
    try:
        import peft
    except ImportError:
        raise UsageError("LoRA needs the peft package, which is not installed", PEFT_HINT) from None
    return peft


def _default_targets(model) -> Any:
    """None (peft's per-architecture default) for Hugging Face models peft knows, else all-linear."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is not None:
        try:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING
        except ImportError:  # pragma: no cover - older peft
            MAPPING = {}
        if model_type in MAPPING:
            return None
    return ALL_LINEAR


def apply_lora(model, spec: LoraSpec):
    """``peft.get_peft_model(model, LoraConfig(...))``: the model peft builds, adapters included.

    Quantized stand-in layers (:mod:`memprof.engine.quantize`) get peft's LoRA layers for
    bitsandbytes' Linear4bit / Linear8bitLt, rebuilt on the stand-ins (peft only defines
    them when bitsandbytes is installed).
    """
    peft = import_peft()
    from .quantize import lora_custom_modules

    if spec.targets == (ALL_LINEAR,):
        targets: Any = ALL_LINEAR
    elif spec.targets:
        targets = list(spec.targets)
    else:
        targets = _default_targets(model)
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    custom = lora_custom_modules(model)
    if custom:
        config._register_custom_module(custom)
    try:
        with _fake_safe_adapter_moves(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, seen by peft
            return peft.get_peft_model(model, config)
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        shown = ",".join(names[:10]) + (",..." if len(names) > 10 else "")
        raise UsageError(
            f"peft could not add LoRA adapters: {first}",
            f"choose `lora_targets` among the model's linear layers ({shown or 'none'}) or all-linear",
        ) from None


@contextlib.contextmanager
def _fake_safe_adapter_moves() -> Iterator[None]:
    """peft moves each new adapter to its base layer's device and dtype with ``Module.to``. Under
    FakeTensorMode ``Module.to`` swaps every fake parameter (``torch.utils.swap_tensors``), which
    fails while anything else references it. Inside this context (only when a fake mode is active)
    ``Module.to`` converts the way memprof converts models: tensors already on the right device and
    dtype are left alone, the others replaced; the module is the one peft makes."""
    import torch

    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None:
        yield
        return
    real = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for owner in self.modules():
            for table in (owner._parameters, owner._buffers):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    want_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
                    want_device = torch.device(device) if device is not None else t.device
                    if t.device == want_device and t.dtype == want_dtype:
                        continue
                    with torch.no_grad():
                        new = t.to(want_device, dtype=want_dtype)
                    if isinstance(t, torch.nn.Parameter):
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                    table[name] = new
        return self

    torch.nn.Module.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.to = real  # type: ignore[method-assign]


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear)


# =========================================================================== the weights, split
def is_adapter_parameter(name: str) -> bool:
    """peft names adapter weights ``...lora_A.<adapter>.weight``, ``lora_B``, ``lora_embedding_A``, ...."""
    return any(part.startswith("lora_") for part in name.split("."))


def weight_breakdown(model) -> WeightBreakdown:
    """Parameters split into trainable / frozen base / adapters, and the quantization state.

    ``trainable_params`` / ``all_params`` count as ``peft``'s ``get_nb_trainable_parameters``
    does (the numbers ``print_trainable_parameters`` prints): each parameter once, a 4-bit
    packed weight as 2 values per stored byte.
    """
    from .quantize import is_quantized_layer, packed_value_count

    owner: dict[int, Any] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
    trainable = total = 0
    trainable_bytes = frozen_bytes = adapter_bytes = adapter_params = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        count = packed_value_count(owner.get(id(p)), p)
        total += count
        if p.requires_grad:
            trainable += count
        if is_adapter_parameter(name):
            adapter_bytes += nbytes
            adapter_params += count
        elif p.requires_grad:
            trainable_bytes += nbytes
        else:
            frozen_bytes += nbytes
    quant_bytes = quantized = 0
    for module in model.modules():
        if is_quantized_layer(module):
            quantized += 1
            quant_bytes += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return WeightBreakdown(
        trainable_params=trainable,
        all_params=total,
        trainable_bytes=trainable_bytes,
        frozen_bytes=frozen_bytes,
        adapter_bytes=adapter_bytes,
        adapter_params=adapter_params,
        quant_state_bytes=quant_bytes,
        quantized_layers=quantized,
    )


__all__ = [
    "ALL_LINEAR",
    "LoraSpec",
    "apply_freezing",
    "apply_lora",
    "import_peft",
    "is_adapter_parameter",
    "parse_patterns",
    "parse_targets",
    "weight_breakdown",
]
