"""``memprof gpus``: the local GPUs as NVML sees them, and what torch sees. Never raises."""

from __future__ import annotations

from ..engine import catalog, nvml
from ..results import GpusResult, TorchCudaView, TorchDevice


def torch_view() -> TorchCudaView:
    """torch's side: version, whether CUDA works, and the devices it numbers."""
    try:
        import torch
    except Exception as exc:  # pragma: no cover - torch is a dependency
        return TorchCudaView(None, False, None, 0, (), f"torch cannot be imported: {exc}")
    version = getattr(torch, "__version__", None)
    cuda_version = getattr(torch.version, "cuda", None)
    try:
        ok = bool(torch.cuda.is_available())
    except Exception as exc:
        return TorchCudaView(version, False, cuda_version, 0, (), f"torch.cuda.is_available() failed: {exc}")
    if not ok:
        why = "torch was built without CUDA" if cuda_version is None else "torch.cuda.is_available() is False"
        return TorchCudaView(version, False, cuda_version, 0, (), why)
    devices = []
    try:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(TorchDevice(i, props.name, int(props.total_memory), f"{props.major}.{props.minor}"))
    except Exception as exc:
        return TorchCudaView(version, True, cuda_version, len(devices), tuple(devices), f"device query failed: {exc}")
    return TorchCudaView(version, True, cuda_version, len(devices), tuple(devices), None)


def gpus(with_catalog: bool = False) -> GpusResult:
    """Both views; ``available`` is True when NVML or torch sees at least one GPU. Local GPUs that match a
    catalog entry (``--gpu NAME``) are marked; ``with_catalog`` adds every catalog entry."""
    status = nvml.query()
    view = torch_view()
    available = bool(status.gpus) or view.device_count > 0
    reason = None
    if not available:
        reason = f"{status.reason or 'NVML sees no GPU'}; torch sees no CUDA device ({view.reason or 'none'})"
    matches: dict[str, str] = {}
    for name in [g.name for g in status.gpus] + [d.name for d in view.devices]:
        spec = catalog.match_device(name)
        if spec is not None:
            matches[name] = spec.key
    entries = tuple(catalog.catalog().values()) if with_catalog else ()
    return GpusResult(
        available=available, reason=reason, nvml=status, torch=view, catalog_matches=matches, catalog=entries
    )
