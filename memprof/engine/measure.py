"""Real trials: the shared training step on CUDA, or on the CPU under an enforced memory cap.

A trial builds the model, optimizer and one batch, runs :func:`memprof.engine.workload.train_step`
``steps`` times (the first creates the optimizer state, the later ones are the steady
state; with AMP fp16's GradScaler, steps whose optimizer step it skipped are run again, up to
:data:`memprof.engine.workload.MAX_SKIPPED_STEPS`, so the state is measured), and reports peak
memory. Running out of memory is an answer, not an error: it is recognised (the exception type
first, known messages second), everything the trial held is dropped (model, optimizer, batch and
the exception's traceback frames), the caches are emptied, and the memory still allocated
afterwards is compared with the baseline from before the trial.

On the CPU the cap is enforced by counting live tensor storages
(:class:`memprof.engine.tracking.StorageTracker`, parameters, buffers and inputs included):
the first allocation that takes the total over the cap raises the error PyTorch's own
CPU allocator raises, ``torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate
memory: ...")``, which Lightning's ``is_oom_error`` and accelerate's
``should_reduce_batch_size`` both recognise.

``IsolatedRunner`` runs each trial in a fresh child process (multiprocessing's forkserver,
with torch imported once in the server, or spawn where there is no forkserver): the parent
never touches CUDA, and whatever a trial leaves behind dies with the child.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import re
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..errors import MeasureError, MemprofError, NoGPUError
from ..results import BatchTrial, Metric
from .workload import MAX_SKIPPED_STEPS, Prepared, Workload, make_grad_scaler, prepare, train_step, train_steps

PhaseCallback = Callable[[int, str], None]  # (step number from 1, phase)


class Runner(Protocol):
    """Runs real training steps at one batch size and reports their memory as a :class:`BatchTrial`.

    Implemented by :class:`CpuCapRunner` (the CPU under a cap), :class:`CudaRunner` and
    :class:`IsolatedRunner` (either, each trial in a child process).
    """

    device: str  # "cpu" | "cuda"
    metric: Metric  # the figure the capacity limits: allocated (CPU cap) or reserved (CUDA)

    def describe(self) -> str: ...

    def capacity_bytes(self) -> int | None: ...

    def run(
        self, workload: Workload, batch: int, steps: int = 2, on_phase: PhaseCallback | None = None
    ) -> BatchTrial: ...


#: messages that mean "out of memory" when the exception type does not say so
OOM_MESSAGES = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUDNN_STATUS_NOT_SUPPORTED",  # cuDNN's answer when it cannot get workspace
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    "HIP out of memory",
    "XPU out of memory",
)


def oom_kind(exc: BaseException) -> str | None:
    """How ``exc`` is recognised as out-of-memory: "exception type", "message", or None if it is not one."""
    import torch

    oom_types = tuple(
        t
        for t in (
            getattr(torch, "OutOfMemoryError", None),
            getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
        )
        if t
    )
    if oom_types and isinstance(exc, oom_types):
        return "exception type"
    if isinstance(exc, MemoryError):
        return "exception type"
    if isinstance(exc, RuntimeError):
        text = str(exc)
        if any(m in text for m in OOM_MESSAGES):
            return "message"
    return None


def is_oom_error(exc: BaseException) -> bool:
    return oom_kind(exc) is not None


def _first_line(text: str, limit: int = 300) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def cpu_oom_message(nbytes: int, live_bytes: int, cap_bytes: int) -> str:
    """The message of the CPU cap's error: PyTorch's CPU allocator wording, then memprof's numbers."""
    return (
        f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {nbytes} bytes. "
        f"(memprof --memory-limit cap of {cap_bytes} bytes: {live_bytes - nbytes} bytes of tensors were live)"
    )


def _resident_tensors(prepared) -> list:
    """Everything a trial holds before the first step: parameters, buffers, inputs, target."""
    return [
        list(prepared.model.parameters()),
        list(prepared.model.buffers()),
        prepared.args,
        prepared.kwargs,
        prepared.target,
    ]


