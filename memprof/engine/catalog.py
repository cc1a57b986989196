"""The GPU catalog (``configs/gpus.toml``) and the CUDA target a prediction is for.

* :func:`catalog` / :func:`get_gpu`: the entries behind ``--gpu NAME`` (capacity as the card
  reports it, architecture, peak dense TFLOP/s per dtype, memory bandwidth, each sourced);
  an unknown name raises one line listing the close names.
* :func:`parse_arch`: ``--gpu-arch`` values (``sm80``, ``sm_90``, ``8.6``, ``gfx942``).
* :func:`match_device`: the catalog entry of a local GPU, by the name torch/NVML report.
* :func:`resolve_target`: which architecture a CUDA prediction uses - ``gpu``, ``gpu_arch``,
  the local GPU, or (nothing visible, nothing given) :data:`ASSUMED_ARCH`, said so.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Any

from ..errors import UsageError
from ..results import PEAK_DTYPES, CudaTarget, GpuSpec, arch_capability
from .loading import CONFIGS_DIR, _toml_load

CATALOG_FILE = CONFIGS_DIR / "gpus.toml"
GiB = 1024**3
#: the architecture a CUDA prediction uses when no GPU is visible and none is named: Hopper
ASSUMED_ARCH = "sm90"
_ARCH_RE = re.compile(r"^(?:sm|compute)?_?(\d{2,3})[a-z]?$")


@functools.lru_cache(maxsize=1)
def catalog() -> dict[str, GpuSpec]:
    """Every catalog entry by key (``"a100-80gb"``), in the file's order."""
    data = _toml_load(CATALOG_FILE).get("gpus", {})
    out: dict[str, GpuSpec] = {}
    for key, entry in data.items():
        tflops = {k: float(v) for k, v in entry.get("tflops", {}).items()}
        unknown = set(tflops) - set(PEAK_DTYPES)
        if unknown:  # pragma: no cover - guarded by tests/test_catalog.py
            raise ValueError(f"{CATALOG_FILE}: {key}: unknown dtypes {sorted(unknown)}")
        context = entry.get("context_mib")
        out[key] = GpuSpec(
            key=key,
            name=entry["name"],
            arch=entry["arch"],
            memory_bytes=int(round(float(entry["memory_gib"]) * GiB)),
            memory_reported=bool(entry["memory_reported"]),
            memory_source=entry["memory_source"],
            bandwidth_bytes_per_s=int(float(entry["bandwidth_gbs"]) * 1e9),
            bandwidth_source=entry["bandwidth_source"],
            peak_tflops=tflops,
            tflops_source=entry["tflops_source"],
            match=tuple(entry.get("match", ())),
            context_bytes=int(float(context) * 1024 * 1024) if context is not None else None,
            context_source=entry.get("context_source"),
        )
    return out


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", "-", str(name).strip().lower())


def get_gpu(name: str) -> GpuSpec:
    """The catalog entry called ``name``; case, spaces, underscores, hyphens and a leading "nvidia" do not matter."""
    entries = catalog()
    key = _normalise(name)
    key = key[len("nvidia-") :] if key.startswith("nvidia-") else key
    if key in entries:
        return entries[key]
    compact = key.replace("-", "")
    same = [k for k in entries if k.replace("-", "") == compact]
    if len(same) == 1:
        return entries[same[0]]
    close = [k for k in entries if compact and compact in k.replace("-", "")]
    close += [k for k in difflib.get_close_matches(key, entries, n=4, cutoff=0.5) if k not in close]
    shown = ", ".join(close[:5]) if close else ", ".join(entries)
    raise UsageError(
        f"unknown GPU {name!r} for `gpu`; close names: {shown}",
        "`memprof gpus --catalog` lists every GPU memprof knows; or give `gpu_memory` and `gpu_arch` instead",
    )


