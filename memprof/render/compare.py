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
from . import (
    certainty,
    format_bytes,
    format_count,
    format_flops,
    format_pct,
    format_seconds,
    format_signed_bytes,
)
from .charts import compare_chart, terminal, write


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
        return " ".join(
            ["No configuration lowers the peak below the baseline at the same batch size."]
            + _lever_sentences(result, base)
        )
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
    parts.extend(_lever_sentences(result, base))
    safe = _row(result, result.safe_best_label)
    if best.workload.get("dtype") in ("fp16", "bf16"):
        if safe is not None:
            parts.append(
                f"Pure {best.workload.get('dtype')} drops the fp32 master weights; with them: {summary(safe)}."
            )
        else:
            parts.append(f"Pure {best.workload.get('dtype')} drops the fp32 master weights (numerically risky).")
    return " ".join(parts)


def _lever_sentences(result: CompareResult, base: CompareRow) -> list[str]:
    """Which row allows the largest batch, and which single lever buys the most batch."""
    out = []
    top = _row(result, result.ranked_by_batch[0]) if result.ranked_by_batch else None
    if top is not None and top.fit is not None and not top.baseline:
        out.append(f"Largest batch: {top.label} ({format_count(top.fit.max_batch)}).")
    lever = _row(result, result.best_lever_label)
    if lever is not None and lever.fit is not None and base.fit is not None:
        out.append(
            f"Of the single levers, {lever.label} buys the most: largest batch {format_count(lever.fit.max_batch)} "
            f"vs {format_count(base.fit.max_batch or 0)}."
        )
    return out


def ranking_lines(result: CompareResult, limit: int = 10) -> list[str]:
    """The rows that fit, ranked by the largest batch each allows."""
    lines = []
    for i, label in enumerate(result.ranked_by_batch[:limit], 1):
        r = _row(result, label)
        if r is None or r.fit is None:
            continue
        extra = []
        if r.trainable_params is not None:
            extra.append(f"{format_count(r.trainable_params)} trainable params")
        if r.host_peak_bytes:
            extra.append(f"{format_bytes(r.host_peak_bytes)} CPU memory")
        if r.paged_bytes:
            extra.append(f"{format_bytes(r.paged_bytes)} paged")
        tail = f" ({', '.join(extra)})" if extra else ""
        lines.append(
            f"{i:>2}. batch {format_count(r.fit.max_batch)}: {r.label}, peak {format_bytes(r.peak_bytes)}{tail}"
        )
    hidden = len(result.ranked_by_batch) - limit
    if hidden > 0:
        lines.append(f"    ... {hidden} more (--json lists them all)")
    return lines


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


def compute_table(result: CompareResult) -> Table | None:
    """Memory and compute side by side: each row's peak change next to its FLOPs and (with a GPU) the
    step-time model, so checkpointing's memory saved and compute added read in one row."""
    rows = [r for r in result.rows if r.error is None and r.flops_per_sample is not None]
    if not rows:
        return None
    timed = any(r.step_time is not None for r in rows)
    title = "Memory and compute" + (f" (step time: roofline model on {result.gpu}, not measured)" if timed else "")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title=title, title_justify="left")
    table.add_column("Configuration", max_width=26)
    table.add_column("Peak", justify="right", no_wrap=True)
    table.add_column("vs baseline", justify="right", no_wrap=True)
    table.add_column("FLOP/step", justify="right", no_wrap=True)
    table.add_column("FLOP/sample", justify="right", no_wrap=True)
    table.add_column("vs baseline", justify="right", no_wrap=True)
    if timed:
        table.add_column("Step time ≥", justify="right", no_wrap=True)
        table.add_column("Samples/s ≤", justify="right", no_wrap=True)
    for r in rows:
        peak_delta = "-" if r.baseline else format_pct(r.delta_pct, 1, signed=True)
        compute = "-" if r.baseline else format_pct(r.compute_delta_pct, 0, signed=True)
        cells = [
            format_bytes(r.peak_bytes),
            peak_delta,
            format_flops(r.step_flops, ""),
            format_flops(r.flops_per_sample, ""),
            compute,
        ]
        if timed:
            st = r.step_time
            cells += [format_seconds(st.seconds), f"{st.samples_per_second:,.0f}"] if st is not None else ["n/a"] * 2
        table.add_row(Text(("★ " if r.best else "") + r.label), *cells)
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
                    line += f" (+{rc.extra_pct:.0f} % over the step without it)"
            if rc.batchnorm_recomputed:
                line += "; BatchNorm running statistics update twice per step (in forward and in the recomputation)"
            lines.append(line)
        if r.error is None and (r.method != "trace" or any(m.bytes for m in r.modelled)):
            lines.append(f"{r.label}: {certainty(r.method, r.modelled)}")
        for note in r.notes:
            if note not in lines:
                lines.append(note)
        m = r.measured
        if m is not None and m.note:
            lines.append(f"{r.label}: {m.note}")
    lines.extend(result.notes)
    return lines


def compute_lines(result: CompareResult) -> list[str]:
    """What the compute table's columns mean."""
    if not any(r.flops_per_sample is not None for r in result.rows):
        return []
    lines = [
        "FLOPs: traced, one step (forward, backward with any recomputation, optimizer), PyTorch's formulas "
        "for matmuls, convolutions and attention"
    ]
    if any(r.step_time is not None for r in result.rows):
        lines.append(
            "step time: each op at the GPU's peak FLOP/s or memory bandwidth, whichever is slower, summed - a "
            "lower bound, so samples/s is an upper bound; real steps are slower"
        )
    elif result.step_time_note:
        lines.append(result.step_time_note)
    return lines


def render_compare(result: CompareResult, console: Console) -> None:
    _header(result, console)
    console.print()
    console.print(compare_table(result))
    ct = compute_table(result)
    if ct is not None:
        console.print()
        console.print(ct)
        for line in compute_lines(result):
            console.print(
                Text(textwrap.fill(line, max(40, console.width - 1), initial_indent="  ", subsequent_indent="    "))
            )
    mt = measure_table(result)
    if mt is not None:
        console.print()
        console.print(mt)
    console.print()
    console.print(bars(result))
    ranking = ranking_lines(result) if len(result.ranked_by_batch) > 1 else []
    if ranking:
        console.print(Text("Ranked by the largest batch that fits", style="bold"))
        for line in ranking:
            console.print(Text("  " + line))
        console.print()
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
