"""``memprof gpus`` for people."""

from __future__ import annotations

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
    else:
        console.print(f"NVML: not available ({s.reason})")
    if t.cuda_available:
        names = ", ".join(
            f"cuda:{d.index} {d.name} ({format_bytes(d.total_bytes)}, sm {d.capability})" for d in t.devices
        )
        console.print(f"torch sees {t.device_count} device{'s' if t.device_count != 1 else ''}: {names}")
    else:
        console.print(f"torch sees no CUDA device: {t.reason}")


def _proc(p) -> str:
    name = p.name or "?"
    return f"{p.pid} {name[:40]}"
