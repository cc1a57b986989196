"""A step-time model: the roofline lower bound of a traced step on a GPU. A model, not a measurement.

Each op of the traced step (:class:`memprof.engine.flops.OpCosts`: its FLOPs, the dtype it computes
in, the bytes it reads and writes) takes at least

    max(FLOPs / peak FLOP/s of the GPU in that dtype,  bytes / memory bandwidth)

and the step at least the sum. Real steps are slower: kernels reach a fraction of the peaks, small
ops are bound by launch latency, caches and fusion change the bytes, and the CPU, data loading and
communication are not modelled. So the time is a lower bound and the throughput an upper bound;
``scripts/validate_gpu.py --step-time`` measures real steps beside it whenever a GPU is at hand.

The GPU is anything with ``peak_flops(dtype) -> FLOP/s | None`` and ``bandwidth_bytes_per_s``: a
catalog entry (``--gpu NAME``) or a :class:`PeakSpec` built by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..errors import UsageError
from ..results import StepTime, TraceResult

if TYPE_CHECKING:  # pragma: no cover
    from .workload import Workload

#: when a GPU has no peak for a dtype, the next one tried (a T4 has no bf16, a V100 no TF32)
FALLBACK = {"tf32": "fp32", "bf16": "fp16", "fp8": "fp16", "int8": "fp16", "fp16": "fp32", "fp64": "fp32"}

ASSUMPTIONS = (
    "each op reads its inputs and writes its outputs once from GPU memory (no cache reuse, no fusion)",
    "each op at the GPU's peak dense FLOP/s for its dtype: fp32 matmuls at the FP32 peak and fp32 "
    "convolutions at TF32 (PyTorch's defaults), fp16/bf16 on tensor cores",
    "no kernel launch latency, CPU overhead, data loading or communication",
    "the first traced step: the optimizer's first step also creates its state",
)


class GpuPeaks(Protocol):
    """What the model needs from a GPU (the catalog's entries have it)."""

    @property
    def name(self) -> str: ...

    @property
    def bandwidth_bytes_per_s(self) -> int | float: ...

    def peak_flops(self, dtype: str) -> float | None: ...


@dataclass(frozen=True)
class PeakSpec:
    """A GPU for the model, by hand: peak dense FLOP/s per dtype ("fp32", "tf32", "bf16", "fp16", "fp8",
    "int8", "fp64") and memory bandwidth in bytes/s."""

    name: str
    peak_flops_per_s: Mapping[str, float]
    bandwidth_bytes_per_s: float
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s or self.bandwidth_bytes_per_s <= 0:
            raise UsageError(f"GPU {self.name!r}: memory bandwidth must be positive", "give bytes per second")
        if not any(v and v > 0 for v in self.peak_flops_per_s.values()):
            raise UsageError(f"GPU {self.name!r}: no positive peak FLOP/s", 'e.g. {"fp32": 19.5e12}')

    def peak_flops(self, dtype: str) -> float | None:
        value = self.peak_flops_per_s.get(dtype)
        return float(value) if value else None


def _peaks(gpu: GpuPeaks, kinds: set[str]) -> tuple[dict[str, float], list[str]]:
    """FLOP/s per math kind, following :data:`FALLBACK` where the GPU has no figure; and notes saying so."""
    peaks: dict[str, float] = {}
    notes: list[str] = []
    for kind in sorted(kinds):
        used = kind
        value = gpu.peak_flops(kind)
        while not value and used in FALLBACK:
            used = FALLBACK[used]
            value = gpu.peak_flops(used)
        if not value:
            raise UsageError(f"GPU {gpu.name!r} has no peak FLOP/s for {kind} (nor a fallback)", "add an fp32 figure")
        if used != kind:
            notes.append(f"{gpu.name} has no {kind} peak: {kind} ops modelled at its {used} peak")
        peaks[kind] = float(value)
    return peaks, notes


def tokens_per_sample(workload: Workload) -> int | None:
    """Tokens per sample when the model reads token ids (integer inputs): the first input's size.

    Input dtypes left to detection are known once the model has been built (a trace builds it)."""
    inputs = workload.model.inputs
    if not inputs.dtype or not inputs.dtype.startswith(("int", "long", "uint")) or not inputs.shapes:
        return None
    if workload.seq_len:  # sequence models: the tokens asked for (Hugging Face: --seq-len)
        return workload.seq_len
    return math.prod(inputs.shapes[0])


def step_time(trace: TraceResult, gpu: GpuPeaks, *, tokens: int | None = None) -> StepTime:
    """The roofline lower bound of ``trace``'s step on ``gpu`` (trace it with ``count_bytes=True``).

    ``tokens`` per sample adds tokens per second.
    """
    costs = trace._op_costs
    flops = trace.flops
    if costs is None or flops is None:
        raise UsageError(
            "this trace has no per-op costs for the step-time model",
            "trace with trace_step(workload, count_bytes=True)",
        )
    bandwidth = float(gpu.bandwidth_bytes_per_s)
    peaks, notes = _peaks(gpu, {kind for _, kind, _, _, _ in costs.flop_ops})
    phase_s = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    compute = memory = 0.0
    for phase, kind, n_flops, n_bytes, count in costs.flop_ops:
        t_compute, t_memory = n_flops / peaks[kind], n_bytes / bandwidth
        t = max(t_compute, t_memory) * count
        phase_s[phase] += t
        if t_compute >= t_memory:
            compute += t
        else:
            memory += t
    for phase, n_bytes in costs.other_bytes.items():
        t = n_bytes / bandwidth
        phase_s[phase] += t
        memory += t
    seconds = sum(phase_s.values())
    samples = flops.batch_size / seconds if seconds > 0 else 0.0
    used = {kind: peaks[kind] for kind in sorted(peaks)}
    return StepTime(
        gpu=gpu.name,
        seconds=seconds,
        forward_seconds=phase_s["forward"],
        backward_seconds=phase_s["backward"],
        optimizer_seconds=phase_s["optimizer"],
        compute_bound_seconds=compute,
        memory_bound_seconds=memory,
        step_bytes=costs.step_bytes,
        samples_per_second=samples,
        tokens_per_second=samples * tokens if tokens else None,
        peak_flops_per_s=used,
        bandwidth_bytes_per_s=bandwidth,
        assumptions=ASSUMPTIONS + tuple(notes),
    )
