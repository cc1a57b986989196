"""The workload (what one training step is) and the one training-step function.

The tracer (fake tensors), the CPU measurer and the CUDA measurer all run
:func:`train_step`, so a prediction and a measurement differ only by what the
hardware adds. Everything torch-related is imported lazily so that ``memprof --help``
and the analytic formulas stay fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .distributed import get_offload
from .finetune import LoraSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .loading import ModelSpec


# --------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """How a step handles numbers.

    ``param_dtype`` is the dtype of parameters, gradients and optimizer state;
    ``autocast_dtype`` (AMP only) is the dtype autocast runs eligible ops in.
    """

    name: str
    param_dtype: str  # "float32" | "float16" | "bfloat16"
    autocast_dtype: str | None = None
    grad_scaler: bool = False

    @property
    def is_amp(self) -> bool:
        return self.autocast_dtype is not None

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.param_dtype]

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.autocast_dtype or self.param_dtype]

    def torch_param_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.param_dtype)

    def torch_autocast_dtype(self) -> torch.dtype | None:
        import torch

        return getattr(torch, self.autocast_dtype) if self.autocast_dtype else None


DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", "float32"),
    "fp16": Precision("fp16", "float16"),
    "bf16": Precision("bf16", "bfloat16"),
    "amp-fp16": Precision("amp-fp16", "float32", "float16", grad_scaler=True),
    "amp-bf16": Precision("amp-bf16", "float32", "bfloat16"),
}
_PRECISION_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "16": "fp16",
    "bfloat16": "bf16",
    "amp": "amp-fp16",
    "amp_fp16": "amp-fp16",
    "amp-float16": "amp-fp16",
    "mixed": "amp-fp16",
    "amp_bf16": "amp-bf16",
    "amp-bfloat16": "amp-bf16",
}


def get_precision(name: str) -> Precision:
    key = str(name).strip().lower()
    key = _PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise UsageError(f"unknown dtype {name!r}", f"choose one of: {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


# --------------------------------------------------------------------------- optimizers
#: name -> (number of param-sized state tensors, description); the state of the ones marked in
#: :data:`STATE_RULES` is not param-sized (analytic.optimizer_state_bytes has the exact rule)
OPTIMIZERS: dict[str, tuple[int, str]] = {
    "sgd": (0, "SGD, no momentum"),
    "sgd-momentum": (1, "SGD with momentum 0.9 (one momentum buffer)"),
    "adam": (2, "Adam (exp_avg, exp_avg_sq)"),
    "adamw": (2, "AdamW (exp_avg, exp_avg_sq)"),
    "adagrad": (1, "Adagrad (sum of squares)"),
    "rmsprop": (1, "RMSprop (square_avg)"),
    "adamw8bit": (2, "bitsandbytes AdamW8bit (two uint8 states + fp32 absmax per 256 values; fp32 below 4096 values)"),
    "paged-adamw8bit": (2, "bitsandbytes PagedAdamW8bit (AdamW8bit with the large states in CUDA unified memory)"),
    "adafactor": (1, "torch.optim.Adafactor (factored second moments: a row and a column per matrix)"),
    "adafactor-hf": (1, "transformers Adafactor as HF Trainer sets it (factored second moments)"),
    "lion": (1, "Lion (one exp_avg), stepping as lion-pytorch does"),
}
#: optimizers whose state is not a whole number of parameter-sized tensors
STATE_RULES = frozenset({"adamw8bit", "paged-adamw8bit", "adafactor", "adafactor-hf"})
_OPTIMIZER_ALIASES = {
    "momentum": "sgd-momentum",
    "sgd_momentum": "sgd-momentum",
    "sgdm": "sgd-momentum",
    "adamw_8bit": "adamw8bit",
    "adamw-8bit": "adamw8bit",
    "adam8bit": "adamw8bit",
    "paged_adamw8bit": "paged-adamw8bit",
    "paged_adamw_8bit": "paged-adamw8bit",
    "paged-adamw-8bit": "paged-adamw8bit",
    "adafactor_hf": "adafactor-hf",
}


def get_optimizer_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _OPTIMIZER_ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}", f"choose one of: {', '.join(OPTIMIZERS)}")
    return key


def optimizer_state_count(name: str) -> int:
    """How many parameter-sized state tensors the optimizer keeps (SGD 0, momentum 1, Adam 2)."""
    return OPTIMIZERS[get_optimizer_name(name)][0]


def optimizer_class(name: str, device_type: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The optimizer's class (or factory) and keyword arguments for ``name``, as PyTorch would run it on
    ``device_type``.

    ``foreach`` is passed explicitly: PyTorch picks the multi-tensor (foreach)
    implementations by default on CUDA and the per-tensor loop on CPU, and the two
    have different temporaries. Tracing for CUDA on fake CPU tensors therefore
    asks for what CUDA would run.
    """
    import torch

    name = get_optimizer_name(name)
    foreach = device_type == "cuda"
    if name == "sgd":
        return torch.optim.SGD, {"lr": 1e-3, "foreach": foreach}
    if name == "sgd-momentum":
        return torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9, "foreach": foreach}
    if name == "adam":
        return torch.optim.Adam, {"lr": 1e-4, "foreach": foreach}
    if name == "adamw":
        return torch.optim.AdamW, {"lr": 1e-4, "foreach": foreach}
    if name == "adagrad":
        return torch.optim.Adagrad, {"lr": 1e-3, "foreach": foreach}
    if name == "rmsprop":
        return torch.optim.RMSprop, {"lr": 1e-4, "foreach": foreach}
    from . import optimizers

    if name in ("adamw8bit", "paged-adamw8bit"):
        return optimizers.AdamW8bit, {"paged": name == "paged-adamw8bit"}
    if name == "lion":
        return optimizers.Lion, {}
    if name == "adafactor":
        return optimizers.make_adafactor, {"foreach": foreach}
    return optimizers.make_hf_adafactor, {}


