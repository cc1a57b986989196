"""Every chart memprof draws: a small declarative spec, one file backend (matplotlib) and one terminal backend.

A chart is data: an :class:`XYChart` (two axes and marks: :class:`Line`, :class:`Points`,
:class:`HLine`, :class:`VLine`), a :class:`BarChart` (stacked horizontal bars) or a :class:`GridChart`
(yes/no cells over two discrete axes, with a boundary in each row). Functions
here turn a command's result into a chart (:func:`batch_chart` for find-batch's peak vs batch,
:func:`compare_chart` for compare's breakdown bars, :func:`scaling_chart` for one rank's peak per
world size, :func:`timeline_chart` for profile's live memory over time, :func:`grid_chart` for estimate's
batch x sequence-length grid); three functions draw any chart:

* :func:`figure` - a matplotlib ``Figure`` (for notebooks, and for the files below);
* :func:`write` - ``.svg``, ``.png``, ``.pdf`` (and ``.html``: the SVG in a page), deterministic:
  the same chart gives the same bytes (fixed SVG ids, no dates in the metadata);
* :func:`terminal` - a Rich ``Text`` of characters, each mark drawn with its ``glyph``.

To add a chart, write one function ``result -> XYChart | BarChart | GridChart``; both backends
draw it. Each mark's ``id`` becomes the
artist's ``gid`` (a ``<g id=...>`` in the SVG), which is what tests look for.

matplotlib is imported lazily, only when a file or a figure is drawn.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rich.text import Text

from ..errors import UsageError
from ..results import MemCategory
from . import byte_unit, ellipsize, format_bytes, precise_bytes

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..results import CompareResult, EstimateResult, FindBatchResult, ProfileResult, ScalingResult, ScalingRow

AxisKind = Literal["bytes", "count", "seconds"]
LineStyle = Literal["solid", "dashed", "dotted"]

#: formats a chart can be written to; ``.html`` is the SVG inside a page
FILE_FORMATS = (".svg", ".png", ".pdf", ".html")


# --------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class Axis:
    label: str
    lo: float
    hi: float
    kind: AxisKind = "count"


@dataclass(frozen=True)
class Line:
    """A polyline through ``points`` (``step``: held until the next point, as memory over time is)."""

    id: str
    points: tuple[tuple[float, float], ...]
    label: str | None = None
    color: str = "#1f77b4"
    style: LineStyle = "solid"
    width: float = 1.5
    step: bool = False
    glyph: str | None = "."  # None: left out of the terminal


@dataclass(frozen=True)
class Points:
    id: str
    points: tuple[tuple[float, float], ...]
    label: str | None = None
    color: str = "#1f77b4"
    marker: Literal["o", "x"] = "o"
    glyph: str | None = "o"


@dataclass(frozen=True)
class HLine:
    """A horizontal rule across the plot (a capacity); the terminal labels its row with ``y``."""

    id: str
    y: float
    label: str | None = None
    color: str = "#c0392b"
    style: LineStyle = "solid"
    width: float = 2.0
    glyph: str | None = "="


@dataclass(frozen=True)
class VLine:
    """A vertical rule at ``x`` from ``y0`` to ``y1`` (None: the plot's edge)."""

    id: str
    x: float
    label: str | None = None
    color: str = "#8e44ad"
    style: LineStyle = "dotted"
    width: float = 1.0
    y0: float | None = None
    y1: float | None = None
    alpha: float = 1.0
    glyph: str | None = "|"


Mark = Line | Points | HLine | VLine


@dataclass(frozen=True)
class XYChart:
    title: str
    x: Axis
    y: Axis
    marks: tuple[Mark, ...]
    legend: str = "best"  # matplotlib's legend location; "outside lower center" and such: beside the axes
    size: tuple[float, float] = (8.0, 5.0)  # inches


@dataclass(frozen=True)
class Segment:
    """One part of a stacked bar: its name, colour, and the character that draws it in the terminal."""

    label: str
    color: str
    glyph: str


@dataclass(frozen=True)
class Bar:
    label: str
    values: tuple[int, ...]  # bytes per segment, in the chart's segment order
    total: int
    highlight: bool = False  # marked with a star, in bold
    note: str = ""  # after the total, in the terminal


@dataclass(frozen=True)
class BarChart:
    title: str
    x: Axis
    segments: tuple[Segment, ...]
    bars: tuple[Bar, ...]
    size: tuple[float, float] = field(default=(9.0, 3.5))
    limit: HLine | None = None  # a rule across the bars at ``limit.y`` bytes (a capacity), labelled
    file_notes: bool = False  # each bar's note after its total in files too (the terminal always shows it)


@dataclass(frozen=True)
class GridChart:
    """Yes/no cells over two discrete axes (``cells[row][column]``), and in each row a boundary after its
    last yes: the batch sizes (columns) and sequence lengths (rows) that fit."""

    title: str
    subtitle: str  # under the title in files, above the grid in the terminal
    x_label: str
    y_label: str
    columns: tuple[int, ...]
    rows: tuple[int, ...]
    cells: tuple[tuple[bool, ...], ...]
    row_notes: tuple[str, ...] = ()  # after each row in the terminal (the largest batch)
    notes_label: str = "largest batch"
    yes: Segment = Segment("fits", "#4caf50", "█")
    no: Segment = Segment("does not fit", "#eeeeee", "·")
    boundary: str = "#c62828"
    size: tuple[float, float] = (8.0, 5.0)


Chart = XYChart | BarChart | GridChart


# --------------------------------------------------------------------------- ticks and labels
def _nice(raw: float) -> float:
    """The 1, 2 or 5 x 10^k at or above ``raw``."""
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))


