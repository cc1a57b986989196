"""Rendering of ``memprof estimate`` results (see :class:`memprof.results.EstimateResult`)."""

from __future__ import annotations

import textwrap
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from ..results import EstimateResult, LayerRow, MemCategory
from . import format_bytes, format_count, format_pct

DEFAULT_LAYERS = 10

_ORDER = (
    MemCategory.PARAMETER,
    MemCategory.BUFFER,
    MemCategory.GRADIENT,
    MemCategory.OPTIMIZER_STATE,
    MemCategory.ACTIVATION,
    MemCategory.TEMPORARY,
    MemCategory.INPUT,
    MemCategory.CUDA_OVERHEAD,
)


_METRICS = {
    "nvml": "the traced prediction of nvidia-smi memory (tensors, allocator cache, CUDA context)",
    "reserved": "the traced prediction of memory reserved by the CUDA caching allocator",
    "allocated": "the traced peak of allocated tensor memory",
    "formula total": "the formula total (four-part rule)",
}


def _table() -> Table:
    return Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)


def _pct(part: int, total: int) -> str:
    return format_pct(100.0 * part / total) if total else "n/a"


def _shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
    if not shapes:
        return "-"
    text = ", ".join("×".join(str(d) for d in s) or "scalar" for s in shapes[:2])
    return text + (f" (+{len(shapes) - 2})" if len(shapes) > 2 else "")


def _cat(key: Any) -> MemCategory | None:
    if isinstance(key, MemCategory):
        return key
    for c in MemCategory:
        if key in (c.value, c.key, c.name):
            return c
    return None


def _categories(breakdown: dict) -> dict[MemCategory, int]:
    out: dict[MemCategory, int] = {}
    for k, v in (breakdown or {}).items():
        c = _cat(k)
        if c is not None and v is not None:
            out[c] = out.get(c, 0) + int(v)
    return out


def _header(result: EstimateResult, console: Console) -> None:
    w = result.workload
    console.print(f"[bold]memprof estimate[/bold] · {w.get('model')}")
    rows = [
        ("model", str(w.get("model"))),
        ("batch size", str(w.get("batch_size"))),
        ("input", str(w.get("input"))),
        ("dtype", str(w.get("dtype"))),
        ("optimizer", str(w.get("optimizer")) if w.get("mode") == "train" else "- (eval)"),
        (
            "mode",
            "train (forward, backward, optimizer step)" if w.get("mode") == "train" else "eval (no_grad inference)",
        ),
    ]
    if w.get("checkpointing") not in (None, "none"):
        rows.append(("checkpointing", str(w.get("checkpointing"))))
    cpu = "cpu (the same step run on the CPU), " if result.target == "cpu" else ""
    if result.capacity is not None:
        rows.append(("device", f"{cpu}{format_bytes(result.capacity.total_bytes)} ({result.capacity.source})"))
    else:
        rows.append(("device", f"{cpu}capacity unknown ({result.capacity_note or 'no --gpu-memory given'})"))
    for key, value in rows:
        console.print(f"  {key:<11} {value}")


def _headline(result: EstimateResult, console: Console) -> None:
    a = result.analytic
    what = "training step" if result.workload.get("mode") == "train" else "inference forward"
    console.print()
    if result.traced is not None:
        t = result.traced
        how = "traced for the CPU" if result.target == "cpu" else "traced"
        console.print(f"[bold]Estimate: {format_bytes(result.headline_bytes)}[/bold] peak per {what} ({how})")
        if getattr(t, "peak_phase", None):
            console.print(
                f"  peak in {t.peak_phase}"
                + (f", in module {t.peak_module}" if getattr(t, "peak_module", None) else "")
            )
        extra = []
        if getattr(t, "predicted_reserved_bytes", None) is not None:
            extra.append(f"CUDA allocator reserved ≈ {format_bytes(t.predicted_reserved_bytes)}")
        if getattr(t, "predicted_nvml_bytes", None) is not None:
            extra.append(f"nvidia-smi ≈ {format_bytes(t.predicted_nvml_bytes)}")
        if extra:
            console.print("  " + "; ".join(extra))
        console.print(f"  formula (four-part rule): {format_bytes(a.total_bytes)}")
    else:
        console.print(
            f"[bold]Estimate: {format_bytes(result.headline_bytes)}[/bold] per {what} (formula: four-part rule)"
        )
        if result.trace_note:
            console.print(f"  {result.trace_note}")
    params = f"  parameters {format_count(a.param_count)}"
    if a.trainable_param_count != a.param_count:
        params += f" ({format_count(a.trainable_param_count)} trainable)"
    params += f" · buffers {format_count(a.buffer_count)} elements"
    if a.tied_param_count:
        params += f" · {a.tied_param_count} tied tensor(s) counted once"
    params += f" · formula: {a.seconds:.2f} s"
    console.print(params)


