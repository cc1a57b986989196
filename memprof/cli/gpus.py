"""``memprof gpus``: the local GPUs (NVML) and what torch sees."""

from __future__ import annotations

import typer

from . import EXIT_NO_GPU, command, emit_json, handle_errors
from .common import JSON_OPT


@command("gpus")
@handle_errors
def gpus_cmd(
    json_out: bool = JSON_OPT,
    catalog: bool = typer.Option(
        False, "--catalog", help="Also list the GPUs --gpu NAME knows: capacity, architecture, peak TFLOP/s, bandwidth."
    ),
) -> None:
    """List the local GPUs: memory total/used/free, processes, driver and CUDA versions, torch's view;
    a local GPU that matches an entry of the catalog (--gpu NAME) is marked.

    Exits 3 when neither NVML nor torch sees a GPU (with --json: still a JSON document, available=false),
    unless --catalog was asked for.
    """
    from ..commands.gpus import gpus
    from ..render import stdout_console
    from ..render.gpus import NO_GPU_HINT, no_gpu_line, render_catalog, render_gpus

    result = gpus(with_catalog=catalog)
    if json_out:
        from ..results import document

        emit_json(document("gpus", result))
    else:
        if result.available:
            render_gpus(result, stdout_console())
        elif catalog:  # the catalog is the answer asked for: no GPU here is a note, not an error
            import sys

            print(no_gpu_line(result), file=sys.stderr)
        if catalog:
            render_catalog(result, stdout_console())
    if not result.available and not catalog:
        from ..render import print_error

        print_error(no_gpu_line(result), NO_GPU_HINT)
        raise typer.Exit(EXIT_NO_GPU)
