"""oneDNN's scratch inside CPU ``convolution_backward``: the model against torch.profiler and real CPU steps.

The rules (``memprof.engine.overheads._onednn_backward_scratch``) follow oneDNN v3.12's AVX2
kernels; on another CPU ISA the older per-op heuristic applies, so the exact checks run on AVX2
only. ``scripts/probe_onednn_conv.py`` checks 600 single-op cases (``benchmarks/onednn_conv_scratch.md``).
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


def _measured_scratch(n, c, h, k, co, mask) -> tuple[int, int]:
    """(scratch measured by torch.profiler inside one convolution_backward, the model's bytes)."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x, w = torch.randn(n, c, h, h), torch.randn(co, c, k, k)
    g = torch.randn_like(torch.nn.functional.conv2d(x, w, padding=k // 2))
    args = (g, x, w, [co], [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, list(mask))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = torch.ops.aten.convolution_backward.default(*args)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    measured = peak - sum(t.untyped_storage().nbytes() for t in out if t is not None)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        modelled = overheads.onednn_conv_scratch(torch.ops.aten.convolution_backward.default, fake)
    return measured, modelled


@avx2
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_weight_gradient_scratch_of_a_small_map_matches_the_profiler(threads):
    """ResNet's layer4 3x3 conv on a 2x2 map: oneDNN's gemm kernel books 4 x the weight bytes of
    reduction space per thread plus im2col columns (37.8 MB at 1 thread, 75.6 MB at 2: 4x / 8x the
    9.4 MB weight, plus oneDNN's dense copy of the weight gradient)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        measured, modelled = _measured_scratch(2, 512, 2, 3, 512, (True, True, False))
    finally:
        torch.set_num_threads(saved)
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
