"""Rendering of ``memprof estimate`` results (see :class:`memprof.results.EstimateResult`)."""

from __future__ import annotations

import textwrap
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..results import METHOD_REAL, EstimateResult, FlopCount, LayerRow, MemCategory
from . import (
    certainty,
    ellipsize,
    format_bytes,
    format_count,
    format_flops,
    format_pct,
    format_seconds,
    plural,
    say,
    squeeze,
)

DEFAULT_LAYERS = 10

_ORDER = (
    MemCategory.PARAMETER,
    MemCategory.BUFFER,
    MemCategory.GRADIENT,
    MemCategory.OPTIMIZER_STATE,
    MemCategory.GATHERED_PARAMETER,
    MemCategory.COMMUNICATION,
    MemCategory.ACTIVATION,
    MemCategory.TEMPORARY,
    MemCategory.INPUT,
    MemCategory.KV_CACHE,
    MemCategory.CUDA_OVERHEAD,
)
#: what each strategy shards (labelled "(sharded)" in the breakdown)
_SHARDED = {
    "zero1": (MemCategory.OPTIMIZER_STATE,),
    "zero2": (MemCategory.PARAMETER, MemCategory.GRADIENT, MemCategory.OPTIMIZER_STATE),
    "zero3": (MemCategory.PARAMETER, MemCategory.GRADIENT, MemCategory.OPTIMIZER_STATE),
    "fsdp": (MemCategory.PARAMETER, MemCategory.GRADIENT, MemCategory.OPTIMIZER_STATE),
}
_STRATEGY_NAMES = {
    "ddp": "DDP",
    "zero1": "ZeRO-1 (DDP + ZeroRedundancyOptimizer)",
    "zero2": "ZeRO-2 (FSDP2, reshard_after_forward=False)",
    "zero3": "ZeRO-3 (FSDP2 fully_shard)",
    "fsdp": "FSDP2 fully_shard (ZeRO-3)",
}


def _label(cat: MemCategory, strategy: str | None) -> str:
    return cat.value + (" (sharded)" if cat in _SHARDED.get(strategy or "", ()) else "")


def parallel_line(workload: dict) -> str | None:
    """ "FSDP2 fully_shard (ZeRO-3) × 8 ranks, one rank shown" for a distributed workload, else None."""
    strategy = workload.get("strategy")
    if not strategy or strategy == "none":
        return None
    text = f"{_STRATEGY_NAMES.get(strategy, strategy)} × {workload.get('world_size')} ranks; figures are one rank's"
    if workload.get("offload") not in (None, "none"):
        text += f"; offload {workload.get('offload')}"
    if strategy in ("ddp", "zero1"):
        text += f"; buckets {workload.get('bucket_cap_mb'):g} MiB"
        if workload.get("gradient_as_bucket_view"):
            text += ", gradient_as_bucket_view"
    return text


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


_MODES = {
    "train": "train (forward, backward, optimizer step)",
    "eval": "eval (no_grad inference)",
    "generate": "generate (model.generate: prefill, then one token at a time with a KV cache)",
}
_LOOPS = {
    "plain": "plain: `out = model(...)` stays alive through backward (the safe default; --loop trainer "
    "if your loop drops it first)",
    "trainer": "trainer: the output is dropped before backward (HF Trainer, Lightning)",
}
_ROUTINGS = {
    "balanced": "balanced: tokens x top-k / experts per expert (assumed; --routing worst for all tokens "
    "to the same experts)",
    "worst": "worst case: every token to the same top-k experts (assumed)",
}


