"""The seeds' formulas: per-layer parameters, the four-part rule and module-output activations.

Everything here is arithmetic on shapes. Module outputs come from one forward pass on
PyTorch's **meta device** (tensors with shapes and dtypes, no storage): no real memory
is touched, no GPU is needed, and it takes a fraction of a second.

* Seed 001, per-layer parameter formulas: Conv (``C_out * C_in/groups * prod(k)``
  + bias), Linear (``out*in`` + bias), BatchNorm/GroupNorm/InstanceNorm (``2C``),
  LayerNorm (``2 * prod(normalized_shape)``), Embedding (``num * dim``), parameter-free
  layers 0; each checked against ``numel()``.
* Seed 000, the four-part rule: ``bytes * (params + gradients + optimizer state +
  activations)``, optimizer state = 0 (SGD), 1x (momentum, Adagrad, RMSprop) or 2x
  (Adam, AdamW) the trainable parameters.
* Seed 004, ``modelsize``: the outputs of the modules, run in order, summed (in-place
  ReLU skipped), forward only and x2 "with backward". Generalised to any model: the
  outputs of the innermost module calls (a call during which no other module ran).

Tied weights are counted once (by storage); buffers are kept apart from parameters.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import TraceError
from ..results import AnalyticEstimate, LayerRow, MemCategory, MethodTotal
from .modtrack import ModuleFrame, ModuleTracker
from .rnn import shape_only_rnns
from .workload import DTYPE_BYTES, get_offload, get_optimizer_name, optimizer_state_count

if TYPE_CHECKING:  # pragma: no cover
    from .workload import Workload


# =========================================================================== pure formulas
def conv_params(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    groups: int = 1,
    bias: bool = True,
    dims: int = 2,
) -> int:
    """Seed 001: ``C_out * C_in/groups * k_h * k_w`` (+ ``C_out`` bias); any number of spatial dims."""
    ks = (kernel_size,) * dims if isinstance(kernel_size, int) else tuple(kernel_size)
    return out_channels * (in_channels // groups) * math.prod(ks) + (out_channels if bias else 0)


def conv_transpose_params(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    groups: int = 1,
    bias: bool = True,
    dims: int = 2,
) -> int:
    """Transposed conv: weight ``C_in x C_out/groups x k...`` (+ ``C_out`` bias)."""
    ks = (kernel_size,) * dims if isinstance(kernel_size, int) else tuple(kernel_size)
    return in_channels * (out_channels // groups) * math.prod(ks) + (out_channels if bias else 0)


def linear_params(in_features: int, out_features: int, bias: bool = True) -> int:
    """Seed 001: ``out * in`` (+ ``out`` bias)."""
    return out_features * in_features + (out_features if bias else 0)


def batchnorm_params(num_features: int, affine: bool = True) -> int:
    """Seed 001: ``2C`` (weight and bias); running mean/var are buffers, not parameters."""
    return 2 * num_features if affine else 0


def layernorm_params(normalized_shape: int | Sequence[int], elementwise_affine: bool = True, bias: bool = True) -> int:
    """Seed 001: ``2 * normalized features`` (weight and bias)."""
    n = normalized_shape if isinstance(normalized_shape, int) else math.prod(normalized_shape)
    if not elementwise_affine:
        return 0
    return 2 * n if bias else n


def groupnorm_params(num_channels: int, affine: bool = True) -> int:
    """Seed 001: ``2C`` (weight and bias per channel)."""
    return 2 * num_channels if affine else 0


def embedding_params(num_embeddings: int, embedding_dim: int) -> int:
    """Seed 001: ``num * dim``."""
    return num_embeddings * embedding_dim


def four_part_bytes(
    params: int, activations: int, optimizer: str = "adam", bytes_per_element: int = 4, trainable: int | None = None
) -> dict[str, int]:
    """Seed 000: ``bytes * (params + gradients + optimizer state + activations)``.

    ``params`` and ``activations`` are element counts; gradients = the trainable
    parameters, optimizer state = 0/1/2 x the trainable parameters by optimizer.
    Returns the four parts and ``total`` in bytes.
    """
    trainable = params if trainable is None else trainable
    parts = {
        "params": params * bytes_per_element,
        "gradients": trainable * bytes_per_element,
        "optimizer_state": optimizer_state_count(optimizer) * trainable * bytes_per_element,
        "activations": activations * bytes_per_element,
    }
    parts["total"] = sum(parts.values())
    return parts


@dataclass(frozen=True)
class OptimizerState:
    """Optimizer state bytes for a set of trainable tensors: on the GPU, in unified memory, in CPU memory."""

    device_bytes: int
    paged_bytes: int = 0
    host_bytes: int = 0  # offloaded: fp32 master weights + the state


def optimizer_state_bytes(
    optimizer: str, tensors: Iterable[tuple[tuple[int, ...], int]], offload: str = "none"
) -> OptimizerState:
    """The state ``optimizer`` keeps for trainable tensors given as ``(shape, element size)``.

    Param-sized states count in the parameter's dtype (torch.optim); bitsandbytes' 8-bit AdamW
    keeps two ``uint8`` states + ``float32`` absmax per 256 values (``float32`` states below 4096
    values, 2 KiB of quantization maps once); Adafactor a row and a column per matrix
    (transformers' in ``float32``). Offloaded, the state is ``float32`` in CPU memory, beside an
    ``float32`` master copy of every trainable tensor. Scalars (``step``) are left out.
    """
    from .optimizers import QMAP_SIZE, adam8bit_state_bytes

    name = get_optimizer_name(optimizer)
    offloaded = get_offload(offload) == "optimizer"
    device = paged = masters = 0
    any_8bit = False
    for shape, el in tensors:
        numel = math.prod(shape)
        if offloaded:
            masters += 4 * numel
            el = 4
        if name in ("adamw8bit", "paged-adamw8bit"):
            on_gpu, on_pages = adam8bit_state_bytes(numel, paged=name == "paged-adamw8bit")
            device += on_gpu
            paged += on_pages
            any_8bit = any_8bit or numel >= 4096
        elif name in ("adafactor", "adafactor-hf"):
            size = 4 if name == "adafactor-hf" else el
            if len(shape) >= 2 and shape[-1] and shape[-2]:
                device += size * (numel // shape[-1] + numel // shape[-2])
            else:
                device += size * numel
        else:
            device += optimizer_state_count(name) * el * numel
    if any_8bit:
        device += 2 * QMAP_SIZE * 4
    if offloaded:
        return OptimizerState(device_bytes=0, host_bytes=masters + device)
    return OptimizerState(device_bytes=device, paged_bytes=paged)


def cruncher_counts(dim: int, num_layers: int, batch: int, optimizer: str = "adagrad") -> dict[str, int]:
    """Seed 000's element counts for its Cruncher MLP, literally as the seed writes them.

    ``num_activations = B*D*num_layers`` leaves out the final layer's ``B x 1`` output
    (the seed says so: "a simplified estimate"); the model-driven estimate counts it.
    """
    params = dim * dim * num_layers + dim
    return {
        "params": params,
        "activations": batch * dim * num_layers,
        "gradients": params,
        "optimizer_states": optimizer_state_count(optimizer) * params,
    }


def cruncher_total_bytes(
    dim: int, num_layers: int, batch: int, optimizer: str = "adagrad", bytes_per_element: int = 4
) -> int:
    """Seed 000: ``total_memory = 4 * (params + activations + gradients + optimizer_states)``."""
    return bytes_per_element * sum(cruncher_counts(dim, num_layers, batch, optimizer).values())


# =========================================================================== per-layer formulas
def module_param_formula(module) -> int | None:
    """The seed-001 formula for ``module``'s own parameters, or None if memprof has none for its type."""
    from torch import nn

    m = module
    if type(m).__module__ == "memprof.engine.quantize" and hasattr(m, "method"):  # bitsandbytes stand-ins
        values = m.out_features * m.in_features
        packed = (values + 1) // 2 if m.method in ("nf4", "fp4") else values
        return packed + (m.out_features if m.bias is not None else 0)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return conv_transpose_params(m.in_channels, m.out_channels, m.kernel_size, m.groups, m.bias is not None)
    if isinstance(m, nn.modules.conv._ConvNd):
        return conv_params(m.in_channels, m.out_channels, m.kernel_size, m.groups, m.bias is not None)
    if isinstance(m, nn.Linear):
        return linear_params(m.in_features, m.out_features, m.bias is not None)
    if isinstance(m, nn.Bilinear):
        return m.out_features * m.in1_features * m.in2_features + (m.out_features if m.bias is not None else 0)
    if isinstance(m, (nn.modules.batchnorm._NormBase)):  # BatchNorm*, InstanceNorm*, SyncBatchNorm
        return batchnorm_params(m.num_features, m.affine)
    if isinstance(m, nn.LayerNorm):
        return layernorm_params(m.normalized_shape, m.elementwise_affine, getattr(m, "bias", None) is not None)
    if isinstance(m, nn.GroupNorm):
        return groupnorm_params(m.num_channels, m.affine)
    if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
        return math.prod(m.normalized_shape) if m.elementwise_affine else 0
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return embedding_params(m.num_embeddings, m.embedding_dim)
    if isinstance(m, nn.PReLU):
        return m.num_parameters
    if isinstance(m, nn.MultiheadAttention):  # own tensors only; out_proj is a child Linear
        e, kd, vd = m.embed_dim, m.kdim, m.vdim
        n = 3 * e * e if m._qkv_same_embed_dim else e * e + e * kd + e * vd
        n += 3 * e if m.in_proj_bias is not None else 0
        n += 2 * e if m.bias_k is not None else 0  # add_bias_kv: bias_k, bias_v of (1, 1, E)
        return n
    if not any(True for _ in m.parameters(recurse=False)) and not list(m.children()):
        return 0  # parameter-free layers: activations, pooling, dropout, flatten, ...
    return None


# =========================================================================== meta-device run
@dataclass
class _Call:
    name: str
    module: Any
    leaf: bool = True
    in_bytes: int = 0
    out_bytes: int = 0
    out_elements: int = 0
    out_shapes: tuple = ()
    fp32_out_elements: int = 0  # every floating output as 4-byte (torchsummary)
    in_shapes: tuple = ()
    in_ids: frozenset = frozenset()
    returns_input: bool = False  # the output is one of the inputs (identity: Dropout in eval, Identity)

    @property
    def no_new_memory(self) -> bool:
        """In-place (``inplace=True``, the seeds' in-place ReLU) or returning its input: no new output."""
        return self.returns_input or _is_inplace(self.module)


@dataclass
class _Run:
    calls: list[_Call] = field(default_factory=list)
    input_bytes: int = 0
    input_elements: int = 0
    #: why the forward stopped early (it reads tensor values the meta device does not have)
    stopped: str | None = None


def _tensors(obj) -> list:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _shape_text(shape: Iterable[int]) -> str:
    return "×".join(str(d) for d in shape) or "scalar"


def _is_inplace(module) -> bool:
    return bool(getattr(module, "inplace", False))


class _CallRecorder:
    """Every module call of one forward (on the module tracker): input and output sizes, innermost calls."""

    def __init__(self, model, act_bytes: int | None):
        self.model = model
        self.act_bytes = act_bytes  # element size for floating outputs under AMP (None: the tensor's own)
        self.calls: list[_Call] = []
        self.modules = ModuleTracker(on_enter=self._enter, on_exit=self._exit, backward=False)

    def __enter__(self):
        self.modules.attach(self.model, root_name="(model)")  # a module reachable under two names: its first
        return self

    def __exit__(self, *exc):
        self.modules.detach()
        return False

    def failed_call(self) -> _Call | None:
        """The innermost call whose forward raised."""
        frame = self.modules.stack[-1] if self.modules.stack else self.modules.failed
        return frame.data if frame is not None else None

    def _size(self, tensors) -> tuple[int, int, int]:
        elements = nbytes = fp32 = 0
        seen = set()
        for t in tensors:
            key = id(t)
            if key in seen:
                continue
            seen.add(key)
            n = t.numel()
            elements += n
            if t.is_floating_point():
                fp32 += n
                nbytes += n * (self.act_bytes or t.element_size())
            else:
                nbytes += n * t.element_size()
        return elements, nbytes, fp32

    def _enter(self, module, name: str, args, kwargs) -> _Call:
        stack = self.modules.stack
        if stack:
            stack[-1].data.leaf = False
        call = _Call(name, module)
        inputs = _tensors((args, kwargs))
        call.in_bytes = self._size(inputs)[1]
        call.in_shapes = tuple(tuple(t.shape) for t in inputs)
        call.in_ids = frozenset(id(t) for t in inputs)
        return call

    def _exit(self, frame: ModuleFrame, output) -> None:
        if output is None and sys.exc_info()[1] is not None:  # its forward raised: not a call that ran
            return
        call = frame.data
        outs = _tensors(output)
        call.returns_input = bool(outs) and all(id(t) in call.in_ids for t in outs)
        call.out_shapes = tuple(tuple(t.shape) for t in outs)
        call.out_elements, call.out_bytes, call.fp32_out_elements = self._size(outs)
        self.calls.append(call)


def _build_meta_model(workload: Workload):
    """The workload's model on the meta device, in its parameter dtype, trainable flags untouched."""
    import torch

    from ..errors import ModelLoadError
    from .workload import build_model

    plain = workload.replace(checkpointing="none", mode="train")
    try:
        model = build_model(plain, torch.device("meta"))
    except ModelLoadError as exc:
        # a constructor that computes with tensor values (regnet's widths: .tolist()) cannot run on
        # the meta device: build it for real on the CPU, then move it to meta (ties survive .to())
        if "meta" not in exc.message:
            raise
        model = build_model(plain, torch.device("cpu")).to(torch.device("meta"))
    model.train(workload.mode == "train")
    return model


def _run(model, workload: Workload, batch: int, act_bytes: int | None) -> _Run:
    """One forward on the meta device with hooks; an exception becomes InputShapeError naming the layer."""
    import torch

    args, kwargs, target = workload.make_batch(torch.device("meta"), batch)
    run = _Run()
    rec = _CallRecorder(model, act_bytes)
    run.input_bytes = rec._size(_tensors((args, kwargs, target)))[1]
    run.input_elements = rec._size(_tensors((args, kwargs)))[0]
    try:
        context = workload.model.step_context(model, workload, fake=False, meta=True)
        with context, rec, torch.set_grad_enabled(workload.mode == "train"), shape_only_rnns():
            model(*args, **kwargs)
    except MemoryError:
        raise
    except Exception as exc:
        error = _shape_error(exc, rec, args, kwargs, workload)
        if not isinstance(error, TraceError):
            raise error from None
        # a data-dependent forward: the formulas count the layers that ran (the trace runs it for real)
        run.stopped = error.message
    run.calls = rec.calls
    return run


def _shape_error(exc: Exception, rec: _CallRecorder, args, kwargs, workload: Workload) -> Exception:
    """The innermost module that was running, its input shape and what it expects (:mod:`.blame`)."""
    from .blame import expects, forward_error, raised, raised_in_model_code

    call = rec.failed_call()
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    meta_problem = not raised_in_model_code(exc) and (
        isinstance(exc, NotImplementedError)
        or "meta" in first_line.lower()
        or "data-dependent" in first_line.lower()
        or "item()" in first_line
    )
    if meta_problem:
        where = f"layer {call.name!r} ({type(call.module).__name__})" if call is not None else "the model"
        return TraceError(
            f"{where} cannot run on the meta device: {raised(exc)}",
            "the model reads tensor values during forward; memprof needs shape-only execution "
            "(avoid .item()/.tolist() on activations)",
        )
    inner = call is not None and call.module is not rec.model
    return forward_error(
        exc,
        layer=call.name if inner and call is not None else None,
        layer_type=type(call.module).__name__ if inner and call is not None else None,
        got=" + ".join(_shape_text(s) for s in call.in_shapes) if call is not None and call.in_shapes else None,
        expects=expects(call.module) if inner and call is not None else None,
        model_input=workload.model.input_description(),
        batch=workload.batch_size,
        # no layer with parameters has finished: what the failing layer got is (close to) memprof's input
        first_layer=not any(next(c.module.parameters(recurse=False), None) is not None for c in rec.calls),
    )


# =========================================================================== the estimate
def _param_table(model) -> tuple[dict[Any, int], int, int, int, int, int]:
    """Own (first-owner) parameter counts per module; totals counted by storage."""
    owned: dict[Any, int] = {}
    seen: set[int] = set()
    names_seen = 0
    total = trainable = param_bytes = 0
    for module in model.modules():
        for p in module._parameters.values():
            if p is None:
                continue
            names_seen += 1
            key = p.untyped_storage()._cdata
            if key in seen:
                continue
            seen.add(key)
            n = p.numel()
            owned[module] = owned.get(module, 0) + n
            total += n
            param_bytes += n * p.element_size()
            if p.requires_grad:
                trainable += n
    tied = names_seen - len(seen)
    return owned, total, trainable, param_bytes, tied, len(seen)


def _trainable_tensors(model) -> list[tuple[tuple[int, ...], int]]:
    """(shape, element size) of every trainable parameter, each storage once."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        key = p.untyped_storage()._cdata
        if p.requires_grad and key not in seen:
            seen.add(key)
            out.append((tuple(p.shape), p.element_size()))
    return out


def _buffers(model) -> tuple[int, int]:
    seen: set[int] = set()
    count = nbytes = 0
    for b in model.buffers():
        key = b.untyped_storage()._cdata
        if key in seen:
            continue
        seen.add(key)
        count += b.numel()
        nbytes += b.numel() * b.element_size()
    return count, nbytes


def _activation_bytes(run: _Run, mode: str) -> int:
    leaves = [c for c in run.calls if c.leaf]
    if mode != "train":  # nothing is kept: the largest layer's input and output are live at once
        return max((c.in_bytes + (0 if c.no_new_memory else c.out_bytes) for c in leaves), default=0)
    return sum(c.out_bytes for c in leaves if not c.no_new_memory)


def analyse(workload: Workload) -> AnalyticEstimate:
    """Apply the seeds' formulas to ``workload`` (one meta-device forward at the batch and one at batch+1)."""
    import torch

    start = time.perf_counter()
    precision = workload.precision
    model = _build_meta_model(workload)
    owned, n_params, n_trainable, param_bytes, tied, _ = _param_table(model)
    n_buffers, buffer_bytes = _buffers(model)
    train = workload.mode == "train"
    n_grad = n_trainable if train else 0  # eval: no gradients, no optimizer state
    el = precision.param_bytes
    act_el = precision.compute_bytes if precision.is_amp else None

    batch = workload.batch_size
    run = _run(model, workload, batch, act_el)
    run_next = _run(model, workload, batch + 1, act_el)

    activation = _activation_bytes(run, workload.mode)
    activation_next = _activation_bytes(run_next, workload.mode)
    k = optimizer_state_count(workload.optimizer) if train else 0
    trainable = _trainable_tensors(model) if train else []
    state = optimizer_state_bytes(workload.optimizer, trainable, workload.offload)
    breakdown: dict[MemCategory, int] = {
        MemCategory.PARAMETER: param_bytes,
        MemCategory.BUFFER: buffer_bytes,
        MemCategory.GRADIENT: sum(math.prod(shape) * size for shape, size in trainable),
        MemCategory.OPTIMIZER_STATE: state.device_bytes,
        MemCategory.ACTIVATION: activation,
        MemCategory.INPUT: run.input_bytes,
    }
    notes: list[str] = []
    if run.stopped:
        notes.append(f"activations counted only up to where the forward stopped: {run.stopped}")
    if precision.is_amp and train:  # autocast keeps low-precision copies of the weights it casts
        breakdown[MemCategory.TEMPORARY] = n_grad * precision.compute_bytes
        notes.append(
            f"AMP: activations at {precision.compute_bytes} B/element, "
            "plus one low-precision copy of the weights (Temporary)"
        )
    kv_per_sample = 0
    if workload.mode == "generate" and workload.model.hf is not None:
        from .hf import kv_cache_formula

        # the cache after the last decode step: prompt + new tokens - 1 (the last token is never fed back)
        tokens = (workload.seq_len or workload.model.hf.default_seq_len) + (workload.new_tokens or 1) - 1
        kv = kv_cache_formula(workload.model.hf.config, batch, tokens, el, static=workload.kv_cache == "static")
        breakdown[MemCategory.KV_CACHE] = kv
        kv_per_sample = kv // batch
        notes.append(
            "KV cache by formula: 2 x layers x batch x KV heads x head dim x cached tokens x bytes "
            "(grouped-query heads; sliding-window layers capped at their window)"
        )
    total = sum(breakdown.values())
    per_sample = (activation_next - activation) + (run_next.input_bytes - run.input_bytes) + kv_per_sample
    fixed = total - per_sample * batch

    # ---- per-layer rows: innermost calls aggregated per module, plus parameter owners never called
    rows: dict[Any, dict] = {}
    for call in run.calls:
        own = owned.get(call.module, 0)
        if not call.leaf and not own:
            continue
        row = rows.setdefault(
            call.module, {"name": call.name, "shapes": call.out_shapes, "act": 0, "calls": 0, "inplace": False}
        )
        row["calls"] += 1
        if call.leaf and call.no_new_memory:
            row["inplace"] = True
        elif call.leaf:
            row["act"] += call.out_bytes
    for module, _n in owned.items():
        if module not in rows:
            rows[module] = {
                "name": next((nm for m, nm in _names(model) if m is module), "?"),
                "shapes": (),
                "act": 0,
                "calls": 0,
                "inplace": False,
            }
    checked = 0
    mismatches: list[str] = []
    layers = []
    for module, row in rows.items():
        formula = module_param_formula(module)
        numel = sum(p.numel() for p in module.parameters(recurse=False))
        if formula is not None and numel:
            checked += 1
            if formula != numel:
                mismatches.append(f"{row['name']} ({type(module).__name__}): formula {formula:,} vs numel {numel:,}")
        layers.append(
            LayerRow(
                name=row["name"],
                type=type(module).__name__,
                output_shapes=tuple(row["shapes"]),
                params=owned.get(module, 0),
                formula_params=formula,
                activation_bytes=row["act"],
                calls=row["calls"],
                inplace=row["inplace"],
            )
        )
    if mismatches:
        notes.append(f"{len(mismatches)} layer(s) differ from the per-layer formulas (numel() is used)")
    if tied:
        notes.append(f"{tied} tied parameter tensor(s) counted once")
    if workload.checkpointing != "none":
        notes.append("the formulas ignore activation checkpointing (the traced estimate includes it)")
    if state.paged_bytes:
        notes.append(f"paged optimizer state: {state.paged_bytes:,d} bytes in CUDA unified memory, not counted")
    if state.host_bytes:
        notes.append(f"offloaded optimizer: {state.host_bytes:,d} bytes (fp32 masters + state) in CPU memory")
    weights = None
    if workload.freeze or workload.train_only or workload.lora is not None or workload.quantize != "none":
        from .finetune import weight_breakdown

        weights = weight_breakdown(model)

    # ---- the other estimators, for comparison
    leaves = [c for c in run.calls if c.leaf]
    outputs_elems = sum(c.out_elements for c in leaves if not c.no_new_memory)
    type_size = el
    ms_params = n_params * type_size
    ms_forward = outputs_elems * type_size
    methods = [
        MethodTotal(
            "formula (four-part rule)", total, activation, "params + grads + optimizer state + outputs + input"
        ),
        MethodTotal(
            "modelsize ×2", ms_params + 2 * ms_forward, 2 * ms_forward, "params + outputs ×2 (in-place ReLU skipped)"
        ),
    ]
    containers = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    ts_out = sum(
        c.fp32_out_elements for c in run.calls if c.module is not model and not isinstance(c.module, containers)
    )
    ts_input = run.input_elements * 4
    methods.append(
        MethodTotal(
            "torchsummary-style",
            ts_input + 2 * ts_out * 4 + n_params * 4,
            2 * ts_out * 4,
            "input + 2 × all module outputs + params, 4 B",
        )
    )
    ti_out = sum(c.out_bytes for c in leaves if any(True for _ in c.module.parameters(recurse=False)))
    methods.append(
        MethodTotal(
            "torchinfo-style",
            run.input_bytes + 2 * ti_out + param_bytes,
            2 * ti_out,
            "input + 2 × param-layer outputs + params",
        )
    )
    if train:
        methods.append(MethodTotal("accelerate-style", 4 * param_bytes, None, "4 × model size (Adam), no activations"))

    return AnalyticEstimate(
        batch_size=batch,
        param_count=n_params,
        trainable_param_count=n_trainable,
        tied_param_count=tied,
        buffer_count=n_buffers,
        bytes_per_element=el,
        activation_bytes_per_element=act_el or el,
        optimizer_states=k,
        module_output_elements=outputs_elems,
        breakdown=breakdown,
        total_bytes=total,
        per_sample_bytes=per_sample,
        fixed_bytes=fixed,
        modelsize_param_bytes=ms_params,
        modelsize_forward_bytes=ms_forward,
        modelsize_backward_bytes=2 * ms_forward,
        methods=tuple(methods),
        layers=tuple(layers),
        formula_checked=checked,
        formula_mismatches=tuple(mismatches),
        notes=tuple(notes),
        seconds=time.perf_counter() - start,
        weights=weights,
        host_bytes=state.host_bytes or None,
    )


def _names(model):
    for name, module in model.named_modules():
        yield module, name or "(model)"


def analytic_total_at(estimate: AnalyticEstimate, batch: int) -> int:
    """The formula total at another batch size (linear: fixed + per_sample x batch)."""
    return estimate.fixed_bytes + estimate.per_sample_bytes * batch


def largest_batch(estimate: AnalyticEstimate, capacity_bytes: int, limit: int = 1 << 24) -> int | None:
    """The largest batch whose formula total fits ``capacity_bytes`` (None: not even 1)."""
    if analytic_total_at(estimate, 1) > capacity_bytes:
        return None
    if estimate.per_sample_bytes <= 0:
        return limit
    return min(limit, (capacity_bytes - estimate.fixed_bytes) // estimate.per_sample_bytes)


__all__ = [
    "analyse",
    "analytic_total_at",
    "largest_batch",
    "module_param_formula",
    "conv_params",
    "conv_transpose_params",
    "linear_params",
    "batchnorm_params",
    "layernorm_params",
    "groupnorm_params",
    "embedding_params",
    "four_part_bytes",
    "cruncher_counts",
    "cruncher_total_bytes",
    "DTYPE_BYTES",
]
