"""Rendering for people: the only place that formats units. Everything writes to a Rich console.

Per-command renderers live in ``memprof/render/<command>.py``.
"""

from __future__ import annotations

import errno
import sys

from rich.console import Console

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int | float | None, digits: int = 1) -> str:
    """Binary units, labelled as such: 1536 -> '1.5 KiB'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.{digits}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_signed_bytes(n: int | None, digits: int = 1) -> str:
    if n is None:
        return "n/a"
    return ("+" if n > 0 else "") + format_bytes(n, digits)


def format_pct(x: float | None, digits: int = 1, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f} %" if signed else f"{x:.{digits}f} %"


def format_count(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


class _Console(Console):
    """A Rich console that lets a broken pipe reach the caller (Rich's own default exits 1, which
    memprof's exit codes reserve for "does not fit"); the command line then ends quietly with 141."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def stdout_console() -> Console:
    return _Console(file=sys.stdout, highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    return _Console(file=sys.stderr, highlight=False, soft_wrap=False)


def print_error(message: str, hint: str | None = None) -> None:
    """``ERROR: ...`` and ``HINT: ...`` on stderr, one line each, no markup surprises."""
    try:
        print(f"ERROR: {message}", file=sys.stderr)
        if hint:
            print(f"HINT: {hint}", file=sys.stderr)
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or full: nothing left to tell the user with
        pass
