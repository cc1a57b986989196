"""Validate memprof's Hugging Face path against real CPU runs, on tiny configs of real architectures.

For every architecture in memprof's catalog (configs/hf/) and a set of architectures outside it, the
same config at a tiny size (2 layers, hidden 128, 4 heads, vocabulary 1000: memprof.engine.hf.tiny_config)
is trained for two real steps on the CPU (memprof.engine.measure.measure_cpu_step: torch.profiler's
memory events, independent of the tracer) and traced on fake tensors (memprof.engine.trace.trace_step,
target "cpu"), for both loop shapes (plain: the output kept through backward; trainer: dropped before).
Mixture-of-experts configs run with the routing forced (balanced and worst case) in both. Causal LMs
also generate (model.generate, greedy) with a dynamic KV cache, and Llama with a static one: the traced
peak against the real generate's, and the traced KV cache against the grouped-query formula.

    PYTHONPATH=. python3 scripts/validate_hf.py            # writes benchmarks/validate_hf.md and .json
    PYTHONPATH=. python3 scripts/validate_hf.py --quick    # the catalog only, training only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: architectures outside memprof's catalog, built from transformers' own defaults at the tiny size
OUTSIDE = (
    "gpt_neox",
    "opt",
    "falcon",
    "phi",
    "stablelm",
    "gemma",
    "gemma3_text",
    "olmo",
    "olmo2",
    "starcoder2",
    "gptj",
    "bloom",
    "cohere",
    "granite",
    "gpt_bigcode",
    "olmoe",
    "qwen3",
    "qwen3_moe",
    "roberta",
    "distilbert",
    "bart",
)
TRAIN_TOL = 1.0  # %
GEN_TOL = 2.0  # %


def _pct(pred: int, real: int) -> float:
    return 100.0 * (pred - real) / real


def _save(config, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    return str(folder)


def train_rows(name: str, path: str, moe: bool, batch: int, seq: int) -> list[dict]:
    from memprof.commands.workload import make_workload
    from memprof.engine.measure import measure_cpu_step
    from memprof.engine.trace import trace_step

    rows = []
    routings = ("balanced", "worst") if moe else ("balanced",)
    for routing in routings:
        for loop in ("plain", "trainer"):
            w = make_workload(path, batch_size=batch, seq_len=seq, optimizer="adamw", loop=loop, routing=routing)
            t0 = time.perf_counter()
            traced = trace_step(w, target="cpu")
            seconds = time.perf_counter() - t0
            real = measure_cpu_step(w)
            rows.append(
                {
                    "model": name,
                    "arch": w.model.hf.config.model_type,
                    "task": w.model.hf.task,
                    "loop": loop,
                    "routing": routing if moe else None,
                    "batch": batch,
                    "seq_len": seq,
                    "real_peak_bytes": real["peak_bytes"],
                    "traced_peak_bytes": traced.peak_bytes,
                    "error_pct": _pct(traced.peak_bytes, real["peak_bytes"]),
                    "trace_s": seconds,
                }
            )
            print(f"  {name:40s} {loop:8s} {routing if moe else '':9s} {rows[-1]['error_pct']:+.4f} %", flush=True)
    return rows


def generate_rows(name: str, path: str, caches: tuple, prompt: int, new_tokens: int, batch: int) -> list[dict]:
    from memprof.commands.workload import make_workload
    from memprof.engine.hf import kv_cache_formula
    from memprof.engine.measure import measure_cpu_step
    from memprof.engine.trace import trace_step

    rows = []
    for cache in caches:
        w = make_workload(
            path, batch_size=batch, seq_len=prompt, mode="generate", new_tokens=new_tokens, kv_cache=cache
        )
        traced = trace_step(w, target="cpu")
        real = measure_cpu_step(w, steps=1)
        hf = w.model.hf
        tokens = prompt + new_tokens - 1
        formula = kv_cache_formula(hf.config, batch, tokens, 4, static=cache == "static")
        rows.append(
            {
                "model": name,
                "arch": hf.config.model_type,
                "cache": cache or "dynamic",
                "batch": batch,
                "prompt": prompt,
                "new_tokens": new_tokens,
                "real_peak_bytes": real["peak_bytes"],
                "traced_peak_bytes": traced.peak_bytes,
                "error_pct": _pct(traced.peak_bytes, real["peak_bytes"]),
                "peak_phase": traced.peak_phase,
                "prefill_peak_bytes": traced.phase_peaks.get("prefill"),
                "decode_peak_bytes": traced.phase_peaks.get("decode"),
                "kv_traced_bytes": traced.kv_cache_bytes,
                "kv_formula_bytes": formula,
            }
        )
        print(f"  {name:40s} generate {cache or 'dynamic':8s} {rows[-1]['error_pct']:+.4f} %", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the catalog only, training only")
    parser.add_argument("--generate-only", action="store_true", help="the catalog's generation rows only")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/validate_hf[_generate]")
    args = parser.parse_args(argv)
    if args.quick and args.generate_only:
        parser.error("--quick is training only, --generate-only generation only")
    if args.out is None:
        args.out = ROOT / "benchmarks" / ("validate_hf_generate" if args.generate_only else "validate_hf")
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from transformers import AutoConfig

    from memprof.engine import hf

    started = time.perf_counter()
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="memprof-validate-hf-"))
    train: list[dict] = []
    gen: list[dict] = []
    print("catalog architectures, tiny size:")
    for entry in hf.catalog():
        model = hf.load_hf("hf:" + entry.name)
        if entry.name.endswith(("Llama-3.2-3B", "Meta-Llama-3-8B", "Llama-3.1-70B", "Qwen2.5-7B", "Qwen2.5-72B")):
            continue  # the same architecture at another size: its tiny form is one of the others
        tiny = hf.tiny_config(model.config)
        path = _save(tiny, tmp / entry.file.removesuffix(".json"))
        if not args.generate_only:
            train += train_rows(entry.name, path, model.moe is not None, batch=2, seq=128)
        if not args.quick and model.task == "causal-lm":
            caches = ("dynamic", "static") if tiny.model_type == "llama" else ("dynamic",)
            gen += generate_rows(entry.name, path, caches, prompt=96, new_tokens=16, batch=2)
    if not args.quick and not args.generate_only:
        print("architectures outside the catalog, tiny size:")
        for model_type in OUTSIDE:
            tiny = hf.tiny_config(AutoConfig.for_model(model_type))
            path = _save(tiny, tmp / model_type)
            model = hf.load_hf(path)
            train += train_rows(model_type, path, model.moe is not None, batch=2, seq=128)
    end_load = os.getloadavg()[0]
    doc = {
        "command": "PYTHONPATH=. python3 scripts/validate_hf.py"
        + (" --quick" if args.quick else "")
        + (" --generate-only" if args.generate_only else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_average": [round(load, 2), round(end_load, 2)],
        "seconds": round(time.perf_counter() - started, 1),
        "train": train,
        "generate": gen,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(doc))
    worst_train = max((abs(r["error_pct"]) for r in train), default=0.0)
    worst_gen = max((abs(r["error_pct"]) for r in gen), default=0.0)
    print(f"worst training error {worst_train:.4f} % (limit {TRAIN_TOL} %), generation {worst_gen:.4f} % ({GEN_TOL} %)")
    return 0 if worst_train <= TRAIN_TOL and worst_gen <= GEN_TOL else 1


def markdown(doc: dict) -> str:
    def mib(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**20:.2f}"

    lines = [
        "# Hugging Face models: traced vs real CPU runs (tiny configs)",
        "",
        f"Generated by `{doc['command']}` (torch {doc['torch']}, transformers {doc['transformers']}; "
        f"{doc['seconds']} s; 1-minute load average {doc['load_average'][0]} at the start, "
        f"{doc['load_average'][1]} at the end, on a shared 2-core machine).",
        "",
    ]
    if doc["train"]:
        lines += [
            "Each architecture at a tiny size (`memprof.engine.hf.tiny_config`: 2 layers, hidden 128, 4 heads, "
            "vocabulary 1000, 4 experts top-2, sliding windows of 64), batch 2 x 128 tokens, AdamW, fp32, two "
            "steps: the real CPU peak (`measure_cpu_step`, torch.profiler memory events) against memprof's "
            "trace on fake tensors (target cpu), for both loop shapes. Mixture-of-experts rows force the routing "
            "in the real run and the trace alike. Limit: 1 %.",
            "",
            "| model | arch | task | loop | routing | real MiB | traced MiB | error |",
            "|---|---|---|---|---|---:|---:|---:|",
        ]
    for r in doc["train"]:
        lines.append(
            f"| {r['model']} | {r['arch']} | {r['task']} | {r['loop']} | {r['routing'] or '-'} | "
            f"{mib(r['real_peak_bytes'])} | {mib(r['traced_peak_bytes'])} | {r['error_pct']:+.4f} % |"
        )
    if doc["generate"]:
        lines += [
            "",
            "## Generation (model.generate, greedy, batch 2, 96-token prompt + 16 new tokens)",
            "",
            "The real peak of the whole `generate` call against the traced one (prefill and the last decode "
            "step); the KV cache at full length, traced and by the grouped-query formula. Limit: 2 %.",
            "",
            "| model | arch | cache | real MiB | traced MiB | error | peak in | KV traced | KV formula |",
            "|---|---|---|---:|---:|---:|---|---:|---:|",
        ]
        for r in doc["generate"]:
            lines.append(
                f"| {r['model']} | {r['arch']} | {r['cache']} | {mib(r['real_peak_bytes'])} | "
                f"{mib(r['traced_peak_bytes'])} | {r['error_pct']:+.4f} % | {r['peak_phase']} | "
                f"{r['kv_traced_bytes']:,} | {r['kv_formula_bytes']:,} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
