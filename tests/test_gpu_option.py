"""--gpu NAME / --gpu-arch on estimate, compare and find-batch; the catalog in `memprof gpus`."""

from __future__ import annotations

import io
import json

import pytest
from conftest import assert_golden
from rich.console import Console
from typer.testing import CliRunner

from memprof.cli import app
from memprof.commands import gpus as gpus_mod
from memprof.engine import catalog, nvml
from memprof.results import BatchTrial, TorchCudaView, TorchDevice

runner = CliRunner()
GIB = 1024**3
MIB = 1024**2
MNIST = ["memprof.zoo:mnist_mlp", "--input-shape", "1,28,28", "-b", "16"]


@pytest.fixture(autouse=True)
def no_local_gpu(monkeypatch):
    monkeypatch.setattr(nvml, "device_info", lambda index=0: None)
    monkeypatch.setattr(nvml, "available", lambda: (False, "NVML sees no GPU"))
    monkeypatch.setattr(catalog, "_local_device", lambda: None)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    from memprof.engine import overheads

    monkeypatch.setattr(overheads, "torch_version", lambda: (2, 14))  # the workspace rules of one release


def _estimate(*args):
    res = runner.invoke(app, ["estimate", *MNIST, *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_estimate_gpu_sets_capacity_and_architecture():
    doc = _estimate("--gpu", "h100-sxm")
    assert doc["capacity"]["total_bytes"] == round(79.11 * GIB)
    assert doc["capacity"]["source"] == "--gpu h100-sxm: as the card reports it"
    target = doc["traced"]["cuda_target"]
    assert target["arch"] == "sm90" and target["gpu"]["key"] == "h100-sxm" and target["assumed"] is False
    assert target["gpu"]["peak_tflops"]["bf16"] == pytest.approx(989.4)
    # Hopper: 32 MiB cuBLAS workspace per thread, forward and backward
    assert doc["traced"]["cublas_workspace_bytes"] == 2 * 32 * MIB
    assert doc["fit"]["source"] == "traced" and doc["fit"]["max_batch"] > 16
    # the catalog entry's peaks feed the step-time model (memprof.engine.roofline)
    assert doc["step_time"]["gpu"] == "NVIDIA H100 SXM5 80GB" and doc["step_time"]["seconds"] > 0
    assert doc["step_time"]["bandwidth_bytes_per_s"] == pytest.approx(3.35e12)


def test_gpu_arch_sm80_gives_ampere_workspaces_and_no_capacity():
    doc = _estimate("--gpu-arch", "sm80")
    assert doc["capacity"] is None
    assert doc["step_time"] is None and "--gpu NAME" in doc["step_time_note"]  # an arch has no peaks
    assert doc["traced"]["cuda_target"]["arch"] == "sm80"
    per_handle = 8 * MIB + 128 * 1024  # :4096:2:16:8
    assert doc["traced"]["cublas_workspace_bytes"] == 2 * per_handle
    a100 = _estimate("--gpu", "a100-80gb")
    assert a100["traced"]["cublas_workspace_bytes"] == 2 * per_handle
    assert any("8.12 MiB per thread" in n for n in a100["traced"]["notes"])


def test_no_gpu_anywhere_says_which_architecture_was_assumed():
    doc = _estimate()
    target = doc["traced"]["cuda_target"]
    assert target["assumed"] is True and target["arch"] == catalog.ASSUMED_ARCH
    assert any(n.startswith("predicted for sm90 (assumed") for n in doc["traced"]["notes"])


def test_gpu_memory_wins_over_the_catalog_capacity():
    doc = _estimate("--gpu", "t4", "--gpu-memory", "10GiB")
    assert doc["capacity"] == {"total_bytes": 10 * GIB, "source": "--gpu-memory", "device_name": None}
    assert doc["traced"]["cuda_target"]["arch"] == "sm75"


def test_vendor_sized_capacity_says_it_is_an_upper_bound():
    doc = _estimate("--gpu", "l4")
    assert doc["capacity"]["total_bytes"] == 24 * GIB and "upper bound" in doc["capacity"]["source"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--gpu", "h100"], "unknown GPU 'h100' for --gpu; close names: h100-sxm, h100-pcie"),
        (["--gpu-arch", "hopper"], "cannot read --gpu-arch 'hopper'"),
        (["--gpu", "a100-80gb", "--gpu-arch", "sm90"], "--gpu a100-80gb is sm80, but --gpu-arch says sm90"),
    ],
)
def test_bad_gpu_names_are_one_line(args, needle):
    res = runner.invoke(app, ["estimate", *MNIST, *args])
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("ERROR: ") and lines[1].startswith("HINT: ")
    assert needle in lines[0], lines[0]


def test_compare_gpu_sets_capacity_and_arch():
    res = runner.invoke(app, ["compare", *MNIST, "--dtype", "amp-bf16", "--gpu", "a10g", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["capacity"]["total_bytes"] == round(21.99 * GIB) and doc["capacity"]["source"].startswith("--gpu a10g")
    assert all(r["fit"]["max_batch"] is not None for r in doc["rows"])
    assert all(r["step_time"]["gpu"] == "NVIDIA A10G 24GB (AWS)" for r in doc["rows"])
    res = runner.invoke(app, ["compare", *MNIST, "--device", "cpu", "--gpu", "a10g"])
    assert res.exit_code == 2 and "--gpu and --gpu-arch are for --device cuda" in res.stderr


def test_find_batch_predicts_for_the_named_gpu(monkeypatch):
    from memprof.cli.common import build_workload
    from memprof.commands import find_batch as fb
    from memprof.engine import fit as fitting

    seen = {}
    real_fit = fitting.fit_batch

    def spy(*args, **kwargs):
        seen["target"] = kwargs["trace_fn"].keywords["cuda_target"]
        return real_fit(*args, **kwargs)

    class FakeCuda:
        device, metric = "cuda", fb.Metric.RESERVED

        def describe(self):
            return "cuda:0 NVIDIA H100 80GB HBM3"

        def capacity_bytes(self):
            return 2 * GIB

        def run(self, workload, batch, steps=2, on_phase=None):
            fits = batch <= 100
            return BatchTrial(batch, fits, steps if fits else 0, 0.0, peak_reserved_bytes=batch * 10 * MIB)

    monkeypatch.setattr(fitting, "fit_batch", spy)
    monkeypatch.setattr(fb, "make_runner", lambda *a, **k: FakeCuda())
    w = build_workload("memprof.zoo:mnist_mlp", input_shape=["1,28,28"])
    result = fb.find_batch(w, cuda_target=catalog.resolve_target("a100-80gb"), max_batch=256)
    assert seen["target"].arch == "sm80" and result.largest_batch == 100
    assert any("prediction is for a100-80gb (sm80), the trials ran on cuda:0 NVIDIA H100" in n for n in result.notes)
    res = runner.invoke(app, ["find-batch", *MNIST[:3], "--device", "cpu", "--memory-limit", "1GiB", "--gpu", "t4"])
    assert res.exit_code == 2 and "--gpu and --gpu-arch are for CUDA trials" in res.stderr


# --------------------------------------------------------------------------- memprof gpus
A10G = TorchCudaView("2.5.1+cu124", True, "12.4", 1, (TorchDevice(0, "NVIDIA A10G", 24 * GIB, "8.6"),))


def test_gpus_marks_the_local_catalog_entry(monkeypatch):
    status = nvml.NVMLStatus(
        True, None, "550.54.15", "12.4", (nvml.GPUInfo(0, "NVIDIA A10G", None, 24 * GIB, GIB, 23 * GIB),)
    )
    monkeypatch.setattr(gpus_mod.nvml, "query", lambda: status)
    monkeypatch.setattr(gpus_mod, "torch_view", lambda: A10G)
    res = runner.invoke(app, ["gpus"])
    assert res.exit_code == 0, res.output
    assert "GPU 0 in the catalog: --gpu a10g" in res.stdout and "sm 8.6, --gpu a10g" in res.stdout
    doc = json.loads(runner.invoke(app, ["gpus", "--json"]).stdout)
    assert doc["catalog_matches"] == {"NVIDIA A10G": "a10g"} and doc["catalog"] == []


def test_gpus_catalog_works_without_a_gpu(monkeypatch):
    monkeypatch.setattr(gpus_mod.nvml, "query", lambda: nvml.NVMLStatus(False, "NVML Shared Library Not Found"))
    monkeypatch.setattr(gpus_mod, "torch_view", lambda: TorchCudaView("2.5.1", False, None, 0, (), "no CUDA"))
    res = runner.invoke(app, ["gpus", "--catalog"], env={"COLUMNS": "120"})
    assert res.exit_code == 0 and res.stderr.startswith("no GPU: NVML Shared Library Not Found")
    assert "ERROR" not in res.stderr  # the catalog was the answer asked for: no GPU here is a note
    assert "h100-sxm" in res.stdout and "79.11 GiB" in res.stdout and "mi300x" in res.stdout
    doc = json.loads(runner.invoke(app, ["gpus", "--catalog", "--json"]).stdout)
    assert len(doc["catalog"]) == len(catalog.catalog()) and doc["available"] is False
    h100 = next(g for g in doc["catalog"] if g["key"] == "h100-sxm")
    assert h100["bandwidth_bytes_per_s"] == 3_350_000_000_000 and "vllm" in h100["memory_source"]


def test_golden_catalog():
    from memprof.render.gpus import render_catalog

    buf = io.StringIO()
    result = gpus_mod.GpusResult(
        True, None, nvml.NVMLStatus(False, "x"), A10G, {"NVIDIA A10G": "a10g"}, tuple(catalog.catalog().values())
    )
    render_catalog(result, Console(file=buf, width=120, color_system=None, highlight=False))
    assert_golden("gpus_catalog.txt", buf.getvalue())


def test_python_api_takes_gpu_and_gpu_arch():
    import memprof

    r = memprof.estimate("memprof.zoo:mnist_mlp", input_shape=(1, 28, 28), batch_size=8, gpu="rtx-4090")
    assert r.capacity is not None and r.capacity.total_bytes == round(23.64 * GIB)
    assert r.traced.cuda_target.arch == "sm89" and r.fit is not None
    assert r.step_time is not None and r.step_time.gpu == "NVIDIA GeForce RTX 4090 24GB"
    r = memprof.estimate("memprof.zoo:mnist_mlp", input_shape=(1, 28, 28), batch_size=8, gpu_arch="sm75")
    assert r.traced.cuda_target.arch == "sm75" and r.capacity is None
