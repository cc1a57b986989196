"""Validate the traced CUDA prediction against real CUDA training steps.

For each workload of the CPU zoo (``scripts/validate_cpu.py``) in fp32 and amp-fp16, with SGD
and Adam, and for the CUDA-behaviour cases of issue #17 (:data:`CUDA_CASES`: dropout's byte mask,
CUDA autocast's fp32 softmax and cross-entropy, attention with dropout through the fused kernels,
an explicit padding mask): trace with ``trace_step(workload, target="cuda")`` (fake tensors, the
local GPU's architecture), then run two real training steps on the GPU in a fresh child process
and read

* ``torch.cuda.max_memory_allocated()``  vs the predicted allocated peak (``peak_bytes``),
* ``torch.cuda.max_memory_reserved()``   vs ``predicted_reserved_bytes``,
* NVML's per-process used memory        vs ``predicted_nvml_bytes``.

Writes ``benchmarks/validate_gpu_<device>.md`` and ``.json``. Without CUDA it exits (code 3)
with one line on stderr.

    PYTHONPATH=. python scripts/validate_gpu.py                 # full matrix
    PYTHONPATH=. python scripts/validate_gpu.py --quick         # each case's own optimizer, fp32 + amp-fp16
    PYTHONPATH=. python scripts/validate_gpu.py resnet GPT      # cases whose name contains these
    PYTHONPATH=. python scripts/validate_gpu.py --cuda-cases     # only the CUDA-behaviour cases
    PYTHONPATH=. python scripts/validate_gpu.py --list --gpu-arch sm80   # no GPU: the predictions only
    PYTHONPATH=. python scripts/validate_gpu.py --step-time     # step time: roofline model vs real steps

``--step-time`` times real training steps of a handful of workloads (:data:`STEP_TIME_CASES`:
warm-up steps, then the mean of timed steps between ``torch.cuda.synchronize()`` calls) beside the
roofline lower bound of :func:`memprof.engine.roofline.step_time` for the local GPU's catalog entry,
and writes ``benchmarks/steptime_gpu_<device>.md`` and ``.json``.

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
_TOKENS = {"input_shape": ["512"], "input_dtype": "int64", "token_range": "0,8192"}
_GPT = '{"vocab_size": 8192, "block_size": 512, "n_layer": 4, "n_head": 8, "n_embd": 512, "dropout": %s}'
#: issue #17's cases: where CUDA runs other kernels or autocast rules than the CPU
CUDA_CASES: list[tuple[str, str, dict]] = [
    ("dropout_mlp p=0.1:2048 sgd fp32", "memprof.zoo:dropout_mlp",
     dict(batch_size=2048, input_shape=["1024"], optimizer="sgd", dtype="fp32")),
    ("dropout_mlp p=0:2048 sgd fp32", "memprof.zoo:dropout_mlp",
     dict(batch_size=2048, input_shape=["1024"], optimizer="sgd", dtype="fp32", model_kwargs='{"p": 0.0}')),
    ("SoftmaxAttention T=512:8 adam amp-fp16", "memprof.zoo:SoftmaxAttention",
     dict(batch_size=8, input_shape=["512,256"], optimizer="adam", dtype="amp-fp16")),
    ("GPT LM head:8 adamw amp-fp16", "memprof.zoo:GPT",
     dict(batch_size=8, optimizer="adamw", dtype="amp-fp16", model_kwargs=_GPT % "0.0", **_TOKENS)),
    ("GPT attn dropout 0.1:8 adamw amp-bf16", "memprof.zoo:GPT",
     dict(batch_size=8, optimizer="adamw", dtype="amp-bf16", model_kwargs=_GPT % "0.1", **_TOKENS)),
    ("GPT attn dropout 0.1:8 adamw fp32", "memprof.zoo:GPT",
     dict(batch_size=8, optimizer="adamw", dtype="fp32", model_kwargs=_GPT % "0.1", **_TOKENS)),
    ("PaddedMaskAttention T=512:8 adam amp-bf16", "memprof.zoo:PaddedMaskAttention",
     dict(batch_size=8, input_shape=["512,256"], optimizer="adam", dtype="amp-bf16")),
    ("PaddedMaskAttention dropout T=512:8 adam fp32", "memprof.zoo:PaddedMaskAttention",
     dict(batch_size=8, input_shape=["512,256"], optimizer="adam", dtype="fp32", model_kwargs='{"dropout": 0.1}')),
]  # fmt: skip


def _workload(ref: str, options: dict):
    from memprof.cli.common import build_workload

    return build_workload(ref, **options)


# --------------------------------------------------------------------------- child: one real run
_SDP_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_attention_math": "math",
}


def _AttentionOps(found: set):
    """A dispatch mode noting which fused attention ops run (it allocates no device memory)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name().split("::")[-1].split(".")[0]
            if name in _SDP_OPS:
                found.add(_SDP_OPS[name])
            elif name == "_safe_softmax":  # the math path's composite runs below the dispatch mode as ops
                found.add("math")
            return func(*args, **(kwargs or {}))

    return Mode()


