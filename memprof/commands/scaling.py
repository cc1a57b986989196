"""``estimate --strategy S --world-size 1,2,8,64,1024``: one rank's memory and largest batch at each world size.

Every world size is traced (PyTorch's DDP / FSDP2 / ZeRO code over a fake process group of that size,
:mod:`memprof.engine.distributed`); with a capacity, the largest batch per rank is searched under the
tracer (:func:`memprof.engine.fit.fit_batch`). World size 1 is the plain one-process step. What a user
reads off: model states shrink as 1/N under sharding while activations stay, so the per-rank peak
flattens where activations dominate, and the largest batch per rank stops rising there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..engine import fit as fitting
from ..engine.workload import Workload
from ..errors import MemprofError, UsageError
from ..results import Capacity, MemCategory, Metric, ScalingResult, ScalingRow, Target, TraceResult

TraceFn = Callable[..., TraceResult]


def scale(
    workload: Workload,
    world_sizes: Sequence[int],
    *,
    capacity: Capacity | None = None,
    capacity_note: str | None = None,
    headroom: float = fitting.DEFAULT_HEADROOM,
    target: Target = "cuda",
    max_batch: int | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> ScalingResult:
    """Trace ``workload`` (its ``strategy``) at each of ``world_sizes``; fit ``capacity`` per rank."""
    from ..engine.trace import trace_step

    if not workload.distributed:
        raise UsageError("a world-size sweep needs a `strategy`", "add `strategy` ddp, fsdp, zero1, zero2 or zero3")
    sizes = list(dict.fromkeys(int(n) for n in world_sizes))
    if not sizes or min(sizes) < 1:
        raise UsageError(f"world sizes must be positive, got {list(world_sizes)}", "e.g. 1,2,8,64,1024")
    headroom = fitting.check_headroom(headroom)
    metric = fitting.default_metric(target)
    t0 = time.perf_counter()
    rows = []
    for i, n in enumerate(sizes):
        if on_progress is not None:
            on_progress(i + 1, len(sizes), n)
        w = workload.replace(world_size=n) if n > 1 else workload.replace(strategy="none", world_size=1, offload="none")
        rows.append(_row(w, n, capacity, headroom, target, metric, max_batch, trace_step))
    notes = []
    if 1 in sizes:
        notes.append("world size 1 is the plain one-process step (no strategy)")
    return ScalingResult(
        workload=workload.replace(world_size=sizes[0]).describe() if sizes[0] > 1 else workload.describe(),
        strategy=workload.strategy,
        target=target,
        metric=metric.value,
        capacity=capacity,
        capacity_note=capacity_note if capacity is None else None,
        headroom=headroom,
        rows=tuple(rows),
        notes=tuple(notes),
        seconds=time.perf_counter() - t0,
    )


def _row(
    w: Workload,
    n: int,
    capacity: Capacity | None,
    headroom: float,
    target: Target,
    metric: Metric,
    max_batch: int | None,
    trace_step: TraceFn,
) -> ScalingRow:
    try:
        traced = trace_step(w, target=target)
        fit = None
        if capacity is not None:
            fit = fitting.fit_batch(
                w,
                capacity.total_bytes,
                target=target,
                headroom=headroom,
                max_batch=max_batch,
                known={w.batch_size: traced},
            )
    except MemprofError as exc:
        return ScalingRow(n, w.strategy, None, None, None, None, None, None, None, None, None, None, error=exc.message)
    totals, at_peak = traced.totals, traced.breakdown_at_peak
    states = sum(totals.get(c, 0) for c in (MemCategory.PARAMETER, MemCategory.GRADIENT, MemCategory.OPTIMIZER_STATE))
    value = fitting.value_of(traced, metric)
    return ScalingRow(
        world_size=n,
        strategy=w.strategy,
        peak_bytes=traced.peak_bytes,
        metric_bytes=value,
        model_state_bytes=states,
        activation_bytes=totals.get(MemCategory.ACTIVATION, 0),
        gathered_bytes=at_peak.get(MemCategory.GATHERED_PARAMETER, 0),
        communication_bytes=at_peak.get(MemCategory.COMMUNICATION, 0),
        host_bytes=traced.host_bytes,
        max_batch=fit.max_batch if fit is not None else None,
        recommended_batch=fit.recommended_batch if fit is not None else None,
        fits=(value is not None and value <= capacity.total_bytes) if capacity is not None else None,
        peak_phase=traced.peak_phase,
    )