def make_optimizer(name: str, params, device_type: str, offload: str = "none", world=None):
    """Build the optimizer the way PyTorch would by default on ``device_type`` (see :func:`optimizer_class`).

    ``offload="optimizer"`` steps on the CPU (:class:`memprof.engine.optimizers.OffloadedOptimizer`), with
    the CPU's implementation. With ``world`` (a :class:`memprof.engine.distributed.World`, ZeRO-1),
    PyTorch's ``ZeroRedundancyOptimizer`` around it: each rank keeps the state of its partition only.
    """
    params = list(params)
    if not params:
        raise UsageError("the model has no trainable parameters", "use --mode eval for inference-only models")
    if get_offload(offload) == "optimizer" and world is None:
        from .optimizers import OffloadedOptimizer

        return OffloadedOptimizer(params, lambda masters: make_optimizer(name, masters, "cpu"))
    cls, kwargs = optimizer_class(name, device_type)
    if world is not None:
        from .distributed import make_sharded_optimizer

        return make_sharded_optimizer(params, cls, kwargs, world)
    return cls(params, **kwargs)


# --------------------------------------------------------------------------- workload
MODES = ("train", "eval", "generate")
#: the shape of the training loop around the step (see :func:`train_step`)
LOOPS = ("plain", "trainer")
DEFAULT_LOOP = "plain"
LOOP_DESCRIPTIONS = {
    "plain": "plain loop: `out = model(...)` stays alive through backward and the optimizer step, until the "
    "next forward returns",
    "trainer": "Trainer/Lightning loop: the output is dropped before backward, only the loss is kept",
}
ROUTINGS = ("balanced", "worst")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
KV_CACHES = ("dynamic", "static")


