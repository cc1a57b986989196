"""Data-parallel training: DDP, FSDP2 and the ZeRO stages, the same code for a trace and a real run.

A strategy is applied to a built model by :func:`wrap` (and, for ZeRO-1, to its optimizer by
:func:`make_sharded_optimizer`): PyTorch's own ``DistributedDataParallel``, ``fully_shard`` (FSDP2)
and ``ZeroRedundancyOptimizer``. The tracer runs them on fake tensors over a fake process group
(:func:`fake_world`: one process, any world size, collectives that move nothing), the real runs
over the process group ``torchrun`` set up. Nothing here is a formula: what a rank holds is what
PyTorch's code allocates.

The ZeRO stages, in PyTorch's terms (docs/multigpu.md):

* ``ddp``: ``DistributedDataParallel``: full replicas, gradient buckets (``bucket_cap_mb``,
  ``gradient_as_bucket_view``);
* ``zero1``: DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer``: optimizer state sharded;
* ``zero2``: ``fully_shard(reshard_after_forward=False)``: gradients and optimizer state sharded,
  parameters gathered from forward to the end of backward (FSDP's SHARD_GRAD_OP);
* ``zero3`` = ``fsdp``: ``fully_shard`` (defaults): parameters, gradients and optimizer state sharded,
  each unit's parameters gathered for its forward and again for its backward.

``offload``: ``params`` is FSDP2's ``CPUOffloadPolicy`` (sharded parameters, gradients and the
optimizer step on the host); ``optimizer`` keeps the optimizer state on the host (DeepSpeed's
ZeRO-Offload), which FSDP2 has no setting for: the trace moves those bytes off the device.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

#: strategy -> what it is (the label rows and tables use)
STRATEGIES: dict[str, str] = {
    "none": "one process",
    "ddp": "DDP (replicas, gradient buckets)",
    "zero1": "ZeRO-1 (DDP + sharded optimizer state)",
    "zero2": "ZeRO-2 (FSDP2, reshard_after_forward=False)",
    "zero3": "ZeRO-3 (FSDP2 fully_shard)",
    "fsdp": "FSDP2 fully_shard (= ZeRO-3)",
}
_ALIASES = {"single": "none", "": "none", "fsdp2": "fsdp", "fully_shard": "fsdp", "zero-1": "zero1", "zero-2": "zero2"}
_ALIASES |= {"zero-3": "zero3", "shard_grad_op": "zero2", "full_shard": "fsdp"}
#: where model states may live: on the device; optimizer state and its step on the CPU; FSDP2's
#: CPUOffloadPolicy (sharded parameters, gradients and optimizer state on the host)
OFFLOADS = ("none", "optimizer", "params")
_OFFLOAD_ALIASES = {"": "none", "off": "none", "no": "none", "false": "none", "optimizer-state": "optimizer"}
#: strategies built on fully_shard
FSDP_STRATEGIES = ("fsdp", "zero2", "zero3")
#: DDP's default bucket size (torch.nn.parallel.DistributedDataParallel)
DEFAULT_BUCKET_CAP_MB = 25.0


def get_strategy(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in STRATEGIES:
        raise UsageError(
            f"unknown `strategy` {name!r}", f"choose one of: {', '.join(s for s in STRATEGIES if s != 'none')}"
        )
    return key


def get_offload(name: str | None) -> str:
    key = "none" if name is None else str(name).strip().lower()
    key = _OFFLOAD_ALIASES.get(key, key)
    if key not in OFFLOADS:
        raise UsageError(
            f"unknown offload {name!r}", "`offload` optimizer keeps the optimizer state on the CPU (params: FSDP2's)"
        )
    return key


def check_plan(strategy: str, world_size: int, offload: str, bucket_cap_mb: float) -> tuple[str, str]:
    """Validate a workload's data-parallel fields; returns the normalised (strategy, offload)."""
    strategy = get_strategy(strategy)
    offload = get_offload(offload)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"`world_size` must be a positive integer, got {world_size!r}", "e.g. `world_size` 8")
    if strategy == "none" and world_size > 1:
        raise UsageError(
            f"`world_size` {world_size} needs a `strategy`", "add `strategy` ddp, fsdp, zero1, zero2 or zero3"
        )
    if strategy == "none" and offload == "params":
        raise UsageError("`offload` params needs a `strategy`", "add `strategy` fsdp (FSDP2's CPUOffloadPolicy)")
    if not bucket_cap_mb > 0:
        raise UsageError(f"`bucket_cap_mb` must be positive, got {bucket_cap_mb!r}", "DDP's default is 25")
    check_available(strategy, offload)
    return strategy, offload


def plan_of(workload: Any) -> Plan:
    """The :class:`Plan` of a :class:`memprof.engine.workload.Workload`."""
    return Plan(
        workload.strategy,
        workload.world_size,
        workload.offload,
        float(workload.bucket_cap_mb),
        bool(workload.gradient_as_bucket_view),
    )


