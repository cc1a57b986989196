"""``memprof gpus``: NVML and torch views, with NVML and torch monkeypatched (no GPU needed)."""

from __future__ import annotations

import io
import json

from conftest import assert_golden
from rich.console import Console
from typer.testing import CliRunner

from memprof.cli import EXIT_NO_GPU, app
from memprof.commands import gpus as gpus_mod
from memprof.engine import nvml
from memprof.render.gpus import render_gpus
from memprof.results import TorchCudaView, TorchDevice

runner = CliRunner()
GIB = 1024**3

NO_TORCH_GPU = TorchCudaView("2.5.1+cu124", False, "12.4", 0, (), "torch.cuda.is_available() is False")
TWO = nvml.NVMLStatus(
    True,
    None,
    "550.54.15",
    "12.4",
    (
        nvml.GPUInfo(
            0,
            "NVIDIA H100 80GB HBM3",
            "GPU-1",
            80 * GIB,
            10 * GIB,
            70 * GIB,
            (nvml.GPUProcess(4242, 9 * GIB, "python train.py --epochs 3"), nvml.GPUProcess(4343, None, None)),
        ),
        nvml.GPUInfo(1, "NVIDIA H100 80GB HBM3", "GPU-2", 80 * GIB, 512 * 1024**2, 80 * GIB - 512 * 1024**2),
    ),
)
TORCH_TWO = TorchCudaView(
    "2.5.1+cu124",
    True,
    "12.4",
    2,
    (
        TorchDevice(0, "NVIDIA H100 80GB HBM3", 80 * GIB, "9.0"),
        TorchDevice(1, "NVIDIA H100 80GB HBM3", 80 * GIB, "9.0"),
    ),
)


def _patch(monkeypatch, status, view):
    monkeypatch.setattr(gpus_mod.nvml, "query", lambda: status)
    monkeypatch.setattr(gpus_mod, "torch_view", lambda: view)


def test_no_gpu_one_line_and_exit_code(monkeypatch):
    _patch(monkeypatch, nvml.NVMLStatus(False, "NVML could not start: NVML Shared Library Not Found"), NO_TORCH_GPU)
    res = runner.invoke(app, ["gpus"])
    assert res.exit_code == EXIT_NO_GPU == 3
    assert res.stdout == ""
    assert res.stderr == (
        "ERROR: no GPU: NVML could not start: NVML Shared Library Not Found; torch 2.5.1+cu124 built for "
        "CUDA 12.4 sees no CUDA device (torch.cuda.is_available() is False)\n"
        "HINT: memprof estimate and memprof compare need no GPU (--gpu-memory 24GiB gives the capacity); "
        "find-batch runs real steps on the CPU with --device cpu --memory-limit 8GiB\n"
    )


def test_no_gpu_json_is_valid(monkeypatch):
    _patch(monkeypatch, nvml.NVMLStatus(False, "NVML could not start: Driver Not Loaded"), NO_TORCH_GPU)
    res = runner.invoke(app, ["gpus", "--json"])
    assert res.exit_code == 3
    doc = json.loads(res.stdout)
    assert doc["schema_version"] == 1 and doc["kind"] == "gpus" and doc["available"] is False
    assert "Driver Not Loaded" in doc["reason"] and doc["nvml"]["gpus"] == []
    assert doc["torch"]["cuda_available"] is False
    assert res.stderr.startswith("ERROR: no GPU: NVML could not start: Driver Not Loaded") and "\nHINT: " in res.stderr


def test_two_gpus_table_and_json(monkeypatch):
    _patch(monkeypatch, TWO, TORCH_TWO)
    res = runner.invoke(app, ["gpus"])
    assert res.exit_code == 0, res.stderr
    assert "NVIDIA H100 80GB HBM3" in res.stdout and "4242 python train.py --epochs 3" in res.stdout
    res = runner.invoke(app, ["gpus", "--json"])
    doc = json.loads(res.stdout)
    assert doc["available"] is True and doc["nvml"]["driver_version"] == "550.54.15"
    assert doc["nvml"]["gpus"][0]["processes"][0] == {
        "pid": 4242,
        "used_bytes": 9 * GIB,
        "name": "python train.py --epochs 3",
    }
    assert doc["torch"]["device_count"] == 2 and doc["torch"]["devices"][1]["capability"] == "9.0"


def test_torch_sees_gpu_without_nvml(monkeypatch):
    view = TorchCudaView("2.5.1+cu124", True, "12.4", 1, (TorchDevice(0, "NVIDIA A10G", 24 * GIB, "8.6"),))
    _patch(monkeypatch, nvml.NVMLStatus(False, "the nvidia-ml-py package is not installed"), view)
    res = runner.invoke(app, ["gpus"])
    assert res.exit_code == 0
    assert "NVML: not available (the nvidia-ml-py package is not installed)" in res.stdout
    assert "torch sees 1 device: cuda:0 NVIDIA A10G (24.0 GiB, sm 8.6, --gpu a10g)" in res.stdout


def test_real_query_never_raises():
    r = gpus_mod.gpus()
    assert r.available == (bool(r.nvml.gpus) or r.torch.device_count > 0)
    assert r.available or r.reason


def test_golden_render():
    buf = io.StringIO()
    render_gpus(
        gpus_mod.GpusResult(True, None, TWO, TORCH_TWO),
        Console(file=buf, width=120, color_system=None, highlight=False),
    )
    assert_golden("gpus_two.txt", buf.getvalue())
