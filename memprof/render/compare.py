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
    say,
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
    say(console, f"  peak = {result.peak_metric} (traced for {result.target})")
    if result.capacity is not None:
        say(
            console,
            f"  capacity {format_bytes(result.capacity.total_bytes)} ({result.capacity.source}), "
            f"recommended batch = {result.headroom:g} × largest",
        )
    else:
        say(console, f"  {result.capacity_note or 'no capacity: largest-batch columns left out'}")


#: what the category columns hold (compare's Grads is the gradients' full size, estimate's
#: breakdown the bytes alive at the peak: the two differ, and each table says which it shows)
COLUMNS_NOTE = (
    "Params, Grads, Optim., Activ.: full sizes, as held during the step (Activ.: saved for backward at the "
    "end of forward); Temp.: temporaries alive at the peak; Peak: the traced peak."
)
_CATEGORIES = ("Params", "Grads", "Optim.", "Activ.", "Temp.")


def _cells(result: CompareResult, fit: bool) -> list[tuple[CompareRow, list[str], list[str]]]:
    """Per row: (row, category cells, peak/vs-baseline/fit cells)."""
    out = []
    for r in result.rows:
        if r.error is not None:  # the reason is in the notes below the chart
            out.append((r, ["-"] * 5, ["-"] * (2 + (2 if fit else 0))))
            continue
        categories = [
            format_bytes(r.parameter_bytes),
            format_bytes(r.gradient_bytes),
            format_bytes(r.optimizer_state_bytes),
            format_bytes(r.activation_bytes),
            format_bytes(r.temporary_bytes),
        ]
        rest = [format_bytes(r.peak_bytes), _delta(r)]
        if fit:
            if r.fit is None:
                rest += ["n/a", "n/a"]
            elif r.fit.max_batch is None:
                rest += ["none", "-"]
            else:
                more = "+" if r.fit.limited_by_max else ""
                at_least = "" if r.fit.exact else "≥"
                rest += [at_least + format_count(r.fit.max_batch) + more, format_count(r.fit.recommended_batch)]
        out.append((r, categories, rest))
    return out


def _new_table(title: str | None = None) -> Table:
    table = Table(
        box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 0), title=title, title_justify="left"
    )
    table.add_column("", width=1, no_wrap=True)  # ★ best, ✗ failed
    table.add_column("Configuration", max_width=26)  # --combine labels fold at spaces
    return table


def compare_tables(result: CompareResult, width: int = 120) -> list[Table]:
    """The comparison as one table, or, when that is wider than ``width`` (an 80-column terminal),
    two: the peaks and batches first, then the categories."""
    fit = result.capacity is not None and any(r.fit is not None for r in result.rows)
    rows = _cells(result, fit)
    rest_names = ["Peak", "vs baseline"] + (["Max batch", f"Rec.@{result.headroom:g}"] if fit else [])
    label_w = min(26, max([len("Configuration")] + [len(r.label) for r in result.rows]))
    widths = [max([len(name)] + [len(cells[i]) for _, cells, _ in rows]) for i, name in enumerate(_CATEGORIES)] + [
        max([len(name)] + [len(rest[i]) for _, _, rest in rows]) for i, name in enumerate(rest_names)
    ]
    one = 1 + 1 + label_w + sum(w + 1 for w in widths)
    split = one > width
    tables = [_new_table()] if not split else [_new_table(), _new_table("Categories (full sizes; Temp. at the peak)")]
    order = rest_names if split else [*_CATEGORIES, "Peak", *rest_names[1:]]
    for name in order:
        tables[0].add_column(name, justify="right", no_wrap=True)
    if split:
        for name in _CATEGORIES:
            tables[1].add_column(name, justify="right", no_wrap=True)
    for r, categories, rest in rows:
        mark = "★" if r.best else "✗" if r.error is not None else ""
        style = "bold" if r.best else None
        if split:
            tables[0].add_row(mark, Text(r.label), *rest, style=style)
            tables[1].add_row(mark, Text(r.label), *categories, style=style)
        else:
            tables[0].add_row(mark, Text(r.label), *categories, rest[0], *rest[1:], style=style)
    return tables