def is_sharded(strategy: str) -> bool:
    """Parameters are sharded (FSDP2): a rank holds 1/N of them between units."""
    return strategy in FSDP_STRATEGIES


# =========================================================================== what the installed torch has
def _fully_shard():
    """FSDP2's ``fully_shard`` (torch >= 2.6 public; 2.4-2.5 under ``_composable``), or None."""
    try:
        from torch.distributed.fsdp import fully_shard

        return fully_shard
    except ImportError:
        pass
    try:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5

        return fully_shard
    except ImportError:
        return None


def _offload_policy():
    for where in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            module = __import__(where, fromlist=["CPUOffloadPolicy"])
            return module.CPUOffloadPolicy
        except (ImportError, AttributeError):
            continue
    return None


def check_available(strategy: str, offload: str = "none") -> None:
    """Raise :class:`UsageError` when the installed torch cannot run ``strategy`` (one line + hint)."""
    if strategy == "none":
        return
    import torch

    if not torch.distributed.is_available():
        raise UsageError(
            f"`strategy` {strategy}: this torch build has no torch.distributed",
            "install a torch build with distributed support (the PyPI wheels have it)",
        )
    if is_sharded(strategy) and _fully_shard() is None:
        raise UsageError(
            f"`strategy` {strategy} needs FSDP2 (torch.distributed.fsdp.fully_shard), which torch "
            f"{torch.__version__} lacks",
            "upgrade to torch >= 2.4, or use `strategy` ddp or zero1",
        )
    if strategy == "zero1":
        try:
            from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: F401
        except ImportError:
            raise UsageError(
                f"`strategy` zero1 needs torch.distributed.optim.ZeroRedundancyOptimizer, which torch "
                f"{torch.__version__} lacks",
                "use `strategy` ddp or fsdp",
            ) from None
    if offload == "params" and not is_sharded(strategy):
        raise UsageError(
            f"`offload` params needs a sharded strategy, not {strategy}",
            "use `strategy` fsdp (FSDP2's CPUOffloadPolicy), or `offload` optimizer",
        )
    if offload == "params" and _offload_policy() is None:
        raise UsageError(
            f"`offload` params needs FSDP2's CPUOffloadPolicy, which torch {torch.__version__} lacks",
            "upgrade torch, or use `offload` optimizer",
        )


# =========================================================================== the fake world
@dataclass
class World:
    """The process group and 1-D device mesh a strategy runs over."""

    world_size: int
    rank: int
    group: Any = None
    mesh: Any = None
    fake: bool = False
    #: a tracer's context around DDP's bucket rebuild (to label the new buckets), or None
    bucket_context: Callable[[], contextlib.AbstractContextManager] | None = None


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0, device_type: str = "cpu") -> Iterator[World]:
    """A fake process group of ``world_size`` ranks in this process, seen from ``rank``.

    PyTorch's ``"fake"`` backend (``torch.testing._internal.distributed.fake_pg``) runs every
    collective as a no-op that moves no data, so PyTorch's distributed code allocates exactly
    what it would on ``rank`` of a real job. It is the default group while the context is open.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        raise UsageError(
            "a process group is already initialised in this process: cannot trace another world",
            "trace before init_process_group, or in another process",
        )
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield World(world_size, rank, dist.group.WORLD, _mesh(device_type, world_size), fake=True)
    finally:
        dist.destroy_process_group()


def _mesh(device_type: str, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,))


_trial_group: Any = None


@contextlib.contextmanager
def trial_group(group) -> Iterator[None]:
    """Real runs inside use ``group`` (a process group made for one trial) instead of the default one."""
    global _trial_group
    saved, _trial_group = _trial_group, group
    try:
        yield
    finally:
        _trial_group = saved


def current_world(device_type: str) -> World:
    """The world ``torchrun`` set up (the default process group, or the trial's: :func:`trial_group`)."""
    import torch.distributed as dist

    group = _trial_group if _trial_group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    return World(size, dist.get_rank(group), group, _mesh_of(group, device_type, size))


def _mesh_of(group, device_type: str, size: int):
    import torch.distributed as dist

    if group is dist.group.WORLD:
        return _mesh(device_type, size)
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device_type)


# =========================================================================== FSDP units
def fsdp_units(model) -> list[str]:
    """The modules ``fully_shard`` is applied to before the root: one communication unit each.

    The repeated blocks (transformer layers, ResNet bottlenecks: the same rule as
    ``--checkpointing blocks``), else the children of the module with the most children that
    hold parameters (looking through plain containers), else none (the root is one unit).
    """
    from .checkpointing import _find_block_type, _members, _outermost_instances

    found = _find_block_type(model)
    if found is not None:
        return _outermost_instances(model, found[0])
    best: list[str] = []
    for name, module in model.named_modules():
        kids = [n for n, c in _members(module) if any(True for _ in c.parameters())]
        if len(kids) > len(best):
            prefix = f"{name}." if name else ""
            best = [prefix + n for n in kids]
    return best if len(best) >= 2 else []


