"""The ``memprof`` command: parse, call the library, render or print JSON, exit.

Each command lives in its own module (``memprof/cli/<command>.py``) and registers
itself on :data:`app` with :func:`command`. Errors from the library (:class:`MemprofError`)
become one ``ERROR:`` line and one ``HINT:`` line on stderr and the error's exit code; so do
bad options (Click's usage errors). Nothing prints a Python traceback: an unexpected exception
is a memprof bug, reported on one line with exit code 70 (``MEMPROF_DEBUG=1`` shows the
traceback).

Exit codes, the same on every command (:data:`EXIT_CODES`, also in ``memprof --help`` and
``docs/cli.md``):

====  =====================================================================================
0     success (``estimate``: the batch fits, or no capacity is known)
1     the workload does not fit at this batch size, but a smaller batch does
2     bad input: unknown model, bad option value, an input the model rejects, an output file
      that cannot be created or already exists (without ``--force``)
3     the command needs a GPU and there is none
4     not even the smallest batch fits
5     partial answer: the report is printed but part of it could not be computed (``estimate``:
      the trace failed, the numbers are the formula's only; ``compare``: a row could not be
      traced); the ``ERROR:`` line says what
6     the report was printed, but an output file (``--plot``, ``--log``, ``--snapshot``) or
      stdout itself could not be written (full disk, ``> /dev/full``)
70    internal error: a memprof bug (one line; ``MEMPROF_DEBUG=1`` shows the traceback)
130   interrupted (Ctrl-C); what was computed so far is still printed
141   stdout was closed by its reader (``memprof ... | head``): the output stops quietly, as a
      Unix tool killed by SIGPIPE
====  =====================================================================================

``memprof profile`` runs a script and passes on the script's own exit status, as ``python
script.py`` would (0, its ``sys.exit`` code, 1 when it raised, 130 on Ctrl-C); memprof's own
failures before the script runs use the codes above (2, 3), and 6 when the script ended well but
``--log``/``--plot``/``--snapshot`` could not be written.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer
import typer.core

from ..errors import MemprofError
from ..render import print_error
from . import help as helptext
from .output import WatchedStream, describe_os_error, is_broken_pipe, silence_stdout

EXIT_OK = 0
EXIT_DOES_NOT_FIT = 1
EXIT_USAGE = 2
EXIT_NO_GPU = 3
EXIT_NOTHING_FITS = 4
EXIT_PARTIAL = 5
EXIT_OUTPUT = 6
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

#: every exit code memprof uses and what it means (the help, the docs and a test read this table)
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success (estimate: the batch fits, or no capacity is known)",
    EXIT_DOES_NOT_FIT: "the workload does not fit at this batch size, but a smaller batch does",
    EXIT_USAGE: "bad input: model, option value, input shape, or an output file that cannot be "
    "created or already exists (add --force to replace it)",
    EXIT_NO_GPU: "the command needs a GPU and there is none",
    EXIT_NOTHING_FITS: "not even the smallest batch fits",
    EXIT_PARTIAL: "partial answer: the report is printed but part of it could not be computed "
    "(estimate: the trace failed, formula only; compare: a row failed); ERROR: says what",
    EXIT_OUTPUT: "the report was printed, but an output file (--plot, --log, --snapshot) or stdout "
    "could not be written",
    EXIT_INTERNAL: "internal error: a memprof bug (MEMPROF_DEBUG=1 shows the traceback)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); what was computed so far is still printed",
    EXIT_BROKEN_PIPE: "stdout was closed by its reader (memprof ... | head): output stops quietly",
}


#: when several outcomes apply, the exit code is the first of these that does (then 0)
_PRECEDENCE = (EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_PARTIAL, EXIT_NOTHING_FITS, EXIT_DOES_NOT_FIT)


def exit_code(*codes: int) -> int:
    """One exit code for a run with several outcomes: interrupted > an output not written > partial
    answer > nothing fits > does not fit > success."""
    return next((c for c in _PRECEDENCE if c in codes), EXIT_OK)


def _click(part: str) -> Any:
    """A module of the Click that typer runs on (``exceptions``, ``globals``): typer's own vendored
    copy in recent typer, else the click package."""
    try:
        return importlib.import_module(f"typer._click.{part}")
    except ImportError:  # typer before it vendored click
        return importlib.import_module(f"click.{part}")


class MemprofCommand(typer.core.TyperCommand):
    """A command whose ``--help`` is :mod:`memprof.cli.help`'s plain text."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        formatter.write(helptext.command_help(ctx, self))


