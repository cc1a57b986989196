"""What a step allocates that no dispatch mode sees: workspaces, kernel scratch, the CUDA context.

The tracer adds these to what it records (``memprof.engine.trace``); each is a rule read from
PyTorch's (or oneDNN's, cuDNN's, FlashAttention's) source or a measurement, named by a
:class:`Kind` that becomes a :class:`memprof.results.ModelledBytes` entry of the prediction.
Every CUDA rule here is unverified until a GPU run confirms it (``scripts/validate_gpu.py``).
"""

from __future__ import annotations

import math
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
    "oneDNN v3.12 AVX2 kernels (cpu_convolution_list.cpp, gemm_convolution_utils.cpp, jit_avx2_*conv*, "
    "cpu_reducer.cpp) and PyTorch's Convolution.cpp, mkldnn/Conv.cpp and slow_conv2d/3d/dilated kernels, "
    "2-D and 3-D, checked per op with torch.profiler "
    "(scripts/probe_onednn_conv.py, benchmarks/onednn_conv_scratch.md; benchmarks/validate_cpu.md)",
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

    PyTorch's CPU convolution reorders NCHW / NCDHW tensors to oneDNN's blocked layouts
    (channels padded to the CPU's block, :func:`_channel_block`) inside the kernel (measured
    with torch.profiler, per op): forward holds a blocked output and, when the input channels
    are blockable (multiple of 8), a blocked input and weight (with fewer than 8, the weight
    alone), then the real output; a transposed convolution holds twice its output; backward
    holds a blocked grad_output and, for the weight gradient, a blocked input (in bf16/fp16
    also an fp32 weight-gradient accumulator) while the gradients are produced. No dispatch
    mode sees these, so the CPU trace adds them as a temporary around the op. CUDA (cuDNN)
    works on the tensors as they are; its workspaces are not modelled.
    """
    import torch

    if func is torch.ops.aten.convolution.default:
        x, w = args[0], args[1]
        transposed = args[6]
        if x.dim() not in (4, 5) or not x.is_floating_point():
            return 0
        esize = x.element_size()
        if transposed:  # computed as a backward-data convolution into a blocked buffer
            if x.dim() != 4:
                return 0
            n, h, wd = x.shape[0], x.shape[2], x.shape[3]
            c_out = w.shape[1] * args[8]
            stride, padding, dilation, out_pad = args[3], args[4], args[5], args[7]
            oh = (h - 1) * stride[0] - 2 * padding[0] + dilation[0] * (w.shape[2] - 1) + out_pad[0] + 1
            ow = (wd - 1) * stride[1] - 2 * padding[1] + dilation[1] * (w.shape[3] - 1) + out_pad[1] + 1
            return 2 * n * c_out * oh * ow * esize
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
        mkldnn = _uses_mkldnn(x, w, stride, dilation, groups)
        if x.dim() == 5 and not mkldnn:  # slow_conv3d: not modelled
            return 0
        spatial = tuple(x.shape[2:])
        kernel = tuple(w.shape[2:])
        out_sizes = tuple(_conv_out(s, k, args, dim=i) for i, (s, k) in enumerate(zip(spatial, kernel, strict=True)))
        gemm = (  # a dilated shape the direct kernel refuses (DeepLab's ASPP) runs gemm_convolution_fwd_t
            mkldnn
            and groups == 1
            and any(d != 1 for d in dilation)
            and x.dtype == torch.float32
            and _cpu_isa() == "AVX2"
            and not _avx2_direct_fwd_ok(spatial, out_sizes, kernel, stride, padding, dilation)
        )
        n, c = x.shape[0], x.shape[1]
        c_out = w.shape[0]
        out = n * c_out * math.prod(out_sizes) * esize
        if gemm:  # a plain output, copied out (its cache-sized im2col block is not modelled: 35 KB for the ASPP)
            return out
        block = _channel_block()
        out_blocked = out * _pad(c_out, block) // c_out
        if c % 8 == 0:
            in_blocked = x.numel() * esize * _pad(c, block) // c + w.numel() * esize
        elif c < 8:  # a "flat" input (an RGB stem): the direct kernel reads it as is, the weight is reordered
            in_blocked = w.numel() * esize
        else:
            in_blocked = 0
        return max(in_blocked + out_blocked, out_blocked + out) - out
    # convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,
    #                      transposed, output_padding, groups, output_mask)
    grad_out, x, w = args[0], args[1], args[2]
    mask = args[10]
    if x.dim() not in (4, 5) or not x.is_floating_point():
        return 0
    exact = _onednn_backward_scratch(args)
    if exact is not None:
        return exact
    c_out = grad_out.shape[1]
    scratch = grad_out.numel() * grad_out.element_size() * _pad16(c_out) // c_out
    if mask[1]:
        if x.shape[1] % 8 == 0:
            scratch += x.numel() * x.element_size() * _pad16(x.shape[1]) // x.shape[1]
        if w.element_size() < 4:  # bf16/fp16: the weight gradient is accumulated in fp32
            scratch += w.numel() * 4
    return scratch


#: oneDNN's scratchpad registry adds its 128-byte alignment to every booked buffer
#: (``src/common/memory_tracking.hpp``, ``registry_t::book``: capacity = size + 128)
_DNNL_ALIGN = 128
#: gemm convolutions refuse a scratchpad above this (``gemm_convolution_utils.cpp``, 1 GiB)
_DNNL_SCRATCH_LIMIT = 1 << 30
#: page-aligned scratchpad buffers (reducer space, ``simple_barrier::ctx_t`` of ``cpu_barrier.hpp``)
_PAGE = 4096


def _onednn_backward_scratch(args) -> int | None:
    """``convolution_backward`` scratch, op by op as PyTorch and oneDNN run it; None where not modelled.

    Where this returns None (a CPU other than AVX2 under oneDNN, grouped or transposed
    convolutions, a channels_last input) the caller keeps the older per-op heuristic. Rules,
    from PyTorch (``aten/src/ATen/native/Convolution.cpp``, ``mkldnn/Conv.cpp``,
    ``ConvolutionMM2d.cpp``, ``ConvolutionMM3d.cpp``, ``DilatedConvolution.cpp``) and oneDNN
    v3.12 (the version torch 2.14 bundles), each checked against torch.profiler memory events
    of single ops (``scripts/probe_onednn_conv.py``, ``benchmarks/onednn_conv_scratch.md``), for
    2-D and 3-D (NCDHW) convolutions alike:

    * ``convolution_backward`` first makes grad_output contiguous in the input's layout: a
      grad_output that is not (ViT's patch embedding, whose output is flattened and transposed
      into tokens, gets its gradient back channels-last) is copied, and the copy is held
      through the op.
    * Backend. ``ConvParams::use_mkldnn`` takes oneDNN for float32 unless the kernel is 1×1 and
      unstrided at batch < 16 on one thread, or the input is a single image of at most 20,480
      elements (batch × channels × the first spatial size) with a kernel not larger than 3×3;
      bf16/fp16 only where the CPU has native support
      (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``). Otherwise PyTorch's own kernels run:
      ``slow_conv2d`` and ``slow_conv3d`` unfold the whole batch into columns
      (batch × ic·k × output elements; ``slow_conv2d`` for the weight gradient only, none for
      an unstrided, unpadded 1×1 kernel; ``slow_conv3d`` for the input gradient too), the
      dilated ``slow_conv_dilated2d/3d`` one image at a time (plus ``oc`` elements with a bias).
      In bf16/fp16 their bias gradient (``sum`` over batch and space) runs in fp32 when both are
      > 1 (``should_use_acc_buffer`` in ``ReduceOps.cpp``): a float copy of grad_output and of
      the result, before the weight gradient exists.
    * ``mkldnn_convolution_backward`` computes grad_input first (oneDNN writes its own buffer,
      then ``mkldnn_to_dense`` copies it out), then grad_weight (and grad_bias) the same way,
      so for a moment the op holds oneDNN's grad_weight AND its dense copy. oneDNN computes
      grad_weight whenever grad_bias alone is asked for, too.
    * oneDNN takes the first implementation that accepts the shape
      (``src/cpu/cpu_convolution_list.cpp``). On AVX2, for grad_input: a strided, undilated
      convolution runs ``brgemm_convolution_bwd_strided_t``, whose result passes through a
      second buffer of grad_input's size on its way out (measured, every shape); an unstrided
      one the direct kernel (``jit_avx2_conv_bwd_data_kernel_f32::init_conf``: dilated shapes
      only while the dilated kernel overlaps the image and its right edge fits one unrolled
      block); both on channel-blocked copies (8 channels) of grad_output, weight and
      grad_input. Otherwise (strided and dilated, or DeepLab's ASPP: dilation 12-36 on an 8×8
      map) ``gemm_convolution_bwd_data_t`` writes grad_input directly and books a column
      buffer of ic·k·oh·ow floats per thread (all threads when the batch is > 1 and outer
      threading wins).
    * For the weight gradient: the 1×1 kernel (2-D only;
      ``jit_avx2_1x1_conv_kernel_f32_t::init_conf``: unpadded 1×1, strides reduced to 1 by
      copying the input per thread), else the direct kernel
      (``jit_avx2_conv_bwd_weights_kernel_f32_t::init_conf``: ``kh <= ih``, ``kh <= t_pad + ih``,
      ``t_pad < kh``, ``kw < 14``, no dilation, paddings smaller than the kernel, and in 3-D no
      depth padding at all, so 3×3×3 kernels never run it while (2+1)-D 1×3×3 ones do); both
      work on channel-blocked copies (8 channels) of input and grad_output and split the batch
      (× output depth) between threads only when there are fewer weight blocks than threads
      (``cpu_reducer``: a partial weight gradient per extra thread). Otherwise
      ``gemm_convolution_bwd_weights_t`` runs on the plain tensors and books
      ``jcp.nthr * weights_d.size()`` *floats* of weight-reduction buffers
      (``gemm_convolution_utils.cpp``; ``weights_d.size()`` is in bytes, so 4 × the weight bytes
      per thread) plus an im2col buffer of ic·k·oh·ow floats per thread (one output depth slice
      at a time in 3-D), with ``jcp.nthr = torch.get_num_threads()`` when
      ``oh*ow / threads < 256`` and the batch is > 1, else 1. That is the 9 × weight bytes
      measured at 2 threads (5 × at 1) for a 3×3 kernel on a 2×2 map (ResNet's layer4 at
      64×64 inputs), for the dilated 3×3 convolutions of DeepLab's ASPP, for r3d_18's 3×3×3
      convolutions on small clips and for ViT's 16×16 patch embedding.
    * Every scratchpad buffer carries oneDNN's alignment (``memory_tracking.hpp``: +128 bytes;
      4 KiB for reducer space and its page-aligned barrier contexts, ``cpu_barrier.hpp``).

    Not modelled: the per-thread scratchpad of the strided grad_input kernel
    (``brgconv_strided``: 60 KiB to 1.3 MiB per op in the probe, growing with threads; a
    3-channel stem's, whose input never needs a gradient, is larger).
    """
    import torch

    grad_out, x, w = args[0], args[1], args[2]
    stride, padding, dilation, transposed, groups, mask = args[4], args[5], args[6], args[7], args[9], args[10]
    if transposed or groups != 1 or w.dim() not in (4, 5):
        return None
    if not x.is_contiguous():  # channels_last input: nspc paths, not modelled
        return None
    copy = 0 if grad_out.is_contiguous() else grad_out.numel() * grad_out.element_size()
    n, ic = x.shape[0], x.shape[1]
    oc = w.shape[0]
    in_sizes, out_sizes, kernel = tuple(x.shape[2:]), tuple(grad_out.shape[2:]), tuple(w.shape[2:])
    in_sp, out_sp, kvol = math.prod(in_sizes), math.prod(out_sizes), math.prod(kernel)
    dilated = any(d != 1 for d in dilation)
    strided = any(s != 1 for s in stride)
    esize = x.element_size()
    gi_bytes = x.numel() * esize if mask[0] else 0
    gw_bytes = w.numel() * esize if mask[1] else 0
    gb_bytes = oc * esize if mask[2] else 0
    stages = [0]
    if not _uses_mkldnn(x, w, stride, dilation, groups):  # PyTorch's own kernels
        unit = kvol == 1 and not strided and not any(padding)
        if dilated:  # slow_conv_dilated2d/3d: one image's columns at a time
            bias = oc * esize if mask[2] else 0
            return copy + ic * kvol * out_sp * esize + bias
        columns = n * ic * kvol * out_sp * esize
        if mask[0] and w.dim() == 5:  # slow_conv3d's fgrad_input
            stages.append(gi_bytes + columns)
        if mask[2] and esize < 4 and n > 1 and out_sp > 1:  # sum() over two uncoalescable 16-bit dims
            stages.append(gi_bytes + gb_bytes + grad_out.numel() * 4 + oc * 4)
        if mask[1]:
            stages.append(gi_bytes + gb_bytes + gw_bytes + (0 if unit else columns))
        return copy + max(0, max(stages) - gi_bytes - gw_bytes - gb_bytes)
    if x.dtype != torch.float32 or _cpu_isa() != "AVX2":
        return None
    esize = 4
    threads = max(1, torch.get_num_threads())
    w_bytes = w.numel() * esize
    if mask[0]:
        gy_b = n * _pad(oc, 8) * out_sp * esize
        w_b = _pad(oc, 8) * _pad(ic, 8) * kvol * esize
        gi_b = n * (ic if ic == 3 else _pad(ic, 8)) * in_sp * esize
        if strided and not dilated:
            # brgemm_convolution_bwd_strided_t, whose result is copied out through a second
            # buffer of grad_input's size (its own per-thread scratchpad is not modelled)
            stages += [gy_b + w_b + gi_b, gi_b + 2 * gi_bytes]
        elif not strided and _avx2_direct_bwd_data_ok(in_sizes, out_sizes, kernel, padding, dilation, ic):
            stages += [gy_b + w_b + gi_b, gi_b + gi_bytes]
        else:  # gemm on the plain tensors, straight into grad_input
            stages.append(gi_bytes + _gemm_bwd_data_scratchpad(threads, x, w, grad_out, stride))
    if mask[1] or mask[2]:
        gb_b = _pad(oc, 8) * esize if mask[2] else 0
        flat = ic == 3
        gy_b = n * _pad(oc, 8) * out_sp * esize
        gw_b = _pad(oc, 8) * (ic if flat else _pad(ic, 8)) * kvol * esize
        x_b = 0 if flat else n * _pad(ic, 8) * in_sp * esize
        if w.dim() == 4 and kvol == 1 and not any(padding):
            extra = _avx2_1x1_bwd_weights_bytes(threads, n, ic, oc, out_sizes[0], out_sizes[1], stride, mask[2])
            computed = x_b + gy_b + gw_b + gb_b + extra
        elif not dilated and _avx2_direct_bwd_weights_ok(in_sizes, out_sizes, kernel, stride, padding):
            depth = out_sizes[0] if len(out_sizes) == 3 else 1
            extra = _avx2_direct_reducer_bytes(threads, n, depth, ic, oc, kvol, flat, mask[2])
            computed = x_b + gy_b + gw_b + gb_b + extra
        else:  # gemm on the plain tensors (or, if it refuses, the reference kernel without scratch)
            gw_b = w_bytes
            computed = gw_b + gb_b + (_gemm_bwd_weights_scratchpad(threads, x, w, grad_out, stride) or 0)
        stages += [gi_bytes + computed, gi_bytes + gw_b + w_bytes + gb_b + gb_bytes]
    return copy + max(0, max(stages) - gi_bytes - gw_bytes - gb_bytes)


def _pad(channels: int, block: int) -> int:
    return -(-channels // block) * block


def _cpu_isa() -> str:
    """The CPU's vector ISA as PyTorch reports it ("AVX2", "AVX512", "DEFAULT", ...)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # pragma: no cover - torch < 2.1
        return "unknown"


def _uses_mkldnn(x, w, stride, dilation, groups) -> bool:
    """PyTorch's ``ConvParams::use_mkldnn`` for a CPU convolution (``Convolution.cpp``)."""
    import torch

    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    if x.dtype in (torch.bfloat16, torch.float16):  # oneDNN only where the CPU computes them natively
        check = "_is_mkldnn_bf16_supported" if x.dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
        try:
            return bool(getattr(torch.ops.mkldnn, check)())
        except (AttributeError, RuntimeError):  # pragma: no cover - older torch
            return False
    if x.dtype != torch.float32:
        return False
    n = x.shape[0]
    kh, kw = w.shape[-2], w.shape[-1]
    strided = any(s != 1 for s in stride) or any(d != 1 for d in dilation)
    first4 = math.prod(x.shape[:4])  # input.size(0) * size(1) * size(2) * size(3), for 2-D and 3-D alike
    return (strided or n >= 16 or kh != 1 or kw != 1 or torch.get_num_threads() > 1) and (
        groups > 1 or (kh > 3 and kw > 3) or n > 1 or first4 > 20480
    )


def _end_pad(start_pad: int, out: int, inp: int, stride: int, ext_k: int) -> int:
    """oneDNN's ``calculate_end_padding``."""
    return (out - 1) * stride + ext_k - (inp + start_pad)


def _avx2_direct_fwd_ok(in_sizes, out_sizes, kernel, stride, padding, dilation) -> bool:
    """``jit_avx2_conv_fwd_kernel_f32::init_conf`` (oneDNN v3.12, AVX2) accepts the shape (dimensions as
    PyTorch orders them: (d,) h, w; dilation as PyTorch counts it, 1 = none)."""
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    ends = [_end_pad(p, o, i, s, e) for p, o, i, s, e in zip(padding, out_sizes, in_sizes, stride, ext, strict=True)]
    if any(e <= p or e <= end for e, p, end in zip(ext, padding, ends, strict=True)):  # kernel outside the image
        return False
    ow, iw, kw, sw, l_pad, ext_kw = out_sizes[-1], in_sizes[-1], kernel[-1], stride[-1], padding[-1], ext[-1]
    ur_w = min(3, ow)
    if l_pad > ur_w:
        return False
    if kw > 7 and not ((padding[-2] == 0 and l_pad == 0) or (stride[-1] == 1 and stride[-2] == 1)):
        return False
    tail = ow % ur_w
    r_pad_no_tail = max(0, _end_pad(l_pad, ow - tail, iw, sw, ext_kw))
    if r_pad_no_tail > ur_w * sw and ow // ur_w > 1:
        ur_w = min(r_pad_no_tail // sw + tail, min(ow, 15 // 2))
        tail = ow % ur_w
        r_pad_no_tail = max(0, _end_pad(l_pad, ow - tail, iw, sw, ext_kw))
        if ur_w < max(l_pad, r_pad_no_tail):
            return False
    return True


def _avx2_direct_bwd_data_ok(in_sizes, out_sizes, kernel, padding, dilation, ic: int) -> bool:
    """``jit_avx2_conv_bwd_data_kernel_f32::init_conf`` (oneDNN v3.12) accepts the unstrided shape: the
    (dilated) kernel overlaps the image, and some width unroll (with 1 to 4 input-channel blocks in 15
    registers) covers the left overflow and the right one."""
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    ends = [_end_pad(p, o, i, 1, e) for p, o, i, e in zip(padding, out_sizes, in_sizes, ext, strict=True)]
    if any(e <= p or e <= end for e, p, end in zip(ext, padding, ends, strict=True)):  # kernel outside the image
        return False
    iw, l_pad, r_pad, ext_kw = in_sizes[-1], padding[-1], ends[-1], ext[-1]
    l_overflow = max(0, ext_kw - 1 - l_pad)
    nb_ic = _pad(ic, 8) // 8
    best, ur_w = 0, 1
    for blocking in (b for b in range(1, 5) if nb_ic % b == 0):
        u = 1
        while u * blocking + u <= 15 and u < iw + 1:
            cand = min(u, iw)
            if not (l_overflow > cand and cand != iw) and (
                cand * blocking > best or (cand * blocking == best and ur_w < cand)
            ):
                best, ur_w = cand * blocking, cand
            u += 1
    if best == 0:
        return False
    tail = iw % ur_w
    r_overflow_no_tail = max(0, ext_kw - 1 - r_pad - tail)
    return not (r_overflow_no_tail > ur_w or (iw > ur_w and r_pad + tail < 0))


def _avx2_direct_bwd_weights_ok(in_sizes, out_sizes, kernel, stride, padding) -> bool:
    """``jit_avx2_conv_bwd_weights_kernel_f32_t::init_conf`` (oneDNN v3.12) accepts the (undilated) shape."""
    ends = [
        max(0, _end_pad(p, o, i, s, k))
        for p, o, i, s, k in zip(padding, out_sizes, in_sizes, stride, kernel, strict=True)
    ]
    ih, (kh, kw), (t_pad, l_pad), (b_pad, r_pad) = in_sizes[-2], kernel[-2:], padding[-2:], ends[-2:]
    boundaries_ok = t_pad < kh and b_pad < kh and l_pad < kw and r_pad < kw
    if len(in_sizes) == 3:  # depth: no padding at all, and the kernel fits the clip
        boundaries_ok = boundaries_ok and padding[0] == 0 and ends[0] == 0 and kernel[0] <= in_sizes[0]
    return boundaries_ok and kw < 14 and kh <= t_pad + ih and kh <= ih and t_pad < kh


def _reducer_bytes(threads: int, job_size: int, njobs: int, reduction: int, max_buffer: int) -> int:
    """Scratchpad of a ``cpu_reducer_t`` (``cpu_reducer.cpp``, ``init_scratchpad``): a partial result per
    extra thread of a group that shares its jobs (page-aligned), and the groups' barrier contexts; none when
    ``reduce_balancer_t::balance`` gives every job one thread."""
    ngroups, nthr_per_group, njobs_ub = _reduce_balance(threads, job_size, njobs, reduction, max_buffer)
    if nthr_per_group == 1:
        return 0
    space = ngroups * (nthr_per_group - 1) * njobs_ub * job_size * 4 + _PAGE
    return space + ngroups * _PAGE + _PAGE  # + the groups' barrier contexts


def _avx2_direct_reducer_bytes(
    threads: int, n: int, depth: int, ic: int, oc: int, kvol: int, flat: bool, bias: bool
) -> int:
    """``cpu_reducer_t`` space of the AVX2 direct backward-weights kernel (``jit_avx2_convolution.hpp``,
    ``init_balancers``): the weight gradient reduced over minibatch × output depth, the bias gradient (when
    asked for) over the minibatch, in blocks of 8 output channels.

    ``reduce_balancer_t::balance`` (``cpu_reducer.cpp``) splits the reduction between threads
    only when there are fewer jobs (weight or bias blocks) than threads; each extra thread of
    a group then accumulates into its own copy of the group's blocks.
    """
    job_size = kvol * (ic if flat else 8) * 8
    njobs = (1 if flat else _pad(ic, 8) // 8) * (_pad(oc, 8) // 8)
    total = _reducer_bytes(threads, job_size, njobs, n * depth, 1 << 21)
    if bias:
        total += _reducer_bytes(threads, 8, _pad(oc, 8) // 8, n, 1 << 21)
    return total


def _avx2_1x1_bwd_weights_bytes(threads: int, n: int, ic: int, oc: int, oh: int, ow: int, stride, bias: bool) -> int:
    """Scratchpad of ``jit_avx2_1x1_convolution_bwd_weights_t``: strided-input copies and reducer space
    (of the weight gradient and, when asked for, the bias gradient).

    Blocking from ``jit_avx2_1x1_conv_kernel_f32_t::init_conf`` (backward weights, blocked
    layout): output-channel blocks halved (or thirded) down to at most 32, input-channel
    blocks down to at most 9; ``cpu_reducer_2d_t`` then books a partial weight gradient for
    every thread of a group that shares a job (``init_balancers`` in ``jit_avx2_1x1_convolution.hpp``).
    """
    nb_oc = _pad(oc, 8) // 8
    nb_ic = _pad(ic, 8) // 8
    nb_oc_blocking = _shrink_blocking(nb_oc, 32)
    nb_ic_blocking = _shrink_blocking(nb_ic, 9)
    total = 0
    if tuple(stride) != (1, 1):  # rtus: each thread copies the strided input to unit stride
        total += threads * nb_ic_blocking * oh * ow * 8 * 4 + _DNNL_ALIGN
    job_size = nb_oc_blocking * nb_ic_blocking * 64
    njobs = -(-nb_ic // nb_ic_blocking) * -(-nb_oc // nb_oc_blocking)
    max_buffer = threads * job_size * 8
    ngroups, nthr_per_group, njobs_ub = _reduce_balance(threads, job_size, njobs, n * oh * ow, max_buffer)
    if nthr_per_group > 1:
        total += ngroups * nthr_per_group * njobs_ub * job_size * 4 + _DNNL_ALIGN
        total += ngroups * _PAGE + _PAGE  # barrier contexts
    if bias:
        total += _reducer_bytes(threads, 8, nb_oc, n, max_buffer)
    return total


def _shrink_blocking(blocks: int, limit: int) -> int:
    while blocks > limit:
        if blocks % 2 == 0:
            blocks //= 2
        elif blocks % 3 == 0:
            blocks //= 3
        else:
            break
    return blocks


def _reduce_balance(nthr: int, job_size: int, njobs: int, reduction: int, max_buffer: int) -> tuple[int, int, int]:
    """oneDNN's ``reduce_balancer_t::balance`` (lock-free): (groups, threads per group, jobs per group)."""
    min_njobs = max(1, njobs // nthr)
    max_njobs = max(1, max_buffer // (nthr * job_size))
    ngroups = min(njobs // min_njobs, nthr)
    nthr_per_group = min(nthr // ngroups, reduction)
    njobs_ub = -(-njobs // ngroups)
    best = njobs * job_size * reduction
    for c_njobs in range(min_njobs, njobs):
        c_ngroups = min(njobs // c_njobs, nthr)
        c_nthr = min(nthr // c_ngroups, reduction)
        c_ub = -(-njobs // c_ngroups)
        if c_nthr > 1 and c_ub > max_njobs:
            continue
        cost = job_size * c_ub * (-(-reduction // c_nthr) + (c_nthr != 1))
        if cost < best:
            ngroups, nthr_per_group, njobs_ub, best = c_ngroups, c_nthr, c_ub, cost
    return ngroups, nthr_per_group, njobs_ub


def _gemm_limit(threads: int, x, w, grad_out) -> int:
    """The scratchpad a gemm convolution may book (``scratchpad_limit`` in ``gemm_convolution_utils.cpp``)."""
    tensors = (x.numel() + w.numel() + grad_out.numel()) * 4
    return min(_DNNL_SCRATCH_LIMIT, 15 * threads * tensors)


def _gemm_columns(x, w, grad_out, stride) -> tuple[int, int]:
    """(im2col elements of one thread, output plane oh·ow) of a gemm convolution (``jcp.im2col_sz``):
    one output depth slice at a time, none for a 1×1 kernel that maps the input one to one."""
    ic, ks = x.shape[1], math.prod(w.shape[2:])
    os_ = grad_out.shape[-2] * grad_out.shape[-1]
    same = tuple(grad_out.shape[2:]) == tuple(x.shape[2:]) and all(s == 1 for s in stride) and ks == 1
    return (0 if same else ic * ks * os_), os_


def _gemm_bwd_weights_scratchpad(threads, x, w, grad_out, stride) -> int | None:
    """Scratchpad bytes of oneDNN's ``gemm_convolution_bwd_weights_t`` (NC(D)HW, f32), or None if it refuses.

    ``jit_gemm_convolution_utils::init_conf`` (oneDNN v3.12, ``src/cpu/gemm_convolution_utils.cpp``).
    """
    esize, simd_w = 4, 8  # AVX2: 32-byte vectors
    n, ic = x.shape[0], x.shape[1]
    ks = math.prod(w.shape[2:])
    w_bytes = w.numel() * esize
    limit = _gemm_limit(threads, x, w, grad_out)
    col, os_ = _gemm_columns(x, w, grad_out, stride)
    thr_mem = 4 * threads * w_bytes + esize * threads * ic * ks * simd_w
    outer = thr_mem < limit and os_ // threads < 256 and n != 1
    nthr = threads if outer else 1
    booked = 4 * nthr * w_bytes + _DNNL_ALIGN  # key_conv_wei_reduction: book<float>(nthr * weights bytes)
    if booked > limit:
        return None
    if col and limit - booked < nthr * col * esize:  # shrink the spatial block to what is left
        max_os_block = (limit - booked) // (esize * nthr * (col // os_))
        col = ic * ks * max(simd_w, int(max_os_block * 0.05))
    if col:
        booked += nthr * col * esize + _DNNL_ALIGN
    return booked if booked <= limit else None


def _gemm_bwd_data_scratchpad(threads, x, w, grad_out, stride) -> int:
    """Scratchpad bytes of oneDNN's ``gemm_convolution_bwd_data_t`` (NC(D)HW, f32): its column buffer.

    ``jit_gemm_convolution_utils::init_conf`` (oneDNN v3.12): outer threading (one column buffer
    per thread) when the batch is > 1, ``os / threads < 512`` or ``ks < 64``, and splitting the
    batch keeps threads as busy as splitting the gemm (or the gemm is small).
    """
    esize, simd_w, gemm_threshold = 4, 8, 64 * 1024
    n, ic, oc = x.shape[0], x.shape[1], w.shape[0]
    ks = math.prod(w.shape[2:])
    col, os_ = _gemm_columns(x, w, grad_out, stride)
    is_ = x.shape[-2] * x.shape[-1]
    outer_eff = n / _pad(n, threads)
    inner_work = -(-is_ // simd_w) * -(-ic // simd_w)
    inner_eff = inner_work / _pad(inner_work, threads)
    outer = (
        (os_ // threads < 512 or ks < 64)
        and n != 1
        and (outer_eff / inner_eff >= 1 or is_ * ic * oc // threads < gemm_threshold)
    )
    nthr = threads if outer else 1
    if not col:
        return 0
    limit = _gemm_limit(threads, x, w, grad_out)
    if limit < nthr * col * esize:  # shrink the spatial block to what is left
        max_os_block = limit // (esize * nthr * (col // os_))
        col = ic * ks * max(simd_w, int(max_os_block * 0.1))
    return nthr * col * esize + _DNNL_ALIGN


def _channel_block() -> int:
    """Channels per block of oneDNN's blocked activation layouts on this CPU: 16 with AVX-512
    (``nChw16c``), 8 with AVX2 and older (``nChw8c``; measured per op on AVX2: a 72-channel output
    is reordered through a 72-channel buffer, not an 80-channel one)."""
    return 16 if _cpu_isa().startswith("AVX512") else 8


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