def child(spec_json: str) -> int:
    """Run two real CUDA steps and print one JSON line with the measured numbers."""
    from memprof.engine.measure import measure_cuda_step

    spec = json.loads(spec_json)
    workload = _workload(spec["ref"], spec["options"])
    found: set[str] = set()  # which attention kernel CUDA really ran (the prediction names the one it expects)
    measured = measure_cuda_step(workload, index=0, steps=2, first_step=lambda: _AttentionOps(found))
    measured["sdp_backend"] = ",".join(sorted(found)) or None
    print(json.dumps(measured))
    return 0


# --------------------------------------------------------------------------- parent
def _shard(argv: list[str]) -> tuple[int, int]:
    """``--shard K/N``: the K-th of N interleaved slices of the cases (several runs on one GPU at once)."""
    if "--shard" not in argv:
        return 0, 1
    k, n = argv[argv.index("--shard") + 1].split("/")
    return int(k), int(n)


def _out_dir(argv: list[str]) -> Path:
    """``--out DIR``: where the report goes (default benchmarks/)."""
    return Path(argv[argv.index("--out") + 1]) if "--out" in argv else ROOT / "benchmarks"


def cases(quick: bool, names: list[str], cuda_only: bool = False) -> list[tuple[str, str, dict]]:
    from validate_cpu import ZOO

    out = [case for case in CUDA_CASES if not names or any(n in case[0] for n in names)]
    if cuda_only:
        return out
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