class _Trial:
    """Bookkeeping shared by the runners: phase tracking and the OOM/cleanup protocol."""

    def __init__(self, batch: int, on_phase: PhaseCallback | None):
        self.batch = batch
        self.step = 0
        self.phase = "setup"
        self._on_phase = on_phase
        self.t0 = time.perf_counter()
        self.skipped = 0

    def phase_cb(self, phase: str) -> None:
        self.phase = phase
        if self._on_phase is not None:
            self._on_phase(self.step, phase)

    def begin_step(self, i: int) -> None:
        self.step = i
        self.phase_cb("forward")

    @property
    def where(self) -> str:
        return "setup" if self.step == 0 else f"step {self.step} {self.phase}"

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def run_steps(self, prepared: Prepared, steps: int, scaler=None) -> None:
        """``steps`` steps in which the optimizer really stepped (GradScaler's skipped ones run again)."""
        self.skipped = train_steps(prepared, steps, scaler, on_step=self._set_step, on_phase=self.phase_cb)

    def _set_step(self, i: int) -> None:
        self.step = i


def _classify(exc: BaseException, trial: _Trial) -> tuple[str, str]:
    """(message, how recognised) for an OOM; re-raises anything else as MeasureError (or as itself)."""
    if isinstance(exc, (KeyboardInterrupt, MemprofError)):
        raise exc
    kind = oom_kind(exc)
    if kind is None:
        from .blame import at, location

        raise MeasureError(
            f"batch {trial.batch}: the training step failed ({trial.where}): "
            f"{type(exc).__name__}: {_first_line(str(exc))}{at(exc)}",
            (f"the model's own code raised it at {location(exc)}: fix it there; " if location(exc) else "")
            + "this is not an out-of-memory error (`memprof estimate` checks the model without running it)",
        ) from None
    return _first_line(str(exc)), kind


# =========================================================================== CPU under a cap
class CpuMemoryCap:
    """Cap live tensor bytes on the CPU: crossing ``cap_bytes`` raises PyTorch's CPU out-of-memory error.

    Use as a context manager around the code to cap (a :class:`StorageTracker` dispatch
    mode), after :meth:`register`-ing what is already resident (parameters, buffers,
    inputs). Frees are seen whether or not the mode is active, so one cap can be entered
    once per step (Lightning's ``optimizer_step``) or around a whole trial.
    ``attempted_bytes`` is the live total the failing allocation would have made.
    """

    def __init__(self, cap_bytes: int):
        from .tracking import StorageTracker

        self.cap_bytes = int(cap_bytes)
        self.attempted_bytes: int | None = None
        self.tracker = StorageTracker(on_alloc=self._check)

    def _check(self, _key, nbytes: int, _func) -> None:
        live = self.tracker.current_bytes
        if live > self.cap_bytes:
            import torch

            self.attempted_bytes = live
            raise torch.OutOfMemoryError(cpu_oom_message(nbytes, live, self.cap_bytes))

    def register(self, tensors) -> None:
        """Count these tensors (and nested containers of them) as live; raises if that crosses the cap."""
        from torch.utils._pytree import tree_leaves

        self.tracker.register(tree_leaves(tensors))

    @property
    def live_bytes(self) -> int:
        return self.tracker.current_bytes

    @property
    def peak_bytes(self) -> int:
        return self.tracker.peak_bytes

    def close(self) -> None:
        self.tracker.detach()

    def __enter__(self) -> CpuMemoryCap:
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.tracker.__exit__(*exc)


class CpuCapRunner:
    """Real steps on the CPU with live tensor bytes capped at ``cap_bytes``."""

    device = "cpu"
    metric = Metric.ALLOCATED

    def __init__(self, cap_bytes: int):
        if cap_bytes <= 0:
            raise MeasureError(f"memory limit must be positive, got {cap_bytes}", "e.g. --memory-limit 4GiB")
        self.cap_bytes = int(cap_bytes)

    def describe(self) -> str:
        return "cpu (live tensor bytes capped)"

    def capacity_bytes(self) -> int:
        return self.cap_bytes

    def run(self, workload: Workload, batch: int, steps: int = 2, on_phase: PhaseCallback | None = None) -> BatchTrial:
        cap = CpuMemoryCap(self.cap_bytes)
        trial = _Trial(batch, on_phase)
        error = kind = where = None
        peak = None
        prepared: Prepared | None
        try:
            prepared = prepare(workload.with_batch(batch), "cpu")
            cap.register(_resident_tensors(prepared))
            with cap:
                trial.run_steps(prepared, steps, make_grad_scaler(workload, "cpu"))
            peak = cap.peak_bytes
            steps_run = trial.step
        except BaseException as exc:  # noqa: BLE001 - classified below; anything else re-raised
            try:
                error, kind = _classify(exc, trial)
            except BaseException:
                cap.close()
                raise
            where = trial.where
            steps_run = max(0, trial.step - 1)
            exc.__traceback__ = None
            del exc
        prepared = None  # noqa: F841 - drop the model, optimizer and batch
        gc.collect()
        leaked = cap.live_bytes
        cap.close()
        return BatchTrial(
            batch_size=batch,
            fits=error is None,
            steps_run=steps_run,
            seconds=trial.seconds(),
            peak_allocated_bytes=peak,
            capacity_bytes=self.cap_bytes,
            error=error,
            oom_detected_by=kind,
            oom_phase=where,
            attempted_bytes=cap.attempted_bytes,
            leaked_bytes=leaked,
            skipped_steps=trial.skipped,
        )