# =========================================================================== wrapping
@dataclass(frozen=True)
class Plan:
    """How a step is distributed; built from a workload's fields."""

    strategy: str
    world_size: int
    offload: str = "none"
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB
    gradient_as_bucket_view: bool = False


def wrap(model, plan: Plan, world: World, device_type: str):
    """Apply ``plan.strategy`` to ``model`` (built, on its device); returns the model to train."""
    if plan.strategy in ("ddp", "zero1"):
        return _wrap_ddp(model, plan, world, device_type)
    if is_sharded(plan.strategy):
        return _wrap_fsdp(model, plan, world)
    return model


def _wrap_ddp(model, plan: Plan, world: World, device_type: str):
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs: dict[str, Any] = {
        "process_group": world.group,
        "bucket_cap_mb": plan.bucket_cap_mb,
        "gradient_as_bucket_view": plan.gradient_as_bucket_view,
    }
    if device_type == "cuda" and not world.fake:
        import torch

        kwargs["device_ids"] = [torch.cuda.current_device()]
    if world.fake and "init_sync" in _params(DDP.__init__):
        kwargs["init_sync"] = False  # reads parameter values: nothing to read on fake tensors
    ddp = DDP(model, **kwargs)
    if world.fake:
        _fake_ddp(ddp, world)
    return ddp


@functools.cache
def _params(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _wrap_fsdp(model, plan: Plan, world: World):
    fully_shard = _fully_shard()
    assert fully_shard is not None  # check_available() ran first
    kwargs: dict[str, Any] = {"mesh": world.mesh, "reshard_after_forward": plan.strategy != "zero2"}
    if plan.offload == "params" and not world.fake:
        # on fake CPU tensors the host is the device (and pinning needs CUDA): the tracer moves the
        # offloaded bytes to the host itself
        kwargs["offload_policy"] = _offload_policy()()
    modules = dict(model.named_modules())
    for name in fsdp_units(model):
        fully_shard(modules[name], **kwargs)
    fully_shard(model, **kwargs)
    return model


def make_sharded_optimizer(params, optimizer_class, defaults: dict, world: World):
    """ZeRO-1: PyTorch's ZeroRedundancyOptimizer (each rank keeps the state of its partition)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, process_group=world.group, **defaults)


def heaviest_partition(optimizer) -> int:
    """ZeRO-1: the rank whose partition holds the most parameter bytes (and so the most optimizer state)."""
    partitions = optimizer._partition_parameters()
    sizes = [sum(p.numel() * p.element_size() for group in groups for p in group["params"]) for groups in partitions]
    return max(range(len(sizes)), key=lambda r: (sizes[r], -r))


def local_tensor(t):
    """A DTensor's local shard (what the rank holds), or ``t``."""
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t


# =========================================================================== DDP on fake tensors
def _fake_ddp(ddp, world: World) -> None:
    """Two places DDP reads tensor values, made to work on fake tensors without changing what it allocates.

    * Its default all-reduce hook returns the future of the process group's work, which the fake
      backend leaves empty: a hook that all-reduces the bucket in place and returns it (what gloo
      and NCCL do).
    * Rebuilding the buckets after the first backward (in the next forward) writes the new bucket
      order into a small integer tensor and broadcasts it: those index tensors are made real; the
      buckets themselves stay fake.
    """
    import torch
    import torch.distributed as dist

    group = ddp.process_group

    def allreduce(_state, bucket):
        buffer = bucket.buffer()
        dist.all_reduce(buffer, group=group)
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(buffer)
        return fut

    ddp.register_comm_hook(None, allreduce)

    def rebuild_first(module, args):
        if torch.is_grad_enabled():
            label = world.bucket_context() if world.bucket_context is not None else contextlib.nullcontext()
            with label, _RealIndexTensors():
                module.reducer._rebuild_buckets()  # DDP's own call in forward then finds nothing to do

    ddp.register_forward_pre_hook(rebuild_first)


class _RealIndexTensors:
    """While active: integer tensors (bucket indices) are real, everything else stays fake."""

    def __enter__(self):
        import torch
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                dtype = kwargs.get("dtype")
                integer_factory = not tensors and dtype is not None and not dtype.is_floating_point
                real_inputs = tensors and not any(isinstance(t, FakeTensor) for t in tensors)
                if integer_factory or real_inputs:
                    with unset_fake_temporarily():
                        return func(*args, **kwargs)
                return func(*args, **kwargs)

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
