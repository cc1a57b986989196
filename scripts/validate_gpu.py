"""Validate the traced CUDA prediction against real CUDA training steps.

For each workload of the CPU zoo (``scripts/validate_cpu.py``) in fp32 and amp-fp16, with SGD
and Adam: trace with ``trace_step(workload, target="cuda")`` (fake tensors), then run two real
training steps on the GPU in a fresh child process and read

* ``torch.cuda.max_memory_allocated()``  vs the predicted allocated peak (``peak_bytes``),
* ``torch.cuda.max_memory_reserved()``   vs ``predicted_reserved_bytes``,
* NVML's per-process used memory        vs ``predicted_nvml_bytes``.

Writes ``benchmarks/validate_gpu_<device>.md`` and ``.json``. Without CUDA it exits (code 3)
with one line on stderr.

    PYTHONPATH=. python scripts/validate_gpu.py                 # full matrix
    PYTHONPATH=. python scripts/validate_gpu.py --quick         # each case's own optimizer, fp32 + amp-fp16
    PYTHONPATH=. python scripts/validate_gpu.py resnet GPT      # cases whose name contains these

Works with torch >= 2.1 (GradScaler falls back to torch.cuda.amp on older versions).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 1024 * 1024
PRECISIONS = ("fp32", "amp-fp16")
OPTIMIZERS = ("sgd", "adam")


def _workload(ref: str, options: dict):
    from memprof.cli.common import build_workload

    return build_workload(ref, **options)


# --------------------------------------------------------------------------- child: one real run
def child(spec_json: str) -> int:
    """Run two real CUDA steps and print one JSON line with the measured numbers."""
    from memprof.engine.measure import measure_cuda_step

    spec = json.loads(spec_json)
    workload = _workload(spec["ref"], spec["options"])
    print(json.dumps(measure_cuda_step(workload, index=0, steps=2)))
    return 0


# --------------------------------------------------------------------------- parent
def cases(quick: bool, names: list[str]) -> list[tuple[str, str, dict]]:
    from validate_cpu import ZOO

    out = []
    for name, ref, options in ZOO:
        if names and not any(n in name for n in names):
            continue
        if options.get("mode") == "eval" or "dtype" in options:
            continue  # eval and the CPU's bf16 cases: the matrix below covers precisions
        base = name.split(" ")[0] if " " in name else name
        optimizers = (options.get("optimizer", "adam"),) if quick else OPTIMIZERS
        for precision in PRECISIONS:
            for optimizer in optimizers:
                opts = dict(options, dtype=precision, optimizer=optimizer)
                out.append((f"{base} {optimizer} {precision}", ref, opts))
    return out


def measure(ref: str, options: dict) -> dict:
    spec = json.dumps({"ref": ref, "options": options})
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"child failed: {tail}")
    return json.loads(lines[-1])


def pct(pred: int | None, meas: int | None) -> float | None:
    if pred is None or not meas:
        return None
    return 100.0 * (pred - meas) / meas


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return child(argv[1])
    import torch

    if not torch.cuda.is_available():
        print(
            "validate_gpu: CUDA is not available here (torch.cuda.is_available() is False); "
            "run it on a machine with an NVIDIA GPU",
            file=sys.stderr,
        )
        return 3
    from memprof.engine.trace import trace_step

    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("--")]
    rows: list[dict] = []
    failures: list[dict] = []
    device = None
    print(
        f"{'workload':36s} {'alloc meas':>10s} {'pred':>9s} {'err%':>7s} {'resv meas':>10s} {'pred':>9s} "
        f"{'err%':>7s} {'nvml meas':>10s} {'pred':>9s} {'err%':>7s}"
    )
    for name, ref, options in cases(quick, names):
        try:
            traced = trace_step(_workload(ref, options), target="cuda")
            real = measure(ref, options)
        except Exception as exc:
            print(f"{name:36s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            failures.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        device = real["device"]
        row = {
            "name": name,
            "model": ref,
            "options": options,
            "allocated_bytes": real["allocated_bytes"],
            "predicted_allocated_bytes": traced.peak_bytes,
            "reserved_bytes": real["reserved_bytes"],
            "predicted_reserved_bytes": traced.predicted_reserved_bytes,
            "nvml_bytes": real["nvml_bytes"],
            "predicted_nvml_bytes": traced.predicted_nvml_bytes,
            "trace_seconds": traced.trace_seconds,
        }
        row["allocated_error_pct"] = pct(traced.peak_bytes, real["allocated_bytes"])
        row["reserved_error_pct"] = pct(traced.predicted_reserved_bytes, real["reserved_bytes"])
        row["nvml_error_pct"] = pct(traced.predicted_nvml_bytes, real["nvml_bytes"])
        rows.append(row)

        def f(v):
            return f"{v / MiB:10.1f}" if v is not None else f"{'-':>10s}"

        def e(v):
            return f"{v:+7.2f}" if v is not None else f"{'-':>7s}"

        print(
            f"{name:36s} {f(row['allocated_bytes'])} {f(row['predicted_allocated_bytes'])[1:]} "
            f"{e(row['allocated_error_pct'])} {f(row['reserved_bytes'])} {f(row['predicted_reserved_bytes'])[1:]} "
            f"{e(row['reserved_error_pct'])} {f(row['nvml_bytes'])} {f(row['predicted_nvml_bytes'])[1:]} "
            f"{e(row['nvml_error_pct'])}",
            flush=True,
        )
    if not rows:
        print("validate_gpu: no workload ran", file=sys.stderr)
        return 1
    summary = {}
    for key in ("allocated", "reserved", "nvml"):
        errs = [r[f"{key}_error_pct"] for r in rows if r[f"{key}_error_pct"] is not None]
        if errs:
            summary[key] = {
                "median_abs_pct": statistics.median(abs(x) for x in errs),
                "max_abs_pct": max(abs(x) for x in errs),
                "min_pct": min(errs),
                "max_pct": max(errs),
            }
    slug = "".join(c if c.isalnum() else "_" for c in (device or "gpu")).strip("_").lower()
    out = ROOT / "benchmarks"
    out.mkdir(exist_ok=True)
    lines = [
        "# Traced CUDA prediction vs real CUDA training steps",
        "",
        f"Device: {device}; torch {torch.__version__}; generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        "by `PYTHONPATH=. python scripts/validate_gpu.py`.",
        "",
        "Measured in a fresh process per workload after `empty_cache()` + `reset_peak_memory_stats()`, two steps;",
        "NVML = the process's used memory after the steps. Error = (predicted − measured) / measured.",
        "",
        "| workload | allocated MiB | pred | err % | reserved MiB | pred | err % | NVML MiB | pred | err % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def mib(v):
        return f"{v / MiB:.1f}" if v is not None else "–"

    def pc(v):
        return f"{v:+.2f}" if v is not None else "–"

    for r in rows:
        lines.append(
            f"| {r['name']} | {mib(r['allocated_bytes'])} | {mib(r['predicted_allocated_bytes'])} | "
            f"{pc(r['allocated_error_pct'])} | {mib(r['reserved_bytes'])} | {mib(r['predicted_reserved_bytes'])} | "
            f"{pc(r['reserved_error_pct'])} | {mib(r['nvml_bytes'])} | {mib(r['predicted_nvml_bytes'])} | "
            f"{pc(r['nvml_error_pct'])} |"
        )
    lines.append("")
    for key, s in summary.items():
        lines.append(
            f"- {key}: median |error| {s['median_abs_pct']:.2f} %, max |error| {s['max_abs_pct']:.2f} % "
            f"(range {s['min_pct']:+.2f} … {s['max_pct']:+.2f} %)"
        )
    for fail in failures:
        lines.append(f"- FAILED {fail['name']}: {fail['error']}")
    (out / f"validate_gpu_{slug}.md").write_text("\n".join(lines) + "\n")
    (out / f"validate_gpu_{slug}.json").write_text(
        json.dumps(
            {"device": device, "torch": torch.__version__, "summary": summary, "rows": rows, "failures": failures},
            indent=2,
        )
        + "\n"
    )
    for key, s in summary.items():
        print(f"{key}: median |error| {s['median_abs_pct']:.2f} %, max |error| {s['max_abs_pct']:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
