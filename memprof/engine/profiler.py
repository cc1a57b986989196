"""``memprof profile``: run a user's script under the profiler and say where its memory goes.

How it works (real tensors, CPU or CUDA, no re-execution):

* a :class:`~memprof.engine.tracking.StorageTracker` subclass is the active dispatch mode for the
  whole script: every storage an op creates is counted once, and a weakref callback tells
  when it dies;
* a ``sys.settrace`` hook that only follows frames of the user's own files (the script's
  folder, minus installed packages) keeps a stack of the lines being executed: allocations
  are charged to the innermost one, hits and per-line deltas/peaks come from its line events;
* global module hooks (:class:`~memprof.engine.modtrack.ModuleTracker`) keep a stack of modules in
  forward; autograd sequence numbers recorded around each forward tell, in backward, which
  module's node is running;
* optimizer step hooks and per-parameter post-accumulate-grad hooks label optimizer
  state and gradients; parameters and buffers are labelled when their module first runs.

Every hook, the trace function, ``sys.argv`` and ``sys.path`` are restored in ``finally``:
a script that raises or calls ``sys.exit`` still yields its partial profile.
"""

from __future__ import annotations

import functools
import linecache
import os
import runpy
import sys
import time
import weakref
from array import array
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import NoGPUError, UsageError
from ..results import (
    UNUSED_CUDA,
    LeakSuspect,
    LineStat,
    MemCategory,
    ModuleStat,
    ProfileCuda,
    ProfilePeak,
    ProfileResult,
    ScriptOutcome,
    TensorGroup,
    TimelineSample,
)
from .modtrack import ModuleFrame, ModuleTracker
from .tracking import StorageTracker

OUTSIDE = "<outside the script's files>"

# fields of a storage record (a list, so that labels set later show in earlier snapshots)
_NBYTES, _SHAPE, _DTYPE, _DEVICE, _ORIGIN, _HIT, _CAT, _PHASE, _MODULE = range(9)
# fields of a line's statistics
_HITS, _DELTA, _MAXDELTA, _ALLOC, _PEAK = range(5)
# fields of a module's statistics
_CALLS, _ADDED, _FPEAK, _BALLOC, _BPEAK = range(5)

_DTYPE_NAMES: dict[Any, str] = {}
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LIBRARY_MARKERS = (
    os.sep + "site-packages" + os.sep,
    os.sep + "dist-packages" + os.sep,
    os.sep + ".venv" + os.sep,
    os.sep + "venv" + os.sep,
)


