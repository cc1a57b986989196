"""Rendering of ``memprof estimate --strategy S --world-size 1,2,8,...`` (:class:`memprof.results.ScalingResult`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from . import format_bytes
from .charts import scaling_chart, terminal, write

_STRATEGY = {
    "ddp": "DDP",
    "zero1": "ZeRO-1 (DDP + sharded optimizer state)",
    "zero2": "ZeRO-2 (FSDP2, reshard_after_forward=False)",
    "zero3": "ZeRO-3 (FSDP2 fully_shard)",
    "fsdp": "FSDP2 fully_shard (ZeRO-3)",
}


def render_scaling(result, console: Console, chart: bool = True) -> None:
    """The workload, one row per world size (one rank's memory, the largest batch per rank), a chart, notes."""
    w = result.workload
    console.print(
        f"[bold]memprof estimate[/bold] · {w.get('model')} · {_STRATEGY.get(result.strategy, result.strategy)}"
    )
    console.print(
        f"  batch {w.get('batch_size')} per rank · {w.get('dtype')} · "
        + (str(w.get("optimizer")) if w.get("mode") == "train" else "eval")
        + (f" · offload {w.get('offload')}" if w.get("offload") not in (None, "none") else "")
    )
    cap = result.capacity
    if cap is not None:
        console.print(f"  per-rank capacity {format_bytes(cap.total_bytes)} ({cap.source}), judged by {result.metric}")
    else:
        console.print(f"  capacity unknown ({result.capacity_note or 'no --gpu-memory given'}): no batch columns")
    host = any(r.host_bytes for r in result.rows)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in ("ranks", "peak/rank", "states", "activations", "gather+comm"):
        table.add_column(name, justify="right", no_wrap=True)
    if host:
        table.add_column("host", justify="right", no_wrap=True)
    if cap is not None:
        for name in ("batch/rank", "global"):
            table.add_column(name, justify="right", no_wrap=True)
    for r in result.rows:
        if r.error:
            table.add_row(str(r.world_size), f"[red]{r.error}[/red]")
            continue
        cells = [
            str(r.world_size),
            format_bytes(r.peak_bytes),
            format_bytes(r.model_state_bytes),
            format_bytes(r.activation_bytes),
            format_bytes((r.gathered_bytes or 0) + (r.communication_bytes or 0)),
        ]
        if host:
            cells.append(format_bytes(r.host_bytes) if r.host_bytes else "-")
        if cap is not None:
            cells += [
                "none" if r.max_batch is None else str(r.max_batch),
                "-" if r.global_batch is None else f"{r.global_batch:,}",
            ]
        table.add_row(*cells)
    console.print()
    console.print(table)
    if chart and any(r.peak_bytes for r in result.rows):
        text = terminal(scaling_chart(result), width=40)
        text.rstrip()
        console.print()
        console.print(text)
    notes = [
        "peak/rank: one rank's traced peak; states = parameters + gradients + optimizer state one rank holds; "
        "activations = what the step saves for backward (the same at every world size); gather+comm = "
        "gathered parameters and communication buffers alive at the peak; batch/rank = the largest batch per "
        f"rank that fits (recommended: {result.headroom:g} × it, --json has it), global = batch/rank × ranks"
    ] + list(result.notes)
    console.print()
    for note in notes:
        console.print(
            textwrap.fill(note, width=max(40, console.width - 1), initial_indent="  - ", subsequent_indent="    "),
            markup=False,
            highlight=False,
        )


def write_plot(result, path: Path) -> Path:
    """One rank's peak per world size as a file: .svg, .png, .pdf or .html (see :func:`memprof.render.charts.write`)."""
    return write(scaling_chart(result), path)
