"""oneDNN's blocked layouts inside CPU forward convolutions: 8-channel blocks on AVX2 (``nChw8c``), against
torch.profiler per op and a real eval step (MobileNetV3's 72- and 88-channel layers)."""

from __future__ import annotations

import pytest
import torch

from memprof.commands.workload import make_workload
from memprof.engine import cpumem, overheads
from memprof.engine.measure import measure_cpu_step
from memprof.engine.trace import trace_step

avx2 = pytest.mark.skipif(
    overheads._cpu_isa() != "AVX2" or not torch.backends.mkldnn.is_available(),
    reason="oneDNN's 8-channel blocks are those of its AVX2 kernels",
)


@avx2
@pytest.mark.parametrize("c_in,c_out,groups", [(16, 72, 1), (72, 72, 72), (24, 88, 1)])
def test_forward_convolution_reorders_through_8_channel_blocks_on_avx2(c_in, c_out, groups):
    """MobileNetV3's 72- and 88-channel convolutions: oneDNN's blocked output holds 72 (88) channels, not 80
    (96); 16-channel blocks over-predicted MobileNetV3-small in eval by 3.3 %."""
    torch.manual_seed(0)
    x, w = torch.randn(8, c_in, 16, 16), torch.randn(c_out, c_in // groups, 3, 3)
    args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], groups)
    op = torch.ops.aten.convolution.default
    with torch.no_grad():
        _, measured = cpumem.measure_op(lambda: op(*args), ())
    assert overheads.onednn_conv_scratch(op, args) == measured


@avx2
def test_small_cnn_in_eval_matches_a_real_step():
    workload = make_workload("mobilenet_v3_small", batch_size=4, input_shape=(3, 64, 64), mode="eval")
    traced = trace_step(workload, target="cpu")
    assert traced.peak_bytes == measure_cpu_step(workload)["peak_bytes"]  # was +41 KiB (+0.37 %)