class _ProfileRecorder(StorageTracker):
    """The dispatch mode plus everything charged to lines, modules and phases."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in a dynamo-disable wrapper: two more Python frames
        # per op (each one a trace event under sys.settrace); this mode runs eager scripts only
        return False

    def __init__(self, user_dir: str, log: bool, cuda_samples: bool, device_type: str | None = None):
        super().__init__()
        self.device_type = device_type  # count only storages on this device type (None: all)
        self.user_dir = user_dir.rstrip(os.sep) + os.sep
        self.t0 = time.perf_counter()
        self.meta: dict[int, list] = {}  # live storages
        self._refs: dict[int, Any] = {}
        self._user_cache: dict[str, bool] = {}
        self.stack: list[list] = []  # user frames: [line key, bytes at line start, max during line]
        self.lines: dict[tuple[str, int], list[int]] = {}
        self.line_alloc: dict[tuple[str, int], int] = defaultdict(int)
        # modules in forward (frame data: [bytes at entry, max]); in backward, the module behind each node
        self.mtrack = ModuleTracker(on_enter=self.forward_pre, on_exit=self.forward_post)
        self.modules: dict[str, list] = {}
        self.module_types: dict[str, str] = {}
        self._sighted: weakref.WeakSet = weakref.WeakSet()
        self.opt_depth = 0
        self.script_globals: dict | None = None
        self.script_file: str | None = None
        # peak
        self.peak_info: tuple = (0.0, 0, None, None, "script")
        self._peak_dirty = False
        self.peak_live: list[list] = []
        # timeline (every allocation and free)
        self.tl_t = array("d")
        self.tl_b = array("q")
        self.cuda_samples = cuda_samples
        self.tl_cuda: list[tuple[float, int, int | None, int | None]] = []  # t, reserved, nvml, allocated
        self._next_cuda_sample = 0.0
        # --log records: (t, key, func, total, [(sign, record)])
        self.log: list[tuple] | None = [] if log else None
        self._log_pending: list = []
        self._hooks: list = []
        self._param_hooks: list = []
        self._seen_params: set[int] = set()
        self.closed = False

    # -- the user's files ------------------------------------------------------------------
    def is_user(self, filename: str) -> bool:
        u = self._user_cache.get(filename)
        if u is None:
            path = os.path.abspath(filename)
            u = (
                path.startswith(self.user_dir)
                and path.endswith(".py")
                and not path.startswith(_PACKAGE_DIR)
                and not any(m in path[len(self.user_dir) - 1 :] for m in _LIBRARY_MARKERS)
                and os.path.isfile(path)
            )  # not "<string>" / generated code named relative to the cwd
            self._user_cache[filename] = u
        return u

    # -- allocation and free -------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # OpOverload.__call__ only forwards to ._op: calling that saves a Python frame per op (and a
        # trace 'call' event: under sys.settrace every Python frame costs one)
        out = getattr(func, "_op", func)(*args, **(kwargs or {}))
        self.op_count += 1
        if isinstance(out, torch.Tensor):  # the common case, without pytree's cost
            # views and in-place ops return a storage already counted: no call (a Python frame) for them
            try:
                known = out.untyped_storage()._cdata in self.live
            except Exception:
                known = True
            if not known:
                self._track(out)
        elif isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) or t is None for t in out):
            for t in out:
                if t is not None:
                    self._track(t)
        else:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out

    def register(self, tensors, func=None) -> list[int]:  # keep the base API working
        new = []
        for t in tensors:
            if isinstance(t, torch.Tensor):
                key = self._track(t)
                if key is not None:
                    new.append(key)
        return new

    def _track(self, t: torch.Tensor) -> int | None:
        try:
            st = t.untyped_storage()
        except Exception:  # sparse and other storage-less tensors
            return None
        key = st._cdata
        if key in self.live or self.closed:
            return None
        dev = st.device.type
        if self.device_type is not None and dev != self.device_type:
            return None
        nbytes = st.nbytes()
        self.live[key] = nbytes
        cur = self.current_bytes = self.current_bytes + nbytes
        self._refs[key] = weakref.ref(st, functools.partial(self._freed, key))
        stack = self.stack
        if stack:
            top = stack[-1]
            origin = top[0]
            for entry in reversed(stack):  # outer frames' maxima are never below inner ones
                if entry[2] >= cur:
                    break
                entry[2] = cur
        else:
            origin = None
        if origin is not None:
            self.line_alloc[origin] += nbytes
            hit = self.lines[origin][_HITS]
        else:
            hit = 0
        # phase and module
        module = None
        if self.opt_depth:
            phase = "optimizer"
        elif torch._C._current_graph_task_id() != -1:
            phase = "backward"
            module = self.mtrack.backward_module()
            if module is not None:
                ms = self.modules[module]
                ms[_BALLOC] += nbytes
                if ms[_BPEAK] is None or cur > ms[_BPEAK]:
                    ms[_BPEAK] = cur
        elif self.mtrack.stack:
            phase = "forward"
            frames = self.mtrack.stack
            module = frames[-1].name
            for frame in reversed(frames):
                if frame.data[1] >= cur:
                    break
                frame.data[1] = cur
        else:
            phase = "script"
        cat = MemCategory.ACTIVATION if phase == "forward" and torch.is_grad_enabled() else MemCategory.TEMPORARY
        try:
            shape = tuple(t.shape)
        except Exception:
            shape = ()
        dtype = _DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            dtype = _DTYPE_NAMES[t.dtype] = str(t.dtype).replace("torch.", "")
        rec = [nbytes, shape, dtype, dev, origin, hit, cat, phase, module]
        self.meta[key] = rec
        now = time.perf_counter() - self.t0
        self.tl_t.append(now)
        self.tl_b.append(cur)
        if cur > self.peak_bytes:
            self.peak_bytes = cur
            self.peak_info = (now, self.op_count, origin, module, phase)
            self._peak_dirty = True
        if self.log is not None:
            self._log_pending.append((1, rec))
        return key

    def _freed(self, key: int, _ref: Any = None) -> None:  # also the weakref callback (partial(key), ref)
        if self.closed:
            return
        if self._peak_dirty:  # the live set right now is the live set at the peak
            self.peak_live = list(self.meta.values())
            self._peak_dirty = False
        nbytes = self.live.pop(key, None)
        self._refs.pop(key, None)
        rec = self.meta.pop(key, None)
        if nbytes is None:
            return
        self.current_bytes -= nbytes
        self.tl_t.append(time.perf_counter() - self.t0)
        self.tl_b.append(self.current_bytes)
        if self.log is not None and rec is not None:
            self._log_pending.append((-1, rec))

    def label(self, t: Any, cat: MemCategory) -> None:
        if isinstance(t, torch.Tensor):
            try:
                rec = self.meta.get(t.untyped_storage()._cdata)
            except Exception:
                return
            if rec is not None:
                rec[_CAT] = cat

    def close(self) -> None:
        if self._peak_dirty:
            self.peak_live = list(self.meta.values())
            self._peak_dirty = False
        self.closed = True
        self._refs.clear()  # dead weakrefs never call back

    # -- line tracing ---------------------------------------------------------------------------
    def make_global_trace(self):
        """The sys.settrace function. It runs for every new Python frame, torch's included (dozens per
        training step): a closure over a dict keeps the common "not the user's file" answer cheap."""
        cache_get = self._user_cache.get
        is_user = self.is_user
        enter = self._enter_user_frame

        def global_trace(frame, event, arg):
            u = cache_get(frame.f_code.co_filename)
            if u is None:
                u = is_user(frame.f_code.co_filename)
            return enter(frame) if u else None

        return global_trace

    def global_trace(self, frame, event, arg):
        return self.make_global_trace()(frame, event, arg)

    def _enter_user_frame(self, frame):
        if self.script_globals is None and frame.f_code.co_name == "<module>":
            self.script_globals = frame.f_globals
            self.script_file = frame.f_code.co_filename
        self.stack.append([None, self.current_bytes, self.current_bytes])
        return self.local_trace

    def _end_line(self, entry: list) -> None:
        key = entry[0]
        if key is None:
            return
        st = self.lines[key]
        d = self.current_bytes - entry[1]
        st[_DELTA] += d
        if d > st[_MAXDELTA]:
            st[_MAXDELTA] = d
        if entry[2] > st[_PEAK]:
            st[_PEAK] = entry[2]

    def local_trace(self, frame, event, arg):
        stack = self.stack
        if event == "line":
            if not stack:
                return self.local_trace
            entry = stack[-1]
            self._end_line(entry)
            if self.log is not None:
                self._flush_log(entry[0], frame.f_code.co_name)
            key = (frame.f_code.co_filename, frame.f_lineno)
            st = self.lines.get(key)
            if st is None:
                st = self.lines[key] = [0, 0, 0, 0, 0]
            st[_HITS] += 1
            cur = self.current_bytes
            entry[0] = key
            entry[1] = cur
            entry[2] = cur
            if self.cuda_samples:
                self._sample_cuda()
        elif event == "return":
            if stack:
                entry = stack.pop()
                self._end_line(entry)
                if self.log is not None:
                    self._flush_log(entry[0], frame.f_code.co_name)
        return self.local_trace

    def _flush_log(self, key, func: str) -> None:
        """One --log record for the line that just finished: live total and the storages it made or freed."""
        if key is None:
            return
        assert self.log is not None  # called only while --log records
        self.log.append((time.perf_counter() - self.t0, key, func, self.current_bytes, self._log_pending))
        self._log_pending = []

    def _sample_cuda(self) -> None:
        now = time.perf_counter() - self.t0
        if now < self._next_cuda_sample or not torch.cuda.is_initialized():
            return
        self._next_cuda_sample = now + 0.002
        nvml_b = None
        if not self.tl_cuda or now - self._last_nvml >= 0.25:
            from . import nvml

            nvml_b = nvml.process_used_bytes(torch.cuda.current_device())
            self._last_nvml = now
        self.tl_cuda.append((now, int(torch.cuda.memory_reserved()), nvml_b, int(torch.cuda.memory_allocated())))

    _last_nvml = 0.0

    # -- modules ----------------------------------------------------------------------------------
    def _first_sight(self, module: torch.nn.Module) -> None:
        for p in module.parameters(recurse=False):
            self.label(p, MemCategory.PARAMETER)
            if id(p) not in self._seen_params and p.requires_grad and hasattr(p, "register_post_accumulate_grad_hook"):
                self._seen_params.add(id(p))
                self._param_hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook))
            if p.grad is not None:
                self.label(p.grad, MemCategory.GRADIENT)
        for b in module.buffers(recurse=False):
            self.label(b, MemCategory.BUFFER)

    def _grad_hook(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self.label(p.grad, MemCategory.GRADIENT)

    def forward_pre(self, module, name: str, args, kwargs) -> list[int]:
        """A module call starts (the tracker's on_enter): label its tensors on first sight; the frame's data."""
        if module not in self._sighted:
            self._sighted.add(module)
            self._first_sight(module)
            self.module_types[name] = type(module).__name__
        if not self.mtrack.stack:  # the outermost call's tensor arguments allocated by the script: inputs
            for a in tree_leaves(args):
                if isinstance(a, torch.Tensor):
                    try:
                        rec = self.meta.get(a.untyped_storage()._cdata)
                    except Exception:
                        continue
                    if rec is not None and rec[_PHASE] == "script" and rec[_CAT] is MemCategory.TEMPORARY:
                        rec[_CAT] = MemCategory.INPUT
        if name not in self.modules:
            self.modules[name] = [0, 0, 0, 0, None]
        cur = self.current_bytes
        return [cur, cur]  # bytes at entry, highest since

    def forward_post(self, frame: ModuleFrame, output) -> None:
        """A module call ends (the tracker's on_exit, the frame popped): its statistics."""
        at_entry, highest = frame.data
        st = self.modules[frame.name]
        st[_CALLS] += 1
        added = self.current_bytes - at_entry
        if added > st[_ADDED]:
            st[_ADDED] = added
        if highest > st[_FPEAK]:
            st[_FPEAK] = highest
        parents = self.mtrack.stack
        if parents and highest > parents[-1].data[1]:
            parents[-1].data[1] = highest

    # -- optimizers -----------------------------------------------------------------------------
    def opt_pre(self, optimizer, args, kwargs):
        self.opt_depth += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.label(p, MemCategory.PARAMETER)
                if p.grad is not None:
                    self.label(p.grad, MemCategory.GRADIENT)

    def opt_post(self, optimizer, args, kwargs):
        self.opt_depth = max(0, self.opt_depth - 1)
        for state in optimizer.state.values():
            for v in tree_leaves(state):
                self.label(v, MemCategory.OPTIMIZER_STATE)

    # -- install / remove -------------------------------------------------------------------------
    def install_hooks(self) -> None:
        self.mtrack.attach()  # global module hooks: every module the script runs
        try:
            from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

            self._hooks.append(register_optimizer_step_pre_hook(self.opt_pre))
            self._hooks.append(register_optimizer_step_post_hook(self.opt_post))
        except ImportError:  # pragma: no cover - old torch: no optimizer labels
            pass

    def remove_hooks(self) -> None:
        for h in self._hooks + self._param_hooks:
            try:
                h.remove()
            except Exception:
                pass
        self._hooks.clear()
        self._param_hooks.clear()
        self.mtrack.detach()


# ======================================================================================== run
_ACTIVE: list[_ProfileRecorder | None] = [None]


def _after_fork_in_child() -> None:
    """DataLoader workers and other forks: stop tracing and counting there (the parent's profile is the one)."""
    rec = _ACTIVE[0]
    if rec is not None:
        sys.settrace(None)
        rec.closed = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _warm_up() -> None:
    """The first dispatch mode a process enters costs ~1 s of lazy imports: pay it before the clock starts."""

    class _Noop(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with _Noop():
        torch.empty(1).add_(1)


def _check_script(script: str | Path) -> Path:
    path = Path(script).expanduser()
    if not path.exists():
        raise UsageError(
            f"script {str(script)!r} not found", "give the path of a Python file, e.g. memprof profile train.py"
        )
    if path.is_dir():
        main = path / "__main__.py"
        if not main.exists():
            raise UsageError(f"{script} is a folder without __main__.py", "give the path of a Python file")
    return path


DEVICES = ("auto", "cuda", "cpu", "all")
#: ProfileResult.device when only CUDA memory was counted and the script never used CUDA


def profile_script(
    script: str | Path,
    args: Sequence[str] = (),
    *,
    log: bool = False,
    snapshot_path: str | Path | None = None,
    device: str = "auto",
    top: int = 50,
    timeline_points: int = 200,
) -> ProfileResult:
    """Run ``script`` as ``python script args...`` would, under the profiler; return what it used.

    ``device``: whose storages count: "cuda" (GPU memory; the "auto" choice when CUDA is
    available), "cpu", or "all" (the "auto" choice without CUDA).

    Never raises for the script's own failures (exceptions, ``sys.exit``, Ctrl-C): they end up
    in ``result.outcome`` with the partial profile. Raises :class:`UsageError` when the script
    cannot be found or ``device`` is unknown, and :class:`NoGPUError` when CUDA is asked for
    (a snapshot, ``device="cuda"``) and there is none.
    """
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}", "choose auto, cuda, cpu or all")
    path = _check_script(script)
    has_cuda = torch.cuda.is_available()
    if snapshot_path is not None and not has_cuda:
        raise NoGPUError(
            "--snapshot needs CUDA (it records PyTorch's CUDA allocator history) and torch sees no GPU",
            "drop --snapshot on CPU; the line, module and category profile works without it",
        )
    if device == "cuda" and not has_cuda:
        raise NoGPUError("--device cuda: torch sees no GPU", "use --device auto (CPU tensors are profiled then)")
    if device == "auto":
        device = "cuda" if has_cuda else "all"
    _warm_up()
    abspath = os.path.abspath(path)
    user_dir = abspath if path.is_dir() else os.path.dirname(abspath)
    rec = _ProfileRecorder(user_dir, log=log, cuda_samples=has_cuda, device_type=None if device == "all" else device)
    saved_argv, saved_path0 = sys.argv[:], list(sys.path)
    saved_modules = set(sys.modules)
    saved_trace = sys.gettrace()
    snapshot_on = False
    outcome = ScriptOutcome("ok", 0)
    t_start = time.perf_counter()
    try:
        if snapshot_path is not None:
            # Python stacks only: C++ ones make _dump_snapshot slow to symbolize, and the viewer shows Python's
            torch.cuda.memory._record_memory_history(enabled="all", stacks="python", max_entries=200_000)
            snapshot_on = True
        sys.argv = [str(script), *args]
        sys.path.insert(0, user_dir)
        rec.install_hooks()
        _ACTIVE[0] = rec
        rec.t0 = t_start = time.perf_counter()
        try:
            with rec:
                sys.settrace(rec.make_global_trace())
                try:
                    runpy.run_path(str(path), run_name="__main__")
                finally:
                    sys.settrace(saved_trace)
        except SystemExit as exc:
            code = exc.code
            if code is None:
                outcome = ScriptOutcome("exit", 0)
            elif isinstance(code, int):
                outcome = ScriptOutcome("exit", code)
            else:
                outcome = ScriptOutcome("exit", 1, error=str(code))
        except KeyboardInterrupt:
            outcome = ScriptOutcome("interrupted", 130, error="KeyboardInterrupt", **_where(rec, sys.exc_info()[2]))
        except BaseException as exc:  # the script's failure: kept in the result, not re-raised
            msg = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
            outcome = ScriptOutcome(
                "exception",
                1,
                error=" ".join(msg.split()),
                traceback=_script_traceback(rec, exc),
                **_where(rec, exc.__traceback__),
            )
        wall = time.perf_counter() - t_start
        rec.stack.clear()
        cuda = _cuda_info(rec, snapshot_path if snapshot_on else None)
        leaks = _leaks(rec)
        rec.close()
        return _build(rec, path, args, outcome, wall, cuda, leaks, top, timeline_points)
    finally:
        _ACTIVE[0] = None
        rec.remove_hooks()
        rec.close()
        rec.script_globals = None
        sys.argv = saved_argv
        sys.path[:] = saved_path0
        _forget_user_modules(saved_modules, rec)
        if sys.gettrace() is not saved_trace:
            sys.settrace(saved_trace)
        if snapshot_on:
            try:
                torch.cuda.memory._record_memory_history(enabled=None)
            except Exception:
                pass


def _forget_user_modules(before: set[str], rec: _ProfileRecorder) -> None:
    """Modules the script imported from its own folder: gone with it, as when its process ends
    (a second profile in the same process must import its own ``helper.py``, not this one's)."""
    for name in set(sys.modules) - before:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file and rec.is_user(file):
            sys.modules.pop(name, None)


def _display(rec: _ProfileRecorder, filename: str) -> str:
    path = os.path.abspath(filename)
    if path.startswith(rec.user_dir):
        return path[len(rec.user_dir) :]
    return os.path.basename(path)


def _location(rec: _ProfileRecorder, key: tuple[str, int]) -> str:
    return f"{_display(rec, key[0])}:{key[1]}"


def _loc(rec: _ProfileRecorder, key: tuple[str, int] | None) -> str | None:
    return None if key is None else _location(rec, key)


def _source(key: tuple[str, int] | None) -> str | None:
    if key is None:
        return None
    return linecache.getline(key[0], key[1]).strip() or None


def _script_traceback(rec: _ProfileRecorder, exc: BaseException) -> tuple[str, ...]:
    """The traceback Python would print for the script, with the script's own frames only (not
    memprof's, not runpy's, not the libraries'): the lines the person has to fix. Chained
    exceptions (``raise ... from``) keep only the last one, as the one that ended the script."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if rec.is_user(f.filename)]
    lines = ["Traceback of the script (most recent call last; its own files only):"]
    for f in frames:
        lines.append(f'  File "{f.filename}", line {f.lineno}, in {f.name}')
        if f.line:
            lines.append(f"    {f.line.strip()}")
    for part in traceback.format_exception_only(type(exc), exc):
        lines.extend(part.rstrip("\n").splitlines())
    return tuple(lines)


def _where(rec: _ProfileRecorder, tb) -> dict:
    """The innermost frame of the user's files in a traceback."""
    key = None
    while tb is not None:
        if rec.is_user(tb.tb_frame.f_code.co_filename):
            key = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return {"location": _loc(rec, key), "source": _source(key)}


def _cuda_info(rec: _ProfileRecorder, snapshot_path) -> ProfileCuda | None:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    from . import nvml

    dev = torch.cuda.current_device()
    try:
        torch.cuda.synchronize()
    except Exception:
        pass
    reserved = int(torch.cuda.memory_reserved(dev))
    nvml_b = nvml.process_used_bytes(dev)
    snap = None
    if snapshot_path is not None:
        try:
            torch.cuda.memory._dump_snapshot(str(snapshot_path))
            snap = str(snapshot_path)
        except Exception:  # the profile matters more than the file: snapshot_path stays None, the CLI says so
            snap = None
    return ProfileCuda(
        device_name=torch.cuda.get_device_name(dev),
        max_allocated_bytes=int(torch.cuda.max_memory_allocated(dev)),
        max_reserved_bytes=int(torch.cuda.max_memory_reserved(dev)),
        reserved_at_exit_bytes=reserved,
        nvml_process_bytes=nvml_b,
        context_bytes=None if nvml_b is None else nvml_b - reserved,
        snapshot_path=snap,
    )


def _leaks(rec: _ProfileRecorder) -> list[LeakSuspect]:
    """Lines whose allocations from many executions are all alive (at exit, else at the peak), and
    global containers of tensors that keep their autograd graphs."""
    out: list[LeakSuspect] = []
    seen = set()
    for records, when in (
        (list(rec.meta.values()), "still alive at exit"),
        (rec.peak_live, "alive together at the peak"),
    ):
        by_origin: dict[Any, list] = {}
        for r in records:
            if r[_CAT] in (
                MemCategory.PARAMETER,
                MemCategory.BUFFER,
                MemCategory.OPTIMIZER_STATE,
                MemCategory.GRADIENT,
            ):
                continue
            g = by_origin.setdefault(r[_ORIGIN], [0, 0, set()])
            g[0] += r[_NBYTES]
            g[1] += 1
            g[2].add(r[_HIT])
        for origin, (nbytes, count, hits_alive) in by_origin.items():
            if origin is None or origin in seen:
                continue
            hits = rec.lines[origin][_HITS]
            if len(hits_alive) >= 3 and len(hits_alive) >= 0.5 * hits:
                seen.add(origin)
                out.append(
                    LeakSuspect(
                        _location(rec, origin),
                        _source(origin),
                        nbytes,
                        count,
                        len(hits_alive),
                        hits,
                        f"memory allocated by {len(hits_alive)} of its {hits} executions is {when}",
                    )
                )
    for name, value in list((rec.script_globals or {}).items()):
        if name.startswith("__") or not isinstance(value, (list, tuple, dict, set)) or isinstance(value, type):
            continue
        items = value.values() if isinstance(value, dict) else value
        n, storages = 0, {}
        for i, v in enumerate(items):
            if i >= 100_000:
                break
            if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                n += 1
                try:
                    st = v.untyped_storage()
                    storages[st._cdata] = st.nbytes()
                except Exception:
                    pass
        if n >= 2:
            out.append(
                LeakSuspect(
                    f"global {name!r}",
                    None,
                    sum(storages.values()),
                    len(storages),
                    n,
                    n,
                    f"a {type(value).__name__} of {n} tensors with autograd graphs: the graphs and the tensors "
                    f"they saved for backward stay alive; keep loss.item() or loss.detach() instead",
                )
            )
    out.sort(key=lambda s: -s.live_bytes)
    return out


def _groups(rec: _ProfileRecorder, records: list[list], limit: int) -> tuple[TensorGroup, ...]:
    groups: dict[tuple, list[int]] = {}
    for r in records:
        k = (r[_SHAPE], r[_DTYPE], r[_DEVICE], r[_ORIGIN], r[_CAT])
        g = groups.setdefault(k, [0, 0])
        g[0] += 1
        g[1] += r[_NBYTES]
    items = sorted(groups.items(), key=lambda kv: -kv[1][1])[:limit]
    return tuple(
        TensorGroup(
            shape=k[0],
            dtype=k[1],
            device=k[2],
            origin=_loc(rec, k[3]) or OUTSIDE,
            category=k[4],
            count=v[0],
            bytes=v[1],
        )
        for k, v in items
    )


def _downsample(ts: array, bs: array, n: int) -> tuple[TimelineSample, ...]:
    """At most ~n samples keeping each bucket's maximum (so the peak survives)."""
    m = len(ts)
    if m == 0:
        return ()
    if m <= n:
        return tuple(TimelineSample(round(ts[i], 6), int(bs[i])) for i in range(m))
    out = []
    step = m / n
    for j in range(n):
        a, b = int(j * step), max(int((j + 1) * step), int(j * step) + 1)
        i = max(range(a, min(b, m)), key=bs.__getitem__)
        out.append(TimelineSample(round(ts[i], 6), int(bs[i])))
    return tuple(out)


def _build(rec: _ProfileRecorder, path: Path, args, outcome, wall, cuda, leaks, top, timeline_points) -> ProfileResult:
    # lines
    live_exit: dict[Any, int] = defaultdict(int)
    for r in rec.meta.values():
        live_exit[r[_ORIGIN]] += r[_NBYTES]
    lines = []
    for key, st in rec.lines.items():
        alloc = rec.line_alloc.get(key, 0)
        lines.append(
            LineStat(
                file=_display(rec, key[0]),
                line=key[1],
                source=_source(key) or "",
                hits=st[_HITS],
                delta_bytes=st[_DELTA],
                max_delta_bytes=st[_MAXDELTA],
                alloc_bytes=alloc,
                peak_bytes=st[_PEAK],
                live_at_exit_bytes=live_exit.get(key, 0),
            )
        )
    lines.sort(key=lambda s: (-s.max_delta_bytes, -s.alloc_bytes, s.file, s.line))
    modules = [
        ModuleStat(
            name=n,
            type=rec.module_types.get(n, "?"),
            calls=st[_CALLS],
            forward_added_bytes=st[_ADDED],
            forward_peak_bytes=st[_FPEAK],
            backward_alloc_bytes=st[_BALLOC],
            backward_peak_bytes=st[_BPEAK],
        )
        for n, st in rec.modules.items()
    ]
    # peak
    t_peak, op_peak, key_peak, module_peak, phase_peak = rec.peak_info
    breakdown: dict[MemCategory, int] = {}
    for r in rec.peak_live:
        breakdown[r[_CAT]] = breakdown.get(r[_CAT], 0) + r[_NBYTES]
    breakdown = {c: breakdown[c] for c in MemCategory if c in breakdown}
    peak = ProfilePeak(
        bytes=rec.peak_bytes,
        time_s=round(t_peak, 6),
        op_index=op_peak,
        location=_loc(rec, key_peak),
        source=_source(key_peak),
        module=module_peak,
        phase=phase_peak,
        breakdown=breakdown,
        tensors=_groups(rec, rec.peak_live, 30),
    )
    device = "cpu" if rec.device_type in (None, "cpu") else UNUSED_CUDA
    if cuda is not None:
        device = f"cuda:{torch.cuda.current_device()} ({cuda.device_name})"
    timeline = _downsample(rec.tl_t, rec.tl_b, timeline_points)
    raw = {"t": rec.tl_t, "allocated": rec.tl_b, "cuda": rec.tl_cuda, "peak_t": t_peak, "peak_bytes": rec.peak_bytes}
    log = None
    if rec.log is not None:
        log = [
            (
                t,
                _loc(rec, key),
                _source(key),
                func,
                total,
                [(sign, r[_SHAPE], r[_DTYPE], r[_DEVICE], r[_NBYTES], _loc(rec, r[_ORIGIN])) for sign, r in ev],
            )
            for t, key, func, total, ev in rec.log
        ]
    return ProfileResult(
        script=str(path),
        argv=tuple(args),
        device=device,
        wall_s=round(wall, 4),
        ops=rec.op_count,
        outcome=outcome,
        peak=peak,
        at_exit_bytes=rec.current_bytes,
        lines=tuple(lines[:top] if top else lines),
        modules=tuple(modules),
        leaks=tuple(leaks),
        cuda=cuda,
        timeline=timeline,
        _timeline=raw,
        _log=log,
    )