def ticks(axis: Axis, target: int = 5) -> list[float]:
    """About ``target`` round values from ``axis.lo`` to ``axis.hi``: 1/2/5 x 10^k steps, of the axis's
    binary unit for bytes (0.5 GiB, 256 MiB ...), whole numbers for counts."""
    scale = float(byte_unit(max(abs(axis.lo), abs(axis.hi)))[0]) if axis.kind == "bytes" else 1.0
    step = _nice((axis.hi - axis.lo) / scale / max(1, target)) * scale
    if axis.kind == "count":
        step = max(1.0, round(step))
    first = math.ceil(axis.lo / step - 1e-9) * step
    n = int((axis.hi - first) / step + 1e-9)
    return [first + i * step for i in range(n + 1)]


def tick_label(axis: Axis, value: float, unit: str | None = None) -> str:
    if axis.kind == "bytes":
        return format_bytes(value, None, unit=unit)
    if axis.kind == "seconds":
        return f"{value:g} s"
    return str(int(round(value)))


def _tick_labels(axis: Axis, values: Sequence[float]) -> list[str]:
    unit = byte_unit(max(abs(axis.lo), abs(axis.hi)))[1] if axis.kind == "bytes" else None
    return [tick_label(axis, v, unit) for v in values]


# --------------------------------------------------------------------------- charts of results
_GREEN, _RED, _BLUE, _PURPLE = "#27ae60", "#c0392b", "#2980b9", "#8e44ad"


def batch_chart(result: FindBatchResult) -> XYChart:
    """find-batch: measured peaks (fits as dots, OOMs as crosses above the capacity), the prediction's
    line, the measured fit, the capacity, and the recommended batch with the headroom it leaves."""
    metric = result.metric
    fits: list[tuple[float, float]] = []
    ooms: list[int] = []
    for t in result.trials:
        value = t.peak_reserved_bytes if metric == "reserved" else t.peak_allocated_bytes
        if t.fits and value is not None:
            fits.append((t.batch_size, int(value)))
        elif not t.fits:
            ooms.append(t.batch_size)
    cap = int(result.capacity.total_bytes)
    p = result.prediction
    predicted = (float(p.intercept_bytes), float(p.slope_bytes_per_sample)) if p and p.metric == metric else None
    measured = None
    if result.slope_bytes_per_sample is not None and result.intercept_bytes is not None:
        measured = (float(result.intercept_bytes), float(result.slope_bytes_per_sample))

    x_max = max([int(b) for b, _ in fits] + ooms + [result.recommended_batch or 0, 1])
    x_max = int(x_max * 1.08) + 1
    y_max = int(max([v for _, v in fits] + [cap]) * 1.12)
    lows = [v for _, v in fits] + [line[0] for line in (predicted, measured) if line is not None]
    y_min = 0
    if lows and min(lows) > 0.4 * cap:  # zoom in on the part that grows with the batch
        y_min = int(min(min(lows), cap) * 0.9)
        y_max = int(cap + 0.12 * (cap - y_min))

    def through(line: tuple[float, float]) -> tuple[tuple[float, float], ...]:
        a, s = line
        x0 = max(0.0, (y_min - a) / s) if s > 0 and a < y_min else 0.0
        return ((x0, a + s * x0), (float(x_max), a + s * x_max))

    oom_y = min(y_max - 0.02 * (y_max - y_min), cap + 0.07 * (y_max - y_min))  # just above the capacity
    marks: list[Mark] = [
        Points("fits", tuple(fits), "measured (fits)", _GREEN),
        Points("oom", tuple((float(b), oom_y) for b in ooms), "out of memory", _RED, "x", "x"),
        HLine("capacity", cap, f"capacity {format_bytes(cap)}", _RED),
    ]
    if predicted is not None:
        marks.append(Line("predicted", through(predicted), "predicted (traced)", _BLUE, "dashed"))
    if measured is not None:
        marks.append(Line("measured-fit", through(measured), "measured fit", _GREEN, width=1.0, glyph=None))
    if result.recommended_batch is not None:
        rec, rec_bytes = result.recommended_batch, result.recommended_expected_bytes
        marks.append(VLine("recommended", rec, f"recommended batch {rec}", _PURPLE, y0=y_min, y1=cap))
        if rec_bytes is not None:
            headroom = f"headroom {precise_bytes(cap - rec_bytes)}"
            marks.append(VLine("headroom", rec, headroom, _PURPLE, "solid", 5.0, rec_bytes, cap, 0.5, None))
    label = "live tensor bytes" if metric == "allocated" else "torch reserved"
    return XYChart(
        f"{result.workload.get('model')}: peak {label} vs batch size",
        Axis("batch size", 0, x_max, "count"),
        Axis(f"peak {label}", y_min, y_max, "bytes"),
        tuple(marks),
        legend="outside lower center",
    )


