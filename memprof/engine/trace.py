"""The traced estimator: run the real training step on fake tensors and record every storage.

How it works
------------
The model, optimizer and batch are built under PyTorch's ``FakeTensorMode`` (tensors
with shapes, dtypes and storages but no data: no memory, no GPU). The shared
:func:`memprof.engine.workload.train_step` then runs ``steps`` times under a
:class:`memprof.engine.tracking.StorageTracker`, which sees every storage an op creates and
when its last reference dies. Each allocation is recorded with the phase (setup,
forward, backward, optimizer), the module it happened in (forward hooks; in backward,
the autograd node being executed is mapped back to the module that created it through
autograd sequence numbers) and, once the step tells, its category:

* Parameter / Buffer / Input: registered before the step;
* Optimizer state: storages held in ``optimizer.state`` after the step (Adagrad's,
  created by its constructor, included: the constructor is traced too);
* Gradient: storages that are some ``param.grad`` when backward ends;
* Activation: storages created in forward and still alive when forward ends
  (what autograd saved for backward, plus the loss);
* Temporary: everything else (freed within its phase).

The timeline of live bytes is replayed afterwards, so the same record gives the
CPU prediction (raw storage bytes), the CUDA ``max_memory_allocated`` prediction
(512-byte rounded, plus cuBLAS workspaces), the ``max_memory_reserved`` prediction
(:mod:`memprof.engine.allocator` replay) and the NVML prediction (reserved + CUDA context).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import DataDependentError, MemprofError, ModelCodeError, TraceError, UsageError
from ..results import CudaTarget, MemCategory, ModelledBytes, SavedBlock, TimelinePoint, TraceResult
from . import cpumem, fastfake, overheads, placement
from .allocator import AllocatorConf, CachingAllocatorModel, conf_from_source
from .flops import FlopTally
from .gradaccum import InputBufferMirror
from .loading import BATCH_HOOK, LOSS_HOOK
from .modtrack import ModuleTracker
from .shadow import Shadows
from .workload import Prepared, Workload, build_model, generate_step, make_optimizer, train_step

if TYPE_CHECKING:
    from .tracking import StorageTracker

PHASES = ("setup", "forward", "backward", "optimizer", "done")
_MATMUL_OPS: frozenset | None = None
_TIMELINE_MAX = 2000


def _matmul_ops() -> frozenset:
    global _MATMUL_OPS
    if _MATMUL_OPS is None:
        import torch

        aten = torch.ops.aten
        ops: list[Any] = []
        for name in (
            "mm",
            "addmm",
            "bmm",
            "baddbmm",
            "addbmm",
            "addmv",
            "mv",
            "_addmm_activation",
            "dot",
            "_scaled_mm",
            "_int_mm",
        ):
            packet = getattr(aten, name, None)
            if packet is not None:
                ops.extend(getattr(packet, o) for o in packet.overloads())
        _MATMUL_OPS = frozenset(ops)
    return _MATMUL_OPS


# =========================================================================== recording
class _TraceRecorder:
    """Collects allocation records and events while the step runs; analysis happens afterwards."""

    def __init__(self, target: str, kernel_scratch: bool = True, cuda_target: CudaTarget | None = None):
        self.target = target
        self.cuda_target = cuda_target
        self.rec_nbytes: list[int] = []
        self.rec_phase: list[str] = []
        self.rec_module: list[str | None] = []
        self.rec_step: list[int] = []
        self.rec_cat: list[MemCategory | None] = []
        self.rec_host: list[bool] = []  # lives on the host for a CUDA step (Adam's scalar "step")
        self.rec_kind: list[overheads.Kind | None] = []  # what a synthetic (modelled) allocation is
        self.key_to_rec: dict[int, int] = {}
        # events: (rec, +1 alloc / -1 free, op_index, phase, module, step)
        self.events: list[tuple[int, int, int, str, str | None, int]] = []
        self.phase = "setup"
        self.step = 0
        self.category: MemCategory | None = None  # forced category while set (setup)
        # the module running each allocation; on_enter keeps each call's input shapes for error messages
        self.modules = ModuleTracker(on_enter=self._enter_module, on_exit=self._exit_module)
        self.param_layers_done = 0  # forward calls of modules with their own parameters that returned
        self.tracker: StorageTracker | None = None
        self.need_workspace = target == "cuda"
        self.accum = InputBufferMirror()  # which gradient sums autograd does in place on real tensors
        self.cpu_scratch = target == "cpu" and kernel_scratch
        # fused kernels' buffers, measured on the CPU: in a real run as the op runs, else by a probe
        self.real = False
        self.probe: cpumem.OpProbe | None = None
        self.workspace_source = ""
        self.lt_bytes, self.lt_source = 0, ""
        self.lt_threads: set[str] = set()
        if cuda_target is not None:
            self.workspace_bytes, self.workspace_source = overheads.cublas_workspace(cuda_target)
            self.lt_bytes, self.lt_source = overheads.cublaslt_workspace(cuda_target)
        else:
            self.workspace_bytes = 0
        self.forward_start: dict[int, int] = {}  # step -> index of its first event
        self.optimizer_start: dict[int, int] = {}
        self.forward_op: dict[int, int] = {}
        self.optimizer_op: dict[int, int] = {}
        self.done_start: dict[int, int] = {}
        self.done_op: dict[int, int] = {}
        self.forward_end: dict[int, int] = {}  # step -> index of the first event after the model's forward returned
        self.forward_end_op: dict[int, int] = {}
        # step -> records a plain loop keeps alive into the next step: (the output's, the loss's)
        self.kept: dict[int, tuple[list[int], list[int]]] = {}
        self.backward_start: dict[int, int] = {}
        self.backward_op: dict[int, int] = {}
        self.root_label: str | None = None
        self.kv_cache_bytes: int | None = None  # generation: the KV cache after the last forward
        self.kv_recs: list[int] = []
        self.blocks: dict[str, str] = {}  # repeated blocks of the model (ModuleList children): name -> type
        self.workspace_threads: set[str] = set()
        self.benchmarked: set[tuple] = set()  # convolution shapes cuDNN's benchmark has timed
        self.saw_convolution = False
        self.tally: FlopTally | None = None  # counts FLOPs while set (the first step)
        self.module_types: dict[str, str] = {}
        self.sharded = False  # FSDP / ZeRO-2/3: storages grown by resizing are gathered parameters
        self.gloo = False  # a CPU rank: gloo's own collective buffers are modelled
        self.gloo_held: int | None = None  # the record of gloo's last buffer, until its worker thread frees it
        from .tracking import RESIZE

        self.resize_func = RESIZE
        # records made inside placement.on("host" / "paged"): CPU memory / unified memory on a CUDA run
        self.placed_host: set[int] = set()
        self.placed_paged: set[int] = set()

    def locate(self) -> tuple[str | None, bool]:
        """For the FLOP tally: the module running now, and whether this is a recomputation in backward."""
        return self.module_now(), self.phase == "backward" and bool(self.modules.stack)

    # -- module attribution -------------------------------------------------------------
    def _enter_module(self, module, name: str, args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
        """The module tracker's entry hook: FSDP2's gathered parameters categorised; the call's input shapes."""
        if self.sharded:  # FSDP2 swapped in the unsharded parameters just before (its pre-hook runs first)
            self.categorize_tensors(module.parameters(recurse=False), MemCategory.GATHERED_PARAMETER)
        return _input_shapes(module, name, args, kwargs)

    def _exit_module(self, frame, output) -> None:
        """The module tracker's exit hook: layers that returned; when the model's forward returned (a plain
        loop's previous output dies then: :func:`_replay_step` frees it there)."""
        if output is not None and frame.module._parameters:  # None: its forward raised (always_call)
            self.param_layers_done += 1
        if frame.name == self.root_label and self.phase == "forward" and self.step not in self.forward_end:
            self.forward_end[self.step] = len(self.events)
            if self.tracker is not None:
                self.forward_end_op[self.step] = self.tracker.op_count

    def module_now(self) -> str | None:
        stack = self.modules.stack
        if stack:
            return stack[-1].name
        if self.phase == "backward":
            return self.modules.backward_module()
        return None

    # -- tracker callbacks ----------------------------------------------------------------
    def on_alloc(self, key: int, nbytes: int, func: Any) -> None:
        rec = len(self.rec_nbytes)
        self.key_to_rec[key] = rec
        module = self.module_now()
        self.rec_nbytes.append(nbytes)
        self.rec_phase.append(self.phase)
        self.rec_module.append(module)
        self.rec_step.append(self.step)
        if func is self.resize_func and self.category is None and self.sharded:
            self.rec_cat.append(MemCategory.GATHERED_PARAMETER)  # FSDP2 re-allocating an unsharded parameter
        else:
            self.rec_cat.append(self.category)
        self.rec_kind.append(None)
        place = placement.current()
        self.rec_host.append(place != "device")
        if place == "host":
            self.placed_host.add(rec)
        elif place == "paged":
            self.placed_paged.add(rec)
        op = self.tracker.op_count if self.tracker is not None else 0
        self.events.append((rec, 1, op, self.phase, module, self.step))

    def on_free(self, key: int, nbytes: int) -> None:
        rec = self.key_to_rec.pop(key, None)
        if rec is None:
            return
        op = self.tracker.op_count if self.tracker is not None else 0
        self.events.append((rec, -1, op, self.phase, self.module_now(), self.step))

    def synthetic(self, nbytes: int, category: MemCategory, kind: overheads.Kind) -> int:
        """An allocation the trace cannot see (cuBLAS workspace, kernel scratch), modelled as ``kind``; its record."""
        rec = len(self.rec_nbytes)
        module = self.module_now()
        self.rec_nbytes.append(nbytes)
        self.rec_phase.append(self.phase)
        self.rec_module.append(module)
        self.rec_step.append(self.step)
        self.rec_cat.append(category)
        self.rec_host.append(False)
        self.rec_kind.append(kind)
        assert self.tracker is not None  # called from the tracker's dispatch
        self.events.append((rec, 1, self.tracker.op_count, self.phase, module, self.step))
        return rec

    def mark_modelled(self, tensor, kind: overheads.Kind) -> None:
        """The storage of ``tensor`` (just registered) has a modelled size, not a traced one."""
        rec = self.key_to_rec.get(tensor.untyped_storage()._cdata)
        if rec is not None:
            self.rec_kind[rec] = kind

    def free_synthetic(self, rec: int) -> None:
        assert self.tracker is not None  # called from the tracker's dispatch
        self.events.append((rec, -1, self.tracker.op_count, self.phase, self.module_now(), self.step))

    def clone(self, rec: int, step: int) -> int:
        new = len(self.rec_nbytes)
        if rec in self.placed_host:
            self.placed_host.add(new)
        if rec in self.placed_paged:
            self.placed_paged.add(new)
        self.rec_nbytes.append(self.rec_nbytes[rec])
        self.rec_phase.append(self.rec_phase[rec])
        self.rec_module.append(self.rec_module[rec])
        self.rec_step.append(step)
        self.rec_cat.append(self.rec_cat[rec])
        self.rec_host.append(self.rec_host[rec])
        self.rec_kind.append(self.rec_kind[rec])
        return new

    @contextlib.contextmanager
    def forced(self, category: MemCategory):
        """Allocations made inside are ``category`` (DDP's rebuilt buckets)."""
        saved, self.category = self.category, category
        try:
            yield
        finally:
            self.category = saved

    def gloo_buffer(self, nbytes: int) -> None:
        """A collective's buffer on gloo's worker thread. The thread frees it after the collective is
        done, when it next runs: on a busy machine that is when it starts the next collective, so
        each buffer is held until then (or until the optimizer step, which runs none)."""
        self.release_gloo()
        self.gloo_held = self.synthetic(nbytes, MemCategory.COMMUNICATION, GLOO)

    def release_gloo(self) -> None:
        if self.gloo_held is not None:
            self.free_synthetic(self.gloo_held)
            self.gloo_held = None

    def categorize_tensors(self, tensors, category: MemCategory) -> None:
        """Uncategorised records of these tensors' storages (a collective's buffers, gathered parameters)."""
        import torch

        for t in tensors:
            if isinstance(t, torch.Tensor):
                rec = self.key_to_rec.get(_local(t).untyped_storage()._cdata)
                if rec is not None and self.rec_cat[rec] is None:
                    self.rec_cat[rec] = category

    def categorize_live(self, keys, category: MemCategory, only_unset: bool = True) -> None:
        for key in keys:
            rec = self.key_to_rec.get(key)
            if rec is not None and (not only_unset or self.rec_cat[rec] is None):
                self.rec_cat[rec] = category


_COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"})
#: collectives ProcessGroupGloo runs through a buffer of its own, allocated on its worker thread (measured:
#: scripts/validate_multigpu.py): op name -> (the argument that sizes it, x group size)
_GLOO_SCRATCH = {
    "c10d::_allgather_base_": (0, False),  # the output's size
    "c10d::_reduce_scatter_base_": (1, False),  # the input's size
    "_c10d_functional::all_gather_into_tensor": (0, True),  # input x group size: the output's
    "_c10d_functional::reduce_scatter_tensor": (0, False),
}


GLOO = overheads.Kind(
    "gloo collective buffer",
    "ProcessGroupGloo allocates the output of all_gather_into_tensor and the input of reduce_scatter_tensor on "
    "its own thread while they run (measured: scripts/validate_multigpu.py)",
    verified=True,
)


def _gloo_scratch(func, args) -> int:
    """Bytes gloo allocates on its own thread for collective ``func``."""
    how = _GLOO_SCRATCH.get(func._schema.name)
    if how is None:
        return 0
    index, times_group = how
    t = args[index]
    nbytes = t.numel() * t.element_size()
    return nbytes * int(args[1]) if times_group else nbytes


def _scratch_rules(recorder: _TraceRecorder) -> dict:
    """op -> (kind, bytes(args)) for the kernel scratch a target allocates inside an op."""
    import torch

    aten = torch.ops.aten
    rules: dict = {}

    def add(name: str, overload: str, kind: overheads.Kind, fn: Callable[[Any], int]) -> None:
        packet = getattr(aten, name, None)
        op = getattr(packet, overload, None) if packet is not None else None
        if op is not None:
            rules[op] = (kind, fn)

    if recorder.target == "cuda":
        add(
            "_scaled_dot_product_flash_attention_backward",
            "default",
            overheads.FLASH_BWD,
            overheads.flash_backward_scratch,
        )
        add(
            "_scaled_dot_product_efficient_attention_backward",
            "default",
            overheads.EFFICIENT_BWD,
            overheads.efficient_backward_scratch,
        )
        add("embedding_dense_backward", "default", overheads.EMBEDDING_BWD, overheads.embedding_backward_scratch)
        if recorder.cuda_target is not None and recorder.cuda_target.cudnn_benchmark:
            seen = recorder.benchmarked
            for op in (aten.convolution.default, aten.convolution_backward.default):

                def first_call(args, _op=op) -> int:
                    key, nbytes = overheads.cudnn_benchmark_workspace(_op, args)
                    if not nbytes or key in seen:
                        return 0
                    seen.add(key)
                    return nbytes

                rules[op] = (overheads.CUDNN_BENCHMARK, first_call)
    elif recorder.cpu_scratch:
        for op in (aten.convolution.default, aten.convolution_backward.default):
            rules[op] = (overheads.ONEDNN, functools.partial(overheads.onednn_conv_scratch, op))
    return rules


def _lt_ops() -> frozenset:
    """Ops that run through cuBLASLt (and its workspace): addmm with a 1-D bias, _addmm_activation, _scaled_mm."""
    import torch

    aten = torch.ops.aten
    return frozenset(
        op
        for op in (getattr(getattr(aten, n, None), "default", None) for n in ("_addmm_activation", "_scaled_mm"))
        if op is not None
    )


def _make_tracker(recorder: _TraceRecorder):
    import torch
    from torch.utils._pytree import tree_leaves

    from .tracking import StorageTracker

    matmuls = _matmul_ops()
    lt_ops = _lt_ops()
    addmm = torch.ops.aten.addmm.default
    prim_device = torch.ops.prim.device.default
    cuda = recorder.target == "cuda"
    scratch_rules = _scratch_rules(recorder)
    convs = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)
    add, add_ = torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor
    accum = recorder.accum
    onednn_rnn = tuple(
        getattr(getattr(torch.ops.aten, name, None), "default", None)
        for name in ("mkldnn_rnn_layer", "mkldnn_rnn_layer_backward")
    )
    fused = cpumem.fused_ops() if recorder.cpu_scratch else frozenset()

    class _TraceTracker(StorageTracker):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is prim_device:  # FakeTensorMode asks for devices through the mode stack: no storage, no op
                return self.run_op(func, args, kwargs) if self.run_op is not None else func(*args, **(kwargs or {}))
            if recorder.phase == "backward":
                if not accum.started:
                    accum.start()
                if func is add and not kwargs:
                    item = accum.match(args)
                    if item is not None:  # autograd summing two gradients for one input (InputBuffer::add)
                        inplace = accum.inplace(item, *args)
                        out = super().__torch_dispatch__(add_ if inplace else add, types, args, kwargs)
                        accum.delivered(item, out)
                        return out
            if cuda and func in matmuls:
                # one cuBLAS handle (and workspace) per thread: forward and optimizer run on the
                # main thread, backward on autograd's device thread
                thread = "backward" if recorder.phase == "backward" else "main"
                if recorder.need_workspace and thread not in recorder.workspace_threads:
                    recorder.workspace_threads.add(thread)
                    recorder.synthetic(recorder.workspace_bytes, MemCategory.CUDA_OVERHEAD, overheads.CUBLAS)
                    recorder.need_workspace = len(recorder.workspace_threads) < 2
                if (
                    recorder.lt_bytes
                    and thread not in recorder.lt_threads
                    and (func in lt_ops or (func is addmm and args and getattr(args[0], "dim", lambda: 0)() == 1))
                ):
                    recorder.lt_threads.add(thread)
                    recorder.synthetic(recorder.lt_bytes, MemCategory.CUDA_OVERHEAD, overheads.CUBLASLT)
            if func.namespace in _COLLECTIVE_NAMESPACES:
                # the buffers a collective reads and writes (all-gather output, reduce-scatter input, buckets)
                scratch = _gloo_scratch(func, args) if recorder.gloo else 0
                if scratch:
                    recorder.gloo_buffer(scratch)
                out = super().__torch_dispatch__(func, types, args, kwargs)
                recorder.categorize_tensors(tree_leaves((args, kwargs)), MemCategory.COMMUNICATION)
                return out  # a collective computes nothing: no FLOPs to tally
            if func in convs:
                recorder.saw_convolution = True
            rule = scratch_rules.get(func)
            scratch = 0
            if rule is not None:
                kind, size = rule
                scratch = size(args)
            if not cuda and func in onednn_rnn:
                out = _onednn_lstm(self, recorder, func, args, kwargs, func is onednn_rnn[0])
            elif fused and (func in fused or (recorder.real and cpumem.has_nested(args, kwargs))):
                out = _fused_op(self, recorder, func, types, args, kwargs)
            elif scratch:
                rec = recorder.synthetic(scratch, MemCategory.TEMPORARY, kind)
                try:
                    out = super().__torch_dispatch__(func, types, args, kwargs)
                finally:
                    recorder.free_synthetic(rec)
            else:
                out = super().__torch_dispatch__(func, types, args, kwargs)
            tally = recorder.tally
            if tally is not None:
                tally.op(func, args, kwargs, out, recorder.phase)
            return out

    tracker = _TraceTracker(on_alloc=recorder.on_alloc, on_free=recorder.on_free)
    recorder.tracker = tracker
    return tracker


