"""``memprof profile`` for people: the report, the ``--log`` text and the timeline plot."""

from __future__ import annotations

import html
import textwrap
from pathlib import Path

from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from ..results import UNUSED_CUDA, ProfileResult
from . import format_bytes, format_count, format_signed_bytes
from .charts import terminal, timeline_chart, write


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _short(text: str | None, width: int = 60) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 1] + "…"


def render_profile(result: ProfileResult, console: Console, top: int = 10, chart: bool = True) -> None:
    """The whole report: header, peak with its breakdown, memory over time (``chart``), top lines, modules,
    tensors at the peak, leaks."""
    p = result.peak
    argv = " ".join([Path(result.script).name, *result.argv])
    console.print(
        Text(
            f"memprof profile: {argv}  ·  {result.device}  ·  {result.wall_s:.2f} s  ·  {format_count(result.ops)} ops",
            style="bold",
        )
    )
    where = p.location or "outside the script's files"
    if p.source:
        where += f"  {_short(p.source)}"
    mod = f"  ·  module {p.module}" if p.module else ""
    console.print(f"Peak {format_bytes(p.bytes)} at {p.time_s:.3f} s (op {format_count(p.op_index)}), {p.phase}{mod}")
    console.print(f"  at {where}")
    console.print(f"Live at exit: {format_bytes(result.at_exit_bytes)}")
    if result.device == UNUSED_CUDA:
        console.print(
            "Only CUDA memory was counted and the script allocated none: "
            "run with --device cpu (or all) to profile its CPU tensors."
        )
    if chart and (result.timeline or result._timeline):
        console.print()
        console.print(terminal(timeline_chart(result)))

    if p.breakdown:
        t = Table(title="Live at the peak, by category", title_justify="left", show_edge=False)
        t.add_column("Category")
        t.add_column("Bytes", justify="right")
        t.add_column("Share", justify="right")
        for cat, b in sorted(p.breakdown.items(), key=lambda kv: -kv[1]):
            t.add_row(cat.value, format_bytes(b), f"{100 * b / p.bytes:.1f} %" if p.bytes else "n/a")
        console.print()
        console.print(t)

    lines = [ln for ln in result.lines if ln.max_delta_bytes > 0 or ln.alloc_bytes > 0][:top]
    if lines:
        t = Table(title="Top lines of the script's files by memory added", title_justify="left", show_edge=False)
        wide = console.width >= 100  # narrow terminals: Allocated and At exit stay in --json
        cols: list[tuple[str, JustifyMethod]] = [
            ("Line", "left"),
            ("Hits", "right"),
            ("Added", "right"),
            ("Allocated", "right"),
            ("Peak", "right"),
            ("At exit", "right"),
        ]
        rows = [
            [
                f"{ln.file}:{ln.line}",
                format_count(ln.hits),
                format_signed_bytes(ln.max_delta_bytes),
                format_bytes(ln.alloc_bytes),
                format_bytes(ln.peak_bytes),
                format_bytes(ln.live_at_exit_bytes),
            ]
            for ln in lines
        ]
        if not wide:
            keep = (0, 1, 2, 4)
            cols = [cols[i] for i in keep]
            rows = [[r[i] for i in keep] for r in rows]
        used = sum(max(len(c[0]), *(len(r[i]) for r in rows)) + 3 for i, c in enumerate(cols))
        room = max(16, console.width - used - 4)  # the source column gets what is left, truncated
        for col, just in cols:
            t.add_column(col, justify=just, no_wrap=True)
        t.add_column("Source", no_wrap=True)
        for row, ln in zip(rows, lines, strict=False):
            t.add_row(*row, _short(ln.source, room))
        console.print()
        console.print(t)
        console.print(
            "  Added: the most one execution added to live memory (calls from it included)\n"
            + ("  Allocated: by the line's own ops, all executions · " if wide else "  ")
            + "Peak: highest live total while it ran"
            + ("\n  At exit: its allocations still alive when the script ended" if wide else ""),
            style="dim",
        )

    if result.modules:
        t = Table(
            title="Modules (forward: added per call and peak; backward: allocated and peak)",
            title_justify="left",
            show_edge=False,
        )
        for col in ("Module", "Type", "Calls", "Fwd added", "Fwd peak", "Bwd allocated", "Bwd peak"):
            t.add_column(col, justify="left" if col in ("Module", "Type") else "right", no_wrap=True)
        for m in sorted(result.modules, key=lambda m: -m.forward_peak_bytes)[: max(top, 10)]:
            t.add_row(
                m.name,
                m.type,
                format_count(m.calls),
                format_signed_bytes(m.forward_added_bytes),
                format_bytes(m.forward_peak_bytes),
                format_bytes(m.backward_alloc_bytes),
                format_bytes(m.backward_peak_bytes),
            )
        console.print()
        console.print(t)

    if p.tensors:
        t = Table(
            title="Tensors alive at the peak (grouped by shape, dtype and origin)",
            title_justify="left",
            show_edge=False,
        )
        for col in ("Count", "Shape", "Dtype", "Device", "Bytes", "Category", "Origin"):
            t.add_column(col, justify="right" if col in ("Count", "Bytes") else "left", no_wrap=True)
        for g in p.tensors[:top]:
            t.add_row(
                format_count(g.count),
                _shape(g.shape),
                g.dtype,
                g.device,
                format_bytes(g.bytes),
                g.category.value,
                g.origin,
            )
        console.print()
        console.print(t)

    if result.cuda is not None:
        c = result.cuda
        console.print()
        console.print(Text("CUDA", style="bold"))
        console.print(
            f"  max allocated {format_bytes(c.max_allocated_bytes)} · max reserved "
            f"{format_bytes(c.max_reserved_bytes)} · reserved at exit {format_bytes(c.reserved_at_exit_bytes)}"
        )
        if c.nvml_process_bytes is not None:
            console.print(
                f"  NVML charges this process {format_bytes(c.nvml_process_bytes)}: "
                f"{format_bytes(c.context_bytes)} more than torch reserves\n"
                "  (CUDA context, cuBLAS/cuDNN workspaces: nvidia-smi shows it, torch.cuda.memory_* does not)"
            )
        else:
            console.print("  NVML process usage not available (nvidia-ml-py missing or not permitted)")
        if c.snapshot_path:
            console.print(f"  allocator snapshot: {c.snapshot_path} (open it at https://pytorch.org/memory_viz)")

    console.print()
    if result.leaks:
        console.print(Text("Possible leaks: memory kept from many executions of one line", style="bold"))
        for lk in result.leaks:
            src = f"  {_short(lk.source, 80)}" if lk.source else ""
            console.print(f"  {lk.origin}{src}")
            reason = textwrap.fill(
                lk.reason, width=max(40, console.width - 2), initial_indent="    ", subsequent_indent="    "
            )
            if lk.source is None:  # a global container: its tensors are small, what they keep is not
                console.print(reason)
                console.print(
                    f"    (the tensors themselves: {format_bytes(lk.live_bytes)}; their graphs' memory "
                    "is in the lines above)"
                )
            else:
                console.print(f"    {format_bytes(lk.live_bytes)} in {format_count(lk.storages)} storages")
                console.print(reason)
    else:
        console.print(
            "No leak suspected: no line keeps memory from many of its executions alive (at the peak or at exit)."
        )