#: stacking order of compare's bars, their colours and terminal characters (readable without colour)
BAR_SEGMENTS: dict[MemCategory, tuple[str, str]] = {
    MemCategory.PARAMETER: ("#4e79a7", "█"),
    MemCategory.BUFFER: ("#76b7b2", "▌"),
    MemCategory.GRADIENT: ("#b07aa1", "▓"),
    MemCategory.OPTIMIZER_STATE: ("#edc948", "▒"),
    MemCategory.ACTIVATION: ("#59a14f", "░"),
    MemCategory.TEMPORARY: ("#e15759", "▞"),
    MemCategory.INPUT: ("#9c755f", "▪"),
    MemCategory.CUDA_OVERHEAD: ("#bab0ac", "·"),
    MemCategory.GATHERED_PARAMETER: ("#86bcb6", "▙"),
    MemCategory.COMMUNICATION: ("#f28e2b", "▚"),
}


def compare_chart(result: CompareResult) -> BarChart:
    """compare: one stacked bar per traced configuration, the memory at its peak by category."""
    rows = [r for r in result.rows if r.error is None and r.peak_bytes]
    used = [c for c in BAR_SEGMENTS if any(r.breakdown_at_peak.get(c) for r in rows)]
    bars = []
    for r in rows:
        where = "" if r.peak_phase is None else r.peak_phase + (f", {r.peak_module}" if r.peak_module else "")
        values = tuple(max(0, int(r.breakdown_at_peak.get(c, 0) or 0)) for c in used)
        bars.append(Bar(r.label, values, int(r.peak_bytes or 0), r.best, where))
    top = max((b.total for b in bars), default=0)
    return BarChart(
        f"{result.model}: memory at the peak (batch {result.base_workload.get('batch_size')}, {result.target})",
        Axis(f"memory at the peak: {result.peak_metric}", 0, top * 1.15 or 1, "bytes"),
        tuple(Segment(c.value, *BAR_SEGMENTS[c]) for c in used),
        tuple(bars),
        size=(9.0, 0.5 * len(bars) + 2.0),
    )


# --------------------------------------------------------------------------- batch x sequence-length grid
def grid_chart(result: EstimateResult) -> GridChart:
    """``memprof estimate --grid``: which batch x sequence-length cells fit (rows from the shortest sequence),
    each row's boundary after its largest fitting batch."""
    grid = result.grid
    assert grid is not None, "the estimate has no grid (estimate(..., grid=...))"
    batches, seqs = tuple(grid.batches), tuple(grid.seq_lens)
    cells = tuple(tuple(largest is not None and b <= largest for b in batches) for largest in grid.max_batch)
    notes = tuple(
        "none" if largest is None else (f"{largest}+" if largest >= batches[-1] else str(largest))
        for largest in grid.max_batch
    )
    what = "prompt length" if grid.new_tokens is not None else "sequence length"
    return GridChart(
        f"{result.workload.get('model')}: batch size x {what} that fit",
        f"fits {precise_bytes(grid.capacity_bytes)} ({grid.metric}): filled = fits",
        "batch size",
        f"{what} (tokens)",
        batches,
        seqs,
        cells,
        notes,
        size=(1.6 + 0.7 * len(batches), 1.6 + 0.45 * len(seqs)),
    )


