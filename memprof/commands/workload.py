"""From what a caller gives (a model reference or a live ``nn.Module``, and typed options) to a
:class:`~memprof.engine.workload.Workload`. The command line and the Python API both come here,
so every option is validated once, in one place, before any model is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..engine.checkpointing import parse_mode
from ..engine.distributed import DEFAULT_BUCKET_CAP_MB, check_plan, get_strategy
from ..engine.finetune import DEFAULT_LORA_ALPHA, LoraSpec, parse_method, parse_patterns, parse_targets
from ..engine.loading import ModelSpec, load_model, spec_from_module
from ..engine.workload import (
    ATTN_IMPLEMENTATIONS,
    DEFAULT_LOOP,
    KV_CACHES,
    LOOPS,
    MODES,
    ROUTINGS,
    Workload,
    get_offload,
    get_optimizer_name,
    get_precision,
)
from ..errors import UsageError

DEFAULT_BATCH = 32
#: Hugging Face models: one sequence per step unless a batch size is given
DEFAULT_HF_BATCH = 1
DEFAULT_DTYPE = "fp32"
DEFAULT_OPTIMIZER = "adam"
#: generation: tokens generated after the prompt unless `new_tokens` is given
DEFAULT_NEW_TOKENS = 128
INPUT_DTYPES = ("float", "int64", "int32", "int16", "int8", "uint8", "bool")
#: torch's other names for them (``torch.long`` is int64, ``torch.int`` int32)
INPUT_DTYPE_ALIASES = {
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "byte": "uint8",
    "char": "int8",
    "float32": "float",
}

Shape = Sequence[int]


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise UsageError(f"`batch_size` must be a positive integer, got {batch_size!r}", "e.g. `batch_size` 32")
    return batch_size


def check_shapes(input_shape: Shape | Sequence[Shape]) -> list[tuple[int, ...]]:
    """One per-sample shape ``(3, 224, 224)`` or several ``[(3, 224, 224), (10,)]``, batch excluded; text
    (``"3,224,224"``) is read as the command line reads ``--input-shape``."""
    from ..engine.loading import parse_shape

    if isinstance(input_shape, str):
        return [parse_shape(input_shape)]
    items: list[Any] = [parse_shape(s) if isinstance(s, str) else s for s in input_shape]
    shapes: list[Any] = [items] if items and not isinstance(items[0], (list, tuple)) else items
    out: list[tuple[int, ...]] = []
    for shape in shapes:
        dims: tuple[Any, ...] = tuple(shape)
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
            raise UsageError(f"`input_shape` must be positive integers, got {dims!r}", "e.g. `input_shape` 3,224,224")
        out.append(dims)
    return out


def make_workload(
    model: str | ModelSpec | Any,
    *,
    batch_size: int | None = None,
    dtype: str | None = None,
    optimizer: str | None = None,
    mode: str | None = None,
    input_shape: Shape | Sequence[Shape] | None = None,
    input_dtype: str | None = None,
    token_range: tuple[int, int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    checkpointing: str = "none",
    inplace_relu: bool = False,
    seq_len: int | None = None,
    loop: str | None = None,
    attn: str | None = None,
    padding: bool = False,
    new_tokens: int | None = None,
    kv_cache: str | None = None,
    routing: str | None = None,
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
    lora: LoraSpec | None = None,
    quantize: str | None = None,
    double_quant: bool = False,
    offload: str | None = None,
) -> Workload:
    """The workload for ``model``; values given here win over a config file's ``[workload]`` table.

    ``model`` is a reference (``"resnet50"``, ``"path/to/file.py:Net"``, ``"package.module:attr"``,
    ``"config.toml"``, ``"hf:org/name"``, a ``config.json``, ``"timm:name"``), an already loaded
    :class:`ModelSpec`, or a live ``torch.nn.Module`` (memprof builds copies of it on fake tensors;
    the module itself is never changed). Cheap options are checked before the model is loaded.

    Sequence models: ``seq_len`` tokens per sample (a prompt of that length for ``mode="generate"``,
    which generates ``new_tokens`` more); ``loop`` is the training loop's shape ("plain", the default,
    keeps the model's output through backward; "trainer" drops it first); ``attn``, ``padding``,
    ``kv_cache`` and ``routing`` (mixture of experts) apply to Hugging Face models.

    Data parallelism (:mod:`memprof.engine.distributed`): ``strategy`` (ddp, fsdp, zero1, zero2, zero3)
    over ``world_size`` ranks, ``offload`` (optimizer, params), DDP's ``bucket_cap_mb`` and
    ``gradient_as_bucket_view``; the batch size is then per rank.

    Fine-tuning levers: ``freeze`` / ``train_only`` (module-name globs), LoRA (``lora_rank`` and
    ``lora_alpha``, ``lora_targets``, ``lora_dropout``, or a ready :class:`LoraSpec` as ``lora``),
    ``quantize`` ("int8", "nf4", "fp4"; ``double_quant`` for 4-bit) and ``offload`` ("optimizer").
    """
    if batch_size is not None:
        check_batch_size(batch_size)
    precision = get_precision(dtype) if dtype else None
    opt_name = get_optimizer_name(optimizer) if optimizer else None
    if mode is not None and mode not in MODES:
        raise UsageError(
            f"`mode` must be train, eval or generate, got {mode!r}",
            "train: forward, backward, optimizer step; eval: no_grad inference; generate: prefill and decode "
            "with a KV cache (Hugging Face models)",
        )
    for name, value in (("seq_len", seq_len), ("new_tokens", new_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise UsageError(f"`{name}` must be a positive integer, got {value!r}", f"e.g. `{name}` 512")
    if loop is not None and loop not in LOOPS:
        raise UsageError(
            f"`loop` must be plain or trainer, got {loop!r}",
            "plain: out = model(...) kept through backward (safe); trainer: the output is dropped before backward",
        )
    if attn is not None and attn not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"`attn` must be sdpa or eager, got {attn!r}", "sdpa: PyTorch's fused attention")
    if kv_cache is not None and kv_cache not in KV_CACHES:
        raise UsageError(f"`kv_cache` must be dynamic or static, got {kv_cache!r}", "dynamic: grows with each token")
    if routing is not None and routing not in ROUTINGS:
        raise UsageError(
            f"`routing` must be balanced or worst, got {routing!r}",
            "balanced: tokens x top-k / experts per expert; worst: every token to the same experts",
        )
    shapes = check_shapes(input_shape) if input_shape is not None else None
    if input_dtype is not None:
        name = input_dtype.strip().lower().removeprefix("torch.")
        input_dtype = INPUT_DTYPE_ALIASES.get(name, name)
    if input_dtype is not None and input_dtype not in INPUT_DTYPES:
        raise UsageError(
            f"`input_dtype` must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}",
            "float follows the model's dtype; int64 for token ids",
        )
    if token_range is not None:
        low, high = token_range
        if low < 0:
            raise UsageError(f"`token_range` {low},{high} starts below 0", "token ids start at 0, e.g. 0,50257")
        if high <= low:
            raise UsageError(f"`token_range` {low},{high} is empty", "HIGH must be above LOW, e.g. 0,50257")
    checkpointing = parse_mode(checkpointing)
    parallel = parallel_fields(strategy, world_size, offload, bucket_cap_mb, gradient_as_bucket_view)
    levers = finetune_levers(
        freeze=freeze,
        train_only=train_only,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        lora_dropout=lora_dropout,
        lora=lora,
        quantize=quantize,
        double_quant=double_quant,
        offload=offload,
    )
    if isinstance(model, ModelSpec):
        spec = model
    elif isinstance(model, str):
        spec = load_model(model, dict(model_kwargs or {}))
    else:
        spec = spec_from_module(model)
    if shapes:
        spec.inputs.shapes = shapes
    if input_dtype:
        spec.inputs.dtype = input_dtype
    if token_range is not None:
        spec.inputs.low, spec.inputs.high = token_range
        if spec.inputs.dtype in (None, "float"):
            spec.inputs.dtype = "int64"
    d = spec.defaults
    default_batch = DEFAULT_HF_BATCH if spec.hf is not None else DEFAULT_BATCH
    mode = mode or d.get("mode", "train")
    if mode == "generate" and new_tokens is None:
        new_tokens = DEFAULT_NEW_TOKENS
    if spec.hf is not None and seq_len is None:
        seq_len = spec.hf.default_seq_len
        positions = spec.max_positions
        if mode == "generate" and positions is not None and new_tokens is not None:
            seq_len = max(1, min(seq_len, positions - new_tokens))
    _check_sequence_options(spec, mode, seq_len, new_tokens, padding, attn, kv_cache)
    return Workload(
        model=spec,
        batch_size=batch_size if batch_size is not None else check_batch_size(int(d.get("batch_size", default_batch))),
        precision=precision or get_precision(d.get("dtype", DEFAULT_DTYPE)),
        optimizer=opt_name or d.get("optimizer", DEFAULT_OPTIMIZER),
        mode=mode,
        checkpointing=checkpointing,
        inplace_relu=inplace_relu,
        seq_len=seq_len,
        loop=loop or DEFAULT_LOOP,
        attn=attn,
        padding=padding,
        new_tokens=new_tokens if mode == "generate" else None,
        kv_cache=kv_cache,
        routing=routing or "balanced",
        **(levers | parallel),
    )


def lora_spec(
    lora_rank: int | None,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | str | None = None,
    lora_dropout: float | None = None,
) -> LoraSpec | None:
    """A :class:`LoraSpec` from the separate options (None without a rank; the others need one)."""
    if lora_rank is None or lora_rank == 0:
        given = [
            n
            for n, v in (("lora_alpha", lora_alpha), ("lora_targets", lora_targets), ("lora_dropout", lora_dropout))
            if v
        ]
        if given:
            raise UsageError(f"`{given[0]}` needs `lora_rank`", "e.g. `lora_rank` 16")
        return None
    return LoraSpec(
        rank=lora_rank,
        alpha=DEFAULT_LORA_ALPHA if lora_alpha is None else lora_alpha,
        targets=parse_targets(lora_targets),
        dropout=lora_dropout or 0.0,
    )


def finetune_levers(
    *,
    freeze: Sequence[str] | str | None = None,
    train_only: Sequence[str] | str | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | str | None = None,
    lora_dropout: float | None = None,
    lora: LoraSpec | None = None,
    quantize: str | None = None,
    double_quant: bool = False,
    offload: str | None = None,
) -> dict[str, Any]:
    """The Workload fields of the fine-tuning levers, each option validated."""
    spec = lora if lora is not None else lora_spec(lora_rank, lora_alpha, lora_targets, lora_dropout)
    return dict(
        freeze=parse_patterns(freeze, "freeze"),
        train_only=parse_patterns(train_only, "train_only"),
        lora=spec,
        quantize=parse_method(quantize),
        double_quant=bool(double_quant),
        offload=get_offload(offload),
    )


def check_seq_len(spec: ModelSpec, seq_len: int | None, new_tokens: int | None = None) -> None:
    """A sequence (prompt + generated tokens) must fit the model's positions."""
    positions = spec.max_positions
    if seq_len is None or positions is None:
        return
    total = seq_len + (new_tokens or 0)
    if total > positions:
        what = f"`seq_len` {seq_len}" + (f" + `new_tokens` {new_tokens}" if new_tokens else "")
        raise UsageError(
            f"{what} is longer than the {positions} positions of {spec.display_name} (max_position_embeddings)",
            f"use at most {positions} tokens in all, or a config with more positions "
            "(--model-arg max_position_embeddings=N changes the architecture)",
        )