def render_ranks(result, console: Console, top: int = 10) -> None:
    """``profile --nproc-per-node``: every rank's peak side by side, then the full report of the highest."""
    argv = " ".join([Path(result.script).name, *result.argv])
    console.print(
        Text(
            f"memprof profile: {argv}  ·  torchrun, {result.world_size} ranks"
            + (f" ({result.nproc_per_node} on this node)" if result.world_size != result.nproc_per_node else "")
            + f"  ·  {result.wall_s:.1f} s",
            style="bold",
        )
    )
    t = Table(title="Each rank", title_justify="left", show_edge=False)
    for name in ("rank", "peak", "at"):
        t.add_column(name, justify="right", no_wrap=True)
    t.add_column("phase", no_wrap=True)
    t.add_column("where")
    t.add_column("at exit", justify="right", no_wrap=True)
    t.add_column("outcome", no_wrap=True)
    highest = result.highest
    for rank, r in result.ranks:
        p = r.peak
        mark = " ◀" if highest is not None and rank == highest[0] and len(result.ranks) > 1 else ""
        t.add_row(
            str(rank),
            format_bytes(p.bytes) + mark,
            f"{p.time_s:.2f} s",
            p.phase + (f" {p.module}" if p.module else ""),
            p.location or "outside the script's files",
            format_bytes(r.at_exit_bytes),
            "ok" if r.outcome.exit_code == 0 else f"{r.outcome.status} {r.outcome.exit_code}",
        )
    for rank in result.missing:
        t.add_row(str(rank), "-", "", "", "sent no profile (the job stopped first)", "", "lost")
    console.print()
    console.print(t)
    if highest is not None:
        console.print()
        console.print(Text(f"Rank {highest[0]} (the highest peak):", style="bold"))
        render_profile(highest[1], console, top=top)


