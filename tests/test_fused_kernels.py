"""Kernels that run differently in eval mode, against real CPU steps: nn.TransformerEncoderLayer's fused
inference path (which per-module hooks turn off), fused multi-head attention and the nested tensors a
padded batch is packed into (whose kernels allocate inside the op: measured, memprof.engine.cpumem)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.commands.workload import make_workload
from memprof.engine import cpumem
from memprof.engine.measure import measure_cpu_step
from memprof.engine.modtrack import ModuleTracker
from memprof.engine.trace import trace_step
from memprof.engine.tracking import StorageTracker

SMALL = {"dim": 64, "heads": 4, "layers": 2}


class _Ops(TorchDispatchMode):
    def __init__(self, modules: ModuleTracker):
        super().__init__()
        self.modules = modules
        self.seen: list[tuple[str, str | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append((func.__name__, self.modules.current()))
        return func(*args, **(kwargs or {}))


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.Sequential(nn.Linear(32, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()


@pytest.mark.parametrize("fast_paths", [True, False])
def test_module_tracker_leaves_transformer_encoder_layers_on_their_fused_path(fast_paths):
    """Hooks on any module inside an nn.TransformerEncoderLayer turn its inference fast path off (PyTorch
    checks `_forward_hooks`); with `fast_paths` the tracker follows those modules with global hooks."""
    model = _encoder()
    modules = ModuleTracker().attach(model, "Net", fast_paths=fast_paths)
    layer = model[1].layers[0]
    try:
        assert bool(layer._forward_hooks or layer.self_attn._forward_pre_hooks) is not fast_paths
        assert model[0]._forward_hooks  # modules outside an encoder layer keep theirs
        spy = _Ops(modules)
        with torch.no_grad(), spy:
            model(torch.randn(2, 5, 32))
    finally:
        modules.detach()
    fused = [where for op, where in spy.seen if op.startswith("_transformer_encoder_layer_fwd")]
    if fast_paths:
        assert fused == ["1.layers.0", "1.layers.1"]  # named as per-module hooks name them
        assert ("addmm.default", "0") in spy.seen
    else:
        assert fused == []
        assert ("addmm.default", "1.layers.0.linear1") in spy.seen


def _error(ref: str, **options) -> tuple[float, object]:
    workload = make_workload(ref, **options)
    traced = trace_step(workload, target="cpu")
    measured = measure_cpu_step(workload)["peak_bytes"]
    return traced.peak_bytes - measured, traced


def test_fused_encoder_layers_in_eval_match_a_real_step():
    """Without a padding mask, eval runs each layer as one fused op; the trace measures what it holds
    inside (a probe of the op's shapes) instead of tracing the unfused layers (+10 % on the zoo's case)."""
    diff, traced = _error(
        "memprof.zoo:PaddedEncoder", batch_size=4, mode="eval", model_kwargs=SMALL | {"padding": False}
    )
    assert traced.method == "trace"
    assert diff == 0
    assert any(m.what == cpumem.FUSED.what and m.bytes > 0 for m in traced.modelled)


def test_padded_encoder_in_eval_matches_a_real_step_to_the_byte():
    """With the padding mask, eval packs the batch into a nested tensor (a real CPU run): the fused layers
    and the nested-tensor kernels run measured, and nested tensors' layout tensors count (was -23 %)."""
    diff, traced = _error("memprof.zoo:PaddedEncoder", batch_size=4, mode="eval", model_kwargs=SMALL)
    assert traced.method != "trace"
    assert diff == 0


def test_fused_multi_head_attention_in_eval_matches_a_real_step():
    """nn.MultiheadAttention in eval runs torch._native_multi_head_attention (was -37 %)."""
    diff, traced = _error("memprof.zoo:PaddedAttention", batch_size=4, mode="eval", model_kwargs=SMALL)
    assert traced.method == "trace"
    assert diff == 0


def test_op_probe_measures_what_the_op_holds_and_runs_each_signature_once():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    weights = [t.detach() for t in (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)]
    op = torch.ops.aten._native_multi_head_attention.default
    x = torch.randn(3, 16, 32)
    _, real = cpumem.measure_op(lambda: op(x, x, x, 32, 4, *weights), ())
    assert real > 0
    probe = cpumem.OpProbe()
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    fake_weights = [mode.from_tensor(t) for t in weights]
    for _ in range(2):  # new fake tensors of the same shapes: the same signature
        fake = mode.from_tensor(torch.randn(3, 16, 32))
        assert probe.scratch(op, (fake, fake, fake, 32, 4, *fake_weights), {}) == real
    assert len(probe._cache) == 1
    # q, k and v as separate tensors take another branch of the kernel: another signature
    q, k = mode.from_tensor(torch.randn(3, 16, 32)), mode.from_tensor(torch.randn(3, 16, 32))
    probe.scratch(op, (q, k, k, 32, 4, *fake_weights), {})
    assert len(probe._cache) == 2


def test_storage_tracker_counts_a_nested_tensors_layout_tensors():
    nt = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(5, 4)])
    tracker = StorageTracker()
    tracker.register([nt])
    # the buffer (8 x 4 floats), sizes and strides (2 x 2 int64 each), offsets (2 int64)
    assert tracker.current_bytes == 8 * 4 * 4 + 32 + 32 + 16


def test_cuda_trace_says_the_fused_encoder_path_is_traced_unfused():
    workload = make_workload(
        "memprof.zoo:PaddedEncoder", batch_size=2, mode="eval", model_kwargs=SMALL | {"padding": False}
    )
    traced = trace_step(workload, target="cuda")
    assert any("torch._transformer_encoder_layer_fwd" in n for n in traced.notes)
