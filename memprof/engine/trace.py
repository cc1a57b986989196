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

from ..errors import InputShapeError, MemprofError, TraceError, UsageError
from ..results import CudaTarget, MemCategory, ModelledBytes, TimelinePoint, TraceResult
from . import fastfake, overheads, placement
from .allocator import AllocatorConf, CachingAllocatorModel, conf_from_source
from .flops import FlopTally
from .modtrack import ModuleTracker
from .workload import Prepared, Workload, build_model, make_optimizer, train_step

if TYPE_CHECKING:
    from .tracking import StorageTracker  # imports torch

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
        self.modules = ModuleTracker(on_enter=_input_shapes)
        self.tracker: StorageTracker | None = None
        self.need_workspace = target == "cuda"
        self.cpu_scratch = target == "cpu" and kernel_scratch
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
        self.workspace_threads: set[str] = set()
        self.benchmarked: set[tuple] = set()  # convolution shapes cuDNN's benchmark has timed
        self.saw_convolution = False
        self.tally: FlopTally | None = None  # counts FLOPs while set (the first step)
        self.module_types: dict[str, str] = {}
        self.root_label: str | None = None
        # records made inside placement.on("host" / "paged"): CPU memory / unified memory on a CUDA run
        self.placed_host: set[int] = set()
        self.placed_paged: set[int] = set()

    def locate(self) -> tuple[str | None, bool]:
        """For the FLOP tally: the module running now, and whether this is a recomputation in backward."""
        return self.module_now(), self.phase == "backward" and bool(self.modules.stack)

    # -- module attribution -------------------------------------------------------------
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

    def categorize_live(self, keys, category: MemCategory, only_unset: bool = True) -> None:
        for key in keys:
            rec = self.key_to_rec.get(key)
            if rec is not None and (not only_unset or self.rec_cat[rec] is None):
                self.rec_cat[rec] = category


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

    from .tracking import StorageTracker

    matmuls = _matmul_ops()
    lt_ops = _lt_ops()
    addmm = torch.ops.aten.addmm.default
    prim_device = torch.ops.prim.device.default
    cuda = recorder.target == "cuda"
    scratch_rules = _scratch_rules(recorder)
    convs = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)

    class _TraceTracker(StorageTracker):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is prim_device:  # FakeTensorMode asks for devices through the mode stack: no storage, no op
                return self.run_op(func, args, kwargs) if self.run_op is not None else func(*args, **(kwargs or {}))
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
            if func in convs:
                recorder.saw_convolution = True
            rule = scratch_rules.get(func)
            scratch = 0
            if rule is not None:
                kind, size = rule
                scratch = size(args)
            if scratch:
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


