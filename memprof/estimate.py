"""``estimate``: one training step's memory by formula and (when available) by trace, and the batch that fits.

The traced prediction (:mod:`memprof.trace`, fake tensors, no memory) is the headline
number and drives the fit; the analytical one (:mod:`memprof.analytic`, the seeds'
formulas) is always computed beside it and used alone with ``traced=False`` or when
the tracer is not available or fails.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .analytic import analyse, largest_batch
from .errors import MemprofError
from .results import AnalyticEstimate, Capacity, EstimateResult, FitSummary

if TYPE_CHECKING:  # pragma: no cover
    from .workload import Workload

DEFAULT_HEADROOM = 0.8


def resolve_capacity(capacity_bytes: int | None = None, *, use_nvml: bool = True) -> tuple[Capacity | None, str | None]:
    """``--gpu-memory`` if given, else GPU 0's total memory via NVML, else ``(None, why not)``."""
    if capacity_bytes is not None:
        return Capacity(total_bytes=int(capacity_bytes), source="--gpu-memory"), None
    if not use_nvml:
        return None, "no --gpu-memory given"
    from . import nvml

    info = nvml.device_info(0)
    if info is None:
        _, reason = nvml.available()
        return None, reason or "NVML sees no GPU"
    return Capacity(total_bytes=info.total_bytes, source=f"NVML: {info.name} (GPU {info.index})",
                    device_name=info.name), None


def recommended(max_batch: int | None, headroom: float) -> int | None:
    """The seeds' rule: ``floor(headroom x largest batch that fits)``, at least 1."""
    if max_batch is None:
        return None
    return max(1, math.floor(headroom * max_batch + 1e-9))


def formula_fit(analytic: AnalyticEstimate, capacity: Capacity, headroom: float = DEFAULT_HEADROOM) -> FitSummary:
    """Fit by the formula total, which is linear in the batch size."""
    max_batch = largest_batch(analytic, capacity.total_bytes)
    return FitSummary(capacity=capacity, source="formula", metric="formula total",
                      estimate_bytes=analytic.total_bytes, fits=analytic.total_bytes <= capacity.total_bytes,
                      max_batch=max_batch, recommended_batch=recommended(max_batch, headroom), headroom=headroom,
                      per_sample_bytes=analytic.per_sample_bytes, fixed_bytes=analytic.fixed_bytes)


def _metric_bytes(traced: Any, metric: str | None) -> int:
    """The traced figure that a BatchFit compared with the capacity."""
    m = (metric or "").lower()
    if "nvml" in m and getattr(traced, "predicted_nvml_bytes", None) is not None:
        return int(traced.predicted_nvml_bytes)
    if "reserved" in m and getattr(traced, "predicted_reserved_bytes", None) is not None:
        return int(traced.predicted_reserved_bytes)
    return int(traced.peak_bytes)


def traced_fit(traced: Any, batch_fit: Any, capacity: Capacity, headroom: float) -> FitSummary:
    """A :class:`memprof.trace.BatchFit` as a :class:`FitSummary`."""
    metric = str(getattr(batch_fit, "metric", "traced peak") or "traced peak")
    at_batch = _metric_bytes(traced, metric)
    max_batch = getattr(batch_fit, "max_batch", None)
    rec = getattr(batch_fit, "recommended_batch", None)
    slope = getattr(batch_fit, "slope_bytes_per_sample", None)
    intercept = getattr(batch_fit, "intercept_bytes", None)
    return FitSummary(capacity=capacity, source="traced", metric=metric, estimate_bytes=at_batch,
                      fits=at_batch <= capacity.total_bytes, max_batch=max_batch,
                      recommended_batch=rec if rec is not None else recommended(max_batch, headroom),
                      headroom=float(getattr(batch_fit, "headroom", headroom)),
                      per_sample_bytes=int(slope) if slope is not None else None,
                      fixed_bytes=int(intercept) if intercept is not None else None)


def _tracer() -> tuple[Any, str | None]:
    """``(memprof.trace, None)`` if the tracer is there and imports, else ``(None, why not)``."""
    import importlib

    try:
        trace = importlib.import_module(f"{__package__}.trace")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.trace":
            return None, "traced estimate not available in this version (formula only)"
        return None, f"traced estimate not available: {exc} (formula only)"
    except Exception as exc:  # a broken tracer must not break the formula estimate
        return None, f"traced estimate not available: {type(exc).__name__}: {exc} (formula only)"
    if not (hasattr(trace, "trace_step") and hasattr(trace, "fit_batch")):
        return None, "traced estimate not available: memprof.trace has no trace_step/fit_batch (formula only)"
    return trace, None


def estimate(workload: "Workload", capacity: Capacity | int | None = None, headroom: float = DEFAULT_HEADROOM,
             traced: bool = True, capacity_note: str | None = None) -> EstimateResult:
    """Estimate one step of ``workload`` by formula and, if ``traced``, by fake-tensor trace; fit ``capacity``.

    ``capacity`` is a :class:`Capacity` or a number of bytes; None skips the fit
    (:func:`resolve_capacity` finds the local GPU's).
    """
    if isinstance(capacity, int) and not isinstance(capacity, bool):
        capacity = Capacity(total_bytes=capacity, source="capacity_bytes")
    analytic = analyse(workload)
    trace_result = None
    trace_note: str | None = None
    fit: FitSummary | None = None
    if traced:
        tracer, trace_note = _tracer()
        if tracer is not None:
            try:
                trace_result = tracer.trace_step(workload, target="cuda")
                if capacity is not None:
                    batch_fit = tracer.fit_batch(workload, capacity.total_bytes, target="cuda", headroom=headroom,
                                                 known={workload.batch_size: trace_result})
                    fit = traced_fit(trace_result, batch_fit, capacity, headroom)
            except MemprofError as exc:
                trace_result, fit = None, None
                trace_note = f"tracing failed: {exc.message} (formula only)"
            except MemoryError:
                raise
            except Exception as exc:  # a tracer bug must not cost the user the formula estimate
                trace_result, fit = None, None
                first = (str(exc).strip().splitlines() or [""])[0]
                trace_note = f"tracing failed: {type(exc).__name__}: {first} (formula only)"
    else:
        trace_note = "tracing skipped (--no-trace)"
    if fit is None and capacity is not None:
        fit = formula_fit(analytic, capacity, headroom)
    if trace_result is not None:
        headline, source = int(trace_result.peak_bytes), "traced"
    else:
        headline, source = analytic.total_bytes, "formula"
    if capacity is None and capacity_note is None:
        capacity_note = "no --gpu-memory given"
    return EstimateResult(workload=workload.describe(), analytic=analytic, traced=trace_result,
                          trace_note=trace_note, capacity=capacity, capacity_note=capacity_note if capacity is None else None,
                          fit=fit, headline_bytes=headline, headline_source=source)


__all__ = ["estimate", "resolve_capacity", "formula_fit", "traced_fit", "recommended", "DEFAULT_HEADROOM"]
