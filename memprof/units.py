"""Byte sizes: parsing what people type ("24GiB", "80GB", "512M") and constants.

Formatting for people lives in ``memprof.render``; this module only parses.
"""

from __future__ import annotations

import math
import re

from .errors import UsageError

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": KiB,
    "kib": KiB,
    "mi": MiB,
    "mib": MiB,
    "gi": GiB,
    "gib": GiB,
    "ti": TiB,
    "tib": TiB,
}
_LARGEST = 2**60  # 1 EiB: beyond any machine, and far from int64 overflow
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """Parse a size such as ``24GiB``, ``80GB``, ``1.5 GiB``, ``512MiB`` or ``1024`` into bytes.

    Decimal suffixes (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB)
    powers of 1024; a bare number is bytes.
    """
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise UsageError(
                f"cannot read {text!r} as a memory size", "write a number with a unit, e.g. 24GiB, 80GB or 512MiB"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise UsageError(
            f"unknown size unit {unit!r} in {text!r}",
            "use B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)",
        )
    if not math.isfinite(value) or value * _UNITS[unit] > _LARGEST:
        raise UsageError(f"memory size {text!r} is too large", "e.g. --gpu-memory 80GiB")
    size = int(round(value * _UNITS[unit]))
    if size <= 0:
        raise UsageError(f"memory size must be positive, got {text!r}", "e.g. --gpu-memory 24GiB")
    return size
