"""Peak memory vs batch size for ``find-batch``: SVG (written by hand, always works), PNG (matplotlib), terminal.

Every rendering shows the same things: measured peaks (fits as dots, OOMs as crosses
above the capacity), the prediction's line, the capacity line, and the recommended
batch with the headroom it leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

from ..errors import UsageError

GiB = 1024**3


@dataclass(frozen=True)
class PlotData:
    fits: tuple[tuple[int, int], ...]  # (batch, bytes)
    ooms: tuple[int, ...]  # batches
    predicted: tuple[float, float] | None  # (intercept, slope) of the limited metric
    measured: tuple[float, float] | None  # affine fit of the measured peaks
    capacity: int
    largest: int | None
    recommended: int | None
    recommended_bytes: int | None
    metric: str
    x_max: int
    y_max: int
    title: str
    y_min: int = 0  # above 0 when fixed memory (parameters, optimizer state) dwarfs the batch's share


def plot_data(result) -> PlotData:
    metric = result.metric
    fits, ooms = [], []
    for t in result.trials:
        value = t.peak_reserved_bytes if metric == "reserved" else t.peak_allocated_bytes
        if t.fits and value is not None:
            fits.append((t.batch_size, int(value)))
        elif not t.fits:
            ooms.append(t.batch_size)
    p = result.prediction
    predicted = (float(p.intercept_bytes), float(p.slope_bytes_per_sample)) if p and p.metric == metric else None
    measured = None
    if result.slope_bytes_per_sample is not None and result.intercept_bytes is not None:
        measured = (float(result.intercept_bytes), float(result.slope_bytes_per_sample))
    batches = [b for b, _ in fits] + ooms + [result.recommended_batch or 0]
    x_max = max(max(batches or [1]), 1)
    x_max = int(x_max * 1.08) + 1
    cap = int(result.capacity.total_bytes)
    y_vals = [v for _, v in fits] + [cap]
    y_max = int(max(y_vals) * 1.12)
    lows = [v for _, v in fits] + [int(line[0]) for line in (predicted, measured) if line is not None]
    y_min = 0
    if lows and min(lows) > 0.4 * cap:  # zoom in on the part that grows with the batch
        y_min = int(min(min(lows), cap) * 0.9)
        y_max = int(cap + 0.12 * (cap - y_min))
    label = "live tensor bytes" if metric == "allocated" else "torch reserved"
    title = f"{result.workload.get('model')}: peak {label} vs batch size"
    return PlotData(
        tuple(fits),
        tuple(ooms),
        predicted,
        measured,
        cap,
        result.largest_batch,
        result.recommended_batch,
        result.recommended_expected_bytes,
        metric,
        x_max,
        y_max,
        title,
        y_min,
    )


def check_plot_path(path: Path, suffixes: tuple[str, ...] = (".svg", ".png")) -> None:
    """Fail before any work when the plot cannot be written: unknown suffix, PNG without matplotlib.

    ``.svg`` (and ``.html`` where a command offers it) are written by hand and always work.
    """
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        names = " or ".join(suffixes)
        raise UsageError(
            f"cannot write a plot to {path.name!r}: unknown format {suffix or '(none)'}",
            f"name the file {names} (.png needs matplotlib)",
        )
    if suffix == ".png":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(
                "--plot *.png needs matplotlib, which is not installed",
                "pip install matplotlib (or the memprof[plot] extra), or write --plot file.svg instead",
            ) from None


def write_plot(result, path: Path) -> Path:
    data = plot_data(result)
    if path.suffix.lower() == ".png":
        _write_png(data, path)
    else:
        path.write_text(svg(data), encoding="utf-8")
    return path


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 1024**2:.1f} MiB"


# --------------------------------------------------------------------------- SVG by hand
def _nice_step(span: float, target: int = 5) -> float:
    """A 1/2/5 x 10^k step that cuts ``span`` into about ``target`` pieces."""
    import math

    raw = span / max(1, target)
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _ticks(low: float, high: float, target: int = 5) -> list[float]:
    import math

    step = _nice_step(high - low, target)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _unit(data: PlotData) -> tuple[float, str]:
    return (GiB, "GiB") if data.y_max >= GiB else (1024**2, "MiB")


def svg(data: PlotData, width: int = 720, height: int = 440) -> str:
    left, right, top, bottom = 80, 30, 40, 50
    pw, ph = width - left - right, height - top - bottom
    scale, unit = _unit(data)

    def x(b: float) -> float:
        return left + pw * b / data.x_max

    def y(v: float) -> float:
        return top + ph * (1 - (v - data.y_min) / (data.y_max - data.y_min))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<defs><clipPath id="plot"><rect x="{left}" y="{top}" width="{pw}" height="{ph}"/></clipPath></defs>',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{escape(data.title)}</text>',
    ]
    # axes, ticks, grid
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>')
    for v in _ticks(data.y_min / scale, data.y_max / scale):
        yy = y(v * scale)
        out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" stroke="#eeeeee"/>')
        out.append(f'<line x1="{left - 4}" y1="{yy:.1f}" x2="{left}" y2="{yy:.1f}" stroke="black"/>')
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(
        f'<text x="16" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {top + ph / 2})">{unit}</text>'
    )
    for b in _ticks(0, data.x_max):
        if b != int(b):
            continue
        out.append(f'<line x1="{x(b):.1f}" y1="{top + ph}" x2="{x(b):.1f}" y2="{top + ph + 4}" stroke="black"/>')
        out.append(f'<text x="{x(b):.1f}" y="{top + ph + 18}" text-anchor="middle">{int(b)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">batch size</text>')
    out.append('<g clip-path="url(#plot)">')
    # capacity
    cy = y(data.capacity)
    out.append(f'<line x1="{left}" y1="{cy:.1f}" x2="{left + pw}" y2="{cy:.1f}" stroke="#c0392b" stroke-width="2"/>')
    # lines
    for line, colour, dash in ((data.predicted, "#2980b9", "6,4"), (data.measured, "#27ae60", "")):
        if line is None:
            continue
        a, s = line
        x1 = max(0.0, (data.y_min - a) / s) if s > 0 and a < data.y_min else 0
        out.append(
            f'<line x1="{x(x1):.1f}" y1="{y(a + s * x1):.1f}" x2="{x(data.x_max):.1f}" '
            f'y2="{y(a + s * data.x_max):.1f}" stroke="{colour}" stroke-width="1.5"'
            + (f' stroke-dasharray="{dash}"' if dash else "")
            + "/>"
        )
    # recommended batch and the headroom it leaves
    if data.recommended is not None:
        rx = x(data.recommended)
        out.append(
            f'<line x1="{rx:.1f}" y1="{top}" x2="{rx:.1f}" y2="{top + ph}" stroke="#8e44ad" stroke-dasharray="3,3"/>'
        )
        if data.recommended_bytes is not None:
            out.append(
                f'<line x1="{rx:.1f}" y1="{y(data.recommended_bytes):.1f}" x2="{rx:.1f}" y2="{cy:.1f}" '
                f'stroke="#8e44ad" stroke-width="5" opacity="0.5"/>'
            )
    # points
    for b, v in data.fits:
        out.append(
            f'<circle cx="{x(b):.1f}" cy="{y(v):.1f}" r="4" fill="#27ae60"><title>batch {b}: {_gib(v)}</title></circle>'
        )
    oom_y = y(min(data.y_max - 0.03 * (data.y_max - data.y_min), data.capacity + 0.05 * (data.y_max - data.y_min)))
    for b in data.ooms:
        cx = x(b)
        out.append(
            f'<path d="M{cx - 4:.1f},{oom_y - 4:.1f} L{cx + 4:.1f},{oom_y + 4:.1f} M{cx - 4:.1f},'
            f'{oom_y + 4:.1f} L{cx + 4:.1f},{oom_y - 4:.1f}" stroke="#c0392b" stroke-width="2">'
            f"<title>batch {b}: out of memory</title></path>"
        )
    out.append("</g>")
    # labels, legend (bottom right: the lines rise to the top right)
    out.append(f'<text x="{left + 6}" y="{cy - 6:.1f}" fill="#c0392b">capacity {_gib(data.capacity)}</text>')
    legend = [
        ("#27ae60", "measured (fits), and its fit"),
        ("#c0392b", "out of memory, capacity"),
        ("#2980b9", "predicted (traced)"),
    ]
    if data.recommended is not None:
        text = f"recommended batch {data.recommended}"
        if data.recommended_bytes is not None:
            text += f", headroom {_gib(data.capacity - data.recommended_bytes)}"
        legend.append(("#8e44ad", text))
    box = int(max(len(text) for _, text in legend) * 7.0) + 26  # about 7 px a character at 12 px
    lx, ly = left + pw - box, top + ph - 16 * len(legend) - 4
    out.append(
        f'<rect x="{lx - 6}" y="{ly - 14}" width="{box}" height="{16 * len(legend) + 6}" fill="white" '
        f'stroke="#cccccc"/>'
    )
    for i, (colour, text) in enumerate(legend):
        out.append(f'<rect x="{lx}" y="{ly + 16 * i - 9}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly + 16 * i}">{escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- PNG via matplotlib
def _write_png(data: PlotData, path: Path) -> None:  # pragma: no cover - needs matplotlib
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    U, unit = (GiB, "GiB") if data.capacity >= GiB else (1024**2, "MiB")  # noqa: N806
    xs = [0, data.x_max]
    if data.predicted:
        a, s = data.predicted
        ax.plot(xs, [(a + s * v) / U for v in xs], "--", color="#2980b9", label="predicted")
    if data.measured:
        a, s = data.measured
        ax.plot(xs, [(a + s * v) / U for v in xs], "-", color="#27ae60", lw=1, label="measured fit")
    if data.fits:
        ax.plot([b for b, _ in data.fits], [v / U for _, v in data.fits], "o", color="#27ae60", label="measured (fits)")
    if data.ooms:
        ax.plot(
            list(data.ooms),
            [min(data.y_max * 0.97, data.capacity * 1.05) / U] * len(data.ooms),
            "x",
            color="#c0392b",
            ms=9,
            mew=2,
            label="out of memory",
        )
    ax.axhline(data.capacity / U, color="#c0392b", lw=2, label=f"capacity {_gib(data.capacity)}")
    if data.recommended is not None:
        ax.axvline(data.recommended, color="#8e44ad", ls=":", label=f"recommended {data.recommended}")
        if data.recommended_bytes is not None:
            ax.vlines(
                data.recommended,
                data.recommended_bytes / U,
                data.capacity / U,
                color="#8e44ad",
                lw=4,
                alpha=0.5,
                label=f"headroom {_gib(data.capacity - data.recommended_bytes)}",
            )
    ax.set_xlim(0, data.x_max)
    ax.set_ylim(data.y_min / U, data.y_max / U)
    ax.set_xlabel("batch size")
    ax.set_ylabel(unit)
    ax.set_title(data.title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- terminal
def terminal_chart(result, width: int = 56, height: int = 12) -> str:
    """An ASCII chart: ``o`` fits, ``x`` OOM, ``.`` prediction, ``=`` capacity, ``|`` recommended batch."""
    from . import format_bytes

    data = plot_data(result)
    grid = [[" "] * width for _ in range(height)]

    def col(b: float) -> int:
        return max(0, min(width - 1, int(round((width - 1) * b / data.x_max))))

    def row(v: float) -> int:
        frac = (v - data.y_min) / (data.y_max - data.y_min)
        return max(0, min(height - 1, int(round((height - 1) * (1 - frac)))))

    if data.predicted:
        a, s = data.predicted
        for c in range(width):
            v = a + s * data.x_max * c / (width - 1)
            if data.y_min <= v <= data.y_max:
                grid[row(v)][c] = "."
    cap_row = row(data.capacity)
    for c in range(width):
        grid[cap_row][c] = "="
    if data.recommended is not None:
        rc = col(data.recommended)
        for r in range(cap_row + 1, height):
            if grid[r][rc] in " .":
                grid[r][rc] = "|"
    for b, v in data.fits:
        grid[row(v)][col(b)] = "o"
    for b in data.ooms:
        grid[max(0, cap_row - 1)][col(b)] = "x"
    label_w = 10
    lines = []
    for r in range(height):
        v = data.y_max - (data.y_max - data.y_min) * r / (height - 1)
        label = format_bytes(data.capacity) if r == cap_row else format_bytes(v) if r in (0, height - 1) else ""
        lines.append(f"{label:>{label_w}} |" + "".join(grid[r]).rstrip())
    lines.append(" " * label_w + " +" + "-" * width)
    left, right = "0", str(data.x_max)
    lines.append(" " * (label_w + 2) + left + " " * (width - len(left) - len(right)) + right + "  batch")
    legend = "o fits   x out of memory   = capacity"
    if data.predicted:
        legend += "   . predicted"
    lines.append(" " * (label_w + 2) + legend)
    if data.recommended is not None:
        lines.append(" " * (label_w + 2) + f"| recommended batch {data.recommended}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- batch x sequence-length grid
def grid_svg(grid, title: str, width: int = 640, cell_h: int = 34) -> str:
    """Which batch x sequence-length cells fit (``memprof estimate --grid``): fitting cells filled, the
    boundary (the largest batch at each sequence length) drawn as a line between the cells."""
    batches, seqs = list(grid.batches), list(grid.seq_lens)
    left, top, right = 90, 56, 20
    cell_w = max(36, (width - left - right) // max(1, len(batches)))
    width = left + right + cell_w * len(batches)
    height = top + cell_h * len(seqs) + 64
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.0f}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<text x="{width / 2:.0f}" y="40" text-anchor="middle" fill="#555">fits {_gib(grid.capacity_bytes)} '
        f"({escape(grid.metric)}): filled = fits</text>",
    ]
    # rows from the shortest sequence (top) to the longest (bottom)
    for row, seq in enumerate(seqs):
        y = top + row * cell_h
        largest = grid.max_batch[row]
        parts.append(f'<text x="{left - 8}" y="{y + cell_h / 2 + 4:.0f}" text-anchor="end">{seq:,}</text>')
        for col, batch in enumerate(batches):
            x = left + col * cell_w
            ok = largest is not None and batch <= largest
            fill = "#4caf50" if ok else "#eeeeee"
            parts.append(
                f'<rect x="{x + 1}" y="{y + 1}" width="{cell_w - 2}" height="{cell_h - 2}" fill="{fill}">'
                f"<title>batch {batch}, {seq:,} tokens: {'fits' if ok else 'does not fit'}</title></rect>"
            )
    # the boundary: a step line at the right edge of the last fitting cell of each row
    points = []
    for row, largest in enumerate(grid.max_batch):
        n = sum(1 for b in batches if largest is not None and b <= largest)
        x = left + n * cell_w
        points += [(x, top + row * cell_h), (x, top + (row + 1) * cell_h)]
    if points:
        path = " ".join(f"{x},{y}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#c62828" stroke-width="3"/>')
    base = top + cell_h * len(seqs)
    for col, batch in enumerate(batches):
        mid = left + col * cell_w + cell_w / 2
        parts.append(f'<text x="{mid:.0f}" y="{base + 18}" text-anchor="middle">{batch}</text>')
    parts.append(
        f'<text x="{left + cell_w * len(batches) / 2:.0f}" y="{base + 40}" text-anchor="middle">batch size</text>'
    )
    parts.append(
        f'<text x="16" y="{top + cell_h * len(seqs) / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {top + cell_h * len(seqs) / 2:.0f})">sequence length (tokens)</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_grid_chart(result, path: Path) -> Path:
    """``memprof estimate --grid --plot``: the grid as SVG (by hand) or PNG (matplotlib)."""
    grid = result.grid
    model = result.workload.get("model")
    what = "prompt length" if result.workload.get("mode") == "generate" else "sequence length"
    title = f"{model}: batch size x {what} that fit"
    if path.suffix.lower() == ".png":
        _write_grid_png(grid, title, path)
    else:
        path.write_text(grid_svg(grid, title), encoding="utf-8")
    return path


def _write_grid_png(grid, title: str, path: Path) -> None:  # pragma: no cover - needs matplotlib
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches, seqs = list(grid.batches), list(grid.seq_lens)
    cells = [[1.0 if largest is not None and b <= largest else 0.0 for b in batches] for largest in grid.max_batch]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(batches), 1.2 + 0.45 * len(seqs)))
    ax.imshow(cells, cmap="Greens", vmin=-0.3, vmax=1.2, aspect="auto")
    xs, ys = [], []
    for row, largest in enumerate(grid.max_batch):
        n = sum(1 for b in batches if largest is not None and b <= largest)
        xs += [n - 0.5, n - 0.5]
        ys += [row - 0.5, row + 0.5]
    ax.plot(xs, ys, color="#c62828", linewidth=2.5)
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_yticks(range(len(seqs)), [f"{s:,}" for s in seqs])
    ax.set_xlabel("batch size")
    ax.set_ylabel("sequence length (tokens)")
    ax.set_title(f"{title}\nfits {_gib(grid.capacity_bytes)} ({grid.metric})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid_text(grid) -> list[str]:
    """The grid for a terminal: one row per sequence length, ``█`` fits, ``·`` does not, ``│`` the boundary."""
    batches = list(grid.batches)
    width = max(len(str(b)) for b in batches) + 1
    head = " " * 10 + "".join(f"{b:>{width}}" for b in batches) + "   largest batch"
    lines = [head]
    for seq, largest in zip(grid.seq_lens, grid.max_batch, strict=True):
        cells = ""
        for b in batches:
            ok = largest is not None and b <= largest
            cells += ("█" if ok else "·").rjust(width)
        n = sum(1 for b in batches if largest is not None and b <= largest)
        if 0 < n < len(batches):
            cut = n * width
            cells = cells[:cut] + "│" + cells[cut + 1 :]
        label = "none" if largest is None else (f"{largest}+" if largest >= batches[-1] else str(largest))
        lines.append(f"{seq:>9,} " + cells + f"   {label}")
    return lines


# --------------------------------------------------------------------------- per-rank memory vs world size
#: the parts of a rank's peak the world-size charts stack: (label, terminal glyph, SVG colour)
SCALING_PARTS = (
    ("model states", "█", "#4e79a7"),  # parameters + gradients + optimizer state, as held by the rank
    ("activations", "░", "#59a14f"),
    ("gathered + buffers", "▒", "#f28e2b"),  # gathered parameters, communication buffers
    ("other", "·", "#bab0ac"),  # temporaries, inputs, buffers, workspaces
)


def scaling_parts(row) -> tuple[int, int, int, int]:
    """(model states, activations, gathered + communication, the rest) of one row's peak, summing to it."""
    peak = int(row.peak_bytes or 0)
    states = min(peak, int(row.model_state_bytes or 0))
    acts = min(peak - states, int(row.activation_bytes or 0))
    comm = min(peak - states - acts, int((row.gathered_bytes or 0) + (row.communication_bytes or 0)))
    return states, acts, comm, peak - states - acts - comm


