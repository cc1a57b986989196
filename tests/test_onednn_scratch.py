"""oneDNN's scratch inside CPU convolutions: the model against torch.profiler and real CPU steps.

The rules (``memprof.engine.overheads._onednn_backward_scratch``) follow oneDNN v3.12's AVX2
kernels; on another CPU ISA the older per-op heuristic applies, so the exact checks run on AVX2
only. ``scripts/probe_onednn_conv.py`` checks 1062 single-op backward cases, 2-D and 3-D
(``benchmarks/onednn_conv_scratch.md``).
"""

from __future__ import annotations

import pytest
import torch

from memprof.commands.workload import make_workload
from memprof.engine import overheads
from memprof.engine.measure import measure_cpu_step
from memprof.engine.trace import trace_step

avx2 = pytest.mark.skipif(
    overheads._cpu_isa() != "AVX2" or not torch.backends.mkldnn.is_available(),
    reason="the exact oneDNN rules are those of its AVX2 kernels",
)


def _profiled_scratch(func, args) -> tuple[int, int]:
    """(scratch measured by torch.profiler inside one call of ``func``: its allocation peak minus its
    outputs, the model's bytes for the same arguments as fake tensors)."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = func(*args)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    outs = out if isinstance(out, tuple) else (out,)
    measured = peak - sum(t.untyped_storage().nbytes() for t in outs if t is not None)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        modelled = overheads.onednn_conv_scratch(func, fake)
    return measured, modelled


def _backward_scratch(
    x_shape, w_shape, mask, stride=1, padding=None, dilation=1, grad_layout=None, dtype=torch.float32
) -> tuple[int, int]:
    """(measured, modelled) scratch of one ``convolution_backward`` (2-D or 3-D by the shapes' rank)."""
    dims = len(x_shape) - 2
    k = w_shape[-1]
    stride, dilation = [stride] * dims, [dilation] * dims
    padding = [dilation[0] * (k // 2)] * dims if padding is None else [padding] * dims
    torch.manual_seed(0)
    x, w = torch.randn(x_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    conv = torch.nn.functional.conv3d if dims == 3 else torch.nn.functional.conv2d
    g = torch.randn_like(conv(x, w, stride=stride, padding=padding, dilation=dilation))
    if grad_layout is not None:
        g = g.contiguous(memory_format=grad_layout)
    args = (g, x, w, [w_shape[0]], stride, padding, dilation, False, [0] * dims, 1, list(mask))
    return _profiled_scratch(torch.ops.aten.convolution_backward.default, args)


def _measured_scratch(n, c, h, k, co, mask) -> tuple[int, int]:
    """(scratch measured by torch.profiler inside one convolution_backward, the model's bytes)."""
    return _backward_scratch((n, c, h, h), (co, c, k, k), mask)


def _with_threads(threads: int, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


@avx2
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_weight_gradient_scratch_of_a_small_map_matches_the_profiler(threads):
    """ResNet's layer4 3x3 conv on a 2x2 map: oneDNN's gemm kernel books 4 x the weight bytes of
    reduction space per thread plus im2col columns (37.8 MB at 1 thread, 75.6 MB at 2: 4x / 8x the
    9.4 MB weight, plus oneDNN's dense copy of the weight gradient)."""
    measured, modelled = _with_threads(threads, lambda: _measured_scratch(2, 512, 2, 3, 512, (True, True, False)))
    weight = 512 * 512 * 9 * 4
    assert measured > 3 * weight  # the gap this model closes: the old per-op rule said 32 KiB
    assert modelled == measured, (threads, measured, modelled)


@avx2
def test_direct_kernel_scratch_of_a_larger_map_matches_the_profiler():
    measured, modelled = _measured_scratch(2, 512, 8, 3, 512, (True, True, False))
    assert modelled == measured


@avx2
@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(batch_size=2, input_shape=(3, 64, 64), optimizer="adam"),
        dict(batch_size=8, input_shape=(3, 64, 64), optimizer="adam", freeze=("conv1", "bn1", "layer1", "layer2")),
    ],
    ids=["resnet18-b2-64", "resnet18-b8-64-frozen"],
)
def test_resnet18_small_maps_match_a_real_cpu_step(options):
    """Before the gemm rules the trace was 17.7 % (b2) and 18.7 % (frozen, b8) under these real steps;
    now it is within 0.1 % (exact on the machine that wrote this), and the scratch is listed as modelled."""
    w = make_workload("resnet18", **options)
    traced = trace_step(w, target="cpu")
    measured = measure_cpu_step(w)["peak_bytes"]
    assert abs(traced.peak_bytes - measured) <= measured // 1000, (traced.peak_bytes, measured)
    onednn = [m for m in traced.modelled if m.what == overheads.ONEDNN.what]
    assert onednn and onednn[0].bytes >= 4 * 512 * 512 * 9 * 4 and onednn[0].verified
    without = trace_step(w, target="cpu", kernel_scratch=False)
    assert traced.peak_bytes - without.peak_bytes >= 4 * 512 * 512 * 9 * 4


@avx2
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mask", [(True, True, False), (True, False, False)], ids=["input+weight", "input"])
def test_dilated_aspp_convolution_runs_gemm_and_matches_the_profiler(threads, mask):
    """DeepLabV3's ASPP: a 3x3 kernel dilated 12 on an 8x8 map. oneDNN's direct kernels refuse it, gemm
    computes both gradients: 4 x the weight per thread of reduction space (the "8.5 x the weight" that left
    deeplabv3_mobilenet_v3_large 26 % under its real step) and per-thread im2col columns for grad_input."""
    measured, modelled = _with_threads(
        threads, lambda: _backward_scratch((2, 960, 8, 8), (256, 960, 3, 3), mask, dilation=12)
    )
    weight = 256 * 960 * 9 * 4
    if mask[1]:
        assert measured > 4 * threads * weight
    else:  # ic * k * oh * ow floats per thread
        assert measured == threads * 960 * 9 * 64 * 4 + 128
    assert modelled == measured, (threads, measured, modelled)


@avx2
def test_small_dilation_keeps_the_direct_input_gradient_and_gemm_weight_gradient():
    measured, modelled = _with_threads(
        2, lambda: _backward_scratch((2, 64, 16, 16), (64, 64, 3, 3), (True, True, False), dilation=2)
    )
    assert modelled == measured


@avx2
@pytest.mark.parametrize(
    "w_shape, x_shape, stride, padding",
    [
        ((128, 128, 3, 3, 3), (2, 128, 4, 16, 16), 1, 1),  # r3d_18: depth padding, so gemm
        ((512, 256, 3, 3, 3), (2, 256, 2, 8, 8), 2, 1),  # gemm, strided input gradient
        ((128, 128, 1, 3, 3), (2, 128, 8, 16, 16), 1, (0, 1, 1)),  # mc3_18's (2+1)-D: the direct kernel
        ((128, 64, 1, 1, 1), (2, 64, 8, 32, 32), 2, 0),  # the downsampling shortcut: direct, not 1x1
    ],
    ids=["3x3x3", "3x3x3-s2", "1x3x3", "1x1x1-s2"],
)
def test_3d_convolution_backward_matches_the_profiler(w_shape, x_shape, stride, padding):
    """Before: 3-D convolutions had no modelled scratch (r3d_18 23 % under its real step)."""
    if isinstance(padding, tuple):  # per-dimension padding: build the op's arguments directly
        torch.manual_seed(0)
        x, w = torch.randn(x_shape), torch.randn(w_shape)
        g = torch.randn_like(torch.nn.functional.conv3d(x, w, stride=stride, padding=padding))
        args = (g, x, w, [w_shape[0]], [stride] * 3, list(padding), [1] * 3, False, [0] * 3, 1, [True, True, False])
        measured, modelled = _with_threads(
            2, lambda: _profiled_scratch(torch.ops.aten.convolution_backward.default, args)
        )
    else:
        measured, modelled = _with_threads(
            2, lambda: _backward_scratch(x_shape, w_shape, (True, True, False), stride=stride, padding=padding)
        )
    assert measured > 0
    assert modelled == measured, (measured, modelled)


@avx2
@pytest.mark.parametrize("mask", [(False, True, True), (True, False, False)], ids=["weight+bias", "input"])
def test_channels_last_grad_output_is_copied_for_the_whole_op(mask):
    """ViT's patch embedding: its output is flattened into tokens, so its gradient comes back channels-last;
    convolution_backward copies it to the input's layout first (on top of the gemm weight gradient)."""
    common = dict(stride=16, padding=0)
    measured, modelled = _with_threads(
        2,
        lambda: _backward_scratch((4, 3, 64, 64), (768, 3, 16, 16), mask, grad_layout=torch.channels_last, **common),
    )
    contiguous, _ = _with_threads(2, lambda: _backward_scratch((4, 3, 64, 64), (768, 3, 16, 16), mask, **common))
    assert measured - contiguous == 4 * 768 * 4 * 4 * 4  # the copy of grad_output
    if mask[1]:
        assert modelled == measured
    else:  # the strided input gradient's own per-thread scratchpad (brgconv_strided) is not modelled
        assert 0 <= measured - modelled < 256 * 1024, (measured, modelled)


@avx2
@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding, dilation",
    [
        ((2, 64, 8, 32, 32), (64, 64, 3, 3, 3), 1, 1, 1),  # blocked input and weight
        ((2, 3, 8, 64, 64), (64, 3, 3, 7, 7), (1, 2, 2), (1, 3, 3), 1),  # r3d_18's stem: blocked output
        ((4, 3, 64, 64), (768, 3, 16, 16), 16, 0, 1),  # ViT's patch embedding: the weight is reordered
        ((2, 64, 16, 16), (64, 64, 3, 3), 1, 2, 2),  # small dilation: the direct kernel
    ],
    ids=["3d", "3d-stem", "vit-patch", "dilated-2"],
)
def test_forward_scratch_matches_the_profiler(x_shape, w_shape, stride, padding, dilation):
    dims = len(x_shape) - 2

    def per_dim(v):
        return list(v) if isinstance(v, tuple) else [v] * dims

    torch.manual_seed(0)
    args = (
        torch.randn(x_shape),
        torch.randn(w_shape),
        None,
        per_dim(stride),
        per_dim(padding),
        per_dim(dilation),
        False,
        [0] * dims,
        1,
    )
    measured, modelled = _with_threads(2, lambda: _profiled_scratch(torch.ops.aten.convolution.default, args))
    assert modelled == measured, (measured, modelled)


@avx2
def test_forward_of_the_aspp_runs_gemm_with_a_plain_output():
    """gemm's forward holds its own output (copied out) and a cache-sized im2col block (35 KB here,
    not modelled): the model is that far under, where the blocked rule was 9 MB over."""
    args = (torch.randn(2, 960, 8, 8), torch.randn(256, 960, 3, 3), None, [1, 1], [12, 12], [12, 12], False, [0, 0], 1)
    measured, modelled = _with_threads(2, lambda: _profiled_scratch(torch.ops.aten.convolution.default, args))
    out = 2 * 256 * 8 * 8 * 4
    assert modelled == out
    assert 0 <= measured - modelled < 64 * 1024, (measured, modelled)


def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return False


native_bf16 = pytest.mark.skipif(_native_bf16(), reason="bf16 convolutions run PyTorch's own kernels only here")


@native_bf16
@pytest.mark.parametrize(
    "x_shape, w_shape, mask, stride, padding, dilation",
    [
        ((2, 8, 4, 8, 8), (16, 8, 3, 3, 3), (True, True, False), 1, None, 1),  # slow_conv3d: whole-batch columns
        ((2, 64, 8, 32, 32), (128, 64, 1, 1, 1), (True, True, True), 2, 0, 1),  # its bias: a float grad_output
        ((2, 64, 8, 8), (32, 64, 3, 3), (True, True, True), 1, None, 4),  # slow_conv_dilated2d: one image
        ((2, 3, 64, 64), (96, 3, 4, 4), (True, True, True), 4, 0, 1),  # slow_conv2d's bias
    ],
    ids=["conv3d", "conv3d-bias", "dilated", "conv2d-bias"],
)
def test_bf16_without_native_support_runs_pytorchs_kernels(x_shape, w_shape, mask, stride, padding, dilation):
    measured, modelled = _backward_scratch(
        x_shape, w_shape, mask, stride=stride, padding=padding, dilation=dilation, dtype=torch.bfloat16
    )
    assert measured > 0
    assert modelled == measured, (measured, modelled)


@avx2
@pytest.mark.slow
@pytest.mark.parametrize(
    "ref, options",
    [
        ("r3d_18", dict(batch_size=2, input_shape=(3, 8, 64, 64))),
        ("mc3_18", dict(batch_size=2, input_shape=(3, 8, 64, 64), optimizer="sgd")),
        ("vit_b_16", dict(batch_size=4, input_shape=(3, 64, 64), optimizer="sgd", model_kwargs={"image_size": 64})),
        ("deeplabv3_mobilenet_v3_large", dict(batch_size=2, input_shape=(3, 128, 128))),
    ],
    ids=["r3d_18", "mc3_18", "vit_b_16", "deeplabv3"],
)
def test_3d_dilated_and_patch_embedding_models_match_a_real_cpu_step(ref, options):
    """The validation zoo's misses before these rules: r3d_18 -23.2 %, mc3_18 -2.3 %, vit_b_16 -2.67 %,
    deeplabv3_mobilenet_v3_large -26.4 %; exact on the machine that wrote this (2 threads)."""
    w = make_workload(ref, **options)
    traced = trace_step(w, target="cpu")
    measured = measure_cpu_step(w)["peak_bytes"]
    assert abs(traced.peak_bytes - measured) <= measured // 1000, (traced.peak_bytes, measured)
