"""``profile``: run a training script under the profiler and return what it used (never prints)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..engine.profiler import DEVICES, profile_script
from ..engine.torchrun import Launch, check_launch, run_job
from ..errors import UsageError
from ..results import ProfileResult, RanksProfileResult

__all__ = ["DEVICES", "profile", "profile_ranks"]


def profile(
    script: str | Path,
    args: Sequence[str] = (),
    *,
    log: bool = False,
    snapshot: str | Path | None = None,
    device: str = "auto",
) -> ProfileResult:
    """Run ``script`` as ``python script args...`` would and profile its memory by line, module and category.

    The script's own failures (an exception, ``sys.exit``, Ctrl-C) end up in ``result.outcome`` with the
    partial profile; see :func:`memprof.engine.profiler.profile_script`.
    """
    return profile_script(script, list(args), log=log, snapshot_path=snapshot, device=device)


def profile_ranks(
    script: str | Path,
    args: Sequence[str],
    launch: Launch,
    *,
    log: bool = False,
    device: str = "auto",
    on_output: Callable[[str], None] | None = None,
) -> RanksProfileResult:
    """Run ``script`` as a torchrun job of ``launch`` and profile every rank (each as :func:`profile` would).

    The script sets up its own process group (``init_process_group`` reads torchrun's environment);
    its output reaches ``on_output``. Returns this node's ranks' profiles, rank order.
    """
    path = Path(script)
    if not path.exists():
        raise UsageError(f"script {script} not found", "give the path of a Python training script")
    check_launch(launch, "cuda" if device == "cuda" else "cpu")
    job = {"kind": "profile", "script": str(path.resolve()), "args": list(args), "log": log, "device": device}
    result = run_job(launch, job, on_output=on_output)
    ranks = tuple(
        (rank, reply[1])
        for rank, reply in sorted(result.ranks.items())
        if isinstance(reply, tuple) and reply[0] == "result"
    )
    errors = [reply for reply in result.ranks.values() if isinstance(reply, tuple) and reply[0] == "error"]
    if not ranks and errors:
        from .. import errors as errors_mod

        _, name, message, hint = errors[0]
        cls = getattr(errors_mod, name, errors_mod.MeasureError)
        raise cls(message, hint)
    first = launch.node_rank * launch.nproc_per_node
    local = range(first, first + launch.nproc_per_node)
    return RanksProfileResult(
        script=str(script),
        argv=tuple(args),
        nproc_per_node=launch.nproc_per_node,
        world_size=launch.world_size,
        ranks=ranks,
        missing=tuple(r for r in local if r not in dict(ranks)),
        wall_s=result.seconds,
        exit_code=result.returncode,
    )
