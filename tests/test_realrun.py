"""Steps that read tensor values: the real CPU run that replaces the trace, its CUDA view, detection by name."""

from __future__ import annotations

import pytest
import torch

from memprof.commands.workload import make_workload
from memprof.engine import trace as trace_mod
from memprof.engine.fit import fit_batch
from memprof.engine.loading import DETECTION_OBJECTS, load_model
from memprof.engine.measure import measure_cpu_step
from memprof.engine.trace import trace_step
from memprof.engine.workload import PRECISIONS
from memprof.errors import DataDependentError, ModelLoadError
from memprof.results import METHOD_REAL, MemCategory

#: 0-dim tensors PyTorch makes for Python scalars inside C++ (no dispatch mode sees them)
SCALAR_SLACK = 64


def workload(name: str, batch: int = 16, **options):
    dim = options.get("dim", 256)
    return make_workload(f"memprof.zoo:{name}", batch_size=batch, input_shape=(dim,), model_kwargs=options)


@pytest.mark.parametrize("name", ["ItemLossMLP", "MaskedSelectMLP"])
def test_data_dependent_step_runs_for_real_and_matches_a_measured_step(name):
    w = workload(name, dim=64, hidden=128)
    messages: list[str] = []
    result = trace_step(w, target="cpu", progress=messages.append)
    assert result.method == METHOD_REAL
    assert result.method_reason is not None and "zoo.py" in result.method_reason
    assert abs(result.peak_bytes - measure_cpu_step(w)["peak_bytes"]) <= SCALAR_SLACK
    # before the run at batch 16: what batch 1 cost and what batch 16 should
    assert any("batch 16 should take" in m for m in messages)


def test_item_in_the_loss_is_named_with_its_line():
    with pytest.raises(DataDependentError) as info:
        trace_step(workload("ItemLossMLP", 4, dim=16, hidden=32), target="cpu", fallback=False)
    err = info.value
    assert err.op is not None and "item()" in err.op
    assert err.where is not None and "loss.item() > 100.0" in err.where
    assert "zoo.py" in err.message


def test_cuda_view_of_a_real_run_rounds_and_adds_workspaces():
    w = workload("MaskedSelectMLP", 8, dim=64, hidden=128)
    cpu = trace_step(w, target="cpu")
    cuda = trace_step(w, target="cuda")
    assert cuda.method == METHOD_REAL
    assert cuda.predicted_reserved_bytes is not None and cuda.predicted_reserved_bytes >= cuda.peak_bytes
    assert cuda.cublas_workspace_bytes  # a matmul ran: the handles' workspaces are in the CUDA view
    # 512-byte rounding only adds; the foreach optimizer (CUDA's default) adds temporaries
    assert cuda.peak_bytes - cuda.cublas_workspace_bytes >= cpu.peak_bytes - 64 * 1024


def test_real_run_refused_when_it_would_not_fit_in_ram(monkeypatch):
    monkeypatch.setattr(trace_mod, "_available_ram", lambda: 1024 * 1024)
    trace_mod._REAL_RUNS.clear()
    with pytest.raises(DataDependentError) as info:
        trace_step(workload("MaskedSelectMLP", 512, dim=64, hidden=2048), target="cpu")
    assert "RAM" in info.value.message and "nonzero" in info.value.message
    assert info.value.hint is not None and "`batch_size`" in info.value.hint


def test_fit_extrapolates_batches_a_real_run_cannot_hold(monkeypatch):
    w = workload("MaskedSelectMLP", 4, dim=64, hidden=128)
    real = trace_mod._available_ram()
    assert real is not None
    # allow the batches near the start, refuse the large ones the search would try
    monkeypatch.setattr(trace_mod, "_available_ram", lambda: 8 * 1024 * 1024)
    trace_mod._REAL_RUNS.clear()
    fit = fit_batch(w, 64 * 1024 * 1024, target="cpu")
    assert fit.max_batch is not None and fit.max_batch > 100
    assert not fit.exact and any("extrapolated" in n for n in fit.notes)


@pytest.mark.slow
def test_moe_routing_runs_for_real():
    w = make_workload(
        "memprof.zoo:TopOneMoE",
        batch_size=2,
        input_shape=(16,),
        model_kwargs=dict(vocab_size=100, dim=32, hidden=64, experts=3, layers=1),
    )
    result = trace_step(w, target="cpu")
    assert result.method == METHOD_REAL and "nonzero" in (result.method_reason or "")
    assert abs(result.peak_bytes - measure_cpu_step(w)["peak_bytes"]) <= SCALAR_SLACK


# --------------------------------------------------------------------------- detection by name
@pytest.mark.parametrize(
    "name, keys",
    [
        ("fasterrcnn_resnet50_fpn", {"boxes", "labels"}),
        ("maskrcnn_resnet50_fpn", {"boxes", "labels", "masks"}),
        ("keypointrcnn_resnet50_fpn", {"boxes", "labels", "keypoints"}),
        ("retinanet_resnet50_fpn", {"boxes", "labels"}),
        ("ssdlite320_mobilenet_v3_large", {"boxes", "labels"}),
    ],
)
def test_detection_models_load_by_name_with_box_targets(name, keys):
    spec = load_model(name)
    spec.inputs.shapes = [(3, 60, 80)]  # --input-shape changes the images the batch is made of
    (images, targets), kwargs, target = spec.make_batch(3, "cpu", PRECISIONS["fp32"])
    assert target is None and not kwargs and len(images) == len(targets) == 3
    assert images[0].shape == (3, 60, 80)
    for t in targets:
        assert set(t) == keys
        boxes = t["boxes"]
        assert boxes.shape == (DETECTION_OBJECTS, 4)
        assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and float(boxes[:, 2].max()) <= 80
        if "masks" in t:
            assert t["masks"].shape == (DETECTION_OBJECTS, 60, 80) and t["masks"].dtype == torch.uint8
        if "keypoints" in t:
            assert t["keypoints"].shape == (DETECTION_OBJECTS, 17, 3)
    assert spec.loss_hook is not None
    assert float(spec.loss_hook({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, None)) == 3.0


def test_quantized_models_are_still_refused():
    with pytest.raises(ModelLoadError):
        load_model("quantized_resnet18")


@pytest.mark.slow
def test_detection_by_name_estimates_within_target():
    w = make_workload(
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        batch_size=1,
        input_shape=(3, 160, 160),
        model_kwargs={"min_size": 128, "max_size": 128},
        optimizer="sgd",
    )
    result = trace_step(w, target="cpu")
    assert result.method == METHOD_REAL
    measured = measure_cpu_step(w)["peak_bytes"]
    assert abs(result.peak_bytes - measured) <= 0.005 * measured
    assert result.totals[MemCategory.INPUT] >= 3 * 160 * 160 * 4


@pytest.mark.slow
def test_cli_says_which_method_and_what_it_costs_first(monkeypatch):
    import json

    from typer.testing import CliRunner

    from memprof.cli import app
    from memprof.engine import nvml

    monkeypatch.setattr(nvml, "device_info", lambda index=0: None)
    model = ["estimate", "memprof.zoo:MaskedSelectMLP", "--input-shape", "32", "-b", "4"]
    args = [*model, "--model-kwargs", '{"dim": 32, "hidden": 64}', "--gpu-memory", "1GiB", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.stderr
    traced = json.loads(res.stdout)["traced"]
    assert traced["method"] == METHOD_REAL and "nonzero" in traced["method_reason"]
    assert traced["modelled_bytes"] == sum(m["bytes"] for m in traced["modelled"])
    assert "memprof: the step reads tensor values" in res.stderr and "batch 4 should take" in res.stderr
