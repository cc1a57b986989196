"""``estimate``: one training step's memory by formula and (when available) by trace, and the batch that fits.

The traced prediction (:mod:`memprof.engine.trace`, fake tensors, no memory) is the headline
number and drives the fit; the analytical one (:mod:`memprof.engine.analytic`, the seeds'
formulas) is always computed beside it and used alone with ``traced=False`` or when
the tracer fails.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..engine import fit as fitting
from ..engine.analytic import analyse, largest_batch
from ..engine.roofline import GpuPeaks, step_time, tokens_per_sample
from ..errors import Interrupted, MemprofError, NoGPUError, UsageError
from ..results import (
    AnalyticEstimate,
    BatchFit,
    Capacity,
    CudaTarget,
    EstimateResult,
    FitSummary,
    GpuSpec,
    Metric,
    Source,
    Target,
    TraceResult,
    Verification,
    VerifiedFigure,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.workload import Workload


def parse_device(device: str) -> tuple[Target, int]:
    """``"cuda"``, ``"cuda:N"`` or ``"cpu"`` -> (trace target, CUDA device index)."""
    text = (device or "cuda").strip().lower()
    if text == "cpu":
        return "cpu", 0
    if text == "cuda" or text.startswith("cuda:"):
        try:
            index = int(text.split(":", 1)[1]) if ":" in text else 0
        except ValueError:
            index = -1
        if index >= 0:
            return "cuda", index
    raise UsageError(f"unknown `device` {device!r}", "write cuda, cuda:1 or cpu")


def resolve_capacity(
    capacity_bytes: int | None = None, *, use_nvml: bool = True, index: int = 0, gpu: GpuSpec | None = None
) -> tuple[Capacity | None, str | None]:
    """``gpu_memory`` if given, else the catalog GPU's capacity (``gpu``), else GPU ``index``'s total memory
    via NVML, else ``(None, why not)``."""
    if capacity_bytes is not None:
        return Capacity(total_bytes=int(capacity_bytes), source="--gpu-memory"), None
    if gpu is not None:
        return gpu_capacity(gpu), None
    if not use_nvml:
        return None, "no --gpu-memory given"
    from ..engine import nvml

    info = nvml.device_info(index)
    if info is None:
        _, reason = nvml.available()
        return None, reason or "NVML sees no GPU"
    return Capacity(
        total_bytes=info.total_bytes, source=f"NVML: {info.name} (GPU {info.index})", device_name=info.name
    ), None


def estimate_capacity(
    device: str = "cuda",
    gpu_memory: int | None = None,
    memory_limit: int | None = None,
    *,
    use_nvml: bool = True,
    gpu: GpuSpec | None = None,
) -> tuple[Capacity | None, str | None]:
    """The capacity to fit on ``device``: ``gpu_memory`` (else the catalog GPU's, else the local GPU's via
    NVML) for cuda, ``memory_limit`` for cpu; ``(None, why not)`` without one. Each is refused on the other
    device."""
    target, index = parse_device(device)
    if target == "cpu":
        if gpu_memory is not None:
            raise UsageError("`gpu_memory` is for `device` cuda", "on the CPU the capacity is `memory_limit` 8GiB")
        if gpu is not None:
            raise UsageError("`gpu` is for `device` cuda", "on the CPU the capacity is `memory_limit` 8GiB")
        if memory_limit is None:
            return None, "no --memory-limit given"
        return Capacity(total_bytes=int(memory_limit), source="--memory-limit", device_name="cpu"), None
    if memory_limit is not None:
        raise UsageError("`memory_limit` is for `device` cpu", "on a GPU the capacity is `gpu_memory` 24GiB")
    return resolve_capacity(gpu_memory, use_nvml=use_nvml, index=index, gpu=gpu)


def gpu_capacity(gpu: GpuSpec) -> Capacity:
    """A catalog GPU's capacity: what the card reports, or the vendor's size as an upper bound (said so)."""
    how = "as the card reports it" if gpu.memory_reported else "vendor size, an upper bound: the card reports less"
    return Capacity(total_bytes=gpu.memory_bytes, source=f"--gpu {gpu.key}: {how}", device_name=gpu.name)


def formula_fit(
    analytic: AnalyticEstimate,
    capacity: Capacity,
    headroom: float = fitting.DEFAULT_HEADROOM,
    note: str | None = None,
) -> FitSummary:
    """Fit by the formula total, which is linear in the batch size."""
    max_batch = largest_batch(analytic, capacity.total_bytes)
    return FitSummary(
        capacity=capacity,
        source="formula",
        metric="formula total",
        estimate_bytes=analytic.total_bytes,
        fits=analytic.total_bytes <= capacity.total_bytes,
        max_batch=max_batch,
        recommended_batch=fitting.recommend(max_batch, headroom),
        headroom=headroom,
        per_sample_bytes=analytic.per_sample_bytes,
        fixed_bytes=analytic.fixed_bytes,
        note=note,
    )


def traced_fit(traced: TraceResult, batch_fit: BatchFit, capacity: Capacity) -> FitSummary:
    """A :class:`BatchFit` (from :func:`memprof.engine.fit.fit_batch`) as a :class:`FitSummary`."""
    at_batch = fitting.value_of(traced, batch_fit.metric)
    assert at_batch is not None
    return FitSummary(
        capacity=capacity,
        source="traced",
        metric=Metric(batch_fit.metric).value,
        estimate_bytes=at_batch,
        fits=at_batch <= capacity.total_bytes,
        max_batch=batch_fit.max_batch,
        recommended_batch=batch_fit.recommended_batch,
        headroom=batch_fit.headroom,
        per_sample_bytes=int(batch_fit.slope_bytes_per_sample),
        fixed_bytes=int(batch_fit.intercept_bytes),
    )


def estimate(
    workload: Workload,
    capacity: Capacity | int | None = None,
    headroom: float = fitting.DEFAULT_HEADROOM,
    traced: bool = True,
    capacity_note: str | None = None,
    fit_seq_len: bool | None = None,
    multiple_of: int = 1,
    grid: tuple[list[int], list[int]] | bool | None = None,
    progress: Callable[[str], None] | None = None,
    cuda_target: CudaTarget | None = None,
    gpu: GpuPeaks | None = None,
    *,
    device: str = "cuda",
    verify: bool = False,
) -> EstimateResult:
    """Estimate one step of ``workload`` by formula and, if ``traced``, by fake-tensor trace; fit ``capacity``.

    ``capacity`` is a :class:`Capacity` or a number of bytes; None skips the fit
    (:func:`resolve_capacity` finds the local GPU's).

    Sequence models, with a capacity and a trace: ``fit_seq_len`` also finds the longest sequence at
    this batch (a multiple of ``multiple_of`` tokens; by default on in generation, off in training);
    ``grid`` (``(batches, seq_lens)``, or True for :func:`memprof.engine.fit.default_grid`) finds the
    largest batch at each sequence length. ``cuda_target`` is the GPU architecture the
    trace predicts for (:func:`memprof.engine.catalog.resolve_target`; default: the local GPU, else assumed).
    ``gpu`` (peak FLOP/s and bandwidth: a catalog entry or a :class:`memprof.engine.roofline.PeakSpec`)
    adds the step-time model. ``device`` is the step predicted: ``"cuda"`` (``"cuda:N"``) or ``"cpu"``
    (the same step on the CPU, as ``scripts/validate_cpu.py`` traces it; ``cuda_target`` is then unused).
    ``verify`` also runs the real steps there and puts each figure next to its prediction
    (:func:`verify_step`); on CUDA it needs a GPU, checked before anything is traced. A step that reads
    tensor values runs for real on the CPU instead of being traced; ``progress`` hears what that run will
    cost first.

    When the trace fails the answer is the formula's alone and says so: ``trace_error`` and
    ``trace_hint`` tell why and what to do (the command line exits 5, a partial answer).
    Ctrl-C during the trace raises :class:`~memprof.errors.Interrupted` (a ``KeyboardInterrupt``)
    holding that formula-only result (nothing is verified then).
    """
    headroom = fitting.check_headroom(headroom)
    target, index = parse_device(device)
    if verify and workload.distributed:
        raise UsageError(
            "`verify` runs one process's step, not a data-parallel job",
            "profile the real job: memprof profile --nproc-per-node N script.py",
        )
    if verify and target == "cuda":
        _require_cuda(index)
    if isinstance(capacity, int) and not isinstance(capacity, bool):
        capacity = Capacity(total_bytes=capacity, source="capacity_bytes")
    assert not isinstance(capacity, bool), "capacity is a Capacity or a number of bytes, not a bool"
    analytic = analyse(workload)
    trace_result = None
    trace_note: str | None = None
    trace_error: str | None = None
    trace_hint: str | None = None
    interrupted = False
    fit_note: str | None = None
    fit: FitSummary | None = None
    cuda: CudaTarget | None = None  # the CUDA target the trace used (None: a CPU step)
    if traced:
        from ..engine.catalog import resolve_target, with_capacity
        from ..engine.trace import trace_step

        try:
            if target == "cuda":
                cuda = cuda_target or resolve_target()
                if capacity is not None:  # near it, the allocator releases its cache and retries: so does the replay
                    cuda = with_capacity(cuda, capacity.total_bytes)
            trace_result = trace_step(
                workload, target=target, cuda_target=cuda, count_bytes=gpu is not None, progress=progress
            )
            if capacity is not None:
                try:
                    batch_fit = fitting.fit_batch(
                        workload,
                        capacity.total_bytes,
                        target=target,
                        headroom=headroom,
                        known={workload.batch_size: trace_result},
                        trace_fn=functools.partial(trace_step, cuda_target=cuda),
                    )
                    fit = traced_fit(trace_result, batch_fit, capacity)
                except MemprofError as exc:  # other batch sizes could not be traced: fit by formula
                    fit_note = f"the fit traces other batch sizes and one failed ({exc.message}): fit by formula"
        except MemprofError as exc:
            trace_result, fit = None, None
            trace_error, trace_hint = exc.message, exc.hint
        except KeyboardInterrupt:  # the formula's answer is ready: raised below as Interrupted
            interrupted, fit = True, None
            if trace_result is None:
                trace_note = "tracing interrupted (Ctrl-C): formula only"
            else:
                fit_note = "the fit's traces at other batch sizes were stopped by Ctrl-C: fit by formula"
        except MemoryError:
            raise
        except Exception as exc:  # a tracer bug must not cost the user the formula estimate
            trace_result, fit = None, None
            first = (str(exc).strip().splitlines() or [""])[0]
            trace_error = f"{type(exc).__name__}: {first}"
            trace_hint = "this is a memprof bug: please report it; the formula estimate above does not depend on it"
        if trace_error is not None:
            trace_note = f"tracing failed: {trace_error} (formula only)"
    else:
        trace_note = "tracing skipped (--no-trace)"
    seq_fit = grid_fit = None
    sequences = workload.seq_len is not None and (workload.model.hf is not None or workload.model.takes_tokens)
    if fit_seq_len is None:
        fit_seq_len = workload.mode == "generate"
    if (fit_seq_len or grid) and not sequences:
        raise UsageError(
            f"{workload.model.display_name} takes no token sequence: there is no sequence length to fit",
            "`fit` seq-len and `grid` apply to language models (hf:..., or a model taking token ids)",
        )
    if trace_result is not None and capacity is not None and sequences:
        if fit_seq_len:
            assert workload.seq_len is not None
            seq_fit = fitting.fit_seq_len(
                workload,
                capacity.total_bytes,
                target=target,
                multiple_of=multiple_of,
                known={workload.seq_len: trace_result},
                trace_fn=functools.partial(trace_step, cuda_target=cuda),
            )
        if grid:
            batches, seqs = fitting.default_grid(workload) if isinstance(grid, bool) else grid
            grid_fit = fitting.fit_grid(
                workload,
                capacity.total_bytes,
                list(batches),
                list(seqs),
                target=target,
                known={(workload.batch_size, workload.seq_len or 0): trace_result},
                trace_fn=functools.partial(trace_step, cuda_target=cuda),
            )
    if fit is None and capacity is not None:
        fit = formula_fit(analytic, capacity, headroom, note=fit_note)
    if trace_result is not None:
        headline, source = int(trace_result.peak_bytes), "traced"
    else:
        headline, source = analytic.total_bytes, "formula"
    if capacity is None and capacity_note is None:
        capacity_note = "no --memory-limit given" if target == "cpu" else "no --gpu-memory given"
    step, step_note = None, None
    if trace_result is None:
        step_note = "needs a trace (the step-time model runs on the traced ops)"
    elif gpu is None:
        step_note = "needs a GPU (--gpu NAME)"
    else:
        step = step_time(trace_result, gpu, tokens=tokens_per_sample(workload))
    verification = None
    if verify and not interrupted:
        verification = verify_step(workload, target, index, trace_result, analytic.total_bytes)
    result = EstimateResult(
        workload=workload.describe(),
        analytic=analytic,
        traced=trace_result,
        trace_note=trace_note,
        capacity=capacity,
        capacity_note=capacity_note if capacity is None else None,
        fit=fit,
        headline_bytes=headline,
        headline_source=source,
        seq_fit=seq_fit,
        grid=grid_fit,
        step_time=step,
        step_time_note=step_note,
        target=target,
        verification=verification,
        trace_error=trace_error,
        trace_hint=trace_hint,
        interrupted=interrupted,
    )
    if interrupted:
        raise Interrupted(result)
    return result


def _require_cuda(index: int) -> None:
    import torch

    if not torch.cuda.is_available():  # asks the driver for a device count; allocates nothing on the GPU
        raise NoGPUError(
            "`verify` runs a real step on `device` cuda, and no CUDA GPU is available",
            "verify on the CPU instead: `device` cpu `verify`",
        )
    if index >= torch.cuda.device_count():
        raise NoGPUError(
            f"there is no CUDA device {index} (found {torch.cuda.device_count()})", "choose `device` cuda:0"
        )


def _error(predicted: int | None, measured: int | None) -> float | None:
    if predicted is None or not measured:
        return None
    return 100.0 * (predicted - measured) / measured


def verify_step(
    workload: Workload,
    target: Target,
    index: int,
    traced: TraceResult | None,
    formula_bytes: int,
    steps: int = 2,
) -> Verification:
    """Run ``steps`` real training steps on the target and compare them with the prediction.

    CPU: peak live bytes from ``torch.profiler``'s memory events, oneDNN scratch included
    (:func:`memprof.engine.measure.measure_cpu_step`, the truth of ``scripts/validate_cpu.py``).
    CUDA: ``torch.cuda.max_memory_allocated()``, ``max_memory_reserved()`` and NVML's usage for
    this process (:func:`memprof.engine.measure.measure_cuda_step`, as ``scripts/validate_gpu.py``).
    Without a trace the formula total is compared with the allocated peak.
    """
    from ..engine.measure import is_oom_error, measure_cpu_step, measure_cuda_step

    source: Source = "traced" if traced is not None else "formula"
    allocated = traced.peak_bytes if traced is not None else formula_bytes
    started = time.perf_counter()
    if target == "cpu":
        measured = measure_cpu_step(workload, steps=steps)
        figure = VerifiedFigure(
            "allocated",
            "peak live bytes (torch.profiler memory events)",
            allocated,
            measured["peak_bytes"],
            _error(allocated, measured["peak_bytes"]),
        )
        return Verification("cpu", steps, source, (figure,), time.perf_counter() - started)
    try:
        m = measure_cuda_step(workload, index=index, steps=steps)
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        return Verification(
            f"cuda:{index}",
            steps,
            source,
            (),
            time.perf_counter() - started,
            oom=True,
            note=f"the real step ran out of memory at batch {workload.batch_size}",
        )
    predicted: list[tuple[str, str, int | None, int | None]] = [
        ("allocated", "torch.cuda.max_memory_allocated()", allocated, m["allocated_bytes"])
    ]
    if traced is not None:
        predicted.append(
            ("reserved", "torch.cuda.max_memory_reserved()", traced.predicted_reserved_bytes, m["reserved_bytes"])
        )
        predicted.append(("nvml", "NVML process used memory", traced.predicted_nvml_bytes, m["nvml_bytes"]))
    figures = tuple(VerifiedFigure(k, how, p, v, _error(p, v)) for k, how, p, v in predicted)
    notes = [] if m["nvml_bytes"] is not None else ["NVML did not report this process's memory (not permitted here)"]
    if m["optimizer_steps"] < steps:  # GradScaler skipped every step: the peak misses the optimizer state
        notes.append(f"the optimizer stepped {m['optimizer_steps']} times in {m['skipped_steps']} skipped steps")
    note = "; ".join(notes) or None
    return Verification(f"cuda:{index} {m['device']}", steps, source, figures, time.perf_counter() - started, note=note)
