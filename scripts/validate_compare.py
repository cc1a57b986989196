"""Validate ``memprof compare`` on the CPU: every row's traced prediction (target cpu) vs a real CPU step.

For a few models, runs :func:`memprof.commands.compare.compare` with ``target="cpu"`` and the
real-step measurer that ``memprof compare --measure --device cpu`` uses (find-batch's
CPU runner: two real training steps, live tensor storages counted by a dispatch mode,
parameters, buffers and inputs included). Writes a Markdown table.

    python scripts/validate_compare.py                       # -> benchmarks/compare_cpu.md
    python scripts/validate_compare.py --models resnet18 --out /tmp/x.md
    python scripts/validate_compare.py --summary             # -> benchmarks/compare_models.md

``--summary`` only traces (no measurement): the default comparison (fp32, amp-fp16,
amp-bf16, fp16, checkpointing) of a few torchvision models at batch 32, 224×224, as
predicted for a CUDA step, with the time each row took.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 2**20

#: name -> (model ref, build_workload kwargs, batch)
MODELS = {
    "resnet18": ("resnet18", {"input_shape": ["3,128,128"]}, 16),
    "mobilenet_v3_small": ("mobilenet_v3_small", {"input_shape": ["3,128,128"]}, 32),
    "gpt-small": (
        "memprof.zoo:GPT",
        {
            "model_kwargs": '{"vocab_size": 8192, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 256}',
            "input_shape": ["128"],
        },
        8,
    ),
    "unet": ("memprof.zoo:UNet", {"model_kwargs": '{"base": 16}', "input_shape": ["3,128,128"]}, 4),
}
AXES = {"dtype": ["amp-bf16", "bf16"], "checkpointing": ["blocks"], "inplace_relu": [True], "mode": ["eval"]}
SUMMARY_MODELS = ("resnet50", "vit_b_16", "efficientnet_b0", "convnext_tiny", "densenet121")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--summary", action="store_true", help="trace the default comparison of torchvision models")
    args = ap.parse_args()
    if args.summary:
        return summary(args.out or ROOT / "benchmarks" / "compare_models.md")
    args.out = args.out or ROOT / "benchmarks" / "compare_cpu.md"

    from memprof.cli.common import build_workload
    from memprof.commands.compare import compare, real_step_measurer
    from memprof.render import format_bytes

    measure = real_step_measurer("cpu")
    lines = [
        "# `memprof compare` on the CPU: traced prediction vs a real step",
        "",
        f"Machine: {machine()}.",
        "",
        'Each row: the traced peak (`target="cpu"`, fake tensors, 2 steps, tensor storages only) and the '
        "measured peak of live tensor storages over 2 real training steps on the CPU (find-batch's capped "
        "runner with no cap: `memprof.commands.compare.real_step_measurer`, the code behind `memprof compare --measure "
        "--device cpu`). Both leave out the scratch oneDNN convolutions hold inside the kernel, which a GPU "
        "does not have (`scripts/validate_cpu.py` validates the tracer against the full CPU allocator, scratch "
        "included). Error = (predicted - measured) / measured.",
        "",
        f"Command: `python scripts/validate_compare.py --models {' '.join(args.models)}`",
        "",
        "| model | batch | row | params | activations | predicted peak | measured peak | error | peak at | "
        "trace s | measure s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors: list[float] = []
    for name in args.models:
        ref, kwargs, batch = MODELS[name]
        workload = build_workload(ref, batch_size=batch, **kwargs)
        started = time.perf_counter()
        result = compare(
            workload,
            AXES,
            target="cpu",
            fit=False,
            measure_fn=measure,
            on_progress=lambda i, n, label, name=name: print(f"{name}: [{i}/{n}] {label}", file=sys.stderr),
        )
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        for r in result.rows:
            if r.error is not None:
                lines.append(f"| {name} | {batch} | {r.label} | | | error: {r.error} | | | | | |")
                continue
            m = r.measured
            measured = "OOM" if m.oom else format_bytes(m.peak_bytes)
            err = "n/a" if m.error_pct is None else f"{m.error_pct:+.2f} %"
            if m.error_pct is not None:
                errors.append(abs(m.error_pct))
            where = r.peak_phase + (f" `{r.peak_module}`" if r.peak_module else "")
            lines.append(
                f"| {name} | {batch} | {r.label} | {format_bytes(r.parameter_bytes)} | "
                f"{format_bytes(r.activation_bytes)} | {format_bytes(r.peak_bytes)} | {measured} | {err} | "
                f"{where} | {r.trace_seconds:.2f} | {m.seconds:.2f} |"
            )
    if errors:
        lines += [
            "",
            f"Rows: {len(errors)}; |error| mean {statistics.mean(errors):.2f} %, "
            f"median {statistics.median(errors):.2f} %, max {max(errors):.2f} %.",
        ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


def summary(out: Path) -> int:
    from memprof.cli.common import build_workload
    from memprof.commands.compare import compare
    from memprof.render import format_bytes

    lines = [
        "# What each technique buys: `memprof compare MODEL` (traced, CUDA step, batch 32)",
        "",
        f"Machine (tracing only, no GPU): {machine()}.",
        "",
        "Command: `python scripts/validate_compare.py --summary` (the rows of `memprof compare MODEL -b 32 "
        "--no-fit`). Peak = predicted `torch.cuda.max_memory_allocated()`; activations = saved at the end "
        "of forward; recompute = extra compute of the checkpointed step.",
        "",
        "| model | row | params | grads | optimizer | activations | peak | vs fp32 | recompute | peak at | trace s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SUMMARY_MODELS:
        workload = build_workload(name, batch_size=32)
        result = compare(
            workload,
            fit=False,
            on_progress=lambda i, n, label, name=name: print(f"{name}: [{i}/{n}] {label}", file=sys.stderr),
        )
        for r in result.rows:
            if r.error is not None:
                lines.append(f"| {name} | {r.label} | error: {r.error} | | | | | | | | |")
                continue
            rc = f"+{r.recompute.extra_pct:.0f} %" if r.recompute and r.recompute.extra_pct is not None else ""
            where = r.peak_phase + (f" `{r.peak_module}`" if r.peak_module else "")
            lines.append(
                f"| {name} | {r.label} | {format_bytes(r.parameter_bytes)} | {format_bytes(r.gradient_bytes)} "
                f"| {format_bytes(r.optimizer_state_bytes)} | {format_bytes(r.activation_bytes)} | "
                f"{format_bytes(r.peak_bytes)} | {r.delta_pct:+.1f} % | {rc} | {where} | "
                f"{r.trace_seconds:.1f} |"
            )
        for note in result.notes:
            lines.append(f"| {name} | note: {note} | | | | | | | | | |")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