def _header(result: EstimateResult, console: Console) -> None:
    w = result.workload
    console.print(f"[bold]memprof estimate[/bold] · {w.get('model')}")
    mode = str(w.get("mode"))
    optimizer = str(w.get("optimizer")) if mode == "train" else f"- ({mode})"
    rows = [
        ("model", str(w.get("model"))),
        ("batch size", str(w.get("batch_size"))),
        ("input", str(w.get("input"))),
        ("dtype", str(w.get("dtype"))),
        ("optimizer", optimizer),
        ("mode", _MODES.get(mode, mode)),
    ]
    if w.get("source"):
        rows.insert(1, ("config", f"{w.get('task')} from {w.get('source')}"))
    if mode == "generate":
        rows.append(("generation", f"{w.get('seq_len')}-token prompt + {w.get('new_tokens')} new tokens, greedy"))
        rows.append(("KV cache", str(w.get("kv_cache"))))
    if mode == "train" and w.get("loop"):
        rows.append(("loop", _LOOPS.get(str(w.get("loop")), str(w.get("loop")))))
    if w.get("attn_used") or w.get("attn"):
        rows.append(
            ("attention", str(w.get("attn_used") or w.get("attn")) + (" (padded batch)" if w.get("padding") else ""))
        )
    if w.get("routing"):
        rows.append(("MoE routing", _ROUTINGS.get(str(w.get("routing")), str(w.get("routing")))))
    if w.get("checkpointing") not in (None, "none"):
        rows.append(("checkpointing", str(w.get("checkpointing"))))
    parallel = parallel_line(w)
    if parallel is not None:
        rows[1] = ("batch size", f"{w.get('batch_size')} per rank")
        rows.append(("parallel", parallel))
    cpu = "cpu (the same step run on the CPU), " if result.target == "cpu" else ""
    if result.capacity is not None:
        rows.append(("device", f"{cpu}{format_bytes(result.capacity.total_bytes)} ({result.capacity.source})"))
    else:
        rows.append(("device", f"{cpu}capacity unknown ({result.capacity_note or 'no --gpu-memory given'})"))
    for key, value in rows:
        say(console, f"  {key:<11} {value}", hang=14)


def _headline(result: EstimateResult, console: Console) -> None:
    a = result.analytic
    mode = result.workload.get("mode")
    what = {"train": "training step", "generate": "generation"}.get(str(mode), "inference forward")
    console.print()
    if result.traced is not None:
        t = result.traced
        real = getattr(t, "method", "trace") == METHOD_REAL
        how = "recorded from a real CPU run" if real else "traced for the CPU" if result.target == "cpu" else "traced"
        console.print(f"[bold]Estimate: {format_bytes(result.headline_bytes)}[/bold] peak per {what} ({how})")
        if getattr(t, "peak_phase", None):
            say(
                console,
                f"  peak in {t.peak_phase}"
                + (f", in module {t.peak_module}" if getattr(t, "peak_module", None) else ""),
            )
        width = max(40, console.width - 1)
        lines = [certainty(getattr(t, "method", "trace"), getattr(t, "modelled", ()))]
        reason = getattr(t, "method_reason", None)
        if reason:
            lines.append(f"the step reads tensor values ({reason}), so it ran for real on the CPU at this batch")
        for line in lines:
            console.print(textwrap.fill(line, width, initial_indent="  ", subsequent_indent="    "), markup=False)
        extra = []
        if getattr(t, "predicted_reserved_bytes", None) is not None:
            extra.append(f"CUDA allocator reserved ≈ {format_bytes(t.predicted_reserved_bytes)}")
        if getattr(t, "predicted_nvml_bytes", None) is not None:
            extra.append(f"nvidia-smi ≈ {format_bytes(t.predicted_nvml_bytes)}")
        if extra:
            say(console, "  " + "; ".join(extra))
        if getattr(t, "host_bytes", None):
            say(console, f"  offloaded to the host: {format_bytes(t.host_bytes)} per rank (not in the figures above)")
        if mode == "generate":
            _generation(result, console)
        one = " for one process" if parallel_line(result.workload) else ""
        say(console, f"  formula (four-part rule){one}: {format_bytes(a.total_bytes)}")
    else:
        console.print(
            f"[bold]Estimate: {format_bytes(result.headline_bytes)}[/bold] per {what} (formula: four-part rule)"
        )
        if result.trace_note:
            partial = "PARTIAL - " if result.trace_error is not None else ""
            say(console, f"  {partial}{result.trace_note}")
    params = f"  parameters {format_count(a.param_count)}"
    if a.trainable_param_count != a.param_count:
        params += f" ({format_count(a.trainable_param_count)} trainable)"
    params += f" · buffers {format_count(a.buffer_count)} elements"
    if a.tied_param_count:
        params += f" · {a.tied_param_count} tied tensor(s) counted once"
    published = result.workload.get("published_params")
    if published is not None:
        params += " (the published count)" if published == a.param_count else f" (published: {format_count(published)})"
    params += f" · formula: {a.seconds:.2f} s"
    say(console, params)