# =========================================================================== CUDA
class CudaRunner:
    """Real steps on one CUDA device; peak allocated/reserved from torch, process usage from NVML."""

    device = "cuda"
    metric = Metric.RESERVED

    def __init__(self, index: int = 0):
        import torch

        if not torch.cuda.is_available():
            raise NoGPUError("CUDA is not available", "use `memprof estimate`, or --device cpu --memory-limit 4GiB")
        if index >= torch.cuda.device_count():
            raise NoGPUError(
                f"there is no CUDA device {index} (found {torch.cuda.device_count()})", "choose --device cuda:0"
            )
        self.index = index
        self.dev = torch.device("cuda", index)

    def describe(self) -> str:
        import torch

        return f"cuda:{self.index} {torch.cuda.get_device_name(self.index)}"

    def _clean(self) -> None:
        import torch

        gc.collect()
        torch.cuda.synchronize(self.dev)
        # cuBLAS keeps a workspace per (handle, stream) for the life of the process (65 MiB on an H200 with
        # torch 2.11): without this, the first trial's peak counts them and the later ones do not, and they
        # read as a leak. Each trial then allocates them afresh, as the traced prediction does.
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            with torch.cuda.device(self.dev):
                clear()
        torch.cuda.empty_cache()

    def capacity_bytes(self) -> int:
        """What torch can reserve now: free device memory plus what it already holds."""
        import torch

        self._clean()
        free, _total = torch.cuda.mem_get_info(self.dev)
        return int(free + torch.cuda.memory_reserved(self.dev))

    def run(self, workload: Workload, batch: int, steps: int = 2, on_phase: PhaseCallback | None = None) -> BatchTrial:
        import torch

        from . import nvml

        self._clean()
        baseline = torch.cuda.memory_allocated(self.dev)
        capacity = self.capacity_bytes()
        torch.cuda.reset_peak_memory_stats(self.dev)
        trial = _Trial(batch, on_phase)
        error = kind = where = None
        peak_alloc = peak_res = nvml_used = overhead = None
        prepared: Prepared | None = None
        scaler = make_grad_scaler(workload, "cuda")
        try:
            with torch.cuda.device(self.dev):
                prepared = prepare(workload.with_batch(batch), self.dev)
                trial.run_steps(prepared, steps, scaler)
            torch.cuda.synchronize(self.dev)
            steps_run = trial.step
            peak_alloc = int(torch.cuda.max_memory_allocated(self.dev) - baseline)
            peak_res = int(torch.cuda.max_memory_reserved(self.dev))
            nvml_used = nvml.process_used_bytes(self.index)
            if nvml_used is not None:
                overhead = int(nvml_used - torch.cuda.memory_reserved(self.dev))
        except BaseException as exc:  # noqa: BLE001
            error, kind = _classify(exc, trial)
            where = trial.where
            steps_run = max(0, trial.step - 1)
            peak_res = int(torch.cuda.max_memory_reserved(self.dev))
            exc.__traceback__ = None
            del exc
        prepared = scaler = None  # noqa: F841
        self._clean()
        leaked = int(torch.cuda.memory_allocated(self.dev) - baseline)
        return BatchTrial(
            batch_size=batch,
            fits=error is None,
            steps_run=steps_run,
            seconds=trial.seconds(),
            peak_allocated_bytes=peak_alloc,
            peak_reserved_bytes=peak_res,
            nvml_used_bytes=nvml_used,
            cuda_overhead_bytes=overhead,
            capacity_bytes=capacity,
            error=error,
            oom_detected_by=kind,
            oom_phase=where,
            leaked_bytes=leaked,
            skipped_steps=trial.skipped,
        )


