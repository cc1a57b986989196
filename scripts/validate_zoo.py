"""Validate memprof's CPU predictions against REAL CPU training steps, over a zoo of 50+ workloads.

For each workload: ``trace_step(workload, target="cpu")`` (fake tensors; a step that reads tensor
values runs for real on the CPU instead, recorded the same way - the table says which), then two
real steps measured independently of memprof's tracker
(:func:`memprof.engine.measure.measure_cpu_step`: torch.profiler memory events, oneDNN scratch
included, plus the storages resident before the first step). Supersedes ``validate_cpu.py``
(its 20 workloads are the CNN/seed/GPT rows here). Writes ``benchmarks/validate_zoo.md`` and
``benchmarks/validate_zoo.json``.

    PYTHONPATH=. python scripts/validate_zoo.py              # the whole zoo (about 20 min on 2 cores)
    PYTHONPATH=. python scripts/validate_zoo.py lstm gru     # cases whose name contains "lstm" or "gru"
    PYTHONPATH=. python scripts/validate_zoo.py --family recurrent

Targets: median |error| <= 0.5 %, max |error| <= 2 %.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
MEDIAN_TARGET, MAX_TARGET = 0.5, 2.0
HF = "scripts/zoo_hf.py"


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    ref: str
    options: dict[str, Any] = field(default_factory=dict)  # make_workload's keyword arguments
    #: why this case is expected to miss the target (shown in the table when it does)
    known: str | None = None


GPT_SMALL = {"vocab_size": 8192, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 256}
LM = {"vocab_size": 2000, "embed": 128, "hidden": 256, "num_layers": 2}
ONEDNN_TRANSPOSED = "oneDNN scratch of transposed and tiny strided convolutions (partly modelled)"
DETECTION = {"min_size": 128, "max_size": 128}  # the models' transform resizes every image to this

ZOO: list[Case] = [
    # ---- CNNs (validate_cpu.py's rows)
    Case("cnn", "resnet18:8:112 adam", "resnet18", dict(batch_size=8, input_shape=(3, 112, 112))),
    Case(
        "cnn",
        "resnet50:4:128 sgd-momentum",
        "resnet50",
        dict(batch_size=4, input_shape=(3, 128, 128), optimizer="sgd-momentum"),
    ),
    Case("cnn", "mobilenet_v3_small:16:128 adam", "mobilenet_v3_small", dict(batch_size=16, input_shape=(3, 128, 128))),
    Case("cnn", "vgg11:2:64 sgd", "vgg11", dict(batch_size=2, input_shape=(3, 64, 64), optimizer="sgd")),
    Case("cnn", "densenet121:4:64 adam", "densenet121", dict(batch_size=4, input_shape=(3, 64, 64))),
    Case("cnn", "efficientnet_b0:4:128 adam", "efficientnet_b0", dict(batch_size=4, input_shape=(3, 128, 128))),
    # small feature maps: oneDNN computes the weight gradient of layer4's 3x3 convs (2x2 maps) with its gemm
    # kernel and per-thread reduction buffers (9 x the weight bytes at 2 threads)
    Case("cnn", "resnet18:2:64 adam", "resnet18", dict(batch_size=2, input_shape=(3, 64, 64))),
    Case(
        "cnn",
        "resnet18:8:64 adam, frozen conv1,bn1,layer1,layer2",
        "resnet18",
        dict(batch_size=8, input_shape=(3, 64, 64), freeze=("conv1", "bn1", "layer1", "layer2")),
    ),
    Case(
        "cnn",
        "convnext_tiny:2:64 adamw",
        "convnext_tiny",
        dict(batch_size=2, input_shape=(3, 64, 64), optimizer="adamw"),
    ),
    Case(
        "cnn",
        "resnet18:8:112 adam amp-bf16",
        "resnet18",
        dict(batch_size=8, input_shape=(3, 112, 112), dtype="amp-bf16"),
    ),
    Case(
        "cnn",
        "mobilenet_v3_small:32:128 eval",
        "mobilenet_v3_small",
        dict(batch_size=32, input_shape=(3, 128, 128), mode="eval"),
    ),
    Case(
        "cnn",
        "regnet_y_400mf:8:96 sgd-momentum",
        "regnet_y_400mf",
        dict(batch_size=8, input_shape=(3, 96, 96), optimizer="sgd-momentum"),
    ),
    Case("seed", "mnist_mlp:64 sgd (seed 002)", "memprof.zoo:mnist_mlp", dict(batch_size=64, optimizer="sgd")),
    Case("seed", "cifar_mlp:128 adam (seed 002)", "memprof.zoo:cifar_mlp", dict(batch_size=128)),
    Case("seed", "Cruncher:256 adagrad (seed 000)", "memprof.zoo:Cruncher", dict(batch_size=256, optimizer="adagrad")),
    Case(
        "seed",
        "seed004_convstack:2:128 sgd",
        "memprof.zoo:seed004_convstack",
        dict(batch_size=2, input_shape=(3, 128, 128), optimizer="sgd"),
    ),
    Case("seed", "mnist_mlp:64 adam eval", "memprof.zoo:mnist_mlp", dict(batch_size=64, mode="eval")),
    Case("seed", "SharedLinear:64 adam", "memprof.zoo:SharedLinear", dict(batch_size=64)),
    # ---- transformers, ViT/Swin, MLP-Mixer
    Case(
        "transformer",
        "GPT 4L-256d:4x128 adamw",
        "memprof.zoo:GPT",
        dict(batch_size=4, input_shape=(128,), optimizer="adamw", model_kwargs=GPT_SMALL),
    ),
    Case(
        "transformer",
        "GPT 4L-256d:4x128 adamw amp-bf16",
        "memprof.zoo:GPT",
        dict(batch_size=4, input_shape=(128,), optimizer="adamw", dtype="amp-bf16", model_kwargs=GPT_SMALL),
    ),
    Case(
        "vit",
        "vit_b_16:4:64 sgd",
        "vit_b_16",
        dict(batch_size=4, input_shape=(3, 64, 64), optimizer="sgd", model_kwargs={"image_size": 64}),
    ),
    Case("vit", "swin_t:2:96 adamw", "swin_t", dict(batch_size=2, input_shape=(3, 96, 96), optimizer="adamw")),
    Case("vit", "MLPMixer:8:64 adam", "memprof.zoo:MLPMixer", dict(batch_size=8, input_shape=(3, 64, 64))),
    Case(
        "attention",
        "PaddedEncoder:8x128 adamw (padding mask)",
        "memprof.zoo:PaddedEncoder",
        dict(batch_size=8, optimizer="adamw"),
    ),
    Case(
        "attention",
        "PaddedEncoder:8x128 eval (nested tensors)",
        "memprof.zoo:PaddedEncoder",
        dict(batch_size=8, mode="eval"),
    ),
    Case(
        "attention",
        "PaddedEncoder gelu:16x128 eval (nested tensors)",
        "memprof.zoo:PaddedEncoder",
        dict(batch_size=16, mode="eval", model_kwargs={"activation": "gelu", "layers": 2}),
    ),
    Case(
        "attention",
        "PaddedEncoder unmasked:8x128 eval (fused layers)",
        "memprof.zoo:PaddedEncoder",
        dict(batch_size=8, mode="eval", model_kwargs={"padding": False}),
    ),
    Case(
        "attention",
        "PaddedAttention:8x128 adamw (key_padding_mask)",
        "memprof.zoo:PaddedAttention",
        dict(batch_size=8, optimizer="adamw"),
    ),
    Case(
        "attention",
        "PaddedAttention:8x128 eval (fused MHA)",
        "memprof.zoo:PaddedAttention",
        dict(batch_size=8, mode="eval"),
    ),
    Case(
        "attention",
        "PaddedMaskAttention:8x128 adam (SDPA bool mask)",
        "memprof.zoo:PaddedMaskAttention",
        dict(batch_size=8, input_shape=(128, 256), model_kwargs={"dropout": 0.1}),
    ),
    Case(
        "attention",
        "PaddedDecoder:8x64 adamw (causal+padding masks)",
        "memprof.zoo:PaddedDecoder",
        dict(batch_size=8, optimizer="adamw"),
    ),
    Case("attention", "PaddedDecoder:8x64 eval", "memprof.zoo:PaddedDecoder", dict(batch_size=8, mode="eval")),
    # ---- Hugging Face (tiny configs from transformers' config classes)
    Case("hf", "hf BERT:4x64 padded adam", f"{HF}:bert_padded", dict(batch_size=4)),
    Case("hf", "hf GPT-2:4x64 left-padded adamw", f"{HF}:gpt2_padded", dict(batch_size=4, optimizer="adamw")),
    Case("hf", "hf Llama:4x64 left-padded adamw", f"{HF}:llama_padded", dict(batch_size=4, optimizer="adamw")),
    Case("hf", "hf T5:4x64 padded adam", f"{HF}:t5_padded", dict(batch_size=4)),
    Case("hf", "hf ViT:8:64 adam", f"{HF}:vit_tiny", dict(batch_size=8)),
    Case("hf", "hf Mixtral MoE:4x64 adamw (routing)", f"{HF}:mixtral_moe", dict(batch_size=4, optimizer="adamw")),
    # ---- recurrent
    Case(
        "recurrent",
        "LSTM LM 2L:8x64 adam",
        "memprof.zoo:RecurrentLM",
        dict(batch_size=8, input_shape=(64,), model_kwargs=LM),
    ),
    Case(
        "recurrent",
        "LSTM LM 3L bi seq-first:4x32 sgd",
        "memprof.zoo:RecurrentLM",
        dict(
            batch_size=4,
            input_shape=(32,),
            optimizer="sgd",
            model_kwargs=dict(LM, num_layers=3, bidirectional=True, batch_first=False),
        ),
    ),
    Case(
        "recurrent",
        "LSTM LM proj+dropout:8x64 adam",
        "memprof.zoo:RecurrentLM",
        dict(batch_size=8, input_shape=(64,), model_kwargs=dict(LM, proj_size=64, dropout=0.2)),
    ),
    Case(
        "recurrent",
        "LSTM LM packed:8x64 adam",
        "memprof.zoo:RecurrentLM",
        dict(batch_size=8, input_shape=(64,), model_kwargs=dict(LM, packed=True)),
    ),
    Case(
        "recurrent",
        "LSTM LM 2L:16x64 eval",
        "memprof.zoo:RecurrentLM",
        dict(batch_size=16, input_shape=(64,), mode="eval", model_kwargs=LM),
    ),
    Case(
        "recurrent",
        "GRU LM 2L bi:8x64 adam",
        "memprof.zoo:RecurrentLM",
        dict(batch_size=8, input_shape=(64,), model_kwargs=dict(LM, kind="GRU", bidirectional=True)),
    ),
    Case(
        "recurrent",
        "GRU LM packed:8x64 adam",
        "memprof.zoo:RecurrentLM",
        dict(batch_size=8, input_shape=(64,), model_kwargs=dict(LM, kind="GRU", packed=True)),
    ),
    Case(
        "recurrent",
        "RNN tanh LM 2L:8x64 adam",
        "memprof.zoo:RecurrentLM",
        dict(batch_size=8, input_shape=(64,), model_kwargs=dict(LM, kind="RNN")),
    ),
    Case(
        "recurrent",
        "RNN relu LM no-bias:8x64 sgd",
        "memprof.zoo:RecurrentLM",
        dict(batch_size=8, input_shape=(64,), optimizer="sgd", model_kwargs=dict(LM, kind="RNN_RELU", bias=False)),
    ),
    # ---- data-dependent steps
    Case(
        "data-dependent",
        "ItemLossMLP:64 adam (.item() in loss)",
        "memprof.zoo:ItemLossMLP",
        dict(batch_size=64, input_shape=(256,)),
    ),
    Case(
        "data-dependent",
        "MaskedSelectMLP:64 adam (boolean mask)",
        "memprof.zoo:MaskedSelectMLP",
        dict(batch_size=64, input_shape=(256,)),
    ),
    Case(
        "data-dependent",
        "TopOneMoE:4x64 adam (routing)",
        "memprof.zoo:TopOneMoE",
        dict(batch_size=4, input_shape=(64,)),
    ),
    # ---- detection, segmentation, video, optical flow
    Case(
        "detection",
        "fasterrcnn_mobilenet_v3_large_320_fpn:2 sgd",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        dict(batch_size=2, input_shape=(3, 240, 320), optimizer="sgd-momentum", model_kwargs=DETECTION),
    ),
    Case(
        "detection",
        "retinanet_resnet50_fpn:1 sgd",
        "retinanet_resnet50_fpn",
        dict(batch_size=1, input_shape=(3, 128, 128), optimizer="sgd-momentum", model_kwargs=DETECTION),
    ),
    Case(
        "detection",
        "maskrcnn_resnet50_fpn:1 sgd",
        "maskrcnn_resnet50_fpn",
        dict(batch_size=1, input_shape=(3, 128, 128), optimizer="sgd-momentum", model_kwargs=DETECTION),
    ),
    Case(
        "detection",
        "keypointrcnn_resnet50_fpn:1 sgd",
        "keypointrcnn_resnet50_fpn",
        dict(batch_size=1, input_shape=(3, 128, 128), optimizer="sgd-momentum", model_kwargs=DETECTION),
    ),
    Case(
        "detection",
        "ssdlite320_mobilenet_v3_large:2 sgd",
        "ssdlite320_mobilenet_v3_large",
        dict(batch_size=2, input_shape=(3, 240, 320), optimizer="sgd-momentum"),
    ),
    Case(
        "segmentation",
        "lraspp_mobilenet_v3_large:4:128 adam",
        "lraspp_mobilenet_v3_large",
        dict(batch_size=4, input_shape=(3, 128, 128)),
    ),
    Case(
        "segmentation",
        "deeplabv3_mobilenet_v3_large:2:128 adam",
        "deeplabv3_mobilenet_v3_large",
        dict(batch_size=2, input_shape=(3, 128, 128)),
    ),
    Case("segmentation", "UNet:2:64 adam", "configs/unet.toml", dict(batch_size=2, input_shape=(3, 64, 64))),
    Case(
        "segmentation",
        "UNet:4:64 adam bf16",
        "configs/unet.toml",
        dict(batch_size=4, input_shape=(3, 64, 64), dtype="bf16"),
    ),
    Case("video", "r3d_18:2x8x64 adam", "r3d_18", dict(batch_size=2, input_shape=(3, 8, 64, 64))),
    Case(
        "video",
        "mc3_18:2x8x64 sgd",
        "mc3_18",
        dict(batch_size=2, input_shape=(3, 8, 64, 64), optimizer="sgd"),
    ),
    Case(
        "optical-flow",
        "raft_small:1:128 adamw",
        "raft_small",
        dict(batch_size=1, input_shape=[(3, 128, 128), (3, 128, 128)], optimizer="adamw"),
    ),
    # ---- generative, graphs
    Case(
        "generative",
        "GAN generator step:16 adam",
        "memprof.zoo:GANGeneratorStep",
        dict(batch_size=16),
        ONEDNN_TRANSPOSED,
    ),
    Case(
        "generative",
        "GAN discriminator step:16 adam",
        "memprof.zoo:GANDiscriminatorStep",
        dict(batch_size=16),
        ONEDNN_TRANSPOSED,
    ),
    Case("generative", "DiffusionUNet:4x32 adamw", "memprof.zoo:DiffusionUNet", dict(batch_size=4, optimizer="adamw")),
    Case("graph", "GraphConvNet:2x256 nodes adam (scatter/gather)", "memprof.zoo:GraphConvNet", dict(batch_size=2)),
]


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import transformers

        hf = transformers.__version__
    except ImportError:  # pragma: no cover - optional
        hf = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": hf,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def run_case(case: Case) -> dict:
    from memprof.commands.workload import make_workload
    from memprof.engine.measure import measure_cpu_step
    from memprof.engine.trace import trace_step

    workload = make_workload(case.ref, **case.options)
    traced = trace_step(workload, target="cpu")
    gc.collect()
    started = time.perf_counter()
    measured = measure_cpu_step(workload)
    measure_seconds = time.perf_counter() - started
    gc.collect()
    err = 100.0 * (traced.peak_bytes - measured["peak_bytes"]) / measured["peak_bytes"]
    storage_err = None
    if abs(err) > MAX_TARGET and traced.method == "trace":
        # a miss: separate the tracer from the CPU kernels' internal buffers. The trace without
        # the kernels' scratch against fresh real steps' peak of tensor storages (what a GPU would hold)
        storages = trace_step(workload, target="cpu", kernel_scratch=False)
        truth = measure_cpu_step(workload, storages=True)["storage_peak_bytes"]
        storage_err = 100.0 * (storages.peak_bytes - truth) / truth
    return {
        "family": case.family,
        "name": case.name,
        "model": case.ref,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in case.options.items()},
        "method": traced.method,
        "method_reason": traced.method_reason,
        "measured_bytes": measured["peak_bytes"],
        "predicted_bytes": traced.peak_bytes,
        "error_pct": err,
        "storage_error_pct": storage_err,
        "modelled_bytes": sum(m.bytes for m in traced.modelled),
        "modelled": [{"what": m.what, "bytes": m.bytes, "verified": m.verified} for m in traced.modelled],
        "measured_first_bytes": measured["first_step_peak_bytes"],
        "measured_steady_bytes": measured["steady_peak_bytes"],
        "predicted_first_bytes": traced.first_step_peak_bytes,
        "predicted_steady_bytes": traced.steady_peak_bytes,
        "peak_phase": traced.peak_phase,
        "trace_seconds": traced.trace_seconds,
        "measure_seconds": measure_seconds,
        "known": case.known,
    }


def write_report(rows: list[dict], failures: list[dict], info: dict, path_md: Path, path_json: Path, command: str):
    errs = [abs(r["error_pct"]) for r in rows]
    med, worst = (statistics.median(errs), max(errs)) if errs else (0.0, 0.0)
    misses = [r for r in rows if abs(r["error_pct"]) > MAX_TARGET]
    families = sorted({r["family"] for r in rows})
    lines = [
        "# Validation zoo: memprof's CPU prediction vs real CPU training steps",
        "",
        f"Generated by `{command}`. Measured = peak live bytes of two real training steps on the CPU",
        "(torch.profiler memory events, allocations inside kernels included, plus the storages resident",
        'before the first step); predicted = `trace_step(workload, target="cpu")`: a fake-tensor trace, or,',
        "for steps that read tensor values (method `real CPU run`), the step run for real and recorded the",
        "same way. Error = (predicted − measured) / measured, on the peak over both steps. Modelled = the",
        "part of the predicted peak that no trace saw (oneDNN LSTM workspace/scratch; oneDNN convolution",
        "scratch is added to the peak but not yet itemised). Storages error (for misses only) = the trace without",
        "oneDNN's kernel scratch against other real steps' peak of live tensor storages (a StorageTracker:",
        "what a GPU would hold); it separates the tracer from the CPU kernels' internal buffers.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, transformers {info['transformers']},",
        f"Python {info['python']}. The cores were shared with other jobs, so the seconds are inflated.",
        "",
        "| family | workload | method | measured MiB | predicted MiB | error % | storages error % | modelled MiB "
        "| peak phase | trace s |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        storage = "n/a" if r["storage_error_pct"] is None else f"{r['storage_error_pct']:+.3f}"
        lines.append(
            f"| {r['family']} | {r['name']} | {r['method']} | {r['measured_bytes'] / MiB:.2f} | "
            f"{r['predicted_bytes'] / MiB:.2f} | {r['error_pct']:+.3f} | {storage} | {r['modelled_bytes'] / MiB:.2f} | "
            f"{r['peak_phase']} | {r['trace_seconds']:.1f} |"
        )
    ok = med <= MEDIAN_TARGET and worst <= MAX_TARGET and not failures
    lines += [
        "",
        f"**{len(rows)} workloads in {len(families)} families: median |error| {med:.3f} %, max |error| {worst:.3f} %** "
        f"(targets: median ≤ {MEDIAN_TARGET} %, max ≤ {MAX_TARGET} %){'' if ok else ' - see below'}.",
        "",
    ]
    real = [r for r in rows if r["method"] != "trace"]
    if real:
        lines += ["Steps that read tensor values (run for real, recorded like a trace):", ""]
        lines += [f"- {r['name']}: {r['method_reason']}" for r in real]
        lines.append("")
    if misses or failures:
        lines += ["Workloads missing the target, and why:", ""]
        lines += [f"- {r['name']}: {r['error_pct']:+.3f} % - {r['known'] or 'not yet explained'}" for r in misses]
        lines += [f"- {f['name']}: failed - {f['error']}" for f in failures]
        lines.append("")
    path_md.write_text("\n".join(lines))
    path_json.write_text(
        json.dumps(
            {
                "machine": info,
                "command": command,
                "median_abs_error_pct": med,
                "max_abs_error_pct": worst,
                "targets": {"median_pct": MEDIAN_TARGET, "max_pct": MAX_TARGET},
                "rows": rows,
                "failures": failures,
            },
            indent=2,
        )
        + "\n"
    )
    return med, worst


def select(names: list[str], family: str | None) -> list[Case]:
    chosen = [c for c in ZOO if (not family or c.family == family)]
    if names:
        chosen = [c for c in chosen if any(n.lower() in c.name.lower() for n in names)]
    return chosen


def main(argv: list[str]) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="run the cases whose name contains one of these")
    parser.add_argument("--family", help="run one family (cnn, recurrent, detection, ...)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    cases = select(args.names, args.family)
    if args.list:
        for c in cases:
            print(f"{c.family:15s} {c.name}")
        print(f"{len(cases)} cases")
        return 0
    torch.manual_seed(0)
    rows: list[dict] = []
    failures: list[dict] = []
    print(f"{'workload':48s} {'method':13s} {'measured MiB':>12s} {'predicted MiB':>13s} {'error %':>9s}")
    for case in cases:
        started = time.perf_counter()
        try:
            row = run_case(case)
        except Exception as exc:  # a failing case is a finding: reported in the table
            print(f"{case.name:48s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            failures.append({"name": case.name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append(row)
        print(
            f"{case.name:48s} {row['method']:13s} {row['measured_bytes'] / MiB:12.2f} "
            f"{row['predicted_bytes'] / MiB:13.2f} {row['error_pct']:+9.3f}   ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    out = ROOT / "benchmarks"
    out.mkdir(exist_ok=True)
    partial = bool(args.names or args.family)
    suffix = "_subset" if partial else ""
    command = "PYTHONPATH=. python scripts/validate_zoo.py" + (" " + " ".join(argv) if argv else "")
    med, worst = write_report(
        rows, failures, machine(), out / f"validate_zoo{suffix}.md", out / f"validate_zoo{suffix}.json", command
    )
    print(f"median |error| {med:.3f} %, max |error| {worst:.3f} % over {len(rows)} workloads, {len(failures)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
