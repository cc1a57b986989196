"""Rendering of ``memprof compare`` (see :class:`memprof.results.CompareResult`): table, stacked bars,
verdict, notes. The bars (terminal and ``--plot`` file) are drawn by :mod:`memprof.render.charts`."""

from __future__ import annotations

import textwrap
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..results import CompareResult, CompareRow
from . import format_bytes, format_count, format_pct, format_signed_bytes
from .charts import compare_chart, terminal, write


def format_flops(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} FLOP"


def _delta(row: CompareRow) -> str:
    if row.baseline:
        return "-"
    if row.delta_bytes is None:
        return "n/a"
    return f"{format_signed_bytes(row.delta_bytes)} {format_pct(row.delta_pct, 1, signed=True)}"


# --------------------------------------------------------------------------- verdict
def _row(result: CompareResult, label: str | None) -> CompareRow | None:
    return next((r for r in result.rows if r.label == label), None) if label else None


def verdict_text(result: CompareResult) -> str:
    """One or two sentences: which configuration gives the lowest peak, and at what price."""
    base = next((r for r in result.rows if r.baseline), None)
    others = [r for r in result.rows if not r.baseline]
    if base is None or not others:
        return "Only the baseline was traced: add --dtype, --optimizer, --checkpointing, ... to compare."
    best = _row(result, result.best_label)
    if best is None:
        return "No configuration lowers the peak below the baseline at the same batch size."
    assert best.peak_bytes is not None and base.peak_bytes is not None  # both were traced
    lead = "Lowest peak" if best.peak_bytes < base.peak_bytes else "Same peak, larger batch"

    def batch(fit) -> str:
        return ("" if fit.exact else "≥") + format_count(fit.max_batch)

    def summary(r: CompareRow) -> str:
        text = f"{r.label} ({format_bytes(r.peak_bytes)}, {format_pct(r.delta_pct, 0, signed=True)}"
        if r.recompute is not None and r.recompute.extra_pct is not None:
            text += f", about {r.recompute.extra_pct:.0f} % more compute"
        text += ")"
        if r.fit is not None and r.fit.max_batch is not None and base.fit is not None and base.fit.max_batch:
            text += f", largest batch {batch(r.fit)} vs {batch(base.fit)}"
        return text

    parts = [f"{lead}: {summary(best)}."]
    safe = _row(result, result.safe_best_label)
    if best.workload.get("dtype") in ("fp16", "bf16"):
        if safe is not None:
            parts.append(
                f"Pure {best.workload.get('dtype')} drops the fp32 master weights; with them: {summary(safe)}."
            )
        else:
            parts.append(f"Pure {best.workload.get('dtype')} drops the fp32 master weights (numerically risky).")
    return " ".join(parts)


# --------------------------------------------------------------------------- terminal
def _header(result: CompareResult, console: Console) -> None:
    w = result.base_workload
    opt = w.get("optimizer") if w.get("mode") == "train" else "no optimizer"
    console.print(
        f"[bold]memprof compare[/bold] · {result.model} · batch {w.get('batch_size')} · "
        f"input {w.get('input')} · {opt} · {w.get('mode')}"
    )
    console.print(f"  peak = {result.peak_metric} (traced for {result.target})")
    if result.capacity is not None:
        console.print(
            f"  capacity {format_bytes(result.capacity.total_bytes)} ({result.capacity.source}), "
            f"recommended batch = {result.headroom:g} × largest"
        )
    else:
        console.print(f"  {result.capacity_note or 'no capacity: largest-batch columns left out'}")


