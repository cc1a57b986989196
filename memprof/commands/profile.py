"""``profile``: run a training script under the profiler and return what it used (never prints)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..engine.profiler import DEVICES, profile_script
from ..results import ProfileResult

__all__ = ["DEVICES", "profile"]


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
