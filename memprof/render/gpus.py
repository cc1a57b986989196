"""``memprof gpus`` for people."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from ..results import GpusResult
from . import format_bytes


def no_gpu_line(result: GpusResult) -> str:
    t = result.torch
    build = f"torch {t.torch_version}" + (
        f" built for CUDA {t.cuda_version}" if t.cuda_version else " (CPU-only build)"
    )
    return f"no GPU: {result.nvml.reason or 'NVML sees no GPU'}; {build} sees no CUDA device ({t.reason or 'none'})"


NO_GPU_HINT = (
    "memprof estimate and memprof compare need no GPU (--gpu-memory 24GiB gives the capacity); "
    "find-batch runs real steps on the CPU with --device cpu --memory-limit 8GiB"
)


def render_gpus(result: GpusResult, console: Console) -> None:
    s, t = result.nvml, result.torch
    head = [
        f"driver {s.driver_version or 'n/a'}",
        f"CUDA (driver) {s.cuda_driver_version or 'n/a'}",
        f"torch {t.torch_version or 'n/a'}" + (f" (CUDA {t.cuda_version})" if t.cuda_version else " (CPU-only)"),
    ]
    console.print("  ·  ".join(head))
    if s.gpus:
        table = Table(show_edge=False)
        for col in ("GPU", "Name", "Total", "Used", "Free", "Process", "Process memory"):
            table.add_column(
                col,
                justify="right" if col in ("GPU", "Total", "Used", "Free", "Process memory") else "left",
                no_wrap=True,
            )
        for g in s.gpus:
            procs = list(g.processes)
            first = procs[0] if procs else None
            table.add_row(
                str(g.index),
                g.name,
                format_bytes(g.total_bytes),
                format_bytes(g.used_bytes),
                format_bytes(g.free_bytes),
                _proc(first) if first else "-",
                format_bytes(first.used_bytes) if first else "",
            )
            for p in procs[1:]:
                table.add_row("", "", "", "", "", _proc(p), format_bytes(p.used_bytes))
        console.print(table)
        by_key: dict[str, list[str]] = {}
        for g in s.gpus:
            key = result.catalog_matches.get(g.name)
            if key:
                by_key.setdefault(key, []).append(str(g.index))
        for key, indices in by_key.items():
            console.print(f"GPU {', '.join(indices)} in the catalog: --gpu {key}")
    else:
        console.print(f"NVML: not available ({s.reason})")
    if t.cuda_available:
        names = ", ".join(
            f"cuda:{d.index} {d.name} ({format_bytes(d.total_bytes)}, sm {d.capability}"
            + (f", --gpu {result.catalog_matches[d.name]}" if d.name in result.catalog_matches else "")
            + ")"
            for d in t.devices
        )
        console.print(f"torch sees {t.device_count} device{'s' if t.device_count != 1 else ''}: {names}")
    else:
        console.print(f"torch sees no CUDA device: {t.reason}")


def _proc(p) -> str:
    name = p.name or "?"
    return f"{p.pid} {name[:40]}"


def render_catalog(result: GpusResult, console: Console) -> None:
    """The GPUs ``--gpu NAME`` knows: capacity, architecture, dense peaks, bandwidth (names and sources: --json)."""
    dtypes = ("fp32", "tf32", "bf16", "fp16", "fp8")
    # no vertical rules and four significant digits: the whole table reads at 80 columns, nothing cut
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
        title="GPU catalog (--gpu NAME; names and sources in --json)",
        title_justify="left",
    )
    for col in ("--gpu", "Arch", "Capacity", *dtypes, "TB/s"):
        table.add_column(col, justify="left" if col in ("--gpu", "Arch") else "right", no_wrap=True)
    local = set(result.catalog_matches.values())
    for g in result.catalog:
        table.add_row(
            g.key + (" *" if g.key in local else ""),
            g.arch,
            format_bytes(g.memory_bytes, 2) + ("" if g.memory_reported else " ≤"),
            *(f"{g.peak_tflops[d]:.4g}" if d in g.peak_tflops else "-" for d in dtypes),
            f"{g.bandwidth_bytes_per_s / 1e12:.2f}",
        )
    console.print(table)
    legend = (
        "dense peak TFLOP/s (no sparsity); TB/s: memory bandwidth; "
        "≤: the vendor's size, an upper bound on what the card reports"
    )
    console.print(legend + ("; *: a local GPU" if local else ""))