# =========================================================================== isolated trials
@dataclass(frozen=True)
class _Recipe:
    """How a child process rebuilds the workload (user files are re-imported there)."""

    ref: str
    kwargs: dict
    inputs: Any
    workload_fields: dict


def workload_recipe(workload: Workload) -> _Recipe:
    import dataclasses

    spec = workload.model
    fields = {f.name: getattr(workload, f.name) for f in dataclasses.fields(workload) if f.name != "model"}
    return _Recipe(spec.ref, dict(spec.kwargs), spec.inputs, fields)


def rebuild_workload(recipe: _Recipe) -> Workload:
    from .loading import load_model

    spec = load_model(recipe.ref, recipe.kwargs)
    spec.inputs = recipe.inputs
    return Workload(model=spec, **recipe.workload_fields)


def _child(recipe: _Recipe, kind: str, arg: int, batch: int, steps: int, conn) -> None:
    """Entry point of a trial's child process: run one trial, send phases and the result."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the child
    try:
        workload = rebuild_workload(recipe)
        runner = CpuCapRunner(arg) if kind == "cpu" else CudaRunner(arg)
        trial = runner.run(workload, batch, steps, lambda step, phase: conn.send(("phase", step, phase)))
        conn.send(("result", trial))
    except MemprofError as exc:
        conn.send(("error", type(exc).__name__, exc.message, exc.hint))
    except BaseException as exc:  # noqa: BLE001
        conn.send(
            (
                "error",
                "MeasureError",
                f"{type(exc).__name__}: {_first_line(str(exc))}",
                _first_line(traceback.format_exc().strip().splitlines()[-1]),
            )
        )
    finally:
        conn.close()


def _trial_context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "memprof.engine.measure", "memprof.engine.loading"])
        return ctx
    return multiprocessing.get_context("spawn")


class IsolatedRunner:
    """Each trial in a fresh child process. The parent never initialises CUDA.

    The children fork from a forkserver that imported torch (and nothing that touches CUDA)
    once, so a trial costs no interpreter start-up; each child re-imports the user's model.
    """

    def __init__(self, kind: str, arg: int, description: str):
        self.kind = kind  # "cpu" (arg: cap bytes) | "cuda" (arg: device index)
        self.arg = arg
        self.device = kind
        self.metric = Metric.ALLOCATED if kind == "cpu" else Metric.RESERVED
        self._description = description
        self._ctx = _trial_context()

    def describe(self) -> str:
        return self._description + " (each trial in a child process)"

    def capacity_bytes(self) -> int | None:
        if self.kind == "cpu":
            return self.arg
        return None  # measured by each child; the search takes it from the trials

    def run(self, workload: Workload, batch: int, steps: int = 2, on_phase: PhaseCallback | None = None) -> BatchTrial:
        from .. import errors as errors_mod

        parent, child = self._ctx.Pipe(duplex=False)
        args = (workload_recipe(workload), self.kind, self.arg, batch, steps, child)
        proc = self._ctx.Process(target=_child, args=args, daemon=True)
        t0 = time.perf_counter()
        try:
            proc.start()
        except OSError:  # no forkserver here (sandboxed sockets, ...): start the interpreter afresh
            self._ctx = multiprocessing.get_context("spawn")
            proc = self._ctx.Process(target=_child, args=args, daemon=True)
            proc.start()
        child.close()
        message = None
        try:
            while True:
                if parent.poll(0.1):
                    try:
                        message = parent.recv()
                    except EOFError:
                        break
                    if message[0] == "phase":
                        if on_phase is not None:
                            on_phase(message[1], message[2])
                        continue
                    break
                if not proc.is_alive() and not parent.poll(0):
                    break
        except KeyboardInterrupt:
            proc.terminate()
            proc.join(5)
            raise
        finally:
            parent.close()
        proc.join(30)
        if proc.is_alive():  # pragma: no cover - a child that hangs after replying
            proc.terminate()
            proc.join(5)
        if message is None or message[0] not in ("result", "error"):
            code = proc.exitcode
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            raise MeasureError(
                f"batch {batch}: the trial's child process {how} without a result",
                "a signal 9 usually means the host ran out of RAM; try without --isolate to see the error",
            )
        if message[0] == "error":
            cls = getattr(errors_mod, message[1], MeasureError)
            if not (isinstance(cls, type) and issubclass(cls, MemprofError)):
                cls = MeasureError
            raise cls(message[2], message[3])
        trial: BatchTrial = message[1]
        return replace(trial, seconds=time.perf_counter() - t0)


def make_runner(device: str, memory_limit: int | None, isolate: bool = False) -> Runner:
    """``device``: "cpu" (needs ``memory_limit``), "cuda" or "cuda:N". Raises NoGPUError/UsageError."""
    from ..errors import UsageError

    device = (device or "cuda").strip().lower()
    if device == "cpu":
        if memory_limit is None:
            raise UsageError(
                "--device cpu needs --memory-limit",
                "e.g. --device cpu --memory-limit 4GiB (live tensor bytes are capped there)",
            )
        if isolate:
            return IsolatedRunner("cpu", int(memory_limit), CpuCapRunner(memory_limit).describe())
        return CpuCapRunner(memory_limit)
    if device == "cuda" or device.startswith("cuda:"):
        try:
            index = int(device.split(":", 1)[1]) if ":" in device else 0
        except ValueError:
            raise UsageError(f"cannot read device {device!r}", "write cuda, cuda:1 or cpu") from None
        if memory_limit is not None:
            raise UsageError(
                "--memory-limit is for --device cpu",
                "on a GPU the device's own memory is the limit; use `memprof estimate --gpu-memory` "
                "to ask about another card",
            )
        if isolate:
            return _isolated_cuda(index)
        return CudaRunner(index)
    raise UsageError(f"unknown device {device!r}", "write cuda, cuda:1 or cpu")


def _isolated_cuda(index: int) -> IsolatedRunner:
    """Check CUDA is there without creating a CUDA context in this process (NVML, else the driver's device count)."""
    from . import nvml

    info = nvml.device_info(index)
    if info is not None:
        return IsolatedRunner("cuda", index, f"cuda:{index} {info.name}")
    import torch

    if not torch.cuda.is_available():  # asks the driver for a device count; allocates nothing on the GPU
        raise NoGPUError("CUDA is not available", "use `memprof estimate`, or --device cpu --memory-limit 4GiB")
    return IsolatedRunner("cuda", index, f"cuda:{index}")


def measure_cpu_step(workload: Workload, *, steps: int = 2, storages: bool = False) -> dict[str, int]:
    """Run ``steps`` REAL training steps on the CPU and measure peak live bytes without the tracer.

    The truth comes from ``torch.profiler`` memory events (every CPU allocator allocation
    and free, oneDNN scratch included), summed in time order, plus the storages resident
    before the first step (parameters, buffers, inputs, optimizer state). Used by the
    tests and ``scripts/validate_zoo.py``; it allocates the model's real memory.
    Returns ``{"peak_bytes", "first_step_peak_bytes", "steady_peak_bytes", "resident_bytes"}``;
    with ``storages`` also ``"storage_peak_bytes"``: the same steps' peak of live tensor storages
    (a :class:`memprof.engine.tracking.StorageTracker`, as the CPU cap counts them: what a GPU would
    hold, without the CPU kernels' internal scratch). The tracker's dispatch mode does not change which
    kernels run (``peak_bytes`` is the same with ``storages``); module hooks would (they turn off
    ``nn.TransformerEncoderLayer``'s fused inference path), and none are installed here.
    """
    import gc
    import logging

    import torch
    from torch.profiler import ProfilerActivity, profile

    from .workload import prepare

    torch.manual_seed(0)
    prepared = prepare(workload, "cpu")
    seen: set[int] = set()
    resident = 0
    tensors = list(prepared.model.parameters()) + list(prepared.model.buffers())
    from torch.utils._pytree import tree_leaves

    inputs = tree_leaves((prepared.args, prepared.kwargs, prepared.target))  # lists of images, dicts of targets
    tensors += [t for t in inputs if isinstance(t, torch.Tensor)]
    if prepared.optimizer is not None:
        for state in prepared.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            resident += st.nbytes()
    from .cpumem import memory_events, quiet_stderr

    gc.collect()
    gc.disable()
    logging.getLogger("torch.profiler").setLevel(logging.ERROR)
    cur = 0
    step_peaks: list[int] = []
    tracker = None
    if storages:
        from .tracking import StorageTracker

        tracker = StorageTracker()
        tracker.register(tensors)
    try:
        for _ in range(steps):
            with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                with tracker if tracker is not None else contextlib.nullcontext():
                    train_step(prepared)
            events = memory_events(prof)
            peak = cur
            for _, nbytes in events:
                cur += nbytes
                if cur > peak:
                    peak = cur
            step_peaks.append(resident + peak)
    finally:
        gc.enable()
        if tracker is not None:
            tracker.detach()
    del prepared
    result = _step_peaks(step_peaks, resident) | {"end_bytes": resident + cur}
    if tracker is not None:
        result["storage_peak_bytes"] = tracker.peak_bytes
    return result


def _step_peaks(step_peaks: list[int], resident: int) -> dict[str, int]:
    return {
        "peak_bytes": max(step_peaks),
        "first_step_peak_bytes": step_peaks[0],
        "steady_peak_bytes": step_peaks[-1],
        "resident_bytes": resident,
    }


def measure_cuda_step(
    workload: Workload,
    *,
    index: int = 0,
    steps: int = 2,
    first_step: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """Run ``steps`` REAL training steps on CUDA device ``index`` and read what the trace predicts.

    The model, optimizer and batch are built first; construction temporaries are released
    (``empty_cache``) and the peak statistics reset, so the figures cover the steps from the
    resident state on, as the trace does: ``torch.cuda.max_memory_allocated()``,
    ``max_memory_reserved()`` and NVML's usage for this process (CUDA context included; where
    NVML does not list processes, the device's used memory minus what it used before). Used by
    ``memprof estimate --verify`` and ``scripts/validate_gpu.py``. Returns ``{"allocated_bytes",
    "reserved_bytes", "nvml_bytes" (None when unknown), "first_step_allocated_bytes", "optimizer_steps",
    "skipped_steps", "device", "capability"}``: a step whose ``optimizer.step()`` GradScaler skipped is run
    again (up to :data:`memprof.engine.workload.MAX_SKIPPED_STEPS`), so the optimizer state is measured.
    A step that runs out of memory raises (see :func:`is_oom_error`). ``first_step``
    makes a context the first step runs in (``scripts/validate_gpu.py`` notes which attention kernels run).
    """
    import torch

    from . import nvml

    if not torch.cuda.is_available():
        raise NoGPUError("CUDA is not available", "verify on the CPU instead: `device` cpu")
    before = nvml.device_info(index)  # before this process's CUDA context exists
    baseline = before.used_bytes if before is not None else None
    dev = torch.device("cuda", index)
    torch.manual_seed(0)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with torch.cuda.device(dev):
            prepared = prepare(workload, dev)
            scaler = make_grad_scaler(workload, "cuda")
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # construction temporaries: the trace starts from params/buffers/inputs
            torch.cuda.reset_peak_memory_stats()
            peaks: list[int] = []  # after each step in which the optimizer stepped
            skipped = 0  # steps whose optimizer.step() GradScaler skipped (inf grads at its scale): run again
            while len(peaks) < steps and skipped <= MAX_SKIPPED_STEPS:
                with first_step() if first_step is not None and not peaks and not skipped else contextlib.nullcontext():
                    stepped = train_step(prepared, scaler=scaler)
                torch.cuda.synchronize()
                if stepped:
                    peaks.append(int(torch.cuda.max_memory_allocated()))
                else:
                    skipped += 1
            used = nvml.process_used_bytes(index)
            if used is None and baseline is not None:
                info = nvml.device_info(index)
                if info is not None:
                    used = info.used_bytes - baseline
            result = {
                "allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "reserved_bytes": int(torch.cuda.max_memory_reserved()),
                "nvml_bytes": used,
                "first_step_allocated_bytes": peaks[0] if peaks else None,
                "optimizer_steps": len(peaks),
                "skipped_steps": skipped,
                "device": torch.cuda.get_device_name(),
                "capability": list(torch.cuda.get_device_capability()),
            }
        del prepared, scaler
    finally:
        torch.backends.cudnn.benchmark = benchmark
        gc.collect()
        torch.cuda.empty_cache()
    return result


# =========================================================================== one rank of a real job
def _c10():
    import ctypes
    import os

    import torch

    return ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))


