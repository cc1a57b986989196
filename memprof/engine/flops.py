"""Compute: FLOPs counted with PyTorch's own FLOP formulas, on fake tensors or the meta device.

Two users, one set of formulas (``torch.utils.flop_counter``'s registry, the rules ``FlopCounterMode``
applies):

* :class:`FlopTally`: the tracer (:func:`memprof.engine.trace.trace_step`) hands it every op it
  dispatches; it counts FLOPs per op, attributed to the module and phase the tracer is in, lists the
  ops no formula covers, and keeps each op's FLOPs and bytes moved for the step-time model
  (:mod:`memprof.engine.roofline`). No second dispatch mode: the formulas are called from the
  tracer's own hook.
* :func:`recompute_cost`: what activation checkpointing recomputes (one forward under
  ``FlopCounterMode`` with the checkpointed regions counted apart).

The convention is PyTorch's: 2 FLOPs per multiply-add of matrix multiplications, convolutions and
attention; everything else counts 0 (and is listed). Beyond PyTorch's registry, memprof adds the
matmul-family ops it lacks (``mv``, ``addmv``, ``dot``, ``addbmm``, ``addr``, ``_addmm_activation``,
``_int_mm``), the fused inference kernels of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
(``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``: the matmuls of their training
path), counts the CPU flash-attention kernel a CPU trace runs (where CUDA runs the flash or
memory-efficient kernel) with the same formulas as CUDA's attention kernels, and divides the weight
gradient of grouped convolutions by ``groups`` where the installed PyTorch does not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..results import FlopCount, ModuleFlops, UncountedOp
from .checkpointing import counting_regions, get_plan
from .workload import autocast, prepare

#: phases whose ops count (the tracer's "done" is zero_grad, part of the optimizer's work; in generation the
#: prefill is the forward over the whole prompt, the warm-up and decode steps are not counted)
_PHASE = {
    "forward": "forward",
    "backward": "backward",
    "optimizer": "optimizer",
    "done": "optimizer",
    "prefill": "forward",
}
#: the root module's name in per-module tables (as in the analytical layer table)
ROOT = "(model)"
#: ops that run outside every module (the loss, functional code in the training step)
OUTSIDE = "(outside modules)"
#: ops that allocate or relabel memory without reading or writing it: no FLOPs, no bytes, not listed
_NO_WORK = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "detach",
        "alias",
        "lift_fresh",
        "lift_fresh_copy",
        "_local_scalar_dense",
        "set_",
        "resize_",
        "_unsafe_view",
    }
)
#: uncounted ops that move memory without arithmetic
_MEMORY = frozenset(
    {
        "copy_",
        "_to_copy",
        "clone",
        "zero_",
        "fill_",
        "zeros",
        "zeros_like",
        "ones",
        "ones_like",
        "full",
        "full_like",
        "new_zeros",
        "new_ones",
        "new_full",
        "scalar_tensor",
        "cat",
        "stack",
        "constant_pad_nd",
        "index",
        "index_select",
        "index_put",
        "index_put_",
        "_index_put_impl_",
        "gather",
        "scatter",
        "scatter_",
        "embedding",
        "_unsafe_index",
        "masked_fill",
        "masked_fill_",
        "slice_scatter",
        "select_scatter",
        "select_backward",
        "slice_backward",
        "repeat",
        "flip",
        "roll",
        "tril",
        "triu",
        "arange",
        "bernoulli_",
        "uniform_",
        "normal_",
        "native_dropout",
        "where",
        "_foreach_zero_",
    }
)


def _name(func) -> str:
    return func.name().split("::")[-1].split(".")[0] if hasattr(func, "name") else str(func)


def _extra_formulas(a) -> dict:
    """memprof's formulas for matmul-family ops PyTorch's registry lacks (shapes -> FLOPs, 2 per multiply-add),
    and for the fused inference kernels of nn.MultiheadAttention / nn.TransformerEncoderLayer (the matmuls
    their decomposed training path runs)."""

    def shape(t):
        return tuple(t.shape)

    def mv(mat, vec, *args, out_val=None, **kwargs):
        m, n = shape(mat)
        return 2 * m * n

    def addmv(_self, mat, vec, *args, out_val=None, **kwargs):
        return mv(mat, vec)

    def dot(x, y, *args, out_val=None, **kwargs):
        return 2 * shape(x)[0]

    def addbmm(_self, b1, b2, *args, out_val=None, **kwargs):
        b, m, k = shape(b1)
        return 2 * b * m * k * shape(b2)[2]

    def addr(_self, v1, v2, *args, out_val=None, **kwargs):
        return 2 * shape(v1)[0] * shape(v2)[0]  # multiply and add into self

    def mm(x, y, *args, out_val=None, **kwargs):
        m, k = shape(x)
        return 2 * m * k * shape(y)[1]

    def addmm(_self, x, y, *args, out_val=None, **kwargs):
        return mm(x, y)

    def attention_block(q, k, e: int, out_proj: bool = True) -> int:
        """Projections of q, k, v (E x E each), the two attention matmuls, the output projection."""
        *batch, lq, _ = shape(q)
        lk = shape(k)[-2]
        b = math.prod(batch)
        flops = 2 * b * lq * e * e + 2 * 2 * b * lk * e * e  # q; k and v
        flops += 2 * 2 * b * lq * lk * e  # Q K^T and softmax(.) V over all heads (h * d = E)
        return flops + (2 * b * lq * e * e if out_proj else 0)

    def native_mha(q, k, v, embed_dim, *args, out_val=None, **kwargs):
        return attention_block(q, k, int(embed_dim))

    def encoder_layer(src, embed_dim, num_heads, qkv_w, qkv_b, proj_w, proj_b, use_gelu, norm_first, eps,
                      nw1, nb1, nw2, nb2, ffn_w1, *args, out_val=None, **kwargs):  # fmt: skip
        *batch, length, e = shape(src)
        ffn = shape(ffn_w1)[0]
        return attention_block(src, src, int(embed_dim)) + 2 * 2 * math.prod(batch) * length * e * ffn

    table = {"mv": mv, "addmv": addmv, "dot": dot, "vdot": dot, "addbmm": addbmm, "addr": addr}
    table.update({"_int_mm": mm, "_addmm_activation": addmm})
    # nn.MultiheadAttention's and nn.TransformerEncoderLayer's fused inference kernels (eval, no_grad)
    table.update({"_native_multi_head_attention": native_mha, "_transformer_encoder_layer_fwd": encoder_layer})
    return {getattr(a, n): f for n, f in table.items() if hasattr(a, n)}


def _shapes(values, tensor) -> Any:
    """``values`` with every tensor (one level of lists/tuples deep) replaced by its shape."""
    if isinstance(values, tensor):
        return values.shape
    if isinstance(values, (list, tuple)):
        return type(values)(v.shape if isinstance(v, tensor) else v for v in values)
    return values


def _unwrap(formula, wrapper_code) -> Callable[..., Any]:
    """PyTorch wraps shape-based formulas to map every argument through pytree (about 1 ms a call on fake
    tensors); call the formula itself with the shapes instead, the same values at a fraction of the cost."""
    inner = getattr(formula, "__wrapped__", None)
    if inner is None or getattr(formula, "__code__", None) is not wrapper_code:
        return formula
    import torch

    tensor = torch.Tensor

    def fast(*args, out_val=None, **kwargs):
        shapes = [a.shape if isinstance(a, tensor) else _shapes(a, tensor) for a in args]
        return inner(*shapes, out_shape=_shapes(out_val, tensor), **kwargs)

    return fast


def formulas() -> dict:
    """Op packet -> FLOP formula ``f(*args, out_val=out, **kwargs)``: PyTorch's registry plus memprof's additions."""
    import torch
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    a = torch.ops.aten
    table = dict(_extra_formulas(a))
    # the CPU's flash attention: same arguments in front as CUDA's kernels, counted with their formulas
    cpu_fwd = getattr(a, "_scaled_dot_product_flash_attention_for_cpu", None)
    cpu_bwd = getattr(a, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if cpu_fwd is not None and a._scaled_dot_product_flash_attention in flop_registry:
        table[cpu_fwd] = flop_registry[a._scaled_dot_product_flash_attention]
    if cpu_bwd is not None and a._scaled_dot_product_flash_attention_backward in flop_registry:
        table[cpu_bwd] = flop_registry[a._scaled_dot_product_flash_attention_backward]
    table.update(flop_registry)  # PyTorch's own (and any the user registered) win
    if flop_registry.get(a.convolution_backward) is not None and not _counts_groups(flop_registry):
        table[a.convolution_backward] = _conv_backward  # PyTorch < 2.13 counts grouped weight gradients g times
    wrapper = shape_wrapper(lambda: 0).__code__
    return {op: _unwrap(f, wrapper) for op, f in table.items()}


def _conv_backward(
    grad_out, x, w, _bias, _stride, _padding, _dilation, transposed, _output_padding, groups, output_mask, out_val=None
) -> int:
    """``convolution_backward``: PyTorch's formula, with the weight gradient of a grouped convolution
    divided by ``groups`` (as pytorch/pytorch#183405 does): per group it is a convolution of C_in/g
    input with C_out/g output channels, the same multiply-adds as the forward."""
    from torch.utils.flop_counter import conv_flop_count

    def shape(t) -> list[int]:
        return list(t.shape)

    def swap(s: list[int]) -> list[int]:
        return [s[1], s[0], *s[2:]]

    flops = 0
    if output_mask[0]:  # grad_input as a transposed convolution of grad_out with the weight
        flops += conv_flop_count(shape(grad_out), shape(w), shape(out_val[0]), not transposed)
    if output_mask[1]:  # grad_weight as a convolution of the input with grad_out
        first, second = (grad_out, x) if transposed else (x, grad_out)
        gw = swap(shape(out_val[1]))
        flops += conv_flop_count(swap(shape(first)), swap(shape(second)), gw, transposed=False) // groups
    return flops


def _counts_groups(registry) -> bool:
    """Whether the installed PyTorch divides a grouped convolution's weight-gradient FLOPs by ``groups``."""
    import torch

    formula = registry[torch.ops.aten.convolution_backward]
    x, w, go = torch.empty(1, 4, 3, 3, device="meta"), torch.empty(4, 1, 1, 1, device="meta"), None
    go = torch.empty(1, 4, 3, 3, device="meta")
    out = (x, w, None)
    try:
        flops = formula(go, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 4, [False, True, False], out_val=out)
    except Exception:
        return False
    return int(flops) == 2 * 9 * 4  # per channel: 9 positions, one multiply-add each


# =========================================================================== counting in the tracer
@dataclass(frozen=True)
class OpCosts:
    """Per-op work of one step, for the step-time model.

    ``flop_ops``: ``(phase, math, flops, bytes, count)`` for ops with FLOPs, identical ones merged;
    ``math`` says which peak they run at ("fp32", "tf32", "fp16", "bf16", "fp64", "fp8", "int8").
    ``other_bytes``: bytes read and written by the ops without FLOPs, per phase (their time is
    bytes / bandwidth, so they add up).
    """

    flop_ops: tuple[tuple[str, str, int, int, int], ...]
    other_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def step_bytes(self) -> int:
        return sum(b * c for _, _, _, b, c in self.flop_ops) + sum(self.other_bytes.values())


def _math_kind(family: str, dtype, tf32_matmul: bool, tf32_conv: bool) -> str:
    """Which peak an op with FLOPs runs at on a GPU, by its dtype and PyTorch's default TF32 settings."""
    import torch

    if dtype == torch.float32:
        if family == "conv" and tf32_conv:
            return "tf32"
        if family == "matmul" and tf32_matmul:
            return "tf32"
        return "fp32"
    kinds = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64", torch.int8: "int8"}
    if dtype in kinds:
        return kinds[dtype]
    if "float8" in str(dtype):
        return "fp8"
    return "fp32"


class FlopTally:
    """FLOPs and bytes of each op of one step, fed by the tracer's dispatch hook.

    ``locate()`` (given by the tracer) answers, for an op with FLOPs, the module running it (None:
    outside any module) and whether it is a recomputation (a forward op run during backward).
    """

    def __init__(self, locate: Callable[[], tuple[str | None, bool]], count_bytes: bool = False):
        import torch

        self._locate = locate
        self.count_bytes = count_bytes  # bytes moved per op, for the step-time model (costs ~5 % of a trace)
        self._formulas = formulas()
        self._info: dict[Any, tuple] = {}
        self._Tensor = torch.Tensor
        self._pointwise = getattr(torch.Tag, "pointwise", None)
        # PyTorch's defaults unless this process changed them: fp32 matmuls in full precision,
        # fp32 convolutions through cuDNN with TF32
        self._tf32_matmul = bool(torch.backends.cuda.matmul.allow_tf32)
        self._tf32_conv = bool(torch.backends.cudnn.allow_tf32)
        self.phase_flops = {"forward": 0, "backward": 0, "optimizer": 0}
        self.recompute_flops = 0
        self.by_op: dict[str, int] = {}
        self.forward_by_module: dict[str | None, int] = {}
        self.backward_by_module: dict[str | None, int] = {}
        self.module_order: list[str | None] = []
        self.uncounted: dict[str, list] = {}  # name -> [calls, kind]
        self.costs: dict[tuple[str, str, int, int], int] = {}
        self.other_bytes = {"forward": 0, "backward": 0, "optimizer": 0}

    # -- classification, once per op ---------------------------------------------------
    def _classify(self, func) -> tuple[str, Any, str, str | None]:
        name = _name(func)
        formula = self._formulas.get(getattr(func, "_overloadpacket", None))
        namespace = str(getattr(func, "namespace", "aten"))
        label = f"{namespace}.{name}"
        info: tuple[str, Any, str, str | None]
        if namespace == "profiler":  # record_function markers (optimizer.step's)
            info = ("nowork", None, label, None)
        elif formula is not None:
            family = "conv" if "conv" in name else "attention" if "attention" in name else "matmul"
            info = ("flop", formula, label, family)
        elif name in _NO_WORK or getattr(func, "is_view", False):
            info = ("nowork", None, label, None)
        elif name.startswith("_foreach_") or (self._pointwise is not None and self._pointwise in func.tags):
            info = ("pointwise", None, label, None)
        elif name in _MEMORY:
            info = ("memory", None, label, None)
        else:
            info = ("other", None, label, None)
        self._info[func] = info
        return info

    def _nbytes(self, values) -> int:
        """Bytes of the tensors among ``values`` (one level of lists): a view counts what it spans, an
        expanded tensor the storage it reads."""
        tensor = self._Tensor
        n = 0
        for v in values:
            if isinstance(v, tensor):
                b = v.nbytes
                if not v.is_contiguous():
                    b = min(b, v.untyped_storage().nbytes())
                n += b
            elif isinstance(v, (list, tuple)):
                n += self._nbytes(v)
        return n

    # -- the hook ------------------------------------------------------------------------
    def op(self, func, args, kwargs, out, phase: str) -> None:
        """Count one dispatched op that ran in ``phase`` (the tracer's phase name)."""
        info = self._info.get(func) or self._classify(func)
        kind = info[0]
        if kind == "nowork":
            return
        phase = _PHASE.get(phase, "")
        if not phase:
            return
        moved = 0
        if self.count_bytes:
            moved = self._nbytes(args) + self._nbytes((out,))
            if kwargs:
                moved += self._nbytes(kwargs.values())
        if kind != "flop":
            self.other_bytes[phase] += moved
            entry = self.uncounted.get(info[2])
            if entry is None:
                self.uncounted[info[2]] = [1, kind]
            else:
                entry[0] += 1
            return
        try:
            flops = int(info[1](*args, **(kwargs or {}), out_val=out))
        except Exception:  # a formula that does not accept these arguments: listed, not guessed
            self.other_bytes[phase] += moved
            entry = self.uncounted.setdefault(info[2] + " (formula failed)", [0, "other"])
            entry[0] += 1
            return
        dtype = next((t.dtype for t in args if isinstance(t, self._Tensor)), None)
        math = _math_kind(info[3], dtype, self._tf32_matmul, self._tf32_conv)
        key = (phase, math, flops, moved)
        self.costs[key] = self.costs.get(key, 0) + 1
        if not flops:
            return
        self.phase_flops[phase] += flops
        self.by_op[info[2]] = self.by_op.get(info[2], 0) + flops
        module, recompute = self._locate()
        if recompute:
            self.recompute_flops += flops
        per_module = self.forward_by_module if phase == "forward" else self.backward_by_module
        if module not in self.forward_by_module and module not in self.backward_by_module:
            self.module_order.append(module)
        per_module[module] = per_module.get(module, 0) + flops

    # -- results -------------------------------------------------------------------------
    def result(
        self, batch_size: int, module_types: dict[str, str], root: str | None
    ) -> tuple[FlopCount, OpCosts | None]:
        """The step's :class:`FlopCount` and (with ``count_bytes``) its :class:`OpCosts`; ``root`` is the
        root module's label."""
        modules = []
        for label in self.module_order:
            name = OUTSIDE if label is None else ROOT if label == root else label
            modules.append(
                ModuleFlops(
                    name=name,
                    type=module_types.get(label, "") if label is not None else "",
                    forward_flops=self.forward_by_module.get(label, 0),
                    backward_flops=self.backward_by_module.get(label, 0),
                )
            )
        uncounted = sorted(self.uncounted.items(), key=lambda kv: (-kv[1][0], kv[0]))
        step = sum(self.phase_flops.values())
        count = FlopCount(
            batch_size=batch_size,
            forward_flops=self.phase_flops["forward"],
            backward_flops=self.phase_flops["backward"],
            optimizer_flops=self.phase_flops["optimizer"],
            recompute_flops=self.recompute_flops,
            step_flops=step,
            per_sample_flops=step / batch_size if batch_size else 0.0,
            by_op=dict(sorted(self.by_op.items(), key=lambda kv: -kv[1])),
            modules=tuple(modules),
            uncounted_ops=tuple(UncountedOp(name, calls, kind) for name, (calls, kind) in uncounted),
        )
        if not self.count_bytes:
            return count, None
        costs = OpCosts(
            flop_ops=tuple((p, m, f, b, c) for (p, m, f, b), c in self.costs.items()),
            other_bytes=dict(self.other_bytes),
        )
        return count, costs


# =========================================================================== checkpointing's recomputation
@dataclass(frozen=True)
class RecomputeCost:
    """What checkpointing costs in compute: the checkpointed regions' forward, run again in backward.

    FLOPs are PyTorch's FlopCounterMode count (matmuls, convolutions, attention) of one
    forward at the workload's batch size, traced on fake tensors.
    """

    regions: int  # checkpointed regions recomputed per step
    forward_flops: int  # the whole forward
    recompute_flops: int  # the forward of the checkpointed regions, again in backward
    plan: str = ""  # CheckpointPlan.describe()
    #: BatchNorm layers inside checkpointed regions update their running statistics twice per step
    batchnorm_recomputed: bool = False

    @property
    def step_flops(self) -> int:
        """A training step without checkpointing: forward + backward (about 2x forward)."""
        return 3 * self.forward_flops

    @property
    def extra_pct(self) -> float | None:
        """Extra compute per training step, in % of a step without checkpointing."""
        return None if not self.forward_flops else 100.0 * self.recompute_flops / self.step_flops


def recompute_cost(workload) -> RecomputeCost:
    """FLOPs the checkpointed step recomputes: one forward of ``workload`` on the meta device
    (or on fake tensors when the model cannot be built there); no real memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        return _count_recompute(workload, "meta", contextlib.nullcontext())
    except UsageError:
        raise
    except Exception:
        return _count_recompute(workload, "cpu", FakeTensorMode(allow_non_fake_inputs=True))


def _count_recompute(workload, device: str, mode) -> RecomputeCost:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    probe: list[int] = []
    with mode:
        prepared = prepare(workload.replace(mode="train"), device)
        plan = get_plan(prepared.model)
        with counting_regions(probe), FlopCounterMode(display=False) as total, torch.enable_grad(), autocast(prepared):
            prepared.model(*prepared.args, **prepared.kwargs)
    model = prepared.model
    batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return RecomputeCost(
        regions=plan.count if plan else 0,
        forward_flops=int(total.get_total_flops()),
        recompute_flops=int(sum(probe)),
        plan=plan.describe() if plan else "",
        batchnorm_recomputed=batchnorm and bool(probe),
    )