def scaling_terminal_chart(result, width: int = 40) -> str:
    """One bar per world size: the rank's peak, split as :data:`SCALING_PARTS`; ``|`` marks the capacity."""
    from . import format_bytes

    rows = [r for r in result.rows if r.peak_bytes]
    if not rows:
        return ""
    cap = result.capacity.total_bytes if result.capacity is not None else None
    top = max([r.peak_bytes for r in rows] + ([cap] if cap else []))
    label_w = max(len(f"{r.world_size}") for r in rows) + 6
    lines = []
    for r in rows:
        cells: list[str] = []
        for (_, glyph, _), part in zip(SCALING_PARTS, scaling_parts(r), strict=True):
            cells += [glyph] * int(round(width * part / top))
        cells = (cells + [" "] * width)[:width]
        if cap:
            c = min(width - 1, int(round(width * cap / top)) - 1)
            cells[c] = "|"
        batch = f"  batch/rank {r.max_batch}" if r.max_batch is not None else ""
        label = f"{r.world_size} rank" + ("s" if r.world_size > 1 else " ")
        lines.append(f"{label:>{label_w}} {''.join(cells)} {format_bytes(r.peak_bytes):>10}{batch}")
    legend = "  ".join(f"{glyph} {label}" for label, glyph, _ in SCALING_PARTS)
    lines.append(" " * (label_w + 1) + legend)
    if cap:
        lines.append(" " * (label_w + 1) + f"| capacity {format_bytes(cap)}")
    return "\n".join(lines)