class MemprofGroup(typer.core.TyperGroup):
    """The ``memprof`` group: plain ``--help``, and the one place where every way a run can end
    becomes an exit code of :data:`EXIT_CODES` (for the console script and for ``CliRunner``)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        rows = [(str(code), meaning) for code, meaning in EXIT_CODES.items()]
        formatter.write(helptext.group_help(ctx, self, rows))

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        code = self._run(args, prog_name, complete_var, windows_expand_args=windows_expand_args, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any) -> int:
        exceptions = _click("exceptions")
        saved = sys.stdout
        watched = saved if isinstance(saved, WatchedStream) else WatchedStream(saved)
        sys.stdout = watched  # remembers a failed write (the help, a report)
        try:
            return self._invoke(watched, exceptions, args, prog_name, complete_var, **extra)
        finally:
            if sys.stdout is watched:
                sys.stdout = saved

    def _invoke(
        self,
        watched: WatchedStream,
        exceptions: Any,
        args: Any,
        prog_name: str | None,
        complete_var: str | None,
        **extra: Any,
    ) -> int:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit as exc:  # Click turns a broken pipe into exit 1, which means "does not fit" here
            if watched.error is not None:
                return _stdout_failure(watched.error)
            if exc.code is None:
                return EXIT_OK
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        except exceptions.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None) is not None:
                return _print_help(exc.ctx)  # plain `memprof`: the help, as older Click printed it
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path} --help" if ctx is not None else "memprof --help"
            print_error(exc.format_message(), f"see `{where}` for the options")
            return EXIT_USAGE
        except (typer.Abort, KeyboardInterrupt):
            print_error("interrupted", None)
            return EXIT_INTERRUPTED
        except OSError as exc:  # writing --help or --version output
            return _stdout_failure(exc)
        except Exception as exc:  # pragma: no cover - a bug outside the commands
            return _internal_error(exc)
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else EXIT_OK


def _print_help(ctx: Any) -> int:
    try:
        sys.stdout.write(ctx.get_help() + "\n")
        sys.stdout.flush()
    except OSError as exc:
        return _stdout_failure(exc)
    return EXIT_OK


app = typer.Typer(
    name="memprof",
    help="GPU memory profiler and batch-size finder for PyTorch training.",
    cls=MemprofGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command(name: str, **kwargs: Any) -> Callable[[Callable], Callable]:
    """``@command("estimate")``: register a command on :data:`app` with memprof's help format."""
    return app.command(name, cls=MemprofCommand, **kwargs)


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


def report_error(exc: MemprofError, command: Callable) -> None:
    """``ERROR:`` / ``HINT:`` for a library error, its parameters shown as ``command``'s flags."""
    if os.environ.get("MEMPROF_DEBUG"):  # the exception memprof translated, with its whole traceback
        import traceback

        original = exc.__cause__ or exc.__context__ or exc
        traceback.print_exception(type(original), original, original.__traceback__)
    names = flag_names(command)
    message, hint = exc.render(lambda param: names.get(param) or "--" + param.replace("_", "-"))
    print_error(message, hint)


def _stdout_failure(exc: OSError) -> int:
    """stdout could not be written: quiet on a broken pipe (141), one ERROR line otherwise (6)."""
    silence_stdout()
    if is_broken_pipe(exc):
        return EXIT_BROKEN_PIPE
    print_error(
        f"cannot write the output to stdout: {describe_os_error(exc)}",
        "free some space, or send the output somewhere else (> file on another disk)",
    )
    return EXIT_OUTPUT


#: set when Ctrl-C arrived (the console script's SIGINT handler): an import or a library that the
#: KeyboardInterrupt left half done may then fail with another exception, which is the interruption
_SIGINT_SEEN = [False]


def _on_sigint(signum: int, frame: Any) -> None:
    _SIGINT_SEEN[0] = True
    if _deferred(frame) and hasattr(signal, "setitimer"):
        # a KeyboardInterrupt raised inside a module import that C++ (pybind11) is running, or inside a
        # finalizer that runs while C++ frees a tensor, aborts the process ("terminate called after
        # throwing ...") or is swallowed with a traceback: deliver it again in 50 ms, outside
        _resend_later()
        return
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as Python's own handler


def _resend_later() -> None:
    signal.signal(signal.SIGALRM, _resend_sigint)
    signal.setitimer(signal.ITIMER_REAL, 0.05)


def _resend_sigint(signum: int, frame: Any) -> None:
    os.kill(os.getpid(), signal.SIGINT)


#: where the interrupted code runs inside a weakref callback or finalizer (``weakref.finalize``,
#: torch's ``WeakIdKeyDictionary``), called while a tensor or storage is freed - often from C++
_FINALIZER_FILES = ("weakref.py", os.path.join("torch", "utils", "weak.py"))
#: code that pushes and pops torch's dispatch modes (FakeTensorMode, memprof's trackers) around C++
#: calls: interrupted between a push and its pop, C++ later finds a mode it did not expect and aborts
#: ("trying to set the current FakeTensorMode, but one already exists")
_MODE_FILES = (
    "contextlib.py",
    os.path.join("torch", "utils", "_python_dispatch.py"),
    os.path.join("torch", "_subclasses", "fake_tensor.py"),
)
_MODE_FUNCTIONS = ("__enter__", "__exit__")