def _breakdown(result: EstimateResult, console: Console) -> None:
    a = result.analytic
    formula = _categories(a.breakdown)
    traced = _categories(getattr(result.traced, "breakdown_at_peak", None) or {}) if result.traced is not None else None
    title = "Breakdown" + (" at the traced peak" if traced is not None else " (formula)")
    table = _table()
    table.add_column("Category")
    if traced is not None:
        table.add_column("Traced", justify="right")
        table.add_column("% of total", justify="right")
        table.add_column("Formula", justify="right")
        table.add_column("% of total", justify="right")
    else:
        table.add_column("Bytes", justify="right")
        table.add_column("% of total", justify="right")
    f_total = a.total_bytes
    t_total = sum(traced.values()) if traced is not None else 0
    for cat in _ORDER:
        f = formula.get(cat)
        t = traced.get(cat) if traced is not None else None
        if not f and not t:
            continue
        if traced is not None:
            table.add_row(
                cat.value, format_bytes(t or 0), _pct(t or 0, t_total), format_bytes(f or 0), _pct(f or 0, f_total)
            )
        else:
            assert f is not None  # without a trace t is None, so the row was skipped unless f is set
            table.add_row(cat.value, format_bytes(f), _pct(f, f_total))
    if traced is not None:
        table.add_row(
            "Total",
            format_bytes(t_total),
            _pct(t_total, t_total),
            format_bytes(f_total),
            _pct(f_total, f_total),
            style="bold",
        )
    else:
        table.add_row("Total", format_bytes(f_total), _pct(f_total, f_total), style="bold")
    console.print()
    console.print(f"[bold]{title}[/bold]")
    console.print(table)


def select_layers(layers: tuple[LayerRow, ...], top: int | None) -> list[LayerRow]:
    """``top`` N layers by activation bytes (ties in execution order); None or 0: all, in execution order."""
    if not top:
        return list(layers)
    ranked = sorted(range(len(layers)), key=lambda i: (-layers[i].activation_bytes, i))
    return [layers[i] for i in ranked[:top]]


def _layers(result: EstimateResult, console: Console, top: int | None) -> None:
    a = result.analytic
    rows = select_layers(a.layers, top)
    if not rows:
        return
    if top and top < len(a.layers):
        title = f"Largest layers by activation (top {len(rows)} of {len(a.layers)}; --all-layers for all)"
    else:
        rows = list(a.layers)
        title = f"Layers ({len(a.layers)}, in execution order)"
    table = _table()
    table.add_column("Layer", overflow="fold", max_width=40)
    table.add_column("Type")
    table.add_column("Output shape")
    table.add_column("Parameters", justify="right")
    table.add_column("Activation", justify="right")
    for row in rows:
        name = row.name + (f" (×{row.calls})" if row.calls > 1 else "")
        act = "in-place" if row.inplace and row.activation_bytes == 0 else format_bytes(row.activation_bytes)
        table.add_row(name, row.type, _shapes(row.output_shapes), format_count(row.params), act)
    console.print()
    console.print(f"[bold]{title}[/bold]")
    console.print(table)
    shown_params = sum(r.params for r in a.layers)
    if a.formula_mismatches:
        console.print(
            f"  per-layer formulas differ from numel() on {len(a.formula_mismatches)} of "
            f"{a.formula_checked} layers (numel() used):"
        )
        for m in a.formula_mismatches[:5]:
            console.print(f"    {m}")
    else:
        console.print(f"  per-layer formulas agree with numel() on {a.formula_checked} layers")
    console.print(
        f"  parameters sum to {format_count(shown_params)}"
        + (f" ({a.tied_param_count} tied tensor(s) counted at their first owner)" if a.tied_param_count else "")
    )