@dataclass(frozen=True)
class Workload:
    """Everything that decides the memory of one step, except the hardware."""

    model: ModelSpec
    batch_size: int = 32
    precision: Precision = PRECISIONS["fp32"]
    optimizer: str = "adam"
    mode: str = "train"
    #: "none", "blocks" (each top-level block checkpointed) or "sqrt" (sqrt(n) segments)
    checkpointing: str = "none"
    #: turn every nn.ReLU into ReLU(inplace=True) before the step
    inplace_relu: bool = False
    #: tokens per sample for sequence models (None: the model's default; see ModelSpec.seq)
    seq_len: int | None = None
    #: the training loop's shape: "plain" keeps the model's output through backward, "trainer" drops it
    loop: str = DEFAULT_LOOP
    #: Hugging Face attention implementation ("sdpa", "eager"); None: the model's default
    attn: str | None = None
    #: the batch holds padding (Hugging Face then builds an explicit attention mask)
    padding: bool = False
    #: generation: tokens generated after the prompt (the prompt is seq_len tokens)
    new_tokens: int | None = None
    #: generation: "dynamic" or "static" KV cache; None: what the model's generation config asks for
    kv_cache: str | None = None
    #: mixture-of-experts routing assumption: "balanced" or "worst"
    routing: str = "balanced"
    #: data parallelism (:mod:`memprof.engine.distributed`): none, ddp, zero1, zero2, zero3 / fsdp;
    #: ``batch_size`` is then per rank, and everything the workload predicts is one rank's
    strategy: str = "none"
    world_size: int = 1
    #: none, optimizer (optimizer state and its step on the CPU; with a strategy: the state counted on the
    #: host) or params (FSDP2's CPUOffloadPolicy)
    offload: str = "none"
    #: DDP's bucket size and ``gradient_as_bucket_view`` (ddp, zero1)
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    #: module-name globs whose parameters are frozen (requires_grad=False)
    freeze: tuple[str, ...] = ()
    #: module-name globs whose parameters stay trainable; every other parameter is frozen
    train_only: tuple[str, ...] = ()
    #: LoRA adapters added with peft (None: no LoRA)
    lora: LoraSpec | None = None
    #: bitsandbytes quantization of the frozen linear weights: "none" | "int8" | "nf4" | "fp4"
    quantize: str = "none"
    #: 4-bit double quantization (bnb_4bit_use_double_quant)
    double_quant: bool = False

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size <= 0:
            raise UsageError(f"batch size must be a positive integer, got {self.batch_size!r}", "e.g. --batch-size 32")
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}", "choose train, eval or generate")
        if self.loop not in LOOPS:
            raise UsageError(f"unknown `loop` {self.loop!r}", "choose plain (output kept through backward) or trainer")
        if self.routing not in ROUTINGS:
            raise UsageError(f"unknown `routing` {self.routing!r}", "choose balanced or worst")
        if self.attn is not None and self.attn not in ATTN_IMPLEMENTATIONS:
            raise UsageError(f"unknown `attn` {self.attn!r}", "choose sdpa or eager")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHES:
            raise UsageError(f"unknown `kv_cache` {self.kv_cache!r}", "choose dynamic or static")
        for name in ("seq_len", "new_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise UsageError(f"`{name}` must be a positive integer, got {value!r}", f"e.g. `{name}` 512")
        object.__setattr__(self, "optimizer", get_optimizer_name(self.optimizer))
        from .distributed import check_plan

        strategy, offload = check_plan(self.strategy, self.world_size, self.offload, self.bucket_cap_mb)
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "offload", offload)
        from .finetune import parse_patterns

        object.__setattr__(self, "freeze", parse_patterns(self.freeze, "freeze"))
        object.__setattr__(self, "train_only", parse_patterns(self.train_only, "train_only"))
        if self.quantize != "none" or self.double_quant:
            from .finetune import parse_method

            object.__setattr__(self, "quantize", parse_method(self.quantize))
            if self.double_quant and self.quantize not in ("nf4", "fp4"):
                raise UsageError(
                    "`double_quant` applies to 4-bit weights only", "combine it with `quantize` nf4 or fp4"
                )
        if self.offload == "optimizer" and self.optimizer in ("adamw8bit", "paged-adamw8bit"):
            raise UsageError(
                f"`offload` optimizer does not combine with {self.optimizer} (bitsandbytes steps on the GPU)",
                "offload adam, adamw, lion, adafactor, ... or keep the 8-bit optimizer on the GPU",
            )
        if self.lora is not None and (self.freeze or self.train_only):
            raise UsageError(
                "`freeze` / `train_only` do not combine with `lora_rank`: LoRA already freezes every base weight",
                "choose the adapted layers with `lora_targets`, or drop the LoRA options",
            )

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"

    def with_batch(self, batch_size: int) -> Workload:
        return dataclasses.replace(self, batch_size=batch_size)

    def with_seq_len(self, seq_len: int) -> Workload:
        return dataclasses.replace(self, seq_len=seq_len)

    def replace(self, **changes: Any) -> Workload:
        return dataclasses.replace(self, **changes)

    def make_batch(self, device, batch_size: int | None = None) -> tuple[tuple, dict, Any]:
        """Inputs and target of one batch: ``(args, kwargs, target)`` (see ModelSpec.make_batch)."""
        return self.model.make_batch(
            self.batch_size if batch_size is None else batch_size,
            device,
            self.precision,
            seq_len=self.seq_len,
            padding=self.padding,
            mode=self.mode,
        )

    def describe(self) -> dict[str, Any]:
        """Plain data for headers and JSON."""
        info = {
            "model": self.model.display_name,
            "batch_size": self.batch_size,
            "input": self.model.input_description(self.batch_size, self.seq_len, self.padding, self.mode),
            "dtype": self.precision.name,
            "optimizer": self.optimizer if self.mode == "train" else None,
            "mode": self.mode,
            "checkpointing": self.checkpointing,
            "inplace_relu": self.inplace_relu,
            **self.finetune_description(),
        }
        if self.seq_len is not None:
            info["seq_len"] = self.seq_len
        if self.mode == "train":
            info["loop"] = self.loop
        if self.attn is not None:
            info["attn"] = self.attn
        if self.padding:
            info["padding"] = True
        if self.mode == "generate":
            info["new_tokens"] = self.new_tokens
            info["kv_cache"] = self.kv_cache or "model default"
        if self.model.moe is not None:
            info["routing"] = self.routing
        hf = self.model.hf
        if hf is not None:
            info["source"] = hf.origin
            info["task"] = hf.task
            if hf.attn_used:
                info["attn_used"] = hf.attn_used
            if hf.published_params is not None:
                info["published_params"] = hf.published_params
        return info | self.describe_parallel()

    def describe_parallel(self) -> dict[str, Any]:
        """The data-parallel fields, only when there is a strategy (a single process describes as before)."""
        if not self.distributed:
            return {}
        out: dict[str, Any] = {"strategy": self.strategy, "world_size": self.world_size, "offload": self.offload}
        if self.strategy in ("ddp", "zero1"):
            out |= {"bucket_cap_mb": self.bucket_cap_mb, "gradient_as_bucket_view": self.gradient_as_bucket_view}
        return out

    def finetune_description(self) -> dict[str, Any]:
        """The fine-tuning levers that are set (nothing when none is)."""
        out: dict[str, Any] = {}
        if self.freeze:
            out["freeze"] = list(self.freeze)
        if self.train_only:
            out["train_only"] = list(self.train_only)
        if self.lora is not None:
            out["lora"] = {
                "rank": self.lora.rank,
                "alpha": self.lora.alpha,
                "targets": list(self.lora.targets) or None,
                "dropout": self.lora.dropout,
            }
        if self.quantize != "none":
            out["quantize"] = self.quantize + ("+double-quant" if self.double_quant else "")
        if self.offload != "none":
            out["offload"] = self.offload
        return out