def _check_sequence_options(
    spec: ModelSpec,
    mode: str,
    seq_len: int | None,
    new_tokens: int | None,
    padding: bool,
    attn: str | None,
    kv_cache: str | None,
) -> None:
    hf = spec.hf
    if hf is None:
        if seq_len is not None and spec.source in ("torchvision", "timm"):
            raise UsageError(
                f"`seq_len` applies to models that take token ids; {spec.display_name} takes images",
                "give the per-sample shape with `input_shape` instead",
            )
        for name, value in (("padding", padding), ("attn", attn), ("kv_cache", kv_cache)):
            if value:
                raise UsageError(f"`{name}` applies to Hugging Face models", "e.g. hf:meta-llama/Llama-3.2-1B")
        if mode == "generate":
            raise UsageError(
                f"`mode` generate needs a Hugging Face causal or seq2seq model, not {spec.display_name}",
                "e.g. hf:meta-llama/Llama-3.2-1B or a path to its config.json",
            )
        if new_tokens is not None:
            raise UsageError("`new_tokens` applies to `mode` generate", "add `mode` generate")
        return
    if mode == "generate" and not hf.can_generate:
        raise UsageError(
            f"{spec.display_name} is a {hf.task} model: it does not generate",
            "`mode` generate needs a causal LM or a seq2seq model",
        )
    if new_tokens is not None and mode != "generate":
        raise UsageError("`new_tokens` applies to `mode` generate", "add `mode` generate")
    if kv_cache is not None and mode != "generate":
        raise UsageError("`kv_cache` applies to `mode` generate", "add `mode` generate")
    check_seq_len(spec, seq_len, new_tokens if mode == "generate" else None)


def parallel_fields(
    strategy: str | None,
    world_size: int | None,
    offload: str | None,
    bucket_cap_mb: float | None = None,
    gradient_as_bucket_view: bool = False,
) -> dict[str, Any]:
    """The workload's data-parallel fields, checked before any model is loaded (one rank's view)."""
    fields: dict[str, Any] = {
        "strategy": get_strategy(strategy or "none"),
        "world_size": 1 if world_size is None else world_size,
        "offload": get_offload(offload),
        "bucket_cap_mb": DEFAULT_BUCKET_CAP_MB if bucket_cap_mb is None else bucket_cap_mb,
        "gradient_as_bucket_view": bool(gradient_as_bucket_view),
    }
    check_plan(fields["strategy"], fields["world_size"], fields["offload"], fields["bucket_cap_mb"])
    return fields
