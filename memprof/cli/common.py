"""Options shared by the commands that take a workload, and how they become a Workload."""

from __future__ import annotations

from pathlib import Path

import typer

from ..engine.loading import load_model, parse_kwargs, parse_shape
from ..engine.workload import Workload, get_optimizer_name, get_precision
from ..errors import UsageError
from ..units import parse_bytes

DEFAULT_BATCH = 32
DEFAULT_DTYPE = "fp32"
DEFAULT_OPTIMIZER = "adam"

# typer option declarations, reused by every command's signature
MODEL_ARG = typer.Argument(
    None,
    help="torchvision name (resnet50), path/to/file.py:Class, package.module:attr, or a config .toml",
    show_default=False,
)
MODEL_OPT = typer.Option(None, "--model", "-m", help="The model, as the positional argument (either works).")
BATCH_OPT = typer.Option(None, "--batch-size", "-b", help=f"Batch size \\[default: {DEFAULT_BATCH}, or the config's]")
DTYPE_OPT = typer.Option(None, "--dtype", help=f"fp32 | fp16 | bf16 | amp-fp16 | amp-bf16 \\[default: {DEFAULT_DTYPE}]")
OPTIMIZER_OPT = typer.Option(
    None,
    "--optimizer",
    "-o",
    help=f"sgd | sgd-momentum | adam | adamw | adagrad | rmsprop \\[default: {DEFAULT_OPTIMIZER}]",
)
MODE_OPT = typer.Option(
    None, "--mode", help="train (forward, backward, optimizer step) or eval (no_grad inference) \\[default: train]"
)
INPUT_SHAPE_OPT = typer.Option(
    None, "--input-shape", "-i", help="Per-sample input shape, batch excluded (3,224,224); repeat for several inputs."
)
INPUT_DTYPE_OPT = typer.Option(
    None, "--input-dtype", help="float (follows --dtype) or int64 for token ids \\[default: detected]"
)
TOKEN_RANGE_OPT = typer.Option(
    None, "--token-range", help="Token id range LOW,HIGH (HIGH exclusive) \\[default: 0,num_embeddings]"
)
MODEL_KWARGS_OPT = typer.Option(None, "--model-kwargs", help="""Constructor arguments as JSON: '{"num_classes": 10}'""")
MODEL_ARG_OPT = typer.Option(None, "--model-arg", help="One constructor argument key=value (repeatable).")
GPU_MEMORY_OPT = typer.Option(
    None, "--gpu-memory", help="GPU capacity, e.g. 24GiB or 80GB \\[default: the local GPU's, via NVML]"
)
HEADROOM_OPT = typer.Option(0.8, "--headroom", help="Recommended batch = headroom x the largest batch that fits.")
JSON_OPT = typer.Option(False, "--json", help="Print only JSON on stdout.")


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
) -> Workload:
    """Options -> Workload. Command-line values win over a config file's [workload] table."""
    ref = resolve_model_ref(model, model_opt)
    kwargs = parse_kwargs(model_kwargs, model_arg)
    if batch_size is not None and batch_size <= 0:
        raise UsageError(f"batch size must be a positive integer, got {batch_size}", "e.g. --batch-size 32")
    # validate cheap options before importing torch / user code
    precision = get_precision(dtype) if dtype else None
    opt_name = get_optimizer_name(optimizer) if optimizer else None
    if mode is not None and mode not in ("train", "eval"):
        raise UsageError(f"unknown mode {mode!r}", "choose train or eval")
    shapes = [parse_shape(s) for s in input_shape] if input_shape else None
    spec = load_model(ref, kwargs)
    if shapes:
        spec.inputs.shapes = shapes
    if input_dtype:
        if input_dtype not in ("float", "int64", "int32", "int16", "int8", "uint8", "bool"):
            raise UsageError(f"unknown input dtype {input_dtype!r}", "choose float or int64 (token ids)")
        spec.inputs.dtype = input_dtype
    if token_range:
        try:
            low, high = (int(v) for v in token_range.replace(":", ",").split(","))
        except ValueError:
            raise UsageError(
                f"cannot read token range {token_range!r}", "write LOW,HIGH, e.g. --token-range 0,50257"
            ) from None
        if high <= low:
            raise UsageError(f"token range {token_range!r} is empty", "HIGH must be above LOW")
        spec.inputs.low, spec.inputs.high = low, high
        if spec.inputs.dtype in (None, "float"):
            spec.inputs.dtype = "int64"
    d = spec.defaults
    return Workload(
        model=spec,
        batch_size=batch_size if batch_size is not None else int(d.get("batch_size", DEFAULT_BATCH)),
        precision=precision or get_precision(d.get("dtype", DEFAULT_DTYPE)),
        optimizer=opt_name or d.get("optimizer", DEFAULT_OPTIMIZER),
        mode=mode or d.get("mode", "train"),
        checkpointing=checkpointing,
        inplace_relu=inplace_relu,
    )


def parse_headroom(headroom: float) -> float:
    if not (0 < headroom <= 1):
        raise UsageError(f"--headroom must be in (0, 1], got {headroom}", "e.g. --headroom 0.8 (the seeds' rule)")
    return headroom


def parse_capacity(gpu_memory: str | None) -> int | None:
    return parse_bytes(gpu_memory) if gpu_memory else None


def check_output_path(path: Path | None, overwrite_ok: bool = True) -> None:
    """Fail early, before any work, when an output file cannot be written."""
    if path is None:
        return
    parent = path.expanduser().resolve().parent
    if not parent.exists():
        raise UsageError(f"folder {parent} does not exist", "create it first or choose another path")
    if path.exists() and path.is_dir():
        raise UsageError(f"{path} is a directory", "give a file name")