# --------------------------------------------------------------------------- building
@dataclass
class Prepared:
    """A model, optimizer and batch ready for :func:`train_step` on one device."""

    workload: Workload
    model: Any
    optimizer: Any | None
    args: tuple
    kwargs: dict
    target: Any
    loss_fn: Callable
    device_type: str
    extras: dict = field(default_factory=dict)
    #: makes the context entered around every step (Hugging Face: MoE routing, known values on fake tensors)
    context: Callable[[], Any] | None = None

    def step_context(self):
        return self.context() if self.context is not None else contextlib.nullcontext()


def _tensors(model):
    yield from model.parameters()
    yield from model.buffers()


def _convert(model, device, dtype) -> None:
    """``model.to(device, dtype)`` that also works on fake tensors (which cannot be swapped in place).

    Floating parameters and buffers get ``dtype``; tied parameters stay tied.
    """
    import torch

    memo: dict[int, torch.Tensor] = {}

    def convert(t, param: bool):
        if id(t) not in memo:
            kwargs = {"device": device}
            if t.is_floating_point():
                kwargs["dtype"] = dtype
            with torch.no_grad():
                new = t.to(**kwargs)
            memo[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if param else new
        return memo[id(t)]

    for module in model.modules():
        for name, t in list(module._parameters.items()):
            if t is not None:
                module._parameters[name] = convert(t, True)
        for name, t in list(module._buffers.items()):
            if t is not None:
                module._buffers[name] = convert(t, False)


def build_model(workload: Workload, device: torch.device | str = "cpu"):
    """Construct the model on ``device`` in the workload's parameter dtype and mode.

    Call it inside FakeTensorMode to get a model that holds no real memory.
    """
    import torch

    device = torch.device(device)
    with torch.device(device):
        model = workload.model.instantiate(workload)
    dtype = workload.precision.torch_param_dtype()
    if dtype != torch.float32 or any(t.device != device for t in _tensors(model)):
        _convert(model, device, dtype)
    if workload.inplace_relu:
        for module in model.modules():
            if isinstance(module, torch.nn.ReLU):
                module.inplace = True
    model = apply_finetuning(model, workload)
    if workload.checkpointing != "none" and workload.mode == "train":
        if not _own_checkpointing(model, workload.checkpointing):
            from .checkpointing import apply_checkpointing

            model = apply_checkpointing(model, workload.checkpointing)
    model.train(workload.mode == "train")
    if workload.mode != "train":
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _own_checkpointing(model, mode: str) -> bool:
    """Per-block checkpointing through the model's own switch (Hugging Face's), when it has one."""
    if mode != "blocks" or not getattr(model, "supports_gradient_checkpointing", False):
        return False
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        return False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enable()
    return True


def apply_finetuning(model, workload: Workload):
    """Quantize, freeze and add LoRA adapters as the workload asks (in the order transformers and peft
    do: weights loaded in the model dtype, then quantized, then adapted); returns the model to train."""
    from . import finetune

    if workload.quantize != "none":
        from .quantize import apply_quantization

        precision = workload.precision
        apply_quantization(
            model,
            workload.quantize,
            double_quant=workload.double_quant,
            compute_dtype=precision.torch_autocast_dtype() or precision.torch_param_dtype(),
            weight_dtype=precision.torch_param_dtype(),
        )
    finetune.apply_freezing(model, workload.freeze, workload.train_only)
    if workload.lora is not None:
        model = finetune.apply_lora(model, workload.lora)
    return model


def prepare(
    workload: Workload, device: torch.device | str = "cpu", *, optimizer_device_type: str | None = None, model=None
) -> Prepared:
    """Build model, optimizer and one batch for ``workload`` on ``device``.

    With a data-parallel strategy the model is wrapped (DDP, FSDP2) over the process group
    ``torchrun`` initialised, and ``workload.batch_size`` is this rank's batch.
    ``optimizer_device_type`` chooses which device's default optimizer implementation
    to use (see :func:`make_optimizer`); it defaults to ``device``'s type.
    """
    import torch

    device = torch.device(device)
    if model is None:
        model = build_model(workload, device)
    world = None
    if workload.distributed:
        from . import distributed

        world = distributed.current_world(device.type)
        model = distributed.wrap(model, distributed.plan_of(workload), world, device.type)
    opt = None
    if workload.mode == "train":
        trainable = [p for p in model.parameters() if p.requires_grad]
        sharded_opt = world if workload.strategy == "zero1" else None
        offload = "none" if workload.distributed else workload.offload
        opt = make_optimizer(workload.optimizer, trainable, optimizer_device_type or device.type, offload, sharded_opt)
    args, kwargs, target = workload.make_batch(device)

    def context():
        return workload.model.step_context(model, workload, fake=False)

    return Prepared(workload, model, opt, args, kwargs, target, workload.model.loss_fn(), device.type, context=context)


def autocast(prepared: Prepared):
    import torch

    precision = prepared.workload.precision
    if not precision.is_amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=prepared.device_type, dtype=precision.torch_autocast_dtype())