def _fused_op(tracker, recorder: _TraceRecorder, func, types, args, kwargs):
    """An op whose CPU kernel allocates inside it (a fused transformer block, a nested-tensor kernel): its
    buffers beyond the storages it returns, measured (:mod:`memprof.engine.cpumem`), are a temporary
    held while it runs: in a real run the op itself runs measured, in a fake trace a probe of its shapes."""
    from .tracking import StorageTracker

    run = tracker.run_op
    held: list[int] = []

    def run_measured(f, a, k):
        def call():
            return run(f, a, k) if run is not None else f(*a, **(k or {}))

        if recorder.real:
            out, scratch = cpumem.measure_op(call, tracker.live)
        else:
            out = call()  # first: an op fake tensors cannot run (a nested tensor from a mask) needs no probe
            assert recorder.probe is not None  # set for every fake CPU trace with kernel scratch
            scratch = recorder.probe.scratch(f, a, k)
        if scratch:
            held.append(recorder.synthetic(scratch, MemCategory.TEMPORARY, cpumem.FUSED))
        return out

    tracker.run_op = run_measured
    try:
        return StorageTracker.__torch_dispatch__(tracker, func, types, args, kwargs)
    finally:
        tracker.run_op = run
        for rec in held:
            recorder.free_synthetic(rec)