def _deferred(frame: Any) -> bool:
    """Whether the interrupted code runs where an exception cannot propagate safely: inside an import
    (importlib's frames), a finalizer (``__del__``, a weakref callback), or - in the innermost frames -
    a context manager's ``__enter__``/``__exit__`` or torch's dispatch-mode code."""
    depth = 0
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        if filename.startswith("<frozen importlib") or code.co_name == "__del__" or filename.endswith(_FINALIZER_FILES):
            return True
        if depth < 4 and (code.co_name in _MODE_FUNCTIONS or filename.endswith(_MODE_FILES)):
            return True
        depth += 1
        frame = frame.f_back
    return False


def _unraisable(info: Any) -> None:
    """``sys.unraisablehook``: a KeyboardInterrupt that a finalizer swallowed (Python would print
    "Exception ignored in ..." and go on) is delivered again shortly, silently; anything else as usual."""
    if isinstance(info.exc_value, KeyboardInterrupt) or info.exc_type is KeyboardInterrupt:
        if hasattr(signal, "setitimer"):
            _resend_later()
        return
    sys.__unraisablehook__(info)


def _internal_error(exc: BaseException) -> int:
    """An exception memprof did not expect: one line naming it and where it was raised, exit 70
    (or, after Ctrl-C, the interruption it is a consequence of: 130)."""
    if _SIGINT_SEEN[0]:
        print_error("interrupted", None)
        return EXIT_INTERRUPTED
    if os.environ.get("MEMPROF_DEBUG"):
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)
    if isinstance(exc, MemoryError):
        print_error(
            "memprof ran out of host memory",
            "use a smaller --batch-size or model, or run where more RAM is free",
        )
        return EXIT_INTERNAL
    frame = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb
        tb = tb.tb_next
    where = f" (at {os.path.basename(frame.tb_frame.f_code.co_filename)}:{frame.tb_lineno})" if frame else ""
    text = " ".join(str(exc).split())[:300]
    print_error(
        f"memprof failed unexpectedly: {type(exc).__name__}: {text}{where}",
        "this is a bug in memprof: please report it with the command line; MEMPROF_DEBUG=1 shows the traceback",
    )
    return EXIT_INTERNAL


def handle_errors(fn: Callable) -> Callable:
    """Wrap a command: MemprofError -> ERROR/HINT + its exit code; Ctrl-C -> 130; stdout failing -> 141 or 6;
    anything unexpected -> one line and 70. Never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        saved = sys.stdout
        watched = saved if isinstance(saved, WatchedStream) else WatchedStream(saved)
        sys.stdout = watched  # a stand-in that remembers its write errors
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except MemprofError as exc:
            report_error(exc, fn)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            print_error("interrupted", None)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as exc:
            if exc is watched.error or is_broken_pipe(exc):
                raise typer.Exit(_stdout_failure(exc)) from None
            raise typer.Exit(_internal_error(exc)) from None
        except Exception as exc:
            raise typer.Exit(_internal_error(exc)) from None
        finally:
            if sys.stdout is watched:
                sys.stdout = saved

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
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _unraisable
    try:
        try:
            code: Any = app()
        except SystemExit as exc:
            code = exc.code
    except KeyboardInterrupt:  # Ctrl-C between the command's end and here
        code = EXIT_INTERRUPTED
    try:
        from ..render import ERRORS_SAID

        # some Ctrl-C windows ended silently: an exit 130 always says so
        if code == EXIT_INTERRUPTED and not any("interrupted" in m for m in ERRORS_SAID):
            print_error("interrupted", None)
    except KeyboardInterrupt:
        pass
    try:
        _exit_now(code)
    except KeyboardInterrupt:  # Ctrl-C while the output is flushed: the run is over either way
        os._exit(EXIT_INTERRUPTED)


def _exit_now(code: Any) -> None:
    import atexit
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        status = 1
    status = _final_flush(status)
    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        raise SystemExit(status)
    try:
        atexit._run_exitfuncs()
    except BaseException:  # an exit handler's failure (or a late Ctrl-C) must not change what was reported
        pass
    finally:
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(status & 0xFF if status >= 0 else 1)


def _final_flush(status: int) -> int:
    """Flush stdout; a reader gone away (``| head``) is 141, a full disk one ERROR line and 6."""
    try:
        sys.stdout.flush()
    except OSError as exc:
        failed = _stdout_failure(exc)
        if status in (EXIT_OK, EXIT_DOES_NOT_FIT, EXIT_NOTHING_FITS, EXIT_PARTIAL) or failed == EXIT_BROKEN_PIPE:
            return failed if status != EXIT_INTERRUPTED else status
    except Exception:
        pass
    return status
