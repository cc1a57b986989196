"""One rank of a memprof torchrun job: ``python -m memprof.commands.rank JOB OUTDIR`` (started by torchrun).

Jobs (a pickled dict written by :func:`memprof.engine.torchrun.run_job`):

* ``measure``: real steps of the per-rank workload, peak measured with the CPU allocator's exact total
  (:func:`memprof.engine.measure.measure_rank_step`); every rank writes its figures;
* ``find-batch``: rank 0 runs :func:`memprof.commands.find_batch.find_batch` over a
  :class:`memprof.engine.torchrun.DistributedRunner`, the other ranks serve its trials; rank 0 writes
  the result and sends progress events;
* ``profile``: every rank runs the user's script under the profiler (the script sets up its own
  process group) and writes its :class:`memprof.results.ProfileResult`.

Each rank writes ``OUTDIR/rank<RANK>.pkl``: ``("result", value)`` or ``("error", class, message, hint)``.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job: dict[str, Any] = pickle.loads(Path(argv[0]).read_bytes())
    out = Path(argv[1])
    rank = int(os.environ.get("RANK", "0"))
    if job["kind"] == "measure":
        from ..engine.measure import exact_cpu_accounting

        exact_cpu_accounting()  # first: every allocation of this rank is counted from here
    try:
        reply: tuple = ("result", _run(job, rank))
        code = 0
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - sent to the launcher, which raises it
        from ..errors import MemprofError

        if isinstance(exc, MemprofError):
            reply = ("error", type(exc).__name__, exc.message, exc.hint)
        else:
            line = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
            reply = ("error", "MeasureError", f"rank {rank}: {type(exc).__name__}: {line[:300]}", None)
        code = 1
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(reply))
    return code


def _run(job: dict[str, Any], rank: int) -> Any:
    if job["kind"] == "profile":
        from ..engine.profiler import profile_script

        return profile_script(job["script"], list(job["args"]), log=job.get("log", False), device=job["device"])
    import torch.distributed as dist

    from ..engine.measure import rebuild_workload
    from ..engine.torchrun import init_ranks

    device = init_ranks(job.get("device", "cpu"))
    try:
        workload = rebuild_workload(job["recipe"])
        if workload.world_size != dist.get_world_size():
            workload = workload.replace(world_size=dist.get_world_size())
        if job["kind"] == "measure":
            from ..engine.measure import measure_rank_step

            return measure_rank_step(workload, steps=job.get("steps", 2))
        if job["kind"] == "find-batch":
            return _find_batch(job, workload, device, rank)
        raise ValueError(f"unknown job kind {job['kind']!r}")
    finally:
        dist.destroy_process_group()


def _find_batch(job: dict[str, Any], workload, device: str, rank: int):
    from ..engine.measure import make_runner
    from ..engine.torchrun import COLLECTIVE_TIMEOUT_S, DistributedRunner, emit

    limits = job.get("memory_limits")
    limit = limits[rank % len(limits)] if limits else None
    local = make_runner(device, limit)
    runner = DistributedRunner(local, workload.world_size, job.get("collective_timeout", COLLECTIVE_TIMEOUT_S))
    if rank != 0:
        runner.serve(workload)
        return None
    from .find_batch import find_batch

    prediction = job.get("prediction")
    options = dict(job["options"])
    try:
        return find_batch(
            workload,
            runner=runner,
            predict=prediction is not None,
            predictor=(lambda *args, **kwargs: prediction) if prediction is not None else None,
            on_event=emit,
            **options,
        )
    finally:
        runner.stop()


if __name__ == "__main__":
    sys.exit(main())
