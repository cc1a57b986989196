"""Real multi-process jobs under ``torchrun``: launching them, and the rank side of distributed trials.

The launcher (:func:`run_job`) writes a job file, starts
``python -m torch.distributed.run [rendezvous] -m memprof.commands.rank JOB OUTDIR``, relays rank 0's
progress events (lines ``@@memprof-event <base64 pickle>`` on stdout), and reads back what each rank of
this node wrote to ``OUTDIR/rank<N>.pkl``. Rendezvous options pass through to torchrun for several nodes;
one node runs ``--standalone``.

:class:`DistributedRunner` is a :class:`memprof.engine.measure.Runner` for rank 0 of such a job: each
:meth:`~DistributedRunner.run` sends the batch to every rank (the others wait in
:meth:`DistributedRunner.serve`), every rank runs the real steps under its own runner (the CPU cap or
CUDA), in a process group made for that trial alone, and the ranks agree on the outcome (an
all-gather on the control group): an out-of-memory error on any rank is an OOM for all; the peak is
the largest rank's. A rank that runs out of memory recovers (its runner drops everything and checks
it is clean); when the others are left waiting in a collective of the trial's process group (an OOM
where they had none), that collective times out (``collective_timeout``) and they recover the same
way. Every rank's leftover bytes are reported.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import MeasureError, MemprofError, UsageError
from ..results import BatchTrial
from .measure import PhaseCallback, Runner
from .workload import Workload

EVENT_MARK = "@@memprof-event "
#: a trial's process group gives up on a collective after this long: what the other ranks wait, at most,
#: when one rank runs out of memory where they do not (gloo cannot be interrupted otherwise)
COLLECTIVE_TIMEOUT_S = 120.0


# =========================================================================== launching
@dataclass(frozen=True)
class Launch:
    """How ``torchrun`` starts the ranks: processes per node, and the rendezvous for several nodes."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    #: host:port of the rendezvous (several nodes); None runs one node --standalone
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_backend: str = "c10d"
    #: more torchrun arguments, passed through as given
    extra: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def torchrun_args(self) -> list[str]:
        args = [f"--nproc-per-node={self.nproc_per_node}"]
        if self.rdzv_endpoint is None and self.nnodes == 1:
            args.append("--standalone")
        else:
            args += [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}"]
            args += [f"--rdzv-backend={self.rdzv_backend}", f"--rdzv-endpoint={self.rdzv_endpoint}"]
            if self.rdzv_id:
                args.append(f"--rdzv-id={self.rdzv_id}")
        return args + list(self.extra)


def check_launch(launch: Launch, device: str) -> None:
    """Refuse what cannot start: bad counts, multi-node without an endpoint, more ranks than GPUs here."""
    if launch.nproc_per_node < 1:
        raise UsageError(f"`nproc_per_node` must be at least 1, got {launch.nproc_per_node}", "e.g. 2")
    if launch.nnodes < 1 or not 0 <= launch.node_rank < launch.nnodes:
        raise UsageError(
            f"`node_rank` {launch.node_rank} is not one of the {launch.nnodes} nodes", "node ranks count from 0"
        )
    if launch.nnodes > 1 and not launch.rdzv_endpoint:
        raise UsageError(
            f"{launch.nnodes} nodes need a rendezvous endpoint",
            "add `rdzv_endpoint` HOST:PORT (the same on every node), as torchrun's --rdzv-endpoint",
        )
    if device.startswith("cuda"):
        count = cuda_device_count()
        if count == 0:
            from ..errors import NoGPUError

            raise NoGPUError(
                "no CUDA device is available for the ranks",
                "run the ranks on the CPU: --device cpu --memory-limit 4GiB",
            )
        if launch.nproc_per_node > count:
            raise UsageError(
                f"`nproc_per_node` {launch.nproc_per_node} is more than the {count} CUDA device(s) here",
                f"use `nproc_per_node` {count} or fewer (one process per GPU), or --device cpu to try it on the CPU",
            )