# --------------------------------------------------------------------------- per-rank memory vs world size
#: the parts of one rank's peak that the world-size chart stacks: label, colour, terminal character
SCALING_PARTS = (
    ("model states", "#4e79a7", "█"),  # parameters + gradients + optimizer state, as held by the rank
    ("activations", "#59a14f", "░"),
    ("gathered + buffers", "#f28e2b", "▒"),  # gathered parameters, communication buffers
    ("other", "#bab0ac", "·"),  # temporaries, inputs, buffers, workspaces
)


def scaling_parts(row: ScalingRow) -> tuple[int, int, int, int]:
    """(model states, activations, gathered + communication, the rest) of one row's peak, summing to it."""
    peak = int(row.peak_bytes or 0)
    states = min(peak, int(row.model_state_bytes or 0))
    acts = min(peak - states, int(row.activation_bytes or 0))
    comm = min(peak - states - acts, int((row.gathered_bytes or 0) + (row.communication_bytes or 0)))
    return states, acts, comm, peak - states - acts - comm


def scaling_chart(result: ScalingResult) -> BarChart:
    """estimate --world-size: one bar per world size, one rank's peak split as :data:`SCALING_PARTS`; the capacity."""
    rows = [r for r in result.rows if r.peak_bytes]
    cap = result.capacity.total_bytes if result.capacity is not None else None
    bars = tuple(
        Bar(
            f"{r.world_size} rank" + ("s" if r.world_size > 1 else ""),
            scaling_parts(r),
            int(r.peak_bytes or 0),
            note=f"batch/rank {r.max_batch}" if r.max_batch is not None else "",
        )
        for r in rows
    )
    top = max([b.total for b in bars] + ([cap] if cap else []), default=0)  # room for the notes on the right
    limit = HLine("capacity", float(cap), f"capacity {format_bytes(cap)}", glyph="|") if cap else None
    return BarChart(
        f"{result.workload.get('model')}: one rank's peak vs world size ({result.strategy})",
        Axis("one rank's peak memory", 0, top * 1.4 or 1, "bytes"),
        tuple(Segment(label, color, glyph) for label, color, glyph in SCALING_PARTS),
        bars,
        size=(9.0, 0.5 * len(bars) + 2.0),
        limit=limit,
        file_notes=True,
    )


def timeline_chart(result: ProfileResult, max_points: int = 3000) -> XYChart:
    """profile: live tensor bytes over the run (and CUDA reserved, NVML used), the peak marked."""
    raw = result._timeline or {}
    ts, bs = list(raw.get("t", ())), list(raw.get("allocated", ()))
    if not ts:
        ts = [s.t_s for s in result.timeline]
        bs = [s.allocated_bytes for s in result.timeline]
    if len(ts) > max_points:  # keep each bucket's max so the peak survives
        step = len(ts) / max_points
        idx = [
            max(range(int(j * step), min(len(ts), max(int((j + 1) * step), int(j * step) + 1))), key=bs.__getitem__)
            for j in range(max_points)
        ]
        ts, bs = [ts[i] for i in idx], [bs[i] for i in idx]
    cuda = raw.get("cuda") or [(s.t_s, s.reserved_bytes, s.nvml_bytes) for s in result.timeline]
    reserved = tuple((float(c[0]), float(c[1])) for c in cuda if c[1] is not None)
    nvml = tuple((float(c[0]), float(c[2])) for c in cuda if c[2] is not None)
    peak = result.peak
    t_max = max([ts[-1] if ts else 0.0] + [t for t, _ in reserved + nvml] + [peak.time_s, 1e-9])
    y_max = max([peak.bytes, 1] + [b for _, b in reserved + nvml])
    where = f"{peak.location or '?'} ({peak.phase})"
    marks: list[Mark] = [
        Line(
            "allocated",
            tuple(zip(map(float, ts), map(float, bs), strict=True)),
            "allocated (tracked tensors)",
            "#1f77b4",
            step=True,
            glyph=".",
        ),
    ]
    if reserved:
        marks.append(Line("reserved", reserved, "CUDA reserved", "#ff7f0e", step=True, glyph=":"))
    if nvml:
        marks.append(Line("nvml", nvml, "NVML used (process)", "#2ca02c", glyph="-"))
    marks.append(VLine("peak-time", peak.time_s, None, "#d62728", "dashed", 0.8, glyph=None))
    marks.append(
        Points(
            "peak",
            ((peak.time_s, float(peak.bytes)),),
            f"peak {format_bytes(peak.bytes)} at {where}",
            "#d62728",
            glyph="*",
        )
    )
    return XYChart(
        f"memprof profile: {Path(result.script).name} ({result.device})",
        Axis("time since the script started", 0, t_max, "seconds"),
        Axis("live memory", 0, y_max * 1.25, "bytes"),  # room for the legend above the curves
        tuple(marks),
        legend="upper left",
        size=(10.0, 4.0),
    )


