"""What a step allocates that no dispatch mode sees: cuBLAS workspaces, the CUDA context, oneDNN scratch.

The tracer adds these to what it records (``memprof.engine.trace``); they are constants and
heuristics taken from PyTorch's and oneDNN's behaviour, each documented where it is defined.
"""

from __future__ import annotations

import os

MiB = 1024 * 1024

#: memory_allocated) per (cuBLAS handle, stream) at the first matmul: 32 MiB on Hopper
#: (sm90), 8 MiB + 128 KiB otherwise (``CublasHandlePool.cpp``; CUBLAS_WORKSPACE_CONFIG
#: changes it). Forward (main thread) and backward (autograd's device thread) use
#: different handles, so a training step holds two.
CUBLAS_WORKSPACE_HOPPER_BYTES = 32 * MiB
CUBLAS_WORKSPACE_DEFAULT_BYTES = 8 * MiB + 128 * 1024
#: CUDA context + kernel images as NVML sees them for a PyTorch process (anchors: 200-700 MB,
#: pytorch #28113/#86509). Lazy module loading (CUDA >= 11.7) keeps it near the low end for
#: plain training; 512 MiB is the default, MEMPROF_CUDA_CONTEXT_MIB overrides it.
CUDA_CONTEXT_DEFAULT_BYTES = 512 * MiB


def cublas_workspace_bytes() -> int:
    """The per-handle cuBLAS workspace: from CUBLAS_WORKSPACE_CONFIG, the local GPU, or Hopper's default."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config:
        try:  # ":SIZE_KIB:COUNT[:SIZE_KIB:COUNT...]"
            nums = [int(p) for p in config.split(":") if p]
            total = sum(size * 1024 * count for size, count in zip(nums[0::2], nums[1::2], strict=False))
            if total:
                return total
        except ValueError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return CUBLAS_WORKSPACE_HOPPER_BYTES if (major, minor) == (9, 0) else CUBLAS_WORKSPACE_DEFAULT_BYTES
    except Exception:  # pragma: no cover - no driver
        pass
    return CUBLAS_WORKSPACE_HOPPER_BYTES


def cuda_context_bytes() -> int:
    value = os.environ.get("MEMPROF_CUDA_CONTEXT_MIB")
    if value:
        try:
            return int(float(value) * MiB)
        except ValueError:
            pass
    return CUDA_CONTEXT_DEFAULT_BYTES


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
