#!/usr/bin/env python3
"""Wall time of ``memprof estimate`` end to end (a fresh process each time, Python start-up included).

    python scripts/bench_estimate.py                 # resnet50 x3 per variant + a dozen torchvision names
    python scripts/bench_estimate.py --repeat 5 --out benchmarks/estimate_speed.md
    python scripts/bench_estimate.py --models resnet50 vit_b_16 --variants trace

Each model must exit 0 and print valid ``--json``. Results go to a Markdown file
with the machine they ran on. Targets: resnet50 < 10 s (formula), <= 5 s (traced).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = [
    "resnet50",
    "vit_b_16",
    "convnext_tiny",
    "efficientnet_b0",
    "inception_v3",
    "vit_h_14",
    "mobilenet_v3_small",
    "densenet121",
    "swin_t",
    "regnet_y_400mf",
    "googlenet",
    "maxvit_t",
]
VARIANTS = {
    "formula": ["--no-trace"],  # analytical model only
    "trace": [],  # traced headline, no capacity (no fit)
    "trace+fit": ["--gpu-memory", "24GiB"],  # traced headline and the batch that fits 24 GiB
}


CPU_SECONDS: list[float] = []  # user + sys of each run, less sensitive than wall time to a busy machine


def run(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "memprof", "estimate", *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "100", "PYTHONWARNINGS": "ignore"}
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall, proc


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions() -> str:
    code = "import torch, torchvision; print(torch.__version__, torchvision.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    return f"Python {platform.python_version()}, torch {out[0]}, torchvision {out[1]}" if len(out) == 2 else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of resnet50 per variant")
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--model-variant", default="trace", choices=list(VARIANTS), help="variant for the model list")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "estimate_speed.md")
    opts = ap.parse_args()

    lines = [
        "# `memprof estimate` speed",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `python scripts/bench_estimate.py` on "
        f"{os.cpu_count()} CPU core(s) ({cpu_name()}), no GPU; {versions()}.",
        "Wall time of a fresh `python -m memprof estimate ...` process, Python start-up included, and its CPU "
        "time (user + sys). The machine was shared with other jobs: wall times are noisy upward, CPU times "
        "less so.",
        "",
        "## resnet50 (batch 32, fp32, Adam)",
        "",
        "| variant | options | runs | median wall | min wall | max wall | median CPU | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    failures = 0
    for variant in opts.variants:
        times, cpus = [], []
        for _ in range(opts.repeat):
            secs, proc = run(["resnet50", *VARIANTS[variant]])
            cpus.append(CPU_SECONDS[-1])
            if proc.returncode not in (0, 1):
                print(proc.stderr, file=sys.stderr)
                failures += 1
            times.append(secs)
            print(f"resnet50 {variant}: {secs:.2f} s (exit {proc.returncode})", file=sys.stderr)
        target = "< 10 s" if variant == "formula" else "<= 5 s"
        lines.append(
            f"| {variant} | `{' '.join(VARIANTS[variant]) or '(none)'}` | {len(times)} | "
            f"{statistics.median(times):.2f} s | {min(times):.2f} s | {max(times):.2f} s | "
            f"{statistics.median(cpus):.2f} s | {target} |"
        )

    extra = VARIANTS[opts.model_variant]
    lines += [
        "",
        f"## A dozen torchvision models (`memprof estimate NAME {' '.join(extra)} --json`, default batch 32)",
        "",
        "| model | exit | wall | CPU | parameters | formula | traced peak | headline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in opts.models:
        secs, proc = run([name, *extra, "--json"])
        row = f"| {name} | {proc.returncode} | {secs:.1f} s | {CPU_SECONDS[-1]:.1f} s |"
        try:
            doc = json.loads(proc.stdout)
            a = doc["analytic"]
            traced = doc.get("traced") or {}
            peak = f"{traced['peak_bytes'] / 2**30:.2f} GiB" if traced else (doc.get("trace_note") or "-")
            row += (
                f" {a['param_count']:,} | {a['total_bytes'] / 2**30:.2f} GiB | {peak} | "
                f"{doc['headline_bytes'] / 2**30:.2f} GiB ({doc['headline_source']}) |"
            )
        except (json.JSONDecodeError, KeyError, TypeError):
            row += f" - | - | - | FAILED: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:80]} |"
            failures += 1
        print(row, file=sys.stderr)
        lines.append(row)
    lines += ["", f"{failures} failure(s)." if failures else "All models ran (exit 0, valid JSON)."]
    if load_before is not None:
        lines.append(
            f"1-minute load average: {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
            f"({os.cpu_count()} cores)."
        )
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {opts.out}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