# --------------------------------------------------------------------------- files (matplotlib)
_DASHES = {"solid": "-", "dashed": "--", "dotted": ":"}


def check_plot_path(path: Path, suffixes: tuple[str, ...] = FILE_FORMATS) -> None:
    """Fail before any work when the chart cannot be written: an unknown suffix, or no matplotlib."""
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise UsageError(
            f"cannot write a plot to {path.name!r}: unknown format {suffix or '(none)'}",
            f"name the file {', '.join(suffixes[:-1])} or {suffixes[-1]}",
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "plots need matplotlib, which is not installed",
            "pip install matplotlib (memprof depends on it: pip install --upgrade memprof brings it)",
        ) from None


def figure(chart: Chart) -> Figure:
    """The chart as a matplotlib ``Figure`` (no pyplot state: safe in notebooks and threads)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=chart.size, dpi=120, layout="constrained")
    ax = fig.add_subplot()
    if isinstance(chart, BarChart):
        _draw_bars(chart, ax)
    elif isinstance(chart, GridChart):
        _draw_grid(chart, ax)
    else:
        _draw_xy(chart, ax)
    ax.set_title(chart.title + (f"\n{chart.subtitle}" if isinstance(chart, GridChart) else ""), fontsize=11)
    return fig


def _axis_ticks(ax: Any, which: str, axis: Axis) -> None:
    from matplotlib.ticker import FixedFormatter, FixedLocator

    values = ticks(axis)
    target = ax.xaxis if which == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(values))
    target.set_major_formatter(FixedFormatter(_tick_labels(axis, values)))


def _draw_xy(chart: XYChart, ax: Any) -> None:
    for m in chart.marks:
        if isinstance(m, Line):
            xs, ys = [p[0] for p in m.points], [p[1] for p in m.points]
            ax.plot(
                xs,
                ys,
                _DASHES[m.style],
                color=m.color,
                lw=m.width,
                label=m.label,
                gid=m.id,
                drawstyle="steps-post" if m.step else "default",
            )
        elif isinstance(m, Points):
            if not m.points:
                continue
            xs, ys = [p[0] for p in m.points], [p[1] for p in m.points]
            size = {"o": {"ms": 6}, "x": {"ms": 9, "mew": 2}}[m.marker]
            ax.plot(xs, ys, m.marker, color=m.color, label=m.label, gid=m.id, zorder=3, **size)
        elif isinstance(m, HLine):
            ax.axhline(m.y, color=m.color, lw=m.width, ls=_DASHES[m.style], label=m.label, gid=m.id)
        elif m.y0 is None and m.y1 is None:
            ax.axvline(m.x, color=m.color, lw=m.width, ls=_DASHES[m.style], label=m.label, gid=m.id, alpha=m.alpha)
        else:
            y0 = chart.y.lo if m.y0 is None else m.y0
            y1 = chart.y.hi if m.y1 is None else m.y1
            ax.vlines(
                m.x,
                y0,
                y1,
                colors=m.color,
                lw=m.width,
                linestyles=_DASHES[m.style],
                label=m.label,
                gid=m.id,
                alpha=m.alpha,
            )
    ax.set_xlim(chart.x.lo, chart.x.hi)
    ax.set_ylim(chart.y.lo, chart.y.hi)
    _axis_ticks(ax, "x", chart.x)
    _axis_ticks(ax, "y", chart.y)
    ax.grid(True, color="#eeeeee", lw=0.8)
    ax.set_axisbelow(True)
    ax.set_xlabel(chart.x.label)
    ax.set_ylabel(chart.y.label)
    labelled = sum(1 for m in chart.marks if m.label and _drawn(m))
    if labelled and chart.legend.startswith("outside"):  # below or beside the axes: it covers nothing
        ax.figure.legend(loc=chart.legend, fontsize="small", ncol=min(4, labelled), frameon=False)
    elif labelled:
        ax.legend(loc=chart.legend, fontsize="small")


def _draw_bars(chart: BarChart, ax: Any) -> None:
    bars = chart.bars[::-1]  # the first configuration on top
    labels = [("★ " if b.highlight else "") + b.label for b in bars]
    left = [0.0] * len(bars)
    for i, seg in enumerate(chart.segments):
        values = [float(b.values[i]) for b in bars]
        drawn = ax.barh(range(len(bars)), values, left=left, color=seg.color, label=seg.label)
        for y, rect in enumerate(drawn.patches):
            rect.set_gid(f"bar-{len(bars) - 1 - y}-segment-{i}")  # bar 0: the first configuration, on top
        left = [a + v for a, v in zip(left, values, strict=True)]
    for y, b in enumerate(bars):
        ax.text(b.total, y, " " + format_bytes(b.total), va="center", fontsize=9, gid=f"total-{len(bars) - 1 - y}")
        if chart.file_notes and b.note:
            ax.annotate(
                b.note,
                (b.total, y),
                xytext=(70, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                gid=f"note-{len(bars) - 1 - y}",
            )
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels(labels)
    for tick, b in zip(ax.get_yticklabels(), bars, strict=True):
        if b.highlight:
            tick.set_fontweight("bold")
    if chart.limit is not None:
        m = chart.limit
        ax.axvline(m.y, color=m.color, linestyle=m.style, linewidth=m.width, label=m.label, gid=m.id)
    ax.set_xlim(chart.x.lo, chart.x.hi)
    _axis_ticks(ax, "x", chart.x)
    ax.set_xlabel(chart.x.label)
    if chart.segments:
        n = len(chart.segments) + (chart.limit is not None)
        ax.figure.legend(loc="outside lower center", ncol=min(5, n), frameon=False, fontsize=8)


def _boundary(chart: GridChart) -> list[tuple[float, float]]:
    """The step line after each row's last yes, in cell coordinates (cell (c, r) spans c-0.5..c+0.5)."""
    points: list[tuple[float, float]] = []
    for r, row in enumerate(chart.cells):
        x = sum(row) - 0.5
        points += [(x, r - 0.5), (x, r + 0.5)]
    return points


