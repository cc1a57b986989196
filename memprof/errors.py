"""Errors memprof raises. Each carries a one-line message and a one-line hint.

The library raises these and never prints or exits; only ``memprof.cli`` turns
them into ``ERROR: ...`` / ``HINT: ...`` lines on stderr and an exit code.

Messages name *parameters*, not command-line flags: a parameter is written in backticks
(```batch_size` must be a positive integer``). The Python API shows it as written;
the command line shows the flag that sets it (``--batch-size``), see :meth:`MemprofError.render`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

_PARAM = re.compile(r"`([a-z_][a-z0-9_]*)`")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class MemprofError(Exception):
    """Base class: ``message`` says what went wrong, ``hint`` what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = _one_line(message)  # always one line
        self.hint = _one_line(hint) if hint else None

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message

    def render(self, names: Mapping[str, str] | Callable[[str], str | None]) -> tuple[str, str | None]:
        """``(message, hint)`` with each backticked parameter replaced by ``names[param]``
        (a command-line flag); parameters ``names`` does not know keep their backticks."""
        lookup = names.get if isinstance(names, Mapping) else names

        def sub(match: re.Match) -> str:
            flag = lookup(match.group(1))
            return flag if flag else match.group(0)

        return _PARAM.sub(sub, self.message), _PARAM.sub(sub, self.hint) if self.hint else None


class UsageError(MemprofError):
    """A bad option value: batch size <= 0, unknown dtype, bad JSON, ..."""


class ModelLoadError(MemprofError):
    """The model reference could not be turned into a model (name, file, attribute, constructor)."""


class MissingDependencyError(MemprofError):
    """An optional package memprof needs for this model is not installed (transformers, timm)."""


class ModelCodeError(MemprofError):
    """The model's own code (its forward, loss or ``memprof_batch``) raised: the message shows the
    exception as raised and the model's line it came from."""


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


class DataDependentError(TraceError):
    """The step reads tensor values (``.item()``, ``nonzero``, boolean masks, ...): fake tensors have none.

    ``op`` is the operation that needed the values, ``where`` the user's source line that ran it
    (``file:line: code``), when known.
    """

    def __init__(self, message: str, hint: str | None = None, *, op: str | None = None, where: str | None = None):
        super().__init__(message, hint)
        self.op = op
        self.where = where


class MeasureError(MemprofError):
    """A real measurement failed for a reason other than running out of memory."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after part of the answer was computed: ``partial`` holds that result.

    A ``KeyboardInterrupt``, so Ctrl-C still stops a program that calls the API; the command
    line catches it to print what was computed before exiting 130.
    """

    def __init__(self, partial: Any):
        super().__init__()
        self.partial: Any = partial
