"""``memprof profile SCRIPT [-- ARGS]``: run a training script under the profiler, report, exit as it did."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import typer

from . import EXIT_OUTPUT, command, emit_json, handle_errors
from .common import FORCE_OPT, JSON_OPT
from .output import OutputFiles


@command("profile", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def profile_cmd(
    script: str = typer.Argument(
        ..., help="The Python script to run, as `python SCRIPT ARGS` would.", show_default=False, metavar="SCRIPT"
    ),
    script_args: list[str] | None = typer.Argument(
        None,
        help="Arguments for the script; put them after -- when one looks like a memprof option (--json, --log, ...).",
        show_default=False,
        metavar="ARGS",
    ),
    log: Path | None = typer.Option(
        None, "--log", metavar="FILE", help="Write a line-by-line text log (live total, + / - tensors)."
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        metavar="FILE",
        help="Timeline plot with the peak marked: .svg, .png, .pdf or .html (with the top lines).",
    ),
    snapshot: Path | None = typer.Option(
        None,
        "--snapshot",
        metavar="FILE",
        help="CUDA only: save PyTorch's allocator history (.pickle) for https://pytorch.org/memory_viz.",
    ),
    device: str = typer.Option(
        "auto",
        "--device",
        metavar="DEVICE",
        help="Whose memory counts: auto (cuda when available, else all), cuda, cpu or all.",
    ),
    top: int = typer.Option(10, "--top", metavar="N", help="How many lines / tensor groups to show."),
    no_chart: bool = typer.Option(False, "--no-chart", help="Do not draw memory over time in the terminal."),
    nproc_per_node: int | None = typer.Option(
        None,
        "--nproc-per-node",
        help="Run the script as a torchrun job of N processes and profile every rank (--log/--plot: the "
        "rank with the highest peak).",
    ),
    nnodes: int = typer.Option(1, "--nnodes", help="torchrun: nodes of the job (run memprof on each)."),
    node_rank: int = typer.Option(0, "--node-rank", help="torchrun: this node's rank."),
    rdzv_endpoint: str | None = typer.Option(None, "--rdzv-endpoint", help="torchrun: HOST:PORT for several nodes."),
    rdzv_id: str | None = typer.Option(None, "--rdzv-id", help="torchrun: the job's rendezvous id."),
    force: bool = FORCE_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Profile a training script: memory by source line, module and category; the peak; leaks.

    The script's own output comes first (on stderr with --json), then the report, then, when the
    script raised, its traceback (the script's own frames). memprof exits with the script's
    status: 0, its sys.exit code, 1 when it raised, 130 on Ctrl-C (the partial profile is still
    reported); 6 when the script ended well but an output file could not be written.
    """
    from ..commands.profile import DEVICES
    from ..errors import UsageError
    from ..render.charts import check_plot_path

    if device not in DEVICES:
        raise UsageError(f"unknown --device {device!r}", "choose auto, cuda, cpu or all")
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}", "e.g. --top 10")
    if plot is not None:
        check_plot_path(plot)

    if nproc_per_node is not None:
        if snapshot is not None:
            raise UsageError("--snapshot is for one process", "leave out --snapshot with --nproc-per-node")
        from ..engine.torchrun import Launch

        launch = Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id)
        _ranks(script, script_args or [], launch, device, top, log, plot, json_out)
        return

    from ..commands.profile import profile

    with OutputFiles(force) as files:
        for path, option in ((log, "--log"), (plot, "--plot"), (snapshot, "--snapshot")):
            files.claim(path, option)
        redirect = contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()
        with redirect:
            result = profile(script, script_args or [], log=log is not None, snapshot=snapshot, device=device)
            sys.stdout.flush()

        from ..render import print_error, stdout_console
        from ..render.profile import format_log, outcome_line, render_profile, write_plot

        # the report first: whatever happens to the files, it is on the screen
        if json_out:
            from ..results import document

            doc = document("profile", result)
            doc["files"] = {
                "log": str(log) if log else None,
                "plot": str(plot) if plot else None,
                "snapshot": str(snapshot) if snapshot else None,
            }
            emit_json(doc)
        else:
            console = stdout_console()
            if not console.is_terminal and "COLUMNS" not in os.environ:
                console.width = max(console.width, 120)  # piped: the tables need room
            console.print()
            render_profile(result, console, top=top, chart=not no_chart)
        written = [
            files.write(log, lambda path: path.write_text(format_log(result), encoding="utf-8"), "log"),
            files.write(plot, lambda path: write_plot(result, path), "plot"),
        ]
        if snapshot is not None:
            if result.cuda is not None and result.cuda.snapshot_path is not None:
                files.mark_written(snapshot)
            else:
                written.append(False)
                print_error(
                    f"the allocator snapshot could not be written to {snapshot}",
                    "check the folder and free space; the profile above is complete without it",
                )
    if result.outcome.traceback:
        print("\n".join(result.outcome.traceback), file=sys.stderr)
    line = outcome_line(result)
    if line:
        print_error(line, None) if result.outcome.status != "exit" else print(line, file=sys.stderr)
    if result.outcome.exit_code:
        raise typer.Exit(result.outcome.exit_code)
    if not all(written):
        raise typer.Exit(EXIT_OUTPUT)


def _ranks(script: str, args: list[str], launch, device: str, top: int, log, plot, json_out: bool) -> None:
    """``--nproc-per-node``: every rank profiled; the table of ranks, then the highest rank's report."""
    from ..commands.profile import profile_ranks
    from ..render import print_error, stdout_console
    from ..render.profile import format_log, render_ranks, write_plot

    out = sys.stderr if json_out else sys.stdout

    def echo(line: str) -> None:  # the ranks' own output, as torchrun prints it
        print(line, file=out, flush=True)

    result = profile_ranks(script, args, launch, log=log is not None, device=device, on_output=echo)
    highest = result.highest
    written = []
    if highest is not None and log is not None:
        log.write_text(format_log(highest[1]))
        written.append(f"log (rank {highest[0]}): {log}")
    if highest is not None and plot is not None:
        write_plot(highest[1], plot)
        written.append(f"plot (rank {highest[0]}): {plot}")
    if json_out:
        from ..results import document

        emit_json(document("profile-ranks", result))
    else:
        console = stdout_console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = max(console.width, 120)
        console.print()
        render_ranks(result, console, top=top)
        for w in written:
            console.print(f"Wrote {w}")
    if result.missing:
        print_error(
            f"rank(s) {', '.join(map(str, result.missing))} sent no profile",
            "the job stopped before they finished; the output above shows why",
        )
    if result.exit_code:
        raise typer.Exit(result.exit_code)
