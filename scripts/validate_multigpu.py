"""Validate the per-rank prediction against REAL multi-process training jobs (torchrun, gloo, CPU).

For each case: trace one rank of the data-parallel step on fake tensors over a fake process group
(``trace_step(workload, target="cpu")`` with ``workload.strategy`` / ``world_size``), then launch a real
``torchrun --standalone --nproc-per-node N`` job in which every rank builds the model, wraps it (DDP,
FSDP2, ZeroRedundancyOptimizer), runs two real training steps, and measures its own peak independently
of the tracer: c10's CPU allocator, with ``FLAGS_caffe2_report_cpu_memory_usage`` and INFO logging, logs
every allocation and free with the exact running total, from every thread (gloo's too); each rank reads
its own log, counted from just before the model was built (``memprof.engine.measure.measure_rank_step``).

The scaling section runs FSDP (= ZeRO-3) at 1, 2 and 4 ranks: model states shrink as 1/N, activations
stay, and the largest batch per rank under a fixed per-rank cap rises; the predicted largest batch is
checked against a real ``find-batch`` torchrun job at 2 and 4 ranks.

Writes ``benchmarks/validate_multigpu.md`` and ``.json``.

    PYTHONPATH=. python scripts/validate_multigpu.py                 # every case, then the scaling runs
    PYTHONPATH=. python scripts/validate_multigpu.py gpt             # cases whose name contains "gpt"
    PYTHONPATH=. python scripts/validate_multigpu.py --no-scaling
    PYTHONPATH=. python scripts/validate_multigpu.py --model resnet18 --input-shape 3,64,64 --batch-size 4 \\
        --strategy fsdp --nproc 2                                    # any model, one case
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from validate_cpu import machine  # noqa: E402 - the same machine description

MiB = 1024 * 1024
GPT_SMALL = '{"vocab_size": 2048, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128}'

GPT = ("GPT 4L-128d:8x64 adamw", "memprof.zoo:GPT")
GPT_OPTIONS = dict(batch_size=8, input_shape=["64"], optimizer="adamw", model_kwargs=GPT_SMALL)
RESNET = ("resnet18:4:112 sgd-momentum", "resnet18")
RESNET_OPTIONS = dict(batch_size=4, input_shape=["3,112,112"], optimizer="sgd-momentum")

# name, model ref, options for build_workload, strategy, processes
CASES: list[tuple[str, str, dict, str, int]] = [
    (*GPT, GPT_OPTIONS, "ddp", 2),
    (*GPT, GPT_OPTIONS, "fsdp", 2),
    (*GPT, GPT_OPTIONS, "ddp", 4),
    (*GPT, GPT_OPTIONS, "fsdp", 4),
    (*GPT, GPT_OPTIONS, "zero1", 2),
    (*GPT, GPT_OPTIONS, "zero2", 2),
    (*RESNET, RESNET_OPTIONS, "ddp", 2),
    (*RESNET, RESNET_OPTIONS, "fsdp", 2),
    ("UNet:2:64 adam", "configs/unet.toml", dict(batch_size=2, input_shape=["3,64,64"], optimizer="adam"), "ddp", 2),
    ("UNet:2:64 adam", "configs/unet.toml", dict(batch_size=2, input_shape=["3,64,64"], optimizer="adam"), "fsdp", 2),
]
#: the worst case for gloo's thread timing (reported apart, not held to the target): four 1 MiB layers and
#: kilobytes of activations, so one collective buffer that gloo frees late is a tenth of the peak
STRESS: list[tuple[str, str, dict, str, int]] = [
    ("Cruncher 512:64 adam", "memprof.zoo:Cruncher", dict(batch_size=64, model_kwargs='{"dim": 512}'), "fsdp", 2),
    ("Cruncher 512:64 adam", "memprof.zoo:Cruncher", dict(batch_size=64, model_kwargs='{"dim": 512}'), "fsdp", 4),
]

#: the scaling runs: FSDP at 1, 2, 4 ranks, the largest batch per rank under this per-rank cap
SCALING = ("GPT 4L-128d x64 adamw", "memprof.zoo:GPT", {k: v for k, v in GPT_OPTIONS.items() if k != "batch_size"})
SCALING_CAP = 48 * MiB


def run_case(name: str, ref: str, options: dict, strategy: str, nproc: int) -> dict:
    from memprof.cli.common import build_workload
    from memprof.engine.torchrun import Launch, measure_ranks
    from memprof.engine.trace import trace_step

    workload = build_workload(ref, **options).replace(strategy=strategy, world_size=nproc)
    traced = trace_step(workload, target="cpu")
    t0 = time.perf_counter()
    ranks = measure_ranks(workload, Launch(nproc))
    seconds = time.perf_counter() - t0
    peaks = [ranks[r]["peak_bytes"] for r in sorted(ranks)]
    rank = traced.rank or 0
    measured = peaks[rank]  # the rank the prediction is for (ZeRO-1: the heaviest; else all ranks are alike)
    # every rank the prediction stands for: the traced one under ZeRO-1 (the others hold less), else all
    compared = [measured] if strategy == "zero1" else peaks
    errors = [100.0 * (traced.peak_bytes - p) / p for p in compared]
    return {
        "name": name,
        "model": ref,
        "options": options,
        "strategy": strategy,
        "nproc": nproc,
        "rank": rank,
        "predicted_bytes": traced.peak_bytes,
        "measured_bytes": measured,
        "rank_peaks_bytes": peaks,
        "error_pct": max(errors, key=abs),  # the worst rank
        "modelled_bytes": sum(m.bytes for m in traced.modelled),
        "peak_phase": traced.peak_phase,
        "breakdown_at_peak": {k.value: v for k, v in traced.breakdown_at_peak.items()},
        "trace_seconds": traced.trace_seconds,
        "job_seconds": seconds,
    }


def run_scaling() -> list[dict]:
    from memprof.cli.common import build_workload
    from memprof.commands.find_batch import find_batch_torchrun
    from memprof.engine.fit import fit_batch
    from memprof.engine.torchrun import Launch, measure_ranks
    from memprof.engine.trace import trace_step
    from memprof.results import MemCategory as C

    _, ref, options = SCALING
    base = build_workload(ref, batch_size=8, **options)
    rows = []
    for n in (1, 2, 4):
        w = base if n == 1 else base.replace(strategy="fsdp", world_size=n)
        traced = trace_step(w, target="cpu")
        fit = fit_batch(w, SCALING_CAP, target="cpu", metric="allocated", kernel_scratch=False, max_batch=4096)
        states = sum(traced.totals.get(c, 0) for c in (C.PARAMETER, C.GRADIENT, C.OPTIMIZER_STATE))
        row = {
            "world_size": n,
            "predicted_peak_bytes": traced.peak_bytes,
            "model_state_bytes": states,
            "activation_bytes": traced.totals.get(C.ACTIVATION, 0),
            "predicted_largest_batch": fit.max_batch,
            "measured_peak_bytes": None,
            "measured_largest_batch": None,
            "find_batch_trials": None,
        }
        if n > 1:
            ranks = measure_ranks(w, Launch(n))
            row["measured_peak_bytes"] = max(r["peak_bytes"] for r in ranks.values())
            found = find_batch_torchrun(w, Launch(n), device="cpu", memory_limit=SCALING_CAP, max_batch=4096)
            assert found is not None
            row["measured_largest_batch"] = found.largest_batch
            row["find_batch_trials"] = len(found.trials)
        rows.append(row)
        print(row, flush=True)
    return rows


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| workload | strategy | ranks | measured MiB (every rank) | predicted MiB | error % (worst rank) | "
        "gloo buffer modelled MiB | peak phase | trace s | job s |",
        "|---|---|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        each = " / ".join(f"{p / MiB:.3f}" for p in r["rank_peaks_bytes"])
        lines.append(
            f"| {r['name']} | {r['strategy']} | {r['nproc']} | {each} | {r['predicted_bytes'] / MiB:.3f} | "
            f"{r['error_pct']:+.3f} | {r['modelled_bytes'] / MiB:.3f} | {r['peak_phase']} | "
            f"{r['trace_seconds']:.1f} | {r['job_seconds']:.0f} |"
        )
    return lines


def write_report(
    rows: list[dict], stress: list[dict], scaling: list[dict], info: dict, md: Path, js: Path, command: str
) -> float:
    worst = max((abs(r["error_pct"]) for r in rows), default=0.0)
    lines = [
        "# Per-rank prediction vs real torchrun jobs (gloo, CPU)",
        "",
        f"Generated by `{command}`.",
        "",
        "Predicted = one rank traced on fake tensors over a fake process group (PyTorch's DDP / FSDP2 /",
        '`ZeroRedundancyOptimizer` code, collectives that move no data; `trace_step(workload, target="cpu")`),',
        "plus the buffers gloo runs all-gathers and reduce-scatters through on its own thread (modelled,",
        "column `gloo buffer`). Measured = every rank of a real `torchrun --standalone --nproc-per-node N` job",
        "on the CPU (gloo) running two real training steps; each rank reads its peak from c10's CPU allocator,",
        "which with `FLAGS_caffe2_report_cpu_memory_usage` and INFO logging logs every allocation and free with",
        "the exact running total, from every thread (gloo's too), counted from just before the model was",
        "built (`memprof.engine.measure.measure_rank_step`). Error = (predicted − measured) / measured, for",
        "the worst rank the prediction stands for (ZeRO-1: the rank with the largest optimizer partition,",
        "which memprof traces; all ranks otherwise).",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores shared with other jobs, torch {info['torch']},",
        f"Python {info['python']}. Times are inflated by the shared machine.",
        "",
        *_table(rows),
        "",
        f"**{len(rows)} jobs: max |error| {worst:.3f} %** (target ≤ 2 %).",
        "",
    ]
    if stress:
        lines += [
            "## The worst case for gloo's thread timing (not held to the target)",
            "",
            "gloo frees a collective's buffer on its worker thread after the collective; on a busy machine",
            "that thread may run late, and the buffer is still alive when the main thread reaches its peak.",
            "memprof assumes it is freed when the worker starts the next collective. This model has four",
            "1 MiB layers and kilobytes of activations, so one buffer freed earlier or later is a tenth of",
            "the peak; the ranks of one job disagree by that much. Real models have units that are a small",
            "part of the peak (the table above); GPUs with NCCL have no such buffers in PyTorch's count.",
            "",
            *_table(stress),
            "",
        ]
    if scaling:
        lines += [
            f"## FSDP (ZeRO-3) vs world size: {SCALING[0]}, batch 8; largest batch per rank under a "
            f"{SCALING_CAP // MiB} MiB cap per rank",
            "",
            "Model states = parameters + gradients + optimizer state held by one rank (predicted). Largest",
            "batch: predicted by `fit_batch` on the per-rank trace (tensor storages, as the cap counts), measured",
            "by a real `find-batch --nproc-per-node N --device cpu --memory-limit` torchrun job.",
            "",
            "| ranks | model states MiB | activations MiB | predicted peak MiB | measured peak MiB | "
            "largest batch predicted | largest batch measured (trials) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in scaling:
            measured = f"{s['measured_peak_bytes'] / MiB:.3f}" if s["measured_peak_bytes"] else "—"
            found = f"{s['measured_largest_batch']} ({s['find_batch_trials']})" if s["measured_largest_batch"] else "—"
            lines.append(
                f"| {s['world_size']} | {s['model_state_bytes'] / MiB:.3f} | {s['activation_bytes'] / MiB:.3f} | "
                f"{s['predicted_peak_bytes'] / MiB:.3f} | {measured} | {s['predicted_largest_batch']} | {found} |"
            )
        lines.append("")
    md.write_text("\n".join(lines))
    document = {"machine": info, "command": command, "cases": rows, "stress": stress, "scaling": scaling}
    js.write_text(json.dumps(document, indent=2))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("filter", nargs="?", default="", help="only cases whose name contains this")
    parser.add_argument("--no-scaling", action="store_true", help="skip the FSDP world-size runs")
    parser.add_argument("--no-stress", action="store_true", help="skip the worst case for gloo's thread timing")
    parser.add_argument("--model", help="one case with this model reference instead of the built-in cases")
    parser.add_argument("--model-kwargs")
    parser.add_argument("--input-shape", action="append")
    parser.add_argument("--input-dtype")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--strategy", action="append", help="ddp, fsdp, zero1, zero2, zero3 (repeatable)")
    parser.add_argument("--nproc", type=int, action="append", help="processes (repeatable)")
    parser.add_argument("--out", default="benchmarks/validate_multigpu", help="report path without extension")
    args = parser.parse_args()
    command = "PYTHONPATH=. python scripts/validate_multigpu.py " + " ".join(sys.argv[1:])
    cases = CASES
    if args.model:
        options: dict = {"batch_size": args.batch_size, "optimizer": args.optimizer}
        for key in ("model_kwargs", "input_shape", "input_dtype"):
            if getattr(args, key):
                options[key] = getattr(args, key)
        cases = [
            (f"{args.model}:{args.batch_size}", args.model, options, s, n)
            for s in args.strategy or ["ddp", "fsdp"]
            for n in args.nproc or [2]
        ]
    chosen = [c for c in cases if args.filter.lower() in c[0].lower()]
    stressed = [] if args.no_stress or args.model else [c for c in STRESS if args.filter.lower() in c[0].lower()]
    rows, stress = [], []
    for case in chosen + stressed:
        row = run_case(*case)
        (stress if case in stressed else rows).append(row)
        print(
            f"{row['name']:<32} {row['strategy']:<6} x{row['nproc']}: measured "
            + " / ".join(f"{p / MiB:.3f}" for p in row["rank_peaks_bytes"])
            + f" MiB  predicted {row['predicted_bytes'] / MiB:9.3f} MiB  {row['error_pct']:+.3f} %",
            flush=True,
        )
    scaling = [] if args.no_scaling or args.model else run_scaling()
    out = ROOT / args.out
    worst = write_report(
        rows, stress, scaling, machine(), out.with_suffix(".md"), out.with_suffix(".json"), command.strip()
    )
    print(f"max |error| {worst:.3f} % -> {out.with_suffix('.md')}")
    return 0 if worst <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
