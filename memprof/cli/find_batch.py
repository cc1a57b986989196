"""``memprof find-batch MODEL``: the largest batch that really fits, in a handful of real trials."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from ..engine.fit import check_headroom
from . import EXIT_INTERRUPTED, EXIT_NOTHING_FITS, EXIT_OK, EXIT_OUTPUT, command, emit_json, exit_code, handle_errors
from .common import (
    ATTN_OPT,
    CHECKPOINTING_OPT,
    CUDNN_BENCHMARK_OPT,
    DOUBLE_QUANT_OPT,
    DTYPE_OPT,
    FORCE_OPT,
    FREEZE_OPT,
    GPU_ARCH_OPT,
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
    build_workload,
    parse_bytes_list,
)
from .output import OutputFiles


def find_batch_document(result) -> dict[str, Any]:
    """The ``--json`` document: ``schema_version``, ``kind: "find-batch"`` and the result (bytes as ints)."""
    from ..results import document

    return document("find-batch", result)


@command("find-batch")
@handle_errors
def find_batch_cmd(
    model: str | None = MODEL_ARG,
    model_opt: str | None = MODEL_OPT,
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
    loop: str | None = typer.Option(
        None, "--loop", help="Training loop shape: plain (output kept through backward, default) or trainer."
    ),
    attn: str | None = ATTN_OPT,
    padding: bool = PADDING_OPT,
    new_tokens: int | None = NEW_TOKENS_OPT,
    routing: str | None = ROUTING_OPT,
    checkpointing: str = CHECKPOINTING_OPT,
    search: str = typer.Option(
        "batch",
        "--search",
        help="What to search: batch (the largest batch) or seq-len (the longest sequence at --batch-size, "
        "a multiple of --multiple-of tokens).",
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", "-b", help="--search seq-len: the batch size to search the sequence length at [1]."
    ),
    device: str | None = typer.Option(
        None,
        "--device",
        "-d",
        metavar="DEVICE",
        help="cuda, cuda:N, or cpu (with --memory-limit) [default: cuda; cpu when --memory-limit is given]",
    ),
    memory_limit: str | None = typer.Option(
        None,
        "--memory-limit",
        metavar="SIZE",
        help="CPU only: cap live tensor bytes at this size (4GiB); crossing it raises PyTorch's out-of-memory error.",
    ),
    steps: int = typer.Option(
        2, "--steps", metavar="N", help="Training steps per trial (the first creates optimizer state)."
    ),
    min_batch: int = typer.Option(1, "--min-batch", metavar="N", help="Smallest batch to consider."),
    max_batch: int = typer.Option(4096, "--max-batch", metavar="N", help="Never try a batch above this."),
    start: int | None = typer.Option(
        None, "--start", metavar="N", help="First batch to try [default: the prediction]."
    ),
    headroom: float = HEADROOM_OPT,
    multiple_of: int | None = typer.Option(
        None, "--multiple-of", metavar="N", help="Round the recommended batch down to a multiple of this (8, 64, ...)."
    ),
    target_global_batch: int | None = typer.Option(
        None,
        "--target-global-batch",
        metavar="N",
        help="Global batch you want: prints the gradient-accumulation steps to reach it with the recommended batch.",
    ),
    gpu: str | None = GPU_OPT,
    gpu_arch: str | None = GPU_ARCH_OPT,
    cudnn_benchmark: bool = CUDNN_BENCHMARK_OPT,
    isolate: bool = typer.Option(False, "--isolate", help="Run each trial in a fresh child process."),
    no_predict: bool = typer.Option(False, "--no-predict", help="Do not trace a prediction first: grow geometrically."),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        metavar="FILE",
        help="Write a plot of peak memory vs batch: file.svg, .png, .pdf or .html.",
    ),
    no_chart: bool = typer.Option(False, "--no-chart", help="Do not draw the chart in the terminal."),
    nproc_per_node: int | None = typer.Option(
        None,
        "--nproc-per-node",
        help="Run the trials as a real torchrun job of N processes (with --strategy): the largest batch per rank.",
    ),
    strategy: str | None = STRATEGY_OPT,
    nnodes: int = typer.Option(1, "--nnodes", help="torchrun: nodes of the job (run memprof on each)."),
    node_rank: int = typer.Option(0, "--node-rank", help="torchrun: this node's rank (rank 0's node reports)."),
    rdzv_endpoint: str | None = typer.Option(None, "--rdzv-endpoint", help="torchrun: HOST:PORT for several nodes."),
    rdzv_id: str | None = typer.Option(None, "--rdzv-id", help="torchrun: the job's rendezvous id."),
    rdzv_backend: str = typer.Option("c10d", "--rdzv-backend", help="torchrun: rendezvous backend."),
    collective_timeout: float = typer.Option(
        120.0,
        "--collective-timeout",
        help="Seconds a rank waits in a collective when another ran out of memory where it did not.",
    ),
    force: bool = FORCE_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Find the largest batch whose real training steps fit, and the batch to use.

    Runs the real training step (forward, backward, optimizer step) --steps times per
    trial, guided by the traced prediction: typically 2-5 trials and 1-2 out-of-memory
    errors, and the answer is exact (it fits, one more does not). Without a GPU,
    --device cpu --memory-limit 4GiB runs the same steps on the CPU under an enforced cap.
    With --nproc-per-node N --strategy ddp|fsdp the trials run as a real torchrun job: every
    rank runs every trial, an out-of-memory error on any rank counts for all, and the answer is
    the largest batch per rank that fits on every rank (NCCL on GPUs; gloo on the CPU, where
    --memory-limit caps each rank, or gives one cap per local rank: 4GiB,3GiB).

    Exit codes: 0 found, 4 not even the smallest batch fits, 3 no GPU, 2 bad input,
    6 the --plot file could not be written (the report is printed), 130 interrupted
    (what was found so far is printed); see memprof --help for all.
    """
    from ..errors import UsageError

    head = check_headroom(headroom)
    limits = parse_bytes_list(memory_limit) if memory_limit else None
    if isinstance(limits, list) and nproc_per_node is None:
        raise UsageError("one --memory-limit per rank needs --nproc-per-node", "give one limit, e.g. 4GiB")
    limit = limits if isinstance(limits, int) else None
    if strategy is not None and nproc_per_node is None:
        raise UsageError(
            "--strategy in find-batch runs a real job: it needs --nproc-per-node",
            "add --nproc-per-node 2 (or use `memprof estimate --strategy` for a prediction)",
        )
    if device is None and limits is not None:
        device = "cpu"
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}", "use 2 or more")
    if device is None:
        device = "cpu" if limit is not None else "cuda"
    if search not in ("batch", "seq-len", "seq_len"):
        raise UsageError(f"--search must be batch or seq-len, got {search!r}", "--search seq-len: the longest sequence")
    by_seq = search != "batch"
    if batch_size is not None and not by_seq:
        raise UsageError(
            "--batch-size is what find-batch searches", "add --search seq-len to search the sequence length"
        )
    if by_seq and nproc_per_node is not None:
        raise UsageError(
            "--search seq-len runs in one process", "leave out --nproc-per-node, or search the batch per rank"
        )
    on_cpu = device.strip().lower() == "cpu"
    if on_cpu and (gpu or gpu_arch):
        raise UsageError("--gpu and --gpu-arch are for CUDA trials", "leave them out with --device cpu")
    from ..engine.catalog import resolve_target

    cuda_target = None if on_cpu else resolve_target(gpu, gpu_arch, cudnn_benchmark=cudnn_benchmark)
    with OutputFiles(force) as files:
        if plot is not None:
            from ..render.charts import check_plot_path

            check_plot_path(plot)
            files.claim(plot, "--plot")
        if not on_cpu and limits is None:
            _require_cuda(device)
        workload = build_workload(
            model,
            model_opt,
            dtype=dtype,
            optimizer=optimizer,
            mode=mode,
            input_shape=input_shape,
            input_dtype=input_dtype,
            token_range=token_range,
            model_kwargs=model_kwargs,
            model_arg=model_arg,
            batch_size=batch_size if by_seq else None,
            seq_len=seq_len,
            loop=loop,
            attn=attn,
            padding=padding,
            new_tokens=new_tokens,
            routing=routing,
            checkpointing=checkpointing,
            strategy=strategy,
            world_size=nproc_per_node * nnodes if strategy and nproc_per_node else None,
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
        from ..commands.find_batch import find_batch, find_batch_torchrun
        from ..render import print_error, stderr_console, stdout_console
        from ..render.find_batch import TrialProgress, render_find_batch

        if nproc_per_node is not None:
            from ..engine.torchrun import Launch

            launch = Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id, rdzv_backend)
            with TrialProgress(stderr_console()) as progress:
                found = find_batch_torchrun(
                    workload,
                    launch,
                    device=device,
                    memory_limit=limits,
                    steps=steps,
                    min_batch=min_batch,
                    max_batch=max_batch,
                    start=start,
                    headroom=head,
                    multiple_of=multiple_of,
                    target_global_batch=target_global_batch,
                    predict=not no_predict,
                    collective_timeout=collective_timeout,
                    on_event=progress.on_event,
                )
            if found is None:
                print(f"node {node_rank}: this node's ranks ran the trials; rank 0's node reports the result")
                raise typer.Exit(EXIT_OK)
            result = found
        else:
            with TrialProgress(stderr_console(), unit="tokens" if by_seq else "batch") as progress:
                result = find_batch(
                    workload,
                    device=device,
                    memory_limit=limit,
                    steps=steps,
                    min_batch=min_batch,
                    max_batch=max_batch,
                    start=start,
                    headroom=head,
                    multiple_of=multiple_of,
                    target_global_batch=target_global_batch,
                    isolate=isolate,
                    predict=not no_predict,
                    on_event=progress.on_event,
                    search_axis="seq_len" if by_seq else "batch_size",
                    seq_multiple_of=(multiple_of or 1) if by_seq else 1,
                    cuda_target=cuda_target,
                )
        # the report first: whatever happens to the files, it is on the screen
        if json_out:
            emit_json(find_batch_document(result))
        else:
            render_find_batch(result, stdout_console(), chart=not no_chart)
        codes = []
        if plot is not None:
            from ..render.find_batch import write_plot

            if not result.trials:
                print("no plot written: no trial ran", file=sys.stderr)
            elif not files.write(plot, lambda path: write_plot(result, path), "plot"):
                codes.append(EXIT_OUTPUT)
    if result.status == "interrupted":
        print_error("interrupted", "the results above are what the trials found before Ctrl-C")
        codes.append(EXIT_INTERRUPTED)
    if result.status == "nothing_fits":
        from ..render import format_bytes

        what = f"{result.min_batch} tokens" if result.axis == "seq_len" else f"batch {result.min_batch}"
        print_error(
            f"not even {what} fits in {format_bytes(result.capacity.total_bytes)} ({result.capacity.source})",
            "raise --memory-limit, use a smaller model or --dtype bf16, or see `memprof estimate` for "
            "where the memory goes",
        )
        codes.append(EXIT_NOTHING_FITS)
    raise typer.Exit(exit_code(*codes))


def _require_cuda(device: str) -> None:
    """Fail fast, before loading the model, when there is no CUDA."""
    from ..errors import NoGPUError

    try:
        import torch

        ok = torch.cuda.is_available()
    except Exception:  # pragma: no cover - a broken torch install
        ok = False
    if not ok:
        raise NoGPUError(
            "find-batch needs a CUDA GPU and none is available",
            "use `memprof estimate` for a prediction, or run the real steps on the CPU under a cap: "
            "--device cpu --memory-limit 4GiB",
        )
