"""The one home of the fitting policy: headroom, the recommended batch, which metric decides a fit,
and the traced search for the largest batch that fits.

Every command (``estimate``, ``find-batch``, ``compare``) calls these; none keeps a copy.

* :data:`DEFAULT_HEADROOM` and :func:`check_headroom`: the usual 80 % rule, validated once.
* :func:`recommend`: ``floor(headroom x largest)`` in exact decimal arithmetic (0.35 x 180 is
  63, not 62.999... -> 62), at least 1, optionally rounded down to a multiple.
* :func:`default_metric` and :func:`value_of`: which figure of a trace or a trial is compared
  with the capacity (:class:`memprof.results.Metric`).
* :func:`first_guess`, :func:`bracket_peaks` and :func:`fit_batch`: the largest batch whose
  traced figure fits, exact under the tracer (it fits and one more does not).
* :func:`fit_seq_len`: the same search on the other axis, the longest sequence at a batch size
  (exact to the token, or to a multiple of tokens); :func:`fit_grid`: the largest batch at each of
  several sequence lengths (which batch x sequence-length combinations fit).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from ..errors import DataDependentError, UsageError
from ..results import BatchFit, GridFit, MemCategory, Metric, SeqFit, Target, TraceResult

#: recommended batch = DEFAULT_HEADROOM x the largest batch that fits (the usual 80 % rule)
DEFAULT_HEADROOM = 0.8
#: the largest batch any traced search considers when the caller gives no limit
SEARCH_LIMIT = 1 << 20
#: the longest sequence a traced search considers when the model's positions set no limit
SEQ_SEARCH_LIMIT = 1 << 20
#: what grows with the batch (and the sequence) at a peak
_GROWING = (MemCategory.ACTIVATION, MemCategory.INPUT, MemCategory.TEMPORARY, MemCategory.KV_CACHE)


def check_headroom(headroom: float) -> float:
    """``headroom`` as a float in (0, 1]; anything else raises :class:`UsageError` naming the parameter."""
    try:
        value = float(headroom)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(headroom, bool) or not (0 < value <= 1):
        raise UsageError(f"`headroom` must be in (0, 1], got {headroom!r}", "e.g. `headroom` 0.8 (the usual 80 % rule)")
    return value


def _exact(x: float) -> Fraction:
    """The decimal a person typed (0.35 -> 7/20), not the nearest binary float."""
    return Fraction(repr(float(x)))


def recommend(largest: int | None, headroom: float = DEFAULT_HEADROOM, multiple_of: int | None = None) -> int | None:
    """The batch to use: ``floor(headroom x largest)``, at least 1; None when nothing fits.

    With ``multiple_of``, rounded down to a multiple of it; when that is 0, the largest multiple
    that fits at all; None when no multiple fits (``largest < multiple_of``).
    """
    if largest is None:
        return None
    rec = max(1, math.floor(_exact(headroom) * largest))
    if multiple_of:
        rounded = (rec // multiple_of) * multiple_of
        if rounded == 0:
            rounded = (largest // multiple_of) * multiple_of
        return rounded or None
    return rec


def default_metric(target: Target) -> Metric:
    """What a traced fit compares with the capacity: NVML usage on CUDA, live tensor bytes on the CPU."""
    return Metric.NVML if target == "cuda" else Metric.ALLOCATED


def value_of(result: Any, metric: Metric | str) -> int | None:
    """The ``metric`` figure of a :class:`TraceResult` (a prediction) or a ``BatchTrial`` (a measurement)."""
    metric = Metric(metric)
    if hasattr(result, "peak_bytes"):  # a trace (a TraceResult, or anything shaped like one)
        if metric is Metric.NVML:
            value = getattr(result, "predicted_nvml_bytes", None)
        elif metric is Metric.RESERVED:
            value = getattr(result, "predicted_reserved_bytes", None)
        else:
            value = result.peak_bytes
        return None if value is None else int(value)
    if metric is Metric.RESERVED:
        return getattr(result, "peak_reserved_bytes", None)
    if metric is Metric.NVML:
        return getattr(result, "nvml_used_bytes", None)
    return getattr(result, "peak_allocated_bytes", None)


def first_guess(traced: TraceResult, batch: int, metric_bytes: int, capacity_bytes: int, limit: int) -> int:
    """The largest batch one trace (at ``batch``) suggests: what grows with the batch at its peak
    (activations, inputs, temporaries) is per-sample, the rest of ``metric_bytes`` is fixed."""
    per_batch = sum(int(traced.breakdown_at_peak.get(c, 0)) for c in _GROWING)
    if per_batch <= 0:
        return limit
    guess = int((capacity_bytes - (metric_bytes - per_batch)) // (per_batch / batch))
    return max(1, min(guess, limit))


def bracket_peaks(
    peak: Callable[[int], int], cache: dict[int, int], capacity_bytes: int, limit: int, guess: int, max_traces: int = 40
) -> tuple[int, str]:
    """The largest batch in [1, limit] with ``peak(b) <= capacity_bytes``, given that batch 1 fits.

    Unlike a real trial, a trace also gives the bytes of a batch that does not fit, so the
    next guess interpolates between the bracket's ends (regula falsi), which lands on the
    answer in one or two traces when peak memory is affine in the batch; a bisection step
    follows any guess that did not halve the bracket, so a non-affine curve (allocator
    segments) still converges. Ends with ``peak(answer + 1)`` traced unless the answer is ``limit``.
    ``cache`` holds the batches ``peak`` has already traced. Returns ``(answer, status)``,
    status "exact" or "max_trials".
    """
    lo, hi = 1, None  # peak(lo) fits; peak(hi) does not
    for traced in sorted(k for k in cache if k <= limit):
        if peak(traced) <= capacity_bytes:
            lo = max(lo, traced)
        elif hi is None or traced < hi:
            hi = traced
    b: int | None = max(lo + 1, min(guess, limit)) if hi is None else None
    streak, last_side = 0, None  # how many guesses in a row moved the same end of the bracket
    for _ in range(max_traces):
        if hi is not None and hi - lo <= 1:
            return lo, "exact"
        if lo >= limit:
            return limit, "exact"
        if b is None:
            assert hi is not None
            p_lo, p_hi = peak(lo), peak(hi)
            g = lo + int((capacity_bytes - p_lo) * (hi - lo) // (p_hi - p_lo)) if p_hi > p_lo else lo
            if g <= lo:
                b = lo + 1  # the line says lo is the answer: one trace confirms it
            elif streak >= 3:
                b = (lo + hi) // 2  # interpolation keeps missing on one side: bisect
            else:
                b = min(g, hi - 1)
        side = "lo" if peak(b) <= capacity_bytes else "hi"
        if side == "lo":
            lo = b
        else:
            hi = b
        streak, last_side = (streak + 1 if side == last_side else 1), side
        if hi is None:  # still unbounded above: extrapolate from the two largest fits
            pts = sorted(k for k in cache if k <= lo)
            prev = pts[-2] if len(pts) >= 2 else None
            slope = (peak(lo) - peak(prev)) / (lo - prev) if prev is not None else 0
            step = int((capacity_bytes - peak(lo)) // slope) if slope > 0 else lo
            b = min(limit, lo + max(1, step))
        else:
            b = None
    return lo, "max_trials"


TraceFn = Callable[..., TraceResult]  # (workload, *, target, kernel_scratch) -> TraceResult


def fit_batch(
    workload: Any,
    capacity_bytes: int,
    *,
    target: Target = "cuda",
    headroom: float = DEFAULT_HEADROOM,
    max_batch: int | None = None,
    metric: Metric | str | None = None,
    kernel_scratch: bool = True,
    known: dict[int, TraceResult] | None = None,
    trace_fn: TraceFn | None = None,
    max_traces: int = 40,
) -> BatchFit:
    """The largest batch whose traced ``metric`` fits ``capacity_bytes``, verified by tracing it and the next one.

    Peak memory is close to affine in the batch size. With a trace that already fits (in
    ``known``, e.g. ``estimate``'s own trace at the requested batch) its breakdown gives the
    first guess; otherwise batch 1 and a second batch give a line. :func:`bracket_peaks` then
    narrows [fits, does not fit] until the answer fits and answer + 1 does not, under the tracer.
    ``metric`` defaults to :func:`default_metric`; ``kernel_scratch`` is passed to the tracer;
    ``trace_fn`` replaces :func:`memprof.engine.trace.trace_step` (tests, compare's CPU rows).
    """
    if capacity_bytes <= 0:
        raise UsageError(f"capacity must be positive, got {capacity_bytes}", "e.g. `gpu_memory` 24GiB")
    headroom = check_headroom(headroom)
    if max_batch is not None and max_batch < 1:
        raise UsageError(f"`max_batch` must be at least 1, got {max_batch}", "e.g. `max_batch` 1024")
    metric = Metric(metric) if metric is not None else default_metric(target)
    if target == "cpu" and metric is not Metric.ALLOCATED:
        raise UsageError(f"metric {metric.value!r} does not exist for a CPU step", "use allocated")
    if trace_fn is None:
        from .trace import trace_step

        trace_fn = trace_step

    notes: list[str] = []
    used = [metric]  # the metric the fit ends up using

    def figure(r: TraceResult) -> int:
        v = value_of(r, used[0])
        if v is None and used[0] is not Metric.ALLOCATED:  # backend:cudaMallocAsync: no reserved/NVML prediction
            # every trace of one fit has the same allocator settings: this happens at the first one
            notes.append(f"no {used[0].value} prediction (reserved bytes cannot be replayed): fitted by allocated")
            used[0] = Metric.ALLOCATED
            v = value_of(r, Metric.ALLOCATED)
        assert v is not None, f"a {r.target} trace has no {used[0].value} figure"
        return v

    limit = max_batch if max_batch is not None else SEARCH_LIMIT
    usable = {b: r for b, r in (known or {}).items() if getattr(r, "target", target) == target}
    cache: dict[int, int] = {}
    for b, r in usable.items():
        cache[b] = figure(r)

    extrapolated: list[int] = []

    def peak(b: int) -> int:
        if b not in cache:
            try:
                cache[b] = figure(trace_fn(workload.with_batch(b), target=target, kernel_scratch=kernel_scratch))
            except DataDependentError:
                # the step reads tensor values and runs for real on the CPU, which cannot hold this
                # batch: extend the line through the batches that did run
                if len(cache) < 2 and 1 not in cache and b != 1:
                    peak(1)  # a second point for the line: batch 1 runs anywhere
                known = sorted(cache.items())
                if len(known) < 2:
                    raise
                (ba, pa), (bb, pb) = known[0], known[-1]
                cache[b] = int(round(pa + (pb - pa) * (b - ba) / (bb - ba)))
                extrapolated.append(b)
        return cache[b]

    def result(
        max_b: int | None, slope: float, intercept: float, limited: bool = False, exact: bool = True
    ) -> BatchFit:
        at_max = cache.get(max_b) if max_b is not None else cache.get(1)
        nxt = cache.get(max_b + 1) if max_b is not None else None
        return BatchFit(
            capacity_bytes=capacity_bytes,
            metric=used[0],
            max_batch=max_b,
            recommended_batch=recommend(max_b, headroom),
            headroom=headroom,
            peak_at_max_bytes=at_max,
            peak_at_next_bytes=nxt,
            slope_bytes_per_sample=int(slope),
            intercept_bytes=int(intercept),
            traces=len(cache),
            limited_by_max=limited,
            notes=tuple(notes),
            exact=exact,
        )

    def finish(largest: int, status: str) -> BatchFit:
        if status != "exact":
            notes.append(f"the search ended with status {status!r}")
        if extrapolated:
            notes.append(
                f"batches {', '.join(map(str, sorted(extrapolated)))} extrapolated: the step reads tensor values "
                "and a real CPU run at that size needs more RAM than this machine has"
            )
            status = "extrapolated"
        slope = intercept = 0.0
        pts = sorted(cache.items())
        if len(pts) >= 2:
            (ba, pa), (bb, pb) = pts[0], pts[-1]
            slope = (pb - pa) / (bb - ba)
            intercept = pa - slope * ba
        limited = largest == limit and cache.get(limit, capacity_bytes + 1) <= capacity_bytes
        if limited and max_batch is None:
            notes.append(f"stopped at the search limit of {limit} samples: memory barely grows with the batch")
        return result(largest, slope, intercept, limited=limited and max_batch is not None, exact=status == "exact")

    fitting = sorted((b for b in usable if b <= limit and cache[b] <= capacity_bytes), reverse=True)
    if fitting:  # a trace that fits already: its breakdown gives the first guess, no batch-1 trace needed
        guess = first_guess(usable[fitting[0]], fitting[0], cache[fitting[0]], capacity_bytes, limit)
        return finish(*bracket_peaks(peak, cache, capacity_bytes, limit, guess, max_traces))
    p1 = peak(1)
    if p1 > capacity_bytes:
        return result(None, 0, p1)
    if limit == 1:
        return result(1, 0, p1, limited=True)
    # the second point of the line: a batch already traced if there is one, else 8
    b2 = next((b for b in sorted(cache, reverse=True) if 1 < b <= limit), min(limit, 8))
    slope = (peak(b2) - p1) / (b2 - 1)
    intercept = p1 - slope
    predicted = limit if slope <= 0 else int(math.floor((capacity_bytes - intercept) / slope))
    predicted = max(1, min(predicted, limit))
    return finish(*bracket_peaks(peak, cache, capacity_bytes, limit, predicted, max_traces))


# =========================================================================== sequence length
def fit_seq_len(
    workload: Any,
    capacity_bytes: int,
    *,
    target: Target = "cuda",
    metric: Metric | str | None = None,
    multiple_of: int = 1,
    kernel_scratch: bool = True,
    known: dict[int, TraceResult] | None = None,
    trace_fn: TraceFn | None = None,
    max_traces: int = 40,
) -> SeqFit:
    """The longest sequence (a multiple of ``multiple_of`` tokens) at the workload's batch whose traced
    ``metric`` fits ``capacity_bytes``: :func:`bracket_peaks` on the sequence axis, verified by tracing it
    and the next multiple. ``known`` maps sequence lengths to traces already made (estimate's own).

    The search stops at the model's positions (less the new tokens of a generation). In generation the
    sequence is the prompt: the new tokens come on top of it.
    """
    if capacity_bytes <= 0:
        raise UsageError(f"capacity must be positive, got {capacity_bytes}", "e.g. `gpu_memory` 24GiB")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise UsageError(f"`multiple_of` must be a positive integer, got {multiple_of!r}", "e.g. `multiple_of` 64")
    metric = Metric(metric) if metric is not None else default_metric(target)
    if trace_fn is None:
        from .trace import trace_step

        trace_fn = trace_step
    reserve = (workload.new_tokens or 0) if workload.mode == "generate" else 0
    positions = workload.model.max_positions
    limit_tokens = positions - reserve if positions is not None else SEQ_SEARCH_LIMIT
    limit = limit_tokens // multiple_of
    cache: dict[int, int] = {}
    usable: dict[int, TraceResult] = {}
    for seq, r in (known or {}).items():
        if seq % multiple_of == 0 and getattr(r, "target", target) == target and seq // multiple_of <= limit:
            usable[seq // multiple_of] = r
            v = value_of(r, metric)
            assert v is not None
            cache[seq // multiple_of] = v

    def peak(k: int) -> int:
        if k not in cache:
            r = trace_fn(workload.replace(seq_len=k * multiple_of), target=target, kernel_scratch=kernel_scratch)
            v = value_of(r, metric)
            assert v is not None, f"a {r.target} trace has no {metric.value} figure"
            cache[k] = v
        return cache[k]

    def result(k: int | None, exact: bool = True) -> SeqFit:
        slope = intercept = 0.0
        pts = sorted(cache.items())
        if len(pts) >= 2:
            (ka, pa), (kb, pb) = pts[0], pts[-1]
            slope = (pb - pa) / ((kb - ka) * multiple_of)
            intercept = pa - slope * ka * multiple_of
        return SeqFit(
            slope_bytes_per_token=slope,
            intercept_bytes=intercept,
            capacity_bytes=capacity_bytes,
            metric=metric.value,
            batch_size=workload.batch_size,
            multiple_of=multiple_of,
            max_seq_len=None if k is None else k * multiple_of,
            peak_at_max_bytes=cache.get(k if k is not None else 1),
            peak_at_next_bytes=cache.get(k + 1) if k is not None else None,
            limit_tokens=limit_tokens,
            limited_by_positions=k is not None and k == limit and positions is not None,
            traces=len(cache),
            new_tokens=reserve or None,
            exact=exact,
        )

    if limit < 1:
        return result(None)
    fitting = sorted((k for k in usable if cache[k] <= capacity_bytes), reverse=True)
    if fitting:
        k0 = fitting[0]
        guess = first_guess(usable[k0], k0, cache[k0], capacity_bytes, limit)
    else:
        if peak(1) > capacity_bytes:
            return result(None)
        if limit == 1:
            return result(1)
        k2 = next((k for k in sorted(cache, reverse=True) if 1 < k <= limit), min(limit, 8))
        slope = (peak(k2) - peak(1)) / (k2 - 1)
        guess = limit if slope <= 0 else int((capacity_bytes - peak(1)) // slope) + 1
        guess = max(1, min(guess, limit))
    largest, status = bracket_peaks(peak, cache, capacity_bytes, limit, guess, max_traces)
    return result(largest, exact=status == "exact")


def fit_grid(
    workload: Any,
    capacity_bytes: int,
    batches: list[int],
    seq_lens: list[int],
    *,
    target: Target = "cuda",
    metric: Metric | str | None = None,
    known: dict[tuple[int, int], TraceResult] | None = None,
    trace_fn: TraceFn | None = None,
) -> GridFit:
    """The largest batch (up to ``max(batches)``) at each sequence length, each exact under the tracer
    (:func:`fit_batch`); a sequence length that does not fit at batch 1 ends the longer ones too (memory
    grows with the sequence). ``known`` maps (batch, seq_len) to traces already made."""
    if not batches or not seq_lens or min(batches) < 1 or min(seq_lens) < 1:
        raise UsageError("a grid needs positive batch sizes and sequence lengths", "e.g. batches 1,2,4 and 512,1024")
    metric = Metric(metric) if metric is not None else default_metric(target)
    batches = sorted(set(batches))
    seq_lens = sorted(set(seq_lens))
    results: list[int | None] = []
    traces = 0
    stop = False
    for seq in seq_lens:
        if stop:
            results.append(None)
            continue
        have = {b: r for (b, s), r in (known or {}).items() if s == seq}
        fit = fit_batch(
            workload.replace(seq_len=seq),
            capacity_bytes,
            target=target,
            metric=metric,
            max_batch=batches[-1],
            known=have,
            trace_fn=trace_fn,
        )
        traces += fit.traces - len(have)
        results.append(fit.max_batch)
        stop = fit.max_batch is None
    return GridFit(
        capacity_bytes=capacity_bytes,
        metric=metric.value,
        batches=tuple(batches),
        seq_lens=tuple(seq_lens),
        max_batch=tuple(results),
        traces=traces,
        new_tokens=workload.new_tokens if workload.mode == "generate" else None,
    )


def default_grid(workload: Any) -> tuple[list[int], list[int]]:
    """Batches 1, 2, 4, ... 64 and sequence lengths 512, 1024, ... up to the model's positions (at most 32768)."""
    positions = workload.model.max_positions
    reserve = (workload.new_tokens or 0) if workload.mode == "generate" else 0
    top = min(32768, positions - reserve) if positions else 32768
    seqs = [s for s in (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768) if s <= top]
    if len(seqs) > 7:
        seqs = seqs[-7:]
    if top not in seqs and top < 32768 and (not seqs or top > seqs[-1]):
        seqs.append(top)
    return [1, 2, 4, 8, 16, 32, 64], seqs or [top]


# =========================================================================== gradient accumulation
def accumulation(target_global_batch: int | None, per_step: int | None) -> tuple[int | None, int | None]:
    """(gradient-accumulation steps, micro-batch) to reach ``target_global_batch`` with at most ``per_step`` a step.

    The fewest steps, with the micro-batch spread evenly: ``ceil(target / steps)`` (so
    ``steps x micro`` may pass the target by less than ``steps``).
    """
    if not target_global_batch or not per_step:
        return None, None
    steps = math.ceil(target_global_batch / per_step)
    return steps, math.ceil(target_global_batch / steps)


def exact_accumulation(target_global_batch: int, per_step: int, extra_steps: int = 3) -> tuple[int, int] | None:
    """(steps, micro-batch) that make exactly ``target_global_batch``, with at most ``extra_steps`` more steps."""
    steps = math.ceil(target_global_batch / per_step)
    for s in range(steps, steps + extra_steps + 1):
        if target_global_batch % s == 0:
            return s, target_global_batch // s
    return None


def affine_fit(points: dict[int, int]) -> tuple[float | None, float | None]:
    """Least-squares (intercept, slope) through (batch, bytes) points; (None, None) with fewer than two batches."""
    if len(points) < 2:
        return None, None
    xs, ys = zip(*sorted(points.items()), strict=False)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=False)) / sxx
    return my - slope * mx, slope