def _input_shapes(module, name: str, args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
    import torch

    return [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]


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
_SHAPE_WORDS = (
    "shape",
    "size",
    "dimension",
    "dim",
    "expected input",
    "channels",
    "mat1",
    "must match",
    "sizes of tensors",
)


def _forward_error(exc: Exception, recorder: _TraceRecorder, model, workload: Workload) -> MemprofError:
    msg = " ".join(str(exc).split())
    modules = recorder.modules
    frame = modules.stack[-1] if modules.stack else modules.failed  # the innermost call that raised
    where = frame.name if frame is not None else None
    if isinstance(exc, (RuntimeError, ValueError, IndexError)) and any(w in msg.lower() for w in _SHAPE_WORDS):
        module = None
        if where is not None:
            module = dict(model.named_modules()).get(where) if where != type(model).__name__ else model
        expects = ""
        if module is not None:
            attrs = [
                f"{a}={getattr(module, a)}"
                for a in (
                    "in_features",
                    "in_channels",
                    "normalized_shape",
                    "num_features",
                    "num_embeddings",
                    "embed_dim",
                )
                if hasattr(module, a)
            ]
            expects = f" ({type(module).__name__}{', ' + ', '.join(attrs) if attrs else ''})"
        got = ""
        if frame is not None:
            got = " received input shape(s) " + ", ".join("×".join(map(str, s)) or "scalar" for s in frame.data)
        inputs = workload.model.input_description()
        return InputShapeError(
            f"the model rejected its input {inputs} (batch {workload.batch_size}): layer "
            f"{where or '?'}{expects}{got}: {msg}",
            "give the per-sample input shape the model expects with --input-shape (batch excluded), "
            "e.g. --input-shape 3,224,224",
        )
    return _step_error(exc, "forward")


def _step_error(exc: Exception, phase: str) -> MemprofError:
    if isinstance(exc, MemprofError):
        return exc
    name = type(exc).__name__
    msg = " ".join(str(exc).split())[:400]
    if "DataDependent" in name or "data-dependent" in msg.lower() or "item()" in msg or "Unsupported" in name:
        hint = (
            "the step reads tensor values (.item(), data-dependent shapes or an op fake tensors do not "
            "support); use `memprof measure` on a real device instead"
        )
    else:
        hint = "the model may need inputs memprof did not build: define memprof_batch()/memprof_loss() next to it"
    return TraceError(f"tracing the {phase} pass failed: {name}: {msg}", hint)


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
    """
    import gc
    import logging
    import warnings

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    if target not in ("cuda", "cpu"):
        raise UsageError(f"unknown trace target {target!r}", "choose cuda or cpu")
    if steps < 1:
        raise UsageError(f"`steps` must be at least 1, got {steps}", "trace 2 steps to see the steady state")
    started = time.perf_counter()
    if target == "cuda" and cuda_target is None:
        from .catalog import resolve_target

        cuda_target = resolve_target()
    if target != "cuda":
        cuda_target = None
    recorder = _TraceRecorder(target, kernel_scratch, cuda_target)
    rules = None
    notes: list[str] = []
    prepared = None
    model = None
    gc_was_enabled = gc.isenabled()
    real_get_rng_state = None
    tally: FlopTally | None = None
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    fake_log_level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # it logs every meta-kernel failure; ours become MemprofErrors
    try:
        with fake_mode, warnings.catch_warnings():
            # modules that test data_ptr() (nn.TransformerEncoder's fast path) make PyTorch warn about
            # fake tensors; the answer they get does not change what is allocated, so keep it off the screen
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            fast = fastfake.FastFake(fake_mode) if fastfake.enabled() else None
            with fastfake.mode(fast):  # parameters and buffers are made through the same fast cache
                model = _build_fake_model(workload)
            tracker = _make_tracker(recorder)
            if fast is not None:
                tracker.run_op = fast.run
            with tracker:
                recorder.category = MemCategory.PARAMETER
                params = list(model.parameters())
                tracker.register(params)
                recorder.category = MemCategory.BUFFER
                tracker.register(list(model.buffers()))
                recorder.category = None
                optimizer = None
                if workload.mode == "train":
                    trainable = [p for p in params if p.requires_grad]
                    optimizer = make_optimizer(workload.optimizer, trainable, target, workload.offload)
                recorder.category = MemCategory.INPUT
                try:
                    args, kwargs, tgt = workload.model.make_batch(workload.batch_size, "cpu", workload.precision)
                except MemprofError:
                    raise
                except Exception as exc:
                    raise _step_error(exc, "input-building") from None
                recorder.category = None
                prepared = Prepared(workload, model, optimizer, args, kwargs, tgt, workload.model.loss_fn(), "cpu")
                del args, kwargs, tgt
                recorder.modules.attach(model)
                recorder.root_label = type(model).__name__
                for name, module in model.named_modules():  # names as the module tracker gives them
                    recorder.module_types.setdefault(name or recorder.root_label, type(module).__name__)
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
                    if phase == "forward":
                        recorder.forward_start[recorder.step] = len(recorder.events)
                        recorder.forward_op[recorder.step] = tracker.op_count
                    elif phase == "backward":
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
                        recorder.optimizer_start[recorder.step] = len(recorder.events)
                        recorder.optimizer_op[recorder.step] = tracker.op_count
                        for p in prepared.model.parameters():
                            if p.grad is not None:
                                rec = recorder.key_to_rec.get(p.grad.untyped_storage()._cdata)
                                if rec is not None:
                                    recorder.rec_cat[rec] = MemCategory.GRADIENT
                    elif phase == "done":
                        recorder.done_start.setdefault(recorder.step, len(recorder.events))
                        recorder.done_op.setdefault(recorder.step, tracker.op_count)
                    if phase == "done" and prepared.optimizer is not None:
                        for state in prepared.optimizer.state.values():
                            for name, value in state.items():
                                if isinstance(value, torch.Tensor):
                                    key = value.untyped_storage()._cdata
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

                replay = replay_steps and workload.mode == "train"
                if cuda_target is not None:
                    from .cudarules import CudaRules

                    rules = CudaRules(cuda_target, workload.precision.torch_autocast_dtype())
                tally = FlopTally(recorder.locate, count_bytes) if count_flops or count_bytes else None
                with rules if rules is not None else contextlib.nullcontext():
                    for step in range(steps):
                        recorder.step = step
                        recorder.tally = tally if step == 0 else None
                        try:
                            if step == 0 or not replay:
                                train_step(prepared, on_phase)
                            else:
                                _replay_step(recorder, tracker, on_phase, step)
                        except MemprofError:
                            raise
                        except Exception as exc:
                            if recorder.phase == "forward":
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
    )


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
    if workload.offload == "optimizer" and target == "cuda":
        notes.append(
            "optimizer offloaded: fp32 master weights, gradients copied to the CPU, the optimizer state and the "
            "CPU step's temporaries are CPU memory (host peak), not in the GPU peak"
        )
    return notes


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
    copy(start, stop, tracker.op_count - recorder.forward_op[0], False)
    tracker.op_count += recorder.optimizer_op[0] - recorder.forward_op[0]
    on_phase("optimizer")
    copy(stop, recorder.done_start[0], tracker.op_count - recorder.optimizer_op[0], True)
    tracker.op_count += recorder.done_op[0] - recorder.optimizer_op[0]
    on_phase("done")


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
    for i, (r, sign, _op, _phase, _mod, step) in enumerate(events):
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
    if peak_phase == "done":
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
