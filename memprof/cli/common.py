"""Options shared by the commands that take a workload, and how they become a Workload."""

from __future__ import annotations

from typing import Any

import typer

from ..commands.workload import DEFAULT_BATCH, DEFAULT_DTYPE, DEFAULT_OPTIMIZER, make_workload
from ..engine.fit import DEFAULT_HEADROOM
from ..engine.loading import parse_kwargs, parse_shape, parse_token_range
from ..engine.workload import Workload
from ..errors import UsageError
from ..units import parse_bytes

# typer option declarations, reused by every command's signature
MODEL_ARG = typer.Argument(
    None,
    help="torchvision name (resnet50), path/to/file.py:Class, package.module:attr, a config .toml, "
    "hf:org/name (Hugging Face config only), path/to/config.json, or timm:name",
    show_default=False,
    metavar="MODEL",
)
MODEL_OPT = typer.Option(
    None, "--model", "-m", metavar="MODEL", help="The model, as the positional argument (either works)."
)
BATCH_OPT = typer.Option(
    None,
    "--batch-size",
    "-b",
    metavar="N",
    help=f"Batch size [default: {DEFAULT_BATCH}; 1 for Hugging Face models; or the config's]",
)
DTYPE_OPT = typer.Option(
    None, "--dtype", metavar="DTYPE", help=f"fp32 | fp16 | bf16 | amp-fp16 | amp-bf16 [default: {DEFAULT_DTYPE}]"
)
OPTIMIZER_OPT = typer.Option(
    None,
    "--optimizer",
    "-o",
    metavar="NAME",
    help=f"sgd | sgd-momentum | adam | adamw | adagrad | rmsprop [default: {DEFAULT_OPTIMIZER}]",
)
MODE_OPT = typer.Option(
    None,
    "--mode",
    metavar="MODE",
    help="train (forward, backward, optimizer step), eval (no_grad inference) or generate (prefill and decode "
    "with a KV cache; Hugging Face models) \\[default: train]",
)
SEQ_LEN_OPT = typer.Option(
    None,
    "--seq-len",
    help="Tokens per sample (the prompt length with --mode generate) \\[default: 2048, or the model's positions]",
)
LOOP_OPT = typer.Option(
    None,
    "--loop",
    help="Training loop shape: plain (out = model(...) stays alive through backward: the safe default) or "
    "trainer (the output is dropped before backward, as HF Trainer and Lightning do).",
)
ATTN_OPT = typer.Option(None, "--attn", help="Hugging Face attention: sdpa or eager \\[default: the model's]")
PADDING_OPT = typer.Option(
    False, "--padding", help="The batch holds padding: Hugging Face then builds an explicit attention mask."
)
NEW_TOKENS_OPT = typer.Option(
    None, "--new-tokens", help="--mode generate: tokens generated after the prompt \\[default: 128]."
)
KV_CACHE_OPT = typer.Option(
    None, "--kv-cache", help="--mode generate: dynamic or static KV cache \\[default: the model's generation config]"
)
ROUTING_OPT = typer.Option(
    None,
    "--routing",
    help="Mixture of experts: balanced (tokens x top-k / experts per expert) or worst (all to the same experts) "
    "\\[default: balanced].",
)
CHECKPOINTING_OPT = typer.Option(
    "none",
    "--checkpointing",
    "-c",
    help="Activation checkpointing: blocks (each repeated block; Hugging Face models use their own "
    "gradient_checkpointing_enable()) | sqrt | every-K | none.",
)
INPUT_SHAPE_OPT = typer.Option(
    None,
    "--input-shape",
    "-i",
    metavar="SHAPE",
    help="Per-sample input shape, batch excluded (3,224,224); repeat for several inputs.",
)
INPUT_DTYPE_OPT = typer.Option(
    None, "--input-dtype", metavar="DTYPE", help="float (follows --dtype) or int64 for token ids [default: detected]"
)
TOKEN_RANGE_OPT = typer.Option(
    None,
    "--token-range",
    metavar="LOW,HIGH",
    help="Token id range LOW,HIGH (HIGH exclusive) [default: 0,num_embeddings]",
)
MODEL_KWARGS_OPT = typer.Option(
    None, "--model-kwargs", metavar="JSON", help="""Constructor arguments as JSON: '{"num_classes": 10}'"""
)
MODEL_ARG_OPT = typer.Option(
    None, "--model-arg", metavar="KEY=VALUE", help="One constructor argument key=value (repeatable)."
)
GPU_MEMORY_OPT = typer.Option(
    None,
    "--gpu-memory",
    metavar="SIZE",
    help="GPU capacity, e.g. 24GiB or 80GB [default: --gpu's, else the local GPU's, via NVML]",
)
GPU_OPT = typer.Option(
    None,
    "--gpu",
    metavar="NAME",
    help="A GPU from the catalog (a100-80gb, h100-sxm, rtx-4090, ...): its capacity, architecture and "
    "peaks for the step-time model [memprof gpus --catalog lists them].",
)
GPU_ARCH_OPT = typer.Option(
    None,
    "--gpu-arch",
    metavar="ARCH",
    help="Predict for this architecture (sm80, sm86, sm89, sm90, sm100) [default: --gpu's, else the local GPU's].",
)
CUDNN_BENCHMARK_OPT = typer.Option(
    False, "--cudnn-benchmark", help="The script sets torch.backends.cudnn.benchmark = True (first-step workspaces)."
)
HEADROOM_OPT = typer.Option(
    DEFAULT_HEADROOM, "--headroom", metavar="F", help="Recommended batch = headroom x the largest batch that fits."
)
JSON_OPT = typer.Option(False, "--json", help="Print only JSON on stdout.")
STRATEGY_OPT = typer.Option(
    None,
    "--strategy",
    help="Data parallelism, per rank: ddp | fsdp (FSDP2, = zero3) | zero1 | zero2 | zero3 (see docs/multigpu.md).",
)
WORLD_SIZE_OPT = typer.Option(
    None, "--world-size", help="Ranks for --strategy (8), or several to compare (1,2,8,64,1024) \\[default: 8]."
)
BUCKET_CAP_OPT = typer.Option(None, "--bucket-cap-mb", help="DDP's bucket size in MiB \\[default: 25].")
BUCKET_VIEW_OPT = typer.Option(
    False, "--gradient-as-bucket-view", help="DDP's gradient_as_bucket_view=True (gradients live in the buckets)."
)
#: --world-size when --strategy is given alone
DEFAULT_WORLD_SIZE = 8
FORCE_OPT = typer.Option(
    False, "--force", help="Replace output files that already exist (without it, memprof never overwrites a file)."
)
# fine-tuning levers (docs/finetuning.md)
FREEZE_OPT = typer.Option(
    None,
    "--freeze",
    metavar="GLOB",
    help="Freeze the parameters of modules matching this name glob (backbone.*, layer1); repeatable.",
)
TRAIN_ONLY_OPT = typer.Option(
    None,
    "--train-only",
    metavar="GLOB",
    help="Train only modules matching this name glob (fc, classifier.*); repeatable.",
)
LORA_RANK_OPT = typer.Option(
    None, "--lora-rank", metavar="R", help="Add LoRA adapters of this rank with peft (pip install memprof[peft])."
)
LORA_ALPHA_OPT = typer.Option(None, "--lora-alpha", metavar="ALPHA", help="LoRA alpha [default: 8, peft's].")
LORA_TARGETS_OPT = typer.Option(
    None,
    "--lora-targets",
    metavar="NAMES",
    help="Modules to adapt: q_proj,v_proj or all-linear [default: peft's for the architecture].",
)
LORA_DROPOUT_OPT = typer.Option(None, "--lora-dropout", metavar="P", help="LoRA dropout [default: 0.0, peft's].")
QUANTIZE_OPT = typer.Option(
    None,
    "--quantize",
    metavar="KIND",
    help="Frozen linear weights as bitsandbytes stores them: int8 | nf4 | fp4 (QLoRA: nf4).",
)
DOUBLE_QUANT_OPT = typer.Option(False, "--double-quant", help="4-bit double quantization (bnb_4bit_use_double_quant).")
OFFLOAD_OPT = typer.Option(
    None,
    "--offload",
    metavar="WHAT",
    help="optimizer: keep the optimizer state and its step on the CPU; params: FSDP2's CPUOffloadPolicy (--strategy).",
)


