"""The GPU catalog (configs/gpus.toml) and the CUDA target of a prediction."""

from __future__ import annotations

import pytest

from memprof.engine import catalog
from memprof.errors import UsageError
from memprof.results import PEAK_DTYPES, GpuSpec, arch_capability

GIB = 1024**3
#: the names issue #16 asks --gpu to know
ASKED = (
    "a100-40gb a100-80gb h100-sxm h100-pcie h200 l4 l40s rtx-4090 rtx-3090 t4 v100-16gb v100-32gb a10g "
    "rtx-6000-ada mi300x"
).split()


def test_every_asked_gpu_is_there_with_sourced_numbers():
    entries = catalog.catalog()
    assert set(ASKED) <= set(entries)
    for key, spec in entries.items():
        assert isinstance(spec, GpuSpec) and spec.key == key
        assert spec.memory_bytes > 10 * GIB and spec.bandwidth_bytes_per_s > 100e9
        assert spec.memory_source and spec.bandwidth_source and spec.tflops_source and spec.name
        assert set(spec.peak_tflops) <= set(PEAK_DTYPES) and spec.peak_tflops["fp32"] > 1
        assert spec.arch.startswith("gfx") or spec.capability is not None
        if spec.memory_reported:  # the card's own report: an issue or PR where it was printed
            assert "#" in spec.memory_source and "GiB" in spec.memory_source
        else:  # vendor size: says it is an upper bound
            assert "upper bound" in spec.memory_source
        assert spec.match, f"{key} cannot be recognised locally"


def test_reported_capacities_are_below_the_marketing_size():
    # the card reports less than its name says (ECC, driver reservations): what a fit must use
    assert catalog.get_gpu("a100-80gb").memory_bytes == round(79.14 * GIB)
    assert catalog.get_gpu("h100-sxm").memory_bytes == round(79.11 * GIB)
    assert catalog.get_gpu("rtx-4090").memory_bytes == round(23.64 * GIB)
    assert catalog.get_gpu("t4").memory_bytes == round(14.56 * GIB)


def test_peaks_and_bandwidth_exposed_for_a_time_model():
    h100 = catalog.get_gpu("h100-sxm")
    assert h100.peak_flops("bf16") == pytest.approx(989.4e12)
    assert h100.peak_flops("fp32") == pytest.approx(67e12)
    assert h100.bandwidth_bytes_per_s == 3_350_000_000_000
    assert catalog.get_gpu("t4").peak_flops("bf16") is None  # Turing has no bf16
    a100 = catalog.get_gpu("a100-40gb")
    assert a100.peak_flops("fp16") == pytest.approx(312e12) and a100.capability == (8, 0)


@pytest.mark.parametrize(
    "typed, key",
    [("A100-80GB", "a100-80gb"), ("a100_80gb", "a100-80gb"), ("rtx4090", "rtx-4090"), ("NVIDIA H200", "h200")],
)
def test_names_are_forgiving(typed, key):
    assert catalog.get_gpu(typed).key == key


def test_unknown_name_lists_close_names_on_one_line():
    with pytest.raises(UsageError) as info:
        catalog.get_gpu("h100")
    message = info.value.message
    assert "\n" not in message and "`gpu`" in message
    assert message.index("h100-sxm") < message.index("h200")  # names containing what was typed come first
    assert "h100-pcie" in message
    assert "memprof gpus --catalog" in info.value.hint


@pytest.mark.parametrize(
    "text, arch",
    [("sm80", "sm80"), ("sm_90", "sm90"), ("8.6", "sm86"), ("sm90a", "sm90"), ("compute_89", "sm89"),
     ("100", "sm100"), ("12.0", "sm120"), ("gfx942", "gfx942")],
)  # fmt: skip
def test_parse_arch(text, arch):
    assert catalog.parse_arch(text) == arch


@pytest.mark.parametrize("text", ["hopper", "sm", "9", "sm_2", "x86"])
def test_parse_arch_rejects(text):
    with pytest.raises(UsageError, match="gpu_arch"):
        catalog.parse_arch(text)


def test_arch_capability():
    assert arch_capability("sm90") == (9, 0)
    assert arch_capability("sm100") == (10, 0)
    assert arch_capability("sm121") == (12, 1)
    assert arch_capability("gfx942") is None


@pytest.mark.parametrize(
    "device, key",
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("Tesla T4", "t4"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
    ],
)
def test_local_devices_are_recognised(device, key):
    spec = catalog.match_device(device)
    assert spec is not None and spec.key == key


def test_unknown_device_is_not_matched():
    assert catalog.match_device("NVIDIA GeForce GTX 1080 Ti") is None
    assert catalog.match_device(None) is None


def test_resolve_target_precedence(monkeypatch):
    monkeypatch.setattr(catalog, "_local_device", lambda: None)
    assumed = catalog.resolve_target()
    assert assumed.assumed and assumed.arch == catalog.ASSUMED_ARCH and "assumed" in assumed.source
    by_arch = catalog.resolve_target(gpu_arch="sm_80")
    assert (by_arch.arch, by_arch.gpu, by_arch.assumed) == ("sm80", None, False)
    by_name = catalog.resolve_target("a100-80gb", "sm80")
    assert by_name.gpu is not None and by_name.gpu.key == "a100-80gb" and by_name.source == "--gpu a100-80gb"
    with pytest.raises(UsageError, match="`gpu_arch` says sm90"):
        catalog.resolve_target("a100-80gb", "sm90")
    monkeypatch.setattr(catalog, "_local_device", lambda: ("sm86", "NVIDIA A10G"))
    local = catalog.resolve_target()
    assert local.arch == "sm86" and local.gpu is not None and local.gpu.key == "a10g" and not local.assumed
    assert catalog.resolve_target(gpu_arch="sm90").arch == "sm90"  # naming one wins over the local GPU