def _draw_grid(chart: GridChart, ax: Any) -> None:
    from matplotlib.patches import Rectangle

    for r, row in enumerate(chart.cells):
        for c, yes in enumerate(row):
            part = chart.yes if yes else chart.no
            ax.add_patch(
                Rectangle(
                    (c - 0.47, r - 0.47), 0.94, 0.94, color=part.color, gid=f"cell-{r}-{c}-{'yes' if yes else 'no'}"
                )
            )
    points = _boundary(chart)
    ax.plot([p[0] for p in points], [p[1] for p in points], color=chart.boundary, lw=2.5, gid="boundary")
    ax.set_xlim(-0.5, len(chart.columns) - 0.5)
    ax.set_ylim(len(chart.rows) - 0.5, -0.5)  # the first row on top
    ax.set_xticks(range(len(chart.columns)), [str(v) for v in chart.columns])
    ax.set_yticks(range(len(chart.rows)), [f"{v:,}" for v in chart.rows])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel(chart.y_label)


def _rc() -> AbstractContextManager[None]:
    """Text stays text in SVG (searchable, small); ids are hashed from a fixed salt: the same chart, the same bytes."""
    import matplotlib

    return matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "memprof", "pdf.fonttype": 42})


def svg_text(chart: Chart) -> str:
    """The chart as an SVG document."""
    import io

    buf = io.StringIO()
    with _rc():
        figure(chart).savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def write(chart: Chart, path: Path, page: str = "") -> Path:
    """Write ``chart`` to ``path`` (.svg, .png, .pdf or .html; ``page``: HTML to put under the chart)."""
    suffix = path.suffix.lower()
    if suffix == ".html":
        body = svg_text(chart)
        body = body[body.index("<svg") :]  # inline SVG: no XML prolog in an HTML page
        title = _escape(chart.title)
        path.write_text(
            f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 10px;text-align:left}</style></head>"
            f"<body>\n{body}{page}</body></html>\n",
            encoding="utf-8",
        )
        return path
    if suffix == ".svg":
        path.write_text(svg_text(chart), encoding="utf-8")
        return path
    metadata: dict[str, Any] = {"CreationDate": None} if suffix == ".pdf" else {"Software": "memprof"}
    with _rc():
        figure(chart).savefig(path, metadata=metadata)
    return path


def _escape(text: str) -> str:
    import html

    return html.escape(text)


# --------------------------------------------------------------------------- terminal
def terminal(chart: Chart, width: int = 56, height: int = 12, line_width: int | None = None) -> Text:
    """The chart in characters: each mark drawn with its ``glyph`` (and its colour, where the terminal has colour).

    A bar chart's bars are ``width`` characters; with ``line_width`` every line fits that many columns: the
    bars shrink (down to 10 characters), the legend folds between items and the notes are shortened in the
    middle before anything wraps."""
    if isinstance(chart, BarChart):
        return _terminal_bars(chart, width, line_width)
    if isinstance(chart, GridChart):
        return _terminal_grid(chart)
    return _terminal_xy(chart, width, height)


