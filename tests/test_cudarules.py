"""CUDA's kernel choices applied to CPU traces (memprof.engine.cudarules): dropout, autocast, attention.

Where PyTorch can show its own CUDA behaviour without a GPU - forward passes on fake ``cuda``
tensors under CUDA autocast - the traced ops are compared with it op for op.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.engine import cudarules
from memprof.engine.catalog import resolve_target
from memprof.engine.loading import InputSpec, ModelSpec
from memprof.engine.trace import trace_step
from memprof.engine.workload import PRECISIONS, Workload
from memprof.results import MemCategory as C
from memprof.zoo import PaddedMaskAttention, dropout_mlp

SM80, SM90, SM75 = (resolve_target(gpu_arch=a) for a in ("sm80", "sm90", "sm75"))


def spec(factory, shape, dtype="float", **kwargs) -> ModelSpec:
    return ModelSpec(
        ref=factory.__name__,
        display_name=factory.__name__,
        factory=factory,
        kwargs=kwargs,
        inputs=InputSpec(shapes=[shape], dtype=dtype),
        source="module",
    )


# --------------------------------------------------------------------------- dropout
def test_dropout_keeps_a_byte_mask_on_cuda_and_float_noise_on_cpu():
    """Issue #17: 4 layers of 8192 x 1024 add 268 MB on the CPU (output + fp32 noise), 168 MB on CUDA
    (output + 1-byte mask)."""
    elements = 4 * 8192 * 1024
    added = {}
    for target in ("cpu", "cuda"):
        plain, dropped = (
            trace_step(Workload(spec(dropout_mlp, (1024,), p=p), batch_size=8192, optimizer="sgd"), target=target)
            for p in (0.0, 0.1)
        )
        added[target] = dropped.totals[C.ACTIVATION] - plain.totals[C.ACTIVATION]
    assert added["cpu"] == elements * (4 + 4)  # 268.4 MB
    assert added["cuda"] == pytest.approx(elements * (4 + 1), rel=0.05)  # 167.8 MB


def test_inplace_and_eval_dropout_are_the_same_on_both_devices():
    import torch.nn.functional as F

    rules = cudarules.CudaRules(SM80)
    x = torch.randn(16, 16)
    with rules:
        F.dropout(x, 0.5, training=False)
        F.dropout(x.clone(), 0.5, training=True, inplace=True)  # dropout_: no fused kernel on CUDA either
        F.dropout(x, 1.0, training=True)  # p = 1: not is_fused_kernel_acceptable
    assert rules.dropouts == 0
    with rules:
        F.dropout(x, 0.5, training=True)
    assert rules.dropouts == 1
    assert torch.ops.aten.dropout.default(x, 0.5, True).shape == x.shape  # the rule is gone after the block


# --------------------------------------------------------------------------- autocast against PyTorch's own CUDA rules
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is not torch.ops.prim.device.default:
            outs = out if isinstance(out, (tuple, list)) else [out]
            shapes = tuple((tuple(o.shape), o.dtype) for o in outs if isinstance(o, torch.Tensor))
            self.ops.append((func.name(), shapes))
        return out


def _amp_model(device):
    emb = nn.Embedding(100, 64, device=device)
    proj = nn.Linear(64, 64, device=device)
    norm = nn.LayerNorm(64, device=device)
    group = nn.GroupNorm(4, 64, device=device)
    head = nn.Linear(64, 100, device=device)

    def forward(tokens):
        h = emb(tokens)
        a = norm(proj(h))
        att = torch.softmax(a @ a.t(), -1)  # explicit softmax: fp32 on CUDA
        logits = head(att @ a)
        return (
            nn.functional.cross_entropy(logits, tokens),
            torch.log_softmax(logits, -1),
            logits.exp().sum() + logits.pow(2).mean() + torch.cumsum(logits, -1).sum() + torch.norm(logits),
            nn.functional.mse_loss(logits, logits.detach()),
            group(a.view(8, 64, 1)),
            torch.addcmul(a, a, a),
            torch.baddbmm(a.view(8, 8, 8), a.view(8, 8, 8), a.view(8, 8, 8)),
            nn.functional.gelu(logits),
        )

    return forward


def _ops_under_cuda_autocast():
    """What PyTorch itself runs under CUDA autocast, on fake cuda tensors (forward only: no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    log = _Ops()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            forward = _amp_model("cuda")
            tokens = torch.zeros(8, dtype=torch.long, device="cuda")
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", torch.float16)
            torch.autocast_increment_nesting()
            try:
                with log:
                    forward(tokens)
            finally:
                torch.set_autocast_enabled("cuda", False)
                torch.autocast_decrement_nesting()
                torch.clear_autocast_cache()
    except (RuntimeError, TypeError, AttributeError) as exc:  # older PyTorch: no fake cuda without a GPU
        pytest.skip(f"fake cuda tensors need a GPU in torch {torch.__version__}: {exc}")
    return log.ops


def _ops_with_cuda_rules():
    from torch._subclasses.fake_tensor import FakeTensorMode

    log = _Ops()
    with FakeTensorMode(allow_non_fake_inputs=True):
        forward = _amp_model("cpu")
        tokens = torch.zeros(8, dtype=torch.long)
        with cudarules.CudaRules(SM80, torch.float16), torch.autocast("cpu", dtype=torch.float16), log:
            forward(tokens)
    return [(name, tuple((shape, dtype) for shape, dtype in outs)) for name, outs in log.ops]


def _without_batch_norm_and_devices(ops):
    return [(name, outs) for name, outs in ops]


def test_autocast_follows_pytorchs_cuda_rules_op_for_op():
    cuda = _ops_under_cuda_autocast()
    cpu_with_rules = _ops_with_cuda_rules()
    for want, got in itertools.zip_longest(cuda, cpu_with_rules):
        assert got == want
    # the points of issue #17: softmax in fp32, cross-entropy's fp16 log_softmax plus an fp32 copy for nll_loss
    names = [(name, outs[0][1]) for name, outs in cuda]
    assert ("aten::_softmax", torch.float32) in names
    i = names.index(("aten::_log_softmax", torch.float16))
    assert names[i + 2] == ("aten::_to_copy", torch.float32) and names[i + 3][0] == "aten::nll_loss_forward"


def test_cpu_autocast_differs_where_issue_17_says():
    from torch._subclasses.fake_tensor import FakeTensorMode

    log = _Ops()
    with FakeTensorMode(allow_non_fake_inputs=True):
        forward = _amp_model("cpu")
        with torch.autocast("cpu", dtype=torch.float16), log:
            forward(torch.zeros(8, dtype=torch.long))
    names = [(name, outs[0][1]) for name, outs in log.ops]
    assert ("aten::_softmax", torch.float16) in names  # the CPU keeps the explicit softmax in fp16
    nll = [name for name, _ in names].index("aten::nll_loss_forward")
    # CPU autocast runs cross_entropy_loss in fp32: an fp32 log_softmax, which nll_loss keeps
    assert names[nll - 2] == ("aten::_log_softmax", torch.float32)


def test_explicit_softmax_keeps_its_t_squared_output_in_fp32_for_cuda():
    class Attn(nn.Module):
        def __init__(self, dim=64):
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            att = (q @ k.transpose(-2, -1)).softmax(-1)
            return att @ v

    tokens = 256
    s = spec(Attn, (tokens, 64))
    s.loss_hook = lambda out, target: out.sum()  # keeps nothing: only the attention's saved tensors differ
    w = Workload(s, batch_size=2, optimizer="sgd", precision=PRECISIONS["amp-fp16"])
    cuda = trace_step(w, target="cuda", cuda_target=SM80)
    cpu = trace_step(w, target="cpu")
    square = 2 * tokens * tokens
    # the T x T softmax output is saved (by softmax's and the matmul's backward): fp32 on CUDA, fp16 on the CPU;
    # on CUDA matmul saves an fp16 cast of it too
    assert cuda.totals[C.ACTIVATION] - cpu.totals[C.ACTIVATION] == pytest.approx(square * (4 + 2 - 2), rel=0.02)


def test_bce_is_banned_under_cuda_autocast():
    from memprof.errors import ModelCodeError

    class Sig(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 1)

        def forward(self, x):
            return torch.sigmoid(self.lin(x))

    s = spec(Sig, (8,))
    s.loss_hook = lambda out, target: nn.functional.binary_cross_entropy(out, torch.ones_like(out))
    w = Workload(s, batch_size=4, optimizer="sgd", precision=PRECISIONS["amp-fp16"])
    # the model's own loss raised: shown as raised, at its line
    with pytest.raises(ModelCodeError, match=r"unsafe to autocast.*test_cudarules\.py:\d+"):
        trace_step(w, target="cuda", cuda_target=SM80)
    trace_step(w, target="cpu")  # the CPU's autocast allows it


# --------------------------------------------------------------------------- attention
def _qkv(b=2, h=8, s=128, d=64, dtype=torch.float16, hk=None, grad=True):
    q = torch.randn(b, h, s, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, hk or h, s, d, dtype=dtype, requires_grad=grad)
    return q, k, k.detach().clone().requires_grad_(grad)


@pytest.mark.parametrize(
    "target, kwargs, mask, expected",
    [
        (SM80, {}, None, "flash"),
        (SM80, {"dtype": torch.float32}, None, "efficient"),
        (SM80, {}, "bool", "efficient"),  # flash takes no mask
        (SM80, {"d": 60}, None, "flash"),  # padded to 64 in the composite
        (SM80, {"d": 60}, "bool", "math"),  # memory-efficient needs head_dim % 8 == 0 in 16 bit
        (SM80, {"d": 512}, None, "efficient"),  # flash: head_dim <= 256
        (SM75, {}, None, "efficient"),  # flash needs sm80
        (SM75, {"dtype": torch.bfloat16}, None, "math"),  # no bf16 before sm80
        (SM80, {"hk": 2}, None, "math"),  # GQA needs enable_gqa=True
        (resolve_target(gpu_arch="sm86"), {"d": 200}, None, "efficient"),  # sm86 training with head_dim in (192, 224]
    ],
)
def test_backend_selection_follows_sdp_utils(target, kwargs, mask, expected):
    q, k, v = _qkv(**kwargs)
    attn_mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool) if mask == "bool" else None
    backend, reason = cudarules.select_sdp_backend(q, k, v, attn_mask, 0.0, False, False, target)
    assert backend == expected, reason


