"""Result types: frozen dataclasses with bytes as ints, and one category enum.

Every result converts to plain JSON-able data with :func:`to_dict`; the top-level
JSON object of every command carries ``schema_version``. Each command's result
classes live here, in its own section.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Literal

SCHEMA_VERSION = 1

#: what a traced step predicts: a CUDA step or the same step run on the CPU
Target = Literal["cuda", "cpu"]
#: where in a training step something happened
Phase = Literal["setup", "forward", "backward", "optimizer", "done"]
#: which estimate a number comes from
Source = Literal["traced", "formula"]
#: how a traced result was recorded
METHOD_TRACE = "trace"
METHOD_REAL = "real CPU run"
#: how a batch search ended
SearchStatus = Literal["exact", "max_batch", "nothing_fits", "interrupted", "trial_limit"]
#: how a profiled script ended
ScriptStatus = Literal["ok", "exit", "exception", "interrupted"]


class Metric(str, enum.Enum):
    """Which memory figure is compared with a capacity (values are the JSON strings)."""

    ALLOCATED = "allocated"  # live tensor storages: torch.cuda.max_memory_allocated, or the CPU cap's count
    RESERVED = "reserved"  # the CUDA caching allocator's segments: torch.cuda.max_memory_reserved
    NVML = "nvml"  # what nvidia-smi shows for the process: reserved + CUDA context


class MemCategory(str, enum.Enum):
    """Where bytes go. The values are the labels people read."""

    PARAMETER = "Parameter"
    BUFFER = "Buffer"
    GRADIENT = "Gradient"
    OPTIMIZER_STATE = "Optimizer state"
    ACTIVATION = "Activation"
    TEMPORARY = "Temporary"
    INPUT = "Input"
    KV_CACHE = "KV cache"  # generation: the keys and values kept for the tokens seen so far
    CUDA_OVERHEAD = "CUDA overhead"  # context, cuBLAS/cuDNN workspaces: NVML sees it, torch does not
    #: data parallelism (FSDP / ZeRO-2/3): whole parameters gathered from the shards for a unit's forward or backward
    GATHERED_PARAMETER = "Gathered parameter"
    #: data parallelism: buffers collectives read or write (DDP gradient buckets, all-gather outputs,
    #: reduce-scatter inputs) that are not a parameter, gradient or gathered parameter
    COMMUNICATION = "Communication buffer"

    @property
    def key(self) -> str:
        """snake_case name used as JSON key."""
        return self.name.lower()


def to_dict(obj: Any) -> Any:
    """Dataclasses, enums, tuples and dicts -> plain JSON-able data (enum dict keys become ``.key``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.name.startswith("_")}
    if isinstance(obj, MemCategory):
        return obj.key
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {(k.key if isinstance(k, MemCategory) else str(k)): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def document(kind: str, payload: Any) -> dict[str, Any]:
    """The top-level JSON object: ``{"schema_version": 1, "kind": ..., **payload}``."""
    body = to_dict(payload)
    if not isinstance(body, dict):
        body = {"result": body}
    return {"schema_version": SCHEMA_VERSION, "kind": kind, **body}


# =========================================================================== capacity / fit
@dataclasses.dataclass(frozen=True)
class Capacity:
    """The memory a step must fit in, and where that number came from."""

    total_bytes: int
    source: str  # "--gpu-memory", "NVML: NVIDIA H100 80GB HBM3 (GPU 0)", "--memory-limit"
    device_name: str | None = None


# =========================================================================== GPU catalog / CUDA target
#: dtype names of GpuSpec.peak_tflops (int8 in TOPS)
PEAK_DTYPES = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8")


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One entry of the GPU catalog (``configs/gpus.toml``): capacity, architecture, peak dense
    throughput per dtype and memory bandwidth, each with its source.

    ``memory_bytes`` is the total PyTorch reports for the card when ``memory_reported`` is True,
    else the vendor's size read as GiB (an upper bound). ``peak_tflops`` holds dense peaks in
    TFLOP/s (TOPS for int8) for the dtypes the card has; :meth:`peak_flops` returns FLOP/s.
    """

    key: str  # "h100-sxm": what --gpu takes
    name: str
    arch: str  # "sm90" (NVIDIA compute capability) or "gfx942" (AMD)
    memory_bytes: int
    memory_reported: bool
    memory_source: str
    bandwidth_bytes_per_s: int
    bandwidth_source: str
    peak_tflops: dict[str, float]
    tflops_source: str
    match: tuple[str, ...] = ()  # substrings of the device name torch / NVML report
    context_bytes: int | None = None  # measured CUDA context for this card, when a source gives one
    context_source: str | None = None

    @property
    def capability(self) -> tuple[int, int] | None:
        """(major, minor) for an NVIDIA ``smXY`` arch, None for others."""
        return arch_capability(self.arch)

    def peak_flops(self, dtype: str) -> float | None:
        """Peak dense FLOP/s (OP/s for int8) in ``dtype`` ("bf16", "fp32", ...), None when the card has none."""
        tflops = self.peak_tflops.get(dtype)
        return None if tflops is None else tflops * 1e12


def arch_capability(arch: str) -> tuple[int, int] | None:
    """``"sm90"`` -> (9, 0), ``"sm100"`` -> (10, 0), ``"sm121"`` -> (12, 1); None for non-NVIDIA archs."""
    if not arch.startswith("sm") or not arch[2:].isdigit() or len(arch) < 4:
        return None
    digits = arch[2:]
    return int(digits[:-1]), int(digits[-1])


@dataclasses.dataclass(frozen=True)
class CudaTarget:
    """The CUDA device a traced prediction is for. Its architecture picks the CUDA rules memprof applies
    (cuBLAS workspace size, which attention kernel runs, CUDA context); ``source`` says where it came
    from, ``assumed`` is True when nothing said (no GPU visible, no ``gpu`` / ``gpu_arch`` given)."""

    arch: str  # "sm90"
    source: str  # "--gpu h100-sxm", "--gpu-arch sm80", "local GPU 0 (NVIDIA A10G)", "assumed: ..."
    gpu: GpuSpec | None = None
    assumed: bool = False
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark in the training script
    #: the caching allocator's settings ("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"); None: defaults
    alloc_conf: str | None = None
    #: the device memory the process may use, when known (the fit's capacity): past it the allocator
    #: releases its cached segments and retries before running out of memory, and the replay does too
    capacity_bytes: int | None = None

    @property
    def capability(self) -> tuple[int, int] | None:
        return arch_capability(self.arch)

    @property
    def is_rocm(self) -> bool:
        return self.arch.startswith("gfx")


# =========================================================================== compute (FLOPs, step time)
@dataclasses.dataclass(frozen=True)
class ModuleFlops:
    """FLOPs of the ops one module runs itself (its children's ops count for them), over one traced step."""

    name: str  # dotted module name, "(model)" for the root, "(outside modules)" for the loss and functional code
    type: str
    forward_flops: int
    backward_flops: int  # autograd's nodes for this module's forward ops, recomputation included


@dataclasses.dataclass(frozen=True)
class UncountedOp:
    """An op the FLOP counter has no formula for: it ran, and counts 0 FLOPs (listed, never silently)."""

    name: str  # "aten.native_batch_norm"
    calls: int  # over one step
    kind: str  # "pointwise" | "memory" (copies, fills, indexing, concatenation) | "other" (may hide FLOPs)


#: how FLOPs are counted (PyTorch's FlopCounterMode convention)
FLOP_CONVENTION = (
    "torch.utils.flop_counter formulas: 2 FLOPs per multiply-add of matrix multiplications, convolutions and "
    "attention (bias additions, normalisation, activations, pooling and optimizer arithmetic count 0)"
)


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of one traced step, counted per op by PyTorch's FLOP formulas and attributed to modules and phases.

    ``backward_flops`` includes ``recompute_flops`` (forward ops activation checkpointing runs again
    in backward). MACs are FLOPs / 2 under this convention.
    """

    batch_size: int
    forward_flops: int  # model forward and loss
    backward_flops: int
    optimizer_flops: int  # optimizer.step() and zero_grad()
    recompute_flops: int
    step_flops: int  # forward + backward + optimizer
    per_sample_flops: float  # step_flops / batch_size
    by_op: dict[str, int]  # FLOPs per op over the step ("aten.convolution": ...)
    modules: tuple[ModuleFlops, ...]  # in first-run order
    uncounted_ops: tuple[UncountedOp, ...]  # most calls first
    convention: str = FLOP_CONVENTION

    @property
    def forward_macs(self) -> int:
        return self.forward_flops // 2


@dataclasses.dataclass(frozen=True)
class StepTime:
    """A roofline lower bound on one step's time on a GPU: a model, not a measurement.

    Every traced op takes at least max(FLOPs / peak FLOP/s for its dtype, bytes it reads and writes /
    memory bandwidth); the sum over the step is a lower bound (no launch latency, no overlap loss,
    no kernel below its peak), so the throughput is an upper bound.
    """

    gpu: str
    seconds: float  # lower bound per step
    forward_seconds: float
    backward_seconds: float
    optimizer_seconds: float
    compute_bound_seconds: float  # part of ``seconds`` spent in ops limited by FLOP/s
    memory_bound_seconds: float  # part limited by memory bandwidth
    step_bytes: int  # bytes read and written by all ops of the step
    samples_per_second: float  # upper bound: batch / seconds
    tokens_per_second: float | None  # samples/s x tokens per sample, for token inputs
    peak_flops_per_s: dict[str, float]  # the peaks the model used, per dtype of the step's ops
    bandwidth_bytes_per_s: float
    label: str = "model, not measured"
    assumptions: tuple[str, ...] = ()


# =========================================================================== fine-tuning
@dataclasses.dataclass(frozen=True)
class WeightBreakdown:
    """The parameters as fine-tuning sees them: trainable, frozen base, LoRA adapters, quantization state.

    ``trainable_params`` / ``all_params`` are what ``peft``'s ``print_trainable_parameters`` prints
    (a 4-bit packed weight counts 2 values per stored byte). Bytes are storage bytes (no CUDA
    rounding): ``trainable_bytes`` are trainable parameters that are not adapters (all of them
    without LoRA), ``frozen_bytes`` frozen parameters (base weights, 4-bit/8-bit packed weights),
    ``adapter_bytes`` LoRA's ``lora_A``/``lora_B``; ``quant_state_bytes`` the quantized layers'
    absmax, codes and row scales (kept as buffers).
    """

    trainable_params: int
    all_params: int
    trainable_bytes: int
    frozen_bytes: int
    adapter_bytes: int
    adapter_params: int
    quant_state_bytes: int = 0
    quantized_layers: int = 0

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.all_params if self.all_params else 0.0

    def peft_line(self) -> str:
        """peft's own wording: ``trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915``."""
        return (
            f"trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} "
            f"|| trainable%: {self.trainable_pct:.4f}"
        )


# =========================================================================== analytic / estimate
@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One module in the analytical per-layer table.

    ``params`` counts the module's own parameters (tied ones only at their first owner,
    so the column sums to the model's total); ``formula_params`` is what the seeds'
    per-layer formula says for this layer type (None: no formula for the type).
    ``activation_bytes`` sums the module's outputs over its calls, 0 when it runs in place
    or returns its input (``inplace`` is then True).
    """

    name: str
    type: str
    output_shapes: tuple[tuple[int, ...], ...]
    params: int
    formula_params: int | None
    activation_bytes: int
    calls: int = 1
    inplace: bool = False


@dataclasses.dataclass(frozen=True)
class MethodTotal:
    """One estimator's total for the workload (the formula, the seeds' modelsize, torchinfo-style, ...)."""

    method: str
    total_bytes: int
    activation_bytes: int | None
    description: str


@dataclasses.dataclass(frozen=True)
class AnalyticEstimate:
    """The seeds' formulas applied to one workload (module outputs from one meta-device forward)."""

    batch_size: int
    param_count: int
    trainable_param_count: int
    tied_param_count: int  # parameter tensors reached under more than one name, counted once
    buffer_count: int  # elements
    bytes_per_element: int  # parameters, gradients, optimizer state
    activation_bytes_per_element: int  # floating activations (2 under AMP)
    optimizer_states: int  # parameter-sized state tensors per parameter (0 in eval mode)
    module_output_elements: int  # summed outputs of the innermost module calls, forward only
    breakdown: dict[MemCategory, int]
    total_bytes: int
    per_sample_bytes: int  # how much each extra sample adds (inputs + activations)
    fixed_bytes: int  # the total at batch 0 (total = fixed + per_sample * batch)
    modelsize_param_bytes: int  # seed 004: parameters x type size
    modelsize_forward_bytes: int  # seed 004: module outputs, forward only
    modelsize_backward_bytes: int  # seed 004: x2 "with backward"
    methods: tuple[MethodTotal, ...]
    layers: tuple[LayerRow, ...]
    formula_checked: int  # layers whose parameters the per-layer formulas checked against numel()
    formula_mismatches: tuple[str, ...]
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    #: parameters split into trainable / frozen / adapters (None when nothing is frozen, adapted or quantized)
    weights: WeightBreakdown | None = None
    #: optimizer state and master weights kept in CPU memory (--offload optimizer), not on the GPU
    host_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class FitSummary:
    """Does the step fit the capacity, and the largest / recommended batch (by formula or by trace)."""

    capacity: Capacity
    source: str  # "traced" | "formula"
    metric: str  # what was compared with the capacity
    estimate_bytes: int  # that metric at the workload's batch size
    fits: bool
    max_batch: int | None  # None: not even batch 1 fits
    recommended_batch: int | None  # floor(headroom x max_batch), at least 1
    headroom: float
    per_sample_bytes: int | None = None
    fixed_bytes: int | None = None
    note: str | None = None  # why a traced step's fit is by formula (other batch sizes failed to trace)


@dataclasses.dataclass(frozen=True)
class VerifiedFigure:
    """One predicted figure next to the same figure measured on a real step."""

    metric: str  # "allocated" | "reserved" | "nvml"
    measured_as: str  # what was read: "torch.cuda.max_memory_allocated()", "live bytes (torch.profiler)", ...
    predicted_bytes: int | None
    measured_bytes: int | None  # None: not measurable here (NVML without permission) or the step failed
    error_pct: float | None  # (predicted - measured) / measured


@dataclasses.dataclass(frozen=True)
class Verification:
    """``estimate --verify``: the real training steps run on the device, and each figure against its prediction."""

    device: str  # "cpu" | "cuda:0 NVIDIA H100 80GB HBM3"
    steps: int
    predicted_source: Source  # the prediction compared: the trace, or the formula when there is none
    figures: tuple[VerifiedFigure, ...]
    seconds: float
    oom: bool = False  # the real step ran out of memory: nothing measured
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class EstimateResult:
    """``memprof estimate``: the workload, the formula estimate, the traced one when available, the fit,
    and with ``verify`` the real step's figures."""

    workload: dict[str, Any]
    headline_bytes: int  # the number to read: the traced peak, or the formula total without a trace
    headline_source: str  # "traced" | "formula"
    analytic: AnalyticEstimate
    traced: Any  # memprof.results.TraceResult | None
    trace_note: str | None  # why there is no traced estimate
    capacity: Capacity | None
    capacity_note: str | None  # why there is no capacity
    fit: FitSummary | None
    target: Target = "cuda"  # the step predicted: a CUDA step, or the same step on the CPU
    verification: Verification | None = None
    seq_fit: Any = None  # SeqFit: the longest sequence at this batch (sequence models, when asked or generating)
    grid: Any = None  # GridFit: batch x sequence length (when asked)
    #: the roofline step-time model on the chosen GPU (a model, not measured); None without a GPU or a trace
    step_time: StepTime | None = None
    step_time_note: str | None = None  # why there is no step time
    #: the trace was asked for and failed: the answer is the formula's only (a partial answer)
    trace_error: str | None = None
    trace_hint: str | None = None  # what to do about trace_error
    interrupted: bool = False  # Ctrl-C during the trace: the formula's answer, the trace left out


# =========================================================================== trace
@dataclasses.dataclass(frozen=True)
class ModelledBytes:
    """Bytes in a prediction that no trace saw: modelled from a library's source or measured behaviour.

    The rest of a traced peak is exact for what the tracer runs; these parts are not, and the
    output says so ("exact trace + 48 MiB modelled"). ``source`` names where the rule comes from
    (a file of PyTorch, cuDNN's documented size query, a measurement); ``verified`` is True once a
    real run (CUDA, or the CPU for CPU-only parts) has confirmed it.
    """

    what: str  # "cuBLAS workspace", "oneDNN convolution scratch", "cuDNN RNN reserve space", ...
    bytes: int  # at the peak
    source: str
    verified: bool = False


@dataclasses.dataclass(frozen=True)
class SavedBlock:
    """Activations one block of the model keeps for backward (its own and its submodules'), at the end of forward.

    ``name`` is a block ("model.layers.0") or a range of alike blocks ("model.layers.0-31", ``count`` 32,
    bytes per block); ``parts`` splits a block's bytes by its direct children ("self_attn", "mlp", ...).
    """

    name: str
    type: str
    count: int
    bytes_each: int
    parts: tuple[tuple[str, int], ...] = ()


#: what each traced number corresponds to on a real CUDA device
TRACE_METRICS: dict[str, str] = {
    "allocated": "torch.cuda.max_memory_allocated() (live tensor storages, 512-byte rounded for cuda; "
    "raw storage bytes for cpu)",
    "reserved": "torch.cuda.max_memory_reserved() (caching-allocator segments, replayed by memprof.engine.allocator)",
    "nvml": "NVML / nvidia-smi per-process used memory (reserved + CUDA context)",
}


@dataclasses.dataclass(frozen=True)
class TimelinePoint:
    """Live bytes after one allocation or free of the traced step(s)."""

    op_index: int  # index of the dispatched op (counted over all traced steps)
    phase: str  # "setup" | "forward" | "backward" | "optimizer" | "done"
    module: str | None  # dotted module name ("" is the root model), None outside any module
    allocated_bytes: int
    step: int = 0  # 0 = first step, 1 = second step, ...


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """One traced training step (or several), on fake tensors: no real memory, no GPU.

    ``peak_bytes`` is the prediction for ``torch.cuda.max_memory_allocated`` (target "cuda")
    or for the peak of live tensor bytes of a real CPU step (target "cpu"); see
    :attr:`metrics` for what each number corresponds to.
    """

    workload: dict[str, Any]
    target: str  # "cuda" | "cpu"
    peak_bytes: int  # max live tensor bytes over the traced steps (+ cuBLAS workspace for cuda)
    first_step_peak_bytes: int
    steady_peak_bytes: int
    peak_phase: str
    peak_module: str | None
    breakdown_at_peak: dict[MemCategory, int]
    totals: dict[MemCategory, int]
    predicted_reserved_bytes: int | None
    predicted_nvml_bytes: int | None
    cuda_overhead_bytes: int | None  # CUDA context + cuBLAS workspaces (the workspaces are also in peak_bytes)
    timeline: tuple[TimelinePoint, ...]
    trace_seconds: float
    notes: tuple[str, ...] = ()
    steps: int = 2
    op_count: int = 0
    peak_step: int = 0
    cublas_workspace_bytes: int | None = None  # included in peak_bytes for cuda (torch allocates it)
    cuda_context_bytes: int | None = None
    #: which real measurement each prediction corresponds to (allocated / reserved / nvml)
    metrics: dict[str, str] = dataclasses.field(default_factory=lambda: dict(TRACE_METRICS))
    #: parts of peak_bytes that are modelled, not traced (their sum is at most peak_bytes)
    modelled: tuple[ModelledBytes, ...] = ()
    #: the highest live total in each phase (forward, backward, optimizer; prefill, decode for generation)
    phase_peaks: dict[str, int] = dataclasses.field(default_factory=dict)
    #: generation: the KV cache at its full length (after the last forward)
    kv_cache_bytes: int | None = None
    #: what each block of the model keeps for backward (train mode), grouped when blocks are alike
    saved_by_block: tuple[SavedBlock, ...] = ()
    #: how the step was recorded: "trace" (fake tensors) or "real CPU run" (the step reads tensor
    #: values, so it ran for real on the CPU at the requested batch, recorded the same way)
    method: str = "trace"
    #: why a real run replaced the trace: the op that read values and the source line that ran it
    method_reason: str | None = None
    #: the CUDA device predicted for (target "cuda"): its architecture and where it came from
    cuda_target: CudaTarget | None = None
    #: scaled_dot_product_attention calls per backend CUDA would pick ("flash", "efficient", "cudnn", "math")
    attention_backends: dict[str, int] = dataclasses.field(default_factory=dict)
    #: FLOPs of the first traced step (None: not counted)
    flops: FlopCount | None = None
    #: per-op FLOPs and bytes for the step-time model (memprof.engine.roofline); not in JSON
    _op_costs: Any = None
    #: data parallelism (workload["strategy"]): the rank traced (every figure above is that rank's)
    rank: int | None = None
    #: data parallelism with `offload`: what the rank keeps on the host instead (not in the figures above)
    host_bytes: int | None = None
    #: parameters split into trainable / frozen / adapters (None when nothing is frozen, adapted or quantized)
    weights: WeightBreakdown | None = None
    #: peak of what the step keeps in CPU memory for a CUDA step (--offload optimizer: fp32 master weights,
    #: CPU gradients, optimizer state, the CPU step's temporaries); None when it keeps nothing there.
    #: For target "cpu" these bytes are also in peak_bytes (everything is CPU memory there).
    host_peak_bytes: int | None = None
    #: paged optimizer state (bitsandbytes paged optimizers: CUDA unified memory, cudaMallocManaged). torch's
    #: allocator never sees it, so it is in no allocated/reserved figure; the driver moves its pages to CPU
    #: memory when the GPU needs the room. None without a paged optimizer.
    paged_bytes: int | None = None

    @property
    def predicted_allocated_bytes(self) -> int:
        return self.peak_bytes


@dataclasses.dataclass(frozen=True)
class BatchFit:
    """The largest batch whose traced prediction fits a capacity."""

    capacity_bytes: int
    metric: str  # "nvml" (cuda) | "allocated" (cpu) | "reserved"
    max_batch: int | None  # None: batch 1 does not fit
    recommended_batch: int | None  # floor(headroom x max_batch), at least 1
    headroom: float
    peak_at_max_bytes: int | None  # the metric at max_batch (at batch 1 when nothing fits)
    peak_at_next_bytes: int | None  # the metric at max_batch + 1 (None when max_batch hit the max_batch limit)
    slope_bytes_per_sample: int
    intercept_bytes: int
    traces: int  # how many traces were used
    limited_by_max: bool = False  # max_batch is the caller's upper limit, not the capacity
    notes: tuple[str, ...] = ()
    exact: bool = True  # False: the search stopped early; max_batch is a lower bound


@dataclasses.dataclass(frozen=True)
class SeqFit:
    """The longest sequence (a multiple of ``multiple_of`` tokens) whose traced prediction fits a capacity.

    In generation the sequence is the prompt; ``context`` adds the tokens generated after it.
    """

    capacity_bytes: int
    metric: str
    batch_size: int
    multiple_of: int
    max_seq_len: int | None  # None: not even `multiple_of` tokens fit
    peak_at_max_bytes: int | None
    peak_at_next_bytes: int | None  # at max_seq_len + multiple_of (None when the limit was reached)
    limit_tokens: int  # the longest sequence searched: the model's positions (less the new tokens) or memprof's limit
    limited_by_positions: bool  # max_seq_len is the model's limit, not the capacity's
    traces: int
    new_tokens: int | None = None  # generation: tokens generated after the prompt
    exact: bool = True
    #: the traced peak as a line in the sequence length (through the shortest and longest traced)
    slope_bytes_per_token: float = 0.0
    intercept_bytes: float = 0.0

    @property
    def context(self) -> int | None:
        """Prompt + generated tokens (generation), or the sequence itself."""
        if self.max_seq_len is None:
            return None
        return self.max_seq_len + (self.new_tokens or 0)


@dataclasses.dataclass(frozen=True)
class GridFit:
    """Which batch x sequence-length combinations fit a capacity: the largest batch at each sequence length."""

    capacity_bytes: int
    metric: str
    batches: tuple[int, ...]
    seq_lens: tuple[int, ...]
    max_batch: tuple[int | None, ...]  # per seq_len: the largest batch that fits (at most max(batches))
    traces: int
    new_tokens: int | None = None

    def fits(self, batch: int, seq_len: int) -> bool:
        largest = self.max_batch[self.seq_lens.index(seq_len)]
        return largest is not None and batch <= largest


# =========================================================================== scaling (estimate --world-size 1,2,8,...)
@dataclasses.dataclass(frozen=True)
class ScalingRow:
    """One world size of a data-parallel sweep: what one rank holds, traced (None where the trace failed)."""

    world_size: int
    strategy: str  # "none" for the one-process row
    peak_bytes: int | None  # one rank's traced peak (allocated)
    metric_bytes: int | None  # the figure compared with the capacity (nvml on CUDA)
    model_state_bytes: int | None  # parameters + gradients + optimizer state on the device, as held by one rank
    activation_bytes: int | None  # saved for backward: the same at every world size
    gathered_bytes: int | None  # gathered parameters alive at the peak (FSDP / ZeRO-2/3)
    communication_bytes: int | None  # communication buffers alive at the peak (buckets, all-gather, reduce-scatter)
    host_bytes: int | None  # offloaded to the host (--offload)
    max_batch: int | None  # the largest batch per rank that fits the capacity (None: not even 1, or no capacity)
    recommended_batch: int | None
    fits: bool | None  # the workload's batch fits (None: no capacity)
    peak_phase: str | None = None
    error: str | None = None

    @property
    def global_batch(self) -> int | None:
        """The largest batch of the whole job: per rank × ranks."""
        return None if self.max_batch is None else self.max_batch * self.world_size


@dataclasses.dataclass(frozen=True)
class ScalingResult:
    """``memprof estimate --strategy S --world-size 1,2,8,...``: per-rank memory and batch at each world size."""

    workload: dict[str, Any]  # the workload at the first world size
    strategy: str
    target: str  # "cuda" | "cpu"
    metric: str  # what metric_bytes and the fit compare with the capacity
    capacity: Capacity | None
    capacity_note: str | None
    headroom: float
    rows: tuple[ScalingRow, ...]
    notes: tuple[str, ...] = ()
    seconds: float = 0.0


# =========================================================================== gpus
@dataclasses.dataclass(frozen=True)
class TorchDevice:
    """One CUDA device as torch numbers it (after CUDA_VISIBLE_DEVICES)."""

    index: int
    name: str
    total_bytes: int | None
    capability: str | None  # "9.0"


@dataclasses.dataclass(frozen=True)
class TorchCudaView:
    """What torch sees: its version, the CUDA it was built for, and its devices."""

    torch_version: str | None
    cuda_available: bool
    cuda_version: str | None  # torch.version.cuda (None: CPU-only build)
    device_count: int
    devices: tuple[TorchDevice, ...] = ()
    reason: str | None = None  # why no device, when none


@dataclasses.dataclass(frozen=True)
class GpusResult:
    """``memprof gpus``: NVML's view (an :class:`memprof.engine.nvml.NVMLStatus`) and torch's view."""

    available: bool  # NVML or torch sees at least one GPU
    reason: str | None  # why not, when not available
    nvml: Any
    torch: TorchCudaView
    #: device name -> the catalog entry (--gpu NAME) it matches, for the local GPUs that match one
    catalog_matches: dict[str, str] = dataclasses.field(default_factory=dict)
    #: every catalog entry, when asked for (``memprof gpus --catalog``)
    catalog: tuple[GpuSpec, ...] = ()


# =========================================================================== profile
@dataclasses.dataclass(frozen=True)
class LineStat:
    """One source line of the user's files, over all its executions ("hits").

    ``delta_bytes``/``max_delta_bytes``: change of the live total across the line, calls made
    from it included (summed over hits / largest single hit); ``alloc_bytes``: allocated by ops
    run on this line itself; ``peak_bytes``: highest live total while it ran; ``live_at_exit_bytes``:
    what it allocated that is still alive when the script ends.
    """

    file: str
    line: int
    source: str
    hits: int
    delta_bytes: int
    max_delta_bytes: int
    alloc_bytes: int
    peak_bytes: int
    live_at_exit_bytes: int


@dataclasses.dataclass(frozen=True)
class ModuleStat:
    """One module (by qualified name), forward and backward, over all its calls."""

    name: str
    type: str
    calls: int
    forward_added_bytes: int  # largest live-bytes increase one forward call left behind (outputs + saved)
    forward_peak_bytes: int  # highest live total during its forward
    backward_alloc_bytes: int  # allocated while autograd ran the nodes its forward created (all calls)
    backward_peak_bytes: int | None  # highest live total during its backward


@dataclasses.dataclass(frozen=True)
class TensorGroup:
    """Storages alive at one moment with the same shape, dtype, device, origin line and category."""

    shape: tuple[int, ...]
    dtype: str
    device: str
    origin: str  # "train.py:23" or "<outside the script's files>"
    category: MemCategory
    count: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class ProfilePeak:
    """The highest live total: when, where, and what was alive."""

    bytes: int
    time_s: float  # since the script started
    op_index: int
    location: str | None  # "train.py:23"
    source: str | None
    module: str | None
    phase: str  # forward | backward | optimizer | script
    breakdown: dict[MemCategory, int]
    tensors: tuple[TensorGroup, ...]


@dataclasses.dataclass(frozen=True)
class LeakSuspect:
    """Memory still alive at exit that looks kept by mistake."""

    origin: str  # "train.py:23" or a global variable name
    source: str | None
    live_bytes: int
    storages: int
    hits_alive: int  # executions of the line whose allocations are still alive
    hits: int
    reason: str


@dataclasses.dataclass(frozen=True)
class ProfileCuda:
    """CUDA-side figures when the script used the GPU."""

    device_name: str | None
    max_allocated_bytes: int
    max_reserved_bytes: int
    reserved_at_exit_bytes: int
    nvml_process_bytes: int | None  # what NVML charges to this process at exit
    context_bytes: int | None  # NVML process usage - torch reserved: CUDA context, cuBLAS/cuDNN workspaces
    snapshot_path: str | None


@dataclasses.dataclass(frozen=True)
class ScriptOutcome:
    """How the script ended; ``exit_code`` is what ``python script.py`` would have returned."""

    status: ScriptStatus
    exit_code: int
    error: str | None = None  # "ZeroDivisionError: division by zero"
    location: str | None = None  # innermost line of the user's files in the traceback
    source: str | None = None
    #: when the script raised: its traceback as Python prints it, the script's own frames only
    traceback: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TimelineSample:
    t_s: float
    allocated_bytes: int
    reserved_bytes: int | None = None
    nvml_bytes: int | None = None


#: ProfileResult.device when only CUDA memory was counted and the script used none
UNUSED_CUDA = "cuda (unused by the script)"


@dataclasses.dataclass(frozen=True)
class ProfileResult:
    """``memprof profile``: a script's memory by line, module and category.

    ``_timeline`` (full resolution, for plots) and ``_log`` (records for ``--log``) stay out of JSON.
    """

    script: str
    argv: tuple[str, ...]
    device: str  # "cpu" or "cuda:0 (NVIDIA H100 ...)"
    wall_s: float
    ops: int
    outcome: ScriptOutcome
    peak: ProfilePeak
    at_exit_bytes: int
    lines: tuple[LineStat, ...]  # most memory added first
    modules: tuple[ModuleStat, ...]
    leaks: tuple[LeakSuspect, ...]
    cuda: ProfileCuda | None
    timeline: tuple[TimelineSample, ...]  # downsampled
    _timeline: Any = None
    _log: Any = None


@dataclasses.dataclass(frozen=True)
class RanksProfileResult:
    """``memprof profile --nproc-per-node N``: the script run as a torchrun job, every rank profiled.

    ``ranks`` holds this node's ranks, rank order; ``missing`` the local ranks that sent no profile
    (the job died before they could).
    """

    script: str
    argv: tuple[str, ...]
    nproc_per_node: int
    world_size: int
    ranks: tuple[tuple[int, ProfileResult], ...]
    missing: tuple[int, ...]
    wall_s: float
    exit_code: int  # torchrun's: non-zero when any rank failed

    @property
    def highest(self) -> tuple[int, ProfileResult] | None:
        """The rank with the highest peak, and its profile."""
        return max(self.ranks, key=lambda rp: rp[1].peak.bytes, default=None)


# =========================================================================== find-batch
@dataclasses.dataclass(frozen=True)
class BatchTrial:
    """One real trial of ``find-batch``: the training step run ``steps`` times at one batch size.

    CPU (memory cap): ``peak_allocated_bytes`` is the peak of live tensor bytes; the
    reserved/NVML fields are None. CUDA: ``torch.cuda.max_memory_allocated`` /
    ``max_memory_reserved`` and NVML's usage for this process, and ``cuda_overhead_bytes``
    = NVML usage - torch reserved (context, cuBLAS/cuDNN workspaces).
    """

    batch_size: int
    fits: bool
    steps_run: int  # steps completed (an OOM in step 2 leaves 1)
    seconds: float
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    nvml_used_bytes: int | None = None
    cuda_overhead_bytes: int | None = None
    capacity_bytes: int | None = None  # what the limited metric could reach during this trial
    error: str | None = None  # the out-of-memory message, one line
    oom_detected_by: str | None = None  # "exception type" | "message"
    oom_phase: str | None = None  # "setup" | "step 2 backward" ...
    attempted_bytes: int | None = None  # CPU cap: live bytes the failing allocation would have made
    leaked_bytes: int | None = None  # still allocated after the cleanup, beyond the pre-trial baseline
    predicted_bytes: int | None = None  # the prediction of the limited metric at this batch
    reason: str | None = None  # why the search tried this batch (prediction, extrapolate, confirm, ...)
    #: several ranks (find-batch under torchrun): each rank's peak allocated bytes, rank 0 first; the
    #: figures above are then the largest rank's (capacity: the smallest), an OOM on any rank is an OOM
    rank_peaks_bytes: tuple[int | None, ...] | None = None
    #: steps (counted in steps_run) whose optimizer.step() GradScaler skipped (inf/nan gradients at its loss
    #: scale) and that were run again; more than engine.workload.MAX_SKIPPED_STEPS: the optimizer stepped fewer
    #: times than asked, so the peak may miss its state (find-batch says so in its notes)
    skipped_steps: int = 0


@dataclasses.dataclass(frozen=True)
class BatchPrediction:
    """The traced prediction the search started from (``memprof.engine.fit.fit_batch``)."""

    max_batch: int | None
    slope_bytes_per_sample: int
    intercept_bytes: int
    metric: str
    seconds: float
    traces: int


@dataclasses.dataclass(frozen=True)
class FindBatchResult:
    """``memprof find-batch``: the largest batch that really fits, and what to use.

    ``status``: "exact" (largest fits, largest + 1 OOMs), "max_batch" (--max-batch fits:
    the limit lies above), "nothing_fits", "interrupted" (Ctrl-C: what was found so far),
    "trial_limit".
    """

    workload: dict[str, Any]
    device: str
    capacity: Capacity
    metric: str  # "allocated" (CPU cap: live tensor bytes) | "reserved" (CUDA)
    steps: int
    status: SearchStatus
    largest_batch: int | None
    smallest_oom_batch: int | None
    recommended_batch: int | None
    recommended_expected_bytes: int | None  # the limited metric at the recommended batch (measured fit)
    headroom_left_bytes: int | None  # capacity - recommended_expected_bytes
    headroom: float
    multiple_of: int | None
    min_batch: int
    max_batch: int
    trials: tuple[BatchTrial, ...]
    ooms: int
    prediction: BatchPrediction | None
    slope_bytes_per_sample: float | None  # measured: affine fit through the fitting trials
    intercept_bytes: float | None
    target_global_batch: int | None = None
    grad_accum_steps: int | None = None
    micro_batch: int | None = None  # per-step batch with grad_accum_steps (<= recommended)
    #: (steps, micro-batch) that make exactly target_global_batch with at most 3 more steps, when
    #: grad_accum_steps x micro_batch overshoots it
    exact_accumulation: tuple[int, int] | None = None
    wall_seconds: float = 0.0
    notes: tuple[str, ...] = ()
    #: what was searched: "batch_size", or "seq_len" (then every batch field above holds a sequence
    #: length in tokens, at the fixed batch `seq_batch_size`)
    axis: str = "batch_size"
    seq_batch_size: int | None = None


# =========================================================================== compare
@dataclasses.dataclass(frozen=True)
class RecomputeInfo:
    """What a checkpointed row pays: its regions' forward runs again in backward."""

    plan: str  # "16 × Bottleneck (repeated blocks)"
    regions: int
    forward_flops: int | None  # one forward (FlopCounterMode: matmuls, convolutions, attention)
    recompute_flops: int | None  # run again during backward
    extra_pct: float | None  # recompute / the step's FLOPs without it, in %
    batchnorm_recomputed: bool = False  # BatchNorm running statistics then update twice per step


@dataclasses.dataclass(frozen=True)
class CompareFit:
    """The largest batch of one row that fits the capacity (traced), and the recommended one."""

    metric: str  # what was compared with the capacity: "nvml" (cuda) | "allocated" (cpu)
    max_batch: int | None  # None: not even batch 1 fits
    recommended_batch: int | None  # floor(headroom x max_batch), at least 1
    fits: bool  # the row's own batch size fits
    limited_by_max: bool = False
    traces: int = 0  # traces the search used
    exact: bool = True  # False: the search stopped early; max_batch is a lower bound


@dataclasses.dataclass(frozen=True)
class CompareMeasurement:
    """A real step of one row (CUDA, or CPU under --memory-limit) next to its prediction."""

    metric: str  # "allocated" (CPU live tensor bytes / torch.cuda.max_memory_allocated)
    peak_bytes: int | None  # None: out of memory or failed
    predicted_bytes: int | None
    error_pct: float | None  # (predicted - measured) / measured
    oom: bool = False
    max_batch: int | None = None  # --find-batch: the largest batch that really ran
    seconds: float = 0.0
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class CompareRow:
    """One configuration, traced. Category bytes: persistent ones as held, activations saved at the
    end of forward, temporaries as alive at the peak; ``breakdown_at_peak`` sums to ``peak_bytes``."""

    label: str
    changes: dict[str, Any]  # axis -> value that differs from the baseline ({} for the baseline)
    workload: dict[str, Any]
    baseline: bool
    peak_bytes: int | None
    parameter_bytes: int | None
    gradient_bytes: int | None
    optimizer_state_bytes: int | None
    activation_bytes: int | None
    temporary_bytes: int | None
    input_bytes: int | None
    buffer_bytes: int | None
    breakdown_at_peak: dict[MemCategory, int]
    delta_bytes: int | None  # peak - baseline peak
    delta_pct: float | None
    peak_phase: str | None
    peak_module: str | None
    fit: CompareFit | None
    recompute: RecomputeInfo | None
    measured: CompareMeasurement | None
    best: bool = False
    error: str | None = None  # this row could not be traced (the others still are)
    notes: tuple[str, ...] = ()
    trace_seconds: float = 0.0
    #: the parts of peak_bytes that are modelled, not traced (TraceResult.modelled)
    modelled: tuple[ModelledBytes, ...] = ()
    #: how the row was recorded (TraceResult.method): "trace" or "real CPU run"
    method: str = "trace"
    step_flops: int | None = None  # traced FLOPs of one step (forward, backward, optimizer)
    flops_per_sample: float | None = None  # step_flops / batch size
    compute_delta_pct: float | None = None  # FLOPs per sample vs the baseline's, in %
    #: the roofline step-time model on the chosen GPU (a model, not measured); None without a GPU
    step_time: StepTime | None = None
    #: peft's count of trainable parameters (None when nothing is frozen, adapted or quantized)
    trainable_params: int | None = None
    #: CPU memory the row keeps for a CUDA step (offloaded optimizer), paged optimizer state
    host_peak_bytes: int | None = None
    paged_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class CompareResult:
    """``memprof compare``: configurations side by side, baseline first, then by peak."""

    model: str
    base_workload: dict[str, Any]
    target: str  # "cuda" | "cpu": what the traced peaks predict
    peak_metric: str  # what peak_bytes means
    capacity: Capacity | None
    capacity_note: str | None  # why there are no fit columns
    headroom: float
    rows: tuple[CompareRow, ...]
    best_label: str | None  # lowest peak at the baseline's batch size (below the baseline's)
    #: lowest peak among rows that keep fp32 master weights (pure fp16/bf16 excluded)
    safe_best_label: str | None
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    gpu: str | None = None  # the GPU of the step-time column
    step_time_note: str | None = None  # why there is no step-time column
    #: rows whose batch fits the capacity (largest batch >= 1), the largest batch first (ties: lower peak)
    ranked_by_batch: tuple[str, ...] = ()
    #: the single lever (a row changing one thing) that allows the largest batch, and its batch gain
    best_lever_label: str | None = None
    best_lever_gain: int | None = None
    interrupted: bool = False  # Ctrl-C after the baseline: the rows traced until then
