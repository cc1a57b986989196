"""The Python API: the four commands for notebooks and scripts, returning the result dataclasses the CLI renders.

Each takes a model reference (``"resnet50"``, ``"path/to/file.py:Net"``, ``"package.module:attr"``, a
config ``.toml``) or a live ``torch.nn.Module`` (memprof works on copies of it; the module is never
changed), and the same options as the command line, with Python values: sizes in bytes or as text
(``24 * 2**30`` or ``"24GiB"``), shapes as tuples. Errors are :class:`memprof.MemprofError` with a
``message`` and a ``hint``; nothing is printed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .commands.workload import Shape, make_workload
from .engine.fit import DEFAULT_HEADROOM
from .results import (
    CompareResult,
    EstimateResult,
    FindBatchResult,
    ProfileResult,
    RanksProfileResult,
    ScalingResult,
)
from .units import parse_bytes

__all__ = ["estimate", "scale", "find_batch", "compare", "profile"]


def _bytes(value: int | str | None) -> int | None:
    return None if value is None else parse_bytes(value)


def _limits(value: int | str | Sequence[int | str] | None) -> int | list[int] | None:
    """One memory limit, or one per rank, in bytes."""
    if value is None:
        return None
    if isinstance(value, (int, str)):
        return parse_bytes(value)
    return [parse_bytes(v) for v in value]


def estimate(
    model: Any,
    *,
    batch_size: int | None = None,
    input_shape: Shape | Sequence[Shape] | None = None,
    dtype: str | None = None,
    optimizer: str | None = None,
    mode: str | None = None,
    gpu_memory: int | str | None = None,
    gpu: str | None = None,
    gpu_arch: str | None = None,
    cudnn_benchmark: bool = False,
    headroom: float = DEFAULT_HEADROOM,
    traced: bool = True,
    input_dtype: str | None = None,
    token_range: tuple[int, int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    checkpointing: str = "none",
    inplace_relu: bool = False,
    use_nvml: bool = True,
    device: str = "cuda",
    memory_limit: int | str | None = None,
    verify: bool = False,
    seq_len: int | None = None,
    loop: str | None = None,
    attn: str | None = None,
    padding: bool = False,
    new_tokens: int | None = None,
    kv_cache: str | None = None,
    routing: str | None = None,
    fit_seq_len: bool | None = None,
    multiple_of: int = 1,
    grid: bool | tuple[Sequence[int], Sequence[int]] | None = None,
    strategy: str | None = None,
    world_size: int | None = None,
    bucket_cap_mb: float | None = None,
    gradient_as_bucket_view: bool = False,
    freeze: Sequence[str] | str | None = None,
    train_only: Sequence[str] | str | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | str | None = None,
    lora_dropout: float | None = None,
    quantize: str | None = None,
    double_quant: bool = False,
    offload: str | None = None,
) -> EstimateResult:
    """Where the memory of one training step goes, traced on fake tensors (no GPU), and the batch that fits.

    ``gpu_memory`` is the capacity to fit (bytes or ``"24GiB"``); without it the catalog GPU's
    (``gpu="a100-80gb"``), else the local GPU's via NVML, unless ``use_nvml=False``; with none,
    ``result.fit`` is None. The trace predicts for ``gpu``'s architecture, else ``gpu_arch``
    (``"sm80"``), else the local GPU's, else an assumed one (said in ``result.traced.cuda_target``);
    ``gpu`` also adds the step-time model (``result.step_time``). ``device="cpu"`` predicts the same
    step run on the CPU (``memory_limit`` is then the capacity to fit). ``verify=True`` also runs the
    real steps on ``device`` (``"cuda"``, ``"cuda:N"`` or ``"cpu"``) and fills ``result.verification``:
    each measured figure next to its prediction, with the error. Fine-tuning levers:
    ``freeze`` / ``train_only`` (module-name globs), ``lora_rank`` (+ ``lora_alpha``, ``lora_targets``,
    ``lora_dropout``; needs peft), ``quantize`` ("int8", "nf4", "fp4"; ``double_quant``), ``offload="optimizer"``.

    Language models (``"hf:meta-llama/Llama-3.1-8B"``, a ``config.json``): ``seq_len`` tokens per sample,
    ``loop`` "plain" (default, the output kept through backward) or "trainer", ``attn``, ``padding``,
    ``mode="generate"`` with ``new_tokens`` and ``kv_cache``, MoE ``routing``; with a capacity,
    ``fit_seq_len`` adds the longest sequence (``result.seq_fit``, a multiple of ``multiple_of``) and
    ``grid=True`` (or ``(batches, seq_lens)``) the batch x sequence-length grid (``result.grid``).

    Data parallelism: ``strategy`` ("ddp", "fsdp", "zero1", "zero2", "zero3") on ``world_size`` ranks
    (``offload`` "optimizer" or "params"; DDP's ``bucket_cap_mb``, ``gradient_as_bucket_view``): every
    figure is then one rank's, and ``batch_size`` is per rank. :func:`scale` sweeps world sizes.

    Example::

        >>> import memprof, torchvision
        >>> r = memprof.estimate(torchvision.models.resnet18(), batch_size=64, input_shape=(3, 224, 224),
        ...                      gpu_memory="24GiB", use_nvml=False)
        >>> r.headline_bytes, r.fit.max_batch, r.fit.recommended_batch  # doctest: +SKIP
        >>> v = memprof.estimate("memprof.zoo:mnist_mlp", batch_size=64, device="cpu", verify=True).verification
        >>> [(f.predicted_bytes, f.measured_bytes, f.error_pct) for f in v.figures]  # doctest: +SKIP
    """
    from .commands.estimate import estimate as run
    from .commands.estimate import estimate_capacity
    from .engine.catalog import resolve_target

    target = resolve_target(gpu, gpu_arch, cudnn_benchmark=cudnn_benchmark)
    workload = make_workload(
        model,
        batch_size=batch_size,
        dtype=dtype,
        optimizer=optimizer,
        mode=mode,
        input_shape=input_shape,
        input_dtype=input_dtype,
        token_range=token_range,
        model_kwargs=model_kwargs,
        checkpointing=checkpointing,
        inplace_relu=inplace_relu,
        seq_len=seq_len,
        loop=loop,
        attn=attn,
        padding=padding,
        new_tokens=new_tokens,
        kv_cache=kv_cache,
        routing=routing,
        strategy=strategy,
        world_size=world_size if world_size is not None else (8 if strategy else None),
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
        offload=offload,
    )
    capacity, note = estimate_capacity(
        device, _bytes(gpu_memory), _bytes(memory_limit), use_nvml=use_nvml, gpu=target.gpu if gpu else None
    )
    axes = (list(grid[0]), list(grid[1])) if isinstance(grid, tuple) else grid
    return run(
        workload,
        capacity=capacity,
        headroom=headroom,
        traced=traced,
        capacity_note=note,
        fit_seq_len=fit_seq_len,
        multiple_of=multiple_of,
        grid=axes,
        cuda_target=target,
        gpu=target.gpu if gpu else None,
        device=device,
        verify=verify,
    )


def scale(
    model: Any,
    world_sizes: Sequence[int],
    *,
    strategy: str,
    batch_size: int | None = None,
    input_shape: Shape | Sequence[Shape] | None = None,
    dtype: str | None = None,
    optimizer: str | None = None,
    offload: str | None = None,
    gpu_memory: int | str | None = None,
    headroom: float = DEFAULT_HEADROOM,
    input_dtype: str | None = None,
    token_range: tuple[int, int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    use_nvml: bool = True,
) -> ScalingResult:
    """One rank's memory and largest batch at each of ``world_sizes`` under ``strategy`` (1: one process).

    Example::

        >>> import memprof
        >>> r = memprof.scale("configs/gpt2-small.toml", [1, 8, 64], strategy="fsdp", gpu_memory="80GiB")
        >>> [(row.world_size, row.peak_bytes, row.max_batch) for row in r.rows]  # doctest: +SKIP
    """
    from .commands.estimate import resolve_capacity
    from .commands.scaling import scale as run

    workload = make_workload(
        model,
        batch_size=batch_size,
        dtype=dtype,
        optimizer=optimizer,
        input_shape=input_shape,
        input_dtype=input_dtype,
        token_range=token_range,
        model_kwargs=model_kwargs,
        strategy=strategy,
        world_size=max(world_sizes) if world_sizes else None,
        offload=offload,
    )
    capacity, note = resolve_capacity(_bytes(gpu_memory), use_nvml=use_nvml)
    return run(workload, world_sizes, capacity=capacity, capacity_note=note, headroom=headroom)


def find_batch(
    model: Any,
    *,
    device: str = "cuda",
    memory_limit: int | str | Sequence[int | str] | None = None,
    input_shape: Shape | Sequence[Shape] | None = None,
    dtype: str | None = None,
    optimizer: str | None = None,
    mode: str | None = None,
    steps: int = 2,
    min_batch: int = 1,
    max_batch: int = 4096,
    start: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
    multiple_of: int | None = None,
    target_global_batch: int | None = None,
    predict: bool = True,
    input_dtype: str | None = None,
    token_range: tuple[int, int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    on_event: Callable[[str, Any], None] | None = None,
    seq_len: int | None = None,
    loop: str | None = None,
    attn: str | None = None,
    padding: bool = False,
    routing: str | None = None,
    search: str = "batch",
    batch_size: int | None = None,
    nproc_per_node: int | None = None,
    strategy: str | None = None,
    gpu: str | None = None,
    gpu_arch: str | None = None,
    cudnn_benchmark: bool = False,
    freeze: Sequence[str] | str | None = None,
    train_only: Sequence[str] | str | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | str | None = None,
    lora_dropout: float | None = None,
    quantize: str | None = None,
    double_quant: bool = False,
    offload: str | None = None,
) -> FindBatchResult | None:
    """The largest batch whose real training steps fit, found in a few real trials, and the batch to use.

    ``device="cuda"`` (or ``"cuda:1"``) runs on the GPU; ``device="cpu"`` with ``memory_limit``
    runs the same steps on the CPU with live tensor bytes capped there. ``search="seq-len"`` finds the
    longest sequence at ``batch_size`` instead (a multiple of ``multiple_of`` tokens; the result's batch
    fields then hold tokens).

    With ``nproc_per_node`` and ``strategy`` ("ddp", "fsdp", ...) the trials run as a real torchrun job
    on one node: the largest batch per rank that fits on every rank (``memory_limit`` may then be a list,
    one cap per rank).

    Example::

        >>> import memprof
        >>> r = memprof.find_batch("memprof.zoo:mnist_mlp", device="cpu", memory_limit="64MiB",
        ...                        input_shape=(1, 28, 28))
        >>> r.largest_batch, r.recommended_batch, len(r.trials)  # doctest: +SKIP
    """
    from .commands.find_batch import find_batch as run
    from .engine.catalog import resolve_target
    from .errors import UsageError

    if search not in ("batch", "seq-len", "seq_len"):
        raise UsageError(f"`search` must be batch or seq-len, got {search!r}", "seq-len: the longest sequence")
    by_seq = search != "batch"
    if by_seq and nproc_per_node is not None:
        raise UsageError(
            "`search` seq-len runs in one process", "leave out `nproc_per_node`, or search the batch per rank"
        )
    if device == "cpu" and (gpu or gpu_arch):
        raise UsageError("`gpu` and `gpu_arch` are for CUDA trials", "leave them out with `device` cpu")
    cuda_target = resolve_target(gpu, gpu_arch, cudnn_benchmark=cudnn_benchmark) if device != "cpu" else None
    workload = make_workload(
        model,
        batch_size=batch_size if by_seq else None,
        seq_len=seq_len,
        loop=loop,
        attn=attn,
        padding=padding,
        routing=routing,
        dtype=dtype,
        optimizer=optimizer,
        mode=mode,
        input_shape=input_shape,
        input_dtype=input_dtype,
        token_range=token_range,
        model_kwargs=model_kwargs,
        strategy=strategy,
        world_size=nproc_per_node if strategy and nproc_per_node else None,
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
    if nproc_per_node is not None:
        from .commands.find_batch import find_batch_torchrun
        from .engine.torchrun import Launch

        return find_batch_torchrun(
            workload,
            Launch(nproc_per_node),
            device=device,
            memory_limit=_limits(memory_limit),
            steps=steps,
            min_batch=min_batch,
            max_batch=max_batch,
            start=start,
            headroom=headroom,
            multiple_of=multiple_of,
            target_global_batch=target_global_batch,
            predict=predict,
            on_event=on_event,
        )
    if memory_limit is not None and not isinstance(memory_limit, (int, str)):
        from .errors import UsageError

        raise UsageError("one `memory_limit` per rank needs `nproc_per_node`", "give one limit, e.g. '4GiB'")
    return run(
        workload,
        device=device,
        memory_limit=_bytes(memory_limit),
        steps=steps,
        min_batch=min_batch,
        max_batch=max_batch,
        start=start,
        headroom=headroom,
        multiple_of=multiple_of,
        target_global_batch=target_global_batch,
        predict=predict,
        on_event=on_event,
        search_axis="seq_len" if by_seq else "batch_size",
        seq_multiple_of=(multiple_of or 1) if by_seq else 1,
        cuda_target=cuda_target,
    )


def compare(
    model: Any,
    *,
    dtypes: Iterable[str] | None = None,
    optimizers: Iterable[str] | None = None,
    checkpointing: Iterable[str] | None = None,
    inplace_relu: bool = False,
    modes: Iterable[str] | None = None,
    batch_sizes: Iterable[int] | None = None,
    seq_lens: Iterable[int] | None = None,
    loops: Iterable[str] | None = None,
    freezes: Iterable[str] | None = None,
    lora_ranks: Iterable[int] | None = None,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | str | None = None,
    lora_dropout: float | None = None,
    quantizations: Iterable[str] | None = None,
    offloads: Iterable[str] | None = None,
    combine: bool = False,
    batch_size: int | None = None,
    dtype: str | None = None,
    optimizer: str | None = None,
    input_shape: Shape | Sequence[Shape] | None = None,
    device: str = "cuda",
    gpu_memory: int | str | None = None,
    gpu: str | None = None,
    gpu_arch: str | None = None,
    cudnn_benchmark: bool = False,
    memory_limit: int | str | None = None,
    headroom: float = DEFAULT_HEADROOM,
    max_batch: int | None = None,
    fit: bool = True,
    input_dtype: str | None = None,
    token_range: tuple[int, int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    seq_len: int | None = None,
    attn: str | None = None,
    padding: bool = False,
    routing: str | None = None,
    strategies: Iterable[str] | None = None,
    world_size: int = 8,
) -> CompareResult:
    """Configurations side by side: each ``dtypes`` / ``optimizers`` / ``checkpointing`` / ``modes`` /
    ``batch_sizes`` / ``freezes`` / ``lora_ranks`` / ``quantizations`` ("nf4", "nf4+dq", "int8") /
    ``offloads`` value adds a row to the baseline (``batch_size``, ``dtype``, ``optimizer``);
    ``combine=True`` makes one row per combination. Without any, the default set (AMP, fp16, checkpointing).
    ``strategies`` ("ddp", "fsdp", ...) add rows of one rank of ``world_size``.

    Example::

        >>> import memprof
        >>> r = memprof.compare("resnet50", dtypes=["amp-bf16"], checkpointing=["blocks"], gpu_memory="24GiB")
        >>> [(row.label, row.peak_bytes, row.fit.max_batch) for row in r.rows]  # doctest: +SKIP
    """
    from .commands.compare import compare as run
    from .commands.compare import normalize_axes, resolve_capacity, strategy_value
    from .engine.catalog import resolve_target
    from .errors import UsageError

    kind = str(device).strip().lower()
    if not (kind in ("cpu", "cuda") or kind.startswith("cuda:")):
        raise UsageError(f"unknown `device` {device!r}", "write cuda (predict a CUDA step) or cpu")
    device = "cpu" if kind == "cpu" else "cuda"
    cuda_target = resolve_target(gpu, gpu_arch, cudnn_benchmark=cudnn_benchmark) if device != "cpu" else None

    axes: dict[str, list[Any]] = {}
    for name, values in (
        ("dtype", dtypes),
        ("optimizer", optimizers),
        ("checkpointing", checkpointing),
        ("mode", modes),
        ("loop", loops),
        ("batch_size", batch_sizes),
        ("seq_len", seq_lens),
    ):
        if values:
            axes[name] = list(values)
    if inplace_relu:
        axes["inplace_relu"] = [True]
    if strategies:
        axes["strategy"] = [strategy_value(s, world_size) for s in strategies]
    if lora_ranks:
        from .commands.workload import lora_spec

        axes["lora"] = [lora_spec(r, lora_alpha, lora_targets, lora_dropout) for r in lora_ranks]
    for name, values in (("freeze", freezes), ("quantize", quantizations), ("offload", offloads)):
        if values:
            axes[name] = list(values)
    chosen = normalize_axes(axes)
    workload = make_workload(
        model,
        batch_size=batch_size,
        dtype=dtype,
        optimizer=optimizer,
        input_shape=input_shape,
        input_dtype=input_dtype,
        token_range=token_range,
        model_kwargs=model_kwargs,
        seq_len=seq_len,
        attn=attn,
        padding=padding,
        routing=routing,
    )
    capacity, note = (None, None)
    catalog_gpu_entry = cuda_target.gpu if cuda_target is not None and gpu else None
    if fit:
        catalog_gpu = catalog_gpu_entry
        capacity, note = resolve_capacity(device, _bytes(gpu_memory), _bytes(memory_limit), catalog_gpu)
    return run(
        workload,
        chosen or None,
        combine=combine,
        target="cpu" if device == "cpu" else "cuda",
        capacity=capacity,
        capacity_note=note,
        headroom=headroom,
        fit=fit,
        max_batch=max_batch,
        cuda_target=cuda_target,
        gpu=catalog_gpu_entry,
    )


def profile(
    script: str | Path,
    args: Sequence[str] = (),
    *,
    log: bool = False,
    snapshot: str | Path | None = None,
    device: str = "auto",
    nproc_per_node: int | None = None,
) -> ProfileResult | RanksProfileResult:
    """Run a training script as ``python script args...`` would; its memory by line, module and category,
    the peak and suspected leaks. The script's own failure is in ``result.outcome``. With
    ``nproc_per_node`` the script runs as a torchrun job and every rank is profiled
    (:class:`memprof.results.RanksProfileResult`).

    Example::

        >>> import memprof
        >>> r = memprof.profile("scripts/examples/train_mlp.py", ["--steps", "3"])
        >>> r.peak.bytes, r.peak.location, r.outcome.status  # doctest: +SKIP
    """
    if nproc_per_node is not None:
        from .commands.profile import profile_ranks
        from .engine.torchrun import Launch

        return profile_ranks(script, args, Launch(nproc_per_node), log=log, device=device)
    from .commands.profile import profile as run

    return run(script, args, log=log, snapshot=snapshot, device=device)
