"""``memprof estimate MODEL``: one training step's memory, by trace and by formula, and the batch that fits."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from ..engine.fit import check_headroom
from . import EXIT_DOES_NOT_FIT, EXIT_NOTHING_FITS, EXIT_OK, app, emit_json, handle_errors
from .common import (
    BATCH_OPT,
    BUCKET_CAP_OPT,
    BUCKET_VIEW_OPT,
    CUDNN_BENCHMARK_OPT,
    DOUBLE_QUANT_OPT,
    DTYPE_OPT,
    FREEZE_OPT,
    GPU_ARCH_OPT,
    GPU_MEMORY_OPT,
    GPU_OPT,
    HEADROOM_OPT,
    INPUT_DTYPE_OPT,
    INPUT_SHAPE_OPT,
    JSON_OPT,
    LORA_ALPHA_OPT,
    LORA_DROPOUT_OPT,
    LORA_RANK_OPT,
    LORA_TARGETS_OPT,
    MODE_OPT,
    MODEL_ARG,
    MODEL_ARG_OPT,
    MODEL_KWARGS_OPT,
    MODEL_OPT,
    OFFLOAD_OPT,
    OPTIMIZER_OPT,
    QUANTIZE_OPT,
    STRATEGY_OPT,
    TOKEN_RANGE_OPT,
    TRAIN_ONLY_OPT,
    WORLD_SIZE_OPT,
    build_workload,
    check_output_path,
    parse_capacity,
    parse_world_sizes,
)


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


@app.command("estimate")
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
    gpu_memory: str | None = GPU_MEMORY_OPT,
    gpu: str | None = GPU_OPT,
    gpu_arch: str | None = GPU_ARCH_OPT,
    cudnn_benchmark: bool = CUDNN_BENCHMARK_OPT,
    headroom: float = HEADROOM_OPT,
    layers: int = typer.Option(10, "--layers", "-l", help="Show the top N layers by activation; 0 shows all."),
    all_layers: bool = typer.Option(False, "--all-layers", help="Show every layer, in execution order."),
    no_trace: bool = typer.Option(False, "--no-trace", help="Formula only: skip the fake-tensor trace (fastest)."),
    device: str = typer.Option(
        "cuda", "--device", help="The step to predict: cuda (cuda:N), or cpu: the same step run on the CPU."
    ),
    memory_limit: str | None = typer.Option(
        None, "--memory-limit", help="--device cpu: the capacity to fit, e.g. 8GiB \\[default: no fit]."
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
        help="With several --world-size values: write the per-rank chart (.svg, .png, .pdf or .html).",
    ),
    json_out: bool = JSON_OPT,
) -> None:
    """Estimate one training step's memory (traced and by formula) and the largest batch that fits.

    --device cpu predicts the step on the CPU (live tensor bytes, oneDNN scratch included);
    --verify then runs it for real and prints predicted vs measured (on CUDA: allocated,
    reserved and NVML).

    With --strategy (ddp, fsdp, zero1, zero2, zero3) and --world-size N, everything is one
    rank's: PyTorch's DDP / FSDP2 code traced over a fake process group of N ranks. Several
    world sizes (--world-size 1,2,8,64,1024) print one rank's peak and largest batch at each.

    Exit code 0 when it fits (or no capacity is known), 1 when the batch does not fit but a
    smaller one does, 4 when not even batch 1 fits, 2 for bad input, 3 when --verify needs a
    GPU and there is none.
    """
    from ..errors import UsageError

    head = check_headroom(headroom)
    if layers < 0:
        raise UsageError(f"--layers must be 0 or more, got {layers}", "--layers 0 (or --all-layers) shows every layer")
    from ..commands.estimate import estimate, estimate_capacity, parse_device

    sizes = parse_world_sizes(world_size, strategy)
    if plot is not None:
        from ..render.charts import check_plot_path

        check_output_path(plot)
        check_plot_path(plot)
        if sizes is None or len(sizes) < 2:
            raise UsageError("--plot draws a world-size sweep", "give several sizes: --world-size 1,2,8,64,1024")
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
    if sizes is not None and len(sizes) > 1:
        _sweep(workload, sizes, capacity, note, head, no_trace, plot, json_out, target_name)

    def progress(message: str) -> None:  # the real-run fallback says what it will cost before it starts
        print(f"memprof: {message}", file=sys.stderr, flush=True)

    result = estimate(
        workload,
        capacity=capacity,
        headroom=head,
        traced=not no_trace,
        capacity_note=note,
        cuda_target=target,
        gpu=target.gpu if gpu else None,
        device=device,
        verify=verify,
        progress=progress,
    )
    if json_out:
        emit_json(estimate_document(result))
    else:
        from ..render import stdout_console
        from ..render.estimate import render_estimate

        render_estimate(result, stdout_console(), layers=None if all_layers else layers)
    fit = result.fit
    if fit is None or fit.fits:
        raise typer.Exit(EXIT_OK)
    raise typer.Exit(EXIT_NOTHING_FITS if fit.max_batch is None else EXIT_DOES_NOT_FIT)


def _sweep(workload, sizes, capacity, note, headroom, no_trace, plot, json_out, target="cuda") -> None:
    """``--world-size 1,2,8,...``: one row per size; exit 0, or 4 when no size fits batch 1."""
    import sys

    from ..commands.scaling import scale
    from ..errors import UsageError

    if no_trace:
        raise UsageError("a world-size sweep is traced", "leave out --no-trace")

    def progress(i: int, n: int, size: int) -> None:
        print(f"[{i}/{n}] tracing {size} rank{'s' if size > 1 else ''} ...", file=sys.stderr, flush=True)

    result = scale(
        workload, sizes, capacity=capacity, capacity_note=note, headroom=headroom, target=target, on_progress=progress
    )
    if plot is not None:
        from ..render.scaling import write_plot

        write_plot(result, plot)
        print(f"wrote {plot}", file=sys.stderr)
    if json_out:
        from ..results import document

        emit_json(document("estimate-scaling", result))
    else:
        from ..render import stdout_console
        from ..render.scaling import render_scaling

        render_scaling(result, stdout_console())
    if capacity is not None and all(r.max_batch is None for r in result.rows):
        raise typer.Exit(EXIT_NOTHING_FITS)
    raise typer.Exit(EXIT_OK)
