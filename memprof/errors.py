"""Errors memprof raises. Each carries a one-line message and a one-line hint.

The library raises these and never prints or exits; only ``memprof.cli`` turns
them into ``ERROR: ...`` / ``HINT: ...`` lines on stderr and an exit code.
"""
from __future__ import annotations


class MemprofError(Exception):
    """Base class: ``message`` says what went wrong, ``hint`` what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line
        self.hint = " ".join(str(hint).split()) if hint else None

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class UsageError(MemprofError):
    """A bad option value: batch size <= 0, unknown dtype, bad JSON, ..."""


class ModelLoadError(MemprofError):
    """The model reference could not be turned into a model (name, file, attribute, constructor)."""


class InputShapeError(MemprofError):
    """The model rejected the inputs memprof built for it."""


class NoGPUError(MemprofError):
    """The command needs CUDA and there is none."""

    exit_code = 3


class DoesNotFitError(MemprofError):
    """Not even the smallest batch fits the memory given."""

    exit_code = 4


class TraceError(MemprofError):
    """The training step could not be traced on fake tensors."""


class MeasureError(MemprofError):
    """A real measurement failed for a reason other than running out of memory."""
