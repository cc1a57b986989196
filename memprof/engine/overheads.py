"""What a step allocates that no dispatch mode sees: workspaces, kernel scratch, the CUDA context.

The tracer adds these to what it records (``memprof.engine.trace``); each is a rule read from
PyTorch's (or oneDNN's, cuDNN's, FlashAttention's) source or a measurement, named by a
:class:`Kind` that becomes a :class:`memprof.results.ModelledBytes` entry of the prediction.
Every CUDA rule here is unverified until a GPU run confirms it (``scripts/validate_gpu.py``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..results import CudaTarget

KiB = 1024
MiB = 1024 * 1024


@dataclass(frozen=True)
class Kind:
    """A kind of modelled allocation: what it is, where the rule comes from, whether a real run confirmed it."""

    what: str
    source: str
    verified: bool = False


CUBLAS = Kind(
    "cuBLAS workspace",
    "aten/src/ATen/cuda/CublasHandlePool.cpp parseChosenWorkspaceSize: one per (handle, stream), i.e. per thread "
    "running matmuls (forward and optimizer on the main thread, backward on autograd's device thread)",
)
CUBLASLT = Kind(
    "cuBLASLt workspace",
    "CublasHandlePool.cpp / CUDABlas.cpp getCUDABlasLtWorkspaceSize: separate from the cuBLAS workspace unless "
    "TORCH_CUBLASLT_UNIFIED_WORKSPACE makes cuBLASLt reuse it (the documented default from torch 2.13; torch 2.11 "
    "measured on an H200 allocates a separate 1 MiB: benchmarks/validate_gpu_nvidia_h200.md)",
)
ONEDNN = Kind(
    "oneDNN convolution scratch",
    "measured per op with torch.profiler on the CPU (memprof.engine.overheads.onednn_conv_scratch; "
    "benchmarks/validate_cpu.md)",
    verified=True,
)
FLASH_BWD = Kind(
    "flash-attention backward scratch",
    "aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp mha_bwd: fp32 dq_accum "
    "(B x round128(S_q) x H x round32/64(D)) and softmax_d (B x H x round128(S_q)), plus dk/dv expanded to all heads "
    "under GQA and contiguous copies of grad_out/out when they are not",
)
EFFICIENT_BWD = Kind(
    "memory-efficient attention backward scratch",
    "aten/src/ATen/native/transformers/cuda/attention_backward.cu _efficient_attention_backward: fp32 delta "
    "(B x H x S_q); its CUTLASS workspace (kernel_backward.h workspace_size) is not modelled",
)
EMBEDDING_BWD = Kind(
    "embedding backward sort scratch",
    "aten/src/ATen/native/cuda/Embedding.cu embedding_dense_backward_cuda: sorted indices and their original "
    "positions (2 x int64 per index) plus cub's radix-sort scratch (about as much again); "
    "EmbeddingBackwardKernel.cu adds per-segment offsets",
)
CUDNN_CONV = Kind(
    "cuDNN convolution workspace",
    "aten/src/ATen/native/cudnn/Conv_v8.cpp: the workspace of the algorithm cuDNN picks goes through the caching "
    "allocator; with cudnn.benchmark the first call of each shape is offered up to the largest free block "
    "(get_available_workspace)",
)

CUDNN_BENCHMARK = Kind(
    "cuDNN benchmark workspace (first step)",
    "aten/src/ATen/native/cudnn/Conv_v8.cpp: with torch.backends.cudnn.benchmark the first call of each convolution "
    "shape times cuDNN's algorithms with a workspace as large as the largest candidate needs, up to the largest "
    "free cached block or the free device memory (get_available_workspace, CUDACachingAllocator cacheInfo); the "
    "candidate size is estimated as an FFT convolution's complex fp32 transforms of input, filters and output",
)

#: the CUDA context + kernel images NVML sees for a PyTorch process (anchors: 200-700 MB, pytorch
#: #28113/#86509; 426 MiB on torch 2.10 + CUDA 13, RTX 6000 Ada). Lazy module loading (CUDA >= 11.7)
#: keeps it near the low end for plain training; MEMPROF_CUDA_CONTEXT_MIB overrides it.
CUDA_CONTEXT_DEFAULT_BYTES = 512 * MiB
#: cuBLAS workspace per handle (CublasHandlePool.cpp): ":4096:2:16:8" by default, 32 MiB on the
#: architectures listed in :func:`cublas_32mib_majors`
CUBLAS_WORKSPACE_DEFAULT_BYTES = 4096 * KiB * 2 + 16 * KiB * 8
CUBLAS_WORKSPACE_32MIB = 32 * MiB
CUBLASLT_WORKSPACE_DEFAULT_BYTES = 1024 * KiB
_CUBLAS_CONFIG = re.compile(r":([0-9]+):([0-9]+)")


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running PyTorch."""
    import torch

    parts = torch.__version__.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def cublas_32mib_majors(version: tuple[int, int]) -> frozenset[int]:
    """Compute-capability majors whose default cuBLAS workspace is 32 MiB, per PyTorch release:
    Hopper (9) since torch 2.0 (pytorch#89027), Blackwell 10 and 12 from 2.12 (pytorch#175344),
    Thor 11 from 2.14 (pytorch#189312). Which release each change landed in is read from the
    pull requests' dates; unverified until a GPU run."""
    majors = {9}
    if version >= (2, 12):
        majors |= {10, 12}
    if version >= (2, 14):
        majors.add(11)
    return frozenset(majors)


