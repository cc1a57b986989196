"""Rendering for people: the only place that formats units. Everything writes to a Rich console.

Per-command renderers live in ``memprof/render/<command>.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console

from ..results import METHOD_REAL, ModelledBytes

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def byte_unit(n: int | float) -> tuple[int, str]:
    """The binary unit ``n`` is shown in: (1024**3, 'GiB') for 1.5e9."""
    value = abs(float(n))
    for i, unit in enumerate(_UNITS):
        if value < 1024 ** (i + 1) or unit == _UNITS[-1]:
            return 1024**i, unit
    raise AssertionError("unreachable")


def format_bytes(n: int | float | None, digits: int | None = 1, unit: str | None = None) -> str:
    """Binary units, labelled as such: 1536 -> '1.5 KiB'; None -> 'n/a'.

    ``unit`` fixes the unit (axis ticks: '0.5 GiB', '1 GiB'); ``digits=None`` writes the shortest form.
    """
    if n is None:
        return "n/a"
    value = float(n)
    scale, name = (1024 ** _UNITS.index(unit), unit) if unit else byte_unit(value)
    if name == "B" and unit is None:
        return f"{int(value)} B"
    value /= scale
    return f"{value:g} {name}" if digits is None else f"{value:.{digits}f} {name}"


def precise_bytes(n: int) -> str:
    """Headroom and other differences near a limit: two decimals in GiB from 0.1 GiB on ('0.60 GiB')."""
    return format_bytes(n) if abs(n) < 1024**3 / 10 else format_bytes(n, 2, unit="GiB")


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


def certainty(method: str, modelled: Sequence[ModelledBytes]) -> str:
    """How sure a traced peak is: "exact trace + 48.0 MiB modelled: cuDNN RNN workspace 48.0 MiB (unverified)".

    The recorded part is exact for what ran (on fake tensors, or for real on the CPU when the step
    reads tensor values); the modelled parts come from libraries' sources or measurements and are
    marked "(unverified)" until a real run of that kind has confirmed them.
    """
    base = "real CPU run" if method == METHOD_REAL else "exact trace"
    parts = [m for m in modelled if m.bytes]
    if not parts:
        return f"{base} (nothing modelled at the peak)"
    total = sum(m.bytes for m in parts)
    items = ", ".join(f"{m.what} {format_bytes(m.bytes)}" + ("" if m.verified else " (unverified)") for m in parts)
    return f"{base} + {format_bytes(total)} modelled: {items}"


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