def predictions(quick: bool, names: list[str], cuda_only: bool, gpu_arch: str | None) -> int:
    """The traced predictions alone (no GPU needed): what a GPU run will be compared with."""
    from memprof.engine.catalog import resolve_target
    from memprof.engine.trace import trace_step

    target = resolve_target(gpu_arch=gpu_arch)
    print(f"predicting for {target.arch} ({target.source})")
    print(f"{'workload':46s} {'allocated':>10s} {'reserved':>10s} {'nvml':>10s}  attention / modelled")
    for name, ref, options in cases(quick, names, cuda_only):
        r = trace_step(_workload(ref, options), target="cuda", cuda_target=target)
        attention = ",".join(f"{k}x{v}" for k, v in sorted(r.attention_backends.items())) or "-"
        modelled = ", ".join(f"{m.what} {m.bytes / MiB:.1f}" for m in r.modelled)
        print(
            f"{name:46s} {r.peak_bytes / MiB:10.1f} {(r.predicted_reserved_bytes or 0) / MiB:10.1f} "
            f"{(r.predicted_nvml_bytes or 0) / MiB:10.1f}  {attention}; {modelled}",
            flush=True,
        )
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return child(argv[1])
    if argv[:1] == ["--child-time"]:
        return child_time(argv[1])
    quick = "--quick" in argv
    cuda_only = "--cuda-cases" in argv
    gpu_arch = argv[argv.index("--gpu-arch") + 1] if "--gpu-arch" in argv else None
    valued = ("--gpu-arch", "--shard", "--out")
    names = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] not in valued)]
    shard, shards = _shard(argv)
    out = _out_dir(argv)
    if "--merge" in argv:  # reports of several shards (their JSON files) -> one report
        merged_rows: list[dict] = []
        merged_failures: list[dict] = []
        device = torch_version = None
        for path in names:
            data = json.loads(Path(path).read_text())
            merged_rows += data["rows"]
            merged_failures += data["failures"]
            device, torch_version = data["device"], data["torch"]
        return write_report(merged_rows, merged_failures, device, torch_version or "?", out)
    if "--list" in argv:
        return predictions(quick, names, cuda_only, gpu_arch)
    import torch

    if not torch.cuda.is_available():
        print(
            "validate_gpu: CUDA is not available here (torch.cuda.is_available() is False); "
            "run it on a machine with an NVIDIA GPU",
            file=sys.stderr,
        )
        return 3
    if "--step-time" in argv:
        return step_times(names, out)
    from memprof.engine.trace import trace_step

    rows: list[dict] = []
    failures: list[dict] = []
    device = None
    print(
        f"{'workload':36s} {'alloc meas':>10s} {'pred':>9s} {'err%':>7s} {'resv meas':>10s} {'pred':>9s} "
        f"{'err%':>7s} {'nvml meas':>10s} {'pred':>9s} {'err%':>7s}"
    )
    for index, (name, ref, options) in enumerate(cases(quick, names, cuda_only)):
        if index % shards != shard:
            continue
        try:
            traced = trace_step(_workload(ref, options), target="cuda")  # the local GPU's architecture
            real = measure(ref, options)
        except Exception as exc:
            print(f"{name:36s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            failures.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if real.get("optimizer_steps", 2) < 2:  # GradScaler skipped every step: the peak misses the optimizer
            error = f"the optimizer stepped {real['optimizer_steps']} times in {real['skipped_steps']} steps"
            print(f"{name:36s} FAILED: {error}", flush=True)
            failures.append({"name": name, "error": error})
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
            "arch": traced.cuda_target.arch if traced.cuda_target else None,
            "attention_backends": traced.attention_backends,
            "modelled": [{"what": m.what, "bytes": m.bytes} for m in traced.modelled],
            "sdp_backend_measured": real.get("sdp_backend"),
            "skipped_steps": real.get("skipped_steps", 0),
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
        write_report(rows, failures, device, torch.__version__, out, quiet=True)  # a killed run keeps its rows
    if not rows:
        print("validate_gpu: no workload ran", file=sys.stderr)
        return 1
    return write_report(rows, failures, device, torch.__version__, out)


def write_report(
    rows: list[dict], failures: list[dict], device: str | None, torch_version: str, out: Path, quiet: bool = False
) -> int:
    """benchmarks/validate_gpu_<device>.md and .json from the measured rows."""
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
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Traced CUDA prediction vs real CUDA training steps",
        "",
        f"Device: {device}; torch {torch_version}; generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
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
            {"device": device, "torch": torch_version, "summary": summary, "rows": rows, "failures": failures},
            indent=2,
        )
        + "\n"
    )
    if not quiet:
        for key, s in summary.items():
            print(f"{key}: median |error| {s['median_abs_pct']:.2f} %, max |error| {s['max_abs_pct']:.2f} %")
    return 0


# --------------------------------------------------------------------------- step time: model vs real steps
#: name, model ref, options: convolution and transformer workloads, compute- and memory-bound, fp32 and 16-bit
STEP_TIME_CASES: list[tuple[str, str, dict]] = [
    ("resnet50:64:224 fp32 sgd-momentum", "resnet50", dict(batch_size=64, optimizer="sgd-momentum")),
    ("resnet50:64:224 amp-bf16 adam", "resnet50", dict(batch_size=64, dtype="amp-bf16", optimizer="adam")),
    (
        "resnet50:64:224 amp-bf16 adam, checkpointing blocks",
        "resnet50",
        dict(batch_size=64, dtype="amp-bf16", optimizer="adam", checkpointing="blocks"),
    ),
    ("resnet50:128:224 amp-bf16 adam", "resnet50", dict(batch_size=128, dtype="amp-bf16", optimizer="adam")),
    ("vit_b_16:32:224 amp-bf16 adamw", "vit_b_16", dict(batch_size=32, dtype="amp-bf16", optimizer="adamw")),
    ("mobilenet_v3_small:128:224 fp32 adam", "mobilenet_v3_small", dict(batch_size=128, optimizer="adam")),
    ("gpt2-small:8x1024 amp-bf16 adamw", "configs/gpt2-small.toml", dict(batch_size=8)),
]
WARMUP_STEPS = 3
TIMED_STEPS = 10