def exact_cpu_accounting() -> None:
    """Make c10's CPU allocator keep an exact running total across threads (``FLAGS_caffe2_report_cpu_memory_usage``).

    Without it the allocator forgets frees made on threads the profiler does not watch (gloo's
    workers free collective buffers). Call it first thing in the process: allocations made before
    it are not counted (nor are their frees).
    """
    import ctypes

    ctypes.c_bool.in_dll(_c10(), "FLAGS_caffe2_report_cpu_memory_usage").value = True


#: c10's CPU allocator, with the flag above and INFO logging: one line per allocation and free, from any thread
_C10_LINE = re.compile(rb"C10 (alloc|deleted) (\d+) bytes, total alloc (\d+) bytes")
#: sizes of the marker allocations that cut the log into phases (odd sizes nothing else allocates)
_MARKS = tuple(7_777_777 + 2 * i for i in range(64))


@contextlib.contextmanager
def c10_allocation_log() -> Iterator[list[tuple[int, int]]]:
    """While open, c10's CPU allocator logs every allocation and free with its exact running total, on any
    thread (gloo's workers included); at exit the list holds ``(signed bytes, total after)`` in order.

    Needs :func:`exact_cpu_accounting` at process start. The log goes to stderr (file descriptor 2),
    which is redirected to a temporary file meanwhile.
    """
    import ctypes
    import os
    import sys
    import tempfile

    level = ctypes.c_int.in_dll(_c10(), "FLAGS_caffe2_log_level")
    events: list[tuple[int, int]] = []
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        saved_level, level.value = level.value, 0  # INFO
        try:
            yield events
        finally:
            level.value = saved_level
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            log.seek(0)
            for m in _C10_LINE.finditer(log.read()):
                sign = 1 if m.group(1) == b"alloc" else -1
                events.append((sign * int(m.group(2)), int(m.group(3))))


