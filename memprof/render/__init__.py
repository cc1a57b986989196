"""Rendering for people: the only place that formats units. Everything writes to a Rich console.

Per-command renderers live in ``memprof/render/<command>.py``.
"""

from __future__ import annotations

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


def format_flops(n: int | float | None, unit: str = "FLOP") -> str:
    """Decimal prefixes: 8178368512 -> '8.18 GFLOP' (three significant digits); None -> 'n/a'."""
    if n is None:
        return "n/a"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
            return f"{value:.{digits}f} {prefix}{unit}"
    return f"{int(n)} {unit}"


def format_seconds(s: float | None) -> str:
    """'16.4 ms', '1.23 s', '850 µs'; None -> 'n/a'."""
    if s is None:
        return "n/a"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=False)


def print_error(message: str, hint: str | None = None) -> None:
    """``ERROR: ...`` and ``HINT: ...`` on stderr, one line each, no markup surprises."""
    print(f"ERROR: {message}", file=sys.stderr)
    if hint:
        print(f"HINT: {hint}", file=sys.stderr)
