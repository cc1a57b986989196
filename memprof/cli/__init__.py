"""The ``memprof`` command: parse, call the library, render or print JSON, exit.

Each command lives in its own module (``memprof/cli/<command>.py``) and registers
itself on :data:`app`. Errors from the library (:class:`MemprofError`) become one
``ERROR:`` line and one ``HINT:`` line on stderr and the error's exit code.

Exit codes: 0 success; 1 the workload does not fit (estimate/find-batch verdicts);
2 bad input (model, option, file); 3 needs a GPU and none is there; 4 not even
batch 1 fits; 130 interrupted (Ctrl-C) - partial results are still printed.
``memprof profile`` exits with the profiled script's own status, as ``python script.py``
would: 0, its ``sys.exit`` code, 1 when it raised (the partial profile is still reported),
130 on Ctrl-C; 2 and 3 as above for memprof's own usage errors / ``--snapshot`` without CUDA.
``memprof gpus`` exits 3 when neither NVML nor torch sees a GPU (``--json`` still prints a
document, with ``available: false``).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import typer

from ..errors import MemprofError
from ..render import print_error

app = typer.Typer(
    name="memprof",
    help="GPU memory profiler and batch-size finder for PyTorch training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_OK = 0
EXIT_DOES_NOT_FIT = 1
EXIT_USAGE = 2
EXIT_NO_GPU = 3
EXIT_NOTHING_FITS = 4
EXIT_INTERRUPTED = 130


def flag_names(command: Callable) -> dict[str, str]:
    """A command function's parameters -> their long flags (``batch_size`` -> ``--batch-size``).

    The library names parameters in its messages (:meth:`MemprofError.render`); this is how the
    command line shows them: the first ``--long`` name declared in the parameter's ``typer.Option``,
    else typer's own rule (underscores become dashes).
    """
    import inspect

    names: dict[str, str] = {}
    for name, param in inspect.signature(command).parameters.items():
        decls = getattr(param.default, "param_decls", None) or ()
        longs = [d for d in decls if isinstance(d, str) and d.startswith("--")]
        names[name] = longs[0] if longs else "--" + name.replace("_", "-")
    return names


def handle_errors(fn: Callable) -> Callable:
    """Wrap a command: MemprofError -> ERROR/HINT + exit code; Ctrl-C -> exit 130; no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except MemprofError as exc:
            names = flag_names(fn)
            message, hint = exc.render(lambda param: names.get(param) or "--" + param.replace("_", "-"))
            print_error(message, hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            print_error("interrupted", None)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def emit_json(doc: dict) -> None:
    """Only JSON on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        from .._version import __version__

        print(f"memprof {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """GPU memory profiler and batch-size finder for PyTorch training."""


def _register() -> None:
    # each module adds its command to `app`; a missing one (work in progress) is skipped
    import importlib

    for name in ("estimate", "find_batch", "compare", "profile", "gpus"):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


_register()


def main() -> None:
    """The ``memprof`` console script.

    Importing torch, torchvision and torch._dynamo leaves about a second of module teardown to
    interpreter shutdown (measured: ``import torch, torchvision`` then exit takes 3.7 s, 2.8 s
    without the teardown). Nothing of memprof's needs it, so once the command has finished
    the process ends right after the exit handlers ran and the output was flushed - unless
    another non-daemon thread is still running (a profiled script's), which Python would wait for.
    """
    try:
        app()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    _exit_now(code)


def _exit_now(code: Any) -> None:
    import atexit
    import os
    import threading

    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        raise SystemExit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed pipe (memprof ... | head)
                pass
        os._exit(status & 0xFF if status >= 0 else 1)