def _terminal_grid(chart: GridChart) -> Text:
    """One line per row: each cell its glyph, ``│`` after the row's last yes, then the row's note."""
    cell = max(len(str(v)) for v in chart.columns) + 1
    text = Text(" " * 10 + "".join(f"{v:>{cell}}" for v in chart.columns) + f"   {chart.notes_label}\n")
    for r, (value, row) in enumerate(zip(chart.rows, chart.cells, strict=True)):
        text.append(f"{value:>9,} ")
        n = sum(row)
        for c, yes in enumerate(row):
            part = chart.yes if yes else chart.no
            edge = c == n and 0 < n < len(row)  # the boundary takes the pad before the first no
            text.append("│" if edge else " ", style=chart.boundary if edge else None)
            text.append(" " * (cell - 2))
            text.append(part.glyph, style=part.color if yes else None)
        note = chart.row_notes[r] if r < len(chart.row_notes) else ""
        text.append(f"   {note}" + ("\n" if r < len(chart.rows) - 1 else ""))
    return text


def _terminal_xy(chart: XYChart, width: int, height: int) -> Text:
    x, y = chart.x, chart.y
    grid: list[list[tuple[str, str | None]]] = [[(" ", None)] * width for _ in range(height)]
    kind = [[""] * width for _ in range(height)]  # what drew each cell: "line", "rule" or "point"

    def col(v: float) -> int:
        return max(0, min(width - 1, int(round((width - 1) * (v - x.lo) / (x.hi - x.lo)))))

    def row(v: float) -> int:
        frac = (v - y.lo) / (y.hi - y.lo)
        return max(0, min(height - 1, int(round((height - 1) * (1 - frac)))))

    def put(r: int, c: int, glyph: str, color: str, what: str) -> None:
        grid[r][c] = (glyph, color)
        kind[r][c] = what

    hline_rows: dict[int, float] = {}
    # lines first, then rules (a vertical rule fills only blank cells and lines' cells), points on top
    for m in chart.marks:
        if isinstance(m, Line) and m.glyph and m.points:
            last = None
            for c, v in enumerate(_column_values(m, x, width)):
                if v is None or not y.lo <= v <= y.hi:
                    last = None
                    continue
                r = row(v)
                # a step line rises and falls inside a column: join it to the previous column's row
                for rr in range(min(r, last), max(r, last) + 1) if m.step and last is not None else (r,):
                    put(rr, c, m.glyph, m.color, "line")
                last = r
    for m in chart.marks:
        if isinstance(m, HLine) and m.glyph:
            r = row(m.y)
            hline_rows[r] = m.y
            for c in range(width):
                put(r, c, m.glyph, m.color, "rule")
    for m in chart.marks:
        if isinstance(m, VLine) and m.glyph:
            c = col(m.x)
            top = row(y.hi if m.y1 is None else m.y1)
            bottom = row(y.lo if m.y0 is None else m.y0)
            for r in range(top, bottom + 1):
                if kind[r][c] in ("", "line"):
                    put(r, c, m.glyph, m.color, "rule")
    for m in chart.marks:
        if isinstance(m, Points) and m.glyph:
            for px, py in m.points:
                put(row(py), col(px), m.glyph, m.color, "point")

    label_w = 10
    text = Text()
    for r in range(height):
        if r in hline_rows:
            label = _terminal_label(y, hline_rows[r])
        elif r in (0, height - 1):
            label = _terminal_label(y, y.hi if r == 0 else y.lo)
        else:
            label = ""
        text.append(f"{label:>{label_w}} |")
        cells = grid[r]
        end = max((c + 1 for c in range(width) if cells[c][0] != " "), default=0)
        for glyph, color in cells[:end]:
            text.append(glyph, style=color)
        text.append("\n")
    text.append(" " * label_w + " +" + "-" * width + "\n")
    lo, hi = _terminal_label(x, x.lo), _terminal_label(x, x.hi)
    room = width - len(lo) - len(hi) - 4
    name = x.label if len(x.label) <= room else x.label[: max(0, room - 1)] + "…"
    gap = width - len(lo) - len(hi) - len(name)
    text.append(" " * (label_w + 2) + lo + " " * (gap // 2) + name + " " * (gap - gap // 2) + hi + "\n")
    entries = [(m.glyph, m.color, m.label) for m in chart.marks if m.glyph and m.label and _drawn(m)]
    _legend(text, entries, indent=label_w + 2, width=label_w + 2 + width)
    text.rstrip()
    return text


def _terminal_label(axis: Axis, value: float) -> str:
    if axis.kind == "bytes":
        return format_bytes(value)
    if axis.kind == "seconds":
        return f"{value:.2f} s"
    return str(int(round(value)))


def _drawn(m: Mark) -> bool:
    return not isinstance(m, (Line, Points)) or bool(m.points)


def _legend(text: Text, entries: list[tuple[str, str, str]], indent: int, width: int) -> None:
    line = 0
    text.append(" " * indent)
    line = indent
    first = True
    for glyph, color, label in entries:
        item = f"{glyph} {label}"
        if not first and line + 3 + len(item) > width:
            text.append("\n" + " " * indent)
            line = indent
            first = True
        if not first:
            text.append("   ")
            line += 3
        text.append(glyph, style=color)
        text.append(f" {label}")
        line += len(item)
        first = False
    text.append("\n")


def _column_values(m: Line, x: Axis, width: int) -> list[float | None]:
    """The line's value at each column's x (None outside the line). A step line holds each value until the next
    point and shows the highest point inside each column, so that a spike between two columns still shows."""
    pts = sorted(m.points)
    xs = [p[0] for p in pts]
    dx = (x.hi - x.lo) / (width - 1)
    out: list[float | None] = []
    for c in range(width):
        xc = x.lo + (x.hi - x.lo) * c / (width - 1)
        i = bisect.bisect_right(xs, xc) - 1  # the last point at or left of xc
        value: float | None = None
        if m.step:
            inside = [p[1] for p in pts[bisect.bisect_left(xs, xc - dx / 2) : bisect.bisect_left(xs, xc + dx / 2)]]
            held = [pts[i][1]] if i >= 0 else []
            value = max(held + inside) if held or inside else None
        elif 0 <= i < len(pts) - 1:
            (x0, y0), (x1, y1) = pts[i], pts[i + 1]
            value = y0 + (y1 - y0) * (xc - x0) / (x1 - x0)
        elif i == len(pts) - 1 and xs[i] == xc:
            value = pts[i][1]
        out.append(value)
    return out


def _terminal_bars(chart: BarChart, width: int, line_width: int | None = None) -> Text:
    label_w = max((len(b.label) for b in chart.bars), default=10) + 2
    if line_width is not None:  # label, bar, " ", 10 for the total, "  " and the note within line_width
        note_w = min(44, max((len(b.note) for b in chart.bars), default=0))
        width = max(10, min(width, line_width - 2 - label_w - 13 - note_w))
    fold = line_width if line_width is not None else 1 << 30
    text = Text("  ")
    line = 2
    for seg in chart.segments:
        item = len(seg.label) + 4
        if line + item > fold and line > 2:  # the legend folds between items, never inside one
            text.append("\n  ")
            line = 2
        text.append(seg.glyph, style=seg.color)
        text.append(f" {seg.label}  ")
        line += item
    text.append("\n")
    limit = chart.limit
    scale = max([b.total for b in chart.bars] + ([int(limit.y)] if limit is not None else []), default=0)
    at = None if limit is None or not scale else min(width - 1, max(0, round(limit.y / scale * width) - 1))
    room = 44 if line_width is None else min(44, line_width - (2 + label_w + width + 1 + 10 + 2))
    for b in chart.bars:
        text.append(("★ " if b.highlight else "  ") + b.label.ljust(label_w))
        cells: list[tuple[str, str | None]] = []
        for i, count in bar_cells(b, scale, width):
            seg = chart.segments[i]
            cells += [(seg.glyph, seg.color)] * count
        cells += [(" ", None)] * (width - len(cells))
        if at is not None and limit is not None and limit.glyph:
            cells[at] = (limit.glyph, limit.color)
        for glyph, color in cells:
            text.append(glyph, style=color)
        text.append(" ")
        note = ellipsize(b.note, room) if room >= 8 else ""
        text.append(f"{format_bytes(b.total):>10}" + (f"  {note}" if note else "") + "\n")
    if limit is not None and limit.glyph and limit.label:
        text.append(" " * (label_w + 2))
        text.append(limit.glyph, style=limit.color)
        text.append(f" {limit.label}\n")
    return text


def bar_cells(bar: Bar, scale: int, width: int) -> list[tuple[int, int]]:
    """(segment index, characters) of one stacked bar; cumulative rounding keeps the total exact."""
    out = []
    cum = pos = 0
    for i, value in enumerate(bar.values):
        if value <= 0:
            continue
        cum += value
        end = round(cum / scale * width) if scale else 0
        if end > pos:
            out.append((i, end - pos))
            pos = end
    return out