def _methods(result: EstimateResult, console: Console) -> None:
    a = result.analytic
    table = _table()
    table.add_column("Method")
    table.add_column("Total", justify="right")
    table.add_column("Activations", justify="right")
    legend = []
    if result.traced is not None:
        act = _categories(getattr(result.traced, "breakdown_at_peak", {})).get(MemCategory.ACTIVATION)
        table.add_row("memprof trace", format_bytes(result.traced.peak_bytes), format_bytes(act))
        legend.append(("memprof trace", "fake-tensor trace of the whole step, peak of live storages"))
    for m in a.methods:
        table.add_row(
            m.method,
            format_bytes(m.total_bytes),
            format_bytes(m.activation_bytes) if m.activation_bytes is not None else "-",
        )
        legend.append((m.method, m.description))
    console.print()
    console.print("[bold]Estimators compared[/bold]")
    console.print(table)
    width = max(len(name) for name, _ in legend)
    for name, how in legend:
        console.print(f"  {name:<{width}}  {how}")
    console.print(f"  modelsize in decimal MB: parameters {a.modelsize_param_bytes / 1e6:.6f} MB,")
    console.print(
        f"    intermediates {a.modelsize_forward_bytes / 1e6:.4f} MB forward-only, "
        f"{a.modelsize_backward_bytes / 1e6:.4f} MB with backward"
    )


def _fit(result: EstimateResult, console: Console) -> None:
    console.print()
    fit = result.fit
    if fit is None:
        if result.target == "cpu":
            console.print("[bold]Fit[/bold]: skipped, no capacity given; pass --memory-limit, e.g. --memory-limit 8GiB")
        else:
            console.print(
                "[bold]Fit[/bold]: skipped, no GPU capacity known; pass --gpu-memory, e.g. --gpu-memory 24GiB"
            )
        return
    cap = fit.capacity
    console.print(f"[bold]Fit[/bold] on {format_bytes(cap.total_bytes)} ({cap.source})")
    console.print(f"  judged by: {_METRICS.get(fit.metric, fit.metric)}")
    batch = result.workload.get("batch_size")
    verdict = "fits" if fit.fits else "DOES NOT FIT"
    console.print(
        f"  batch {batch}: {format_bytes(fit.estimate_bytes)} = {_pct(fit.estimate_bytes, cap.total_bytes)} "
        f"of capacity · {verdict}"
    )
    if fit.max_batch is None:
        console.print("  largest batch that fits: none (not even batch 1)")
        return
    console.print(f"  largest batch that fits: {fit.max_batch}")
    console.print(
        f"  recommended batch:       {fit.recommended_batch}  "
        f"(floor({fit.headroom:g} × {fit.max_batch}): headroom for what the estimate cannot see)"
    )
    if fit.per_sample_bytes is not None and fit.fixed_bytes is not None:
        console.print(f"  by batch: {format_bytes(fit.fixed_bytes)} + {format_bytes(fit.per_sample_bytes)} per sample")


def _verification(result: EstimateResult, console: Console) -> None:
    v = result.verification
    if v is None:
        return
    console.print()
    console.print(f"[bold]Verified[/bold]: {v.steps} real training steps on {v.device} ({v.seconds:.1f} s)")
    if v.predicted_source == "formula":
        console.print("  predicted = the formula total (there is no trace)")
    if v.oom:
        console.print(f"  {v.note or 'the real step ran out of memory'}: nothing measured")
        return
    table = _table()
    table.add_column("Measured as")
    table.add_column("Predicted", justify="right")
    table.add_column("Measured", justify="right")
    table.add_column("Error", justify="right")
    for f in v.figures:
        table.add_row(
            f.measured_as,
            format_bytes(f.predicted_bytes),
            format_bytes(f.measured_bytes),
            format_pct(f.error_pct, 2, signed=True),
        )
    console.print(table)
    console.print("  error = (predicted - measured) / measured")
    if v.note:
        console.print(f"  {v.note}", markup=False, highlight=False)


def render_estimate(result: EstimateResult, console: Console, layers: int | None = DEFAULT_LAYERS) -> None:
    """Header, headline, breakdown, per-layer table (top ``layers``; 0/None: all), estimators, fit, and the
    real step's figures (``--verify``)."""
    _header(result, console)
    _headline(result, console)
    _breakdown(result, console)
    _layers(result, console, layers)
    _methods(result, console)
    _fit(result, console)
    _verification(result, console)
    notes = list(result.analytic.notes) + list(getattr(result.traced, "notes", None) or ())
    if notes:
        console.print()
        console.print("[bold]Notes[/bold]")
    for note in notes:
        console.print(
            textwrap.fill(note, width=max(40, console.width - 1), initial_indent="  - ", subsequent_indent="    "),
            markup=False,
            highlight=False,
        )