def test_gqa_with_enable_gqa_runs_flash_and_causal_non_square_does_not():
    q, k, v = _qkv(hk=2)
    assert cudarules.select_sdp_backend(q, k, v, None, 0.0, False, True, SM80)[0] == "flash"
    q, k, v = _qkv()
    short_q = q[:, :, :16]
    assert cudarules.select_sdp_backend(short_q, k, v, None, 0.0, True, False, SM80)[0] == "efficient"


def test_user_switches_are_honoured():
    q, k, v = _qkv()
    flash = torch.backends.cuda.flash_sdp_enabled()
    try:
        torch.backends.cuda.enable_flash_sdp(False)
        backend, reason = cudarules.select_sdp_backend(q, k, v, None, 0.0, False, False, SM80)
        assert backend == "efficient" and "flash disabled" in reason
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)


def gpt(seq: int, dropout: float):
    from memprof.zoo import GPT

    return GPT(vocab_size=512, block_size=seq, n_layer=2, n_head=4, n_embd=128, dropout=dropout)


def _gpt_workload(seq: int, dropout: float, precision: str = "amp-bf16") -> Workload:
    s = spec(gpt, (seq,), dtype="int64", seq=seq, dropout=dropout)
    s.inputs.high = 512
    return Workload(s, batch_size=2, optimizer="adamw", precision=PRECISIONS[precision])


