"""``memprof estimate MODEL``: one training step's memory, by trace and by formula, and the batch that fits."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from ..engine.fit import check_headroom
from . import (
    EXIT_DOES_NOT_FIT,
    EXIT_INTERRUPTED,
    EXIT_NOTHING_FITS,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_PARTIAL,
    command,
    emit_json,
    exit_code,
    handle_errors,
)
from .common import (
    ATTN_OPT,
    BATCH_OPT,
    BUCKET_CAP_OPT,
    BUCKET_VIEW_OPT,
    CHECKPOINTING_OPT,
    CUDNN_BENCHMARK_OPT,
    DOUBLE_QUANT_OPT,
    DTYPE_OPT,
    FORCE_OPT,
    FREEZE_OPT,
    GPU_ARCH_OPT,
    GPU_MEMORY_OPT,
    GPU_OPT,
    HEADROOM_OPT,
    INPUT_DTYPE_OPT,
    INPUT_SHAPE_OPT,
    JSON_OPT,
    KV_CACHE_OPT,
    LOOP_OPT,
    LORA_ALPHA_OPT,
    LORA_DROPOUT_OPT,
    LORA_RANK_OPT,
    LORA_TARGETS_OPT,
    MODE_OPT,
    MODEL_ARG,
    MODEL_ARG_OPT,
    MODEL_KWARGS_OPT,
    MODEL_OPT,
    NEW_TOKENS_OPT,
    OFFLOAD_OPT,
    OPTIMIZER_OPT,
    PADDING_OPT,
    QUANTIZE_OPT,
    ROUTING_OPT,
    SEQ_LEN_OPT,
    STRATEGY_OPT,
    TOKEN_RANGE_OPT,
    TRAIN_ONLY_OPT,
    WORLD_SIZE_OPT,
    build_workload,
    parse_capacity,
    parse_int_list,
    parse_world_sizes,
)
from .output import OutputFiles


def estimate_document(result) -> dict[str, Any]:
    """The ``--json`` document: ``schema_version``, ``kind: "estimate"`` and the result (bytes as ints)."""
    from ..results import document

    doc = document("estimate", result)
    traced = doc.get("traced")
    if isinstance(traced, dict):  # "exact trace + N modelled": the modelled parts' sum at the peak
        traced["modelled_bytes"] = sum(int(m.get("bytes") or 0) for m in traced.get("modelled") or [])
    if isinstance(traced, dict) and isinstance(traced.get("timeline"), list):
        traced["timeline_points"] = len(traced["timeline"])
        del traced["timeline"]  # large; `memprof profile` is the command for timelines
    return doc


@command("estimate")
@handle_errors
def estimate_cmd(
    model: str | None = MODEL_ARG,
    model_opt: str | None = MODEL_OPT,
    batch_size: int | None = BATCH_OPT,
    dtype: str | None = DTYPE_OPT,
    optimizer: str | None = OPTIMIZER_OPT,
    mode: str | None = MODE_OPT,
    input_shape: list[str] | None = INPUT_SHAPE_OPT,
    input_dtype: str | None = INPUT_DTYPE_OPT,
    token_range: str | None = TOKEN_RANGE_OPT,
    freeze: list[str] | None = FREEZE_OPT,
    train_only: list[str] | None = TRAIN_ONLY_OPT,
    lora_rank: int | None = LORA_RANK_OPT,
    lora_alpha: float | None = LORA_ALPHA_OPT,
    lora_targets: str | None = LORA_TARGETS_OPT,
    lora_dropout: float | None = LORA_DROPOUT_OPT,
    quantize: str | None = QUANTIZE_OPT,
    double_quant: bool = DOUBLE_QUANT_OPT,
    offload: str | None = OFFLOAD_OPT,
    model_kwargs: str | None = MODEL_KWARGS_OPT,
    model_arg: list[str] | None = MODEL_ARG_OPT,
    seq_len: int | None = SEQ_LEN_OPT,
    loop: str | None = LOOP_OPT,
    attn: str | None = ATTN_OPT,
    padding: bool = PADDING_OPT,
    new_tokens: int | None = NEW_TOKENS_OPT,
    kv_cache: str | None = KV_CACHE_OPT,
    routing: str | None = ROUTING_OPT,
    checkpointing: str = CHECKPOINTING_OPT,
    gpu_memory: str | None = GPU_MEMORY_OPT,
    gpu: str | None = GPU_OPT,
    gpu_arch: str | None = GPU_ARCH_OPT,
    cudnn_benchmark: bool = CUDNN_BENCHMARK_OPT,
    headroom: float = HEADROOM_OPT,
    fit: str | None = typer.Option(
        None,
        "--fit",
        help="What to fit to the capacity: batch (the largest batch at this sequence length) or seq-len (also the "
        "longest sequence at this batch) \\[default: batch; both with --mode generate].",
    ),
    multiple_of: int = typer.Option(1, "--multiple-of", help="--fit seq-len: the answer is a multiple of this."),
    grid: bool = typer.Option(
        False, "--grid", help="Which batch x sequence-length combinations fit (needs a capacity; traces a few dozen)."
    ),
    grid_batches: str | None = typer.Option(
        None, "--grid-batches", help="--grid: batch sizes, e.g. 1,2,4,8 \\[default: 1,2,4,...,64]."
    ),
    grid_seq_lens: str | None = typer.Option(
        None,
        "--grid-seq-lens",
        help="--grid: sequence lengths, e.g. 1024,2048,4096 \\[default: powers of two up to the model's positions].",
    ),
    layers: int = typer.Option(
        10, "--layers", "-l", metavar="N", help="Show the top N layers by activation; 0 shows all."
    ),
    all_layers: bool = typer.Option(False, "--all-layers", help="Show every layer, in execution order."),
    no_trace: bool = typer.Option(False, "--no-trace", help="Formula only: skip the fake-tensor trace (fastest)."),
    device: str = typer.Option(
        "cuda",
        "--device",
        metavar="DEVICE",
        help="The step to predict: cuda (cuda:N), or cpu: the same step run on the CPU.",
    ),
    memory_limit: str | None = typer.Option(
        None, "--memory-limit", metavar="SIZE", help="--device cpu: the capacity to fit, e.g. 8GiB \\[default: no fit]."
    ),
    verify: bool = typer.Option(
        False, "--verify", help="Also run the real step on the device; print predicted vs measured and the error."
    ),
    strategy: str | None = STRATEGY_OPT,
    world_size: str | None = WORLD_SIZE_OPT,
    bucket_cap_mb: float | None = BUCKET_CAP_OPT,
    gradient_as_bucket_view: bool = BUCKET_VIEW_OPT,
    plot: Path | None = typer.Option(
        None,
        "--plot",
        metavar="FILE",
        help="Write a chart (.svg, .png, .pdf or .html): with --grid the batch x sequence-length grid; "
        "with several --world-size values the per-rank chart.",
    ),
    force: bool = FORCE_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Estimate one training step's memory (traced and by formula) and the largest batch that fits.

    --device cpu predicts the step on the CPU (live tensor bytes, oneDNN scratch included);
    --verify then runs it for real and prints predicted vs measured (on CUDA: allocated,
    reserved and NVML).

    With --strategy (ddp, fsdp, zero1, zero2, zero3) and --world-size N, everything is one
    rank's: PyTorch's DDP / FSDP2 code traced over a fake process group of N ranks. Several
    world sizes (--world-size 1,2,8,64,1024) print one rank's peak and largest batch at each.

    Exit codes: 0 it fits (or no capacity is known), 1 the batch does not fit but a smaller one
    does, 4 not even batch 1 fits, 5 the trace failed and the answer is the formula's only (the
    ERROR line says why), 2 bad input, 3 --verify needs a GPU and there is none; see memprof
    --help for all.
    """
    from ..errors import Interrupted, UsageError

    head = check_headroom(headroom)
    if layers < 0:
        raise UsageError(f"--layers must be 0 or more, got {layers}", "--layers 0 (or --all-layers) shows every layer")
    if fit not in (None, "batch", "seq-len", "seq_len"):
        raise UsageError(f"--fit must be batch or seq-len, got {fit!r}", "--fit seq-len: the longest sequence")
    if multiple_of < 1:
        raise UsageError(f"--multiple-of must be at least 1, got {multiple_of}", "e.g. --multiple-of 64")
    batches = parse_int_list(grid_batches, "--grid-batches") if grid_batches else None
    seq_lens = parse_int_list(grid_seq_lens, "--grid-seq-lens") if grid_seq_lens else None
    want_grid = grid or batches is not None or seq_lens is not None
    from ..commands.estimate import estimate, estimate_capacity, parse_device

    sizes = parse_world_sizes(world_size, strategy)
    sweep = sizes is not None and len(sizes) > 1
    if want_grid and sweep:
        raise UsageError("--grid and several --world-size values are two charts", "run them one at a time")
    if plot is not None:
        from ..render.charts import check_plot_path

        check_plot_path(plot)
        if not want_grid and not sweep:
            raise UsageError(
                "--plot draws the --grid chart or a world-size sweep",
                "add --grid, or give several sizes: --world-size 1,2,8,64,1024",
            )
    if verify and strategy is not None:
        raise UsageError(
            "--verify runs one process's step, not a data-parallel job",
            "profile the real job: memprof profile --nproc-per-node N script.py",
        )
    from ..engine.catalog import resolve_target

    target_name, _ = parse_device(device)
    target = resolve_target(gpu, gpu_arch, cudnn_benchmark=cudnn_benchmark)  # bad names fail before the model loads
    capacity, note = estimate_capacity(
        device, parse_capacity(gpu_memory), parse_capacity(memory_limit), gpu=target.gpu if gpu else None
    )
    workload = build_workload(
        model,
        model_opt,
        batch_size=batch_size,
        dtype=dtype,
        optimizer=optimizer,
        mode=mode,
        input_shape=input_shape,
        input_dtype=input_dtype,
        token_range=token_range,
        model_kwargs=model_kwargs,
        model_arg=model_arg,
        seq_len=seq_len,
        loop=loop,
        attn=attn,
        padding=padding,
        new_tokens=new_tokens,
        kv_cache=kv_cache,
        routing=routing,
        checkpointing=checkpointing,
        strategy=strategy,
        world_size=sizes[-1] if sizes else None,
        offload=offload,
        bucket_cap_mb=bucket_cap_mb,
        gradient_as_bucket_view=gradient_as_bucket_view,
        freeze=freeze,
        train_only=train_only,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        lora_dropout=lora_dropout,
        quantize=quantize,
        double_quant=double_quant,
    )
    if want_grid and capacity is None:
        raise UsageError(
            "--grid needs a capacity to fit",
            "pass --gpu-memory, e.g. --gpu-memory 80GiB (--device cpu: --memory-limit)",
        )
    grid_axes: tuple[list[int], list[int]] | bool | None = None
    if want_grid:
        from ..engine.fit import default_grid

        default_batches, default_seqs = default_grid(workload)
        grid_axes = (batches or default_batches, seq_lens or default_seqs)
    if sweep:
        assert sizes is not None
        _sweep(workload, sizes, capacity, note, head, no_trace, plot, json_out, force, target_name)

    def progress(message: str) -> None:  # the real-run fallback says what it will cost before it starts
        print(f"memprof: {message}", file=sys.stderr, flush=True)

    codes = []
    with OutputFiles(force) as files:
        files.claim(plot, "--plot")  # the --grid chart: before the work, a bad path fails now
        try:
            result = estimate(
                workload,
                capacity=capacity,
                headroom=head,
                traced=not no_trace,
                capacity_note=note,
                fit_seq_len=True if fit in ("seq-len", "seq_len") else None,
                multiple_of=multiple_of,
                grid=grid_axes,
                cuda_target=target,
                gpu=target.gpu if gpu else None,
                device=device,
                verify=verify,
                progress=progress,
            )
        except Interrupted as exc:  # Ctrl-C while tracing: the formula's answer is ready
            result = exc.partial
            codes.append(EXIT_INTERRUPTED)
        # the report first: whatever happens to the plot file, it is on the screen
        if json_out:
            emit_json(estimate_document(result))
        else:
            from ..render import stdout_console
            from ..render.estimate import render_estimate

            render_estimate(result, stdout_console(), layers=None if all_layers else layers)
        if plot is not None:
            from ..render.charts import grid_chart, write

            if result.grid is None:
                print("no plot written: the grid was not traced", file=sys.stderr)
            elif files.write(plot, lambda path: write(grid_chart(result), path), "plot"):
                print(f"wrote {plot}", file=sys.stderr)
            else:
                codes.append(EXIT_OUTPUT)
    from ..render import print_error

    if result.trace_error is not None:
        print_error(
            f"the training step could not be traced, so the estimate above is the formula's only: {result.trace_error}",
            result.trace_hint or "see the message above",
        )
        codes.append(EXIT_PARTIAL)
    if result.interrupted:
        print_error(
            "interrupted",
            "the estimate above is the formula's only: the trace was stopped by Ctrl-C"
            if result.traced is None
            else "the traced estimate above is complete; its fit is the formula's (its other traces were stopped)",
        )
    verdict = result.fit
    if verdict is not None and not verdict.fits:
        codes.append(EXIT_NOTHING_FITS if verdict.max_batch is None else EXIT_DOES_NOT_FIT)
    raise typer.Exit(exit_code(*codes))