def resolve_model_ref(model: str | None, model_opt: str | None) -> str:
    if model and model_opt and model != model_opt:
        raise UsageError(f"two models given: {model!r} and --model {model_opt!r}", "give the model once")
    ref = model or model_opt
    if not ref:
        raise UsageError("no model given", "e.g. memprof estimate resnet50, or --model path/to/file.py:Net")
    return ref


def build_workload(
    model: str | None,
    model_opt: str | None = None,
    *,
    batch_size: int | None = None,
    dtype: str | None = None,
    optimizer: str | None = None,
    mode: str | None = None,
    input_shape: list[str] | None = None,
    input_dtype: str | None = None,
    token_range: str | None = None,
    model_kwargs: str | None = None,
    model_arg: list[str] | None = None,
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
    **levers: Any,
) -> Workload:
    """Options as typed on the command line -> :func:`memprof.commands.workload.make_workload`."""
    ref = resolve_model_ref(model, model_opt)
    kwargs = parse_kwargs(model_kwargs, model_arg)
    shapes = [parse_shape(s) for s in input_shape] if input_shape else None
    low_high = parse_token_range(token_range) if token_range else None
    return make_workload(
        ref,
        batch_size=batch_size,
        dtype=dtype,
        optimizer=optimizer,
        mode=mode,
        input_shape=shapes,
        input_dtype=input_dtype,
        token_range=low_high,
        model_kwargs=kwargs,
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
        world_size=world_size,
        bucket_cap_mb=bucket_cap_mb,
        gradient_as_bucket_view=gradient_as_bucket_view,
        **levers,
    )


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (positive integers)."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"cannot read {flag} {text!r}", f"write positive integers, e.g. {flag} 1,2,4") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} must be positive integers, got {text!r}", f"e.g. {flag} 1,2,4")
    return values


