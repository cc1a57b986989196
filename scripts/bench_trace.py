"""How long the traced estimate takes: torchvision classifiers at batch 64, 224x224, Adam, two steps.

    PYTHONPATH=. python scripts/bench_trace.py            # all models, writes benchmarks/trace_speed.md
    PYTHONPATH=. python scripts/bench_trace.py resnet50   # some of them (prints only)
    PYTHONPATH=. python scripts/bench_trace.py --flops    # what counting FLOPs (and bytes) costs a trace,
                                                          # writes benchmarks/trace_flops_overhead.md

Each model is traced ``REPEATS`` times (target "cuda", the default of ``memprof estimate``); the table
gives the best and the median wall time of ``trace_step`` (model construction on fake tensors
included) and the number of dispatched ops. End to end, ``memprof estimate resnet50`` is timed
as a subprocess (interpreter start-up and imports included).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "convnext_tiny",
    "vit_b_16",
    "vgg16",
    "regnet_y_400mf",
    "swin_t",
]
BATCH = 64
REPEATS = 3


def bench(name: str) -> dict:
    from memprof.cli.common import build_workload
    from memprof.engine.trace import trace_step

    workload = build_workload(name, batch_size=BATCH, optimizer="adam")
    trace_step(workload.with_batch(1), target="cuda", steps=1)  # first use of the model's ops
    times, cpu_times = [], []
    result = None
    for _ in range(REPEATS):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = trace_step(workload, target="cuda")
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return {
        "model": name,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "cpu_s": min(cpu_times),
        "ops": result.op_count,
        "peak_gib": result.peak_bytes / 2**30,
    }


def end_to_end() -> float | None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "memprof", "estimate", "resnet50"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    return elapsed if proc.returncode == 0 else None


GPT7B = """
import resource, sys, time
sys.path.insert(0, {root!r})
from memprof.cli.common import build_workload
from memprof.engine.trace import trace_step
w = build_workload("configs/gpt-7b.toml")
t = time.perf_counter()
r = trace_step(w, target="cuda")
print(time.perf_counter() - t, r.peak_bytes, r.predicted_nvml_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


COLD = """
import sys, time
sys.path.insert(0, {root!r})
from memprof.cli.common import build_workload
from memprof.engine.trace import trace_step
w = build_workload({name!r}, batch_size={batch}, optimizer="adam")
t = time.perf_counter()
trace_step(w, target="cuda")
print(time.perf_counter() - t)
"""


def cold(name: str, fast: bool = True) -> float | None:
    """The first trace in a fresh process (what one CLI call pays): imports excluded, first-use costs included.

    ``fast=False`` runs it with memprof's fast fake-tensor layer off (``MEMPROF_FAST_FAKE=0``), for comparison.
    """
    env = dict(os.environ, MEMPROF_FAST_FAKE="1" if fast else "0")
    proc = subprocess.run(
        [sys.executable, "-c", COLD.format(root=str(ROOT), name=name, batch=BATCH)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    return float(proc.stdout.split()[-1]) if proc.returncode == 0 else None


def _s(seconds: float | None) -> str:
    return "failed" if seconds is None else f"{seconds:.2f}"


def gpt_7b() -> dict | None:
    """Trace configs/gpt-7b.toml (7.3 B parameters, bf16, AdamW) in a fresh process: time and peak RSS."""
    proc = subprocess.run(
        [sys.executable, "-c", GPT7B.format(root=str(ROOT))], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    seconds, peak, nvml, rss_kib = proc.stdout.split()[-4:]
    return {
        "seconds": float(seconds),
        "peak_gib": int(peak) / 2**30,
        "nvml_gib": int(nvml) / 2**30,
        "rss_mib": int(rss_kib) / 1024,
    }


FLOP_MODES = {"off": dict(count_flops=False), "FLOPs": dict(), "FLOPs + bytes": dict(count_bytes=True)}
FLOP_ROUNDS = 5


def flops_overhead(names: list[str]) -> int:
    """Traces with FLOP counting off, on, and on with bytes (the step-time model's input), alternated in
    one process round by round so that load from other jobs hits every mode alike; best CPU time of each."""
    import torch

    from memprof.cli.common import build_workload
    from memprof.engine.trace import trace_step

    models = [m for m in MODELS if not names or m in names]
    load_before = os.getloadavg()[0]
    rows = []
    for name in models:
        workload = build_workload(name, batch_size=BATCH, optimizer="adam")
        trace_step(workload.with_batch(1), target="cuda", steps=1)
        cpu: dict[str, list[float]] = {mode: [] for mode in FLOP_MODES}
        order = list(FLOP_MODES)
        for i in range(FLOP_ROUNDS):
            for mode in order[i % len(order) :] + order[: i % len(order)]:  # rotate which mode goes first
                started = time.process_time()
                trace_step(workload, target="cuda", **FLOP_MODES[mode])
                cpu[mode].append(time.process_time() - started)
        best = {mode: min(times) for mode, times in cpu.items()}
        rows.append((name, best))
        off = best["off"]
        print(
            f"{name:22s} " + "  ".join(f"{mode} {t:.3f} s ({100 * (t / off - 1):+.1f} %)" for mode, t in best.items()),
            flush=True,
        )
    lines = [
        "# What counting FLOPs costs a trace",
        "",
        'Generated by `PYTHONPATH=. python scripts/bench_trace.py --flops`: `trace_step(workload, target="cuda")` '
        f"at batch {BATCH}, 224×224, Adam, with FLOP counting off (`count_flops=False`), on (the default) and on "
        "with bytes moved per op (`count_bytes=True`, what the step-time model needs); the three alternate within "
        f"each of {FLOP_ROUNDS} rounds (rotating which goes first), best process CPU time of each.",
        "",
        f"Machine: {os.cpu_count()} cores, shared with other jobs while measured (1-minute load average "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); torch {torch.__version__}.",
        "",
        "| model | off s | FLOPs s | overhead | FLOPs + bytes s | overhead |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, best in rows:
        off = best["off"]
        lines.append(
            f"| {name} | {off:.3f} | {best['FLOPs']:.3f} | {100 * (best['FLOPs'] / off - 1):+.1f} % | "
            f"{best['FLOPs + bytes']:.3f} | {100 * (best['FLOPs + bytes'] / off - 1):+.1f} % |"
        )
    if not names:
        (ROOT / "benchmarks" / "trace_flops_overhead.md").write_text("\n".join(lines) + "\n")
    return 0


def main(argv: list[str]) -> int:
    import torch

    if "--flops" in argv:
        return flops_overhead([a for a in argv if not a.startswith("--")])
    models = [m for m in MODELS if not argv or m in argv]
    load_before = os.getloadavg()[0]
    rows = []
    for name in models:
        row = bench(name)
        row["cold_s"] = cold(name)
        row["cold_slow_s"] = cold(name, fast=False)
        rows.append(row)
        print(
            f"{name:22s} best {row['best_s']:.2f} s  median {row['median_s']:.2f} s  cpu {row['cpu_s']:.2f} s  "
            f"first trace {_s(row['cold_s'])} (without the fast layer {_s(row['cold_slow_s'])})  "
            f"{row['ops']:6d} ops  peak {row['peak_gib']:.2f} GiB",
            flush=True,
        )
    e2e = [end_to_end() for _ in range(2)] if not argv else []
    e2e = [t for t in e2e if t is not None]
    if e2e:
        print(f"memprof estimate resnet50 (end to end): best {min(e2e):.2f} s")
    big = gpt_7b() if not argv else None
    if big:
        print(
            f"gpt-7b: trace {big['seconds']:.1f} s, peak RSS {big['rss_mib']:.0f} MiB, predicted allocated "
            f"{big['peak_gib']:.1f} GiB, NVML {big['nvml_gib']:.1f} GiB"
        )
    if argv:
        return 0
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    lines = [
        "# Trace speed",
        "",
        'Generated by `PYTHONPATH=. python scripts/bench_trace.py`: `trace_step(workload, target="cuda")`,',
        f"two training steps (Adam) at batch {BATCH}, 224×224, model construction on fake tensors included;",
        f"best and median wall time of {REPEATS} runs after one warm-up trace, the best process CPU time",
        "(less sensitive to other jobs on the machine), and the **first trace in a fresh process** (imports",
        "excluded): what one `memprof estimate` call pays, since the caches (FakeTensorMode's and memprof's",
        "fast layer, `memprof/fastfake.py`) start empty. The last column is that first trace with the fast",
        "layer off (`MEMPROF_FAST_FAKE=0`): PyTorch's FakeTensorMode alone.",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, shared with other jobs while measured (1-minute load average "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); torch {torch.__version__}.",
        "",
        "| model | best wall s | median wall s | best CPU s | first trace s | first trace, fast layer off s "
        "| ops | predicted peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['best_s']:.2f} | {r['median_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{_s(r['cold_s'])} | {_s(r['cold_slow_s'])} | {r['ops']} | {r['peak_gib']:.2f} |"
        )
    if e2e:
        lines += [
            "",
            f"`memprof estimate resnet50` end to end (new process, imports included): "
            f"best of {len(e2e)} {min(e2e):.2f} s.",
        ]
    if big:
        lines += [
            "",
            f"`configs/gpt-7b.toml` (7.3 B parameters, bf16, AdamW, batch 1 × 2048 tokens), fresh process: "
            f"trace {big['seconds']:.1f} s, **peak RSS {big['rss_mib']:.0f} MiB** (limit 2 GiB); predicted "
            f"max allocated {big['peak_gib']:.1f} GiB, NVML {big['nvml_gib']:.1f} GiB.",
        ]
    (ROOT / "benchmarks").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "trace_speed.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