def _mark(i: int) -> None:
    """A marker in the allocation log: allocate and free ``_MARKS[i]`` bytes."""
    import torch

    torch.empty(_MARKS[i], dtype=torch.uint8)


def _phases(events: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """From the log: the total at each marker, and the highest total between each marker and the next."""
    at_marks: list[int] = []
    peaks: list[int] = []
    current: int | None = None
    for nbytes, total in events:
        if nbytes in _MARKS:  # a marker: close the phase before it, open the next
            if current is not None:
                peaks.append(current)
            current = total - nbytes
            at_marks.append(current)
        elif current is not None and -nbytes not in _MARKS:
            current = max(current, total)
    return at_marks, peaks


def measure_rank_step(workload: Workload, *, steps: int = 2) -> dict[str, int]:
    """One rank of a real data-parallel job on the CPU: build, wrap, run ``steps`` REAL steps, measure.

    Independent of the tracer: c10's CPU allocator logs every allocation and free with its exact
    running total, from every thread (:func:`c10_allocation_log`; :func:`exact_cpu_accounting` must
    have run at process start), so buffers gloo allocates on its own threads count too. The peak
    counts everything this rank allocated from just before the model was built (parameters,
    buffers, DDP buckets, FSDP shards, optimizer state, inputs, collective buffers). The process
    group must be initialised (``torchrun``).
    Returns ``{"peak_bytes", "first_step_peak_bytes", "steady_peak_bytes", "resident_bytes"}``.
    """
    import gc

    import torch

    from .workload import prepare

    torch.manual_seed(0)
    gc.collect()
    gc.disable()
    try:
        with c10_allocation_log() as events:
            _mark(0)
            prepared = prepare(workload, "cpu")
            _mark(1)
            for i in range(steps):
                train_step(prepared)
                _mark(2 + i)
            del prepared
            _mark(2 + steps)
    finally:
        gc.enable()
    at_marks, peaks = _phases(events)
    base = at_marks[0]
    return _step_peaks([p - base for p in peaks[1 : 1 + steps]], at_marks[1] - base)
