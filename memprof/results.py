"""Result types: frozen dataclasses with bytes as ints, and one category enum.

Every result converts to plain JSON-able data with :func:`to_dict`; the top-level
JSON object of every command carries ``schema_version``. Each command's result
classes live here, in its own section.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

SCHEMA_VERSION = 1


class MemCategory(str, enum.Enum):
    """Where bytes go. The values are the labels people read."""

    PARAMETER = "Parameter"
    BUFFER = "Buffer"
    GRADIENT = "Gradient"
    OPTIMIZER_STATE = "Optimizer state"
    ACTIVATION = "Activation"
    TEMPORARY = "Temporary"
    INPUT = "Input"
    CUDA_OVERHEAD = "CUDA overhead"  # context, cuBLAS/cuDNN workspaces: NVML sees it, torch does not

    @property
    def key(self) -> str:
        """snake_case name used as JSON key."""
        return self.name.lower()


def to_dict(obj: Any) -> Any:
    """Dataclasses, enums, tuples and dicts -> plain JSON-able data (enum dict keys become ``.key``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.name.startswith("_")}
    if isinstance(obj, MemCategory):
        return obj.key
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {(k.key if isinstance(k, MemCategory) else str(k)): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def document(kind: str, payload: Any) -> dict[str, Any]:
    """The top-level JSON object: ``{"schema_version": 1, "kind": ..., **payload}``."""
    body = to_dict(payload)
    if not isinstance(body, dict):
        body = {"result": body}
    return {"schema_version": SCHEMA_VERSION, "kind": kind, **body}


# =========================================================================== capacity / fit
@dataclasses.dataclass(frozen=True)
class Capacity:
    """The memory a step must fit in, and where that number came from."""

    total_bytes: int
    source: str  # "--gpu-memory", "NVML: NVIDIA H100 80GB HBM3 (GPU 0)", "--memory-limit"
    device_name: str | None = None
