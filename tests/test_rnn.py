"""Recurrent layers: oneDNN's LSTM workspace and scratch on the CPU, the cuDNN emulation for CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from memprof.engine import rnn
from memprof.engine.loading import InputSpec, ModelSpec
from memprof.engine.measure import measure_cpu_step
from memprof.engine.trace import trace_step
from memprof.engine.workload import Workload, get_precision
from memprof.results import MemCategory
from memprof.zoo import RecurrentLM

#: the real step also makes a few 0-dim tensors for Python scalars inside C++ (RNN's tanh cells)
SCALAR_SLACK = 64


def lm(batch=4, steps=12, **kwargs) -> Workload:
    options = dict(vocab_size=300, embed=24, hidden=40, num_layers=2)
    options.update(kwargs)
    spec = ModelSpec(
        ref="RecurrentLM",
        display_name="RecurrentLM",
        factory=RecurrentLM,
        kwargs=options,
        inputs=InputSpec(shapes=[(steps,)], dtype="int64", high=options["vocab_size"]),
        source="module",
    )
    return Workload(spec, batch_size=batch)


# --------------------------------------------------------------------------- oneDNN formulas vs the real kernel
@pytest.mark.parametrize("shape", [(32, 8, 128, 256), (1, 1, 16, 16), (7, 3, 10, 20), (50, 16, 300, 200)])
def test_onednn_workspace_matches_the_kernel(shape):
    t, b, i, h = shape
    x, w0, w1 = torch.randn(t, b, i), torch.randn(4 * h, i), torch.randn(4 * h, h)
    b0, b1, hx, cx = torch.randn(4 * h), torch.randn(4 * h), torch.zeros(b, h), torch.zeros(b, h)
    args = (x, w0, w1, b0, b1, hx, cx, False, [], 2, h, 1, True, False, False, True)
    with torch.enable_grad():
        out = torch.ops.aten.mkldnn_rnn_layer(*args)
    if out[3].numel() == 0:
        pytest.skip("this build runs LSTM without oneDNN")
    assert out[3].numel() == rnn.onednn_lstm_workspace(rnn.lstm_shape(args))


def test_good_ld_is_onednns():
    # 64-byte aligned; a multiple of 256 elements gets one more cache line (4K aliasing)
    assert rnn.good_ld(1024, 4) == 1040
    assert rnn.good_ld(800, 4) == 800
    assert rnn.good_ld(300, 4) == 304
    assert rnn.good_ld(20, 4) == 32
    assert rnn.good_ld(256, 2) == 288


# --------------------------------------------------------------------------- traced CPU step vs a real one
@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(kind="LSTM"), id="lstm"),
        pytest.param(
            dict(kind="LSTM", bidirectional=True, num_layers=3, batch_first=False),
            marks=pytest.mark.slow,
            id="lstm-bi3-seqfirst",
        ),
        pytest.param(dict(kind="LSTM", proj_size=16, dropout=0.1), id="lstm-proj-dropout"),
        pytest.param(dict(kind="GRU", bidirectional=True), id="gru-bi"),
        pytest.param(dict(kind="RNN_RELU", bias=False), id="rnn-relu"),
    ],
)
def test_recurrent_cpu_trace_matches_a_real_step(options):
    workload = lm(**options)
    traced = trace_step(workload, target="cpu")
    measured = measure_cpu_step(workload)
    assert abs(traced.peak_bytes - measured["peak_bytes"]) <= SCALAR_SLACK


def test_lstm_inference_scratch_matches_a_real_forward():
    # eval: oneDNN's inference scratchpad (no workspace), and the head's Linear on the LSTM's
    # transposed output (ATen adds the bias in place on real tensors)
    workload = lm(batch=6, steps=20, kind="LSTM").replace(mode="eval")
    traced = trace_step(workload, target="cpu")
    assert abs(traced.peak_bytes - measure_cpu_step(workload)["peak_bytes"]) <= SCALAR_SLACK + 160


def test_lstm_workspace_is_listed_as_modelled():
    traced = trace_step(lm(kind="LSTM"), target="cpu")
    what = {m.what: m for m in traced.modelled}
    if rnn.ONEDNN_WORKSPACE_WHAT not in what:
        pytest.skip("this build runs LSTM without oneDNN")
    # both layers' workspaces live until backward reaches them; the peak is in the last layer's backward
    one_layer = rnn.onednn_lstm_workspace(rnn.LstmShape(12, 4, 40, 40, 4, 4))
    assert what[rnn.ONEDNN_WORKSPACE_WHAT].bytes in (one_layer, 2 * one_layer)
    assert what[rnn.ONEDNN_WORKSPACE_WHAT].verified
    assert sum(m.bytes for m in traced.modelled) < traced.peak_bytes


# --------------------------------------------------------------------------- cuDNN emulation (CUDA target)
def test_cudnn_sizes_follow_the_documented_model():
    call = rnn.CudnnRnn("lstm", seq=10, batch=4, input_size=8, hidden=16, proj=0, layers=2, directions=2, esize=4)
    assert call.workspace_bytes() == 2 * 10 * 4 * 4 * 16 * 4
    assert call.reserve_bytes() == 2 * 2 * 10 * 4 * (4 * 16 + 16 + 16) * 4
    gru = rnn.CudnnRnn("gru", seq=10, batch=4, input_size=8, hidden=16, proj=0, layers=1, directions=1, esize=2)
    assert gru.math_esize == 4  # half precision RNN math runs in float32
    assert gru.reserve_bytes() == 10 * 4 * 5 * 16 * 2


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_cuda_trace_keeps_the_cudnn_reserve_not_per_step_tensors(kind):
    steps, batch = 64, 8
    workload = lm(batch=batch, steps=steps, kind=kind, num_layers=1, hidden=64, embed=64, vocab_size=50)
    cuda = trace_step(workload, target="cuda")
    call = rnn.CudnnRnn(kind.lower() if kind != "RNN" else "rnn_tanh", steps, batch, 64, 64, 0, 1, 1, 4)
    modelled = {m.what: m for m in cuda.modelled}
    assert not any(m.verified for m in cuda.modelled)
    if rnn.CUDNN_RESERVE_WHAT in modelled:  # the peak is in the recurrent layer's backward
        assert modelled[rnn.CUDNN_RESERVE_WHAT].bytes == -(-call.reserve_bytes() // 512) * 512
    # gradients: one buffer for the layer's weights (cuDNN's dw), the rest per parameter
    params = sum(p.numel() for p in RecurrentLM(50, 64, 64, 1, kind).parameters()) * 4
    assert cuda.totals[MemCategory.PARAMETER] >= params


def test_cuda_trace_restores_torch_vf():
    trace_step(lm(batch=2, steps=4, kind="GRU", num_layers=1), target="cuda")
    assert "gru" not in vars(torch._VF) and "lstm" not in vars(torch._VF)
    out, _ = torch.nn.GRU(3, 5)(torch.randn(2, 1, 3))
    assert out.shape == (2, 1, 5)


@pytest.mark.slow
def test_find_batch_on_an_lstm_needs_few_trials():
    from memprof.commands.find_batch import find_batch

    workload = lm(batch=1, steps=32, kind="LSTM", hidden=128, embed=64, vocab_size=500)
    result = find_batch(workload, device="cpu", memory_limit=24 * 2**20, max_batch=512)
    assert result.status == "exact"
    assert result.prediction is not None and result.prediction.max_batch == result.largest_batch
    assert len(result.trials) <= 4


@pytest.mark.slow
def test_cuda_autocast_runs_the_cudnn_rnn_in_half_precision():
    # CUDA autocast's _cudnn_rnn wrapper (cudnn/AutocastRNN.cpp) casts input, states and weights to
    # fp16: the reserve space is half of fp32's; cudarules leaves _cudnn_rnn to the emulation
    steps, batch = 64, 8
    reserves = {}
    for precision in ("fp32", "amp-fp16"):
        workload = lm(batch=batch, steps=steps, kind="LSTM", num_layers=1, hidden=64, embed=64, vocab_size=50)
        workload = dataclasses.replace(workload, precision=get_precision(precision))
        modelled = {m.what: m.bytes for m in trace_step(workload, target="cuda").modelled}
        reserves[precision] = modelled[rnn.CUDNN_RESERVE_WHAT]
    call = rnn.CudnnRnn("lstm", steps, batch, 64, 64, 0, 1, 1, 2)
    assert reserves["amp-fp16"] == -(-call.reserve_bytes() // 512) * 512
    assert reserves["fp32"] == 2 * reserves["amp-fp16"]
