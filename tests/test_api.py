"""The Python API: the same results the CLI renders, from a reference or a live nn.Module."""

from __future__ import annotations

import pytest
import torch

import memprof
from memprof import zoo
from memprof.engine.measure import measure_cpu_step
from memprof.errors import UsageError

MiB = 2**20


def test_public_names():
    assert set(memprof.__all__) >= {"estimate", "find_batch", "compare", "profile", "MemprofError", "__version__"}
    for name in ("estimate", "find_batch", "compare", "profile"):
        assert "Example::" in getattr(memprof, name).__doc__


def test_estimate_of_a_live_module_matches_its_reference_and_leaves_it_alone():
    model = zoo.mnist_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    live = memprof.estimate(model, batch_size=64, input_shape=(1, 28, 28), gpu_memory="64MiB", use_nvml=False)
    ref = memprof.estimate(
        "memprof.zoo:mnist_mlp", batch_size=64, input_shape=(1, 28, 28), gpu_memory=64 * MiB, use_nvml=False
    )
    assert live.analytic.param_count == 101_770  # the seeds' MNIST MLP
    assert live.headline_bytes == ref.headline_bytes and live.headline_source == "traced"
    assert live.fit.max_batch == ref.fit.max_batch and live.fit.recommended_batch == ref.fit.recommended_batch
    assert live.workload["model"] == "Sequential"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_live_module_traces_as_a_real_cpu_step_measures():
    from memprof.commands.workload import make_workload
    from memprof.engine.trace import trace_step

    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    workload = make_workload(model, batch_size=16)
    predicted = trace_step(workload, target="cpu").peak_bytes
    measured = measure_cpu_step(workload)["peak_bytes"]
    assert abs(predicted - measured) / measured < 0.001


def test_estimate_on_the_cpu_verified_by_a_real_step():
    from memprof.commands.workload import make_workload
    from memprof.errors import NoGPUError

    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    r = memprof.estimate(model, batch_size=16, device="cpu", verify=True, memory_limit="1MiB")
    assert r.target == "cpu" and r.traced.target == "cpu" and r.verification is not None
    (figure,) = r.verification.figures
    measured = measure_cpu_step(make_workload(model, batch_size=16))["peak_bytes"]
    assert figure.measured_bytes == measured and figure.predicted_bytes == r.traced.peak_bytes
    assert abs(figure.error_pct) < 0.1
    assert r.fit is not None and r.fit.capacity.total_bytes == 2**20 and r.fit.max_batch > 16
    with pytest.raises(UsageError, match="`gpu_memory` is for `device` cuda"):
        memprof.estimate(model, batch_size=16, device="cpu", gpu_memory="8GiB")
    if not torch.cuda.is_available():
        with pytest.raises(NoGPUError, match="`verify` runs a real step on `device` cuda"):
            memprof.estimate(model, batch_size=16, verify=True)


def test_find_batch_and_compare_on_the_cpu():
    found = memprof.find_batch("memprof.zoo:mnist_mlp", device="cpu", memory_limit="8MiB", input_shape=(1, 28, 28))
    assert found.status == "exact" and found.recommended_batch == int(found.largest_batch * 0.8)
    result = memprof.compare(
        "memprof.zoo:mnist_mlp", input_shape=(1, 28, 28), dtypes=["amp-bf16"], device="cpu", memory_limit="8MiB"
    )
    assert [r.label for r in result.rows] == ["fp32 (baseline)", "amp-bf16"]
    # the compare row and find-batch agree on the largest fp32 batch under the same cap (both count storages)
    assert result.rows[0].fit.max_batch == found.largest_batch


def test_errors_name_parameters_not_flags():
    with pytest.raises(UsageError) as info:
        memprof.estimate("resnet18", batch_size=0)
    assert info.value.message.startswith("`batch_size` must be a positive integer")
    with pytest.raises(UsageError, match="`headroom`"):
        memprof.estimate("memprof.zoo:mnist_mlp", input_shape=(1, 28, 28), headroom=1.5)
    with pytest.raises(UsageError, match="`input_shape`"):
        memprof.estimate("memprof.zoo:mnist_mlp", input_shape=(1, 0, 28))


def test_profile_runs_a_script(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import torch\nx = torch.zeros(1024, 1024)\ny = x + 1\n")
    result = memprof.profile(script, device="cpu")
    assert result.outcome.status == "ok" and result.peak.bytes >= 2 * 4 * 1024 * 1024


def test_a_live_module_with_buffers_is_traced_not_degraded():
    """BatchNorm's running statistics are buffers: the copies are made fresh in the tracer's fake mode."""
    import torchvision

    model = torchvision.models.resnet18()
    live = memprof.estimate(model, batch_size=2, input_shape=(3, 64, 64), use_nvml=False)
    ref = memprof.estimate("resnet18", batch_size=2, input_shape=(3, 64, 64), use_nvml=False)
    assert live.headline_source == "traced" and live.trace_note is None
    assert live.headline_bytes == ref.headline_bytes
    assert model.bn1.running_mean.abs().sum() == 0  # the live module was not run
