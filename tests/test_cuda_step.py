"""What a CUDA step adds around its tensors, per target: cuBLAS workspaces, allocator settings, the context."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from memprof.cli import app
from memprof.engine import catalog, overheads
from memprof.engine.loading import InputSpec, ModelSpec
from memprof.engine.trace import trace_step
from memprof.engine.workload import Workload
from memprof.results import CudaTarget
from memprof.zoo import mnist_mlp

MIB = 1024**2
DEFAULT_WS = 8 * MIB + 128 * 1024  # :4096:2:16:8


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("CUBLAS_WORKSPACE_CONFIG", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "MEMPROF_CUDA_CONTEXT_MIB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(catalog, "_local_device", lambda: None)


def mnist(batch: int = 64) -> Workload:
    spec = ModelSpec("mnist", "mnist", mnist_mlp, inputs=InputSpec(shapes=[(1, 28, 28)], dtype="float"))
    return Workload(spec, batch_size=batch, optimizer="adam")


def target(arch: str, **changes) -> CudaTarget:
    return dataclasses.replace(catalog.resolve_target(gpu_arch=arch), **changes)


# --------------------------------------------------------------------------- cuBLAS
@pytest.mark.parametrize(
    "arch, version, per_handle",
    [
        ("sm80", (2, 14), DEFAULT_WS),
        ("sm86", (2, 14), DEFAULT_WS),
        ("sm89", (2, 14), DEFAULT_WS),
        ("sm90", (2, 4), 32 * MIB),  # Hopper: 32 MiB since torch 2.0
        ("sm100", (2, 11), DEFAULT_WS),  # Blackwell: 32 MiB only from torch 2.12
        ("sm100", (2, 12), 32 * MIB),
        ("sm120", (2, 14), 32 * MIB),
        ("sm110", (2, 13), DEFAULT_WS),
        ("sm110", (2, 14), 32 * MIB),
    ],
)
def test_cublas_workspace_by_architecture_and_release(monkeypatch, arch, version, per_handle):
    monkeypatch.setattr(overheads, "torch_version", lambda: version)
    size, why = overheads.cublas_workspace(target(arch), env={})
    assert size == per_handle, why


def test_cublas_workspace_config_is_parsed_as_pytorch_parses_it():
    t = target("sm80")
    assert overheads.cublas_workspace(t, env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})[0] == 32 * MIB
    assert overheads.cublas_workspace(t, env={"CUBLAS_WORKSPACE_CONFIG": ":16:8"})[0] == 128 * 1024
    size, why = overheads.cublas_workspace(t, env={"CUBLAS_WORKSPACE_CONFIG": "4096:8"})
    assert size == DEFAULT_WS and "does not parse" in why and "leading colon" in why


def test_trace_uses_the_target_workspace_and_says_so(monkeypatch):
    monkeypatch.setattr(overheads, "torch_version", lambda: (2, 14))  # cuBLASLt shares the workspace
    a100 = trace_step(mnist(), target="cuda", cuda_target=target("sm80"))
    h100 = trace_step(mnist(), target="cuda", cuda_target=target("sm90"))
    assert a100.cublas_workspace_bytes == 2 * DEFAULT_WS and h100.cublas_workspace_bytes == 2 * 32 * MIB
    assert h100.peak_bytes - a100.peak_bytes == 2 * (32 * MIB - DEFAULT_WS)
    [entry] = [m for m in a100.modelled if m.what == "cuBLAS workspace"]
    assert entry.bytes == 2 * DEFAULT_WS and "CublasHandlePool.cpp" in entry.source and not entry.verified
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "4096:8")
    r = trace_step(mnist(), target="cuda", cuda_target=target("sm80"))
    assert any("does not parse" in n for n in r.notes)


def test_separate_cublaslt_workspace_before_unified_workspaces(monkeypatch):
    monkeypatch.setattr(overheads, "torch_version", lambda: (2, 14))
    unified = trace_step(mnist(), target="cuda", cuda_target=target("sm80"))
    assert not any(m.what == "cuBLASLt workspace" for m in unified.modelled)
    monkeypatch.setenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "0")
    separate = trace_step(mnist(), target="cuda", cuda_target=target("sm80"))
    # nn.Linear with a bias: addmm through cuBLASLt, on the main thread (its backward uses mm)
    assert separate.cublas_workspace_bytes - unified.cublas_workspace_bytes == 1024 * 1024
    assert any("cuBLASLt workspace 1 MiB per thread" in n for n in separate.notes)
    monkeypatch.delenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE")
    monkeypatch.setattr(overheads, "torch_version", lambda: (2, 6))  # before unified workspaces
    older = trace_step(mnist(), target="cuda", cuda_target=target("sm80"))
    assert older.cublas_workspace_bytes == separate.cublas_workspace_bytes
    # torch 2.11 on an H200 measured the separate 1 MiB (mnist_mlp: 66.0 MiB allocated, 65.0 predicted before)
    monkeypatch.setattr(overheads, "torch_version", lambda: (2, 11))
    measured = trace_step(mnist(), target="cuda", cuda_target=target("sm90"))
    assert any(m.what == "cuBLASLt workspace" and m.bytes == 1024 * 1024 for m in measured.modelled)


# --------------------------------------------------------------------------- allocator settings
def test_expandable_segments_change_the_reserved_prediction(monkeypatch):
    from memprof.cli.common import build_workload

    w = build_workload("resnet18", batch_size=5, input_shape=["3,128,128"], optimizer="adam")
    plain = trace_step(w, target="cuda", cuda_target=target("sm80"))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    grown = trace_step(w, target="cuda", cuda_target=catalog.resolve_target(gpu_arch="sm80"))
    assert grown.cuda_target.alloc_conf == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    assert grown.predicted_reserved_bytes != plain.predicted_reserved_bytes
    assert grown.predicted_reserved_bytes % (2 * MIB) == 0  # whole pages
    assert any("expandable_segments" in n for n in grown.notes)


def test_cuda_malloc_async_refuses_reserved_and_nvml():
    r = trace_step(
        mnist(), target="cuda", cuda_target=target("sm80", alloc_conf="PYTORCH_ALLOC_CONF=backend:cudaMallocAsync")
    )
    assert r.predicted_reserved_bytes is None and r.predicted_nvml_bytes is None
    assert any("cudaMallocAsync" in n and "cannot be replayed" in n for n in r.notes)


def test_estimate_fits_by_allocated_under_cuda_malloc_async(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    args = ["estimate", "memprof.zoo:mnist_mlp", "-i", "1,28,28", "-b", "16", "--gpu", "t4", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["fit"]["metric"] == "allocated" and doc["traced"]["predicted_reserved_bytes"] is None


def test_bad_allocator_settings_fail_like_pytorch(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:8")
    res = CliRunner().invoke(app, ["estimate", "memprof.zoo:mnist_mlp", "-i", "1,28,28"])
    assert (
        res.exit_code == 2 and "max_split_size_mb too small" in res.stderr and "PYTORCH_CUDA_ALLOC_CONF" in res.stderr
    )


def test_near_the_capacity_the_replay_says_it_runs_out():
    w = mnist(64)
    free = trace_step(w, target="cuda", cuda_target=target("sm80"))
    tight = trace_step(w, target="cuda", cuda_target=target("sm80", capacity_bytes=free.cuda_context_bytes + MIB))
    assert any(n.startswith("out of memory in a real run") for n in tight.notes)
    roomy = trace_step(w, target="cuda", cuda_target=target("sm80", capacity_bytes=10 * 1024 * MIB))
    assert not any("out of memory" in n for n in roomy.notes)
    assert roomy.predicted_reserved_bytes == free.predicted_reserved_bytes


# --------------------------------------------------------------------------- CUDA context
def test_context_default_catalog_env_and_local_measurement(monkeypatch):
    t = target("sm80")
    assert overheads.cuda_context(t)[0] == 512 * MIB
    ada = catalog.resolve_target("rtx-6000-ada")
    size, why = overheads.cuda_context(ada)
    assert size == 426 * MIB and "RTX 6000 Ada" in why
    monkeypatch.setenv("MEMPROF_CUDA_CONTEXT_MIB", "300")
    assert overheads.cuda_context(ada)[0] == 300 * MIB
    monkeypatch.delenv("MEMPROF_CUDA_CONTEXT_MIB")
    monkeypatch.setattr(overheads, "measure_local_context", lambda: 350 * MIB)
    local = dataclasses.replace(t, source="local GPU 0 (NVIDIA A100-SXM4-80GB)")
    size, why = overheads.cuda_context(local)
    assert size == 350 * MIB and why.startswith("measured on the local GPU")
    r = trace_step(mnist(), target="cuda", cuda_target=local)
    assert r.cuda_context_bytes == 350 * MIB and r.predicted_nvml_bytes == r.predicted_reserved_bytes + 350 * MIB


@pytest.mark.slow  # a child process imports torch
def test_context_measurement_degrades_without_a_gpu():
    overheads._MEASURED.clear()
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("has a GPU")
        assert overheads.measure_local_context(timeout_s=60) is None
    finally:
        overheads._MEASURED.clear()