def compute_table(result: CompareResult, width: int = 120) -> Table | None:
    """Memory and compute side by side: each row's peak change next to its FLOPs and (with a GPU) the
    step-time model, so checkpointing's memory saved and compute added read in one row. Narrower than
    the whole (an 80-column terminal): the compute columns alone, with short headers (the peaks are in
    the table above), the GPU named in the title's place by :func:`render_compare`."""
    rows = [r for r in result.rows if r.error is None and r.flops_per_sample is not None]
    if not rows:
        return None
    timed = any(r.step_time is not None for r in rows)
    cells: list[tuple[CompareRow, list[str]]] = []
    for r in rows:
        peak_delta = "-" if r.baseline else format_pct(r.delta_pct, 1, signed=True)
        compute = "-" if r.baseline else format_pct(r.compute_delta_pct, 0, signed=True)
        row = [
            format_bytes(r.peak_bytes),
            peak_delta,
            format_flops(r.step_flops, ""),
            format_flops(r.flops_per_sample, ""),
            compute,
        ]
        if timed:
            st = r.step_time
            row += [format_seconds(st.seconds), f"{st.samples_per_second:,.0f}"] if st is not None else ["n/a"] * 2
        cells.append((r, row))
    names = ["Peak", "vs baseline", "FLOP/step", "FLOP/sample", "vs baseline"]
    names += ["Step time ≥", "Samples/s ≤"] if timed else []
    labels = [len(("★ " if r.best else "") + r.label) for r in rows]
    label_w = min(26, max([len("Configuration"), *labels]))

    def needed(heads: list[str], first: int) -> int:
        cols = [max([len(h)] + [len(c[first + i]) for _, c in cells]) for i, h in enumerate(heads)]
        return label_w + sum(w + 2 for w in cols)

    narrow = needed(names, 0) > width
    if narrow:  # the peaks are in the table above: the compute columns alone, short headers
        names = ["FLOP/step", "/sample", "vs base"] + (["Step ≥", "Samples/s ≤"] if timed else [])
        cells = [(r, c[2:]) for r, c in cells]
        title = "Compute per configuration"
    else:
        title = "Memory and compute" + (f" (step time: roofline model on {result.gpu}, not measured)" if timed else "")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title=title, title_justify="left")
    table.add_column("Configuration", max_width=26)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for r, row in cells:
        table.add_row(Text(("★ " if r.best else "") + r.label), *row)
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
        table.add_column("Max batch\ntraced", justify="right")
        table.add_column("Max batch\nmeasured", justify="right")
    for r, m in rows:
        measured = "OOM" if m.oom else format_bytes(m.peak_bytes)
        cells = [format_bytes(m.predicted_bytes), measured, format_pct(m.error_pct, 1, signed=True)]
        if find:
            traced = r.fit.max_batch if r.fit is not None else None
            cells += [format_count(traced), format_count(m.max_batch)]
        table.add_row("  " + r.label, *cells)
    return table


def bars(result: CompareResult, width: int = 120) -> Text:
    """The stacked bars, each line within ``width`` columns: the bar shrinks (down to 10 characters)
    and the peak's place is shortened in the middle before anything wraps."""
    text = Text("Breakdown at the peak:\n")
    text.append_text(terminal(compare_chart(result), width=40, line_width=width))
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
    for table in compare_tables(result, console.width):
        console.print()
        console.print(table)
    say(console, COLUMNS_NOTE, hang=2)
    ct = compute_table(result, console.width)
    if ct is not None:
        console.print()
        console.print(ct)
        if ct.title == "Compute per configuration" and any(r.step_time is not None for r in result.rows):
            say(console, f"  step time ≥: roofline model on {result.gpu}, not measured", hang=4)
        for line in compute_lines(result):
            say(console, "  " + line)
    mt = measure_table(result)
    if mt is not None:
        console.print()
        console.print(mt)
    console.print()
    console.print(bars(result, console.width - 1))
    ranking = ranking_lines(result) if len(result.ranked_by_batch) > 1 else []
    if ranking:
        console.print(Text("Ranked by the largest batch that fits", style="bold"))
        for line in ranking:
            say(console, "  " + line)
        console.print()
    say(console, verdict_text(result), hang=0, style="bold")
    lines = detail_lines(result)
    if lines:
        console.print()
        width = max(40, console.width - 1)
        for line in lines:
            console.print(Text(textwrap.fill(line, width, initial_indent="  · ", subsequent_indent="    ")))


def write_plot(result: CompareResult, path: Path) -> Path:
    """The breakdown bars as a file: .svg, .png, .pdf or .html (see :func:`memprof.render.charts.write`)."""
    return write(compare_chart(result), path)