def parse_cublas_workspace_config(config: str) -> int | None:
    """Bytes ``CUBLAS_WORKSPACE_CONFIG`` asks for, as PyTorch parses it: every ``:SIZE_KIB:COUNT``
    (std::regex ``:([0-9]+):([0-9]+)``) adds SIZE x 1024 x COUNT; None when nothing matches
    (``4096:8`` without the leading colon), where PyTorch warns and keeps its default."""
    matches = _CUBLAS_CONFIG.findall(config)
    if not matches:
        return None
    return sum(int(size) * KiB * int(count) for size, count in matches)


def cublas_workspace(target: CudaTarget, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Bytes of one cuBLAS workspace on ``target``, and how that was decided."""
    env = dict(os.environ) if env is None else env
    version = torch_version()
    if target.source.startswith("local GPU"):
        local = _local_cublas_workspace()
        if local is not None:
            return local, "torch.backends.cuda.cublas_workspace_size() on the local GPU"
    if target.is_rocm:
        rocm_default = 128 * MiB if target.arch in ("gfx942", "gfx950") else 32 * MiB
        default, why = rocm_default, f"hipBLAS default for {target.arch} (CublasHandlePool.cpp, ROCm branch)"
    else:
        major = (target.capability or (0, 0))[0]
        if major in cublas_32mib_majors(version):
            default, why = CUBLAS_WORKSPACE_32MIB, f"32 MiB default for sm{major}x in torch {version[0]}.{version[1]}"
        else:
            default = CUBLAS_WORKSPACE_DEFAULT_BYTES
            why = f"default :4096:2:16:8 (8 MiB + 128 KiB) for {target.arch} in torch {version[0]}.{version[1]}"
    config = env.get("CUBLAS_WORKSPACE_CONFIG")
    if config is None:
        return default, why
    parsed = parse_cublas_workspace_config(config)
    if parsed is None:
        return default, (
            f"CUBLAS_WORKSPACE_CONFIG={config!r} does not parse (PyTorch needs ':SIZE:COUNT' with the leading "
            f"colon, warns and keeps its default): {why}"
        )
    return parsed, f"CUBLAS_WORKSPACE_CONFIG={config}"


def cublaslt_workspace(target: CudaTarget, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Bytes of a *separate* cuBLASLt workspace per thread (0 when cuBLASLt reuses cuBLAS's), and why."""
    env = dict(os.environ) if env is None else env
    version = torch_version()
    unified_env = env.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE")
    # torch 2.11 on an H200 allocated a separate 1 MiB at the first addmm (scripts/diagnose_gpu.py); torch 2.13's
    # torch.backends.cuda docs name unified workspaces the default. 2.12 is unmeasured: counted as separate.
    unified = version >= (2, 13) and (unified_env is None or unified_env.strip() not in ("0", "false", "False"))
    if unified:
        return 0, "cuBLASLt shares the cuBLAS workspace (TORCH_CUBLASLT_UNIFIED_WORKSPACE, default on)"
    value = env.get("CUBLASLT_WORKSPACE_SIZE") or env.get("HIPBLASLT_WORKSPACE_SIZE")
    default = 76 * 1024 * KiB if target.is_rocm else CUBLASLT_WORKSPACE_DEFAULT_BYTES
    if value:
        try:
            return int(value) * KiB, f"CUBLASLT_WORKSPACE_SIZE={value} KiB"
        except ValueError:
            return default, f"CUBLASLT_WORKSPACE_SIZE={value!r} is not a number (PyTorch warns, keeps its default)"
    return default, f"default cuBLASLt workspace in torch {version[0]}.{version[1]}"


def _local_cublas_workspace() -> int | None:
    try:
        import torch

        size_fn = getattr(torch.backends.cuda, "cublas_workspace_size", None)
        if size_fn is None or not torch.cuda.is_available():
            return None
        return int(size_fn())
    except Exception:  # no driver: fall back to the rules
        return None


def cuda_context(target: CudaTarget | None = None) -> tuple[int, str]:
    """Bytes of CUDA context NVML charges a PyTorch process, and where the number comes from:
    MEMPROF_CUDA_CONTEXT_MIB, a measurement on the local GPU when it is the target, the catalog
    entry's measured context, else the 512 MiB default."""
    value = os.environ.get("MEMPROF_CUDA_CONTEXT_MIB")
    if value:
        try:
            return int(float(value) * MiB), f"MEMPROF_CUDA_CONTEXT_MIB={value}"
        except ValueError:
            pass
    if target is not None and target.source.startswith("local GPU"):
        measured = measure_local_context()
        if measured is not None:
            return measured, "measured on the local GPU: NVML process usage - torch reserved after a warm-up"
    if target is not None and target.gpu is not None and target.gpu.context_bytes is not None:
        return target.gpu.context_bytes, target.gpu.context_source or f"catalog entry {target.gpu.key}"
    return CUDA_CONTEXT_DEFAULT_BYTES, "default 512 MiB (public measurements: 287-667 MB; unverified for this GPU)"


_MEASURED: dict[str, int | None] = {}


def measure_local_context(timeout_s: float = 120.0) -> int | None:
    """NVML's usage of a fresh process minus torch's reserved bytes, after a warm-up that loads
    the kernels a training step uses (matmul, convolution, softmax, a reduction, an optimizer
    update). Runs in a child process so this one stays free of CUDA; cached per process."""
    if "ctx" in _MEASURED:
        return _MEASURED["ctx"]
    import json
    import subprocess
    import sys

    code = (
        "import json, torch\n"
        "from memprof.engine import nvml\n"
        "d = torch.device('cuda', 0)\n"
        "x = torch.randn(256, 256, device=d, requires_grad=True)\n"
        "w = torch.nn.Conv2d(3, 8, 3).to(d)\n"
        "y = (x @ x).softmax(-1).sum() + w(torch.randn(2, 3, 16, 16, device=d)).sum()\n"
        "y.backward()\n"
        "torch.optim.Adam([x]).step()\n"
        "torch.cuda.synchronize()\n"
        "used = nvml.process_used_bytes(0)\n"
        "print(json.dumps({'used': used, 'reserved': torch.cuda.memory_reserved(d)}))\n"
    )
    result: int | None = None
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ)
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            data = json.loads(lines[-1])
            if data.get("used") is not None:
                result = max(0, int(data["used"]) - int(data["reserved"]))
    except (OSError, subprocess.SubprocessError, ValueError):
        result = None
    _MEASURED["ctx"] = result
    return result


