"""Whose code raised an exception, and what the evidence says the user should change.

When a model's constructor, forward, loss or training step raises, memprof shows the exception
as it was raised (``ValueError: config file missing``), the model's own line that raised it
(``models.py:21``, the innermost frame outside torch, memprof and the standard library), and a
hint chosen from evidence, not from habit:

* ``--input-shape`` only for a shape mismatch before any layer with parameters has run (the
  first layer rejected what memprof fed it), or, hedged, for a shape mismatch deeper in;
* ``--model-kwargs`` only for a ``TypeError`` about the constructor's arguments;
* ``memprof_batch()`` only for a ``TypeError`` about ``forward``'s arguments;
* otherwise: fix the model's code at that line (``MEMPROF_DEBUG=1`` shows the full traceback).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import sysconfig
from types import TracebackType

from ..errors import InputShapeError, MemprofError, ModelCodeError, ModelLoadError

_SHAPE_WORDS = (
    "shape",
    "size",
    "dimension",
    "dim ",
    "dim=",
    "expected input",
    "channels",
    "mat1",
    "mat2",
    "must match",
    "sizes of tensors",
    "same reduction dim",
)
_ARGUMENT_WORDS = re.compile(r"\b(argument|arguments|positional|keyword)\b")
DEBUG_HINT = "MEMPROF_DEBUG=1 shows the full traceback"


@functools.lru_cache(maxsize=1)
def _machinery_dirs() -> tuple[str, ...]:
    """Folders whose frames are never the model's own: torch and memprof's machinery."""
    dirs = []
    torch_file = getattr(sys.modules.get("torch"), "__file__", None)
    if torch_file:
        dirs.append(os.path.dirname(os.path.abspath(torch_file)) + os.sep)
    here = os.path.dirname(os.path.abspath(__file__))  # memprof/engine
    package = os.path.dirname(here)
    dirs += [os.path.join(package, sub) + os.sep for sub in ("engine", "commands", "cli", "render")]
    dirs.append(os.path.join(package, "api.py"))
    return tuple(dirs)


@functools.lru_cache(maxsize=1)
def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({os.path.abspath(paths[k]) + os.sep for k in ("stdlib", "platstdlib") if paths.get(k)})


def _is_library(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen runpy>, <string>
        return True
    path = os.path.abspath(filename)
    if path.startswith(_machinery_dirs()):
        return True
    if os.sep + "site-packages" + os.sep in path or os.sep + "dist-packages" + os.sep in path:
        return not _is_model_package(path)  # (site-packages lives inside the standard library's folder)
    return path.startswith(_stdlib_dirs())


def _is_model_package(path: str) -> bool:
    # model zoos are the model's own code: a torchvision, timm or transformers line is worth showing
    return any(os.sep + name + os.sep in path for name in ("torchvision", "timm", "transformers", "diffusers"))


def display_path(filename: str) -> str:
    """A path as short as still clear: relative to the working folder, or to its ``sys.path`` entry."""
    path = os.path.abspath(filename)
    cwd = os.getcwd() + os.sep
    if path.startswith(cwd):
        return path[len(cwd) :]
    for entry in sorted((os.path.abspath(p) for p in sys.path if p), key=len, reverse=True):
        if path.startswith(entry + os.sep) and "site-packages" in entry:
            return path[len(entry) + 1 :]
    return path


def user_frame(tb: TracebackType | None) -> tuple[str, int, str] | None:
    """``(file, line, function)`` of the innermost frame in the model's own code, or None."""
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if not _is_library(code.co_filename):
            found = (code.co_filename, tb.tb_lineno, code.co_name)
        tb = tb.tb_next
    return found


def raised_in_model_code(exc: BaseException) -> bool:
    """The ``raise`` itself is in the model's own code (not in torch, deeper down)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return not _is_library(tb.tb_frame.f_code.co_filename)


def location(exc: BaseException) -> str | None:
    """``models.py:21`` (``, in helper`` when it is not the module level), or None."""
    frame = user_frame(exc.__traceback__)
    if frame is None:
        return None
    name = "" if frame[2] in ("<module>", "forward", "__init__") else f", in {frame[2]}"
    return f"{display_path(frame[0])}:{frame[1]}{name}"


def raised(exc: BaseException, limit: int = 400) -> str:
    """The exception as raised, on one line: ``ValueError: config file missing``."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def at(exc: BaseException) -> str:
    """`` (at models.py:21)`` or nothing."""
    where = location(exc)
    return f" (at {where})" if where else ""


def is_shape_error(exc: BaseException) -> bool:
    if not isinstance(exc, (RuntimeError, ValueError, IndexError, AssertionError)):
        return False
    msg = " ".join(str(exc).split()).lower()
    return any(w in msg for w in _SHAPE_WORDS)