def compare_table(result: CompareResult) -> Table:
    fit = result.capacity is not None and any(r.fit is not None for r in result.rows)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 0))
    table.add_column("", width=1, no_wrap=True)  # ★ best, ✗ failed
    table.add_column("Configuration", max_width=26)  # --combine labels wrap
    for name in ("Params", "Grads", "Optim.", "Activ.", "Temp.", "Peak"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("vs baseline", justify="right", no_wrap=True)
    if fit:
        table.add_column("Max batch", justify="right", no_wrap=True)
        table.add_column(f"Rec.@{result.headroom:g}", justify="right", no_wrap=True)
    for r in result.rows:
        mark = "★" if r.best else "✗" if r.error is not None else ""
        if r.error is not None:  # the reason is in the notes below the chart
            table.add_row(mark, Text(r.label), *(["-"] * (7 + (2 if fit else 0))))
            continue
        cells = [
            format_bytes(r.parameter_bytes),
            format_bytes(r.gradient_bytes),
            format_bytes(r.optimizer_state_bytes),
            format_bytes(r.activation_bytes),
            format_bytes(r.temporary_bytes),
            format_bytes(r.peak_bytes),
            _delta(r),
        ]
        if fit:
            if r.fit is None:
                cells += ["n/a", "n/a"]
            elif r.fit.max_batch is None:
                cells += ["none", "-"]
            else:
                more = "+" if r.fit.limited_by_max else ""
                at_least = "" if r.fit.exact else "≥"
                cells += [at_least + format_count(r.fit.max_batch) + more, format_count(r.fit.recommended_batch)]
        table.add_row(mark, Text(r.label), *cells, style="bold" if r.best else None)
    return table


def measure_table(result: CompareResult) -> Table | None:
    rows = [(r, r.measured) for r in result.rows if r.measured is not None]
    if not rows:
        return None
    find = any(m.max_batch is not None for _, m in rows)
    table = Table(
        box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title="Predicted vs measured", title_justify="left"
    )
    table.add_column("Configuration", no_wrap=True)
    table.add_column("Predicted", justify="right")
    table.add_column("Measured", justify="right")
    table.add_column("Error", justify="right")
    if find:
        table.add_column("Max batch (traced)", justify="right")
        table.add_column("Max batch (measured)", justify="right")
    for r, m in rows:
        measured = "OOM" if m.oom else format_bytes(m.peak_bytes)
        cells = [format_bytes(m.predicted_bytes), measured, format_pct(m.error_pct, 1, signed=True)]
        if find:
            traced = r.fit.max_batch if r.fit is not None else None
            cells += [format_count(traced), format_count(m.max_batch)]
        table.add_row("  " + r.label, *cells)
    return table


def bars(result: CompareResult) -> Text:
    text = Text("Breakdown at the peak:\n")
    text.append_text(terminal(compare_chart(result), width=40))
    return text


def detail_lines(result: CompareResult) -> list[str]:
    lines = []
    for r in result.rows:
        if r.error is not None:
            lines.append(f"{r.label}: could not be traced: {r.error}")
        if r.recompute is not None:
            rc = r.recompute
            line = f"{r.label}: recomputes {rc.plan} in backward"
            if rc.recompute_flops is not None:
                line += f": +{format_flops(rc.recompute_flops)} per step"
                if rc.extra_pct is not None:
                    line += f" (+{rc.extra_pct:.0f} % of the step's compute)"
            if rc.batchnorm_recomputed:
                line += "; BatchNorm running statistics update twice per step (in forward and in the recomputation)"
            lines.append(line)
        for note in r.notes:
            if note not in lines:
                lines.append(note)
        m = r.measured
        if m is not None and m.note:
            lines.append(f"{r.label}: {m.note}")
    lines.extend(result.notes)
    return lines


def render_compare(result: CompareResult, console: Console) -> None:
    _header(result, console)
    console.print()
    console.print(compare_table(result))
    mt = measure_table(result)
    if mt is not None:
        console.print()
        console.print(mt)
    console.print()
    console.print(bars(result))
    console.print(Text(verdict_text(result), style="bold"))
    lines = detail_lines(result)
    if lines:
        console.print()
        width = max(40, console.width - 1)
        for line in lines:
            console.print(Text(textwrap.fill(line, width, initial_indent="  · ", subsequent_indent="    ")))


def write_plot(result: CompareResult, path: Path) -> Path:
    """The breakdown bars as a file: .svg, .png, .pdf or .html (see :func:`memprof.render.charts.write`)."""
    return write(compare_chart(result), path)
