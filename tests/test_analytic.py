"""The analytical model reproduces the seeds' numbers and hand-computed models exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memprof.commands.estimate import estimate, formula_fit
from memprof.engine import analytic
from memprof.engine.analytic import (
    analyse,
    analytic_total_at,
    cruncher_counts,
    cruncher_total_bytes,
    four_part_bytes,
    largest_batch,
    module_param_formula,
)
from memprof.engine.fit import recommend as recommended
from memprof.engine.loading import load_model
from memprof.engine.workload import Workload, get_precision
from memprof.errors import InputShapeError
from memprof.results import Capacity, MemCategory
from memprof.zoo import gpt_param_count


def _workload(ref: str, shape=None, batch=1, kwargs=None, **kw) -> Workload:
    spec = load_model(ref, kwargs or {})
    if shape is not None:
        spec.inputs.shapes = [tuple(shape)]
    return Workload(model=spec, batch_size=batch, **kw)


# --------------------------------------------------------------------------- seed 001: per-layer formulas
@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(3, 64, 3),
        lambda: nn.Conv2d(32, 64, 5, groups=4, bias=False),
        lambda: nn.Conv2d(64, 64, (3, 1), groups=64),  # depthwise, non-square kernel
        lambda: nn.Conv1d(8, 16, 7, groups=2),
        lambda: nn.Conv3d(3, 8, (2, 3, 3)),
        lambda: nn.ConvTranspose2d(64, 32, 2, stride=2),
        lambda: nn.ConvTranspose2d(64, 32, 3, groups=4, bias=False),
        lambda: nn.Linear(784, 128),
        lambda: nn.Linear(128, 10, bias=False),
        lambda: nn.Bilinear(4, 5, 6),
        lambda: nn.BatchNorm2d(64),
        lambda: nn.BatchNorm1d(32, affine=False),
        lambda: nn.InstanceNorm2d(16, affine=True),
        lambda: nn.LayerNorm(768),
        lambda: nn.LayerNorm((4, 8)),
        lambda: nn.LayerNorm(10, bias=False),
        lambda: nn.LayerNorm(10, elementwise_affine=False),
        lambda: nn.GroupNorm(8, 64),
        lambda: nn.Embedding(50304, 64),
        lambda: nn.EmbeddingBag(100, 7),
        lambda: nn.PReLU(12),
        lambda: nn.MultiheadAttention(64, 4),
        lambda: nn.MultiheadAttention(64, 4, kdim=32, vdim=16, add_bias_kv=True),
        lambda: nn.ReLU(inplace=True),
        lambda: nn.MaxPool2d(2),
        lambda: nn.Dropout(0.1),
        lambda: nn.Flatten(),
    ],
)
def test_per_layer_formula_matches_numel(make):
    with torch.device("meta"):
        m = make()
    own = sum(p.numel() for p in m.parameters(recurse=False))
    assert module_param_formula(m) == own


def test_formula_helpers_by_hand():
    assert analytic.conv_params(3, 64, 3) == 64 * 3 * 9 + 64 == 1792
    assert analytic.conv_params(32, 64, 5, groups=4, bias=False) == 64 * 8 * 25
    assert analytic.linear_params(784, 128) == 100_480
    assert analytic.batchnorm_params(64) == 128
    assert analytic.layernorm_params((4, 8)) == 64
    assert analytic.groupnorm_params(64) == 128
    assert analytic.embedding_params(1000, 16) == 16_000
    with torch.device("meta"):
        assert module_param_formula(nn.TransformerEncoderLayer(16, 2)) is None  # a container: no formula


# --------------------------------------------------------------------------- seed 002: the MLPs
def test_mnist_and_cifar_mlp_parameters():
    mnist = analyse(_workload("memprof.zoo:mnist_mlp", (1, 28, 28), optimizer="sgd"))
    assert mnist.param_count == 101_770 == 784 * 128 + 128 + 128 * 10 + 10
    cifar = analyse(_workload("memprof.zoo:cifar_mlp", (3, 32, 32), optimizer="sgd"))
    assert cifar.param_count == 394_634
    assert [r.params for r in mnist.layers] == [0, 100_480, 0, 1_290]
    assert mnist.formula_checked == 2 and mnist.formula_mismatches == ()


def test_mnist_mlp_torchsummary_figures():
    # seed 002's torchsummary: Params 0.39 MB, Forward/backward 0.01 MB, Total 0.40 MB (MB = 1024**2)
    est = analyse(_workload("memprof.zoo:mnist_mlp", (1, 28, 28), optimizer="sgd"))
    ts = next(m for m in est.methods if m.method == "torchsummary-style")
    assert ts.activation_bytes == 2 * (784 + 128 + 128 + 10) * 4
    assert round(ts.activation_bytes / 1024**2, 2) == 0.01
    assert round(101_770 * 4 / 1024**2, 2) == 0.39
    assert ts.total_bytes == 28 * 28 * 4 + ts.activation_bytes + 101_770 * 4
    assert round(ts.total_bytes / 1024**2, 2) == 0.40


def test_mnist_mlp_sgd_parts_by_hand():
    # seed 002's parts: params + gradients (same again) + no SGD state + input + activations
    b = 64
    est = analyse(_workload("memprof.zoo:mnist_mlp", (1, 28, 28), batch=b, optimizer="sgd"))
    bd = est.breakdown
    assert bd[MemCategory.PARAMETER] == bd[MemCategory.GRADIENT] == 407_080
    assert bd[MemCategory.OPTIMIZER_STATE] == 0
    assert bd[MemCategory.INPUT] == b * 3_136
    assert bd[MemCategory.ACTIVATION] == b * (784 + 128 + 128 + 10) * 4
    assert est.total_bytes == sum(bd.values())


# --------------------------------------------------------------------------- seed 004: modelsize
def test_seed004_convstack_modelsize():
    est = analyse(_workload("memprof.zoo:seed004_convstack", (3, 682, 700), optimizer="sgd"))
    assert est.param_count == 112_576
    assert est.modelsize_param_bytes == 450_304  # 0.450304 MB
    assert est.modelsize_forward_bytes == 336_089_600  # 336.0896 MB forward-only
    assert est.modelsize_backward_bytes == 672_179_200  # 672.1792 MB "with backward"
    assert f"{est.modelsize_forward_bytes / 1e6:.4f}" == "336.0896"
    assert f"{est.modelsize_backward_bytes / 1e6:.4f}" == "672.1792"
    relu = [r for r in est.layers if r.type == "ReLU"]
    assert len(relu) == 2 and all(r.inplace and r.activation_bytes == 0 for r in relu)  # skipped, as in the seed
    assert [r.output_shapes for r in est.layers][-1] == ((1, 128, 341, 350),)


# --------------------------------------------------------------------------- seed 000: the four-part rule
@pytest.mark.parametrize(
    "dim,layers,batch,opt",
    [(1024, 4, 8, "adagrad"), (256, 2, 32, "sgd"), (64, 8, 3, "adam"), (512, 1, 1, "sgd-momentum")],
)
def test_cruncher_four_part_rule(dim, layers, batch, opt):
    k = {"sgd": 0, "sgd-momentum": 1, "adagrad": 1, "adam": 2}[opt]
    params = dim * dim * layers + dim
    # the seed, literally
    assert cruncher_counts(dim, layers, batch, opt) == {
        "params": params,
        "activations": batch * dim * layers,
        "gradients": params,
        "optimizer_states": k * params,
    }
    assert cruncher_total_bytes(dim, layers, batch, opt) == 4 * (params + batch * dim * layers + params + k * params)
    assert cruncher_total_bytes(dim, layers, batch, opt, bytes_per_element=2) * 2 == cruncher_total_bytes(
        dim, layers, batch, opt
    )
    # the model-driven estimate: the same parts, plus the final layer's B x 1 output the seed leaves out
    est = analyse(
        _workload("memprof.zoo:Cruncher", batch=batch, kwargs={"dim": dim, "num_layers": layers}, optimizer=opt)
    )
    assert est.param_count == params
    assert est.module_output_elements == batch * dim * layers + batch
    parts = four_part_bytes(params, batch * dim * layers + batch, opt)
    bd = est.breakdown
    assert bd[MemCategory.PARAMETER] == parts["params"]
    assert bd[MemCategory.GRADIENT] == parts["gradients"]
    assert bd[MemCategory.OPTIMIZER_STATE] == parts["optimizer_state"]
    assert bd[MemCategory.ACTIVATION] == parts["activations"]
    assert est.total_bytes == parts["total"] + bd[MemCategory.INPUT] == parts["total"] + 4 * batch * dim


@pytest.mark.parametrize(
    "opt,k", [("sgd", 0), ("sgd-momentum", 1), ("adagrad", 1), ("rmsprop", 1), ("adam", 2), ("adamw", 2)]
)
def test_optimizer_state_multiples(opt, k):
    est = analyse(_workload("memprof.zoo:Cruncher", batch=2, kwargs={"dim": 16, "num_layers": 2}, optimizer=opt))
    assert est.optimizer_states == k
    assert est.breakdown[MemCategory.OPTIMIZER_STATE] == k * (16 * 16 * 2 + 16) * 4


def test_precisions_bytes_per_element():
    kw = {"dim": 32, "num_layers": 2}
    p = 32 * 32 * 2 + 32
    fp16 = analyse(_workload("memprof.zoo:Cruncher", batch=4, kwargs=kw, precision=get_precision("fp16")))
    assert fp16.breakdown[MemCategory.PARAMETER] == 2 * p and fp16.breakdown[MemCategory.OPTIMIZER_STATE] == 4 * p
    assert fp16.breakdown[MemCategory.ACTIVATION] == 2 * (4 * 32 * 2 + 4)
    amp = analyse(_workload("memprof.zoo:Cruncher", batch=4, kwargs=kw, precision=get_precision("amp-bf16")))
    assert amp.breakdown[MemCategory.PARAMETER] == 4 * p and amp.breakdown[MemCategory.GRADIENT] == 4 * p
    assert amp.breakdown[MemCategory.ACTIVATION] == 2 * (4 * 32 * 2 + 4)  # autocast outputs
    assert amp.breakdown[MemCategory.TEMPORARY] == 2 * p  # low-precision weight copies


def test_eval_mode_has_no_gradients_or_state():
    est = analyse(_workload("memprof.zoo:Cruncher", batch=4, kwargs={"dim": 32, "num_layers": 3}, mode="eval"))
    assert est.breakdown[MemCategory.GRADIENT] == 0 and est.breakdown[MemCategory.OPTIMIZER_STATE] == 0
    assert est.trainable_param_count == est.param_count == 32 * 32 * 3 + 32
    # nothing kept: the largest layer's input and output
    assert est.breakdown[MemCategory.ACTIVATION] == 2 * 4 * 32 * 4


# --------------------------------------------------------------------------- storages, buffers, meta
def test_tied_weights_counted_once():
    kw = {"vocab_size": 100, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 8}
    tied = analyse(_workload("memprof.zoo:GPT", (16,), batch=2, kwargs=kw))
    untied = analyse(_workload("memprof.zoo:GPT", (16,), batch=2, kwargs={**kw, "tied": False}))
    assert tied.param_count == gpt_param_count(100, 16, 2, 8, tied=True)
    assert untied.param_count == gpt_param_count(100, 16, 2, 8, tied=False) == tied.param_count + 800
    assert tied.tied_param_count == 1 and untied.tied_param_count == 0
    assert sum(r.params for r in tied.layers) == tied.param_count
    head = next(r for r in tied.layers if r.name == "head")
    assert head.params == 0 and head.formula_params == 800  # its weight is wte's


def test_buffers_apart_from_parameters(tmp_path):
    f = tmp_path / "bn.py"
    f.write_text(
        "import torch\n"
        "def net():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, bias=False), torch.nn.BatchNorm2d(16))\n"
    )
    est = analyse(_workload(f"{f}:net", (3, 8, 8), batch=2))
    assert est.param_count == 16 * 3 * 9 + 32
    assert est.buffer_count == 16 + 16 + 1  # running mean, running var, num_batches_tracked
    assert est.breakdown[MemCategory.BUFFER] == 32 * 4 + 8


def test_seven_billion_parameters_on_the_meta_device():
    # gpt-7b's 7.3 B parameters would need 29 GB for real: the meta device holds none of it
    spec = load_model("configs/gpt-7b.toml")
    kw = spec.kwargs
    est = analyse(Workload(model=spec, batch_size=1, precision=get_precision("bf16"), optimizer="adamw"))
    assert est.param_count == gpt_param_count(
        kw["vocab_size"], kw["block_size"], kw["n_layer"], kw["n_embd"], tied=False
    )
    assert est.breakdown[MemCategory.PARAMETER] == 2 * est.param_count


def test_linear_in_batch_and_largest_batch():
    w = _workload("memprof.zoo:seed004_convstack", (3, 32, 32), batch=4)
    est = analyse(w)
    assert analytic_total_at(est, 4) == est.total_bytes
    assert analytic_total_at(est, 9) == analyse(w.with_batch(9)).total_bytes
    cap = analytic_total_at(est, 10) + est.per_sample_bytes - 1
    assert largest_batch(est, cap) == 10
    fit = formula_fit(est, Capacity(cap, "--gpu-memory"), 0.8)
    assert fit.fits and fit.max_batch == 10 and fit.recommended_batch == 8
    assert largest_batch(est, analytic_total_at(est, 1) - 1) is None
    assert recommended(1, 0.8) == 1 and recommended(None, 0.8) is None and recommended(5, 0.8) == 4


def test_estimate_without_tracer_uses_formula():
    w = _workload("memprof.zoo:mnist_mlp", (1, 28, 28), batch=16)
    res = estimate(w, capacity=Capacity(10**9, "--gpu-memory"), traced=False)
    assert res.traced is None and res.headline_source == "formula"
    assert res.headline_bytes == res.analytic.total_bytes and res.fit.source == "formula"
    assert res.trace_note == "tracing skipped (--no-trace)"
    by_bytes = estimate(w, capacity=10**9, traced=False)
    assert by_bytes.capacity.total_bytes == 10**9 and by_bytes.fit.max_batch == res.fit.max_batch


# --------------------------------------------------------------------------- errors and hooks
def test_input_shape_rejected_names_layer_and_shapes():
    w = _workload("memprof.zoo:mnist_mlp", (3, 32, 32), batch=2)
    with pytest.raises(InputShapeError) as info:
        analyse(w)
    msg = info.value.message
    assert "'1' (Linear)" in msg and "2×3072" in msg and "(*, 784)" in msg
    assert "--input-shape" in info.value.hint


def test_hooks_removed_after_success_and_failure():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    rec = analytic._CallRecorder(model, None)
    with pytest.raises(RuntimeError):
        with rec:
            model(torch.zeros(2, 5, device="meta"))
    failed = rec.failed_call()
    assert failed is not None and failed.name == "0"  # the innermost module running when it failed
    assert failed.in_shapes == ((2, 5),)
    with analytic._CallRecorder(model, None) as ok:
        model(torch.zeros(2, 4, device="meta"))
    assert [c.name for c in ok.calls] == ["0", "1", "(model)"]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_identity_outputs_need_no_new_memory(tmp_path):
    f = tmp_path / "drop.py"
    f.write_text(
        "import torch\n"
        "def net():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Identity(),\n"
        "                               torch.nn.Linear(16, 4))\n"
    )
    train = analyse(_workload(f"{f}:net", (8,), batch=2))
    assert [r.inplace for r in train.layers] == [False, False, True, False]  # Dropout makes a new tensor in train
    assert train.breakdown[MemCategory.ACTIVATION] == 4 * 2 * (16 + 16 + 4)
    ev = analyse(_workload(f"{f}:net", (8,), batch=2, mode="eval"))
    assert [r.inplace for r in ev.layers] == [False, True, True, False]  # ... and returns its input in eval
    assert ev.breakdown[MemCategory.ACTIVATION] == 4 * 2 * (8 + 16)  # the largest layer's input + output