def _generation(result: EstimateResult, console: Console) -> None:
    """Weights, the KV cache at full length, the prefill and the decode step, from the trace."""
    t = result.traced
    w = result.workload
    peaks = getattr(t, "phase_peaks", {}) or {}
    weights = int((t.totals or {}).get(MemCategory.PARAMETER, 0)) + int((t.totals or {}).get(MemCategory.BUFFER, 0))
    kv = getattr(t, "kv_cache_bytes", None)
    formula = _categories(result.analytic.breakdown).get(MemCategory.KV_CACHE)
    tokens = int(w.get("seq_len") or 0) + int(w.get("new_tokens") or 1) - 1
    console.print(f"  weights {format_bytes(weights)}")
    if kv is not None:
        check = f" (formula: {format_bytes(formula)})" if formula else ""
        console.print(
            f"  KV cache at full length ({tokens:,} tokens × batch {w.get('batch_size')}): {format_bytes(kv)}{check}"
        )
    if "prefill" in peaks:
        console.print(f"  prefill peak (the whole prompt at once): {format_bytes(peaks['prefill'])}")
    if "decode" in peaks:
        console.print(f"  decode peak (the last token, longest cache): {format_bytes(peaks['decode'])}")


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
        table.add_column("Formula" + (" (1 process)" if parallel_line(result.workload) else ""), justify="right")
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
            label = _label(cat, result.workload.get("strategy"))
            table.add_row(
                label, format_bytes(t or 0), _pct(t or 0, t_total), format_bytes(f or 0), _pct(f or 0, f_total)
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
    if traced is not None:
        say(
            console,
            "  Traced: bytes alive at the moment of the peak (a gradient not made yet is not counted); "
            "Formula: each category at its full size.",
        )
    console.print(table)


def _saved_blocks(result: EstimateResult, console: Console) -> None:
    """What each block of the model keeps for backward (traced), alike blocks on one row."""
    rows = getattr(result.traced, "saved_by_block", None) or ()
    if not rows:
        return
    table = _table()
    table.add_column("Block", overflow="fold", max_width=34)
    table.add_column("Type")
    table.add_column("Saved for backward", justify="right")
    table.add_column("Of which", overflow="fold")
    for row in rows:
        each = format_bytes(row.bytes_each)
        saved = f"{each} each" if row.count > 1 else each
        parts = ", ".join(f"{name} {format_bytes(n)}" for name, n in row.parts[:4])
        name = f"{row.name} (×{row.count})" if row.count > 1 else row.name
        table.add_row(name, row.type or "-", saved, parts or "-")
    console.print()
    console.print("[bold]Saved for backward, by block[/bold] (traced, at the end of forward)")
    console.print(table)


def _weights(result: EstimateResult, console: Console) -> None:
    """The parameters split for fine-tuning (base / adapters / quantization state), and off-GPU memory."""
    traced = result.traced
    w = getattr(traced, "weights", None) or result.analytic.weights
    host = getattr(traced, "host_peak_bytes", None) if traced is not None else result.analytic.host_bytes
    paged = getattr(traced, "paged_bytes", None)
    if w is None and not host and not paged:
        return
    console.print()
    console.print("[bold]Fine-tuning[/bold]")
    if w is not None:
        say(console, f"  {w.peft_line()}  (as peft prints it)")
        parts = [f"frozen base weights {format_bytes(w.frozen_bytes)}"]
        if w.adapter_bytes:
            parts.append(f"LoRA adapters {format_bytes(w.adapter_bytes)} ({format_count(w.adapter_params)} params)")
        if w.trainable_bytes:
            parts.append(f"other trainable {format_bytes(w.trainable_bytes)}")
        if w.quantized_layers:
            parts.append(
                f"quantization state {format_bytes(w.quant_state_bytes)} ({w.quantized_layers} quantized layers)"
            )
        say(console, "  " + " · ".join(parts))
    if host:
        say(console, f"  CPU memory (offloaded optimizer: fp32 masters, gradients, state): {format_bytes(host)}")
    if paged:
        say(console, f"  paged optimizer state (CUDA unified memory, not in the peak): {format_bytes(paged)}")


def select_layers(layers: tuple[LayerRow, ...], top: int | None) -> list[LayerRow]:
    """``top`` N layers by activation bytes (ties in execution order); None or 0: all, in execution order."""
    if not top:
        return list(layers)
    ranked = sorted(range(len(layers)), key=lambda i: (-layers[i].activation_bytes, i))
    return [layers[i] for i in ranked[:top]]


def _flops(result: EstimateResult) -> FlopCount | None:
    return getattr(result.traced, "flops", None) if result.traced is not None else None


def _layers(result: EstimateResult, console: Console, top: int | None) -> None:
    a = result.analytic
    rows = select_layers(a.layers, top)
    if not rows:
        return
    flops = _flops(result)
    forward = {m.name: m.forward_flops for m in flops.modules} if flops is not None else None
    if top and top < len(a.layers):
        title = f"Largest layers by activation (top {len(rows)} of {len(a.layers)}; --all-layers for all)"
    else:
        rows = list(a.layers)
        title = f"Layers ({len(a.layers)}, in execution order)"
    headers = ["Layer", "Type", "Output shape", "Parameters", "Activation"]
    if forward is not None:
        headers += ["Fwd FLOP", "MAC"]
    cells = []
    for row in rows:
        name = row.name + (f" (×{row.calls})" if row.calls > 1 else "")
        act = "in-place" if row.inplace and row.activation_bytes == 0 else format_bytes(row.activation_bytes)
        cell = [name, row.type, _shapes(row.output_shapes), format_count(row.params), act]
        if forward is not None:
            f = forward.get(row.name, 0)
            cell += [format_flops(f, "") if f else "-", format_flops(f // 2, "") if f else "-"]
        cells.append(cell)
    # long names lose their middle, never wrap: each row stays one line at any width
    cells = squeeze(headers, cells, console.width, {0: 16, 2: 12, 1: 10}, gap=3)
    table = _table()
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i >= 3 else "left", no_wrap=True)
    for cell in cells:
        table.add_row(*cell)
    console.print()
    console.print(f"[bold]{title}[/bold]")
    console.print(table)
    if flops is not None and forward is not None:
        listed = {r.name for r in a.layers}
        elsewhere = [m for m in flops.modules if m.forward_flops and m.name not in listed]
        shown = sum(forward.get(r.name, 0) for r in a.layers)
        if shown == flops.forward_flops:
            line = f"  per-layer forward FLOPs sum to the forward total, {format_flops(shown)}"
        else:
            line = f"  per-layer forward FLOPs sum to {format_flops(shown)} of {format_flops(flops.forward_flops)}"
        if elsewhere:
            names = ", ".join(f"{m.name} {format_flops(m.forward_flops)}" for m in elsewhere[:3])
            more = f" (+{len(elsewhere) - 3} more)" if len(elsewhere) > 3 else ""
            line += f"; the rest in modules' own code: {names}{more}"
        say(console, line)
    shown_params = sum(r.params for r in a.layers)
    if a.formula_mismatches:
        say(
            console,
            f"  per-layer formulas differ from numel() on {len(a.formula_mismatches)} of "
            f"{plural(a.formula_checked, 'layer')} (numel() used):",
        )
        for m in a.formula_mismatches[:5]:
            say(console, f"    {m}")
    else:
        say(console, f"  per-layer formulas agree with numel() on {plural(a.formula_checked, 'layer')}")
    say(
        console,
        f"  parameters sum to {format_count(shown_params)}"
        + (f" ({a.tied_param_count} tied tensor(s) counted at their first owner)" if a.tied_param_count else ""),
    )


def _uncounted(flops: FlopCount) -> str:
    """The ops no FLOP formula covers: the others by name, pointwise and memory ones as counts."""
    other = [u for u in flops.uncounted_ops if u.kind == "other"]
    parts = []
    if other:
        parts.append(", ".join(f"{u.name.removeprefix('aten.')} ×{u.calls}" for u in other[:8]))
        if len(other) > 8:
            parts[-1] += f" (+{len(other) - 8} more)"
    for kind in ("pointwise", "memory"):
        ops = [u for u in flops.uncounted_ops if u.kind == kind]
        if ops:
            calls = sum(u.calls for u in ops)
            parts.append(f"{len(ops)} {kind} op type{'s' * (len(ops) > 1)} ({calls:,} call{'s' * (calls > 1)})")
    return "; ".join(parts)


def _compute(result: EstimateResult, console: Console) -> None:
    flops = _flops(result)
    if flops is None:
        return
    batch = max(1, flops.batch_size)
    console.print()
    console.print("[bold]Compute per step[/bold] (traced FLOPs; 1 multiply-add = 2 FLOPs)")
    rows = [("forward", flops.forward_flops, f"{format_flops(flops.forward_flops / batch)} per sample")]
    if result.workload.get("mode") == "train":
        backward = ""
        if flops.recompute_flops:
            backward = f"incl. {format_flops(flops.recompute_flops)} recomputed (checkpointing)"
        optimizer = "elementwise updates: no formula" if not flops.optimizer_flops else ""
        rows += [("backward", flops.backward_flops, backward), ("optimizer", flops.optimizer_flops, optimizer)]
        rows.append(("step", flops.step_flops, f"{format_flops(flops.per_sample_flops)} per sample"))
    for name, value, extra in rows:
        macs = f"({format_flops(value // 2, 'MAC')})" if name == "forward" else ""
        console.print(f"  {name:<10} {format_flops(value):>12} {macs:<14} {extra}".rstrip(), highlight=False)
    width = max(40, console.width - 1)
    text = "counted with PyTorch's FLOP formulas (matmuls, convolutions, attention); no formula (counted 0): "
    text += _uncounted(flops) or "none"
    console.print(
        textwrap.fill(text, width=width, initial_indent="  ", subsequent_indent="    "), markup=False, highlight=False
    )
    st = result.step_time
    if st is None:
        say(console, f"  step time: {result.step_time_note or 'needs a GPU (--gpu NAME)'}")
        return
    # the heading alone on its line, the figure below it: at 80 columns nothing breaks mid-sentence
    console.print(f"[bold]Step time on {ellipsize(st.gpu, 40)}[/bold] ({st.label})", highlight=False)
    say(console, f"  ≥ {format_seconds(st.seconds)} per step (roofline lower bound)")
    phases = f"forward {format_seconds(st.forward_seconds)}"
    if result.workload.get("mode") == "train":
        phases += f", backward {format_seconds(st.backward_seconds)}, optimizer {format_seconds(st.optimizer_seconds)}"
    rate = f"≤ {st.samples_per_second:,.0f} samples/s"
    if st.tokens_per_second is not None:
        rate += f" (≤ {st.tokens_per_second:,.0f} tokens/s)"
    share = 100.0 * st.compute_bound_seconds / st.seconds if st.seconds else 0.0
    say(console, f"  {phases}; {rate}")
    say(
        console,
        f"  {share:.0f} % of it in compute-bound ops, the rest bound by memory bandwidth "
        f"({format_bytes(st.step_bytes)} read and written)",
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
        if getattr(result.traced, "method", "trace") == METHOD_REAL:
            table.add_row("memprof real run", format_bytes(result.traced.peak_bytes), format_bytes(act))
            legend.append(("memprof real run", "the whole step run on the CPU, recorded like a trace"))
        else:
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
        say(console, f"  {name:<{width}}  {how}", hang=width + 4)
    say(console, f"  modelsize in decimal MB: parameters {a.modelsize_param_bytes / 1e6:.6f} MB,")
    say(
        console,
        f"    intermediates {a.modelsize_forward_bytes / 1e6:.4f} MB forward-only, "
        f"{a.modelsize_backward_bytes / 1e6:.4f} MB with backward",
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
    say(console, f"  judged by: {_METRICS.get(fit.metric, fit.metric)}")
    if fit.note:
        say(console, f"  ({fit.note})")
    batch = result.workload.get("batch_size")
    verdict = "fits" if fit.fits else "DOES NOT FIT"
    say(
        console,
        f"  batch {batch}: {format_bytes(fit.estimate_bytes)} = {_pct(fit.estimate_bytes, cap.total_bytes)} "
        f"of capacity · {verdict}",
    )
    if fit.max_batch is None:
        say(console, "  largest batch that fits: none (not even batch 1)")
        _seq_fit(result, console)
        _grid(result, console)
        return
    say(console, f"  largest batch that fits: {fit.max_batch}")
    say(
        console,
        f"  recommended batch:       {fit.recommended_batch}  "
        f"(floor({fit.headroom:g} × {fit.max_batch}): headroom for what the estimate cannot see)",
        hang=27,
    )
    if fit.per_sample_bytes is not None and fit.fixed_bytes is not None:
        say(console, f"  by batch: {format_bytes(fit.fixed_bytes)} + {format_bytes(fit.per_sample_bytes)} per sample")
    _seq_fit(result, console)
    _grid(result, console)


def _seq_fit(result: EstimateResult, console: Console) -> None:
    sf = result.seq_fit
    if sf is None:
        return
    gen = sf.new_tokens is not None
    what = "prompt" if gen else "sequence"
    unit = f", a multiple of {sf.multiple_of}" if sf.multiple_of > 1 else ""
    if sf.max_seq_len is None:
        say(console, f"  longest {what} at batch {sf.batch_size}: none (not even {sf.multiple_of} tokens fit)")
        return
    text = f"  longest {what} at batch {sf.batch_size}: {sf.max_seq_len:,} tokens{unit}"
    if gen:
        text += f" (+ {sf.new_tokens} generated = {sf.context:,} tokens of context)"
    if sf.limited_by_positions:
        text += " - the model's positions, not the memory, set this limit"
    elif sf.peak_at_next_bytes is not None:
        text += f"; {sf.max_seq_len + sf.multiple_of:,} needs {format_bytes(sf.peak_at_next_bytes)}"
    say(console, text)


def _grid(result: EstimateResult, console: Console) -> None:
    from .charts import grid_chart, terminal

    g = result.grid
    if g is None:
        return
    what = "prompt length" if g.new_tokens is not None else "sequence length"
    console.print()
    console.print(f"[bold]Batch size × {what}[/bold] that fit {format_bytes(g.capacity_bytes)} (█ fits, · does not)")
    for line in terminal(grid_chart(result)).split("\n"):
        console.print(Text("  ") + line, highlight=False)
    say(console, f"  {g.traces} traces; each largest batch is exact under the tracer")


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
    _saved_blocks(result, console)
    _weights(result, console)
    _layers(result, console, layers)
    _compute(result, console)
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