# --------------------------------------------------------------------------- kernel scratch (CUDA)
def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def flash_backward_scratch(args) -> int:
    """Bytes ``_scaled_dot_product_flash_attention_backward`` allocates besides its gradients (:data:`FLASH_BWD`).

    Arguments as the op takes them: ``grad_out, query, key, value, out, ...`` in (B, H, S, D) layout.
    """
    grad_out, q, k, _v, out = args[0], args[1], args[2], args[3], args[4]
    batch, heads, seq_q, head_dim = q.shape
    seq_k, heads_k = k.shape[2], k.shape[1]
    head_pad = _round_up(head_dim, 8)
    head_rounded = _round_up(head_pad, 32 if head_pad <= 128 else 64)
    seq_q_rounded = _round_up(seq_q, 128)
    scratch = batch * heads * seq_q_rounded * 4  # softmax_d
    scratch += batch * seq_q_rounded * heads * head_rounded * 4  # dq_accum (not deterministic)
    esize = q.element_size()
    if heads_k != heads:  # dk_expanded, dv_expanded
        scratch += 2 * batch * seq_k * heads * head_pad * esize
    for t in (grad_out, out):  # the kernel wants (B, S, H, D) with a contiguous last dim and rows
        if not t.transpose(1, 2).is_contiguous():
            scratch += t.numel() * t.element_size()
    return scratch


