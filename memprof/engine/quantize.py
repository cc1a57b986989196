"""Quantized frozen weights (bitsandbytes' int8, nf4, fp4) modelled by stand-in layers.

bitsandbytes needs CUDA, and memprof traces on fake CPU tensors, so it is never imported here.
Instead each ``nn.Linear`` that ``transformers``' ``BitsAndBytesConfig`` would quantize is
replaced by a stand-in that holds tensors of exactly the sizes bitsandbytes stores and whose
forward and backward allocate what bitsandbytes' kernels allocate. The rules, read from
bitsandbytes 0.50.1 (``bitsandbytes-foundation/bitsandbytes``, tag ``0.50.1``; docs/finetuning.md
cites the lines):

4-bit (``Linear4bit``, ``Params4bit``; ``functional.quantize_4bit``, ``_ops.py`` fake kernel)
    * packed weight: ``uint8`` of shape ``((n + 1) // 2, 1)`` for ``n = out * in`` values: two
      4-bit values per byte;
    * ``absmax``: one ``float32`` per block of ``blocksize`` values (64 by default:
      ``blocksize = 64`` when None), ``ceil(n / 64)`` of them;
    * ``code``: the 16-entry nf4/fp4 table, ``float32`` (``get_4bit_type``), one per layer;
    * double quantization (``compress_statistics``, transformers' ``bnb_4bit_use_double_quant``):
      ``absmax`` becomes ``uint8`` (``quantize_blockwise(absmax - offset, blocksize=256)``), plus a
      second-level ``float32`` absmax per 256 blocks, a copy of the 256-entry ``float32`` dynamic map
      (``code.to(device, copy=True)``) and a scalar ``float32`` ``offset`` (``absmax.mean()``).
    * forward (training shapes, more than 1536 rows: ``backends/cuda/ops.py`` ``gemm_4bit`` falls back
      to ``_dequant_linear_fallback``): with double quantization a ``float32`` absmax of ``ceil(n/64)``
      values is dequantized and offset (two such tensors), then the weight is dequantized to the input
      dtype (``out x in``), ``F.linear`` runs and the temporaries are freed. Nothing of the input is
      saved (``MatMul4Bit`` keeps only the packed weight).
    * backward (``MatMul4Bit.backward``): ``dequantize_4bit`` again (``float32`` absmax when nested,
      the weight in ``quant_state.dtype``, ``.to(grad dtype)`` when they differ), one matmul.

8-bit (``Linear8bitLt`` with ``has_fp16_weights=False``, ``Int8Params``; ``MatMul8bitLt``)
    * weight ``int8`` ``out x in`` (``CB``) and one ``float32`` scale per row (``SCB``);
    * forward: the input cast to ``float16``, ``int8_vectorwise_quant`` (``int8`` copy, ``float32`` row
      stats; with transformers' default ``llm_int8_threshold=6.0`` an ``abs()`` and a ``bool`` outlier
      mask), ``int8_linear_matmul`` (``int32`` result), ``int8_mm_dequant`` (``float16``, then the
      input dtype). The input is kept for backward (``ctx.tensors = (CAt, subA, A)``).
    * backward: ``CB.to(dtype_A, copy=True).mul_(SCB.unsqueeze(1).mul(1/127))`` (the whole weight
      dequantized), one matmul.
    * outlier columns (inputs above the threshold) depend on the data: memprof assumes none and says so.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UsageError

#: bitsandbytes' default 4-bit block size (functional.quantize_4bit: ``blocksize = 64`` when None)
BLOCKSIZE_4BIT = 64
#: block size of the second-level (nested) quantization of the absmax values
NESTED_BLOCKSIZE = 256
#: size of bitsandbytes' dynamic 8-bit map (create_dynamic_map: 256 float32 values)
DYNAMIC_MAP_SIZE = 256
#: size of the nf4/fp4 code table (get_4bit_type: 16 float32 values)
CODE_4BIT_SIZE = 16
#: gemm_4bit uses its own kernel (no dequantized weight) up to this many rows on every CUDA GPU
#: (backends/cuda/ops.py: _GEMM_4BIT_CUSTOM_FLOOR_M); above 1536 rows always dequant + F.linear
GEMM_4BIT_CUSTOM_FLOOR_M = 4
GEMM_4BIT_CUSTOM_MAX_M = 1536
#: transformers' BitsAndBytesConfig default llm_int8_threshold
INT8_THRESHOLD = 6.0


def _blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


def storage_4bit(out_features: int, in_features: int, double_quant: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors bitsandbytes keeps for one 4-bit linear layer: name -> (shape, dtype)."""
    n = out_features * in_features
    blocks = _blocks(n, BLOCKSIZE_4BIT)
    tensors: dict[str, tuple[tuple[int, ...], str]] = {
        "weight": (((n + 1) // 2, 1), "uint8"),
        "code": ((CODE_4BIT_SIZE,), "float32"),
    }
    if double_quant:
        tensors["absmax"] = ((blocks,), "uint8")
        tensors["nested_absmax"] = ((_blocks(blocks, NESTED_BLOCKSIZE),), "float32")
        tensors["nested_code"] = ((DYNAMIC_MAP_SIZE,), "float32")
        tensors["offset"] = ((), "float32")
    else:
        tensors["absmax"] = ((blocks,), "float32")
    return tensors


def storage_int8(out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors bitsandbytes keeps for one LLM.int8() linear layer: the int8 weight and per-row scales."""
    return {"weight": ((out_features, in_features), "int8"), "SCB": ((out_features,), "float32")}


_ITEMSIZE = {"uint8": 1, "int8": 1, "float32": 4}


def layer_bytes(method: str, out_features: int, in_features: int, double_quant: bool = False) -> int:
    """Bytes one quantized linear layer stores (weight + quantization state, bias excluded)."""
    tensors = (
        storage_int8(out_features, in_features)
        if method == "int8"
        else storage_4bit(out_features, in_features, double_quant)
    )
    total = 0
    for shape, dtype in tensors.values():
        n = 1
        for d in shape:
            n *= d
        total += n * _ITEMSIZE[dtype]
    return total


# =========================================================================== the stand-in layers
def _empty(shape, dtype: str, device) -> torch.Tensor:
    return torch.empty(shape, dtype=getattr(torch, dtype), device=device)


class _QuantLinear(torch.nn.Linear):
    """Base of the stand-ins: an ``nn.Linear`` (as bitsandbytes' layers are) without a float weight."""

    method = "none"

    def __init__(self, in_features: int, out_features: int, bias, device) -> None:
        torch.nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.bias = bias  # the original bias (frozen, as transformers' replace_with_bnb_linear leaves it)
        self.weight_dtype = torch.float32

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}"

    def _cast_bias(self, x: torch.Tensor) -> Any:
        """bitsandbytes casts the bias to the input dtype for good on the first forward."""
        if self.bias is not None and self.bias.dtype != x.dtype:
            self.bias.data = self.bias.data.to(x.dtype)
        return self.bias


class Linear4bit(_QuantLinear):
    """Stand-in for ``bitsandbytes.nn.Linear4bit`` (nf4 / fp4): same storage, same temporaries."""

    method = "nf4"

    def __init__(
        self, in_features, out_features, bias, *, quant_type, double_quant, compute_dtype, weight_dtype, device
    ):
        super().__init__(in_features, out_features, bias, device)
        self.method = quant_type
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype  # quant_state.dtype: the dtype the weight had when quantized
        tensors = storage_4bit(out_features, in_features, double_quant)
        shape, dtype = tensors.pop("weight")
        self.weight = torch.nn.Parameter(_empty(shape, dtype, device), requires_grad=False)
        for name, (shape, dtype) in tensors.items():
            self.register_buffer(name, _empty(shape, dtype, device), persistent=False)
        self.blocks = _blocks(out_features * in_features, BLOCKSIZE_4BIT)

    def _absmax(self, fallback: bool) -> list[torch.Tensor]:
        """The float32 absmax a nested state is dequantized to (kept alive by the caller).

        ``gemm_4bit``'s fallback makes two (``absmax_dq``, then ``absmax_dq + offset``);
        ``dequantize_4bit`` one (``dequantize_blockwise``, then ``+= offset`` in place)."""
        if not self.double_quant:
            return []
        dequantized = torch.empty((self.blocks,), dtype=torch.float32, device=self.weight.device)
        offset = self.get_buffer("offset")
        if not fallback:
            return [dequantized.add_(offset)]
        return [dequantized, dequantized + offset]

    def dequantized_weight(self, dtype) -> torch.Tensor:
        return torch.empty((self.out_features, self.in_features), dtype=dtype, device=self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = self._cast_bias(x)
        if bias is not None:
            bias = bias.to(self.compute_dtype)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if needs_grad:
            out = _MatMul4bit.apply(x, self, bias)
        else:
            out = _gemm_4bit(self, x, bias)
        return out.to(inp_dtype)


def _gemm_4bit(layer: Linear4bit, x: torch.Tensor, bias) -> torch.Tensor:
    """``bitsandbytes::gemm_4bit`` on CUDA: dequantize + ``F.linear`` for training shapes."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows <= GEMM_4BIT_CUSTOM_FLOOR_M:  # its own kernel: no dequantized weight
        return torch.empty((*x.shape[:-1], layer.out_features), dtype=x.dtype, device=x.device)
    absmax = layer._absmax(fallback=True)
    weight = layer.dequantized_weight(x.dtype)
    out = torch.nn.functional.linear(x, weight, bias)
    del weight, absmax
    return out


class _MatMul4bit(torch.autograd.Function):
    """``bitsandbytes.autograd._functions.MatMul4Bit``: saves only the packed weight."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        ctx.dtype_bias = None if bias is None else bias.dtype
        return _gemm_4bit(layer, x, bias)

    @staticmethod
    def backward(ctx, grad_output):
        layer: Linear4bit = ctx.layer
        grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(0, dtype=ctx.dtype_bias)
        grad_x = None
        if ctx.needs_input_grad[0]:
            absmax = layer._absmax(fallback=False)
            weight = layer.dequantized_weight(layer.weight_dtype)
            del absmax
            if weight.dtype != grad_output.dtype:
                weight = weight.to(grad_output.dtype)
            grad_x = torch.matmul(grad_output, weight)
        return grad_x, None, grad_bias


class Linear8bitLt(_QuantLinear):
    """Stand-in for ``bitsandbytes.nn.Linear8bitLt(has_fp16_weights=False, threshold=6.0)``."""

    method = "int8"

    def __init__(self, in_features, out_features, bias, *, threshold: float, weight_dtype, device):
        super().__init__(in_features, out_features, bias, device)
        self.threshold = threshold
        self.weight_dtype = weight_dtype
        tensors = storage_int8(out_features, in_features)
        shape, dtype = tensors.pop("weight")
        self.weight = torch.nn.Parameter(_empty(shape, dtype, device), requires_grad=False)
        shape, dtype = tensors.pop("SCB")
        self.register_buffer("SCB", _empty(shape, dtype, device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._cast_bias(x)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _MatMul8bitLt.apply(x, self, bias)
        return _int8_forward(self, x, bias)[0]


def _int8_forward(layer: Linear8bitLt, x: torch.Tensor, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """``MatMul8bitLt.forward`` (fast path: the weight needs no gradient); returns (output, A)."""
    input_shape = x.shape
    A = x.reshape(-1, x.shape[-1]) if x.dim() == 3 else x
    rows, cols = A.numel() // A.shape[-1], A.shape[-1]
    A16 = A.to(torch.float16)
    # int8_vectorwise_quant (backends/cuda/ops.py)
    row_stats = torch.empty(rows, dtype=torch.float32, device=A.device)
    out_row = torch.empty(A16.shape, dtype=torch.int8, device=A.device)
    if layer.threshold > 0.0:
        outliers = A16.abs() >= layer.threshold
        del outliers  # no outliers assumed: outlier_cols = torch.empty(0)
    del A16
    # int8_mixed_scaled_mm (backends/default/ops.py) -> int8_scaled_mm -> int8_linear_matmul + int8_mm_dequant
    sub_a = torch.empty(0, dtype=A.dtype, device=A.device) if layer.threshold > 0.0 else None
    out_i32 = torch.empty((rows, layer.out_features), dtype=torch.int32, device=A.device)
    out16 = torch.empty((rows, layer.out_features), dtype=torch.float16, device=A.device)
    if bias is not None and bias.dtype != torch.float16:
        out16.add_(bias)
    output = out16.to(A.dtype) if A.dtype != torch.float16 else out16
    del out16, out_i32, out_row, row_stats, sub_a, cols
    if len(input_shape) == 3:
        output = output.reshape(*input_shape[:-1], layer.out_features)
    return output, A


class _MatMul8bitLt(torch.autograd.Function):
    """``bitsandbytes.autograd._functions.MatMul8bitLt``: keeps the input (``ctx.tensors``) for backward."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        output, A = _int8_forward(layer, x, bias)
        ctx.layer = layer
        ctx.tensors = (None, None, A)
        ctx.grad_shape = x.shape
        ctx.dtype_A = A.dtype
        ctx.dtype_bias = None if bias is None else bias.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        layer: Linear8bitLt = ctx.layer
        grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(0, dtype=ctx.dtype_bias)
        if grad_output.dim() == 3:
            grad_output = grad_output.reshape(-1, grad_output.shape[-1]).contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            scb: torch.Tensor = layer.get_buffer("SCB")
            cb = layer.weight.to(ctx.dtype_A, copy=True).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
            grad_x = torch.matmul(grad_output.to(ctx.dtype_A), cb).view(ctx.grad_shape)
        return grad_x, None, grad_bias


def is_quantized_layer(module) -> bool:
    return isinstance(module, _QuantLinear)


def packed_value_count(module, param) -> int:
    """How many values ``param`` holds as peft counts them (a 4-bit packed weight: 2 per stored byte)."""
    if isinstance(module, Linear4bit) and param is module.weight:
        return param.numel() * 2 * param.element_size()
    return param.numel()


# =========================================================================== replacing the layers
def _skip_names(model) -> list[str] | None:
    """transformers' default: ``get_keys_to_not_convert`` (tied weights, the last module, the output
    embeddings) plus ``_keep_in_fp32_modules``; None (convert every Linear) for other models."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    from transformers.quantizers.base import get_keys_to_not_convert

    names = list(get_keys_to_not_convert(model))
    names.extend(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(set(names))


def _should_convert(name: str, skip: list[str] | None) -> bool:
    if skip is None:
        return True
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # pragma: no cover - transformers without it
        return not any(name == s or name.startswith(s + ".") for s in skip)
    return bool(should_convert_module(name, skip))


def _linear_shape(module) -> tuple[int, int] | None:
    """(in, out) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (exactly those types, as transformers converts)."""
    if type(module) is torch.nn.Linear:
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


def _set_submodule(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_quantization(model, method: str, *, double_quant: bool, compute_dtype, weight_dtype) -> int:
    """Replace the linear layers bitsandbytes would quantize by stand-ins; returns how many were replaced.

    ``compute_dtype`` is bitsandbytes' ``bnb_4bit_compute_dtype`` (memprof uses the step's compute
    dtype, as QLoRA recipes set it); ``weight_dtype`` the dtype the weights are loaded in.
    """
    if method not in ("int8", "nf4", "fp4"):  # validated by finetune.parse_method already
        return 0
    skip = _skip_names(model)
    replaced = 0
    for name, module in list(model.named_modules()):
        shape = _linear_shape(module)
        if not name or shape is None or not _should_convert(name, skip):
            continue
        n_in, n_out = shape
        device = module.weight.device
        bias = module.bias
        if bias is not None:
            bias.requires_grad_(False)
        new: _QuantLinear
        if method == "int8":
            new = Linear8bitLt(n_in, n_out, bias, threshold=INT8_THRESHOLD, weight_dtype=weight_dtype, device=device)
        else:
            new = Linear4bit(
                n_in,
                n_out,
                bias,
                quant_type=method,
                double_quant=double_quant,
                compute_dtype=compute_dtype,
                weight_dtype=weight_dtype,
                device=device,
            )
        new.train(module.training)
        _set_submodule(model, name, new)
        replaced += 1
    if not replaced:
        raise UsageError(
            "`quantize`: the model has no nn.Linear layer bitsandbytes would quantize",
            "bitsandbytes (through transformers) quantizes nn.Linear layers, the output layer excepted",
        )
    return replaced


# =========================================================================== LoRA on the stand-ins
_LORA_CLASSES: dict[type, type] = {}


def lora_custom_modules(model) -> dict[type, type]:
    """peft's LoRA layers for bitsandbytes' Linear4bit / Linear8bitLt (``peft/tuners/lora/bnb.py``),
    rebuilt on the stand-ins: peft defines them only when bitsandbytes is installed."""
    if not any(is_quantized_layer(m) for m in model.modules()):
        return {}
    if not _LORA_CLASSES:
        _LORA_CLASSES.update(_make_lora_classes())
    return dict(_LORA_CLASSES)


def _make_lora_classes() -> dict[type, type]:
    from peft.tuners.lora.layer import LoraLayer

    class _LoraQuant(torch.nn.Module, LoraLayer):
        clone_result = False

        def __init__(self, base_layer, adapter_name, config, r=0, lora_alpha=1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def forward(self, x, *args, **kwargs):
            # peft.tuners.lora.bnb Linear8bitLt.forward / Linear4bit.forward (vanilla LoRA, adapters enabled)
            result = self.base_layer(x, *args, **kwargs)
            if self.clone_result:  # "As per Tim Dettmers, for 4bit, we need to defensively clone here."
                result = result.clone()
            for active_adapter in self.active_adapters:
                if active_adapter not in self.lora_A.keys():
                    continue
                lora_A: Any = self.lora_A[active_adapter]
                lora_B = self.lora_B[active_adapter]
                dropout = self.lora_dropout[active_adapter]
                scaling = self.scaling[active_adapter]
                requires_conversion = not torch.is_autocast_enabled()
                if requires_conversion:
                    expected_dtype = result.dtype
                    x = self._cast_input_dtype(x, lora_A.weight.dtype)
                output = lora_B(lora_A(dropout(x))) * scaling
                if requires_conversion:
                    output = output.to(expected_dtype)
                result = result + output
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    class LoraLinear4bit(_LoraQuant):
        clone_result = True

    class LoraLinear8bitLt(_LoraQuant):
        clone_result = False

    return {Linear4bit: LoraLinear4bit, Linear8bitLt: LoraLinear8bitLt}