def parse_world_sizes(text: str | None, strategy: str | None) -> list[int] | None:
    """``--world-size 8`` or ``1,2,8,64,1024`` -> sizes (in order, no repeats); None when there is no strategy.

    ``--strategy`` alone means :data:`DEFAULT_WORLD_SIZE` ranks; ``--world-size`` alone is refused.
    """
    if text is None:
        return [DEFAULT_WORLD_SIZE] if strategy else None
    sizes: list[int] = []
    for part in text.replace(" ", "").split(","):
        try:
            n = int(part)
        except ValueError:
            raise UsageError(
                f"cannot read --world-size {text!r}", "write one number (8) or a list: 1,2,8,64,1024"
            ) from None
        if n < 1:
            raise UsageError(f"--world-size must be at least 1, got {n}", "e.g. --world-size 8")
        if n not in sizes:
            sizes.append(n)
    if not strategy:
        raise UsageError(
            "--world-size needs --strategy", "add --strategy ddp, fsdp, zero1, zero2 or zero3 (see docs/multigpu.md)"
        )
    return sizes


def parse_bytes_list(text: str) -> int | list[int]:
    """``4GiB`` -> bytes; ``4GiB,3GiB`` -> one value per rank."""
    parts = [p for p in text.split(",") if p.strip()]
    values = [parse_bytes(p.strip()) for p in parts]
    return values[0] if len(values) == 1 else values


def parse_capacity(gpu_memory: str | None) -> int | None:
    return parse_bytes(gpu_memory) if gpu_memory else None
