"""FLOPs from the trace: per layer against the seeds' closed forms, per step against PyTorch's FlopCounterMode
on real CPU steps, the published resnet50 count, checkpointing's recomputation, and the roofline step-time model.

The closed forms (seed 003 / issue 16), in PyTorch's convention (2 FLOPs per multiply-add, bias additions not
counted):

* convolution: ``2 * H_out * W_out * C_in * C_out * K^2 / groups`` per sample;
* linear: ``2 * N_in * N_out`` per sample (per token for 3-D inputs);
* attention (``scaled_dot_product_attention``, query/key/value ``(B, h, L, d)``): two batched matmuls,
  ``Q K^T`` and ``softmax(.) V``: ``2 * 2 * B * h * L^2 * d`` forward; backward recomputes the scores and
  runs four more: ``5 * 2 * B * h * L^2 * d`` (``torch.utils.flop_counter.sdpa_backward_flop_count``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memprof.commands.workload import make_workload
from memprof.engine.flops import ROOT, recompute_cost
from memprof.engine.roofline import PeakSpec, step_time, tokens_per_sample
from memprof.engine.trace import trace_step
from memprof.engine.workload import prepare, train_step
from memprof.errors import UsageError


def conv_flops(h_out: int, w_out: int, c_in: int, c_out: int, k: int, groups: int = 1) -> int:
    return 2 * h_out * w_out * c_in * c_out * k * k // groups


def linear_flops(n_in: int, n_out: int) -> int:
    return 2 * n_in * n_out


def attention_flops(b: int, h: int, length: int, d: int) -> int:
    return 2 * 2 * b * h * length * length * d


def trace(model, shape, batch: int, **kw):
    workload = make_workload(model, batch_size=batch, input_shape=shape, **kw)
    return trace_step(workload, target="cuda")


def forward_by_module(result) -> dict[str, int]:
    return {m.name: m.forward_flops for m in result.flops.modules}


# --------------------------------------------------------------------------- closed forms, per layer
class Convs(nn.Module):
    """Plain, strided, grouped and depthwise convolutions (with and without bias)."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(3, 16, 3, padding=1)  # 20x20 -> 20x20
        self.strided = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)  # -> 10x10
        self.grouped = nn.Conv2d(32, 64, 3, padding=1, groups=4)  # -> 10x10
        self.depthwise = nn.Conv2d(64, 64, 5, padding=2, groups=64)  # -> 10x10
        self.pointwise = nn.Conv2d(64, 8, 1)
        self.head = nn.Linear(8 * 10 * 10, 10)

    def forward(self, x):
        x = self.pointwise(self.depthwise(self.grouped(self.strided(self.plain(x)))))
        return self.head(x.flatten(1))


def test_convolutions_match_the_closed_form_exactly():
    batch = 3
    r = trace(Convs(), (3, 20, 20), batch)
    per = forward_by_module(r)
    expected = {
        "plain": conv_flops(20, 20, 3, 16, 3),
        "strided": conv_flops(10, 10, 16, 32, 3),
        "grouped": conv_flops(10, 10, 32, 64, 3, groups=4),
        "depthwise": conv_flops(10, 10, 64, 64, 5, groups=64),
        "pointwise": conv_flops(10, 10, 64, 8, 1),
        "head": linear_flops(800, 10),
    }
    assert {name: per[name] for name in expected} == {name: batch * f for name, f in expected.items()}
    assert r.flops.forward_flops == batch * sum(expected.values())
    # backward: input and weight gradients, each one forward's worth; the first layer's input needs none,
    # and the grouped / depthwise weight gradients count once, not `groups` times (PyTorch < 2.13 did)
    backward = {m.name: m.backward_flops for m in r.flops.modules}
    assert backward["plain"] == batch * expected["plain"]
    for name in ("strided", "grouped", "depthwise", "pointwise", "head"):
        assert backward[name] == 2 * batch * expected[name], name
    assert r.flops.optimizer_flops == 0


def test_linear_matches_the_closed_form_per_sample_and_per_token():
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 40, bias=False))
    r = trace(model, (7, 48), 5)  # 5 samples of 7 tokens
    per = forward_by_module(r)
    assert per["0"] == 5 * 7 * linear_flops(48, 96)
    assert per["2"] == 5 * 7 * linear_flops(96, 40)
    assert "1" not in per  # GELU: no formula, counted 0 ...
    names = {u.name for u in r.flops.uncounted_ops}
    assert "aten.gelu" in names and "aten.gelu_backward" in names  # ... and listed, not silently zero
    assert r.flops.backward_flops == 5 * 7 * (linear_flops(48, 96) + 2 * linear_flops(96, 40))