def _noop(_phase: str) -> None:
    return None


#: how many steps whose optimizer step GradScaler skipped a measurement reruns before it gives up
MAX_SKIPPED_STEPS = 10


def make_grad_scaler(workload: Workload, device_type: str):
    """PyTorch's GradScaler for AMP fp16 training on ``device_type`` (None for other workloads, or where this
    torch has none for that device)."""
    if not (workload.precision.grad_scaler and workload.mode == "train"):
        return None
    import torch

    try:
        return torch.amp.GradScaler(device_type)
    except (AttributeError, TypeError):  # torch < 2.3: CUDA only
        return torch.cuda.amp.GradScaler() if device_type == "cuda" else None


def train_step(prepared: Prepared, on_phase: Callable[[str], None] = _noop, scaler=None) -> bool:
    """One training step: forward, loss, backward, optimizer.step(), zero_grad(set_to_none=True).

    The loop shape (``workload.loop``): "plain" is ``out = model(...); loss = ...; loss.backward();
    optimizer.step()`` in a loop body, so the output (logits included) stays alive through backward and
    the optimizer step, until the next step's forward returns and ``out`` is rebound; "trainer" drops
    the output before backward as Hugging Face's Trainer and Lightning do.

    In eval mode: one forward pass under ``torch.no_grad()``. In generate mode: one
    ``model.generate`` call (phases "prefill" and "decode"). ``on_phase`` is told "forward",
    "backward" and "optimizer" as each begins, and "done" at the end. ``scaler`` (a GradScaler,
    AMP fp16 on CUDA) scales the loss and steps through it. Returns False when
    the scaler skipped ``optimizer.step()`` (inf/nan gradients: it lowered its scale), else True.
    """
    with prepared.step_context():
        return _step(prepared, on_phase, scaler)


