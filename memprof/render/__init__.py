"""Rendering for people: the only place that formats units. Everything writes to a Rich console.

Per-command renderers live in ``memprof/render/<command>.py``.
"""

from __future__ import annotations

import errno
import sys
import textwrap
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


class _Console(Console):
    """A Rich console that lets a broken pipe reach the caller (Rich's own default exits 1, which
    memprof's exit codes reserve for "does not fit"); the command line then ends quietly with 141."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 layer``, ``2 layers``, ``1,024 layers`` (``many`` for irregular plurals)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def ellipsize(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, its middle replaced by ``…``.

    A dotted name (a layer) keeps its first part and as many whole parts from its end as fit, since
    the end tells layers apart: ``model.encoder.layers.11.self_attn.out_proj`` ->
    ``model.…11.self_attn.out_proj``; other text keeps a third of its start and the rest of its end.
    """
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    parts = text.split(".")
    if len(parts) > 2:
        head = parts[0] + ".…"
        for k in range(1, len(parts)):
            tail = ".".join(parts[k:])
            if len(head) + len(tail) <= width and len(tail) >= width // 2:
                return head + tail
    keep = width - 1
    first = keep // 3
    return text[:first] + "…" + text[len(text) - (keep - first) :]


def fold(text: str, width: int, hang: int | None = None) -> str:
    """One line of prose folded at ``width`` for reading: at spaces only (never inside a word, a
    flag or a number), continuation lines indented ``hang`` columns (default: the line's own
    indentation + 2)."""
    lead = len(text) - len(text.lstrip(" "))
    indent = " " * (lead + 2 if hang is None else hang)
    return textwrap.fill(
        text.strip(),
        width=max(width, len(indent) + 20),
        initial_indent=" " * lead,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def squeeze(
    headers: list[str], rows: list[list[str]], width: int, shrinkable: dict[int, int], gap: int = 2
) -> list[list[str]]:
    """Rows whose cells in the ``shrinkable`` columns (index -> narrowest width, in the order to shrink
    them) are ellipsized in the middle until the table, columns ``gap`` apart, fits in ``width``."""
    if not rows:
        return rows
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    excess = sum(widths) + gap * (len(widths) - 1) - width
    limit = list(widths)
    for i, narrowest in shrinkable.items():
        if excess <= 0:
            break
        cut = min(excess, widths[i] - max(narrowest, len(headers[i])))
        if cut > 0:
            limit[i] -= cut
            excess -= cut
    return [[ellipsize(c, limit[i]) if i in shrinkable else c for i, c in enumerate(r)] for r in rows]


def say(console: Console, text: str = "", *, hang: int | None = None, style: str | None = None) -> None:
    """Print one line of plain text (no markup) folded to the console's width (:func:`fold`)."""
    if not text:
        console.print()
        return
    console.print(fold(text, console.width - 1, hang), markup=False, highlight=False, style=style, soft_wrap=True)


def stdout_console() -> Console:
    return _Console(file=sys.stdout, highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    return _Console(file=sys.stderr, highlight=False, soft_wrap=False)


#: the ERROR lines printed in this process (the command line checks that an exit 130 said "interrupted")
ERRORS_SAID: list[str] = []


def print_error(message: str, hint: str | None = None) -> None:
    """``ERROR: ...`` and ``HINT: ...`` on stderr, one line each, no markup surprises."""
    ERRORS_SAID.append(message)
    try:
        print(f"ERROR: {message}", file=sys.stderr)
        if hint:
            print(f"HINT: {hint}", file=sys.stderr)
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or full: nothing left to tell the user with
        pass
