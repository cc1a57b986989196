"""`memprof estimate`: rendering (golden files from hand-built results), --json, exit codes, errors."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from conftest import assert_golden
from rich.console import Console
from typer.testing import CliRunner

from memprof.cli import app
from memprof.render.estimate import render_estimate, select_layers
from memprof.results import (
    AnalyticEstimate,
    Capacity,
    EstimateResult,
    FitSummary,
    FlopCount,
    LayerRow,
    MemCategory,
    MethodTotal,
    ModelledBytes,
    ModuleFlops,
    StepTime,
    UncountedOp,
)
from memprof.units import GiB, MiB

runner = CliRunner()

# --------------------------------------------------------------------------- hand-built results
_LAYERS = (
    LayerRow("0", "Conv2d", ((8, 64, 32, 32),), 1_792, 1_792, 2 * MiB),
    LayerRow("1", "ReLU", ((8, 64, 32, 32),), 0, 0, 0, inplace=True),
    LayerRow("2", "Conv2d", ((8, 64, 32, 32),), 36_928, 36_928, 2 * MiB),
    LayerRow("3", "ReLU", ((8, 64, 32, 32),), 0, 0, 0, inplace=True),
    LayerRow("4", "MaxPool2d", ((8, 64, 16, 16),), 0, 0, MiB // 2),
    LayerRow("5", "Conv2d", ((8, 128, 16, 16),), 73_856, 73_856, MiB),
)
_WORKLOAD = {
    "model": "seed004_convstack",
    "batch_size": 8,
    "input": "3×32×32",
    "dtype": "fp32",
    "optimizer": "adam",
    "mode": "train",
    "checkpointing": "none",
    "inplace_relu": False,
}


def _analytic(**changes) -> AnalyticEstimate:
    breakdown = {
        MemCategory.PARAMETER: 450_304,
        MemCategory.BUFFER: 0,
        MemCategory.GRADIENT: 450_304,
        MemCategory.OPTIMIZER_STATE: 900_608,
        MemCategory.ACTIVATION: 5_767_168,
        MemCategory.INPUT: 98_304,
    }
    fields = dict(
        batch_size=8,
        param_count=112_576,
        trainable_param_count=112_576,
        tied_param_count=0,
        buffer_count=0,
        bytes_per_element=4,
        activation_bytes_per_element=4,
        optimizer_states=2,
        module_output_elements=1_441_792,
        breakdown=breakdown,
        total_bytes=sum(breakdown.values()),
        per_sample_bytes=733_184,
        fixed_bytes=1_801_216,
        modelsize_param_bytes=450_304,
        modelsize_forward_bytes=5_767_168,
        modelsize_backward_bytes=11_534_336,
        methods=(
            MethodTotal(
                "formula (four-part rule)",
                sum(breakdown.values()),
                5_767_168,
                "params + grads + optimizer state + outputs + input",
            ),
            MethodTotal("modelsize ×2", 11_984_640, 11_534_336, "params + outputs ×2 (in-place ReLU skipped)"),
            MethodTotal("accelerate-style", 1_801_216, None, "4 × model size (Adam), no activations"),
        ),
        layers=_LAYERS,
        formula_checked=3,
        formula_mismatches=(),
        notes=(),
        seconds=0.01,
    )
    fields.update(changes)
    return AnalyticEstimate(**fields)


def _result(capacity: Capacity | None = None, fit: FitSummary | None = None, traced=None, **changes) -> EstimateResult:
    a = _analytic()
    fields = dict(
        workload=_WORKLOAD,
        analytic=a,
        traced=traced,
        trace_note=None if traced is not None else "tracing skipped (--no-trace)",
        capacity=capacity,
        capacity_note=None if capacity else "NVML sees no GPU",
        fit=fit,
        headline_bytes=traced.peak_bytes if traced is not None else a.total_bytes,
        headline_source="traced" if traced is not None else "formula",
    )
    fields.update(changes)
    return EstimateResult(**fields)


def _render(result: EstimateResult, layers: int | None = 10) -> str:
    buf = io.StringIO()
    render_estimate(result, Console(file=buf, width=100, color_system=None, highlight=False), layers=layers)
    return buf.getvalue()


def test_golden_formula_with_fit():
    cap = Capacity(24 * GiB, "--gpu-memory")
    fit = FitSummary(cap, "formula", "formula total", 7_666_688, True, 35_100, 28_080, 0.8, 733_184, 1_801_216)
    assert_golden("estimate_formula_fit.txt", _render(_result(cap, fit)))


def test_golden_no_capacity_all_layers():
    assert_golden("estimate_no_capacity.txt", _render(_result(), layers=None))


def test_golden_does_not_fit_top_layers():
    cap = Capacity(6 * MiB, "--gpu-memory")
    fit = FitSummary(cap, "formula", "formula total", 7_666_688, False, 6, 4, 0.8, 733_184, 1_801_216)
    assert_golden("estimate_does_not_fit.txt", _render(_result(cap, fit), layers=2))


def _traced(**changes) -> SimpleNamespace:
    fields: dict = dict(
        peak_bytes=6_500_000,
        peak_phase="backward",
        peak_module="2",
        predicted_reserved_bytes=20 * MiB,
        predicted_nvml_bytes=520 * MiB,
        notes=("cuDNN workspace not modelled",),
        breakdown_at_peak={
            MemCategory.PARAMETER: 450_304,
            MemCategory.GRADIENT: 300_000,
            MemCategory.ACTIVATION: 5_651_392,
            MemCategory.INPUT: 98_304,
        },
    )
    fields.update(changes)
    return SimpleNamespace(**fields)


def test_golden_traced_headline():
    traced = _traced()
    cap = Capacity(80 * GiB, "NVML: NVIDIA H100 80GB HBM3 (GPU 0)", "NVIDIA H100 80GB HBM3")
    fit = FitSummary(cap, "traced", "reserved", 20 * MiB, True, 9_000, 7_200, 0.8, 9_000_000, 500_000_000)
    assert_golden("estimate_traced.txt", _render(_result(cap, fit, traced)))


def test_golden_real_run_with_modelled_parts():
    # a step that reads tensor values ran for real on the CPU; its CUDA view adds modelled workspaces
    traced = SimpleNamespace(
        peak_bytes=6_500_000 + 2 * 8_519_680,
        peak_phase="forward",
        peak_module=None,
        predicted_reserved_bytes=40 * MiB,
        predicted_nvml_bytes=552 * MiB,
        notes=(),
        method="real CPU run",
        method_reason="aten.nonzero.default at net.py:12: sel = h[h.sum(-1) > 0]",
        modelled=(
            ModelledBytes("cuBLAS workspace", 2 * 8_519_680, "CublasHandlePool.cpp", verified=True),
            ModelledBytes("cuDNN RNN reserve space", 1_048_576, "memprof model", verified=False),
        ),
        breakdown_at_peak={
            MemCategory.PARAMETER: 450_304,
            MemCategory.ACTIVATION: 5_951_392,
            MemCategory.INPUT: 98_304,
            MemCategory.CUDA_OVERHEAD: 2 * 8_519_680,
        },
    )
    text = _render(_result(None, None, traced), layers=0)
    flat = " ".join(text.split())
    expected = (
        "real CPU run + 17.2 MiB modelled: cuBLAS workspace 16.2 MiB, cuDNN RNN reserve space 1.0 MiB (unverified)"
    )
    assert expected in flat
    assert "aten.nonzero.default at net.py:12: sel = h[h.sum(-1) > 0]" in flat
    assert_golden("estimate_real_run.txt", text)


#: seed 004's conv stack at 8x3x32x32: 2*H*W*C_in*C_out*K^2 per sample for each convolution
_CONV_FLOPS = {
    "0": 8 * 2 * 32 * 32 * 3 * 64 * 9,
    "2": 8 * 2 * 32 * 32 * 64 * 64 * 9,
    "5": 8 * 2 * 16 * 16 * 64 * 128 * 9,
}


def _flop_count() -> FlopCount:
    forward = sum(_CONV_FLOPS.values())
    backward = _CONV_FLOPS["0"] + 2 * (_CONV_FLOPS["2"] + _CONV_FLOPS["5"])  # no input gradient for layer 0
    return FlopCount(
        batch_size=8,
        forward_flops=forward,
        backward_flops=backward,
        optimizer_flops=0,
        recompute_flops=0,
        step_flops=forward + backward,
        per_sample_flops=(forward + backward) / 8,
        by_op={"aten.convolution_backward": backward, "aten.convolution": forward},
        modules=tuple(ModuleFlops(name, "Conv2d", f, f if name == "0" else 2 * f) for name, f in _CONV_FLOPS.items()),
        uncounted_ops=(
            UncountedOp("aten.max_pool2d_with_indices", 1, "other"),
            UncountedOp("aten.max_pool2d_with_indices_backward", 1, "other"),
            UncountedOp("aten.relu_", 2, "pointwise"),
            UncountedOp("aten.threshold_backward", 2, "pointwise"),
            UncountedOp("aten.zeros_like", 12, "memory"),
        ),
    )


def test_golden_compute_and_step_time():
    flops = _flop_count()
    traced = SimpleNamespace(
        peak_bytes=6_500_000,
        peak_phase="backward",
        peak_module="2",
        predicted_reserved_bytes=20 * MiB,
        predicted_nvml_bytes=520 * MiB,
        notes=(),
        breakdown_at_peak={MemCategory.PARAMETER: 450_304, MemCategory.ACTIVATION: 6_049_696},
        flops=flops,
    )
    step = StepTime(
        gpu="NVIDIA A100 40GB",
        seconds=0.000412,
        forward_seconds=0.000151,
        backward_seconds=0.000243,
        optimizer_seconds=0.000018,
        compute_bound_seconds=0.000100,
        memory_bound_seconds=0.000312,
        step_bytes=480 * MiB,
        samples_per_second=8 / 0.000412,
        tokens_per_second=None,
        peak_flops_per_s={"tf32": 156e12},
        bandwidth_bytes_per_s=1.555e12,
    )
    text = _render(_result(traced=traced, step_time=step))
    assert_golden("estimate_compute.txt", text)
    assert "934 GFLOP" not in text and "934 MFLOP" in text  # 934,281,216 FLOPs forward
    assert "model, not measured" in text
    no_gpu = _render(_result(traced=traced, step_time_note="needs a GPU (--gpu NAME)"))
    assert "step time: needs a GPU (--gpu NAME)" in no_gpu


def test_select_layers_top_and_all():
    assert [r.name for r in select_layers(_LAYERS, 2)] == ["0", "2"]
    assert [r.name for r in select_layers(_LAYERS, 4)] == ["0", "2", "5", "4"]
    assert [r.name for r in select_layers(_LAYERS, None)] == [r.name for r in _LAYERS]


# --------------------------------------------------------------------------- the command
MNIST = ["memprof.zoo:mnist_mlp", "--input-shape", "1,28,28", "--no-trace"]


@pytest.fixture
def no_gpu(monkeypatch):
    import memprof.engine.nvml as nvml

    monkeypatch.setattr(nvml, "device_info", lambda index=0: None)
    monkeypatch.setattr(nvml, "available", lambda: (False, "NVML sees no GPU"))


def test_json_only_json_with_schema(no_gpu):
    res = runner.invoke(
        app, ["estimate", *MNIST, "--batch-size", "64", "--optimizer", "sgd", "--gpu-memory", "1GiB", "--json"]
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema_version"] == 1 and doc["kind"] == "estimate"
    a = doc["analytic"]
    assert a["param_count"] == 101_770 and a["breakdown"]["parameter"] == 407_080
    assert a["breakdown"]["optimizer_state"] == 0 and isinstance(a["total_bytes"], int)
    assert doc["workload"]["batch_size"] == 64 and doc["traced"] is None
    assert doc["capacity"] == {"total_bytes": GiB, "source": "--gpu-memory", "device_name": None}
    assert doc["fit"]["fits"] is True and doc["fit"]["max_batch"] > 64
    assert doc["fit"]["recommended_batch"] == int(0.8 * doc["fit"]["max_batch"])
    assert doc["headline_source"] == "formula" and doc["headline_bytes"] == a["total_bytes"]
    assert a["layers"][1] == {
        "name": "1",
        "type": "Linear",
        "output_shapes": [[64, 128]],
        "params": 100_480,
        "formula_params": 100_480,
        "activation_bytes": 64 * 128 * 4,
        "calls": 1,
        "inplace": False,
    }


def test_text_output_without_capacity(no_gpu):
    res = runner.invoke(app, ["estimate", *MNIST])
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    assert "batch size  32" in out and "Breakdown (formula)" in out and "Parameter" in out
    assert "capacity unknown (NVML sees no GPU)" in out and "Fit: skipped, no GPU capacity known" in out
    assert "101,770" in out and "MiB" in out or "KiB" in out


def test_capacity_from_nvml(monkeypatch):
    import memprof.engine.nvml as nvml

    monkeypatch.setattr(nvml, "device_info", lambda index=0: nvml.GPUInfo(0, "Test GPU", None, 2 * GiB, 0, 2 * GiB))
    res = runner.invoke(app, ["estimate", *MNIST, "--json"])
    doc = json.loads(res.stdout)
    assert doc["capacity"]["source"] == "NVML: Test GPU (GPU 0)" and doc["capacity"]["total_bytes"] == 2 * GiB


def test_exit_codes_does_not_fit(no_gpu):
    # seed 004's stack at 682x700 needs ~343 MB at batch 1: 100 MiB fits nothing (4); 2 GiB fits 5 of 32 (1)
    stack = ["estimate", "memprof.zoo:seed004_convstack", "-i", "3,682,700", "--no-trace", "--optimizer", "sgd"]
    res = runner.invoke(app, [*stack, "--gpu-memory", "100MiB", "-b", "1"])
    assert res.exit_code == 4 and "none (not even batch 1)" in res.stdout
    res = runner.invoke(app, [*stack, "--gpu-memory", "2GiB", "--json"])
    assert res.exit_code == 1
    fit = json.loads(res.stdout)["fit"]
    assert fit["fits"] is False and fit["max_batch"] == 6 and fit["recommended_batch"] == 4


def test_layers_option(no_gpu):
    res = runner.invoke(app, ["estimate", *MNIST, "--layers", "2"])
    assert "top 2 of 4" in res.stdout
    for show_all in (["--all-layers"], ["--layers", "0"]):
        res = runner.invoke(app, ["estimate", *MNIST, *show_all])
        assert "Layers (4, in execution order)" in res.stdout


def _error(args: list[str], code: int = 2) -> str:
    res = runner.invoke(app, ["estimate", *args])
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stderr.startswith("ERROR: ") and "\nHINT: " in res.stderr
    assert res.stdout == ""
    return res.stderr


def test_error_unknown_model_suggests_names():
    assert "resnet50" in _error(["resnet5"]).split("HINT:")[1]


def test_error_missing_file_and_attribute(tmp_path):
    assert "does not exist" in _error([f"{tmp_path}/nope.py:Net"])
    f = tmp_path / "net.py"
    f.write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self, width):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(4, width)\n"
        "    def forward(self, x):\n        return self.fc(x)\n"
    )
    err = _error([f"{f}:Nett", "-i", "4"])
    assert "has no attribute 'Nett'" in err and "Net" in err.split("HINT:")[1]
    assert "constructing Net" in _error([f"{f}:Net", "-i", "4", "--no-trace"])  # width missing
    res = runner.invoke(app, ["estimate", f"{f}:Net", "-i", "4", "--model-arg", "width=3", "--no-trace", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["analytic"]["param_count"] == 15


def test_error_input_shape_rejected():
    err = _error(["memprof.zoo:mnist_mlp", "--input-shape", "3,32,32", "--no-trace", "-b", "2"])
    assert "'1' (Linear)" in err and "2×3072" in err and "784" in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["memprof.zoo:Cruncher", "--model-kwargs", "{dim: 4}"], "not valid JSON"),
        (["memprof.zoo:Cruncher", "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["memprof.zoo:Cruncher", "--dtype", "fp8"], "unknown dtype"),
        (["memprof.zoo:Cruncher", "--optimizer", "lamb"], "unknown optimizer"),
        (["memprof.zoo:Cruncher", "--gpu-memory", "lots"], "cannot read 'lots'"),
        (["memprof.zoo:Cruncher", "--gpu-memory", "24XB"], "unknown size unit"),
        (["memprof.zoo:Cruncher", "--headroom", "1.5"], "--headroom"),
        (["memprof.zoo:Cruncher", "--mode", "infer"], "--mode must be train, eval or generate"),
        (["memprof.zoo:Cruncher", "--layers", "-1"], "--layers"),
    ],
)
def test_error_bad_options(args, needle):
    assert needle in _error([*args, "--no-trace"])


def test_help_shows_defaults():
    res = runner.invoke(app, ["estimate", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for needle in (
        "[default: 32",
        "[default: fp32]",
        "[default: adam]",
        "[default: train]",
        "[default: 0.8]",
        "[default: 10]",
    ):
        assert needle in res.stdout


# --------------------------------------------------------------------------- the traced estimate beside the formula
def test_traced_estimate_is_the_headline(no_gpu):
    res = runner.invoke(app, ["estimate", "memprof.zoo:mnist_mlp", "-i", "1,28,28", "-b", "4", "--json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["headline_source"] == "traced" and doc["headline_bytes"] == doc["traced"]["peak_bytes"]
    assert doc["traced"]["target"] == "cuda" and "timeline" not in doc["traced"]
    assert doc["analytic"]["param_count"] == 101_770 and doc["fit"] is None and doc["trace_note"] is None


def test_traced_fit_drives_the_verdict(monkeypatch):
    import memprof.engine.fit as fitting
    from memprof.commands.estimate import estimate
    from memprof.engine.loading import load_model
    from memprof.engine.workload import Workload
    from memprof.results import BatchFit

    calls = []

    def fake_fit(
        workload, capacity_bytes, *, target="cuda", headroom=0.8, max_batch=None, metric=None, known=None, **_
    ):
        calls.append((workload.batch_size, capacity_bytes, target, headroom))
        # the estimate hands over its own trace at the requested batch, so the fit does not redo it
        assert list(known) == [4] and known[4].target == "cuda" and known[4].workload["batch_size"] == 4
        return BatchFit(
            capacity_bytes=capacity_bytes,
            metric="nvml",
            max_batch=50,
            recommended_batch=40,
            headroom=headroom,
            peak_at_max_bytes=900,
            peak_at_next_bytes=1100,
            slope_bytes_per_sample=10,
            intercept_bytes=400,
            traces=4,
        )

    monkeypatch.setattr(fitting, "fit_batch", fake_fit)
    spec = load_model("memprof.zoo:mnist_mlp")
    spec.inputs.shapes = [(1, 28, 28)]
    res = estimate(Workload(model=spec, batch_size=4), capacity=Capacity(GiB, "--gpu-memory"), headroom=0.8)
    assert calls == [(4, GiB, "cuda", 0.8)]
    fit = res.fit
    assert fit.source == "traced" and fit.metric == "nvml" and fit.max_batch == 50 and fit.recommended_batch == 40
    assert fit.estimate_bytes == res.traced.predicted_nvml_bytes and fit.fits
    assert fit.per_sample_bytes == 10 and fit.fixed_bytes == 400


def test_tracer_failure_falls_back_to_formula(monkeypatch):
    import memprof.engine.trace as trace
    from memprof.commands.estimate import estimate
    from memprof.engine.loading import load_model
    from memprof.engine.workload import Workload
    from memprof.errors import TraceError

    def broken(*args, **kwargs):
        raise TraceError("an op the tracer cannot run", "use --no-trace")

    monkeypatch.setattr(trace, "trace_step", broken)
    spec = load_model("memprof.zoo:mnist_mlp")
    spec.inputs.shapes = [(1, 28, 28)]
    res = estimate(Workload(model=spec, batch_size=4), capacity=Capacity(GiB, "--gpu-memory"))
    assert res.traced is None and res.headline_source == "formula" and res.fit.source == "formula"
    assert res.trace_note == "tracing failed: an op the tracer cannot run (formula only)"


def test_unexpected_tracer_exception_falls_back_too(monkeypatch):
    import memprof.engine.trace as trace
    from memprof.commands.estimate import estimate
    from memprof.engine.loading import load_model
    from memprof.engine.workload import Workload

    def buggy(*args, **kwargs):
        raise RuntimeError("aten::foo has no fake implementation\nmore detail")

    monkeypatch.setattr(trace, "trace_step", buggy)
    spec = load_model("memprof.zoo:mnist_mlp")
    spec.inputs.shapes = [(1, 28, 28)]
    res = estimate(Workload(model=spec, batch_size=4))
    assert res.traced is None and res.headline_source == "formula"
    assert res.trace_note == "tracing failed: RuntimeError: aten::foo has no fake implementation (formula only)"


# --------------------------------------------------------------------------- --device cpu, --verify
CONV = ["memprof.zoo:seed004_convstack", "--batch-size", "4", "--input-shape", "3,32,32", "--optimizer", "adam"]


TINY_GPT = '{"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}'


@pytest.mark.parametrize(
    "args, options",
    [
        (CONV, dict(batch_size=4, input_shape=["3,32,32"], optimizer="adam")),  # oneDNN convolutions
        (
            ["memprof.zoo:GPT", "--model-kwargs", TINY_GPT, "-i", "16", "-b", "4", "--optimizer", "adamw"],
            dict(model_kwargs=TINY_GPT, input_shape=["16"], batch_size=4, optimizer="adamw"),
        ),
    ],
    ids=["conv-stack", "gpt"],
)
def test_cpu_estimate_matches_an_independent_real_cpu_step(args, options):
    """`estimate --device cpu --json` is the trace validate_cpu.py checks: within 1 % of a real CPU step."""
    from memprof.cli.common import build_workload
    from memprof.engine.measure import measure_cpu_step

    res = runner.invoke(app, ["estimate", *args, "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["target"] == "cpu" and doc["headline_source"] == "traced" and doc["verification"] is None
    predicted = doc["traced"]["peak_bytes"]
    assert doc["traced"]["target"] == "cpu" and doc["headline_bytes"] == predicted
    workload = build_workload(args[0], **options)
    measured = measure_cpu_step(workload)["peak_bytes"]  # torch.profiler's memory events of two real steps
    assert abs(predicted - measured) / measured <= 0.01, (predicted, measured)
    assert doc["capacity"] is None and doc["capacity_note"] == "no --memory-limit given"


def test_cpu_verify_prints_and_carries_predicted_and_measured():
    res = runner.invoke(app, ["estimate", *CONV, "--device", "cpu", "--verify", "--memory-limit", "64MiB", "--json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    v = doc["verification"]
    assert v["device"] == "cpu" and v["steps"] == 2 and v["predicted_source"] == "traced" and not v["oom"]
    (fig,) = v["figures"]
    assert fig["metric"] == "allocated" and fig["predicted_bytes"] == doc["traced"]["peak_bytes"]
    assert fig["measured_bytes"] > 0 and abs(fig["error_pct"]) <= 1.0
    assert fig["error_pct"] == pytest.approx(
        100 * (fig["predicted_bytes"] - fig["measured_bytes"]) / fig["measured_bytes"]
    )
    assert doc["capacity"]["source"] == "--memory-limit" and doc["fit"]["max_batch"] > 4
    text = runner.invoke(app, ["estimate", "memprof.zoo:mnist_mlp", "--device", "cpu", "--verify"])
    assert text.exit_code == 0, text.stderr
    assert "Verified: 2 real training steps on cpu" in text.stdout and "peak live bytes" in text.stdout
    assert (
        "(traced for the CPU)" in text.stdout and "Fit: skipped, no capacity given; pass --memory-limit" in text.stdout
    )
    assert "profiler_start" not in text.stderr and "ERROR" not in text.stderr  # kineto's chatter stays hidden


def test_verify_on_cuda_without_a_gpu_says_so_and_exits_3():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    res = runner.invoke(app, ["estimate", *CONV, "--verify"])
    assert res.exit_code == 3
    assert res.stderr.splitlines() == [
        "ERROR: --verify runs a real step on --device cuda, and no CUDA GPU is available",
        "HINT: verify on the CPU instead: --device cpu --verify",
    ]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--device", "tpu"], "unknown --device 'tpu'"),
        (["--device", "cpu", "--gpu-memory", "8GiB"], "--gpu-memory is for --device cuda"),
        (["--device", "cpu", "--gpu", "a100-80gb"], "--gpu is for --device cuda"),
        (["--memory-limit", "8GiB"], "--memory-limit is for --device cpu"),
        (["--device", "cpu", "--verify", "--strategy", "ddp", "--world-size", "2"], "--verify runs one process's"),
    ],
)
def test_device_errors(args, needle):
    res = runner.invoke(app, ["estimate", *MNIST, *args])
    assert res.exit_code == 2 and needle in res.stderr and "HINT:" in res.stderr


def test_verify_refuses_a_data_parallel_workload_before_tracing():
    import memprof
    from memprof.errors import UsageError

    with pytest.raises(UsageError, match="`verify` runs one process's step"):
        memprof.estimate("memprof.zoo:mnist_mlp", batch_size=4, device="cpu", verify=True, strategy="ddp", world_size=2)


def test_golden_verified_on_cuda():
    """The --verify section as a CUDA run prints it (hand-built: this machine may have no GPU)."""
    from memprof.results import Verification, VerifiedFigure

    traced = _traced(notes=())
    verification = Verification(
        "cuda:0 NVIDIA H100 80GB HBM3",
        2,
        "traced",
        (
            VerifiedFigure("allocated", "torch.cuda.max_memory_allocated()", 6_500_000, 6_512_640, -0.194),
            VerifiedFigure("reserved", "torch.cuda.max_memory_reserved()", 20 * MiB, 20 * MiB, 0.0),
            VerifiedFigure("nvml", "NVML process used memory", 520 * MiB, 530 * MiB, -1.887),
        ),
        3.4,
    )
    assert_golden("estimate_verified_cuda.txt", _render(_result(traced=traced, verification=verification)))


@pytest.mark.gpu
def test_verify_on_cuda_measures_allocated_reserved_and_nvml():
    res = runner.invoke(app, ["estimate", *CONV, "--verify", "--json"])
    assert res.exit_code == 0, res.stderr
    v = json.loads(res.stdout)["verification"]
    assert v["device"].startswith("cuda:0") and not v["oom"]
    figures = {f["metric"]: f for f in v["figures"]}
    assert list(figures) == ["allocated", "reserved", "nvml"]
    assert abs(figures["allocated"]["error_pct"]) <= 1.0 and figures["reserved"]["measured_bytes"] > 0
