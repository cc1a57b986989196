"""Where a traced CUDA prediction and a real CUDA step differ, allocation by allocation.

For each selected case of ``scripts/validate_gpu.py`` (memory matrix, CUDA cases and the realistic
step-time cases), trace the step on fake tensors (recording every predicted allocation with the
caching allocator's rounding) and run the real step on the GPU in a child process under
``torch.cuda.memory._record_memory_history`` (Python stacks). Then compare:

* the blocks live at each side's allocated peak, as multisets of block sizes: what the real
  peak holds that the prediction does not (with the Python frame that allocated it), and back;
* every allocation of the run, as multisets of sizes (allocations the trace never makes).

With a GradScaler (amp-fp16) the real run keeps stepping until the optimizer has really stepped
twice (GradScaler skips ``optimizer.step()`` while the scaled gradients overflow, and a skipped
step creates no optimizer state); the number of skipped steps is reported.

    PYTHONPATH=. python scripts/diagnose_gpu.py mnist_mlp "seed004_convstack:2:128 sgd fp32"
    PYTHONPATH=. python scripts/diagnose_gpu.py --amp          # every amp-fp16 case of the quick matrix
    PYTHONPATH=. python scripts/diagnose_gpu.py --out DIR ...  # one JSON per case in DIR

Needs CUDA (exit 3 without it).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 1024 * 1024
MAX_STEPS = 12


def _all_cases() -> list[tuple[str, str, dict]]:
    from validate_gpu import STEP_TIME_CASES, cases

    return cases(True, []) + list(STEP_TIME_CASES)


def _frame(frames: list[dict]) -> str:
    """The most telling Python frame: the first outside torch's own files, else the first."""
    for f in frames:
        name = f.get("filename", "")
        if "/torch/" not in name and "<" not in name:
            return f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}"
    if frames:
        f = frames[0]
        return f"{os.path.basename(f.get('filename', '?'))}:{f.get('line')} {f.get('name')}"
    return "?"


def _torch_frame(frames: list[dict]) -> str:
    if os.environ.get("DIAG_STACKS") == "all":  # C++ frames too: the ATen/cuDNN/cuBLAS functions that allocated
        keep = ("at::native", "at::cuda", "cudnn", "cublas", "Blas", "autograd", "at::_ops")
        names = [f.get("name", "") for f in frames if any(k in f.get("name", "") for k in keep)]
        if names:
            return " < ".join(n[:70] for n in names[:4])
    for f in frames:
        name = f.get("filename", "")
        if "/torch/" in name:
            return f"{name.split('/torch/')[-1]}:{f.get('line')} {f.get('name')}"
    return "-"


# --------------------------------------------------------------------------- child: the real steps
def child(spec_json: str) -> int:
    import torch
    from validate_gpu import _workload

    from memprof.engine.workload import prepare, train_step

    spec = json.loads(spec_json)
    workload = _workload(spec["ref"], spec["options"])
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = False
    prepared = prepare(workload, "cuda")
    scaler = None
    if workload.precision.grad_scaler and workload.mode == "train":
        scaler = torch.amp.GradScaler("cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks=os.environ.get("DIAG_STACKS", "python"))
    stepped = skipped = steps = 0
    while steps < MAX_STEPS:
        before = scaler.get_scale() if scaler is not None else None
        train_step(prepared, scaler=scaler)
        torch.cuda.synchronize()
        steps += 1
        if scaler is not None and scaler.get_scale() < before:
            skipped += 1
        else:
            stepped += 1
        if stepped >= 2:
            break
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][0] if snap.get("device_traces") else []
    live: dict[int, tuple[int, str, str]] = {}
    cur = peak = 0
    peak_live: list[tuple[int, str, str]] = []
    allocs: list[tuple[int, str, str]] = []
    for e in trace:
        action = e.get("action")
        if action == "alloc":
            item = (e["size"], _frame(e.get("frames", [])), _torch_frame(e.get("frames", [])))
            live[e["addr"]] = item
            allocs.append(item)
            cur += e["size"]
            if cur > peak:
                peak = cur
                peak_live = list(live.values())
        elif action in ("free_requested",):
            item = live.pop(e["addr"], None)
            if item is not None:
                cur -= item[0]
    print(
        json.dumps(
            {
                "allocated_bytes": torch.cuda.max_memory_allocated(),
                "reserved_bytes": torch.cuda.max_memory_reserved(),
                "snapshot_peak_bytes": peak,
                "steps": steps,
                "skipped_steps": skipped,
                "peak_live": peak_live,
                "allocs": allocs,
                "device": torch.cuda.get_device_name(),
            }
        )
    )
    return 0


