"""CUDA's kernel choices, applied while a CUDA step is traced on fake CPU tensors.

The tracer runs the step on fake *CPU* tensors: tensors on a fake ``cuda`` device can run a
forward without a GPU, but not a backward (the autograd engine asks the CUDA driver for stream
state, pytorch/pytorch#92627). Wherever PyTorch picks a different kernel or autocast rule for
CUDA tensors, a plain CPU trace would therefore record the CPU's memory. :class:`CudaRules`
registers Python kernels with PyTorch's dispatcher, for the duration of one trace only
(``torch.library.Library``; removed on exit), that do what CUDA does:

* **dropout** (``aten::dropout``, at the AutogradCPU key). CUDA runs the fused
  ``native_dropout`` and keeps a 1-byte bool mask for backward (``Dropout.cpp``:
  ``is_fused_kernel_acceptable`` - CUDA input, 0 < p < 1, non-empty); the CPU draws a float noise
  tensor that ``mul`` keeps. In-place dropout and feature dropout run the same code on both.
* **softmax / log_softmax of fp16 into fp32** (``SoftMax.cpp``): on CUDA ``softmax(x_half,
  dtype=float)`` calls ``_softmax(x, dim, half_to_float=True)`` - no fp32 copy of the input.
* **autocast** (at the AutocastCPU key): CUDA's op lists and cast policies
  (``autocast_mode.h``: lower_precision_fp, fp32, fp32_set_opt_dtype, fp32_append_dtype,
  promote, banned) replace the CPU's, with autocast's weight-cast cache (casts of fp32 leaf
  parameters live until the outermost autocast region exits). Which ops CUDA autocasts is read
  from the running PyTorch (``_dispatch_get_registrations_for_dispatch_key("AutocastCUDA")``);
  only each op's policy comes from :data:`AUTOCAST_POLICY`.
* **scaled_dot_product_attention** (at the AutogradCPU key): the backend CUDA would pick
  (``sdp_utils.cpp``: cuDNN, flash, memory-efficient, math, in the order and under the
  constraints of the target architecture and the running PyTorch), then that backend's op, as
  the CUDA branch of ``attention.cpp`` calls it (head-dim padding for flash, boolean masks made
  additive and aligned for memory-efficient). The fused ops' meta kernels give the tensors they
  keep (output, logsumexp, RNG state - never the T x T matrix); their backward scratch is added
  by the tracer (:func:`memprof.engine.overheads.attention_backward_scratch`).

``tests/test_cudarules.py`` checks these against PyTorch's own CUDA behaviour where it can run
without a GPU (forward passes on fake ``cuda`` tensors under CUDA autocast).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .overheads import torch_version

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..results import CudaTarget

# --------------------------------------------------------------------------- autocast policies
LOWER = "lower_precision_fp"
FP32 = "fp32"
SET_OPT_DTYPE = "fp32_set_opt_dtype"
APPEND_DTYPE = "fp32_append_dtype"
PROMOTE = "promote"
BANNED = "banned"

#: CUDA autocast's policy per op (by name, all overloads unless an overload is given), from
#: aten/src/ATen/autocast_mode.h (AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
#: AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE, AT_FORALL_PROMOTE)
#: and autocast_mode.cpp (KERNEL_CUDA for cudnn_convolution*, binary_cross_entropy banned).
AUTOCAST_POLICY: dict[str, str] = {
    **dict.fromkeys(
        (
            "_convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d "
            "convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm baddbmm bmm "
            "chain_matmul linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell "
            "rnn_tanh_cell rnn_relu_cell _scaled_dot_product_flash_attention scaled_dot_product_attention "
            "cudnn_convolution cudnn_convolution_transpose"
        ).split(),
        LOWER,
    ),
    **dict.fromkeys(
        (
            "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus "
            "layer_norm native_layer_norm rms_norm group_norm frobenius_norm nuclear_norm cosine_similarity "
            "poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss "
            "smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss "
            "triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm "
            "logsumexp upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d _upsample_nearest_exact2d "
            "upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d "
            "_upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa"
        ).split(),
        FP32,
    ),
    **dict.fromkeys(
        "prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm sum".split(), SET_OPT_DTYPE
    ),
    "norm": APPEND_DTYPE,
    **dict.fromkeys(
        "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add".split(), PROMOTE
    ),
    "binary_cross_entropy": BANNED,
}
#: norm overloads without a dtype -> the overload CUDA autocast redispatches to with dtype=float32
_APPEND_DTYPE_TARGET = {
    "Scalar": "ScalarOpt_dtype",
    "ScalarOpt_dim": "ScalarOpt_dim_dtype",
    "names_ScalarOpt_dim": "names_ScalarOpt_dim_dtype",
}
#: CUDA autocast registrations that never run on a CPU trace (cuDNN-only entry points). CUDA autocast's
#: _cudnn_rnn wrapper (cudnn/AutocastRNN.cpp: input, states and weights to the lower dtype) is applied by
#: the tracer's cuDNN RNN emulation (memprof.engine.trace._install_cudnn_rnns), which replaces the call.
_CUDA_ONLY = frozenset({"_cudnn_rnn"})
#: the message CUDA's autocast raises for binary_cross_entropy (autocast_mode.cpp)
BCE_BANNED = (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
    "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
    "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
    "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
    "safe to autocast."
)


# --------------------------------------------------------------------------- the rules
@dataclass
class CudaRules:
    """Install CUDA's kernel choices while tracing (a context manager); collects what it decided."""

    target: CudaTarget
    lower_dtype: Any = None  # torch.dtype autocast casts to (fp16/bf16); None: the CPU autocast dtype
    #: scaled_dot_product_attention calls per backend, and why the first call of each chose it
    attention: Counter = field(default_factory=Counter)
    attention_reasons: dict[str, str] = field(default_factory=dict)
    #: ops the step called under autocast that CUDA autocasts with a policy memprof does not know (run uncast)
    autocast_unknown: set[str] = field(default_factory=set)
    dropouts: int = 0  # dropout calls given CUDA's fused kernel
    _lib: Any = None
    _cast_cache: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    _saved_clear: Any = None

    # -- install / remove ----------------------------------------------------------------
    def __enter__(self) -> CudaRules:
        import torch

        self._lib = torch.library.Library("aten", "IMPL")
        try:
            with warnings.catch_warnings():  # some releases warn that a kernel is overridden: that is the point
                warnings.simplefilter("ignore")
                self._lib.impl("dropout", self._dropout, "AutogradCPU")
                self._lib.impl("softmax.int", self._softmax, "AutogradCPU")
                self._lib.impl("log_softmax.int", self._log_softmax, "AutogradCPU")
                self._lib.impl("scaled_dot_product_attention", self._sdpa, "AutogradCPU")
                self._install_autocast(torch)
        except BaseException:
            self._lib._destroy()
            self._lib = None
            raise
        self._saved_clear = torch.clear_autocast_cache
        cache = self._cast_cache

        def clear_autocast_cache() -> None:  # the outermost autocast region ends: so do its cached casts
            cache.clear()
            self._saved_clear()

        torch.clear_autocast_cache = clear_autocast_cache
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self._saved_clear is not None:
            torch.clear_autocast_cache = self._saved_clear
            self._saved_clear = None
        self._cast_cache.clear()
        if self._lib is not None:
            self._lib._destroy()
            self._lib = None

    # -- dropout, softmax ------------------------------------------------------------------
    def _dropout(self, input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        import torch

        if train and 0 < p < 1 and input.numel() > 0:  # Dropout.cpp: is_fused_kernel_acceptable
            self.dropouts += 1
            return torch.ops.aten.native_dropout.default(input, p, train)[0]
        return torch.ops.aten.dropout.default.decompose(input, p, train)

    def _softmax(self, input: torch.Tensor, dim: int, dtype: Any = None) -> torch.Tensor:
        import torch

        if input.dtype == torch.float16 and dtype == torch.float32:  # SoftMax.cpp: half_to_float on CUDA
            return torch.ops.aten._softmax.default(input, dim, True)
        return torch.ops.aten.softmax.int.decompose(input, dim, dtype)

    def _log_softmax(self, input: torch.Tensor, dim: int, dtype: Any = None) -> torch.Tensor:
        import torch

        if input.dtype == torch.float16 and dtype == torch.float32:
            return torch.ops.aten._log_softmax.default(input, dim, True)
        return torch.ops.aten.log_softmax.int.decompose(input, dim, dtype)

    # -- autocast ----------------------------------------------------------------------------
    def _install_autocast(self, torch: Any) -> None:
        get = torch._C._dispatch_get_registrations_for_dispatch_key
        cuda_ops = set(get("AutocastCUDA"))
        cpu_ops = set(get("AutocastCPU"))
        for name in sorted(cpu_ops - cuda_ops):  # the CPU's own list: not autocast on CUDA
            self._lib.impl(name.split("::", 1)[1], torch.library.fallthrough_kernel, "AutocastCPU")
        for name in sorted(cuda_ops):
            short = name.split("::", 1)[1]
            base, _, overload = short.partition(".")
            if base in _CUDA_ONLY:
                continue
            policy = AUTOCAST_POLICY.get(base)
            packet = getattr(torch.ops.aten, base, None)
            op = getattr(packet, overload or "default", None) if packet is not None else None
            if op is None:  # not callable from Python: CUDA's rule cannot be applied, the CPU's must not
                if name in cpu_ops:
                    self._lib.impl(short, torch.library.fallthrough_kernel, "AutocastCPU")
                continue
            if policy is None:  # run it as is, and say so if the step calls it
                self._lib.impl(short, self._unknown_kernel(torch, op, short), "AutocastCPU")
                continue
            self._lib.impl(short, self._autocast_kernel(torch, op, policy, overload), "AutocastCPU")

    def _unknown_kernel(self, torch: Any, op: Any, name: str):
        exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
        guard = torch._C._ExcludeDispatchKeyGuard
        unknown = self.autocast_unknown

        def kernel(*args: Any, **kwargs: Any) -> Any:
            unknown.add(name)
            with guard(exclude):
                return op(*args, **kwargs)

        return kernel

    def _autocast_kernel(self, torch: Any, op: Any, policy: str, overload: str):
        exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
        guard = torch._C._ExcludeDispatchKeyGuard
        schema = op._schema
        names = [a.name for a in schema.arguments]
        target_op = None
        if policy == APPEND_DTYPE:
            target_name = _APPEND_DTYPE_TARGET.get(overload)
            target_op = getattr(torch.ops.aten.norm, target_name, None) if target_name else None
        rules = self

        def call(the_op: Any, values: dict[str, Any]) -> Any:
            arg_names = [a.name for a in the_op._schema.arguments]
            kw_only = {a.name for a in the_op._schema.arguments if a.kwarg_only}
            args = [values[n] for n in arg_names if n in values and n not in kw_only]
            kwargs = {n: values[n] for n in arg_names if n in values and n in kw_only}
            return the_op(*args, **kwargs)

        def kernel(*args: Any, **kwargs: Any) -> Any:
            values = dict(zip(names, args, strict=False))
            values.update(kwargs)
            with guard(exclude):
                if policy == BANNED:
                    raise RuntimeError(BCE_BANNED)
                # casts in reverse argument order: the order the C++ wrappers' argument packs run in
                # with GCC (right to left), which decides when each cast copy is allocated
                if policy == LOWER:
                    values = rules._cast_all(values, rules._lower(torch), torch)
                elif policy == FP32:
                    values = rules._cast_all(values, torch.float32, torch)
                elif policy == PROMOTE:
                    values = rules._cast_all(values, rules._promote_type(values.values(), torch), torch)
                elif policy == SET_OPT_DTYPE:
                    if _first_tensor_eligible(values, names, torch) and values.get("dtype") is None:
                        values["dtype"] = torch.float32
                elif policy == APPEND_DTYPE and target_op is not None:
                    first = _first_tensor(values, names, torch)
                    eligible = _first_tensor_eligible(values, names, torch)
                    values["dtype"] = torch.float32 if eligible or first is None else first.dtype
                    return call(target_op, values)
                return call(op, values)

        return kernel

    def _lower(self, torch: Any) -> Any:
        if self.lower_dtype is not None:
            return self.lower_dtype
        getter = getattr(torch, "get_autocast_dtype", None)
        return getter("cpu") if getter is not None else torch.get_autocast_cpu_dtype()

    def _cast_all(self, values: dict[str, Any], dtype: Any, torch: Any) -> dict[str, Any]:
        cast = {name: self._cast(values[name], dtype, torch) for name in reversed(list(values))}
        return {name: cast[name] for name in values}

    def _cast(self, value: Any, dtype: Any, torch: Any) -> Any:
        """autocast_mode.cpp ``cached_cast``: eligible floating tensors (not float64) to ``dtype``;
        fp32 leaf tensors that require grad are cast once per autocast region (the weight cache)."""
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype, torch) for v in value)
        if not isinstance(value, torch.Tensor) or not _eligible(value, torch) or value.dtype == dtype:
            return value
        cache = (
            dtype == self._lower(torch)
            and value.dtype == torch.float32
            and value.requires_grad
            and value.is_leaf
            and not value._is_view()
            and torch.is_autocast_cache_enabled()
        )
        if not cache:
            return value.to(dtype)
        hit = self._cast_cache.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        cast = value.to(dtype)
        self._cast_cache[id(value)] = (value, cast)
        return cast

    def _promote_type(self, values: Any, torch: Any) -> Any:
        """autocast_mode.h ``promote_type``: float32 if any eligible argument is float32, else the lower dtype."""
        to = self._lower(torch)
        for value in values:
            items = value if isinstance(value, (list, tuple)) else (value,)
            for v in items:
                if isinstance(v, torch.Tensor) and _eligible(v, torch) and v.dtype == torch.float32:
                    to = torch.float32
        return to

    # -- scaled_dot_product_attention ------------------------------------------------------------
    def _sdpa(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        import torch

        aten = torch.ops.aten
        backend, reason = select_sdp_backend(
            query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, self.target
        )
        self.attention[backend] += 1
        self.attention_reasons.setdefault(backend, reason)
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        if backend == "cudnn":
            mask = _convert_boolean_mask(attn_mask, query.dtype, torch)
            return aten._scaled_dot_product_cudnn_attention.default(
                query, key, value, mask, grad, dropout_p, is_causal, False, scale=scale
            )[0]
        if backend == "flash":
            head_dim = query.size(-1)
            q, k, v = (_pad_last_dim(t, 8, torch) for t in (query, key, value))
            og_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
            out = aten._scaled_dot_product_flash_attention.default(
                q, k, v, dropout_p, is_causal, False, scale=og_scale
            )[0]
            return out[..., :head_dim] if out.size(-1) != head_dim else out
        if backend == "efficient":
            mask = _convert_boolean_mask(attn_mask, query.dtype, torch)
            if mask is not None:
                mask = _preprocess_mask(mask, query, key, torch)
            return aten._scaled_dot_product_efficient_attention.default(
                query, key, value, mask, grad, dropout_p, is_causal, scale=scale
            )[0]
        mask = _convert_boolean_mask(attn_mask, query.dtype, torch)
        kwargs: dict[str, Any] = {"scale": scale}
        if enable_gqa:
            kwargs["enable_gqa"] = True
        return aten._scaled_dot_product_attention_math.default(query, key, value, mask, dropout_p, is_causal, **kwargs)[
            0
        ]

    # -- summary --------------------------------------------------------------------------------
    def notes(self) -> list[str]:
        out = []
        if self.dropouts:
            out.append(
                f"dropout: CUDA's fused kernel (native_dropout) for {self.dropouts} call(s), keeping a 1-byte mask "
                "per element where the CPU keeps float noise (Dropout.cpp)"
            )
        for backend, count in sorted(self.attention.items()):
            out.append(
                f"scaled_dot_product_attention: {count} call(s) traced with the {BACKEND_NAMES[backend]} kernel "
                f"CUDA would pick on {self.target.arch} ({self.attention_reasons[backend]}; sdp_utils.cpp, unverified "
                "until a GPU run)"
            )
        if self.autocast_unknown:
            out.append(
                "autocast: CUDA autocasts " + ", ".join(sorted(self.autocast_unknown)) + " with a policy memprof does "
                "not know; traced without a cast"
            )
        return out


BACKEND_NAMES = {
    "flash": "flash-attention",
    "efficient": "memory-efficient",
    "cudnn": "cuDNN attention",
    "math": "math (unfused)",
}


def _eligible(t: torch.Tensor, torch: Any) -> bool:
    """autocast_mode.h ``is_eligible`` (the fake CPU tensors stand for CUDA tensors)."""
    return t.is_floating_point() and t.dtype != torch.float64


def _first_tensor(values: dict[str, Any], names: list[str], torch: Any) -> Any:
    for name in names:
        v = values.get(name)
        if isinstance(v, torch.Tensor):
            return v
    return None


def _first_tensor_eligible(values: dict[str, Any], names: list[str], torch: Any) -> bool:
    first = _first_tensor(values, names, torch)
    return first is not None and _eligible(first, torch)


def _convert_boolean_mask(mask: Any, dtype: Any, torch: Any) -> Any:
    """attention.cpp ``convert_boolean_attn_mask``: a bool mask becomes an additive one of the query's dtype."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, 0.0, torch.scalar_tensor(-math.inf, dtype=dtype))


def _aligned(t: torch.Tensor, alignment: int) -> bool:
    return all(t.stride(i) % alignment == 0 for i in range(t.dim() - 1)) and t.stride(-1) == 1


def _preprocess_mask(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor, torch: Any) -> torch.Tensor:
    """attention.cpp ``preprocess_mask``: pad the bias's last dim for memory-efficient attention
    (``pad_bias<8>``: pad then slice back) unless its strides are aligned, then expand to 4-D."""
    if not _aligned(mask, 8):
        last = mask.size(-1)
        mask = torch.nn.functional.pad(mask, (0, 8 - last % 8))[..., :last]
    return mask.expand(query.size(0), query.size(1), query.size(2), key.size(2))


def _pad_last_dim(t: torch.Tensor, alignment: int, torch: Any) -> torch.Tensor:
    """attention.cpp ``pad_last_dim<8, false>``: flash needs head dims that are multiples of 8."""
    last = t.size(-1)
    if last % alignment == 0:
        return t
    return torch.nn.functional.pad(t, (0, alignment - last % alignment))


# --------------------------------------------------------------------------- SDPA backend selection
def select_sdp_backend(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any,
    dropout_p: float,
    is_causal: bool,
    enable_gqa: bool,
    target: CudaTarget,
) -> tuple[str, str]:
    """The backend CUDA's ``select_sdp_backend`` (sdp_utils.cpp) picks for these inputs on ``target``,
    and a short reason. Honours the process's ``torch.backends.cuda.*_sdp_enabled()`` switches."""
    import torch

    cuda = torch.backends.cuda
    enabled = {
        "flash": cuda.flash_sdp_enabled(),
        "efficient": cuda.mem_efficient_sdp_enabled(),
        "math": cuda.math_sdp_enabled(),
        "cudnn": getattr(cuda, "cudnn_sdp_enabled", lambda: False)(),
    }
    major, minor = target.capability or (0, 0)
    version = torch_version()
    order = (
        ["cudnn", "flash", "efficient", "math"]
        if _prefer_cudnn(target, version)
        else [
            "flash",
            "efficient",
            "math",
            "cudnn",
        ]
    )
    why: list[str] = []
    for backend in order:
        if not enabled[backend]:
            why.append(f"{backend} disabled")
            continue
        if backend == "math":
            return "math", "; ".join(why) or "math first"
        problem = _sdp_problem(backend, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, major, minor)
        if problem is None:
            dtype = str(query.dtype).replace("torch.", "")
            mask = "mask" if attn_mask is not None else ("causal" if is_causal else "no mask")
            return backend, f"{dtype}, {mask}, head_dim {query.size(-1)}" + (f"; {'; '.join(why)}" if why else "")
        why.append(f"not {backend}: {problem}")
    return "math", "; ".join(why)


def _prefer_cudnn(target: CudaTarget, version: tuple[int, int]) -> bool:
    """sdp_utils.cpp ``check_prefer_cudnn_attention`` as it stood in each release (unverified per release)."""
    major, minor = target.capability or (0, 0)
    if version >= (2, 10):
        if os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED", "").strip() in ("1", "true", "TRUE", "True"):
            return False
        cudnn = _cudnn_version()
        cuda_major = _cuda_major()
        minor_ok = minor in (0, 3) or (cuda_major is not None and cuda_major >= 13)
        return cudnn is not None and cudnn > 91500 and major in (9, 10) and minor_ok
    if version >= (2, 8):
        if os.environ.get("TORCH_CUDNN_SDPA_PREFERRED", "").strip() in ("0", "false", "FALSE", "False"):
            return False
        cudnn = _cudnn_version()
        return cudnn is not None and cudnn >= 90900 and major in (9, 10) and minor == 0
    return False


def _cuda_major() -> int | None:
    """The CUDA major version the running PyTorch was built for (None: CPU-only build)."""
    import torch

    version = getattr(torch.version, "cuda", None)
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


def _cudnn_version() -> int | None:
    try:
        import torch

        return torch.backends.cudnn.version()
    except Exception:  # no cuDNN in this build
        return None


def _sdp_problem(
    backend: str,
    q: Any,
    k: Any,
    v: Any,
    mask: Any,
    dropout_p: float,
    is_causal: bool,
    enable_gqa: bool,
    major: int,
    minor: int,
) -> str | None:
    """Why ``backend`` cannot run these inputs (the first failing filter of sdp_utils.cpp), or None."""
    import torch

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "inputs are not 4-D"
    if q.size(2) == 0 or k.size(2) == 0:
        return "empty sequence"
    half = q.dtype in (torch.float16, torch.bfloat16)
    if backend in ("flash", "cudnn"):
        if major < 8 or (major, minor) > (12, 1) or (backend == "flash" and torch_version() < (2, 7) and major > 9):
            return f"needs sm80-sm121 (target {major}.{minor})"
        if not half or (q.dtype == torch.bfloat16 and major < 8):
            return f"needs fp16/bf16 (got {str(q.dtype).replace('torch.', '')})"
    if backend == "efficient":
        if major < 5 or (major, minor) > (12, 1) or (torch_version() < (2, 7) and major > 9):
            return f"needs sm50-sm121 (target {major}.{minor})"
        allowed = (torch.float16, torch.float32, torch.bfloat16) if major >= 8 else (torch.float16, torch.float32)
        if q.dtype not in allowed:
            return f"dtype {str(q.dtype).replace('torch.', '')} not supported on sm{major}{minor}"
    if not (q.dtype == k.dtype == v.dtype):
        return "q, k, v dtypes differ"
    ignore_singleton = backend != "efficient"
    for t in (q, k, v):
        if t.stride(-1) != 1 and not (ignore_singleton and t.size(-1) == 1):
            return "last dimension not contiguous"
    if q.size(0) != k.size(0) or q.size(0) != v.size(0):
        return "batch sizes differ"
    heads_q, heads_k, heads_v = q.size(1), k.size(1), v.size(1)
    if not (heads_q == heads_k == heads_v):
        gqa_ok = backend in ("flash", "cudnn") and enable_gqa and heads_k == heads_v and heads_q % heads_k == 0
        if not gqa_ok:
            return "numbers of heads differ" + ("" if enable_gqa else " (enable_gqa=False)")
    d_qk, d_v = q.size(-1), v.size(-1)
    if backend == "flash":
        if mask is not None:
            return "an explicit attn_mask"
        if not (d_qk == k.size(-1) == d_v) or d_qk > 256:
            return f"head_dim {d_qk} (needs q, k, v equal and <= 256)"
        requires_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if requires_grad and ((8, 6) <= (major, minor) <= (8, 9) or (12, 0) <= (major, minor) <= (12, 1)):
            if not (d_qk <= 192 or (dropout_p == 0 and d_qk > 224)):
                return f"training with head_dim {d_qk} on sm{major}{minor}"
        if is_causal and q.size(2) != k.size(2):
            return "is_causal with seqlen_q != seqlen_k"
        return None
    if backend == "efficient":
        use_tc = major >= 8 or (major >= 7 and half)
        align = 4 if major >= 8 else 1
        if use_tc:
            align = max(align, 128 // (16 if half else 32))
        if d_qk != k.size(-1) or d_qk % align or d_v % align or d_qk == 0 or d_v == 0:
            return f"head_dim {d_qk} / {d_v} not a multiple of {align}"
        if major >= 8:
            for t in (q, k, v):
                if (t.storage_offset() * t.element_size()) % (align * t.element_size()):
                    return "unaligned storage offset"
        return None
    # cudnn
    cudnn_op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    if cudnn_op is None or "attn_bias" not in [a.name for a in cudnn_op.default._schema.arguments]:
        return "this PyTorch's cuDNN attention op takes no mask (before torch 2.5)"
    if dropout_p * 16.0 != math.floor(dropout_p * 16.0):
        return "dropout not a multiple of 1/16"
    if q.size(0) > 65535 or q.size(1) > 65535:
        return "batch or heads above 65535"
    cudnn = _cudnn_version() or 0
    if cudnn < 90000:
        return "cuDNN older than 9.0"
    limit = 256 if ((major == 9 and minor == 0) or major == 10) and cudnn > 92200 else 128
    if d_qk > limit or d_v > limit or d_qk % 8 or d_v % 8:
        return f"head_dim {d_qk} (needs a multiple of 8, at most {limit})"
    if k.size(2) == 1 or (dropout_p and q.size(2) == 1):
        return "sequence length 1"
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        return "deterministic algorithms requested"
    return None


@contextlib.contextmanager
def cuda_rules(target: CudaTarget, lower_dtype: Any = None):
    """``with cuda_rules(target) as rules:`` - :class:`CudaRules` as a plain context manager."""
    rules = CudaRules(target, lower_dtype)
    with rules:
        yield rules
