"""Compute: FLOPs counted by PyTorch's ``FlopCounterMode`` on fake tensors or the meta device.

Today: what activation checkpointing recomputes (:func:`recompute_cost`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..errors import UsageError
from .checkpointing import counting_regions, get_plan
from .workload import autocast, prepare


@dataclass(frozen=True)
class RecomputeCost:
    """What checkpointing costs in compute: the checkpointed regions' forward, run again in backward.

    FLOPs are PyTorch's FlopCounterMode count (matmuls, convolutions, attention) of one
    forward at the workload's batch size, traced on fake tensors.
    """

    regions: int  # checkpointed regions recomputed per step
    forward_flops: int  # the whole forward
    recompute_flops: int  # the forward of the checkpointed regions, again in backward
    plan: str = ""  # CheckpointPlan.describe()
    #: BatchNorm layers inside checkpointed regions update their running statistics twice per step
    batchnorm_recomputed: bool = False

    @property
    def step_flops(self) -> int:
        """A training step without checkpointing: forward + backward (about 2x forward)."""
        return 3 * self.forward_flops

    @property
    def extra_pct(self) -> float | None:
        """Extra compute per training step, in % of a step without checkpointing."""
        return None if not self.forward_flops else 100.0 * self.recompute_flops / self.step_flops


def recompute_cost(workload) -> RecomputeCost:
    """FLOPs the checkpointed step recomputes: one forward of ``workload`` on the meta device
    (or on fake tensors when the model cannot be built there); no real memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        return _count_recompute(workload, "meta", contextlib.nullcontext())
    except UsageError:
        raise
    except Exception:
        return _count_recompute(workload, "cpu", FakeTensorMode(allow_non_fake_inputs=True))


def _count_recompute(workload, device: str, mode) -> RecomputeCost:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    probe: list[int] = []
    with mode:
        prepared = prepare(workload.replace(mode="train"), device)
        plan = get_plan(prepared.model)
        with counting_regions(probe), FlopCounterMode(display=False) as total, torch.enable_grad(), autocast(prepared):
            prepared.model(*prepared.args, **prepared.kwargs)
    model = prepared.model
    batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return RecomputeCost(
        regions=plan.count if plan else 0,
        forward_flops=int(total.get_total_flops()),
        recompute_flops=int(sum(probe)),
        plan=plan.describe() if plan else "",
        batchnorm_recomputed=batchnorm and bool(probe),
    )