def outcome_line(result: ProfileResult) -> str | None:
    """One line for stderr when the script did not end normally, else None."""
    o = result.outcome
    if o.status == "ok" or (o.status == "exit" and o.exit_code == 0):
        return None
    if o.status == "exit":
        return f"the script called sys.exit({o.error!r})" if o.error else f"the script exited with status {o.exit_code}"
    where = f" at {o.location}" + (f" ({_short(o.source)})" if o.source else "") if o.location else ""
    verb = "was interrupted" if o.status == "interrupted" else "failed"
    return f"the script {verb}{where}: {o.error}; the profile above covers it up to there"


# ------------------------------------------------------------------------------------------ --log
def format_log(result: ProfileResult) -> str:
    """The seed tracker's text log: per executed line, the live total and the storages made (+) or freed (-)."""
    out = [
        f"# memprof profile --log: {' '.join([Path(result.script).name, *result.argv])} on {result.device}",
        "# time      line                          total live   "
        "(+ allocated / - freed: count x shape dtype device size, origin)",
    ]
    for t, loc, source, func, total, events in result._log or ():
        out.append(f"[{t:9.4f}s] {loc:<28} {func:<16} total {format_bytes(total):>10}   {_short(source, 70)}")
        grouped: dict[tuple, list[int]] = {}
        for sign, shape, dtype, device, nbytes, origin in events:
            g = grouped.setdefault((sign, tuple(shape), dtype, device, origin), [0, 0])
            g[0] += 1
            g[1] += nbytes
        for (sign, shape, dtype, device, origin), (n, b) in grouped.items():
            mark = "+" if sign > 0 else "-"
            src = f"  from {origin}" if sign < 0 and origin else ""
            out.append(f"    {mark} {n} x {_shape(shape)} {dtype} {device} {format_bytes(b)}{src}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ --plot
def _lines_html(result: ProfileResult) -> str:
    """What the ``.html`` plot adds under the chart: the peak and the top lines."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(f'{ln.file}:{ln.line}')}</td><td>{ln.hits}</td>"
        f"<td>{esc(format_signed_bytes(ln.max_delta_bytes))}</td>"
        f"<td>{esc(format_bytes(ln.peak_bytes))}</td><td><code>{esc(ln.source)}</code></td></tr>"
        for ln in result.lines[:10]
    )
    return (
        f"<p>Peak {esc(format_bytes(result.peak.bytes))} at {esc(result.peak.location or '?')} "
        f"({esc(result.peak.phase)}).</p>"
        "<table><tr><th>Line</th><th>Hits</th><th>Added (max)</th><th>Peak on line</th><th>Source</th></tr>"
        f"{rows}</table>\n"
    )


def write_plot(result: ProfileResult, path: Path) -> Path:
    """The timeline as a file: .svg, .png, .pdf, or .html (with the top lines under it)."""
    page = _lines_html(result) if path.suffix.lower() == ".html" else ""
    return write(timeline_chart(result), path, page=page)
