"""``memprof compare``: what each precision, optimizer and memory-saving technique buys.

A baseline workload plus axes (dtype, optimizer, checkpointing, in-place ReLU, mode,
batch size) become rows; every row is traced (the same fake-tensor step as
``memprof estimate``), optionally fitted to a capacity, measured for real and, for
checkpointed rows, priced in recomputed FLOPs. Pure: no printing; the tracer, the batch
fitter, the measurer and the FLOP counter are injectable so the logic is testable with
fakes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..engine import checkpointing as ckpt
from ..engine import fit as fitting
from ..engine.distributed import get_strategy, is_sharded
from ..engine.finetune import LoraSpec, parse_method, parse_patterns
from ..engine.flops import recompute_cost
from ..engine.roofline import GpuPeaks, step_time, tokens_per_sample
from ..engine.workload import LOOPS, Workload, get_offload, get_optimizer_name, get_precision
from ..errors import Interrupted, MemprofError, UsageError
from ..results import (
    Capacity,
    CompareFit,
    CompareMeasurement,
    CompareResult,
    CompareRow,
    CudaTarget,
    GpuSpec,
    MemCategory,
    RecomputeInfo,
    Target,
)

#: the axes a comparison can vary, in the order rows and labels use them; a ``strategy`` value is
#: ``"none"`` (one process) or ``"STRATEGY:WORLD_SIZE"`` (``"fsdp:8"``: one rank of 8 under FSDP2)
AXES = (
    "dtype",
    "optimizer",
    "checkpointing",
    "inplace_relu",
    "loop",
    "mode",
    "batch_size",
    "seq_len",
    "freeze",
    "lora",
    "quantize",
    "offload",
    "strategy",
)
#: the fine-tuning levers among them (memprof compare ranks their rows by the largest batch)
LEVER_AXES = ("optimizer", "checkpointing", "freeze", "lora", "quantize", "offload", "dtype")
#: dtypes the default comparison shows (besides the baseline's)
DEFAULT_DTYPES = ("fp32", "amp-fp16", "amp-bf16", "fp16")
#: pure half precision: no fp32 master weights (shown, but not recommended by the verdict)
PURE_HALF = ("fp16", "bf16")


# =========================================================================== variants
@dataclass(frozen=True)
class Variant:
    """One row to trace: a label, its workload and what differs from the baseline."""

    label: str
    workload: Workload
    changes: dict[str, Any]
    baseline: bool = False
    #: added by the default set (dropped with a note, not shown as an error, when it cannot apply)
    optional: bool = False


def axis_value(workload: Workload, axis: str) -> Any:
    if axis == "dtype":
        return workload.precision.name
    if axis == "inplace_relu":
        return workload.inplace_relu
    if axis == "strategy":
        return f"{workload.strategy}:{workload.world_size}" if workload.distributed else "none"
    if axis == "quantize":
        return workload.quantize + ("+dq" if workload.double_quant else "")
    return getattr(workload, axis)


def strategy_value(strategy: str, world_size: int | None) -> str:
    """The ``strategy`` axis value for ``strategy`` on ``world_size`` ranks (``"none"``: one process)."""
    name = get_strategy(strategy)
    if name == "none":
        return "none"
    if world_size is None or isinstance(world_size, bool) or int(world_size) < 1:
        raise UsageError(f"`strategy` {name} needs a world size, got {world_size!r}", "e.g. fsdp:8 (8 ranks)")
    return f"{name}:{int(world_size)}"


def _normalize(axis: str, value: Any) -> Any:
    if axis == "dtype":
        return get_precision(value).name
    if axis == "optimizer":
        return get_optimizer_name(value)
    if axis == "checkpointing":
        return ckpt.parse_mode(value)
    if axis == "inplace_relu":
        if isinstance(value, str):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if axis == "mode":
        mode = str(value).strip().lower()
        if mode not in ("train", "eval"):
            raise UsageError(f"unknown mode {value!r}", "choose train or eval (no_grad inference)")
        return mode
    if axis == "strategy":
        name, _, size = str(value).partition(":")
        try:
            world = int(size) if size else None
        except ValueError:
            raise UsageError(f"cannot read the strategy {value!r}", "write STRATEGY:RANKS, e.g. fsdp:8") from None
        return strategy_value(name, world)
    if axis == "freeze":
        return parse_patterns(value, "freeze") if value else ()
    if axis == "lora":
        if value is None or isinstance(value, LoraSpec):
            return value
        if isinstance(value, str) and value.strip().lower() in ("none", "0", "off"):
            return None
        try:
            rank = int(value)
        except (TypeError, ValueError):
            raise UsageError(f"`lora_rank` must be an integer, got {value!r}", "e.g. `lora_rank` 16") from None
        return LoraSpec(rank) if rank else None
    if axis == "quantize":
        text = str(value).strip().lower()
        double = text.endswith(("+dq", "+double-quant"))
        method = parse_method(text.split("+")[0])
        return method + ("+dq" if double and method in ("nf4", "fp4") else "")
    if axis == "offload":
        return get_offload(value)
    if axis == "batch_size":
        try:
            batch = int(value)
        except (TypeError, ValueError):
            batch = 0
        if batch <= 0 or isinstance(value, bool):
            raise UsageError(f"batch size must be a positive integer, got {value!r}", "e.g. --batch-size 64")
        return batch
    if axis == "seq_len":
        try:
            seq = int(value)
        except (TypeError, ValueError):
            seq = 0
        if seq <= 0 or isinstance(value, bool):
            raise UsageError(f"`seq_len` must be a positive integer, got {value!r}", "e.g. `seq_len` 4096")
        return seq
    if axis == "loop":
        loop = str(value).strip().lower()
        if loop not in LOOPS:
            raise UsageError(f"unknown loop {value!r}", "choose plain (output kept through backward) or trainer")
        return loop
    raise UsageError(f"unknown comparison axis {axis!r}", f"choose from {', '.join(AXES)}")


def normalize_axes(axes: Mapping[str, Iterable[Any]]) -> dict[str, list[Any]]:
    """Validate and normalise axis values (aliases resolved, duplicates dropped, order kept)."""
    out: dict[str, list[Any]] = {}
    for axis in AXES:
        values = axes.get(axis)
        if values is None:
            continue
        seen: list[Any] = []
        for v in values:
            v = _normalize(axis, v)
            if v not in seen:
                seen.append(v)
        if seen:
            out[axis] = seen
    unknown = set(axes) - set(AXES)
    if unknown:
        raise UsageError(f"unknown comparison axis {sorted(unknown)[0]!r}", f"choose from {', '.join(AXES)}")
    return out


def default_axes(base: Workload) -> dict[str, list[Any]]:
    """fp32, amp-fp16, amp-bf16, fp16 and per-block checkpointing (what `memprof compare MODEL` shows)."""
    axes: dict[str, list[Any]] = {"dtype": [d for d in DEFAULT_DTYPES if d != base.precision.name]}
    if base.mode == "train" and base.checkpointing == "none":
        axes["checkpointing"] = ["blocks"]
    return axes


def apply_change(workload: Workload, axis: str, value: Any) -> Workload:
    value = _normalize(axis, value)
    if axis == "dtype":
        return workload.replace(precision=get_precision(value))
    if axis == "seq_len":
        from .workload import check_seq_len

        check_seq_len(workload.model, value, workload.new_tokens if workload.mode == "generate" else None)
    if axis == "strategy":
        if value == "none":
            return workload.replace(strategy="none", world_size=1, offload="none")
        name, size = value.split(":")
        offload = workload.offload if (workload.offload != "params" or is_sharded(name)) else "none"
        return workload.replace(strategy=name, world_size=int(size), offload=offload)
    if axis == "quantize":
        method, _, dq = value.partition("+")
        return workload.replace(quantize=method, double_quant=bool(dq))
    return workload.replace(**{axis: value})


def _part(axis: str, value: Any) -> str:
    if axis == "dtype":
        return str(value)
    if axis == "optimizer":
        return str(value)
    if axis == "checkpointing":
        return "no checkpointing" if value == "none" else f"checkpointing {value}"
    if axis == "inplace_relu":
        return "in-place ReLU" if value else "no in-place ReLU"
    if axis == "mode":
        return {"eval": "eval (no_grad)", "generate": "generate"}.get(value, "train")
    if axis == "seq_len":
        return f"{value} tokens"
    if axis == "loop":
        return "trainer loop" if value == "trainer" else "plain loop"
    if axis == "strategy":
        if value == "none":
            return "one process"
        name, size = value.split(":")
        return f"{name} × {size}"
    if axis == "freeze":
        return "freeze " + ",".join(value) if value else "nothing frozen"
    if axis == "lora":
        return f"LoRA r={value.rank}" if value is not None else "no LoRA"
    if axis == "quantize":
        return "unquantized" if value == "none" else value.replace("+dq", " (double quant)")
    if axis == "offload":
        return "optimizer on the CPU" if value == "optimizer" else "optimizer on the GPU"
    return f"batch {value}"


def variant_label(changes: Mapping[str, Any]) -> str:
    return " + ".join(_part(axis, changes[axis]) for axis in AXES if axis in changes)


def _key(w: Workload) -> tuple:
    train = w.mode == "train"
    return (
        w.precision.name,
        w.optimizer if train else None,
        w.checkpointing if train else "none",
        w.inplace_relu,
        w.loop if train else None,
        w.mode,
        w.batch_size,
        w.seq_len,
        axis_value(w, "strategy"),
        w.freeze,
        w.train_only,
        w.lora,
        w.quantize,
        w.double_quant,
        w.offload if train else "none",
    )


def make_variants(
    base: Workload, axes: Mapping[str, Iterable[Any]] | None = None, *, combine: bool = False
) -> list[Variant]:
    """The baseline, then one row per axis value (or, with ``combine``, per combination).

    Without axes: :func:`default_axes`. Rows identical to an earlier one (e.g. eval with a
    different optimizer) are dropped.
    """
    optional = not axes
    chosen = normalize_axes(axes) if axes else default_axes(base)
    base_label = base.precision.name + (
        f" {_part('strategy', axis_value(base, 'strategy'))}" if base.distributed else ""
    )
    rows = [Variant(f"{base_label} (baseline)", base, {}, baseline=True)]
    seen = {_key(base)}
    if combine:
        options = [[axis_value(base, a)] + [v for v in vals if v != axis_value(base, a)] for a, vals in chosen.items()]
        combos = [dict(zip(chosen, values, strict=False)) for values in itertools.product(*options)]
    else:
        combos = [{axis: v} for axis, vals in chosen.items() for v in vals]
    for combo in combos:
        w = base
        try:
            for axis, v in combo.items():
                w = apply_change(w, axis, v)
        except UsageError:  # a combination that cannot exist (offloaded 8-bit optimizer, LoRA + freeze)
            continue
        key = _key(w)
        if key in seen:
            continue
        seen.add(key)
        changes = {axis: axis_value(w, axis) for axis in AXES if axis_value(w, axis) != axis_value(base, axis)}
        if w.mode != "train":  # optimizer, checkpointing and the loop do nothing outside training
            changes.pop("optimizer", None)
            changes.pop("checkpointing", None)
            changes.pop("loop", None)
        rows.append(Variant(variant_label(changes), w, changes, optional=optional))
    return rows


# =========================================================================== measurement adapters
@dataclass(frozen=True)
class Measured:
    """What a measurer returns for one real step (injectable; see :func:`compare`)."""

    peak_bytes: int | None  # None: out of memory
    oom: bool = False
    metric: str = "allocated"
    seconds: float = 0.0
    note: str | None = None


TraceFn = Callable[..., Any]  # (workload, *, target) -> TraceResult
FitFn = Callable[..., CompareFit]  # like traced_fit
MeasureFn = Callable[[Workload], Measured]
FindFn = Callable[[Workload], "int | None"]
RecomputeFn = Callable[[Workload], Any]  # -> flops.RecomputeCost


def _default_trace(
    workload: Workload, *, target: str, cuda_target: CudaTarget | None = None, count_bytes: bool = False
):
    """The row's trace. On the CPU, tensor storages only (``kernel_scratch=False``): what the CPU cap
    (``--memory-limit``) counts, as a GPU would, and what ``--measure`` on the CPU measures.
    ``count_bytes``: also the bytes each op moves, for the step-time model."""
    from ..engine.trace import trace_step

    return trace_step(workload, target=target, kernel_scratch=False, cuda_target=cuda_target, count_bytes=count_bytes)


def traced_fit(
    workload: Workload,
    capacity_bytes: int,
    *,
    target: Target,
    headroom: float,
    max_batch: int | None,
    traced: Any,
    trace_fn: TraceFn | None = None,
    max_traces: int = 40,
) -> CompareFit:
    """The largest batch whose traced peak fits ``capacity_bytes``, exact under the tracer
    (:func:`memprof.engine.fit.fit_batch`, starting from the row's own trace)."""
    row_trace = trace_fn or _default_trace

    def trace(w: Workload, *, target: Target, kernel_scratch: bool = False) -> Any:
        return row_trace(w, target=target)

    fit = fitting.fit_batch(
        workload,
        capacity_bytes,
        target=target,
        headroom=headroom,
        max_batch=max_batch,
        known={workload.batch_size: traced},
        trace_fn=trace,
        max_traces=max_traces,
    )
    at_batch = fitting.value_of(traced, fit.metric)
    return CompareFit(
        metric=fit.metric,
        max_batch=fit.max_batch,
        recommended_batch=fit.recommended_batch,
        fits=at_batch is not None and at_batch <= capacity_bytes,
        limited_by_max=fit.max_batch is not None and fit.max_batch == (max_batch or fitting.SEARCH_LIMIT),
        traces=fit.traces,
        exact=fit.exact,
    )


def real_step_measurer(device: str, memory_limit: int | None = None, steps: int = 2) -> MeasureFn:
    """A ``measure_fn`` running each row's real training steps at its batch size.

    CUDA: find-batch's runner (``torch.cuda.max_memory_allocated``). CPU: find-batch's
    capped runner - the peak of live tensor storages, exactly what the CPU rows are traced
    as (without oneDNN's in-kernel scratch); crossing ``memory_limit`` is an out-of-memory
    (no limit: nothing is capped, the peak is still measured).
    """
    from ..engine.measure import CpuCapRunner, Runner, make_runner

    runner: Runner
    if device == "cpu":
        runner = CpuCapRunner(memory_limit if memory_limit is not None else 1 << 62)
        metric = "live tensor bytes"
    else:
        runner = make_runner(device, memory_limit)
        metric = "allocated"

    def measure(workload: Workload) -> Measured:
        if workload.distributed:
            return Measured(
                None,
                metric=metric,
                note="one rank of a data-parallel job is measured by a real torchrun job: "
                "scripts/validate_multigpu.py, or find-batch --nproc-per-node",
            )
        trial = runner.run(workload, workload.batch_size, steps)
        note = None if trial.fits else f"out of memory at batch {workload.batch_size} ({trial.oom_phase})"
        return Measured(
            peak_bytes=trial.peak_allocated_bytes if trial.fits else None,
            oom=not trial.fits,
            metric=metric,
            seconds=trial.seconds,
            note=note,
        )

    return measure


def real_batch_finder(device: str, memory_limit: int | None, headroom: float, max_batch: int | None = None) -> FindFn:
    """A ``find_fn``: each row's largest batch with real steps (``memprof find-batch``)."""
    from .find_batch import DEFAULT_MAX_BATCH, find_batch

    def find(workload: Workload) -> int | None:
        if workload.distributed:
            return None  # one rank alone cannot run a data-parallel step: find-batch --nproc-per-node
        limit = max_batch or DEFAULT_MAX_BATCH
        return find_batch(
            workload, device=device, memory_limit=memory_limit, headroom=headroom, max_batch=limit
        ).largest_batch

    return find


# =========================================================================== compare
def _row_from_trace(v: Variant, r: Any) -> dict[str, Any]:
    totals = r.totals
    at_peak = dict(r.breakdown_at_peak)
    flops = getattr(r, "flops", None)
    return dict(
        step_flops=flops.step_flops if flops is not None else None,
        flops_per_sample=flops.per_sample_flops if flops is not None else None,
        peak_bytes=int(r.peak_bytes),
        parameter_bytes=int(totals.get(MemCategory.PARAMETER, 0)),
        gradient_bytes=int(totals.get(MemCategory.GRADIENT, 0)),
        optimizer_state_bytes=int(totals.get(MemCategory.OPTIMIZER_STATE, 0)),
        activation_bytes=int(totals.get(MemCategory.ACTIVATION, 0)),
        temporary_bytes=int(at_peak.get(MemCategory.TEMPORARY, 0)),
        input_bytes=int(totals.get(MemCategory.INPUT, 0)),
        buffer_bytes=int(totals.get(MemCategory.BUFFER, 0)),
        breakdown_at_peak=at_peak,
        peak_phase=r.peak_phase,
        peak_module=r.peak_module,
        trace_seconds=float(getattr(r, "trace_seconds", 0.0)),
        modelled=tuple(getattr(r, "modelled", ())),
        method=str(getattr(r, "method", "trace")),
        trainable_params=r.weights.trainable_params if getattr(r, "weights", None) is not None else None,
        host_peak_bytes=getattr(r, "host_peak_bytes", None),
        paged_bytes=getattr(r, "paged_bytes", None),
    )


def _row_notes(w: Workload) -> list[str]:
    notes = []
    p = w.precision
    if w.mode == "eval":
        notes.append("eval: forward under no_grad, no gradients, no optimizer state, nothing saved for backward")
    elif p.is_amp:
        notes.append(
            "AMP (amp-fp16, amp-bf16): fp32 master weights, gradients and optimizer state kept; eligible "
            "ops run in 16 bits, so saved activations shrink by about half - the activation column also "
            "holds the 16-bit weight copies autocast makes for backward (about half the parameter bytes), "
            "which dominate at small batches"
        )
    elif p.name in PURE_HALF:
        notes.append(
            "pure fp16/bf16: parameters, gradients and optimizer state in 16 bits - no fp32 master "
            "weights, so small updates can underflow; usually trained with AMP instead"
        )
    return notes


def _measure_row(
    v: Variant, predicted: int | None, measure_fn: MeasureFn | None, find_fn: FindFn | None
) -> CompareMeasurement | None:
    if measure_fn is None and find_fn is None:
        return None
    started = time.perf_counter()
    m = measure_fn(v.workload) if measure_fn is not None else None
    max_b = find_fn(v.workload) if find_fn is not None else None
    peak = m.peak_bytes if m is not None else None
    error = None
    if peak and predicted is not None:
        error = 100.0 * (predicted - peak) / peak
    return CompareMeasurement(
        metric=m.metric if m is not None else "allocated",
        peak_bytes=peak,
        predicted_bytes=predicted,
        error_pct=error,
        oom=bool(m and m.oom),
        max_batch=max_b,
        seconds=time.perf_counter() - started,
        note=m.note if m is not None else None,
    )


def _recompute_info(w: Workload, recompute_fn: RecomputeFn | None, traced: Any = None) -> RecomputeInfo | None:
    """The checkpointing plan (``recompute_fn``); the FLOPs from the row's trace when it counted them
    (the recomputation it ran in backward, exactly), else from ``recompute_fn``'s estimate."""
    if w.checkpointing == "none" or w.mode != "train" or recompute_fn is None:
        return None
    cost = recompute_fn(w)
    forward, recompute, extra = cost.forward_flops, cost.recompute_flops, cost.extra_pct
    flops = getattr(traced, "flops", None)
    if flops is not None:
        forward, recompute = flops.forward_flops, flops.recompute_flops
        without = flops.step_flops - recompute
        extra = 100.0 * recompute / without if without else None
    return RecomputeInfo(
        plan=cost.plan,
        regions=cost.regions,
        forward_flops=forward,
        recompute_flops=recompute,
        extra_pct=extra,
        batchnorm_recomputed=bool(getattr(cost, "batchnorm_recomputed", False)),
    )


def _error_row(v: Variant, message: str) -> CompareRow:
    return CompareRow(
        label=v.label,
        changes=dict(v.changes),
        workload=v.workload.describe(),
        baseline=v.baseline,
        peak_bytes=None,
        parameter_bytes=None,
        gradient_bytes=None,
        optimizer_state_bytes=None,
        activation_bytes=None,
        temporary_bytes=None,
        input_bytes=None,
        buffer_bytes=None,
        breakdown_at_peak={},
        delta_bytes=None,
        delta_pct=None,
        peak_phase=None,
        peak_module=None,
        fit=None,
        recompute=None,
        measured=None,
        error=message,
    )


def _is_pure_half(row: CompareRow) -> bool:
    return row.workload.get("dtype") in PURE_HALF


def order_rows(rows: list[CompareRow], base_batch: int) -> tuple[list[CompareRow], str | None, str | None]:
    """Baseline first; rows at the baseline's batch size and mode by peak; other batch sizes by batch, then the
    other mode (eval); errors last. Only the first group competes for "best".

    "Better" than the baseline: a lower peak, or the same peak and a larger largest batch.
    Returns (rows with ``best`` set, best label, best label among rows with fp32 master weights).
    """
    baseline = [r for r in rows if r.baseline]
    ok = [r for r in rows if not r.baseline and r.error is None]
    base_mode = baseline[0].workload.get("mode") if baseline else "train"

    base_seq = baseline[0].workload.get("seq_len") if baseline else None

    def comparable(r: CompareRow) -> bool:  # same batch, sequence and mode: a real alternative to the baseline
        return (
            r.workload.get("batch_size") == base_batch
            and r.workload.get("mode") == base_mode
            and r.workload.get("seq_len") == base_seq
        )

    def max_batch(r: CompareRow) -> int:
        return r.fit.max_batch or 0 if r.fit is not None else 0

    # lowest peak first; on a tie (the peak sits in the optimizer step at small batches) the larger batch
    same = sorted((r for r in ok if comparable(r)), key=lambda r: (r.peak_bytes, -max_batch(r)))
    other = sorted(
        (r for r in ok if not comparable(r)),
        key=lambda r: (
            r.workload.get("mode") != base_mode,
            r.workload.get("batch_size"),
            r.workload.get("seq_len") or 0,
            r.peak_bytes,
        ),
    )
    failed = [r for r in rows if not r.baseline and r.error is not None]
    base_peak = baseline[0].peak_bytes if baseline and baseline[0].peak_bytes is not None else None
    base_batch = max_batch(baseline[0]) if baseline else 0

    def better(r: CompareRow) -> bool:
        if base_peak is None:
            return True
        assert r.peak_bytes is not None  # only rows without an error compete
        return r.peak_bytes < base_peak or (r.peak_bytes == base_peak and max_batch(r) > base_batch)

    best = next((r for r in same if better(r)), None)
    safe = next((r for r in same if not _is_pure_half(r) and better(r)), None)
    ordered = [dataclasses.replace(r, best=r is best) for r in baseline + same + other + failed]
    return ordered, best.label if best else None, safe.label if safe else None


def rank_by_batch(rows: Iterable[CompareRow]) -> list[str]:
    """Labels of the rows that fit (largest batch >= 1), the largest batch first; ties by lower peak."""
    fitting = [r for r in rows if r.error is None and r.fit is not None and r.fit.max_batch]
    fitting.sort(key=lambda r: (-(r.fit.max_batch or 0) if r.fit else 0, r.peak_bytes or 0))
    return [r.label for r in fitting]


def best_lever(rows: Iterable[CompareRow]) -> tuple[str | None, int | None]:
    """The row changing one lever only (at the baseline's batch size) whose largest batch gains the most."""
    rows = list(rows)
    base = next((r for r in rows if r.baseline), None)
    if base is None or base.fit is None:
        return None, None
    base_batch = base.fit.max_batch or 0
    best: tuple[int, int, str] | None = None
    for r in rows:
        if r.baseline or r.error is not None or r.fit is None or len(r.changes) != 1:
            continue
        (axis,) = r.changes
        if axis not in LEVER_AXES:
            continue
        gain = (r.fit.max_batch or 0) - base_batch
        key = (gain, -(r.peak_bytes or 0), r.label)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None or best[0] <= 0:
        return None, None
    return best[2], best[0]


def compare(
    base: Workload,
    axes: Mapping[str, Iterable[Any]] | None = None,
    *,
    variants: list[Variant] | None = None,
    combine: bool = False,
    target: Target = "cuda",
    capacity: Capacity | None = None,
    capacity_note: str | None = None,
    headroom: float = fitting.DEFAULT_HEADROOM,
    fit: bool = True,
    max_batch: int | None = None,
    trace_fn: TraceFn | None = None,
    fit_fn: FitFn | None = None,
    measure_fn: MeasureFn | None = None,
    find_fn: FindFn | None = None,
    recompute_fn: RecomputeFn | None = recompute_cost,
    on_progress: Callable[[int, int, str], None] | None = None,
    cuda_target: CudaTarget | None = None,
    gpu: GpuPeaks | None = None,
) -> CompareResult:
    """Trace every variant of ``base`` and put them side by side.

    ``axes`` maps axis names (:data:`AXES`) to values; none given: :func:`default_axes`.
    ``capacity`` (bytes the step must fit) adds the largest and recommended batch per
    row (``fit_fn``, by default :func:`traced_fit`). ``measure_fn`` /
    ``find_fn`` run real steps (``--measure`` / ``--find-batch``). ``gpu`` (a catalog entry or a
    :class:`memprof.engine.roofline.PeakSpec`) adds each row's step-time model. A row that cannot
    be traced becomes an error row; a failing baseline raises. Ctrl-C after the baseline raises
    :class:`~memprof.errors.Interrupted` (a ``KeyboardInterrupt``) holding the rows traced so far.
    """
    if target not in ("cuda", "cpu"):
        raise UsageError(f"unknown target {target!r}", "choose cuda or cpu")
    headroom = fitting.check_headroom(headroom)
    started = time.perf_counter()
    if trace_fn is None:
        if target == "cuda":
            from ..engine.catalog import resolve_target, with_capacity

            cuda_target = cuda_target or resolve_target()
            if capacity is not None and fit:
                cuda_target = with_capacity(cuda_target, capacity.total_bytes)
        trace_fn = functools.partial(_default_trace, cuda_target=cuda_target)
    fit_fn = fit_fn or traced_fit
    variants = variants if variants is not None else make_variants(base, axes, combine=combine)
    notes: list[str] = []
    raw: list[tuple[Variant, dict[str, Any] | None, str | None]] = []
    total = len(variants)
    interrupted = False
    for i, v in enumerate(variants):
        if on_progress is not None:
            on_progress(i + 1, total, v.label)
        try:
            result = trace_fn(v.workload, target=target, **({"count_bytes": True} if gpu is not None else {}))
            traced = _row_from_trace(v, result)
            traced["recompute"] = _recompute_info(v.workload, recompute_fn, result)
            traced["step_time"] = None
            if gpu is not None and getattr(result, "_op_costs", None) is not None:
                traced["step_time"] = step_time(result, gpu, tokens=tokens_per_sample(v.workload))
            traced["fit"] = None
            if fit and capacity is not None:
                traced["fit"] = fit_fn(
                    v.workload,
                    capacity.total_bytes,
                    target=target,
                    headroom=headroom,
                    max_batch=max_batch,
                    traced=result,
                    trace_fn=trace_fn,
                )
            traced["measured"] = _measure_row(v, traced["peak_bytes"], measure_fn, find_fn)
            raw.append((v, traced, None))
        except KeyboardInterrupt:
            if v.baseline:
                raise
            interrupted = True  # the rows traced so far are the answer (raised below as Interrupted)
            notes.append(
                f"interrupted (Ctrl-C) while tracing {v.label}: {total - i} of {total} configurations left out"
            )
            break
        except MemprofError as exc:
            if v.baseline:
                raise
            if v.optional:
                notes.append(f"{v.label} left out: {exc.message}")
                continue
            raw.append((v, None, exc.message + (f" ({exc.hint})" if exc.hint else "")))
        except MemoryError:
            raise
        except Exception as exc:  # a tracer bug on one row must not cost the others
            if v.baseline:
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            raw.append((v, None, f"memprof failed: {type(exc).__name__}: {first}"))
    base_traced = raw[0][1]
    assert base_traced is not None  # the baseline comes first, and a failing baseline raised above
    base_peak = base_traced["peak_bytes"]
    base_flops = base_traced["flops_per_sample"]
    rows: list[CompareRow] = []
    for v, data, error in raw:
        if data is None:
            rows.append(_error_row(v, error or "failed"))
            continue
        delta = data["peak_bytes"] - base_peak
        per_sample = data["flops_per_sample"]
        compute = 100.0 * (per_sample - base_flops) / base_flops if per_sample is not None and base_flops else None
        rows.append(
            CompareRow(
                label=v.label,
                changes=dict(v.changes),
                workload=v.workload.describe(),
                baseline=v.baseline,
                delta_bytes=delta,
                delta_pct=100.0 * delta / base_peak if base_peak else None,
                compute_delta_pct=compute,
                notes=tuple(_row_notes(v.workload)),
                **data,
            )
        )
    for r in rows:
        if r.changes.get("inplace_relu") and r.error is None:
            if len(r.changes) == 1 and r.delta_bytes == 0:
                notes.append(
                    "in-place ReLU: no change - the model's nn.ReLU modules already run in place, or it "
                    "has none (functional relu is not changed)"
                )
            else:
                notes.append("in-place ReLU: each nn.ReLU overwrites its input instead of allocating its output")
    ordered, best, safe = order_rows(rows, base.batch_size)
    lever, lever_gain = best_lever(ordered) if capacity is not None and fit else (None, None)
    if capacity is None and fit:
        notes.append(capacity_note or "no capacity given: largest-batch columns left out (use --gpu-memory 24GiB)")
    result = CompareResult(
        model=base.model.display_name,
        base_workload=base.describe(),
        target=target,
        peak_metric=_peak_metric(target),
        capacity=capacity if fit else None,
        capacity_note=capacity_note if capacity is None else None,
        headroom=headroom,
        rows=tuple(ordered),
        best_label=best,
        safe_best_label=safe,
        notes=tuple(dict.fromkeys(notes)),
        seconds=time.perf_counter() - started,
        gpu=gpu.name if gpu is not None else None,
        step_time_note=None if gpu is not None else "step time: needs a GPU (--gpu NAME)",
        ranked_by_batch=tuple(rank_by_batch(ordered)) if capacity is not None and fit else (),
        best_lever_label=lever,
        best_lever_gain=lever_gain,
        interrupted=interrupted,
    )
    if interrupted:
        raise Interrupted(result)
    return result


def resolve_capacity(
    device: str, gpu_memory: int | None, memory_limit: int | None, gpu: GpuSpec | None = None
) -> tuple[Capacity | None, str | None]:
    """(capacity or None, why none): ``memory_limit`` on the CPU; on CUDA ``gpu_memory``, else the
    catalog GPU's (``gpu``), else the local GPU via NVML (:func:`memprof.commands.estimate.estimate_capacity`)."""
    from .estimate import estimate_capacity

    capacity, why = estimate_capacity(device, gpu_memory, memory_limit, gpu=gpu if device != "cpu" else None)
    if capacity is not None:
        return capacity, None
    if device == "cpu":
        return None, "no --memory-limit: largest-batch columns left out (e.g. --memory-limit 8GiB)"
    return None, f"no --gpu-memory and no local GPU ({why}): largest-batch columns left out (e.g. --gpu-memory 24GiB)"


def _peak_metric(target: str) -> str:
    if target == "cpu":
        return "peak CPU allocator bytes of the step run on the CPU (tensors + oneDNN convolution scratch)"
    return "torch.cuda.max_memory_allocated() of the step (tensors + cuBLAS workspace)"