def is_argument_error(exc: BaseException) -> bool:
    """A ``TypeError`` about a call's arguments (missing, unexpected, too many)."""
    return isinstance(exc, TypeError) and bool(_ARGUMENT_WORDS.search(str(exc)))


def fix_hint(exc: BaseException) -> str:
    where = location(exc)
    if where:
        return f"the model's own code raised it at {where}: fix it there; {DEBUG_HINT}"
    return f"the exception comes from the model or PyTorch, not from memprof's options; {DEBUG_HINT}"


def forward_error(
    exc: BaseException,
    *,
    layer: str | None,
    layer_type: str | None,
    got: str | None,
    expects: str | None,
    model_input: str,
    batch: int,
    first_layer: bool,
    phase: str = "forward",
) -> MemprofError:
    """The error for an exception raised while the model's forward ran on memprof's inputs.

    ``first_layer``: no layer with parameters had finished yet, so a shape mismatch is most
    likely the input's. ``got``/``expects``: the failing layer's input shapes and what it accepts.
    """
    if isinstance(exc, MemprofError):
        return exc
    loc = location(exc)
    where = f" (at {loc})" if loc else ""
    named = f"layer {layer!r} ({layer_type})" if layer and layer_type else "the model"
    if "more than 1 value per channel" in str(exc):
        return InputShapeError(
            f"{named} got one value per channel: {raised(exc)}{where}",
            f"BatchNorm in training needs more than one value per channel: a batch size above 1 "
            f"(it is {batch}) or a larger input than {model_input} (--input-shape)",
        )
    if is_shape_error(exc):
        detail = (f" rejected input {got}" if got else " rejected its input") + (
            f", expects {expects}" if expects else ""
        )
        message = f"{named}{detail}: {raised(exc)}{where}"
        if first_layer:
            return InputShapeError(
                message,
                f"the model got {model_input} per sample (batch {batch}); give the per-sample shape it expects "
                f"with --input-shape (batch excluded), e.g. --input-shape {_example_shape(expects)}",
            )
        return InputShapeError(
            message,
            f"if the model expects another input size, give it with --input-shape (batch excluded; it got "
            f"{model_input}); otherwise the mismatch is in the model's own code" + (f" at {loc}" if loc else ""),
        )
    if is_argument_error(exc) and loc is None:  # raised by the call itself, not inside forward
        return InputShapeError(
            f"the model's forward does not take the inputs memprof built ({model_input}): {raised(exc)}",
            "give one --input-shape per positional input, or define memprof_batch(batch_size, device, dtype) "
            "next to the model to build them yourself",
        )
    return ModelCodeError(f"the model's {phase} raised {raised(exc)}{where}", fix_hint(exc))


def expects(module) -> str | None:
    """What a layer accepts, for a shape error: ``(*, 784)``, ``(N, 3, *, *)``, ..."""
    from torch import nn

    m = module
    if isinstance(m, nn.Linear):
        return f"(*, {m.in_features})"
    if isinstance(m, nn.modules.conv._ConvNd):
        return f"(N, {m.in_channels}, " + ", ".join("*" for _ in m.kernel_size) + ")"
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return f"(N, {m.num_features}, ...)"
    if isinstance(m, nn.LayerNorm):
        return "(*, " + ", ".join(str(d) for d in m.normalized_shape) + ")"
    if isinstance(m, nn.GroupNorm):
        return f"(N, {m.num_channels}, ...)"
    if isinstance(m, nn.Embedding):
        return f"integer ids in [0, {m.num_embeddings})"
    weight = getattr(m, "weight", None)
    if weight is not None and hasattr(weight, "shape"):
        return "a weight of shape " + ("×".join(str(d) for d in weight.shape) or "scalar")
    return None


def _example_shape(expects: str | None) -> str:
    """A shape that would satisfy ``expects`` when it says enough (Linear's width, Conv's channels)."""
    if expects:
        m = re.fullmatch(r"\(\*, (\d+)\)", expects)
        if m:
            return m.group(1)
        m = re.fullmatch(r"\(N, (\d+), \*, \*\)", expects)
        if m:
            return f"{m.group(1)},224,224"
    return "3,224,224"


def constructor_error(exc: BaseException, display: str, kwargs_text: str) -> MemprofError:
    """The error for a model constructor (or factory) that raised: the kwargs hint only for a
    ``TypeError`` about its arguments, else the line of the constructor to fix."""
    if isinstance(exc, MemprofError):
        return exc
    message = f"constructing {display}({kwargs_text}) raised {raised(exc)}{at(exc)}"
    if is_argument_error(exc):
        hint = "pass constructor arguments with --model-kwargs '{\"name\": value}' or --model-arg name=value"
    else:
        hint = fix_hint(exc)
    return ModelLoadError(message, hint)