def scaling_svg(result, width: int = 720, height: int = 440) -> str:
    """Stacked bars of one rank's peak per world size (:data:`SCALING_PARTS`), the capacity line, and the
    largest batch per rank above each bar."""
    rows = [r for r in result.rows if r.peak_bytes]
    left, right, top, bottom = 80, 30, 48, 56
    pw, ph = width - left - right, height - top - bottom
    cap = result.capacity.total_bytes if result.capacity is not None else None
    y_max = max([r.peak_bytes for r in rows] + ([cap] if cap else []) + [1]) * 1.12
    scale, unit = (GiB, "GiB") if y_max >= GiB else (1024**2, "MiB")

    def y(v: float) -> float:
        return top + ph * (1 - v / y_max)

    strategy = escape(str(result.strategy))
    title = f"{escape(str(result.workload.get('model')))}: one rank's peak vs world size ({strategy})"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>',
    ]
    for v in _ticks(0, y_max / scale):
        yy = y(v * scale)
        out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" stroke="#eeeeee"/>')
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(
        f'<text x="16" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 16 {top + ph / 2})">{unit}</text>'
    )
    slot = pw / max(1, len(rows))
    bar = min(60.0, slot * 0.6)
    for i, r in enumerate(rows):
        cx = left + slot * (i + 0.5)
        base = 0.0
        for (label, _, colour), part in zip(SCALING_PARTS, scaling_parts(r), strict=True):
            if part <= 0:
                continue
            y0, y1 = y(base + part), y(base)
            out.append(
                f'<rect x="{cx - bar / 2:.1f}" y="{y0:.1f}" width="{bar:.1f}" height="{y1 - y0:.1f}" '
                f'fill="{colour}"><title>{label}: {_gib(part)}</title></rect>'
            )
            base += part
        out.append(f'<text x="{cx:.1f}" y="{top + ph + 18}" text-anchor="middle">{r.world_size}</text>')
        note = _gib(r.peak_bytes) + (f" · b={r.max_batch}" if r.max_batch is not None else "")
        out.append(f'<text x="{cx:.1f}" y="{y(r.peak_bytes) - 6:.1f}" text-anchor="middle">{escape(note)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 28}" text-anchor="middle">ranks (world size)</text>')
    if cap:
        cy = y(cap)
        out.append(
            f'<line x1="{left}" y1="{cy:.1f}" x2="{left + pw}" y2="{cy:.1f}" stroke="#c0392b" stroke-width="2"/>'
        )
        out.append(f'<text x="{left + pw - 4}" y="{cy - 6:.1f}" text-anchor="end" fill="#c0392b">capacity</text>')
    for i, (label, _, colour) in enumerate(SCALING_PARTS):
        lx = left + i * 150
        out.append(f'<rect x="{lx}" y="{height - 14}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{height - 5}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_scaling_plot(result, path: Path) -> Path:
    path.write_text(scaling_svg(result), encoding="utf-8")
    return path