def parse_arch(text: str) -> str:
    """``"sm80"``, ``"sm_80"``, ``"80"``, ``"8.0"``, ``"sm90a"``, ``"compute_86"`` -> ``"sm80"`` ...;
    AMD targets (``"gfx942"``) stay as they are."""
    value = str(text).strip().lower()
    if re.fullmatch(r"gfx[0-9a-f]{3,4}", value):
        return value
    match = re.fullmatch(r"(\d{1,2})\.(\d)", value)
    if match:
        return f"sm{int(match.group(1))}{match.group(2)}"
    match = _ARCH_RE.fullmatch(value)
    if match and arch_capability("sm" + match.group(1)) is not None:
        major, minor = arch_capability("sm" + match.group(1)) or (0, 0)
        if 3 <= major <= 15:
            return f"sm{major}{minor}"
    raise UsageError(
        f"cannot read `gpu_arch` {text!r}",
        "write the compute capability, e.g. `gpu_arch` sm80 (A100), sm86, sm89, sm90 (H100), sm100 (B200)",
    )


def match_device(device_name: str | None) -> GpuSpec | None:
    """The catalog entry whose ``match`` strings occur in a device name torch or NVML reports."""
    if not device_name:
        return None
    name = device_name.lower()
    best: tuple[int, GpuSpec] | None = None
    for spec in catalog().values():
        for pattern in spec.match:  # whole words: "NVIDIA L4" is not in "NVIDIA L40S"
            found = re.search(r"(?<![a-z0-9])" + re.escape(pattern.lower()) + r"(?![a-z0-9])", name)
            if found and (best is None or len(pattern) > best[0]):
                best = (len(pattern), spec)
    return best[1] if best else None


def _local_device() -> tuple[str, str] | None:
    """(arch, description) of local GPU 0 when torch sees one (never raises)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        name = torch.cuda.get_device_name(0)
    except Exception:  # a broken driver: as if no GPU were visible
        return None
    return f"sm{major}{minor}", name


def resolve_target(
    gpu: str | GpuSpec | None = None,
    gpu_arch: str | None = None,
    *,
    cudnn_benchmark: bool = False,
    alloc_conf: str | None = None,
) -> CudaTarget:
    """The CUDA target of a prediction: ``gpu`` (a catalog name), else ``gpu_arch``, else the local
    GPU, else :data:`ASSUMED_ARCH` (marked ``assumed``). ``gpu_arch`` with ``gpu`` must agree.

    ``alloc_conf`` (``"expandable_segments:True"``) are the caching allocator's settings; by default
    those of this process's environment (``PYTORCH_ALLOC_CONF`` / ``PYTORCH_CUDA_ALLOC_CONF``), which
    the training script would inherit. Settings PyTorch would refuse raise here.
    """
    from .allocator import conf_from_env, parse_alloc_conf
    from .overheads import torch_version

    conf = parse_alloc_conf(alloc_conf, "alloc_conf") if alloc_conf else conf_from_env(torch_version=torch_version())
    common: dict[str, Any] = {"cudnn_benchmark": cudnn_benchmark, "alloc_conf": conf.source}
    spec = gpu if isinstance(gpu, GpuSpec) else (get_gpu(gpu) if gpu else None)
    arch = parse_arch(gpu_arch) if gpu_arch else None
    if spec is not None:
        if arch is not None and arch != spec.arch:
            raise UsageError(
                f"`gpu` {spec.key} is {spec.arch}, but `gpu_arch` says {arch}",
                "give one of them, or the architecture of that GPU",
            )
        return CudaTarget(spec.arch, f"--gpu {spec.key}", spec, **common)
    if arch is not None:
        return CudaTarget(arch, f"--gpu-arch {arch}", None, **common)
    local = _local_device()
    if local is not None:
        local_arch, name = local
        return CudaTarget(local_arch, f"local GPU 0 ({name})", match_device(name), **common)
    return CudaTarget(
        ASSUMED_ARCH,
        f"assumed {ASSUMED_ARCH} (Hopper, e.g. H100): no GPU visible and no --gpu / --gpu-arch given",
        None,
        assumed=True,
        **common,
    )


def with_capacity(target: CudaTarget, capacity_bytes: int | None) -> CudaTarget:
    """``target`` predicting against ``capacity_bytes`` (the allocator replay releases and retries before it)."""
    import dataclasses

    return dataclasses.replace(target, capacity_bytes=capacity_bytes)