def _sweep(workload, sizes, capacity, note, headroom, no_trace, plot, json_out, force, target="cuda") -> None:
    """``--world-size 1,2,8,...``: one row per size; exit 0, or 4 when no size fits batch 1."""
    import sys

    from ..commands.scaling import scale
    from ..errors import UsageError

    if no_trace:
        raise UsageError("a world-size sweep is traced", "leave out --no-trace")

    def progress(i: int, n: int, size: int) -> None:
        print(f"[{i}/{n}] tracing {size} rank{'s' if size > 1 else ''} ...", file=sys.stderr, flush=True)

    with OutputFiles(force) as files:
        files.claim(plot, "--plot")  # before the work: a bad path fails now
        result = scale(
            workload,
            sizes,
            capacity=capacity,
            capacity_note=note,
            headroom=headroom,
            target=target,
            on_progress=progress,
        )
        if json_out:
            from ..results import document

            emit_json(document("estimate-scaling", result))
        else:
            from ..render import stdout_console
            from ..render.scaling import render_scaling

            render_scaling(result, stdout_console())
        codes = []
        if plot is not None:
            from ..render.scaling import write_plot

            if files.write(plot, lambda path: write_plot(result, path), "plot"):
                print(f"wrote {plot}", file=sys.stderr)
            else:
                codes.append(EXIT_OUTPUT)
    if capacity is not None and all(r.max_batch is None for r in result.rows):
        codes.append(EXIT_NOTHING_FITS)
    raise typer.Exit(exit_code(EXIT_OK, *codes))