def _step(prepared: Prepared, on_phase: Callable[[str], None], scaler) -> bool:
    import torch

    workload = prepared.workload
    if workload.mode == "generate":
        generate_step(prepared, on_phase)
        return True
    if workload.mode == "eval":
        on_phase("forward")
        with torch.no_grad(), autocast(prepared):
            out = prepared.model(*prepared.args, **prepared.kwargs)
        del out
        on_phase("done")
        return True
    kept = prepared.extras
    on_phase("forward")
    with autocast(prepared):
        out = prepared.model(*prepared.args, **prepared.kwargs)
        kept.pop("out", None)  # a plain loop's previous output dies when `out` is rebound
        loss = prepared.loss_fn(out, prepared.target)
    kept.pop("loss", None)
    if workload.loop == "trainer":
        del out
    on_phase("backward")
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    on_phase("optimizer")
    optimizer = prepared.optimizer
    assert optimizer is not None  # prepare() makes one in train mode
    stepped = True
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # a skipped step backs the scale off; growth or none: stepped
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if workload.loop == "plain":
        kept["out"], kept["loss"] = out, loss
        del out
    del loss
    on_phase("done")
    return stepped


def generate_step(
    prepared: Prepared,
    on_phase: Callable[[str], None] = _noop,
    new_tokens: int | None = None,
    stop_after: int | None = None,
) -> Any:
    """One ``model.generate`` call for ``new_tokens`` (default: the workload's) tokens after the prompt.

    ``stop_after`` ends it after that many tokens (caches still sized for ``new_tokens``).
    Phases: "prefill" (the first forward, over the whole prompt) and "decode" (each later forward,
    one token against the KV cache); "done" at the end. Returns the KV cache of the last forward.
    """
    workload = prepared.workload
    hf = workload.model.hf
    if hf is None or not hf.can_generate:
        raise UsageError(
            f"{workload.model.display_name} cannot generate", "generation needs a causal or seq2seq Hugging Face model"
        )
    caches: list[Any] = []
    on_cache = prepared.extras.get("on_cache")

    def on_forward(i: int) -> None:
        on_phase(prepared.extras.get("phase_names", {}).get(i, "prefill" if i == 1 else "decode"))

    def keep(cache: Any) -> None:
        caches[:] = [cache]
        if on_cache is not None:
            on_cache(cache)

    out = hf.generate(
        prepared.model,
        prepared.kwargs,
        new_tokens or workload.new_tokens or 1,
        workload.kv_cache,
        on_forward=on_forward,
        on_cache=keep,
        stop_after=stop_after,
    )
    del out
    on_phase("done")
    return caches[0] if caches else None


def train_steps(
    prepared: Prepared,
    steps: int,
    scaler=None,
    on_step: Callable[[int], None] = lambda _i: None,
    on_phase: Callable[[str], None] = _noop,
    max_skipped: int = MAX_SKIPPED_STEPS,
) -> int:
    """Run training steps until the optimizer has really stepped ``steps`` times; return how many were skipped.

    GradScaler skips ``optimizer.step()`` while its loss scale is too large (inf/nan gradients; its
    first steps often do at the initial 65536): no optimizer state exists yet, so a measurement of those
    steps misses it. Each skipped step is run again, up to ``max_skipped`` times; when more are skipped
    it stops and returns ``max_skipped + 1`` (the optimizer stepped fewer than ``steps`` times).
    ``on_step`` is told each step's number (1, 2, ...) as it begins.
    """
    taken = skipped = 0
    while taken < steps:
        on_step(taken + skipped + 1)
        if train_step(prepared, on_phase, scaler):
            taken += 1
        else:
            skipped += 1
            if skipped > max_skipped:
                break
    return skipped
