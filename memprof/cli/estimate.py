"""``memprof estimate MODEL``: one training step's memory, by trace and by formula, and the batch that fits."""

from __future__ import annotations

from typing import Any

import typer

from ..engine.fit import check_headroom
from . import EXIT_DOES_NOT_FIT, EXIT_NOTHING_FITS, EXIT_OK, app, emit_json, handle_errors
from .common import (
    BATCH_OPT,
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
    TOKEN_RANGE_OPT,
    TRAIN_ONLY_OPT,
    build_workload,
    parse_capacity,
)


def estimate_document(result) -> dict[str, Any]:
    """The ``--json`` document: ``schema_version``, ``kind: "estimate"`` and the result (bytes as ints)."""
    from ..results import document

    doc = document("estimate", result)
    traced = doc.get("traced")
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
    json_out: bool = JSON_OPT,
) -> None:
    """Estimate one training step's memory (traced and by formula) and the largest batch that fits.

    --device cpu predicts the step on the CPU (live tensor bytes, oneDNN scratch included);
    --verify then runs it for real and prints predicted vs measured (on CUDA: allocated,
    reserved and NVML). Exit code 0 when it fits (or no capacity is known), 1 when the batch
    does not fit but a smaller one does, 4 when not even batch 1 fits, 2 for bad input, 3 when
    --verify needs a GPU and there is none.
    """
    from ..errors import UsageError

    head = check_headroom(headroom)
    if layers < 0:
        raise UsageError(f"--layers must be 0 or more, got {layers}", "--layers 0 (or --all-layers) shows every layer")
    from ..commands.estimate import estimate, estimate_capacity, parse_device
    from ..engine.catalog import resolve_target

    parse_device(device)
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
        freeze=freeze,
        train_only=train_only,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        lora_dropout=lora_dropout,
        quantize=quantize,
        double_quant=double_quant,
        offload=offload,
    )
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
