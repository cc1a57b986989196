"""Batch-size search over a probe: the largest batch that fits, exactly, in few trials.

Knows nothing about torch. A *probe* runs one trial at a batch size and says whether
it fit and, when it did, the peak of the metric the capacity limits (bytes). The
search

1. starts at or a little below the predicted limit (``Guide.max_batch`` x
   ``first_fraction``: 1.0 when the prediction is known to be close, as on the CPU cap;
   0.9 by default), where the trial most likely fits and gives a measured peak close to
   the capacity (if it does not, it backs off by 2 % or 10 %, halves, then measures the
   smallest batch);
2. fits the measured peaks as an affine function of the batch (the slope from two
   measured points, or the prediction's bytes per sample while there is only one)
   and jumps to the largest batch that model says fits;
3. brackets the limit (a fit at ``b``, an OOM at ``b + 1``) and, when the model is
   caught being wrong, gallops and bisects inside the bracket, so the answer is
   exact (±0) even on step-shaped or noisy peaks.

It never tries more than ``max_batch``, and never more than 1.5x the predicted
limit (or 2x the largest batch measured to fit) while no OOM bounds it.
Fits are assumed monotone: if ``b`` OOMs, every larger batch does too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..results import SearchStatus


@dataclass(frozen=True)
class Outcome:
    """What a probe reports for one trial."""

    fits: bool
    #: peak of the limited metric (bytes) when the trial fit; None when unknown
    peak_bytes: int | None = None
    #: the capacity as the probe measured it (e.g. free GPU memory seen by a child process)
    capacity_bytes: int | None = None
    #: the allocated peak (bytes) when the limited metric is another one (CUDA's reserved): the
    #: reserved peak saturates near the capacity, the allocated one keeps its per-sample slope
    allocated_bytes: int | None = None


def Fit(  # noqa: N802
    peak_bytes: int | None = None, capacity_bytes: int | None = None, allocated_bytes: int | None = None
) -> Outcome:
    return Outcome(True, peak_bytes, capacity_bytes, allocated_bytes)


def OOM(capacity_bytes: int | None = None) -> Outcome:  # noqa: N802
    return Outcome(False, None, capacity_bytes)


@dataclass(frozen=True)
class Guide:
    """A prediction of the metric: ``fixed_bytes + bytes_per_sample * batch``, and the batch it says fits."""

    max_batch: int | None = None
    bytes_per_sample: float | None = None
    fixed_bytes: float | None = None

    def predict(self, batch: int) -> int | None:
        if self.bytes_per_sample is None or self.fixed_bytes is None:
            return None
        return int(round(self.fixed_bytes + self.bytes_per_sample * batch))


@dataclass(frozen=True)
class Step:
    """One trial the search ran."""

    batch: int
    fits: bool
    peak_bytes: int | None
    #: why this batch: prediction, start, extrapolate, confirm, gallop, bisect, back off, halve, smallest, double
    reason: str
    #: the search's own estimate of the peak before the trial (its affine model), if any
    expected_bytes: int | None = None


#: a reserved peak within this fraction of the capacity may be saturated (the allocator freed its cache)
SATURATION = 0.05

STATUSES = ("exact", "max_batch", "nothing_fits", "interrupted", "trial_limit")


@dataclass(frozen=True)
class SearchResult:
    largest_fit: int | None
    smallest_oom: int | None
    status: SearchStatus
    steps: tuple[Step, ...] = field(default_factory=tuple)
    capacity_bytes: int | None = None

    @property
    def exact(self) -> bool:
        return self.status == "exact"

    @property
    def trials(self) -> int:
        return len(self.steps)

    @property
    def ooms(self) -> int:
        return sum(1 for s in self.steps if not s.fits)


Probe = Callable[[int], Outcome]


class _State:
    def __init__(self, capacity: int | None, guide: Guide | None, min_batch: int, max_batch: int):
        self.capacity = capacity
        self.guide = guide
        self.min_batch = min_batch
        self.max_batch = max_batch
        self.lo = min_batch - 1  # largest batch known to fit (min_batch - 1: none yet)
        self.hi: int | None = None  # smallest batch known to OOM
        self.points: dict[int, int] = {}  # batch -> measured peak, fits only
        self.allocated: dict[int, int] = {}  # batch -> allocated peak, fits only, when the probe reports it
        self.steps: list[Step] = []
        self.up = 0  # consecutive fits the model said would OOM
        self.down = 0  # consecutive OOMs (the model said they would fit, or no model)
        #: the prediction's bytes per sample, until an OOM proves a model built on it too optimistic
        self.trust_guide = True

    # -- the affine model ------------------------------------------------------------
    def model(self) -> tuple[float, float] | None:
        """(intercept, slope) of the metric near the limit, or None."""
        pts = sorted(self.points.items())
        guide = self.guide
        guide_slope = guide.bytes_per_sample if guide and guide.bytes_per_sample else None
        if not self.trust_guide:
            guide_slope = None
        if not pts:
            if guide and guide_slope and guide.fixed_bytes is not None:
                return float(guide.fixed_bytes), float(guide_slope)
            return None
        b_top, p_top = pts[-1]
        slope = measured = _measured_slope(pts)
        if (
            slope is None
            and len(pts) == 1
            and self.guide
            and self.guide.fixed_bytes is not None
            and p_top > self.guide.fixed_bytes
        ):
            # one measured point and the prediction's fixed part (parameters, optimizer state: what
            # predictions get right): the per-sample bytes follow; better than the predicted slope,
            # whose error is where a prediction's error usually is
            slope = (p_top - self.guide.fixed_bytes) / b_top
        if slope is None:
            slope = guide_slope
        if slope is None:
            slope = p_top / b_top  # an upper bound on the slope when the intercept is positive: a safe estimate
        allocated_slope = self.allocated_slope()
        near = self.capacity is not None and p_top >= (1 - SATURATION) * self.capacity
        if allocated_slope is not None and near and (measured is None or allocated_slope > measured):
            # the limited metric (CUDA's reserved) grew slower than the allocated bytes close to the
            # capacity: the caching allocator freed its cache there, so the reserved peak saturates and
            # its slope means nothing. Per sample it still needs at least the allocated bytes, and what
            # it needs on top is less than the smallest reserved-minus-allocated gap measured (the cache
            # it gave back) and about what the prediction models over the allocated bytes (fragmentation):
            # aim between the two, from the top allocated peak
            slope = max(slope, allocated_slope)
            if slope > 0:
                return self.allocated[b_top] + self.saturated_gap(b_top) - slope * b_top, slope
        if slope <= 0:
            return None
        return p_top - slope * b_top, slope

    def saturated_gap(self, b_top: int) -> float:
        """The bytes the metric needs over the allocated peak near the capacity (see :meth:`model`)."""
        measured = min(self.points[b] - a for b, a in self.allocated.items())
        predicted = self.guide.predict(b_top) if self.guide else None
        modelled = 0.0 if predicted is None else max(0.0, float(predicted - self.allocated[b_top]))
        return max(0.0, (measured + min(modelled, measured)) / 2)

    def allocated_slope(self) -> float | None:
        """Allocated bytes per sample from the measured allocated peaks (None: fewer than two usable)."""
        pts = sorted(self.allocated.items())
        if len(pts) < 2 or len(pts) != len(self.points):
            return None
        return _measured_slope(pts)

    def slope_from_guide(self) -> bool:
        return bool(self.trust_guide and self.guide and self.guide.bytes_per_sample)

    def estimate(self) -> int | None:
        """The largest batch the model says fits (may be <= lo or >= hi), or None without a model."""
        if self.capacity is None:
            return None
        m = self.model()
        if m is None:
            return None
        intercept, slope = m
        room = (self.capacity - intercept) / slope
        if room > 10 * self.max_batch + 10:
            return 10 * self.max_batch + 10
        return math.floor(room + 1e-9)

    def expected(self, batch: int) -> int | None:
        m = self.model()
        return None if m is None else int(round(m[0] + m[1] * batch))

    # -- where to go next ------------------------------------------------------------
    def ceiling(self) -> int:
        """The largest batch worth trying now."""
        top = self.max_batch
        if self.hi is not None:
            return min(top, self.hi - 1)
        has_fit = self.lo >= self.min_batch
        if self.guide and self.guide.max_batch is not None:
            far = max(math.ceil(1.5 * self.guide.max_batch), self.min_batch)
            top = min(top, max(far, 2 * self.lo if has_fit else 0))
        elif has_fit:
            top = min(top, 16 * self.lo)
        return max(top, self.lo + 1)

    def propose(self, start: int | None, first_fraction: float) -> tuple[int, str]:
        lo, hi = self.lo, self.hi
        floor_ = lo + 1
        ceil_ = self.ceiling()
        if not self.steps:
            if start is not None:
                return _clamp(start, floor_, ceil_), "start"
            if self.guide and self.guide.max_batch is not None:
                return _clamp(math.floor(self.guide.max_batch * first_fraction), floor_, ceil_), "prediction"
            g = self.estimate()
            if g is not None:
                return _clamp(math.floor(g * first_fraction), floor_, ceil_), "prediction"
            return floor_, "start"
        g = self.estimate()
        has_fit = lo >= self.min_batch
        if hi is not None and (self.down > 0 or g is None):
            # the model was too optimistic (or there is none): step down inside the bracket
            if not has_fit:
                # nothing fits yet: back off from the OOM by typical prediction errors when the search
                # started at the prediction (2 %, then 10 % when it started there exactly; else 10 %),
                # then halve once, then measure the smallest batch and extrapolate from it
                factors = [0.5]
                if self.steps[0].reason == "prediction":
                    factors = ([0.98, 0.9] if first_fraction >= 0.99 else [0.9]) + factors
                if self.down <= len(factors):
                    f = factors[self.down - 1]
                    why = "halve" if f == 0.5 else "back off"
                    return _clamp(max(self.min_batch, math.floor(f * hi)), floor_, ceil_), why
                return floor_, "smallest"
            mid = (lo + hi) // 2
            if len(self.points) < 2:  # one measured point and a wrong slope: a second point settles the slope
                return _clamp(mid, floor_, ceil_), "bisect"
            # a measured slope that missed: most likely just below the OOM; gallop down (2, 8, 32, ...)
            return _clamp(max(mid, hi - 2 ** (2 * self.down - 1)), floor_, ceil_), "gallop"
        if g is None:
            return _clamp(2 * lo if has_fit else floor_, floor_, ceil_), "double"
        if g > lo and self.up == 0:
            if len(self.points) == 1 and self.slope_from_guide() and self.guide and self.guide.fixed_bytes is None:
                # the slope is the prediction's own and its fixed part unknown (other units): aim 10 % short,
                # so the next trial most likely fits and measures the slope
                g = max(lo + 1, lo + math.floor((g - lo) * 0.9 + 1e-9))
            return _clamp(g, floor_, ceil_), "extrapolate"
        if self.up == 0:
            return floor_, "confirm"
        # the model keeps underestimating: gallop upwards (and use the model if it says more)
        return _clamp(max(g, lo + 2**self.up), floor_, ceil_), "gallop"

    def record(
        self, batch: int, outcome: Outcome, reason: str, expected_fit: bool | None, expected_bytes: int | None
    ) -> None:
        if outcome.capacity_bytes is not None:
            self.capacity = outcome.capacity_bytes
        self.steps.append(Step(batch, outcome.fits, outcome.peak_bytes, reason, expected_bytes))
        if outcome.fits:
            self.lo = max(self.lo, batch)
            if outcome.peak_bytes is not None:
                self.points[batch] = int(outcome.peak_bytes)
            if outcome.allocated_bytes is not None:
                self.allocated[batch] = int(outcome.allocated_bytes)
            self.up = self.up + 1 if expected_fit is False else 0
            self.down = 0
        else:
            self.hi = batch if self.hi is None else min(self.hi, batch)
            self.down = 0 if expected_fit is False else self.down + 1
            if expected_fit and len(self.points) < 2:
                self.trust_guide = False
            self.up = 0

    def status(self) -> SearchStatus | None:
        if self.hi is not None and self.hi <= self.min_batch:
            return "nothing_fits"
        if self.hi is not None and self.hi == self.lo + 1:
            return "exact"
        if self.lo >= self.max_batch:
            return "max_batch"
        return None


def _measured_slope(pts: list[tuple[int, int]]) -> float | None:
    """Bytes per sample through the top two (batch, peak) points, or the top and the first when those two
    are too close to read a slope through rounding; None without two increasing points."""
    if len(pts) < 2:
        return None
    b_top, p_top = pts[-1]
    b_prev, p_prev = pts[-2]
    if b_top - b_prev < max(2, 0.02 * b_top):
        b_prev, p_prev = pts[0]
    if b_top > b_prev and p_top > p_prev:
        return (p_top - p_prev) / (b_top - b_prev)
    return None


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(int(value), high))


def search(
    probe: Probe,
    *,
    capacity_bytes: int | None = None,
    guide: Guide | None = None,
    min_batch: int = 1,
    max_batch: int = 4096,
    start: int | None = None,
    max_trials: int = 40,
    first_fraction: float = 0.9,
    on_step: Callable[[Step], None] | None = None,
) -> SearchResult:
    """Find the largest batch in ``[min_batch, max_batch]`` for which ``probe`` fits.

    ``capacity_bytes`` is what the probe's ``peak_bytes`` must stay under (None: use
    the probe's own reports, or search without a model). ``guide`` is the prediction.
    A ``KeyboardInterrupt`` from the probe ends the search with status "interrupted"
    and what was found so far.
    """
    if min_batch < 1:
        raise ValueError("min_batch must be >= 1")
    if max_batch < min_batch:
        raise ValueError("max_batch must be >= min_batch")
    state = _State(capacity_bytes, guide, min_batch, max_batch)
    status = state.status()
    while status is None:
        if len(state.steps) >= max_trials:
            status = "trial_limit"
            break
        batch, reason = state.propose(start, first_fraction)
        assert state.lo < batch <= max_batch and (state.hi is None or batch < state.hi), (batch, state.lo, state.hi)
        g = state.estimate()
        expected_fit = None if g is None else batch <= g
        expected_bytes = state.expected(batch) if state.capacity is not None or state.points else None
        try:
            outcome = probe(batch)
        except KeyboardInterrupt:
            status = "interrupted"
            break
        state.record(batch, outcome, reason, expected_fit, expected_bytes)
        if on_step is not None:
            on_step(state.steps[-1])
        status = state.status()
    largest = state.lo if state.lo >= min_batch else None
    return SearchResult(largest, state.hi, status, tuple(state.steps), state.capacity)