def test_attention_with_dropout_grows_linearly_in_sequence_length_on_cuda():
    """Issue #17: flash/memory-efficient kernels keep only the RNG state for dropout, never the T x T matrix."""
    act = {}
    for seq in (256, 512, 1024):
        r = trace_step(_gpt_workload(seq, 0.1), target="cuda", cuda_target=SM80)
        assert r.attention_backends == {"flash": 2}
        act[seq] = r.totals[C.ACTIVATION]
        cpu = trace_step(_gpt_workload(seq, 0.1), target="cpu")
        assert cpu.totals[C.ACTIVATION] > act[seq]
    # growth from 512 to 1024 over growth from 256 to 512: 2 for a linear curve, 4 for a quadratic one
    assert (act[1024] - act[512]) / (act[512] - act[256]) < 2.3
    math_path = {}
    for seq in (256, 512, 1024):
        r = trace_step(_gpt_workload(seq, 0.1), target="cuda", cuda_target=SM75)  # no flash before sm80, no bf16
        assert r.attention_backends == {"math": 2}
        math_path[seq] = r.totals[C.ACTIVATION]
    # the math path saves B x H x T x T probabilities and a dropout mask
    assert (math_path[1024] - math_path[512]) / (math_path[512] - math_path[256]) > 3


def test_flash_backward_scratch_is_modelled():
    from memprof.engine import overheads

    q, k, v = _qkv(b=2, h=8, s=1000, d=64)
    out = q.detach().transpose(1, 2).contiguous().transpose(1, 2)  # (B, S, H, D) storage, as flash writes it
    grad = out.clone().transpose(1, 2).contiguous().transpose(1, 2)
    scratch = overheads.flash_backward_scratch((grad, q, k, v, out))
    # softmax_d: 2 x 8 x 1024 fp32; dq_accum: 2 x 1024 x 8 x 64 fp32 (about twice grad_q in 16 bit)
    assert scratch == 2 * 8 * 1024 * 4 + 2 * 1024 * 8 * 64 * 4
    grad_q = q.numel() * 2
    assert 1.9 < (2 * 1024 * 8 * 64 * 4) / grad_q < 2.2


def test_padded_mask_attention_uses_memory_efficient_and_keeps_the_mask():
    w = Workload(spec(PaddedMaskAttention, (128, 64), dim=64), batch_size=2, optimizer="sgd")
    w = w.replace(precision=PRECISIONS["amp-fp16"])
    r = trace_step(w, target="cuda", cuda_target=SM80)
    assert r.attention_backends == {"efficient": 2}
    assert any("memory-efficient" in n for n in r.notes)
    unmasked = trace_step(_gpt_workload(128, 0.0, "amp-fp16"), target="cuda", cuda_target=SM80)
    assert unmasked.attention_backends == {"flash": 2}