def _input_shapes(module, name: str, args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
    import torch

    return [tuple(a.shape) for a in args if isinstance(a, torch.Tensor) and not a.is_nested]


def _with_meta_fallbacks(run: Callable[[Any, tuple, dict | None], Any]) -> Callable[[Any, tuple, dict | None], Any]:
    """``run``, plus output shapes for ops whose meta kernel refuses what the CPU kernel runs.

    ``torch._grouped_mm`` (mixture-of-experts layers) in float32: its meta kernel accepts only 16-bit
    inputs, the CPU kernel any float. The shape does not depend on the dtype: the meta kernel is
    asked in bfloat16 and the output made in the real dtype.
    """
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    grouped = {
        getattr(torch.ops.aten, name).default
        for name in ("_grouped_mm",)
        if hasattr(torch.ops.aten, name) and hasattr(getattr(torch.ops.aten, name), "default")
    }
    if not grouped:
        return run

    def as_meta(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            dtype = torch.bfloat16 if x.is_floating_point() else x.dtype
            return torch.empty_strided(tuple(x.shape), x.stride(), dtype=dtype, device="meta")
        return x

    def wrapped(func: Any, args: tuple, kwargs: dict | None) -> Any:
        if func not in grouped:
            return run(func, args, kwargs)
        try:
            return run(func, args, kwargs)
        except RuntimeError:
            a = args[0] if args else None
            if not isinstance(a, torch.Tensor) or a.dtype in (torch.bfloat16, torch.float16):
                raise
            with unset_fake_temporarily():
                meta_args = [as_meta(x) for x in args]
                meta_kwargs = {k: as_meta(v) for k, v in (kwargs or {}).items()}
                out = func(*meta_args, **meta_kwargs)
            dtype = (kwargs or {}).get("out_dtype") or a.dtype
            return run(
                torch.ops.aten.empty_strided.default,
                (tuple(out.shape), out.stride()),
                {"dtype": dtype, "device": torch.device("cpu")},
            )

    return wrapped


def _blocks(model) -> dict[str, str]:
    """The model's repeated blocks (the children of its ModuleLists, e.g. "model.layers.0"): name -> type."""
    import torch

    blocks: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            for child_name, child in module.named_children():
                full = f"{name}.{child_name}" if name else child_name
                if not any(full.startswith(b + ".") for b in blocks):
                    blocks[full] = type(child).__name__
    return blocks


def _saved_by_block(rec: _TraceRecorder, sizes: list[int], last: int) -> tuple[SavedBlock, ...]:
    """What each block keeps for backward (activation records of the last step), alike blocks grouped."""
    if not rec.blocks:
        return ()
    prefixes = sorted(rec.blocks, key=len, reverse=True)
    per_block: dict[str, dict[str, int]] = {}
    outside: dict[str, int] = {}
    for r, cat in enumerate(rec.rec_cat):
        if cat is not MemCategory.ACTIVATION or rec.rec_step[r] != last or not sizes[r]:
            continue
        module = rec.rec_module[r] or ""
        block = next((b for b in prefixes if module == b or module.startswith(b + ".")), None)
        if block is None:
            key = module if module and module != rec.root_label else "(outside the blocks: loss, output)"
            outside[key] = outside.get(key, 0) + sizes[r]
            continue
        part = module[len(block) + 1 :].split(".")[0] if module != block else "(its own ops)"
        parts = per_block.setdefault(block, {})
        parts[part] = parts.get(part, 0) + sizes[r]
    rows: list[SavedBlock] = []
    order = list(rec.blocks)
    i = 0
    while i < len(order):
        name = order[i]
        parts = per_block.get(name, {})
        j = i + 1
        while j < len(order) and rec.blocks[order[j]] == rec.blocks[name] and per_block.get(order[j], {}) == parts:
            j += 1
        label = name if j - i == 1 else f"{name}-{order[j - 1].rsplit('.', 1)[-1]}"
        ranked = tuple(sorted(parts.items(), key=lambda kv: -kv[1]))
        rows.append(SavedBlock(label, rec.blocks[name], j - i, sum(parts.values()), ranked))
        i = j
    for key, nbytes in sorted(outside.items(), key=lambda kv: -kv[1]):
        rows.append(SavedBlock(key, "", 1, nbytes))
    return tuple(rows)


def _onednn_lstm(tracker, recorder: _TraceRecorder, func, args, kwargs, forward: bool):
    """oneDNN's LSTM layer on the CPU: its workspace at its real size, its in-kernel scratch as a temporary.

    FakeTensorMode returns ``mkldnn_rnn_layer``'s workspace empty and the backward's two bias
    gradients as one tensor; the real kernel returns a workspace sized by oneDNN (saved for
    backward) and a clone. See :mod:`memprof.engine.rnn`.
    """
    import torch
    from torch.utils._pytree import tree_leaves

    from . import rnn

    # measured here in float32; bfloat16 follows oneDNN's source with its element sizes
    verified = args[0].dtype == torch.float32
    what = rnn.ONEDNN_WHAT
    scratch = 0
    if recorder.cpu_scratch:
        if forward:
            scratch = rnn.onednn_lstm_forward_scratch(rnn.lstm_shape(args), training=torch.is_grad_enabled())
        else:
            scratch = rnn.onednn_lstm_backward_scratch(args)
    rec = recorder.synthetic(scratch, MemCategory.TEMPORARY, rnn.onednn_kind(what, verified)) if scratch else None
    try:
        out = tracker.run_op(func, args, kwargs) if tracker.run_op is not None else func(*args, **(kwargs or {}))
        workspace = None
        if forward and torch.is_grad_enabled():
            nbytes = rnn.onednn_lstm_workspace(rnn.lstm_shape(args))
            workspace = torch.empty(nbytes, dtype=torch.uint8, device=out[3].device)
            out = (*out[:3], workspace)
        elif not forward and out[3] is not None and out[3] is out[4]:
            out = (*out[:4], torch.empty_like(out[3]), *out[5:])  # bias_hh's gradient is a clone
        tracker.op_count += 1
        tracker.register(tree_leaves(out), func)
        if workspace is not None:
            recorder.mark_modelled(workspace, rnn.onednn_kind(rnn.ONEDNN_WORKSPACE_WHAT, verified))
        return out
    finally:
        if rec is not None:
            recorder.free_synthetic(rec)


class _CudnnHooks:
    """What the cuDNN RNN emulation (:func:`memprof.engine.rnn.cudnn_rnn_function`) reports to the recorder."""

    def __init__(self, recorder: _TraceRecorder):
        self.recorder = recorder
        self.dropout_state = False

    def mark(self, tensor, kind: overheads.Kind) -> None:
        self.recorder.mark_modelled(tensor, kind)

    def need_dropout_state(self) -> None:
        """cuDNN's dropout RNG state: made at the first training call with dropout, kept by PyTorch for good."""
        from . import rnn

        if not self.dropout_state:
            self.dropout_state = True
            self.recorder.synthetic(rnn.CUDNN_DROPOUT_STATE_BYTES, MemCategory.CUDA_OVERHEAD, rnn.CUDNN_DROPOUT)


def _install_cudnn_rnns(recorder: _TraceRecorder) -> Callable[[], None]:
    """Route nn.LSTM/GRU/RNN through an emulation of cuDNN's ``_cudnn_rnn`` while tracing for CUDA.

    On CUDA, ``torch._VF.lstm/gru/rnn_tanh/rnn_relu`` run one ``_cudnn_rnn`` for all layers, which
    keeps a reserve space for backward instead of the per-step tensors the CPU decomposition saves.
    Packed sequences keep the CPU path. Returns the function that restores ``torch._VF``.
    """
    import torch

    from . import rnn

    vf = torch._VF
    function = rnn.cudnn_rnn_function()
    hooks = _CudnnHooks(recorder)

    def make(mode: str):
        real = getattr(torch._C._VariableFunctions, mode)

        def call(*args, **kwargs):
            lstm = mode == "lstm"
            unpacked = len(args) == 9 and not kwargs and isinstance(args[2], (list, tuple))
            if lstm:
                unpacked = len(args) == 9 and not kwargs and isinstance(args[1], (list, tuple))
            if not unpacked or not torch.backends.cudnn.enabled:
                return real(*args, **kwargs)
            x, hidden, params, _bias, num_layers, dropout, train, bidirectional, batch_first = args
            hx, cx = (hidden[0], hidden[1]) if lstm else (hidden, None)
            params = list(params)
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            if dtype is not None and x.is_floating_point():  # CUDA autocast runs cuDNN RNNs in half precision
                x, hx = x.to(dtype), hx.to(dtype)
                cx = cx.to(dtype) if cx is not None else None
                params = [p.to(dtype) for p in params]
            if train and dropout > 0 and num_layers > 1:
                hooks.need_dropout_state()
            spec = rnn.cudnn_call(mode, x, hx, cx, params, num_layers, bidirectional, batch_first)
            output, hy, cy = function.apply(spec, hooks, batch_first, train, x, hx, cx, *params)
            return (output, hy, cy) if lstm else (output, hy)

        return call

    for mode in rnn.GATES:
        setattr(vf, mode, make(mode))

    def restore() -> None:
        for mode in rnn.GATES:
            vf.__dict__.pop(mode, None)

    return restore


def _install_linear() -> Callable[[], None]:
    """``F.linear`` as ATen runs it on real tensors, for the fake ones.

    ATen's ``linear`` on an input it cannot flatten (3-D or more, not contiguous: after a
    transpose) computes ``matmul`` and adds the bias in place - unless the bias is a tensor
    subclass, as fake tensors are, when it allocates the sum instead (an extra output-sized
    tensor at that moment). This does what a real step does. Returns the restoring function.
    """
    import torch.nn.functional as F

    real = F.linear

    def linear(input, weight, bias=None):
        if bias is None or input.dim() <= 2 or input.is_contiguous() or bias.dim() != 1:
            return real(input, weight, bias)
        output = input.matmul(weight.t())
        return output.add_(bias)

    F.linear = linear

    def restore() -> None:
        F.linear = real

    return restore


def _install_fake_deepcopy() -> Callable[[], None]:
    """``copy.deepcopy`` of a fake tensor keeps its ``FakeTensorMode``, as a real copy keeps its device.

    A ``FakeTensor`` holds its mode in its ``__dict__``, which ``Tensor.__deepcopy__`` deep-copies:
    the copy lands in a new ``FakeTensorMode``, and every op of the tracing mode then converts it
    again as a new storage - each use of a copied weight counted as a fresh weight-sized tensor.
    Modules built with ``copy.deepcopy`` (``nn.TransformerEncoder``/``Decoder``'s cloned layers, EMA
    copies) traced 6.5 % high. Returns the restoring function.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    missing = object()
    previous = FakeTensorMode.__dict__.get("__deepcopy__", missing)

    def deepcopy(self, memo):  # the mode is shared state, not a value: the copy uses the same one
        return self

    FakeTensorMode.__deepcopy__ = deepcopy  # type: ignore[attr-defined]

    def restore() -> None:
        if previous is missing:
            del FakeTensorMode.__deepcopy__  # type: ignore[attr-defined]
        else:
            FakeTensorMode.__deepcopy__ = previous  # type: ignore[attr-defined]

    return restore


# =========================================================================== building on fake tensors
_INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


def _build_fake_model(workload: Workload):
    """Build the model on fake CPU tensors (call inside FakeTensorMode).

    ``torch.nn.init`` functions are skipped while building (values do not exist on fake
    tensors; recent ``trunc_normal_`` even reads them). Constructors that read tensor values
    themselves (``.item()``, ``.tolist()``) cannot run on fake tensors: such a model is built
    with real tensors, each parameter and buffer swapped for a fake one as it is registered
    (the ``init_empty_weights`` idea), so only the constructor's own small computations are real.
    """
    import torch

    # values do not matter on fake tensors: skip the initialisers' kernels (a sixth of a trace)
    init = torch.nn.init
    saved = {name: getattr(init, name) for name in _INITIALISERS if hasattr(init, name)}

    def skip(tensor, *args, **kwargs):
        return tensor

    for name in saved:
        setattr(init, name, skip)
    try:
        try:
            return build_model(workload, "cpu")
        except MemprofError as exc:
            if "DataDependent" not in exc.message and "item()" not in exc.message:
                raise
        return _build_with_fake_parameters(workload)
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _build_with_fake_parameters(workload: Workload):
    """Build the model outside FakeTensorMode; every parameter/buffer becomes fake when registered."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
    Module = torch.nn.Module
    real_param, real_buffer = Module.register_parameter, Module.register_buffer

    def fake_like(t):
        if t is None or isinstance(t, FakeTensor):
            return t
        with mode:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")

    def register_parameter(self, name, param):
        if param is not None and not isinstance(param, FakeTensor):
            param = torch.nn.Parameter(fake_like(param.detach()), requires_grad=param.requires_grad)
        return real_param(self, name, param)

    def register_buffer(self, name, tensor, persistent=True):
        return real_buffer(self, name, fake_like(tensor), persistent)

    # swapped on the class while the model is built, as the initialisers are above
    patched: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
        "register_parameter": (register_parameter, real_param),
        "register_buffer": (register_buffer, real_buffer),
    }
    for name, (fn, _) in patched.items():
        setattr(Module, name, fn)
    try:
        with unset_fake_temporarily():
            return build_model(workload, "cpu")
    finally:
        for name, (_, fn) in patched.items():
            setattr(Module, name, fn)


# =========================================================================== errors
def _forward_error(exc: Exception, recorder: _TraceRecorder, model, workload: Workload) -> MemprofError:
    """The exception as raised, the model's line, and a hint from the evidence (:mod:`.blame`)."""
    from .blame import at, expects, forward_error, raised

    spec = workload.model
    if spec.loss_hook is not None and spec.batch_hook is None and _raised_in(exc, spec.loss_hook):
        # memprof made the inputs from a shape, so there is no target: the loss hook got None
        return ModelCodeError(
            f"{LOSS_HOOK}(output, target) raised {raised(exc)}{at(exc)}; memprof passes target=None when the "
            f"model has no {BATCH_HOOK}",
            f"define {BATCH_HOOK}(batch_size, device, dtype) returning (inputs, target) next to the model, "
            f"or build the target inside {LOSS_HOOK}",
        )
    modules = recorder.modules
    frame = modules.stack[-1] if modules.stack else modules.failed  # the innermost call that raised
    where = frame.name if frame is not None else None
    root = frame is None or frame.module is model or frame.module is getattr(model, "module", None)  # DDP's wrap
    module = None if root or frame is None else frame.module
    got = None
    if frame is not None and frame.data is not None:
        got = ", ".join("×".join(map(str, s)) or "scalar" for s in frame.data)
    return forward_error(
        exc,
        layer=None if root else where,
        layer_type=type(module).__name__ if module is not None else None,
        got=got,
        expects=expects(module) if module is not None else None,
        model_input=workload.model.input_description(),
        batch=workload.batch_size,
        first_layer=recorder.param_layers_done == 0,
    )


def _raised_in(exc: BaseException, fn: Callable[..., Any]) -> bool:
    """Whether ``fn``'s code is on the traceback of ``exc``."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


#: exception types (by name) that mean "fake tensors have no values for this"
_DATA_DEPENDENT = (
    "DataDependentOutputException",
    "DynamicOutputShapeException",
    "GuardOnDataDependentSymNode",
    "UnsupportedOperatorException",
)


def _data_dependent(exc: BaseException, phase: str) -> DataDependentError | None:
    """A :class:`DataDependentError` naming the op and the user's line, if ``exc`` is a fake tensor's "no values"."""
    name = type(exc).__name__
    msg = " ".join(str(exc).split())
    nested = "NestedTensorImpl" in msg  # fake tensors cannot hold nested tensors (the fast path packs padding)
    if (
        name not in _DATA_DEPENDENT
        and not nested
        and "item() cannot be called on meta" not in msg
        and "data-dependent" not in msg
    ):
        return None
    func = getattr(exc, "func", None)
    op = str(func) if func is not None else (msg.split(":")[0][:80] or name)
    if nested:
        op = "a nested tensor (packed from a padding mask)"
    if op.startswith("aten._local_scalar_dense"):
        op = "Tensor.item() (aten._local_scalar_dense)"
    where = _user_line(exc)
    at = f" at {where}" if where else ""
    return DataDependentError(
        f"the {phase} pass reads tensor values ({op}{at}); fake tensors have none",
        "memprof runs such steps for real on the CPU instead (the default); "
        "give a smaller `batch_size` if that needs more RAM than this machine has",
        op=op,
        where=where,
    )


def _user_line(exc: BaseException) -> str | None:
    """``file:line: code`` of the innermost frame of ``exc`` outside torch, memprof's engine and the stdlib."""
    import linecache
    import os
    import sysconfig
    import traceback

    import torch

    paths = sysconfig.get_paths()
    libraries = (paths["purelib"] + os.sep, paths["platlib"] + os.sep)  # torchvision, transformers: model code
    skip = [os.path.dirname(torch.__file__), os.path.dirname(__file__)]
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = os.path.abspath(frame.filename)
        stdlib = path.startswith(paths["stdlib"] + os.sep) and not path.startswith(libraries)
        if frame.filename.startswith("<") or stdlib or any(path.startswith(p + os.sep) for p in skip):
            continue
        found = frame
    if found is None:
        return None
    code = (found.line or linecache.getline(found.filename, found.lineno or 0)).strip()
    return f"{found.filename}:{found.lineno}: {code}" if code else f"{found.filename}:{found.lineno}"


#: the last real runs, keyed by workload and target: find-batch's predictor asks for batch 1 again
_REAL_RUNS: dict[tuple, TraceResult] = {}
_REAL_RUNS_MAX = 16


def _real_run(
    workload: Workload,
    target: str,
    steps: int,
    kernel_scratch: bool,
    reason: DataDependentError,
    progress: Callable[[str], None] | None,
    options: dict[str, Any],
) -> TraceResult:
    """The data-dependent step, run for real on the CPU and recorded as the tracer records it.

    With a batch above 1, batch 1 runs first: its time and memory, scaled to the requested batch,
    are reported through ``progress`` before the long run, and a run that would not fit in the
    machine's available RAM is refused with the op and line that forced it.
    """
    import dataclasses

    import torch

    from ..results import METHOD_REAL

    def run(w: Workload) -> TraceResult:
        key = (id(w.model), repr(w.describe()), target, steps, kernel_scratch, tuple(sorted(options.items())))
        if key not in _REAL_RUNS:
            with torch.random.fork_rng(devices=[]):
                result = _record_step(w, target, steps, False, kernel_scratch, real=True, **options)
            if len(_REAL_RUNS) >= _REAL_RUNS_MAX:
                _REAL_RUNS.pop(next(iter(_REAL_RUNS)))
            _REAL_RUNS[key] = result
        return _REAL_RUNS[key]

    say = progress or (lambda _msg: None)
    why = f"{reason.op} at {reason.where}" if reason.where else str(reason.op)
    batch = workload.batch_size
    say(f"the step reads tensor values ({why}): running it for real on the CPU instead of tracing")
    one = None
    if batch > 1:
        try:
            one = run(workload.with_batch(1))
        except MemprofError as exc:  # e.g. BatchNorm over a single value: no estimate, run the batch asked for
            say(f"batch 1 cannot run to estimate the cost ({exc.message}); running batch {batch} directly")
    if one is not None:
        # what the CPU really held (the CUDA view adds workspaces no real run allocates), and what
        # of it does not grow with the batch (model state)
        ram_one = one.peak_bytes - one.breakdown_at_peak.get(MemCategory.CUDA_OVERHEAD, 0)
        fixed = sum(
            one.totals.get(c, 0)
            for c in (MemCategory.PARAMETER, MemCategory.BUFFER, MemCategory.GRADIENT, MemCategory.OPTIMIZER_STATE)
        )
        need = min(fixed, ram_one) + batch * max(0, ram_one - fixed)
        seconds = one.trace_seconds * batch
        available = _available_ram()
        say(
            f"batch 1 took {one.trace_seconds:.1f} s and {ram_one / 2**20:.0f} MiB; batch {batch} should take "
            f"up to about {seconds:.0f} s and {need / 2**20:.0f} MiB of RAM"
            + (f" ({available / 2**20:.0f} MiB available)" if available else "")
        )
        if available is not None and need > 0.9 * available:
            raise DataDependentError(
                f"the step reads tensor values ({why}) and running it for real at batch {batch} needs about "
                f"{need / 2**30:.1f} GiB of RAM; {available / 2**30:.1f} GiB are available",
                "estimate a smaller `batch_size` (memory grows about linearly with it), or measure on the GPU "
                "with `memprof find-batch`",
                op=reason.op,
                where=reason.where,
            )
    result = run(workload)
    notes = (
        *result.notes,
        f"recorded from a real CPU run: the step reads tensor values ({why}); data-dependent sizes (proposals, "
        "masks, routing) are those of memprof's synthetic batch and the model's initial weights",
    )
    if target == "cuda":
        notes = (
            *notes,
            "CUDA's kernel choices (its autocast lists, fused dropout, the attention backend: "
            "memprof.engine.cudarules) are not applied to a real CPU run: it records the CPU's kernels",
        )
    return dataclasses.replace(result, method=METHOD_REAL, method_reason=why, notes=notes)


def _available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _step_error(exc: Exception, phase: str) -> MemprofError:
    if isinstance(exc, MemprofError):
        return exc
    from .blame import fix_hint, location, raised

    name = type(exc).__name__
    msg = " ".join(str(exc).split())[:400]
    if "DataDependent" in name or "data-dependent" in msg.lower() or "item()" in msg or "Unsupported" in name:
        return TraceError(
            f"tracing the {phase} pass failed: {raised(exc)}",
            "the step reads tensor values (.item(), data-dependent shapes or an op fake tensors do not "
            "support), which a trace cannot do; run the real step instead: memprof find-batch "
            "(--device cpu --memory-limit 8GiB without a GPU) or memprof profile your_script.py",
        )
    loc = location(exc)
    if loc is not None:  # the model's own code (its loss, memprof_batch, a backward hook) raised
        return ModelCodeError(f"the model's {phase} step raised {raised(exc)} (at {loc})", fix_hint(exc))
    return TraceError(
        f"tracing the {phase} pass failed: {raised(exc)}",
        "the model may need inputs or a loss memprof did not build: define memprof_batch()/memprof_loss() next to it",
    )


# =========================================================================== data parallelism
class _TraceRank(Exception):  # noqa: N818 - control flow, never leaves trace_step
    """ZeRO-1: another rank holds more optimizer state than the one traced; trace that one."""

    def __init__(self, rank: int):
        super().__init__(rank)
        self.rank = rank


def _local(t):
    """What a rank holds of ``t``: a DTensor's local shard, or ``t``."""
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t


def _keys(tensors) -> list[int]:
    return [_local(t).untyped_storage()._cdata for t in tensors]


def _optimizer_state(optimizer) -> dict:
    """The optimizer's state; ZeroRedundancyOptimizer keeps its rank's in the local optimizer it wraps."""
    inner = getattr(optimizer, "optim", None)
    return (inner if inner is not None and hasattr(inner, "state") else optimizer).state


# =========================================================================== tracing
def trace_step(
    workload: Workload,
    *,
    target: str = "cuda",
    steps: int = 2,
    replay_steps: bool = True,
    kernel_scratch: bool = True,
    cuda_target: CudaTarget | None = None,
    count_flops: bool = True,
    count_bytes: bool = False,
    fallback: bool = True,
    progress: Callable[[str], None] | None = None,
    rank: int | None = None,
) -> TraceResult:
    """Trace ``steps`` training steps of ``workload`` on fake tensors and predict their memory.

    ``target="cuda"`` predicts a CUDA step on ``cuda_target`` (default: the local GPU, else
    :data:`memprof.engine.catalog.ASSUMED_ARCH`, said so in the notes): CUDA's kernel choices
    (:mod:`memprof.engine.cudarules`: fused dropout, CUDA autocast, the attention backend),
    foreach optimizers, 512-byte rounding, cuBLAS workspaces and kernel scratch
    (:mod:`memprof.engine.overheads`), caching-allocator reserved bytes and NVML; ``target="cpu"`` predicts the
    same step run on the CPU (peak live tensor bytes, plus the scratch oneDNN convolutions
    hold inside the op; ``kernel_scratch=False`` leaves that scratch out, which is what
    find-batch's CPU cap counts: tensor storages only, as on a GPU).

    Steps after the first repeat the first one exactly (same ops, same storages; only the
    optimizer state now lives through them and is not created again), so with
    ``replay_steps`` (the default) their events are copied from the first step instead of
    traced: the result is the same as tracing every step (tested), in about half the time.

    With ``count_flops`` the first step's ops are also counted in FLOPs (PyTorch's formulas, per
    module and phase (:mod:`memprof.engine.flops`): ``result.flops``; with ``count_bytes`` also the bytes
    each op reads and writes, which the step-time model needs (:func:`memprof.engine.roofline.step_time`).

    A step that reads tensor values (``.item()``, ``nonzero``, boolean masks, NMS, ...) cannot run
    on fake tensors. With ``fallback`` (the default) it is then run for real on the CPU, with
    real tensors at the requested batch, recorded exactly as the tracer records (the same
    storages, phases, categories, and the same CUDA view: foreach optimizer, 512-byte rounding,
    workspaces, allocator replay); ``result.method`` says so. ``progress`` receives one-line
    messages about that run (its expected time and memory) before it starts. Without
    ``fallback`` a :class:`memprof.errors.DataDependentError` names the op and the source line.

    With a data-parallel strategy (``workload.strategy``) the prediction is one rank's: PyTorch's
    DDP / FSDP2 / ZeroRedundancyOptimizer run over a fake process group of ``workload.world_size``
    ranks (:mod:`memprof.engine.distributed`), seen from ``rank`` (default: the rank that holds the
    most, rank 0 but for ZeRO-1's uneven optimizer partitions). Replaying steps stays exact there
    (DDP's bucket rebuild frees and re-allocates the same bytes; tested per strategy). A data-parallel
    step that reads tensor values has no real-run fallback (it would need a real process group).
    """
    if target not in ("cuda", "cpu"):
        raise UsageError(f"unknown trace target {target!r}", "choose cuda or cpu")
    if steps < 1:
        raise UsageError(f"`steps` must be at least 1, got {steps}", "trace 2 steps to see the steady state")
    if target == "cuda" and cuda_target is None:
        from .catalog import resolve_target

        cuda_target = resolve_target()
    options: dict[str, Any] = dict(
        count_flops=count_flops, count_bytes=count_bytes, cuda_target=cuda_target if target == "cuda" else None
    )
    try:
        try:
            return _record_step(workload, target, steps, replay_steps, kernel_scratch, real=False, rank=rank, **options)
        except _TraceRank as heavier:
            return _record_step(
                workload, target, steps, replay_steps, kernel_scratch, real=False, rank=heavier.rank, **options
            )
    except DataDependentError as exc:
        if not fallback or workload.distributed:
            raise
        return _real_run(workload, target, steps, kernel_scratch, exc, progress, options)


def _record_step(
    workload: Workload,
    target: str,
    steps: int,
    replay_steps: bool,
    kernel_scratch: bool,
    real: bool,
    count_flops: bool = True,
    count_bytes: bool = False,
    cuda_target: CudaTarget | None = None,
    rank: int | None = None,
) -> TraceResult:
    """Run ``steps`` steps under the recorder: on fake tensors, or (``real``) on real CPU tensors."""
    import gc
    import logging
    import warnings

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.perf_counter()
    recorder = _TraceRecorder(target, kernel_scratch, cuda_target)
    recorder.real = real
    if recorder.cpu_scratch and not real:
        recorder.probe = cpumem.OpProbe()
    rules = None
    notes: list[str] = []
    prepared = None
    model = None
    gc_was_enabled = gc.isenabled()
    real_get_rng_state = None
    tally: FlopTally | None = None
    restore_rnns: Callable[[], None] | None = None
    restore_linear: Callable[[], None] | None = None
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if not real else None
    traced_rank: int | None = None
    world_cm: Any = contextlib.nullcontext()
    if workload.distributed:
        from . import distributed

        world_cm = distributed.fake_world(workload.world_size, rank or 0)
        recorder.sharded = distributed.is_sharded(workload.strategy)
        recorder.gloo = target == "cpu"
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    fake_log_level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # it logs every meta-kernel failure; ours become MemprofErrors
    restore_deepcopy = _install_fake_deepcopy() if fake_mode is not None else None
    try:
        with world_cm as world, fake_mode or contextlib.nullcontext(), warnings.catch_warnings():
            # modules that test data_ptr() (nn.TransformerEncoder's fast path) make PyTorch warn about
            # fake tensors; the answer they get does not change what is allocated, so keep it off the screen
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            # FSDP2 warns about modules that return views (about in-place ops the step does not do)
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
            fast = fastfake.FastFake(fake_mode) if fake_mode is not None and fastfake.enabled() else None
            if real:
                torch.manual_seed(0)  # the same weights and batch as measure_cpu_step: the same data-dependent sizes
                model = build_model(workload, "cpu")
            else:
                with fastfake.mode(fast):  # parameters and buffers are made through the same fast cache
                    model = _build_fake_model(workload)
            tracker = _make_tracker(recorder)
            # known values of small integer tensors (masks, positions, routing): fake tensors only, and not
            # for DDP's own bucket bookkeeping (the values it broadcasts would make step 2 differ from step 1
            # by a few bytes, which the replay of steps does not copy) unless the model needs them
            use_shadows = not real and (workload.model.hf is not None or not workload.distributed)
            shadows = Shadows(fast.run if fast is not None else None) if use_shadows else None
            if shadows is not None:
                tracker.run_op = _with_meta_fallbacks(shadows.run)
            elif fast is not None:
                tracker.run_op = fast.run
            if workload.mode == "generate":
                steps = 1  # no optimizer state: every generate call is the same
            with tracker, shadows.active() if shadows is not None else contextlib.nullcontext():
                made_by_wrap: list[int] = []
                if world is not None:  # DDP's buckets, FSDP2's shards: allocated by PyTorch's code, traced
                    traced_rank = world.rank
                    world.bucket_context = lambda: recorder.forced(MemCategory.COMMUNICATION)
                    model = distributed.wrap(model, distributed.plan_of(workload), world, "cpu")
                    made_by_wrap = list(tracker.live)
                recorder.category = MemCategory.PARAMETER
                params = list(model.parameters())
                recorder.categorize_live(tracker.register(params), MemCategory.PARAMETER)
                recorder.categorize_live(_keys(params), MemCategory.PARAMETER, only_unset=False)
                recorder.category = MemCategory.BUFFER
                tracker.register(list(model.buffers()))
                recorder.categorize_live(_keys(model.buffers()), MemCategory.BUFFER)
                recorder.categorize_live(made_by_wrap, MemCategory.COMMUNICATION)
                recorder.category = None
                optimizer = None
                if workload.mode == "train":
                    trainable = [p for p in params if p.requires_grad]
                    # with a strategy, `offload` optimizer is counted on the host after the trace (_offload)
                    offload = "none" if workload.distributed else workload.offload
                    zero1 = world if workload.strategy == "zero1" else None
                    optimizer = make_optimizer(workload.optimizer, trainable, target, offload, zero1)
                    if zero1 is not None and rank is None:
                        heaviest = distributed.heaviest_partition(optimizer)
                        if heaviest != world.rank:
                            raise _TraceRank(heaviest)
                recorder.category = MemCategory.INPUT
                try:
                    args, kwargs, tgt = workload.make_batch("cpu")
                except MemprofError:
                    raise
                except Exception as exc:
                    dependent = _data_dependent(exc, "input-building") if not real else None
                    raise (dependent or _step_error(exc, "input-building")) from None
                recorder.category = None

                def context():
                    return workload.model.step_context(model, workload, fake=True)

                prepared = Prepared(
                    workload, model, optimizer, args, kwargs, tgt, workload.model.loss_fn(), "cpu", context=context
                )
                del args, kwargs, tgt
                hooked = getattr(model, "module", model) if world else model  # DDP/FSDP wrap the model
                recorder.root_label = type(hooked).__name__
                # on the CPU the model runs the fused kernels it runs unwatched (their buffers are measured);
                # a CUDA trace hooks every module, so nn.TransformerEncoderLayer runs its unfused equivalent
                recorder.modules.attach(hooked, recorder.root_label, fast_paths=target == "cpu")
                recorder.blocks = _blocks(hooked)
                for name, module in hooked.named_modules():  # names as the module tracker gives them
                    recorder.module_types.setdefault(name or recorder.root_label, type(module).__name__)
                if target == "cuda":
                    restore_rnns = _install_cudnn_rnns(recorder)
                if not real:
                    restore_linear = _install_linear()
                if target == "cpu":
                    # torch.utils.checkpoint keeps the CPU RNG state (a real 5056-byte tensor made
                    # outside any op) per checkpointed call; on CUDA it is host memory
                    real_get_rng_state = torch.get_rng_state

                    def get_rng_state():
                        state = real_get_rng_state()
                        tracker.register([state])
                        return state

                    torch.get_rng_state = get_rng_state
                gc.disable()

                def on_phase(phase: str) -> None:
                    assert prepared is not None  # set above, before any step runs
                    recorder.modules.clear()
                    recorder.accum.reset()
                    if phase == "forward":
                        recorder.forward_start[recorder.step] = len(recorder.events)
                        recorder.forward_op[recorder.step] = tracker.op_count
                    elif phase == "backward":
                        recorder.backward_start.setdefault(recorder.step, len(recorder.events))
                        recorder.backward_op.setdefault(recorder.step, tracker.op_count)
                        # storages made in this step's forward and still alive: saved for backward
                        step = recorder.step
                        for key in list(tracker.live):
                            rec = recorder.key_to_rec.get(key)
                            if (
                                rec is not None
                                and recorder.rec_cat[rec] is None
                                and recorder.rec_step[rec] == step
                                and recorder.rec_phase[rec] == "forward"
                            ):
                                recorder.rec_cat[rec] = MemCategory.ACTIVATION
                    elif phase == "optimizer":
                        recorder.release_gloo()  # before the optimizer's events: a replayed step frees it too
                        recorder.optimizer_start[recorder.step] = len(recorder.events)
                        recorder.optimizer_op[recorder.step] = tracker.op_count
                        for p in prepared.model.parameters():
                            if p.grad is not None:
                                rec = recorder.key_to_rec.get(_local(p.grad).untyped_storage()._cdata)
                                if rec is not None:
                                    recorder.rec_cat[rec] = MemCategory.GRADIENT
                    elif phase == "done":
                        recorder.done_start.setdefault(recorder.step, len(recorder.events))
                        recorder.done_op.setdefault(recorder.step, tracker.op_count)
                    if phase == "done" and workload.mode == "train" and workload.loop == "plain":
                        recorder.kept[recorder.step] = _kept_records(recorder, prepared.extras)
                    if phase == "done" and prepared.optimizer is not None:
                        for state in _optimizer_state(prepared.optimizer).values():
                            for name, value in state.items():
                                if isinstance(value, torch.Tensor):
                                    key = _local(value).untyped_storage()._cdata
                                    rec = recorder.key_to_rec.get(key)
                                    if rec is None:
                                        continue
                                    if recorder.rec_cat[rec] is None:
                                        recorder.rec_cat[rec] = MemCategory.OPTIMIZER_STATE
                                    if (
                                        target == "cuda"
                                        and name == "step"
                                        and value.dim() == 0
                                        and not prepared.optimizer.defaults.get("capturable")
                                        and not prepared.optimizer.defaults.get("fused")
                                    ):
                                        recorder.rec_host[rec] = True  # PyTorch keeps it on the CPU
                    recorder.phase = phase

                replay = replay_steps and workload.mode == "train" and not real
                if cuda_target is not None and not real:  # CUDA kernels do not run on real CPU tensors
                    from .cudarules import CudaRules

                    rules = CudaRules(cuda_target, workload.precision.torch_autocast_dtype())
                tally = FlopTally(recorder.locate, count_bytes) if count_flops or count_bytes else None
                with rules if rules is not None else contextlib.nullcontext():
                    for step in range(steps):
                        recorder.step = step
                        recorder.tally = tally if step == 0 else None
                        try:
                            if workload.mode == "generate":
                                _generate(prepared, recorder, tracker, on_phase)
                            elif step == 0 or not replay:
                                train_step(prepared, on_phase)
                            else:
                                _replay_step(recorder, tracker, on_phase, step)
                        except MemprofError:
                            raise
                        except Exception as exc:
                            if not real:
                                dependent = _data_dependent(exc, recorder.phase)
                                if dependent is not None:
                                    raise dependent from None
                            if recorder.phase in ("forward", "prefill", "warmup"):
                                raise _forward_error(exc, recorder, model, workload) from None
                            raise _step_error(exc, recorder.phase) from None
                        finally:
                            recorder.modules.clear()
                            recorder.tally = None
                recorder.phase = "done"
                op_count = tracker.op_count
                weights = _weights(model, workload)
            tracker.detach()
    finally:
        fake_log.setLevel(fake_log_level)
        recorder.modules.detach()
        if real_get_rng_state is not None:
            torch.get_rng_state = real_get_rng_state
        if restore_rnns is not None:
            restore_rnns()
        if restore_linear is not None:
            restore_linear()
        if restore_deepcopy is not None:
            restore_deepcopy()
        if gc_was_enabled:
            gc.enable()
        prepared = None
        model = None
    if workload.precision.grad_scaler and workload.mode == "train":
        notes.append(
            "GradScaler is not traced (it reads values with .item()); it adds a few scalar tensors and "
            "unscales gradients in place, so the difference is a few KiB"
        )
    attention: dict[str, int] = {}
    if cuda_target is not None:
        notes.extend(_cuda_notes(workload, cuda_target, recorder, rules))
        if rules is not None:
            attention = dict(rules.attention)
    notes.extend(_finetune_notes(workload, target))
    host_bytes = None
    if workload.distributed:
        notes.extend(_distributed_notes(workload, target))
        host_bytes = _offload(recorder, workload, target, steps)
    result = _analyse(recorder, workload, target, steps, op_count, notes)
    flops = costs = None
    if tally is not None:
        flops, costs = tally.result(workload.batch_size, recorder.module_types, recorder.root_label)
    host_peak, paged = _placed_peaks(recorder)
    if workload.offload == "none":
        host_peak = None  # only bitsandbytes' 2 KiB of quantization maps, made on the CPU and moved
    return dataclasses.replace(
        result,
        trace_seconds=time.perf_counter() - started,
        cuda_target=cuda_target,
        attention_backends=attention,
        flops=flops,
        _op_costs=costs,
        weights=weights,
        host_peak_bytes=host_peak,
        paged_bytes=paged,
        rank=traced_rank,
        host_bytes=host_bytes,
    )


def _distributed_notes(workload: Workload, target: str) -> list[str]:
    notes = [
        f"one rank of {workload.world_size} ({workload.strategy}): PyTorch's distributed code traced over a "
        "fake process group (collectives move no data, their buffers are allocated as on a real rank)"
    ]
    if target == "cuda":
        notes.append("NCCL's own communication buffers live outside PyTorch's allocator and are not included")
    if workload.offload != "none" and target == "cpu":
        notes.append(f"`offload` {workload.offload} changes nothing on the CPU: the host is the device")
    elif workload.offload == "params":
        notes.append(
            "offload params: sharded parameters, gradients and optimizer state are counted on the host "
            "(host_bytes); the host-to-device copies of each unit's shards before its all-gather are not included"
        )
    elif workload.offload == "optimizer":
        notes.append(
            "offload optimizer: optimizer state is counted on the host (host_bytes); the device-to-host copies "
            "of gradients and the updated parameters copied back are not included"
        )
    return notes


def _offload(recorder: _TraceRecorder, workload: Workload, target: str, steps: int) -> int | None:
    """Move the offloaded categories to the host (a CUDA step only); returns the most they hold at once, or None."""
    if workload.offload == "none" or target != "cuda":
        return None
    hosted = {MemCategory.OPTIMIZER_STATE}
    if workload.offload == "params":
        hosted |= {MemCategory.PARAMETER, MemCategory.GRADIENT}
    for r, category in enumerate(recorder.rec_cat):
        if category in hosted:
            recorder.rec_host[r] = True
    live = peak = 0
    for r, sign, *_ in recorder.events:
        if recorder.rec_host[r] and recorder.rec_cat[r] in hosted:
            live += sign * recorder.rec_nbytes[r]
            peak = max(peak, live)
    return peak


def _weights(model, workload: Workload):
    """The parameters split for fine-tuning, when a lever froze, adapted or quantized some."""
    if not (workload.freeze or workload.train_only or workload.lora is not None or workload.quantize != "none"):
        return None
    from .finetune import weight_breakdown

    return weight_breakdown(model)


def _placed_peaks(rec: _TraceRecorder) -> tuple[int | None, int | None]:
    """Peak of what lives in CPU memory (placement "host") and the paged bytes held at the end."""
    if not rec.placed_host and not rec.placed_paged:
        return None, None
    host = rec.placed_host
    cur = peak = 0
    paged = 0
    for r, sign, *_ in rec.events:
        if r in host:
            cur += sign * rec.rec_nbytes[r]
            peak = max(peak, cur)
        elif r in rec.placed_paged:
            paged += sign * rec.rec_nbytes[r]
    return (peak if host else None), (paged if rec.placed_paged else None)


def _finetune_notes(workload: Workload, target: str) -> list[str]:
    notes = []
    if workload.quantize == "int8" and workload.mode == "train":
        notes.append(
            "int8 (LLM.int8()): activation columns above the outlier threshold (6.0) are computed in 16 bits "
            "from extra copies whose size depends on the data; memprof assumes none"
        )
    elif workload.quantize in ("nf4", "fp4"):
        notes.append(
            f"{workload.quantize}: bitsandbytes stand-ins (bitsandbytes 0.50.1); between 5 and 1536 rows per "
            "call its fused 4-bit kernel may skip the dequantized weight, which memprof keeps (an upper bound)"
        )
    if workload.optimizer == "paged-adamw8bit" and target == "cuda":
        notes.append(
            "paged optimizer state lives in CUDA unified memory: outside torch's allocator (not in the peak), "
            "moved to CPU memory by the driver when the GPU needs the room"
        )
    if workload.offload == "optimizer" and target == "cuda" and not workload.distributed:
        notes.append(
            "optimizer offloaded: fp32 master weights, gradients copied to the CPU, the optimizer state and the "
            "CPU step's temporaries are CPU memory (host peak), not in the GPU peak"
        )
    return notes


def _tensors_in(obj: Any, depth: int = 0, seen: set[int] | None = None) -> list:
    """The tensors an object holds: a model output, a loss, a KV cache (nested containers and attributes)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 6 or obj is None or isinstance(obj, (str, bytes, int, float, bool, type, torch.nn.Module)):
        return []
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, dict):
        values: Any = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        values = list(obj)
    elif hasattr(obj, "__dict__"):
        values = list(vars(obj).values())
    else:
        return []
    found: list = []
    for value in values:
        found.extend(_tensors_in(value, depth + 1, seen))
    return found


_RESIDENT = (
    MemCategory.PARAMETER,
    MemCategory.BUFFER,
    MemCategory.INPUT,
    MemCategory.GRADIENT,
    MemCategory.OPTIMIZER_STATE,
)


def _kept_records(recorder: _TraceRecorder, extras: dict) -> tuple[list[int], list[int]]:
    """Records of the storages a plain loop keeps alive after the step: (its output's, its loss's).

    The output's die when the next forward returns (``out`` is rebound), the loss's once the next
    loss is computed (a storage the loss holds goes with the loss, even if the output holds it too)."""
    groups: tuple[list[int], list[int]] = ([], [])
    taken: set[int] = set()
    for group, obj in ((1, extras.get("loss")), (0, extras.get("out"))):
        for t in _tensors_in(obj):
            rec = recorder.key_to_rec.get(t.untyped_storage()._cdata)
            if rec is not None and rec not in taken and recorder.rec_cat[rec] not in _RESIDENT:
                taken.add(rec)
                groups[group].append(rec)
    return groups


def _generate(prepared: Prepared, recorder: _TraceRecorder, tracker, on_phase) -> None:
    """A generation, traced as two ``generate`` calls that hold its two peaks.

    The prefill: ``generate`` on the prompt (P tokens), stopped after one token. The last decode step (the
    largest, with the KV cache at its longest): ``generate`` on a prompt of P + N - 2 tokens for two
    tokens, whose second forward is exactly the real run's last one (same cache length, same
    input ids); the prefill of that call is phase "warmup" and does not count towards the peak.
    With N <= 2 the real call is traced as is.
    """
    workload = prepared.workload
    new_tokens = workload.new_tokens or 1
    prompt = workload.seq_len or workload.model.default_seq_len or 1

    def on_cache(cache: Any) -> None:
        seen: set[int] = set()
        total = 0
        for t in _tensors_in(cache):
            key = t.untyped_storage()._cdata
            if key in seen:
                continue
            seen.add(key)
            rec = recorder.key_to_rec.get(key)
            if rec is not None and recorder.rec_cat[rec] not in _RESIDENT:
                recorder.rec_cat[rec] = MemCategory.KV_CACHE
                total += recorder.rec_nbytes[rec]
        recorder.kv_cache_bytes = total
        recorder.kv_recs = [recorder.key_to_rec[k] for k in seen if k in recorder.key_to_rec]

    prepared.extras["on_cache"] = on_cache
    if new_tokens <= 2:
        generate_step(prepared, on_phase)
        return
    generate_step(prepared, on_phase, stop_after=1)  # a static cache is sized for all new tokens
    prepared.args, prepared.kwargs = (), {}  # the prompt goes; the longer one below stands in for it
    recorder.category = MemCategory.INPUT
    try:
        _, kwargs, _ = workload.replace(seq_len=prompt + new_tokens - 2).make_batch("cpu")
    finally:
        recorder.category = None
    prepared.kwargs = kwargs
    del kwargs
    prepared.extras["phase_names"] = {1: "warmup"}
    generate_step(prepared, on_phase, new_tokens=2)


def _replay_step(recorder: _TraceRecorder, tracker, on_phase, step: int) -> None:
    """Step ``step`` >= 1 from step 0's events: nothing runs, the events are copied.

    Forward and backward repeat step 0's exactly. The optimizer step and ``zero_grad`` repeat
    step 0's without the allocations that became optimizer state (they exist from step 0 on;
    the built-in optimizers' first step differs from later ones only by creating them).
    ``tests/test_trace.py`` checks the result against tracing every step for each optimizer.
    """
    start, stop = recorder.forward_start[0], recorder.optimizer_start[0]
    events = recorder.events
    clones: dict[int, int] = {}

    def copy(first: int, last: int, shift: int, skip_state: bool) -> None:
        for i in range(first, last):
            rec, sign, op, phase, module, _ = events[i]
            if sign > 0:
                category = recorder.rec_cat[rec]
                if category is MemCategory.CUDA_OVERHEAD or recorder.rec_kind[rec] is overheads.CUDNN_BENCHMARK:
                    continue  # cuBLAS workspaces are made once per thread and kept; benchmarks run once per shape
                if skip_state and category is MemCategory.OPTIMIZER_STATE:
                    continue
                new = recorder.clone(rec, step)
                clones[rec] = new
                events.append((new, 1, op + shift, phase, module, step))
            elif rec in clones:
                events.append((clones[rec], -1, op + shift, phase, module, step))

    on_phase("forward")
    shift = tracker.op_count - recorder.forward_op[0]
    previous = recorder.kept.get(step - 1)
    middle, loss_done = recorder.forward_end.get(0), recorder.backward_start.get(0)
    if previous and middle is not None and loss_done is not None and start <= middle <= loss_done <= stop:
        # a plain loop: the previous step's output dies when this step's forward returns, its loss
        # when this step's loss is computed (just before backward)
        copy(start, middle, shift, False)
        for rec in previous[0]:
            events.append((rec, -1, recorder.forward_end_op[0] + shift, "forward", recorder.root_label, step))
        copy(middle, loss_done, shift, False)
        for rec in previous[1]:
            events.append((rec, -1, recorder.backward_op[0] + shift, "forward", None, step))
        copy(loss_done, stop, shift, False)
    else:
        copy(start, stop, shift, False)
    tracker.op_count += recorder.optimizer_op[0] - recorder.forward_op[0]
    on_phase("optimizer")
    copy(stop, recorder.done_start[0], tracker.op_count - recorder.optimizer_op[0], True)
    tracker.op_count += recorder.done_op[0] - recorder.optimizer_op[0]
    on_phase("done")
    if 0 in recorder.kept:  # the clones of what step 0 kept, not step 0's own records
        out, loss = recorder.kept[0]
        recorder.kept[step] = ([clones[r] for r in out if r in clones], [clones[r] for r in loss if r in clones])


def _cuda_notes(workload: Workload, cuda_target: CudaTarget, recorder: _TraceRecorder, rules: Any) -> list[str]:
    notes = [
        f"predicted for {cuda_target.arch} ({cuda_target.source}); traced on fake CPU tensors with CUDA's kernel "
        "choices (memprof.engine.cudarules) and the optimizer CUDA would use (foreach)"
    ]
    if recorder.workspace_threads:
        notes.append(
            f"cuBLAS workspace {recorder.workspace_bytes / 2**20:.3g} MiB per thread: {recorder.workspace_source}"
        )
    if recorder.lt_threads:
        notes.append(f"cuBLASLt workspace {recorder.lt_bytes / 2**20:.3g} MiB per thread: {recorder.lt_source}")
    if rules is not None:
        notes.extend(rules.notes())
    if cuda_target.is_rocm:
        notes.append(
            f"{cuda_target.arch} is an AMD GPU: the kernel choices and workspaces modelled are CUDA's (hipBLAS "
            "workspace aside); unverified for ROCm"
        )
    if cuda_target.cudnn_benchmark:
        if recorder.benchmarked:
            notes.append(
                f"cudnn.benchmark: {len(recorder.benchmarked)} convolution shape(s) timed in the first step with "
                "workspaces up to the free memory (estimated, capped at what is free when the capacity is known); "
                "steps after the first use the cached choice"
            )
    elif recorder.saw_convolution:
        notes.append(
            "cuDNN convolution workspaces not modelled: cuDNN's heuristics pick the algorithm at run time "
            "(Conv_v8.cpp try_plans), usually with a small workspace; --cudnn-benchmark models the first step's "
            "benchmarking"
        )
    if workload.mode != "train" and "TransformerEncoderLayer" in recorder.module_types.values():
        notes.append(
            "nn.TransformerEncoderLayer is traced through its layers: CUDA's fused inference path "
            "(torch._transformer_encoder_layer_fwd) allocates inside one kernel, which a CUDA trace cannot see "
            "(a CPU trace runs and measures it)"
        )
    notes.append(
        "not modelled: the memory-efficient and cuDNN attention kernels' backward workspaces, CUDA's reduction "
        "buffers, NCCL buffers (outside the allocator; none in a single-process step)"
    )
    return notes


# =========================================================================== analysis
def _analyse(
    rec: _TraceRecorder, workload: Workload, target: str, steps: int, op_count: int, notes: list[str]
) -> TraceResult:
    cuda = target == "cuda"
    n = len(rec.rec_nbytes)
    if cuda:
        sizes = [0 if rec.rec_host[i] else rec.rec_nbytes[i] for i in range(n)]
    else:
        sizes = rec.rec_nbytes
    cats = [c if c is not None else MemCategory.TEMPORARY for c in rec.rec_cat]

    # pass 1: live bytes after each event, peaks per step. For cuda the caching-allocator
    # model decides each block's size (rounding; a block too small to split is allocated whole,
    # as torch.cuda.memory_allocated counts it) and the reserved bytes, releasing its cached
    # segments before it would exceed the device (the capacity less the CUDA context).
    events = rec.events
    alloc = None
    context = context_source = None
    conf = conf_from_source(rec.cuda_target.alloc_conf if rec.cuda_target is not None else None)
    if cuda:
        context, context_source = overheads.cuda_context(rec.cuda_target)
        capacity = rec.cuda_target.capacity_bytes if rec.cuda_target is not None else None
        alloc = CachingAllocatorModel(conf, capacity - context if capacity is not None else None)
    cur = 0
    curve = [0] * len(events)
    peak = -1
    peak_i = -1
    step_peak = [0] * steps
    phase_peaks: dict[str, int] = {}
    for i, (r, sign, _op, phase, _mod, step) in enumerate(events):
        if alloc is not None:
            if sizes[r]:
                if sign > 0:
                    if rec.rec_kind[r] is overheads.CUDNN_BENCHMARK:  # offered at most what is free
                        available = alloc.available_bytes()
                        sizes[r] = sizes[r] if available is None else max(0, min(sizes[r], available))
                    sizes[r] = alloc.malloc(r, sizes[r]) if sizes[r] else 0
                else:
                    alloc.free(r)
            cur = alloc.allocated_bytes
        else:
            cur += sign * sizes[r]
        curve[i] = cur
        if phase == "warmup":  # a generation's stand-in prefill (see _generate): not part of the real run
            continue
        if cur > phase_peaks.get(phase, -1):
            phase_peaks[phase] = cur
        if cur > peak:
            peak, peak_i = cur, i
        if step < steps and cur > step_peak[step]:
            step_peak[step] = cur
    if peak_i < 0:
        peak = 0
    # pass 2: breakdown at the peak
    breakdown: dict[MemCategory, int] = {}
    live: set[int] = set()
    for i in range(peak_i + 1):
        r, sign = events[i][0], events[i][1]
        if sign > 0:
            live.add(r)
        else:
            live.discard(r)
    modelled_at_peak: dict[overheads.Kind, int] = {}
    for r in live:
        if sizes[r]:
            breakdown[cats[r]] = breakdown.get(cats[r], 0) + sizes[r]
            kind = rec.rec_kind[r]
            if kind is not None:
                modelled_at_peak[kind] = modelled_at_peak.get(kind, 0) + sizes[r]
    modelled = tuple(
        ModelledBytes(kind.what, nbytes, kind.source, kind.verified) for kind, nbytes in modelled_at_peak.items()
    )
    peak_phase = events[peak_i][3] if peak_i >= 0 else "setup"
    peak_module = events[peak_i][4] if peak_i >= 0 else None
    peak_step = events[peak_i][5] if peak_i >= 0 else 0
    if peak_phase == "done" and workload.mode == "train":
        peak_phase = "optimizer"

    # totals: persistent categories (as held at the end), per-step ones from the last step
    last = steps - 1
    totals: dict[MemCategory, int] = {c: 0 for c in (MemCategory.PARAMETER, MemCategory.BUFFER, MemCategory.INPUT)}
    if workload.mode == "train":
        totals[MemCategory.GRADIENT] = 0
        totals[MemCategory.OPTIMIZER_STATE] = 0
        totals[MemCategory.ACTIVATION] = 0
    for r in range(n):
        c = cats[r]
        if c in (MemCategory.PARAMETER, MemCategory.BUFFER, MemCategory.INPUT, MemCategory.OPTIMIZER_STATE):
            totals[c] = totals.get(c, 0) + sizes[r]
        elif c in (MemCategory.GRADIENT, MemCategory.ACTIVATION) and rec.rec_step[r] == last:
            totals[c] = totals.get(c, 0) + sizes[r]
    workspaces = sum(sizes[r] for r in range(n) if cats[r] is MemCategory.CUDA_OVERHEAD)
    kv_bytes = None
    if workload.mode == "generate":
        kv_bytes = sum(sizes[r] for r in rec.kv_recs)
        totals[MemCategory.KV_CACHE] = kv_bytes

    reserved = nvml = overhead = None
    if alloc is not None and context is not None:  # cuda
        notes = [*notes, *_allocator_notes(alloc, conf)]
        notes.append(f"CUDA context {context / 2**20:.0f} MiB (in the NVML figure only): {context_source}")
        if conf.replayable:
            reserved = alloc.peak_reserved_bytes
            nvml = reserved + context
        overhead = context + workspaces
        totals[MemCategory.CUDA_OVERHEAD] = overhead

    timeline = _timeline(events, curve, peak_i)
    first = step_peak[0]
    steady = step_peak[-1] if steps > 1 else first
    return TraceResult(
        workload=workload.describe(),
        target=target,
        peak_bytes=peak,
        first_step_peak_bytes=first,
        steady_peak_bytes=steady,
        peak_phase=peak_phase,
        peak_module=peak_module,
        breakdown_at_peak=breakdown,
        totals=totals,
        predicted_reserved_bytes=reserved,
        predicted_nvml_bytes=nvml,
        cuda_overhead_bytes=overhead,
        timeline=timeline,
        trace_seconds=0.0,
        notes=tuple(notes),
        steps=steps,
        op_count=op_count,
        peak_step=peak_step,
        cublas_workspace_bytes=workspaces if cuda else None,
        cuda_context_bytes=context,
        phase_peaks=phase_peaks,
        kv_cache_bytes=kv_bytes,
        saved_by_block=_saved_by_block(rec, sizes, last) if workload.mode == "train" else (),
        modelled=modelled,
    )


def _allocator_notes(alloc: CachingAllocatorModel, conf: AllocatorConf) -> list[str]:
    notes = [f"{conf.source}: {line}" for line in conf.describe()]
    if alloc.ooms and alloc.first_oom_bytes is not None and alloc.limit_bytes is not None:
        notes.append(
            f"out of memory in a real run: the allocator would need {alloc.first_oom_bytes / 2**20:.1f} MiB of the "
            f"{alloc.limit_bytes / 2**20:.1f} MiB it can get (capacity less the CUDA context), even after releasing "
            "its cached segments"
        )
    elif alloc.retries:
        notes.append(
            f"reserved memory reached the capacity: the allocator released its cached segments and retried "
            f"{alloc.retries} time(s), as CUDACachingAllocator.cpp does before an out-of-memory"
        )
    return notes


def _timeline(events, curve, peak_i: int) -> tuple[TimelinePoint, ...]:
    m = len(events)
    if m == 0:
        return ()
    idx: range | list[int]
    if m <= _TIMELINE_MAX:
        idx = range(m)
    else:
        # keep the largest point of each bucket (the global peak is one of them), plus the last
        bucket = math.ceil(m / (_TIMELINE_MAX - 1))
        idx = []
        for start in range(0, m, bucket):
            stop = min(m, start + bucket)
            best = max(range(start, stop), key=curve.__getitem__)
            idx.append(best)
        if idx[-1] != m - 1:
            idx.append(m - 1)
        assert peak_i in idx or curve[peak_i] == max(curve[i] for i in idx)
    return tuple(TimelinePoint(events[i][2], events[i][3], events[i][4], curve[i], events[i][5]) for i in idx)