def efficient_backward_scratch(args) -> int:
    """Bytes ``_scaled_dot_product_efficient_attention_backward`` allocates besides its gradients
    (:data:`EFFICIENT_BWD`)."""
    q = args[1]
    batch, heads, seq_q = q.shape[0], q.shape[1], q.shape[2]
    return batch * heads * seq_q * 4


def embedding_backward_scratch(args) -> int:
    """Bytes ``embedding_dense_backward`` on CUDA allocates besides grad_weight (:data:`EMBEDDING_BWD`).

    Up to 3072 indices (no ``scale_grad_by_freq``) a direct kernel runs without scratch. Above,
    Embedding.cu sorts: ``sorted_indices``, ``orig_indices`` and the ``arange`` it sorts (int64 each),
    cub's radix-sort scratch (taken as two more), then EmbeddingBackwardKernel.cu's per-segment
    offsets (two int64 arrays) and ``grad_weight_per_segment``: one row of partial sums per distinct
    index (at most min(indices, num_weights)), in fp32 for 16-bit gradients. An upper bound.
    """
    grad, indices, num_weights = args[0], args[1], args[2]
    scale_grad_by_freq = bool(args[4]) if len(args) > 4 else False
    n = indices.numel()
    if n <= 3072 and not scale_grad_by_freq:
        return 0
    dim = grad.shape[-1] if grad.dim() else 1
    accum = 4 if grad.element_size() < 4 else grad.element_size()
    return 7 * n * 8 + min(n, int(num_weights)) * dim * accum


