"""The traced estimator: exact category totals, agreement with real CPU steps, fit_batch, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memprof.engine.fit import fit_batch
from memprof.engine.loading import InputSpec, ModelSpec
from memprof.engine.measure import measure_cpu_step
from memprof.engine.trace import trace_step
from memprof.engine.workload import PRECISIONS, Workload
from memprof.errors import InputShapeError
from memprof.results import MemCategory as C
from memprof.zoo import GPT, gpt_param_count

MNIST_PARAMS = 101_770  # seed 002: 100,480 + 1,290
#: the real step also allocates a few 0-dim tensors for Python scalars (``x + 1``) inside C++,
#: where no dispatch mode sees them: at most a few bytes each
SCALAR_SLACK = 64


def spec(factory, shape, dtype="float", name=None, **kwargs) -> ModelSpec:
    return ModelSpec(
        ref=name or factory.__name__,
        display_name=name or factory.__name__,
        factory=factory,
        kwargs=kwargs,
        inputs=InputSpec(shapes=[shape], dtype=dtype),
        source="module",
    )


def mnist(batch=64, optimizer="adam", **kw) -> Workload:
    from memprof.zoo import mnist_mlp

    return Workload(spec(mnist_mlp, (1, 28, 28)), batch_size=batch, optimizer=optimizer, **kw)


class CkptNet(nn.Module):
    """Four Linear+Tanh blocks, each under torch.utils.checkpoint (non-reentrant)."""

    def __init__(self, dim: int = 256, use_checkpoint: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Tanh()) for _ in range(4)
        )
        self.head = nn.Linear(dim, 10)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
        return self.head(x)


# --------------------------------------------------------------------------- category totals
@pytest.mark.parametrize("optimizer, states", [("sgd", 0), ("sgd-momentum", 1), ("adam", 2), ("adagrad", 1)])
@pytest.mark.parametrize("loop", ["trainer", "plain"])
def test_mlp_category_totals_are_exact(optimizer, states, loop):
    batch = 64
    r = trace_step(mnist(batch, optimizer, loop=loop), target="cpu")
    p = MNIST_PARAMS * 4
    assert r.totals[C.PARAMETER] == p
    assert r.totals[C.BUFFER] == 0
    assert r.totals[C.GRADIENT] == p
    step_scalars = 4 * 4 if optimizer in ("adam", "adagrad") else 0  # one fp32 "step" tensor per parameter tensor
    assert r.totals[C.OPTIMIZER_STATE] == states * p + step_scalars
    assert r.totals[C.INPUT] == batch * 784 * 4
    # saved for backward: ReLU output (B x 128), log_softmax output (B x 10), the int64 class targets
    # nll_loss keeps, its total_weight scalar, and the loss itself; a plain loop also holds the logits (B x 10)
    logits = batch * 10 * 4 if loop == "plain" else 0
    assert r.totals[C.ACTIVATION] == batch * 128 * 4 + batch * 10 * 4 + batch * 8 + 4 + 4 + logits


def test_tied_weights_counted_once():
    kw = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    tied = Workload(spec(GPT, (16,), dtype="int64", **kw, tied=True), batch_size=2)
    tied.model.inputs.high = 256
    untied = Workload(spec(GPT, (16,), dtype="int64", **kw, tied=False), batch_size=2)
    untied.model.inputs.high = 256
    r_tied, r_untied = trace_step(tied, target="cpu"), trace_step(untied, target="cpu")
    assert r_tied.totals[C.PARAMETER] == 4 * gpt_param_count(256, 16, 2, 32, tied=True)
    assert r_untied.totals[C.PARAMETER] - r_tied.totals[C.PARAMETER] == 4 * 256 * 32
    assert r_tied.totals[C.GRADIENT] == r_tied.totals[C.PARAMETER]


def test_eval_mode_has_no_gradients_or_optimizer_state():
    r = trace_step(mnist(64, "adam", mode="eval"), target="cpu")
    assert C.GRADIENT not in r.totals and C.OPTIMIZER_STATE not in r.totals
    assert set(r.breakdown_at_peak) <= {C.PARAMETER, C.INPUT, C.TEMPORARY}
    # peak: params + input + the first Linear's output (B x 128) + ReLU's output (B x 128)
    assert r.peak_bytes == MNIST_PARAMS * 4 + 64 * 784 * 4 + 2 * 64 * 128 * 4
    assert r.peak_phase == "forward"


# --------------------------------------------------------------------------- against real CPU steps
@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_traced_peaks_equal_real_cpu_steps(optimizer):
    w = mnist(64, optimizer)
    r = trace_step(w, target="cpu")
    m = measure_cpu_step(w)
    assert abs(r.first_step_peak_bytes - m["first_step_peak_bytes"]) <= SCALAR_SLACK
    assert abs(r.steady_peak_bytes - m["steady_peak_bytes"]) <= SCALAR_SLACK


class ClonedEncoder(nn.Module):
    """nn.TransformerEncoder: its layers are copy.deepcopy clones of one layer (``_get_clones``)."""

    def __init__(self, dim: int = 64):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_deep_copied_layers_are_traced_as_the_real_step_holds_them():
    """A deep-copied fake parameter used to land in a new FakeTensorMode: every use of it was then
    converted into the tracing mode as a new weight-sized storage (PaddedEncoder +6.5 %)."""
    w = Workload(spec(ClonedEncoder, (32, 64)), batch_size=4, optimizer="adam")
    r = trace_step(w, target="cpu")
    m = measure_cpu_step(w)
    assert abs(r.peak_bytes - m["peak_bytes"]) <= SCALAR_SLACK
    layer = 3 * 64 * 64 + 3 * 64 + 64 * 64 + 64 + 2 * (64 * 128) + 128 + 64 + 4 * 64  # attention, MLP, 2 norms
    assert r.totals[C.PARAMETER] == 4 * (2 * layer + 64 * 10 + 10)
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert "__deepcopy__" not in FakeTensorMode.__dict__  # restored after the trace


def test_first_step_vs_steady_state():
    # SGD-momentum: the momentum buffers appear in the first optimizer step, so from the second
    # step on they are held during backward as well
    r = trace_step(mnist(64, "sgd-momentum"), target="cpu")
    assert r.steady_peak_bytes > r.first_step_peak_bytes
    assert r.peak_bytes == r.steady_peak_bytes and r.peak_step == 1
    one = trace_step(mnist(64, "sgd-momentum"), target="cpu", steps=1)
    assert one.peak_bytes == r.first_step_peak_bytes


def test_shared_weights_and_checkpointing_match_real_steps():
    shared = Workload(
        spec(__import__("memprof.zoo", fromlist=["SharedLinear"]).SharedLinear, (256,)), batch_size=32, optimizer="adam"
    )
    plain = Workload(spec(CkptNet, (256,), use_checkpoint=False), batch_size=64, optimizer="sgd")
    ckpt = Workload(spec(CkptNet, (256,), use_checkpoint=True), batch_size=64, optimizer="sgd")
    for w in (shared, ckpt):
        r = trace_step(w, target="cpu")
        m = measure_cpu_step(w)
        assert abs(r.peak_bytes - m["peak_bytes"]) <= SCALAR_SLACK, w.model.display_name
    r_plain, r_ckpt = trace_step(plain, target="cpu"), trace_step(ckpt, target="cpu")
    # checkpointing keeps each block's input (B x 256) and the CPU RNG state (5056 B) instead of
    # the block's two Tanh outputs
    assert r_plain.totals[C.ACTIVATION] - r_ckpt.totals[C.ACTIVATION] == 4 * (64 * 256 * 4 - 5056)
    assert any(p.phase == "backward" and p.module and p.module.startswith("blocks.") for p in r_ckpt.timeline)


# --------------------------------------------------------------------------- cuda target
def test_cuda_target_rounds_and_adds_overheads(monkeypatch):
    from memprof.engine import overheads

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(overheads, "torch_version", lambda: (2, 14))  # cuBLASLt shares the cuBLAS workspace
    r = trace_step(mnist(64, "adam"), target="cuda")
    # 784x128 weight (512-aligned), 128 bias -> 512, 10x128 weight 5120 (aligned), 10 bias -> 512
    assert r.totals[C.PARAMETER] == 401408 + 512 + 5120 + 512
    if not torch.cuda.is_available():  # Hopper's 32 MiB, one per thread: forward and backward (autograd's)
        assert r.cublas_workspace_bytes == 2 * 32 * 1024 * 1024
    assert sum(r.breakdown_at_peak.values()) == r.peak_bytes
    assert r.breakdown_at_peak[C.CUDA_OVERHEAD] == r.cublas_workspace_bytes
    assert r.predicted_reserved_bytes >= r.peak_bytes
    assert r.predicted_nvml_bytes == r.predicted_reserved_bytes + r.cuda_context_bytes
    assert r.peak_phase in ("forward", "backward", "optimizer")


# --------------------------------------------------------------------------- fit_batch
def test_fit_batch_finds_the_edge():
    w = mnist(1, "adam")
    capacity = trace_step(w.with_batch(37), target="cpu").peak_bytes + 1000
    fit = fit_batch(w, capacity, target="cpu", headroom=0.8)
    assert fit.max_batch == 37
    assert fit.peak_at_max_bytes <= capacity < fit.peak_at_next_bytes
    assert trace_step(w.with_batch(38), target="cpu").peak_bytes > capacity
    assert fit.recommended_batch == 29
    assert fit.traces <= 8
    # the peak is in Adam's step: only the input grows, and the logits a plain loop keeps (the default)
    assert fit.slope_bytes_per_sample == 784 * 4 + 10 * 4


def test_fit_batch_limits():
    w = mnist(1, "adam")
    assert fit_batch(w, 1000, target="cpu").max_batch is None
    fit = fit_batch(w, 1 << 40, target="cpu", max_batch=50)
    assert fit.max_batch == 50 and fit.limited_by_max and fit.recommended_batch == 40


# --------------------------------------------------------------------------- errors, timeline
def test_wrong_input_shape_names_the_layer():
    from memprof.zoo import mnist_mlp

    w = Workload(spec(mnist_mlp, (3, 32, 32)), batch_size=4)
    with pytest.raises(InputShapeError) as info:
        trace_step(w, target="cpu")
    text = info.value.message
    # the same wording as the formula pass: the layer, what it got, what it expects, the exception as raised
    assert "layer '1' (Linear) rejected input 4×3072, expects (*, 784): RuntimeError:" in text
    # the first layer with parameters rejected memprof's input: the hint is the input shape
    assert "--input-shape" in info.value.hint and "784" in info.value.hint


def test_timeline_is_bounded_and_keeps_the_peak():
    from memprof.cli.common import build_workload

    w = build_workload("resnet18", batch_size=2, input_shape=["3,64,64"], optimizer="sgd")
    r = trace_step(w, target="cpu")
    assert 100 < len(r.timeline) <= 2001
    assert max(p.allocated_bytes for p in r.timeline) == r.peak_bytes
    assert r.peak_phase == "backward" and r.peak_module is not None and r.trace_seconds > 0


def test_amp_bf16_traces():
    r = trace_step(mnist(64, "adam", precision=PRECISIONS["amp-bf16"]), target="cpu")
    m = measure_cpu_step(mnist(64, "adam", precision=PRECISIONS["amp-bf16"]))
    assert abs(r.peak_bytes - m["peak_bytes"]) <= SCALAR_SLACK


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_replayed_steps_equal_fully_traced_steps(target):
    """Steps after the first are copied from it: the result must equal tracing every step (all optimizers)."""
    workloads = [mnist(64, name) for name in ("adam", "adamw", "sgd", "rmsprop")]
    workloads += [mnist(64, name, loop="trainer") for name in ("adam", "sgd")]
    workloads += [
        Workload(spec(CkptNet, (256,)), batch_size=32, optimizer="adagrad"),
        mnist(32, "sgd-momentum", precision=PRECISIONS["amp-bf16"]),
    ]
    for w in workloads:
        a = trace_step(w, target=target, steps=3, replay_steps=False)
        b = trace_step(w, target=target, steps=3)
        assert (
            a.first_step_peak_bytes,
            a.steady_peak_bytes,
            a.peak_phase,
            a.peak_module,
            a.totals,
            a.breakdown_at_peak,
            a.predicted_reserved_bytes,
        ) == (
            b.first_step_peak_bytes,
            b.steady_peak_bytes,
            b.peak_phase,
            b.peak_module,
            b.totals,
            b.breakdown_at_peak,
            b.predicted_reserved_bytes,
        )
        assert _per_op(a) == _per_op(b)


def _per_op(result):
    """Live bytes after each op, in order (frees inside one op, e.g. autocast's cache, come in hash order)."""
    last: dict = {}
    for p in result.timeline:
        last[(p.step, p.op_index)] = (p.allocated_bytes, p.phase, p.step)
    return [v for _, v in sorted(last.items())]


def test_bracket_is_exact_on_affine_stepped_and_capped_curves():
    """fit_batch's search over traced peaks: exact answers in few traces (a trace also gives the bytes of a miss)."""
    from memprof.engine.fit import bracket_peaks

    def run(curve, capacity, limit, guess):
        cache = {}

        def peak(b):
            if b not in cache:
                cache[b] = curve(b)
            return cache[b]

        peak(1)
        answer, status = bracket_peaks(peak, cache, capacity, limit, guess)
        return answer, status, len(cache) - 1

    affine = lambda b: 1000 + 37 * b  # noqa: E731
    # the largest b with 1000 + 37 b <= 100_000 is 2675
    assert run(affine, 100_000, 1 << 20, 2600) == (2675, "exact", 3)  # guess fits, jump to the line, confirm +1
    answer, status, traces = run(affine, 100_000, 1 << 20, 3000)  # guess misses: interpolation lands on it
    assert (answer, status) == (2675, "exact") and traces <= 3
    # 2 MiB allocator segments on top of the line: still the exact boundary of the traced values
    stepped = lambda b: 10 * 2**20 + 2**21 * ((b * 300_000) // 2**21 + 1)  # noqa: E731
    capacity = 4 * 2**30
    answer, status, traces = run(stepped, capacity, 1 << 20, 10_000)
    assert status == "exact" and stepped(answer) <= capacity < stepped(answer + 1) and traces <= 8
    assert run(affine, 100_000, 500, 3000)[:2] == (500, "exact")  # --max-batch caps it


def test_transformer_encoder_traces_without_fake_tensor_warnings():
    """nn.TransformerEncoder probes data_ptr() on its fast path: PyTorch warns about fake tensors; not the user's
    business."""
    import warnings

    import torch

    from memprof.engine.loading import InputSpec, ModelSpec
    from memprof.engine.trace import trace_step
    from memprof.engine.workload import Workload

    def factory():
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.TransformerEncoder(layer, 2))

    spec = ModelSpec(ref="enc", display_name="enc", factory=factory, inputs=InputSpec(shapes=[(10, 8)], dtype="float"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trace_step(Workload(model=spec, batch_size=4, optimizer="sgd"), target="cpu")
    assert result.peak_bytes > 0
    assert not [w for w in caught if "data pointer of FakeTensor" in str(w.message)]


def test_fit_batch_reuses_a_known_trace_and_agrees_with_a_cold_fit():
    from memprof.cli.common import build_workload
    from memprof.engine.fit import fit_batch
    from memprof.engine.trace import trace_step

    workload = build_workload("memprof.zoo:mnist_mlp", batch_size=16, optimizer="adam")
    capacity = 3 * 2**20  # CPU target: live tensor bytes
    cold = fit_batch(workload, capacity, target="cpu")
    known = {16: trace_step(workload, target="cpu")}
    warm = fit_batch(workload, capacity, target="cpu", known=known)
    assert warm.max_batch == cold.max_batch and warm.max_batch is not None
    assert warm.peak_at_max_bytes <= capacity < warm.peak_at_next_bytes
    # batch 1, batch 8, the answer, answer + 1 (227 when the output is dropped before backward: --loop trainer)
    assert (cold.max_batch, cold.traces) == (224, 4)
    assert warm.traces - len(known) == 3  # no batch-1 trace: first guess, the answer, answer + 1


class TransposedHead(nn.Module):
    """A Linear applied to a transposed (non-contiguous) 3-D activation, as after a sequence-first layer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.head = nn.Linear(64, 512)

    def forward(self, x):
        return self.head(torch.relu(self.inp(x)).transpose(0, 1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_linear_on_a_transposed_input_adds_its_bias_in_place_as_aten_does(mode):
    w = Workload(spec(TransposedHead, (12, 32)), batch_size=8, mode=mode)
    traced = trace_step(w, target="cpu")
    assert abs(traced.peak_bytes - measure_cpu_step(w)["peak_bytes"]) <= SCALAR_SLACK


def test_a_loss_hook_without_a_batch_hook_is_told_that_its_target_is_none():
    from memprof.errors import ModelCodeError

    def memprof_loss(output, target):
        return nn.functional.cross_entropy(output, target)

    s = spec(nn.Linear, (16,), in_features=16, out_features=4)
    s.loss_hook = memprof_loss
    with pytest.raises(ModelCodeError, match="memprof passes target=None when the model has no memprof_batch") as err:
        trace_step(Workload(s, batch_size=2), target="cpu")
    assert "in memprof_loss" in err.value.message and "memprof_batch(batch_size, device, dtype)" in err.value.hint
