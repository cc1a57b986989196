"""The only module that imports ``pynvml`` (from the ``nvidia-ml-py`` package).

NVML starts lazily on first use and every query degrades to "not available" with
a reason instead of raising: no driver, no GPU, or no package must never crash memprof.
"""

from __future__ import annotations

import dataclasses
import os
import threading

_lock = threading.Lock()
_state: dict = {"ok": None, "reason": None}


@dataclasses.dataclass(frozen=True)
class GPUProcess:
    pid: int
    used_bytes: int | None
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    uuid: str | None
    total_bytes: int
    used_bytes: int
    free_bytes: int
    processes: tuple[GPUProcess, ...] = ()


@dataclasses.dataclass(frozen=True)
class NVMLStatus:
    available: bool
    reason: str | None = None  # why not, when not available
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # e.g. "12.4"
    gpus: tuple[GPUInfo, ...] = ()


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_message(exc: BaseException) -> str:
    """NVMLError's text ("NVML Shared Library Not Found", "Driver Not Loaded"), not its bare code."""
    text = str(exc).strip()
    if text and not text.lstrip("-").isdigit():
        return text
    args = getattr(exc, "args", ())
    return _decode(args[0]) if args else type(exc).__name__


def _init() -> tuple[bool, str | None]:
    with _lock:
        if _state["ok"] is not None:
            return _state["ok"], _state["reason"]
        try:
            import pynvml  # noqa: PLC0415
        except ImportError:
            _state.update(ok=False, reason="the nvidia-ml-py package is not installed (pip install nvidia-ml-py)")
            return False, _state["reason"]
        ok, reason = True, None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            ok, reason = False, f"NVML could not start: {_nvml_message(exc)}"
        _state.update(ok=ok, reason=reason)
        return ok, reason


def available() -> tuple[bool, str | None]:
    """(True, None) when NVML works, else (False, reason)."""
    return _init()


def _process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            parts = fh.read().split(b"\0")
        return " ".join(p.decode(errors="replace") for p in parts if p)[:80] or None
    except OSError:
        return None


def _gpu(pynvml, index: int) -> GPUInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        uuid = _decode(pynvml.nvmlDeviceGetUUID(handle))
    except Exception:
        uuid = None
    procs: list[GPUProcess] = []
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            for p in getattr(pynvml, getter)(handle):
                used = getattr(p, "usedGpuMemory", None)
                procs.append(
                    GPUProcess(
                        int(p.pid),
                        int(used) if isinstance(used, int) and used >= 0 else None,
                        _process_name(int(p.pid)),
                    )
                )
        except Exception:
            pass
    return GPUInfo(
        index=index,
        name=_decode(pynvml.nvmlDeviceGetName(handle)),
        uuid=uuid,
        total_bytes=int(mem.total),
        used_bytes=int(mem.used),
        free_bytes=int(mem.free),
        processes=tuple(procs),
    )


def query() -> NVMLStatus:
    """Every GPU NVML sees, with memory and processes; never raises."""
    ok, reason = _init()
    if not ok:
        return NVMLStatus(False, reason)
    import pynvml

    try:
        driver = _decode(pynvml.nvmlSystemGetDriverVersion())
    except Exception:
        driver = None
    try:
        v = int(pynvml.nvmlSystemGetCudaDriverVersion())
        cuda = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:
        cuda = None
    try:
        count = pynvml.nvmlDeviceGetCount()
        gpus = tuple(_gpu(pynvml, i) for i in range(count))
    except Exception as exc:
        return NVMLStatus(False, f"NVML query failed: {exc}", driver, cuda)
    if not gpus:
        return NVMLStatus(False, "NVML sees no GPU", driver, cuda)
    return NVMLStatus(True, None, driver, cuda, gpus)


def device_info(index: int = 0) -> GPUInfo | None:
    """One GPU's memory (index as CUDA numbers it, honouring CUDA_VISIBLE_DEVICES when it is a plain list)."""
    ok, _ = _init()
    if not ok:
        return None
    import pynvml

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        items = [v.strip() for v in visible.split(",") if v.strip()]
        if index < len(items) and items[index].isdigit():
            index = int(items[index])
    try:
        return _gpu(pynvml, index)
    except Exception:
        return None


def process_used_bytes(index: int = 0, pid: int | None = None) -> int | None:
    """GPU memory NVML charges to this process (context + allocator + workspaces), or None."""
    info = device_info(index)
    if info is None:
        return None
    pid = os.getpid() if pid is None else pid
    for p in info.processes:
        if p.pid == pid:
            return p.used_bytes
    return None