def cuda_device_count() -> int:
    """CUDA devices this process may use (after CUDA_VISIBLE_DEVICES), without creating a CUDA context."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover - a broken torch
        return 0


@dataclass
class JobResult:
    """What came back: each rank's result on this node (rank -> object), and the job's output."""

    ranks: dict[int, Any] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    returncode: int = 0
    seconds: float = 0.0


def run_job(
    launch: Launch,
    job: dict[str, Any],
    *,
    on_event: Callable[[str, Any], None] | None = None,
    on_output: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> JobResult:
    """Run ``job`` (see :mod:`memprof.commands.rank`) on every rank; returns what the ranks of this node wrote.

    Rank 0's events reach ``on_event(kind, data)``; every other line of output reaches ``on_output``
    (and the last ones are kept for error messages). Ctrl-C ends the job (torchrun stops its ranks).
    """
    with tempfile.TemporaryDirectory(prefix="memprof-torchrun-") as tmp:
        job_path = Path(tmp) / "job.pkl"
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        job_path.write_bytes(pickle.dumps(job))
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch.torchrun_args()]
        cmd += ["-m", "memprof.commands.rank", str(job_path), str(out_dir)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the ranks import the same memprof
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        t0 = time.perf_counter()
        result = JobResult()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        try:
            assert proc.stdout is not None
            for line in _lines(proc.stdout, timeout, t0):
                if line.startswith(EVENT_MARK):
                    if on_event is not None:
                        kind, data = pickle.loads(base64.b64decode(line[len(EVENT_MARK) :]))
                        on_event(kind, data)
                    continue
                result.output.append(line)
                del result.output[:-200]
                if on_output is not None:
                    on_output(line)
            result.returncode = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        result.seconds = time.perf_counter() - t0
        for path in sorted(out_dir.glob("rank*.pkl")):
            result.ranks[int(path.stem[4:])] = pickle.loads(path.read_bytes())
        return result


def _lines(stream, timeout: float | None, t0: float) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\n")
        if timeout is not None and time.perf_counter() - t0 > timeout:
            raise MeasureError(
                f"the torchrun job ran past {timeout:.0f} s", "a rank may be stuck; rerun with fewer trials or steps"
            )


def _stop(proc: subprocess.Popen) -> None:
    """torchrun forwards SIGINT/SIGTERM to its ranks; wait a little, then kill."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure_ranks(workload: Workload, launch: Launch, steps: int = 2) -> dict[int, dict[str, int]]:
    """Real steps of ``workload`` on every rank of a CPU torchrun job (gloo), each rank's peak measured
    independently of the tracer (:func:`memprof.engine.measure.measure_rank_step`); rank -> figures."""
    from .measure import workload_recipe

    check_launch(launch, "cpu")
    workload = workload.replace(world_size=launch.world_size)
    job = run_job(launch, {"kind": "measure", "recipe": workload_recipe(workload), "device": "cpu", "steps": steps})
    if job.returncode != 0 or any(not (isinstance(r, tuple) and r[0] == "result") for r in job.ranks.values()):
        raise_rank_error(job, "the measuring torchrun job")
    return {rank: reply[1] for rank, reply in sorted(job.ranks.items())}


def raise_rank_error(job: JobResult, what: str) -> None:
    """The job failed: re-raise rank 0's MemprofError if it sent one, else the end of the output."""
    from .. import errors as errors_mod

    reply = job.ranks.get(0)
    if isinstance(reply, tuple) and reply and reply[0] == "error":
        cls = getattr(errors_mod, reply[1], MeasureError)
        if not (isinstance(cls, type) and issubclass(cls, MemprofError)):
            cls = MeasureError
        raise cls(reply[2], reply[3])
    tail = [ln for ln in job.output if ln.strip()][-3:]
    detail = " | ".join(ln.strip() for ln in tail)[-400:] or f"exit code {job.returncode}"
    raise MeasureError(f"{what} failed: {detail}", "run the torchrun command by hand to see every rank's output")


# =========================================================================== rank side
def emit(kind: str, data: Any) -> None:
    """Send an event to the launcher (rank 0 only; one line on stdout)."""
    payload = base64.b64encode(pickle.dumps((kind, data))).decode()
    sys.stdout.write(EVENT_MARK + payload + "\n")
    sys.stdout.flush()


def init_ranks(device: str):
    """Initialise the control process group (gloo, for CPU-side messages; NCCL too on CUDA) from torchrun's env."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        # an NCCL collective that times out (a peer ran out of memory) raises instead of ending the process
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        dist.init_process_group("cpu:gloo,cuda:nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return "cpu"


@dataclass
class _Reply:
    """One rank's answer to one trial."""

    rank: int
    trial: BatchTrial | None
    error: tuple[str, str, str | None] | None = None  # (class name, message, hint)