def child_time(spec_json: str) -> int:
    """Time real CUDA training steps of one workload; print one JSON line (seconds per step)."""
    import torch

    from memprof.engine.workload import MAX_SKIPPED_STEPS, make_grad_scaler, prepare, train_step, train_steps

    spec = json.loads(spec_json)
    workload = _workload(spec["ref"], spec["options"])
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = False
    prepared = prepare(workload, "cuda")
    scaler = make_grad_scaler(workload, "cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # cuDNN/cuBLAS heuristics, the caching allocator's segments, optimizer state: warm-up steps in which the
    # optimizer really stepped (GradScaler skips its first steps while it lowers its loss scale)
    skipped = train_steps(prepared, WARMUP_STEPS, scaler)
    if skipped > MAX_SKIPPED_STEPS:
        print(f"child_time: GradScaler skipped {skipped} warm-up steps (inf/nan gradients)", file=sys.stderr)
        return 1
    torch.cuda.synchronize()
    times = []
    timed_skipped = 0
    for _ in range(TIMED_STEPS):
        started = time.perf_counter()
        timed_skipped += not train_step(prepared, scaler=scaler)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    print(
        json.dumps(
            {
                "mean_s": statistics.fmean(times),
                "median_s": statistics.median(times),
                "min_s": min(times),
                "allocated_bytes": torch.cuda.max_memory_allocated(),
                "reserved_bytes": torch.cuda.max_memory_reserved(),
                "device": torch.cuda.get_device_name(),
                "warmup_skipped_steps": skipped,
                "timed_skipped_steps": timed_skipped,
            }
        )
    )
    return 0


def _catalog_entry(device_name: str):
    """The GPU catalog's entry for the local device (``memprof.engine.catalog``), or (None, why not)."""
    try:
        from memprof.engine import catalog
    except ImportError:
        return None, "this memprof has no GPU catalog (memprof.engine.catalog)"
    entry = catalog.match_device(device_name)
    if entry is None:
        return None, f"no catalog entry matches {device_name!r}: add it to configs/gpus.toml"
    return entry, None


def step_times(names: list[str], out: Path) -> int:
    """Roofline lower bound vs measured step time for :data:`STEP_TIME_CASES`; writes benchmarks/steptime_gpu_*."""
    import torch

    from memprof.engine.roofline import step_time, tokens_per_sample
    from memprof.engine.trace import trace_step

    device = torch.cuda.get_device_name()
    gpu, why = _catalog_entry(device)
    if gpu is None:
        print(f"validate_gpu --step-time: {why}", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows, failures = [], []
    print(f"{'workload':52s} {'measured ms':>11s} {'bound ms':>9s} {'meas/bound':>10s} {'compute-bound %':>15s}")
    for name, ref, options in STEP_TIME_CASES:
        if names and not any(n in name for n in names):
            continue
        try:
            workload = _workload(ref, options)
            traced = trace_step(workload, target="cuda", count_bytes=True)
            model = step_time(traced, gpu, tokens=tokens_per_sample(workload))
            spec = json.dumps({"ref": ref, "options": options})
            proc = subprocess.run(
                [sys.executable, __file__, "--child-time", spec],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                timeout=900,
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError("child failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
            real = json.loads(lines[-1])
        except Exception as exc:
            print(f"{name:52s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            failures.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        assert traced.flops is not None  # trace_step counts FLOPs by default
        row = {
            "name": name,
            "model": ref,
            "options": options,
            "batch_size": workload.batch_size,
            "step_flops": traced.flops.step_flops,
            "recompute_flops": traced.flops.recompute_flops,
            "predicted_lower_bound_s": model.seconds,
            "predicted_compute_bound_s": model.compute_bound_seconds,
            "predicted_step_bytes": model.step_bytes,
            "measured_mean_s": real["mean_s"],
            "measured_median_s": real["median_s"],
            "measured_min_s": real["min_s"],
            "ratio": real["mean_s"] / model.seconds if model.seconds else None,
            "measured_samples_per_s": workload.batch_size / real["mean_s"],
            "predicted_max_samples_per_s": model.samples_per_second,
            "achieved_tflops": traced.flops.step_flops / real["mean_s"] / 1e12,
            "bound_holds": model.seconds <= real["min_s"],
            # the same steps' memory (realistic sizes, beside the small cases of the memory matrix)
            "allocated_bytes": real.get("allocated_bytes"),
            "predicted_allocated_bytes": traced.peak_bytes,
            "allocated_error_pct": pct(traced.peak_bytes, real.get("allocated_bytes")),
            "reserved_bytes": real.get("reserved_bytes"),
            "predicted_reserved_bytes": traced.predicted_reserved_bytes,
            "reserved_error_pct": pct(traced.predicted_reserved_bytes, real.get("reserved_bytes")),
        }
        rows.append(row)
        share = 100.0 * model.compute_bound_seconds / model.seconds if model.seconds else 0.0
        print(
            f"{name:52s} {real['mean_s'] * 1e3:11.2f} {model.seconds * 1e3:9.2f} {row['ratio']:10.2f} {share:15.0f}",
            flush=True,
        )
        _write_step_times(rows, failures, device, gpu, out)  # a killed run keeps its rows
    if not rows:
        print("validate_gpu --step-time: no workload ran", file=sys.stderr)
        return 1
    _write_step_times(rows, failures, device, gpu, out)
    return 0


def _write_step_times(rows: list[dict], failures: list[dict], device: str, gpu, out: Path) -> None:
    import torch

    slug = "".join(c if c.isalnum() else "_" for c in device).strip("_").lower()
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Step time: roofline model (lower bound) vs real CUDA training steps",
        "",
        f"Device: {device} (catalog entry `{getattr(gpu, 'key', gpu.name)}`); torch {torch.__version__}; generated "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `PYTHONPATH=. python scripts/validate_gpu.py "
        "--step-time`.",
        "",
        f"Measured: {WARMUP_STEPS} warm-up steps, then the mean of {TIMED_STEPS} steps, each timed between "
        "`torch.cuda.synchronize()` calls (PyTorch defaults: cudnn.benchmark off, TF32 for convolutions only).",
        "Model: `memprof.engine.roofline.step_time` on the traced step: per op max(FLOPs / peak, bytes / bandwidth).",
        "The model is a lower bound: measured / bound ≥ 1 is expected; the gap is what the model leaves out",
        "(kernels below peak, launch latency, CPU overhead).",
        "",
        "| workload | measured ms | lower bound ms | measured / bound | samples/s measured | samples/s bound "
        "| achieved TFLOP/s | step TFLOP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['measured_mean_s'] * 1e3:.2f} | {r['predicted_lower_bound_s'] * 1e3:.2f} | "
            f"{r['ratio']:.2f} | {r['measured_samples_per_s']:,.0f} | {r['predicted_max_samples_per_s']:,.0f} | "
            f"{r['achieved_tflops']:.1f} | {r['step_flops'] / 1e12:.3f} |"
        )
    lines.append("")
    broken = [r["name"] for r in rows if not r["bound_holds"]]
    lines.append(
        "- the lower bound held for every workload"
        if not broken
        else f"- the lower bound was BROKEN (fastest measured step below it) for: {', '.join(broken)}"
    )
    lines += [
        "",
        "Memory of the same steps (peaks over the warm-up and timed steps) against the traced prediction:",
        "",
        "| workload | allocated MiB | pred | err % | reserved MiB | pred | err % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("allocated_bytes") is None:
            continue
        lines.append(
            f"| {r['name']} | {r['allocated_bytes'] / MiB:.1f} | {r['predicted_allocated_bytes'] / MiB:.1f} | "
            f"{r['allocated_error_pct']:+.2f} | {r['reserved_bytes'] / MiB:.1f} | "
            f"{(r['predicted_reserved_bytes'] or 0) / MiB:.1f} | {r['reserved_error_pct'] or 0:+.2f} |"
        )
    lines.append("")
    for fail in failures:
        lines.append(f"- FAILED {fail['name']}: {fail['error']}")
    (out / f"steptime_gpu_{slug}.md").write_text("\n".join(lines) + "\n")
    (out / f"steptime_gpu_{slug}.json").write_text(
        json.dumps({"device": device, "torch": torch.__version__, "rows": rows, "failures": failures}, indent=2) + "\n"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