class Attention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, length, dim))


def test_attention_matches_the_closed_form_exactly():
    b, length, dim, heads = 2, 24, 32, 4
    r = trace(Attention(dim, heads), (length, dim), b)
    core = attention_flops(b, heads, length, dim // heads)
    per = forward_by_module(r)
    assert per[ROOT] == core  # the attention runs in the root module's own code
    assert per["qkv"] == b * length * linear_flops(dim, 3 * dim)
    # whichever attention kernel the trace ran (the CPU's flash kernel, or the CUDA kernel it stands for)
    kernels = {op: f for op, f in r.flops.by_op.items() if "attention" in op}
    assert sum(f for op, f in kernels.items() if "backward" not in op) == core
    # backward recomputes the scores and runs four more matmuls: 5/2 of the forward
    assert sum(f for op, f in kernels.items() if "backward" in op) == 5 * core // 2


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_both_paths(need_weights):
    """nn.MultiheadAttention: the SDPA kernel (need_weights=False) and the explicit bmm path count the same."""

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=need_weights)[0]

    b, length, e = 2, 16, 32
    r = trace(MHA(), (length, e), b)
    projections = b * length * (linear_flops(e, 3 * e) + linear_flops(e, e))
    assert r.flops.forward_flops == projections + attention_flops(b, 4, length, e // 4)


def test_seed004_convstack_layers():
    """Seed 004's conv stack at 8x3x32x32: each conv's FLOPs by the seed-003 formula."""
    r = trace("memprof.zoo:seed004_convstack", (3, 32, 32), 8)
    per = forward_by_module(r)
    assert per == {
        "0": 8 * conv_flops(32, 32, 3, 64, 3),
        "2": 8 * conv_flops(32, 32, 64, 64, 3),
        "5": 8 * conv_flops(16, 16, 64, 128, 3),
    }
    assert r.flops.forward_flops == 934_281_216
    assert r.flops.per_sample_flops == r.flops.step_flops / 8


def test_resnet50_forward_is_the_published_count():
    """anchors.md: FlopCounterMode counts resnet50 at 224x224, batch 1, as 8,178,368,512 FLOPs (4.09 GMACs)."""
    r = trace("resnet50", None, 1)
    assert r.flops.forward_flops == 8_178_368_512
    assert r.flops.forward_macs == 4_089_184_256
    names = {u.name: u.kind for u in r.flops.uncounted_ops}
    assert names["aten.native_batch_norm"] == "other" and names["aten.relu_"] == "pointwise"


# --------------------------------------------------------------------------- against FlopCounterMode, real steps
def _flop_counter_step(workload, custom: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from memprof.engine.flops import formulas

    mapping = None
    if custom:  # memprof's additions (CPU attention, grouped conv backward) given to FlopCounterMode raw
        mapping = {}
        for op, f in formulas().items():

            def raw(*args, _f=f, **kwargs):
                return _f(*args, **kwargs)

            raw._get_raw = True  # type: ignore[attr-defined]
            mapping[op] = raw
    prepared = prepare(workload, "cpu")
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        train_step(prepared)
    return int(counter.get_total_flops())


def test_step_equals_flop_counter_mode_on_a_real_step():
    """The tracer's hook sees the same ops as FlopCounterMode around a real CPU step (PyTorch's own registry)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    workload = make_workload(model, batch_size=3, input_shape=(3, 16, 16))
    traced = trace_step(workload, target="cuda").flops
    assert traced.step_flops == _flop_counter_step(workload, custom=False) > 0


GPT_KWARGS = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


@pytest.mark.parametrize(
    "ref,kwargs",
    [
        ("memprof.zoo:GPT", {"input_shape": (16,), "model_kwargs": GPT_KWARGS}),
        pytest.param("resnet18", {"input_shape": (3, 32, 32)}, marks=pytest.mark.slow),
        pytest.param("mobilenet_v3_small", {"input_shape": (3, 32, 32)}, marks=pytest.mark.slow),
    ],
)
def test_step_equals_flop_counter_mode_with_memprofs_formulas(ref, kwargs):
    """Whole models, forward + backward + optimizer: the trace's count equals FlopCounterMode's around a real
    step given memprof's formulas (the CPU attention kernel, grouped convolutions' backward)."""
    workload = make_workload(ref, batch_size=2, **kwargs)
    assert trace_step(workload, target="cuda").flops.step_flops == _flop_counter_step(workload, custom=True)


# --------------------------------------------------------------------------- phases, modes, checkpointing
def test_eval_counts_the_forward_only():
    r = trace(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4)), (10,), 6, mode="eval")
    assert r.flops.forward_flops == 6 * (linear_flops(10, 20) + linear_flops(20, 4))
    assert r.flops.backward_flops == r.flops.optimizer_flops == 0


def test_count_flops_off():
    workload = make_workload(nn.Linear(4, 4), batch_size=2, input_shape=(4,))
    assert trace_step(workload, target="cuda", count_flops=False).flops is None


def test_amp_counts_the_same_flops_in_16_bits():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    w32 = make_workload(model, batch_size=4, input_shape=(64,))
    w16 = make_workload(model, batch_size=4, input_shape=(64,), dtype="amp-bf16")
    r32, r16 = trace_step(w32, count_bytes=True), trace_step(w16, count_bytes=True)
    assert r16.flops.step_flops == r32.flops.step_flops
    assert {kind for _, kind, f, _, _ in r16._op_costs.flop_ops if f} == {"bf16"}
    assert {kind for _, kind, f, _, _ in r32._op_costs.flop_ops if f} == {"fp32"}


def test_checkpointing_recomputation_is_counted_in_backward():
    """resnet18 with every block checkpointed: the backward runs the blocks' forward again, and the trace's
    recomputed FLOPs equal recompute_cost's (a separate FlopCounterMode count of the checkpointed regions)."""
    plain = make_workload("resnet18", batch_size=2, input_shape=(3, 32, 32))
    ckpt = plain.replace(checkpointing="blocks")
    r_plain, r_ckpt = trace_step(plain).flops, trace_step(ckpt).flops
    cost = recompute_cost(ckpt)
    assert r_plain.recompute_flops == 0 and r_ckpt.recompute_flops > 0
    assert r_ckpt.recompute_flops == cost.recompute_flops
    assert r_ckpt.forward_flops == r_plain.forward_flops
    assert r_ckpt.backward_flops == r_plain.backward_flops + r_ckpt.recompute_flops


# --------------------------------------------------------------------------- the step-time model
def test_step_time_by_hand():
    """One bias-free Linear(1024, 1024) in eval at batch 256: one mm. FLOPs 2*256*1024*1024; bytes: input
    1 MiB + weight 4 MiB (read through a transposed view) + output 1 MiB."""
    workload = make_workload(nn.Linear(1024, 1024, bias=False), batch_size=256, input_shape=(1024,), mode="eval")
    r = trace_step(workload, count_bytes=True)
    flops, nbytes = 2 * 256 * 1024 * 1024, 6 * 2**20
    assert r._op_costs.flop_ops == (("forward", "fp32", flops, nbytes, 1),)
    compute_bound = PeakSpec("slow-math", {"fp32": 1e12}, 1e12)
    st = step_time(r, compute_bound)
    assert st.seconds == pytest.approx(flops / 1e12) and st.compute_bound_seconds == st.seconds
    assert st.samples_per_second == pytest.approx(256 / st.seconds) and st.tokens_per_second is None
    memory_bound = PeakSpec("slow-memory", {"fp32": 1e15}, 1e9)
    st = step_time(r, memory_bound)
    assert st.seconds == pytest.approx(nbytes / 1e9) and st.memory_bound_seconds == st.seconds
    assert st.label == "model, not measured"


def test_step_time_sums_phases_and_falls_back_to_fp32():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    r = trace_step(make_workload(model, batch_size=4, input_shape=(3, 8, 8)), count_bytes=True)
    # fp32 convolutions run at TF32 (cuDNN's default): a GPU without a TF32 figure falls back to fp32, said so
    st = step_time(r, PeakSpec("old", {"fp32": 10e12}, 500e9))
    assert any("no tf32 peak" in a for a in st.assumptions)
    assert st.seconds == pytest.approx(st.forward_seconds + st.backward_seconds + st.optimizer_seconds)
    assert st.seconds == pytest.approx(st.compute_bound_seconds + st.memory_bound_seconds)
    assert st.optimizer_seconds > 0  # Adam's elementwise updates: memory-bound, bytes / bandwidth
    assert st.step_bytes == r._op_costs.step_bytes


def test_step_time_needs_costs_and_tokens_per_second():
    w = make_workload(
        "memprof.zoo:GPT",
        batch_size=2,
        input_shape=(16,),
        model_kwargs={"vocab_size": 64, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32},
    )
    gpu = PeakSpec("g", {"fp32": 1e12}, 1e11)
    with pytest.raises(UsageError):
        step_time(trace_step(w), gpu)  # traced without count_bytes
    assert tokens_per_sample(w) == 16  # token ids (detected from the Embedding when the model was built)
    st = step_time(trace_step(w, count_bytes=True), gpu, tokens=16)
    assert st.tokens_per_second == pytest.approx(16 * st.samples_per_second)
    assert math.isfinite(st.seconds) and st.seconds > 0
    with pytest.raises(UsageError):
        PeakSpec("none", {"fp32": 0}, 1e9)


def test_torch_version_of_the_grouped_conv_fix():
    """memprof's grouped-conv backward equals PyTorch's formula divided by groups for the weight gradient."""
    from memprof.engine.flops import _conv_backward

    x = torch.empty(2, 8, 6, 6, device="meta")
    w = torch.empty(8, 2, 3, 3, device="meta")  # groups=4
    go = torch.empty(2, 8, 4, 4, device="meta")
    out = (x, w, None)
    flops = _conv_backward(go, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 4, [True, True, False], out)
    assert flops == 2 * conv_flops(4, 4, 8, 8, 3, groups=4) * 2  # grad input + grad weight, each = forward


@pytest.mark.parametrize(
    "name",
    ["mobilenet_v3_small", "vit_b_16", pytest.param("swin_t", marks=pytest.mark.slow), "efficientnet_b0"],
)
def test_torchvision_published_compute(name):
    """Held-out models of known shape: torchvision documents each model's compute at 224x224 in its weights'
    meta["_ops"] (G multiply-adds, 3 decimals); memprof's traced forward MACs round to it."""
    import torchvision

    published = torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"]
    r = trace_step(make_workload(name, batch_size=1, mode="eval"))
    assert round(r.flops.forward_macs / 1e9, 3) == pytest.approx(published, abs=1e-9)


@pytest.mark.parametrize("layer", ["mha", "encoder"])
def test_fused_inference_kernels_count_like_the_training_path(layer):
    """In eval (no_grad) nn.MultiheadAttention and nn.TransformerEncoderLayer run one fused kernel each,
    which PyTorch's registry has no formula for; memprof counts them as their training path's matmuls."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if layer == "mha":
                self.block = nn.MultiheadAttention(32, 4, batch_first=True)
            else:
                self.block = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)

        def forward(self, x):
            return self.block(x, x, x, need_weights=False)[0] if layer == "mha" else self.block(x)

    b, length, e = 3, 10, 32
    train = trace(Net(), (length, e), b).flops
    infer = trace(Net(), (length, e), b, mode="eval").flops
    fused = {"aten._native_multi_head_attention", "aten._transformer_encoder_layer_fwd"}
    assert fused & set(infer.by_op) and not fused & set(train.by_op)  # a fast path ran in eval only
    expected = b * length * (linear_flops(e, 3 * e) + linear_flops(e, e)) + attention_flops(b, 4, length, e // 4)
    if layer == "encoder":
        expected += b * length * (linear_flops(e, 64) + linear_flops(64, e))
    assert infer.forward_flops == train.forward_flops == expected


def test_encoder_layer_kernel_formula():
    """_transformer_encoder_layer_fwd (taken when nn.TransformerEncoder's fast path applies): attention block
    plus the two feed-forward matmuls."""
    from memprof.engine.flops import formulas

    m = torch.empty  # meta tensors: shapes only
    b, length, e, ffn = 2, 7, 16, 40
    args = [m(b, length, e, device="meta"), e, 4, m(3 * e, e, device="meta"), m(3 * e, device="meta")]
    args += [m(e, e, device="meta"), m(e, device="meta"), False, False, 1e-5]
    args += [m(e, device="meta")] * 4 + [m(ffn, e, device="meta"), m(ffn, device="meta")]
    args += [m(e, ffn, device="meta"), m(e, device="meta")]
    formula = formulas()[torch.ops.aten._transformer_encoder_layer_fwd]
    expected = b * length * (linear_flops(e, 3 * e) + linear_flops(e, e) + linear_flops(e, ffn) + linear_flops(ffn, e))
    assert formula(*args, out_val=None) == expected + attention_flops(b, 4, length, e // 4)