class DistributedRunner:
    """Rank 0's runner for a torchrun job: every trial runs on every rank, and the ranks agree on it."""

    def __init__(self, local: Runner, world_size: int, collective_timeout: float = COLLECTIVE_TIMEOUT_S):
        """Made on every rank (it gathers each rank's capacity: the smallest one limits the batch)."""
        self.local = local
        self.world_size = world_size
        self.timeout = collective_timeout
        self.device = local.device
        self.metric = local.metric
        self._capacity = _min(_all_gather(local.capacity_bytes()))

    def describe(self) -> str:
        return f"{self.world_size} ranks × {self.local.describe()}"

    def capacity_bytes(self) -> int | None:
        return self._capacity

    def run(self, workload: Workload, batch: int, steps: int = 2, on_phase: PhaseCallback | None = None) -> BatchTrial:
        _broadcast(("trial", batch, steps))
        replies = _trial_on_every_rank(self.local, workload, batch, steps, on_phase, self.timeout)
        return _agree(replies, self.timeout)

    def stop(self) -> None:
        _broadcast(("stop",))

    def serve(self, workload: Workload) -> None:
        """Ranks other than 0: run the trials rank 0 asks for until it says stop."""
        while True:
            message = _broadcast(None)
            if message[0] == "stop":
                return
            _, batch, steps = message
            _trial_on_every_rank(self.local, workload, batch, steps, None, self.timeout)


def _broadcast(message: Any) -> Any:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _trial_on_every_rank(
    local: Runner, workload: Workload, batch: int, steps: int, on_phase: PhaseCallback | None, timeout: float
) -> list[_Reply]:
    """This rank's trial in a process group made for it alone; then every rank's reply, on every rank.

    A rank that runs out of memory where the others do not leaves them waiting in a collective of
    the trial's group: that collective fails after ``timeout`` seconds (gloo cannot be interrupted
    sooner), they recover, and the group is destroyed on every rank before the next trial.
    """
    import datetime

    import torch.distributed as dist

    from . import distributed

    backend = "nccl" if local.device == "cuda" else "gloo"
    group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    reply = _Reply(dist.get_rank(), None)
    try:
        with distributed.trial_group(group):
            reply.trial = local.run(workload, batch, steps, on_phase)
    except MemprofError as exc:  # a collective failed (a peer ran out of memory), or a real error
        reply.error = (type(exc).__name__, exc.message, exc.hint)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)
    return _all_gather(reply)


def _agree(replies: list[_Reply], timeout: float) -> BatchTrial:
    """One trial from all ranks': OOM if any rank ran out of memory, else the largest peaks; all leftovers."""
    ooms = [r for r in replies if r.trial is not None and not r.trial.fits]
    if ooms:
        first = ooms[0].trial
        assert first is not None
        return replace(
            first,
            error=f"rank {ooms[0].rank}: {first.error}",
            oom_phase=first.oom_phase,
            leaked_bytes=_max([r.trial.leaked_bytes for r in replies if r.trial is not None]),
            capacity_bytes=_min([r.trial.capacity_bytes for r in replies if r.trial is not None]),
            rank_peaks_bytes=None,
        )
    for r in replies:
        if r.error is not None:
            from .. import errors as errors_mod

            name, message, hint = r.error
            cls = getattr(errors_mod, name, MeasureError)
            if "Timed out" in message or "timed out" in message:
                hint = (
                    f"a collective waited more than {timeout:.0f} s for another rank: raise --collective-timeout "
                    "if the ranks are that slow"
                )
            raise cls(f"rank {r.rank}: {message}", hint)
    trials = [r.trial for r in replies if r.trial is not None]
    top = max(trials, key=lambda t: t.peak_reserved_bytes or t.peak_allocated_bytes or 0)
    return replace(
        top,
        peak_allocated_bytes=_max([t.peak_allocated_bytes for t in trials]),
        peak_reserved_bytes=_max([t.peak_reserved_bytes for t in trials]),
        nvml_used_bytes=_max([t.nvml_used_bytes for t in trials]),
        capacity_bytes=_min([t.capacity_bytes for t in trials]),
        leaked_bytes=_max([t.leaked_bytes for t in trials]),
        seconds=max(t.seconds for t in trials),
        rank_peaks_bytes=tuple(t.peak_allocated_bytes for t in trials),
    )


def _max(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _min(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None
