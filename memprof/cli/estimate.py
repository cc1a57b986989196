"""``memprof estimate MODEL``: one training step's memory, by trace and by formula, and the batch that fits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..engine.fit import check_headroom
from . import EXIT_DOES_NOT_FIT, EXIT_NOTHING_FITS, EXIT_OK, app, emit_json, handle_errors
from .common import (
    ATTN_OPT,
    BATCH_OPT,
    CHECKPOINTING_OPT,
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
    TOKEN_RANGE_OPT,
    TRAIN_ONLY_OPT,
    build_workload,
    check_output_path,
    parse_capacity,
    parse_int_list,
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
    plot: Path | None = typer.Option(
        None, "--plot", help="--grid: write the chart, file.svg or file.png (png needs matplotlib)."
    ),
    layers: int = typer.Option(10, "--layers", "-l", help="Show the top N layers by activation; 0 shows all."),
    all_layers: bool = typer.Option(False, "--all-layers", help="Show every layer, in execution order."),
    no_trace: bool = typer.Option(False, "--no-trace", help="Formula only: skip the fake-tensor trace (fastest)."),
    json_out: bool = JSON_OPT,
) -> None:
    """Estimate one training step's memory (traced and by formula) and the largest batch that fits.

    Exit code 0 when it fits (or no capacity is known), 1 when the batch does not fit
    but a smaller one does, 4 when not even batch 1 fits, 2 for bad input.
    """
    from ..errors import UsageError

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
    if plot is not None:
        if not want_grid:
            raise UsageError("--plot draws the --grid chart", "add --grid")
        from ..render.charts import check_plot_path

        check_output_path(plot)
        check_plot_path(plot)
    capacity_bytes = parse_capacity(gpu_memory)
    from ..engine.catalog import resolve_target

    target = resolve_target(gpu, gpu_arch, cudnn_benchmark=cudnn_benchmark)  # bad names fail before the model loads
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
    from ..commands.estimate import estimate, resolve_capacity

    capacity, note = resolve_capacity(capacity_bytes, gpu=target.gpu if gpu else None)
    if want_grid and capacity is None:
        raise UsageError("--grid needs a capacity to fit", "pass --gpu-memory, e.g. --gpu-memory 80GiB")
    grid_axes: tuple[list[int], list[int]] | bool | None = None
    if want_grid:
        from ..engine.fit import default_grid

        default_batches, default_seqs = default_grid(workload)
        grid_axes = (batches or default_batches, seq_lens or default_seqs)
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
    )
    if plot is not None and result.grid is not None:
        import sys

        from ..render.charts import write_grid_chart

        write_grid_chart(result, plot)
        print(f"wrote {plot}", file=sys.stderr)
    if json_out:
        emit_json(estimate_document(result))
    else:
        from ..render import stdout_console
        from ..render.estimate import render_estimate

        render_estimate(result, stdout_console(), layers=None if all_layers else layers)
    verdict = result.fit
    if verdict is None or verdict.fits:
        raise typer.Exit(EXIT_OK)
    raise typer.Exit(EXIT_NOTHING_FITS if verdict.max_batch is None else EXIT_DOES_NOT_FIT)