# --------------------------------------------------------------------------- parent: trace and compare
def predicted(ref: str, options: dict) -> dict:
    """The traced step with each allocation's rounded size: all allocations, and those live at the peak."""
    from validate_gpu import _workload

    from memprof.engine import trace as trace_mod

    captured: dict = {}
    original = trace_mod._analyse

    def spy(rec, *args, **kwargs):
        result = original(rec, *args, **kwargs)
        captured["rec"] = rec
        return result

    trace_mod._analyse = spy
    try:
        r = trace_mod.trace_step(_workload(ref, options), target="cuda")
    finally:
        trace_mod._analyse = original
    rec = captured["rec"]
    from memprof.engine.allocator import CachingAllocatorModel, conf_from_source

    alloc = CachingAllocatorModel(conf_from_source(None), None)
    live: dict[int, tuple[int, str, str]] = {}
    cur = peak = 0
    peak_live: list = []
    allocs: list = []
    for r_, sign, _op, phase, module, _step in rec.events:
        nbytes = 0 if rec.rec_host[r_] else rec.rec_nbytes[r_]
        if not nbytes:
            continue
        if sign > 0:
            size = alloc.malloc(r_, nbytes)
            kind = rec.rec_kind[r_]
            item = (size, f"{phase}/{module or '-'}", kind.what if kind is not None else str(rec.rec_cat[r_]))
            live[r_] = item
            allocs.append(item)
            cur = alloc.allocated_bytes
            if cur > peak:
                peak = cur
                peak_live = list(live.values())
        else:
            alloc.free(r_)
            live.pop(r_, None)
            cur = alloc.allocated_bytes
    return {"peak_bytes": r.peak_bytes, "replayed_peak": peak, "peak_live": peak_live, "allocs": allocs}


def _diff(a: list, b: list) -> list[tuple[int, int, str]]:
    """Sizes in ``a`` beyond those in ``b``: (size, extra count, an example label from a)."""
    ca = collections.Counter(x[0] for x in a)
    cb = collections.Counter(x[0] for x in b)
    label = {}
    for x in a:
        label.setdefault(x[0], f"{x[1]} | {x[2]}")
    out = [(size, n - cb.get(size, 0), label[size]) for size, n in ca.items() if n > cb.get(size, 0)]
    return sorted(out, key=lambda t: -t[0] * t[1])


def _lines(diff: list[tuple[int, int, str]], top: int = 8) -> list[str]:
    return [f"    {size / MiB:9.3f} x{n}: {where}" for size, n, where in diff[:top]]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return child(argv[1])
    import torch

    if not torch.cuda.is_available():
        print("diagnose_gpu: CUDA is not available here; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 3
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    shard, shards = 0, 1
    if "--shard" in argv:
        k, n = argv[argv.index("--shard") + 1].split("/")
        shard, shards = int(k), int(n)
    valued = ("--out", "--shard")
    names = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] not in valued)]
    selected = [
        c
        for c in _all_cases()
        if (not names or any(n in c[0] for n in names)) and ("--amp" not in argv or "amp-fp16" in c[0])
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for index, (name, ref, options) in enumerate(selected):
        if index % shards != shard:
            continue
        try:
            pred = predicted(ref, options)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps({"ref": ref, "options": options})],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                timeout=300,
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError("child failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
            real = json.loads(lines[-1])
        except Exception as exc:
            print(f"== {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        err = 100.0 * (pred["peak_bytes"] - real["allocated_bytes"]) / real["allocated_bytes"]
        report = [
            f"== {name}: allocated {real['allocated_bytes'] / MiB:.2f} MiB measured ({real['steps']} steps, "
            f"{real['skipped_steps']} skipped by GradScaler), {pred['peak_bytes'] / MiB:.2f} predicted ({err:+.2f} %)",
            "  live at the real peak, not at the predicted one (size MiB x count: where):",
        ]
        report += _lines(_diff(real["peak_live"], pred["peak_live"]))
        report.append("  live at the predicted peak, not at the real one:")
        report += _lines(_diff(pred["peak_live"], real["peak_live"]))
        report.append("  allocated in the real run, never in the trace (all steps):")
        report += _lines(_diff(real["allocs"], pred["allocs"]))
        print("\n".join(report), flush=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            slug = "".join(c if c.isalnum() else "_" for c in name)[:80]
            real.pop("allocs")
            pred.pop("allocs")
            (out / f"{slug}.json").write_text(json.dumps({"name": name, "real": real, "predicted": pred}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