def onednn_conv_scratch(func, args) -> int:
    """Bytes oneDNN (mkldnn) convolutions on the CPU hold inside the op, next to its outputs.

    PyTorch's CPU convolution reorders NCHW tensors to oneDNN's blocked layouts (channels
    padded to 16) inside the kernel (measured with torch.profiler, per op): forward holds a
    blocked output and, when the input channels are blockable (multiple of 8), a blocked input
    and weight, then the real output; a transposed convolution holds twice its output;
    backward holds a blocked grad_output and, for the weight gradient, a blocked input (in
    bf16/fp16 also an fp32 weight-gradient accumulator) while the gradients are produced.
    No dispatch mode sees these, so the CPU trace adds them as a temporary around the op.
    CUDA (cuDNN) works on the tensors as they are; its workspaces are not modelled.
    """
    import torch

    if func is torch.ops.aten.convolution.default:
        x, w = args[0], args[1]
        transposed = args[6]
        if x.dim() != 4 or not x.is_floating_point():
            return 0
        esize = x.element_size()
        if transposed:  # computed as a backward-data convolution into a blocked buffer
            n, h, wd = x.shape[0], x.shape[2], x.shape[3]
            c_out = w.shape[1] * args[8]
            stride, padding, dilation, out_pad = args[3], args[4], args[5], args[7]
            oh = (h - 1) * stride[0] - 2 * padding[0] + dilation[0] * (w.shape[2] - 1) + out_pad[0] + 1
            ow = (wd - 1) * stride[1] - 2 * padding[1] + dilation[1] * (w.shape[3] - 1) + out_pad[1] + 1
            return 2 * n * c_out * oh * ow * esize
        n, c, h, wd = x.shape
        c_out = w.shape[0]
        out = n * c_out * _conv_out(h, w.shape[2], args) * _conv_out(wd, w.shape[3], args, dim=1) * esize
        out_blocked = out * _pad16(c_out) // c_out
        in_blocked = x.numel() * esize * _pad16(c) // c + w.numel() * esize if c % 8 == 0 else 0
        return max(in_blocked + out_blocked, out_blocked + out) - out
    # convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,
    #                      transposed, output_padding, groups, output_mask)
    grad_out, x, w = args[0], args[1], args[2]
    mask = args[10]
    if x.dim() != 4 or not x.is_floating_point():
        return 0
    c_out = grad_out.shape[1]
    scratch = grad_out.numel() * grad_out.element_size() * _pad16(c_out) // c_out
    if mask[1]:
        if x.shape[1] % 8 == 0:
            scratch += x.numel() * x.element_size() * _pad16(x.shape[1]) // x.shape[1]
        if w.element_size() < 4:  # bf16/fp16: the weight gradient is accumulated in fp32
            scratch += w.numel() * 4
    return scratch


def _pad16(channels: int) -> int:
    """oneDNN's blocked layouts pad channels to a multiple of 16."""
    return -(-channels // 16) * 16


def _conv_out(size: int, k: int, args, dim: int = 0) -> int:
    stride, padding, dilation = args[3], args[4], args[5]
    return (size + 2 * padding[dim] - dilation[dim] * (k - 1) - 1) // stride[dim] + 1


def cudnn_benchmark_workspace(func, args) -> tuple[tuple, int]:
    """(shape key, bytes) of the workspace cuDNN's benchmark would be offered for this convolution
    (:data:`CUDNN_BENCHMARK`): the estimate for the largest candidate algorithm, an FFT convolution
    holding complex fp32 transforms of input (N x C), filters (K x C / groups) and output (N x K) over
    the padded image (H_p x (W_p / 2 + 1) bins). Backward times the data and the filter algorithms one
    after the other: the larger of the two. 0 for anything but a 2-D convolution."""
    import torch

    if func is torch.ops.aten.convolution.default:
        x, w = args[0], args[1]
        stride, padding, dilation, transposed, groups = args[3], args[4], args[5], args[6], args[8]
        kind = "forward"
    else:  # convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, ...)
        x, w = args[1], args[2]
        stride, padding, dilation, transposed, groups = args[4], args[5], args[6], args[7], args[9]
        kind = "backward"
    if x.dim() != 4 or w.dim() != 4:
        return (), 0
    key = (kind, tuple(x.shape), tuple(w.shape), tuple(stride), tuple(padding), tuple(dilation), transposed, groups)
    n, c, h, width = x.shape
    k = w.shape[1] * groups if transposed else w.shape[0]
    bins = (h + 2 * padding[0]) * ((width + 2 * padding[1]) // 2 + 1)
    return key, 8 * bins * (n * c + k * c // max(1, groups) + n * k)
