"""``memprof compare MODEL``: precisions, optimizers and memory-saving techniques side by side."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..engine.fit import check_headroom
from . import EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_PARTIAL, command, emit_json, exit_code, handle_errors
from .common import (
    ATTN_OPT,
    CUDNN_BENCHMARK_OPT,
    DEFAULT_WORLD_SIZE,
    FORCE_OPT,
    GPU_ARCH_OPT,
    GPU_MEMORY_OPT,
    GPU_OPT,
    HEADROOM_OPT,
    INPUT_DTYPE_OPT,
    INPUT_SHAPE_OPT,
    JSON_OPT,
    MODEL_ARG,
    MODEL_ARG_OPT,
    MODEL_KWARGS_OPT,
    MODEL_OPT,
    PADDING_OPT,
    ROUTING_OPT,
    TOKEN_RANGE_OPT,
    build_workload,
)
from .output import OutputFiles

if TYPE_CHECKING:
    from ..results import Target


def compare_document(result) -> dict[str, Any]:
    """The ``--json`` document: ``schema_version``, ``kind: "compare"``, the result and the verdict sentence."""
    from ..render.compare import verdict_text
    from ..results import document

    doc = document("compare", result)
    doc["verdict"] = verdict_text(result)
    return doc


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - a broken torch install
        return False


@command("compare")
@handle_errors
def compare_cmd(
    model: str | None = MODEL_ARG,
    model_opt: str | None = MODEL_OPT,
    dtype: list[str] | None = typer.Option(
        None,
        "--dtype",
        metavar="DTYPE",
        help="Add a row per dtype: fp32 | fp16 | bf16 | amp-fp16 | amp-bf16 (repeatable).",
    ),
    optimizer: list[str] | None = typer.Option(
        None,
        "--optimizer",
        "-o",
        metavar="NAME",
        help="Add a row per optimizer: sgd | sgd-momentum | adam | adamw | adagrad | rmsprop (repeatable).",
    ),
    checkpointing: list[str] | None = typer.Option(
        None,
        "--checkpointing",
        "-c",
        metavar="MODE",
        help="Add a row per checkpointing mode: blocks (each repeated "
        "block) | sqrt (sqrt(n) segments) | every-K | none "
        "(repeatable).",
    ),
    inplace_relu: bool = typer.Option(False, "--inplace-relu", help="Add a row with every ReLU in place."),
    mode: list[str] | None = typer.Option(
        None, "--mode", metavar="MODE", help="Add a row per mode: eval (no_grad inference) | train (repeatable)."
    ),
    batch_size: list[int] | None = typer.Option(
        None,
        "--batch-size",
        "-b",
        metavar="N",
        help="Batch size of the baseline; more values add rows (repeatable) [default: 32, or the config's].",
    ),
    seq_len: list[int] | None = typer.Option(
        None,
        "--seq-len",
        help="Tokens per sample of the baseline; more values add rows (repeatable) \\[default: the model's].",
    ),
    loop: list[str] | None = typer.Option(
        None,
        "--loop",
        help="Add a row per training-loop shape: trainer (output dropped before backward) | plain (repeatable).",
    ),
    attn: str | None = ATTN_OPT,
    padding: bool = PADDING_OPT,
    routing: str | None = ROUTING_OPT,
    baseline_dtype: str | None = typer.Option(
        None, "--baseline-dtype", metavar="DTYPE", help="dtype of the baseline [default: fp32]."
    ),
    baseline_optimizer: str | None = typer.Option(
        None, "--baseline-optimizer", metavar="NAME", help="Optimizer of the baseline [default: adam]."
    ),
    freeze: list[str] | None = typer.Option(
        None,
        "--freeze",
        metavar="GLOB",
        help="Add a row with these module-name globs frozen (backbone.*; comma-separated; repeatable).",
    ),
    lora_rank: list[int] | None = typer.Option(
        None, "--lora-rank", metavar="R", help="Add a row with LoRA adapters of this rank (peft; repeatable)."
    ),
    lora_alpha: float | None = typer.Option(
        None, "--lora-alpha", metavar="ALPHA", help="LoRA alpha of the LoRA rows [default: 8]."
    ),
    lora_targets: str | None = typer.Option(
        None, "--lora-targets", metavar="NAMES", help="Modules the LoRA rows adapt: q_proj,v_proj or all-linear."
    ),
    lora_dropout: float | None = typer.Option(
        None, "--lora-dropout", metavar="P", help="LoRA dropout of the LoRA rows."
    ),
    quantize: list[str] | None = typer.Option(
        None,
        "--quantize",
        metavar="KIND",
        help="Add a row with the linear weights quantized: int8 | nf4 | fp4 (repeatable).",
    ),
    double_quant: bool = typer.Option(False, "--double-quant", help="4-bit rows use double quantization."),
    offload: list[str] | None = typer.Option(
        None, "--offload", metavar="WHAT", help="Add a row with the optimizer state on the CPU: optimizer."
    ),
    combine: bool = typer.Option(
        False, "--combine", help="One row per combination of the axes instead of one row per value."
    ),
    input_shape: list[str] | None = INPUT_SHAPE_OPT,
    input_dtype: str | None = INPUT_DTYPE_OPT,
    token_range: str | None = TOKEN_RANGE_OPT,
    model_kwargs: str | None = MODEL_KWARGS_OPT,
    model_arg: list[str] | None = MODEL_ARG_OPT,
    gpu_memory: str | None = GPU_MEMORY_OPT,
    gpu: str | None = GPU_OPT,
    gpu_arch: str | None = GPU_ARCH_OPT,
    cudnn_benchmark: bool = CUDNN_BENCHMARK_OPT,
    headroom: float = HEADROOM_OPT,
    max_batch: int | None = typer.Option(
        None, "--max-batch", metavar="N", help="Largest batch the fit columns consider."
    ),
    no_fit: bool = typer.Option(False, "--no-fit", help="Leave out the largest-batch columns (faster)."),
    device: str | None = typer.Option(
        None,
        "--device",
        "-d",
        metavar="DEVICE",
        help="cuda (predict a CUDA step) or cpu (predict and --measure a CPU "
        "step) [default: cuda; cpu when --memory-limit is given].",
    ),
    memory_limit: str | None = typer.Option(
        None,
        "--memory-limit",
        metavar="SIZE",
        help="CPU: the capacity (8GiB) for the fit columns; --measure flags rows above it; --find-batch runs under it.",
    ),
    measure: bool = typer.Option(
        False, "--measure", help="Also run each row's real step at its batch size and show predicted vs measured."
    ),
    find: bool = typer.Option(
        False, "--find-batch", help="With --measure: also find each row's largest batch with real steps (slow)."
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        metavar="FILE",
        help="Write the breakdown bars: file.svg, .png, .pdf or .html.",
    ),
    strategy: list[str] | None = typer.Option(
        None,
        "--strategy",
        help="Add a row per data-parallel strategy (one rank's memory): ddp | fsdp | zero1 | zero2 | zero3 | none "
        "(repeatable, or a comma list).",
    ),
    world_size: int | None = typer.Option(None, "--world-size", help="Ranks for the --strategy rows \\[default: 8]."),
    baseline_strategy: str | None = typer.Option(
        None, "--baseline-strategy", help="Strategy of the baseline \\[default: none, one process]."
    ),
    force: bool = FORCE_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Compare precisions, optimizers and memory-saving techniques for one model.

    The baseline is the workload as given (fp32, Adam, batch 32 by default); each value of
    --dtype, --optimizer, --checkpointing, --inplace-relu, --mode, --batch-size and
    --strategy adds a row (--combine: every combination); --strategy rows are one rank of
    --world-size.
    Without any, rows for amp-fp16, amp-bf16, fp16 and per-block checkpointing. Every row
    is traced on fake tensors (no GPU needed): parameters, gradients, optimizer state,
    activations, temporaries, the peak and where it happens, the change vs the baseline
    and, with a capacity (--gpu-memory, the local GPU, or --memory-limit on the CPU), the
    largest and recommended batch.
    """
    from ..errors import Interrupted, NoGPUError, UsageError
    from ..units import parse_bytes

    head = check_headroom(headroom)
    limit = parse_bytes(memory_limit) if memory_limit else None
    device = (device or ("cpu" if limit is not None else "cuda")).strip().lower()
    if device.startswith("cuda:"):
        device = "cuda"
    if device not in ("cuda", "cpu"):
        raise UsageError(f"unknown device {device!r}", "write cuda or cpu")
    if device == "cuda" and limit is not None:
        raise UsageError("--memory-limit is for --device cpu", "on a GPU use --gpu-memory 24GiB for the capacity")
    if device == "cpu" and gpu_memory:
        raise UsageError("--gpu-memory is for --device cuda", "on the CPU the capacity is --memory-limit 8GiB")
    if device == "cpu" and (gpu or gpu_arch):
        raise UsageError("--gpu and --gpu-arch are for --device cuda", "leave them out to predict a CPU step")
    from ..engine.catalog import resolve_target

    cuda_target = resolve_target(gpu, gpu_arch, cudnn_benchmark=cudnn_benchmark) if device == "cuda" else None
    if find and not measure:
        raise UsageError("--find-batch runs real steps: it needs --measure", "add --measure")
    if find and device == "cpu" and limit is None:
        raise UsageError("--find-batch on the CPU needs --memory-limit", "e.g. --device cpu --memory-limit 8GiB")
    if max_batch is not None and max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {max_batch}", "e.g. --max-batch 4096")
    if measure and device == "cuda" and not _has_cuda():
        raise NoGPUError(
            "--measure needs a CUDA GPU and none is available",
            "measure on the CPU instead: --device cpu --memory-limit 8GiB (predictions then target the "
            "CPU), or leave out --measure",
        )
    batches = list(batch_size or [])
    if any(b <= 0 for b in batches):
        raise UsageError(f"batch size must be a positive integer, got {min(batches)}", "e.g. --batch-size 32")
    seqs = list(seq_len or [])
    if any(s <= 0 for s in seqs):
        raise UsageError(f"--seq-len must be a positive integer, got {min(seqs)}", "e.g. --seq-len 4096")

    from ..commands.compare import (
        compare,
        normalize_axes,
        real_batch_finder,
        real_step_measurer,
        resolve_capacity,
        strategy_value,
    )

    strategies = [v.strip() for item in strategy or [] for v in item.split(",") if v.strip()]
    if world_size is not None and not (strategies or baseline_strategy):
        raise UsageError("--world-size needs --strategy", "e.g. --strategy ddp,fsdp --world-size 8")
    ranks = world_size if world_size is not None else DEFAULT_WORLD_SIZE
    axes: dict[str, list[Any]] = {}
    for name, values in (
        ("dtype", dtype),
        ("optimizer", optimizer),
        ("checkpointing", checkpointing),
        ("mode", mode),
        ("loop", loop),
        ("batch_size", batches[1:]),
        ("seq_len", seqs[1:]),
    ):
        if values:
            axes[name] = list(values)
    if inplace_relu:
        axes["inplace_relu"] = [True]
    if strategies:
        axes["strategy"] = [strategy_value(name, ranks) for name in strategies]
    if freeze:
        axes["freeze"] = list(freeze)
    if lora_rank:
        from ..commands.workload import lora_spec

        axes["lora"] = [lora_spec(r, lora_alpha, lora_targets, lora_dropout) for r in lora_rank]
    elif lora_alpha is not None or lora_targets or lora_dropout is not None:
        raise UsageError("--lora-alpha/--lora-targets/--lora-dropout set the LoRA rows", "add --lora-rank 16")
    if quantize:
        axes["quantize"] = [q + ("+dq" if double_quant else "") for q in quantize]
    elif double_quant:
        raise UsageError("--double-quant sets the 4-bit rows", "add --quantize nf4")
    if offload:
        axes["offload"] = list(offload)
    axes = normalize_axes(axes)  # bad values fail before the model loads
    with OutputFiles(force) as files:
        if plot is not None:
            from ..render.charts import check_plot_path

            check_plot_path(plot)
            files.claim(plot, "--plot")
        workload = build_workload(
            model,
            model_opt,
            batch_size=batches[0] if batches else None,
            dtype=baseline_dtype,
            optimizer=baseline_optimizer,
            input_shape=input_shape,
            input_dtype=input_dtype,
            token_range=token_range,
            model_kwargs=model_kwargs,
            model_arg=model_arg,
            seq_len=seqs[0] if seqs else None,
            attn=attn,
            padding=padding,
            routing=routing,
            strategy=baseline_strategy,
            world_size=ranks if baseline_strategy not in (None, "none") else None,
        )
        gpu_bytes = parse_bytes(gpu_memory) if gpu_memory else None
        catalog_gpu = cuda_target.gpu if cuda_target is not None and gpu else None
        capacity, capacity_note = (None, None) if no_fit else resolve_capacity(device, gpu_bytes, limit, catalog_gpu)
        measure_fn = real_step_measurer(device, limit) if measure else None
        find_fn = real_batch_finder(device, limit, head, max_batch) if find else None

        def progress(i: int, n: int, label: str) -> None:
            print(f"[{i}/{n}] tracing {label} ...", file=sys.stderr, flush=True)

        target: Target = "cpu" if device == "cpu" else "cuda"
        codes = []
        try:
            result = compare(
                workload,
                axes or None,
                combine=combine,
                target=target,
                capacity=capacity,
                capacity_note=capacity_note,
                headroom=head,
                fit=not no_fit,
                max_batch=max_batch,
                measure_fn=measure_fn,
                find_fn=find_fn,
                on_progress=progress,
                cuda_target=cuda_target,
                gpu=catalog_gpu,
            )
        except Interrupted as exc:  # Ctrl-C after the baseline: the rows traced so far
            result = exc.partial
            codes.append(EXIT_INTERRUPTED)
        # the report first: whatever happens to the plot file, it is on the screen
        if json_out:
            emit_json(compare_document(result))
        else:
            from ..render import stdout_console
            from ..render.compare import render_compare

            render_compare(result, stdout_console())
        if plot is not None:
            from ..render.compare import write_plot

            if not files.write(plot, lambda path: write_plot(result, path), "plot"):
                codes.append(EXIT_OUTPUT)
    from ..render import print_error

    failed = [r for r in result.rows if r.error is not None]
    if failed:
        print_error(
            f"{len(failed)} of {len(result.rows)} configurations could not be traced: "
            + "; ".join(f"{r.label}: {r.error}" for r in failed),
            "the table shows the others; change or drop the failing options",
        )
        codes.append(EXIT_PARTIAL)
    if EXIT_INTERRUPTED in codes:
        print_error("interrupted", "the table above shows the configurations traced before Ctrl-C")
    raise typer.Exit(exit_code(*codes))
