"""Turn what the user typed into a model factory, its inputs and its loss.

Accepted model references:

* a torchvision model name (``resnet50``, ``vit_b_16``, ...), input shape from
  ``configs/models.toml``; weights are never downloaded;
* a user file and attribute, ``path/to/my.py:Net`` (a class or a factory function);
* an importable ``package.module:attr``;
* a model config file ``something.toml`` (see ``configs/``);
* a Hugging Face model: ``hf:<org>/<name>`` (its config.json only, from the local Hugging Face
  cache, memprof's catalog in ``configs/hf/``, or the hub), a path to a ``config.json`` or to a
  folder that holds one; ``timm:<name>`` for timm models (see :mod:`memprof.engine.hf`).

A user file (or module) may define two optional hooks next to the model:

``memprof_batch(batch_size, device, dtype)``
    returns ``(inputs, target)``: ``inputs`` is a tensor, a tuple of positional
    arguments or a dict of keyword arguments for ``model(...)``; ``target`` is
    anything the loss takes (or ``None``). ``dtype`` is the floating dtype inputs
    should have for the chosen precision. Create tensors with ``torch.randn`` /
    ``torch.randint`` / ``torch.zeros`` on ``device``: memprof calls the hook on
    fake tensors too, so it must not read tensor values.
``memprof_loss(output, target)``
    returns the scalar loss to call ``backward()`` on.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MemprofError, ModelLoadError, UsageError

BATCH_HOOK = "memprof_batch"
LOSS_HOOK = "memprof_loss"
# the top-level configs/ folder, reached through the package link memprof/_configs (shipped in wheels too)
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "_configs"
PRESETS_FILE = CONFIGS_DIR / "models.toml"


def _toml_load(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ModelLoadError(f"cannot read config {path}: {exc.strerror}", "check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelLoadError(f"config {path} is not valid TOML: {exc}", "see configs/ for examples") from None


# --------------------------------------------------------------------------- inputs
@dataclass
class InputSpec:
    """Default inputs: one tensor per shape, per sample (batch dimension excluded)."""

    shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: "float" follows the precision (fp32 for fp32/AMP, fp16/bf16 for pure half precision);
    #: or an integer dtype name ("int64") for token ids; None = detect from the model
    dtype: str | None = None
    low: int = 0
    high: int | None = None  # exclusive upper bound of token ids

    def describe(self) -> str:
        shapes = " + ".join("×".join(str(d) for d in s) for s in self.shapes) or "?"
        if self.dtype and self.dtype != "float":
            hi = self.high if self.high is not None else "?"
            return f"{shapes} {self.dtype} in [{self.low}, {hi})"
        return shapes


_SEPARATORS = ",x×X"
_DIGITS = "0123456789"  # not str.isdigit(): "²" is a digit to it, and int() refuses it


def parse_ints(text: str, what: str, example: str, *, minimum: int = 1, count: int | None = None) -> tuple[int, ...]:
    """Integers separated by ``,`` (or ``x``/``×``, or spaces) in ``text``; anything else is an error
    naming the character where it is: ``3,x,224`` -> "expected a number at character 3, found 'x'".

    Outer brackets are allowed (``(3, 224, 224)``, and Python's one-element ``(784,)``).
    """
    raw = str(text)
    body = raw.strip()
    offset = len(raw) - len(raw.lstrip())

    def fail(message: str) -> UsageError:
        return UsageError(f"cannot read {what} {raw!r}: {message}", f"write it like {example}")

    if body[:1] in ("(", "["):
        closing = ")" if body[0] == "(" else "]"
        if not body.endswith(closing):
            raise fail(f"the {body[0]!r} at character {offset + 1} is never closed")
        body, offset = body[1:-1], offset + 1
        if body.rstrip().endswith(",") and body.count(",") == 1:  # Python's (784,)
            body = body.rstrip()[:-1]
    values: list[int] = []
    i, n = 0, len(body)
    while True:
        while i < n and body[i].isspace():
            i += 1
        j = i
        while j < n and body[j] in _DIGITS:
            j += 1
        if j == i:
            found = repr(body[i]) if i < n else "nothing"
            raise fail(f"expected a number at character {offset + i + 1}, found {found}")
        value = int(body[i:j])
        if value < minimum:
            raise fail(f"part {len(values) + 1} is {value}: each must be at least {minimum}")
        values.append(value)
        i = j
        spaced = False
        while i < n and body[i].isspace():
            i, spaced = i + 1, True
        if i >= n:
            break
        if body[i] in _SEPARATORS:
            i += 1
        elif not (spaced and body[i] in _DIGITS):
            raise fail(f"expected a separator (',') at character {offset + i + 1}, found {body[i]!r}")
    if count is not None and len(values) != count:
        raise fail(f"expected {count} numbers, found {len(values)}")
    return tuple(values)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` / ``"3x224x224"`` / ``"(3, 224, 224)"`` -> ``(3, 224, 224)``; anything that is not a
    list of positive integers is an error naming the position of the bad part."""
    return parse_ints(text, "input shape", "--input-shape 3,224,224 (per sample, batch excluded)")


def parse_token_range(text: str) -> tuple[int, int]:
    """``"0,50257"`` (or ``0:50257``) -> ``(0, 50257)``: LOW inclusive, HIGH exclusive."""
    low, high = parse_ints(
        str(text).replace(":", ",", 1), "token range", "--token-range 0,50257 (LOW,HIGH)", minimum=0, count=2
    )
    return low, high


def parse_kwargs(json_text: str | None = None, pairs: list[str] | None = None) -> dict[str, Any]:
    """Constructor arguments from ``--model-kwargs '{"a": 1}'`` and repeated ``key=value``."""
    kwargs: dict[str, Any] = {}
    if json_text:
        try:
            parsed = json.loads(json_text)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"--model-kwargs is not valid JSON: {exc.msg} at column {exc.colno}",
                """quote it for the shell, e.g. --model-kwargs '{"num_classes": 10}'""",
            ) from None
        if not isinstance(parsed, dict):
            raise UsageError("--model-kwargs must be a JSON object", """e.g. --model-kwargs '{"num_classes": 10}'""")
        kwargs.update(parsed)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(
                f"cannot read model argument {pair!r}: "
                + ("no '='" if not sep else f"{key.strip()!r} is not an argument name"),
                "write key=value, e.g. --model-arg num_classes=10",
            )
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return kwargs


# --------------------------------------------------------------------------- model spec
@dataclass
class ModelSpec:
    """A model factory plus how to feed it and what loss to train it with."""

    ref: str
    display_name: str
    factory: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: InputSpec = field(default_factory=InputSpec)
    batch_hook: Callable | None = None
    loss_hook: Callable | None = None
    source: str = "torchvision"  # torchvision | file | module | config | instance | hf | timm
    #: workload defaults from a config file (batch_size, dtype, optimizer, mode)
    defaults: dict[str, Any] = field(default_factory=dict)
    #: a Hugging Face model (memprof.engine.hf.HFModel): its inputs, loss, step context and generation
    hf: Any = None

    @property
    def takes_tokens(self) -> bool:
        """Whether the model takes token ids, so that a sequence length applies."""
        if self.hf is not None:
            return True
        return (
            self.inputs.dtype not in (None, "float")
            and len(self.inputs.shapes) == 1
            and len(self.inputs.shapes[0]) == 1
        )

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's positions allow (None: unknown or unlimited)."""
        return self.hf.max_positions if self.hf is not None else None

    @property
    def default_seq_len(self) -> int | None:
        if self.hf is not None:
            return self.hf.default_seq_len
        if self.takes_tokens:
            return self.inputs.shapes[0][0]
        return None

    @property
    def moe(self) -> Any:
        """Mixture-of-experts facts (experts, top_k) of a Hugging Face model, else None."""
        return self.hf.moe if self.hf is not None else None

    def step_context(self, model, workload, fake: bool, meta: bool = False):
        """A context around each step: Hugging Face models route MoE tokens and read known values there
        (``fake``: the tracer's fake tensors; ``meta``: the formulas' meta-device forward)."""
        import contextlib

        if self.hf is None:
            return contextlib.nullcontext()
        return self.hf.step_context(model, workload.routing, fake, meta)

    def instantiate(self, workload=None):
        """Build a fresh model (on the current default device / fake mode)."""
        import torch

        from .blame import constructor_error

        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        self._check_arguments(args)
        try:
            if self.hf is not None:
                model = self.hf.build(attn=getattr(workload, "attn", None))
            else:
                model = self.factory(**self.kwargs)
        except MemoryError:
            raise
        except MemprofError:
            raise
        except Exception as exc:  # the user's constructor: the exception as raised, and its line
            raise constructor_error(exc, self.display_name, args) from None
        if not isinstance(model, torch.nn.Module):
            raise ModelLoadError(
                f"{self.ref} returned {type(model).__name__}, not a torch.nn.Module",
                "point at an nn.Module class or a function that returns one",
            )
        self._detect_inputs(model)
        return model

    def _check_arguments(self, args: str) -> None:
        """Arguments the constructor's signature cannot take fail here, before it runs."""
        if self.hf is not None:  # config overrides, checked against the config when it is built
            return
        try:
            signature = inspect.signature(self.factory)
        except (TypeError, ValueError):  # a builtin or C extension: no signature to check
            return
        try:
            signature.bind(**self.kwargs)
        except TypeError as exc:
            raise ModelLoadError(
                f"constructing {self.display_name}({args}): {exc}",
                "pass constructor arguments with --model-kwargs '{\"name\": value}' or --model-arg name=value",
            ) from None

    def _detect_inputs(self, model) -> None:
        """Fill in what the user left out: token ids for Embedding-first models, Linear widths."""
        import torch

        if self.hf is not None:
            return
        first = next(
            (m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters(recurse=False))),
            None,
        )
        if self.inputs.dtype is None:
            if isinstance(first, torch.nn.Embedding):
                self.inputs.dtype = "int64"
                if self.inputs.high is None:
                    self.inputs.high = first.num_embeddings
            else:
                self.inputs.dtype = "float"
        if self.inputs.dtype != "float" and self.inputs.high is None:
            self.inputs.high = first.num_embeddings if isinstance(first, torch.nn.Embedding) else 2
        if not self.inputs.shapes and self.batch_hook is None:
            if isinstance(first, torch.nn.Linear) and self.inputs.dtype == "float":
                self.inputs.shapes = [(first.in_features,)]
            else:
                raise UsageError(
                    f"memprof does not know the input shape of {self.display_name}",
                    f"give the per-sample shape, e.g. --input-shape 3,224,224 (batch excluded), "
                    f"or define {BATCH_HOOK}(batch_size, device, dtype) next to the model",
                )

    def input_description(
        self, batch_size: int | None = None, seq_len: int | None = None, padding: bool = False, mode: str = "train"
    ) -> str:
        if self.hf is not None:
            if mode == "generate":
                seq = seq_len or self.hf.default_seq_len
                return f"prompt of {batch_size or '?'}×{seq} token ids (vocabulary {self.hf.vocab_size:,})" + (
                    " with left padding" if padding else ""
                )
            return self.hf.describe_inputs(batch_size, seq_len, padding)
        if self.batch_hook is not None and not self.inputs.shapes:
            return f"from {BATCH_HOOK}()"
        if seq_len is not None and self.takes_tokens:
            return InputSpec([(seq_len,)], self.inputs.dtype, self.inputs.low, self.inputs.high).describe()
        return self.inputs.describe()

    def make_batch(
        self,
        batch_size: int,
        device,
        precision,
        *,
        seq_len: int | None = None,
        padding: bool = False,
        mode: str = "train",
    ) -> tuple[tuple, dict, Any]:
        """Inputs and target for one batch: ``(args, kwargs, target)``.

        ``seq_len`` sets the sequence length of token inputs (Hugging Face models, a single 1-D token
        input, or a ``memprof_batch`` hook that takes ``seq_len``); ``padding`` pads Hugging Face batches.
        """
        import torch

        float_dtype = precision.torch_param_dtype()
        if self.hf is not None:
            if mode == "generate":
                return (
                    (),
                    self.hf.generate_inputs(batch_size, seq_len or self.hf.default_seq_len, device, padding),
                    None,
                )
            return (), self.hf.make_batch(batch_size, seq_len, device, padding), None
        if self.batch_hook is not None:
            try:
                if seq_len is not None and "seq_len" in inspect.signature(self.batch_hook).parameters:
                    produced = self.batch_hook(batch_size, device, float_dtype, seq_len=seq_len)
                else:
                    produced = self.batch_hook(batch_size, device, float_dtype)
            except MemoryError:
                raise
            except Exception as exc:
                from .blame import at, fix_hint, is_argument_error, location, raised

                hint = (
                    f"{BATCH_HOOK} is called as {BATCH_HOOK}(batch_size, device, dtype)"
                    if is_argument_error(exc) and location(exc) is None
                    else fix_hint(exc)
                )
                raise ModelLoadError(f"{BATCH_HOOK}() raised {raised(exc)}{at(exc)}", hint) from None
            if not (isinstance(produced, tuple) and len(produced) == 2):
                raise ModelLoadError(
                    f"{BATCH_HOOK}() must return (inputs, target), got {type(produced).__name__}",
                    "inputs: a tensor, a tuple of arguments or a dict of keyword arguments",
                )
            inputs, target = produced
            if isinstance(inputs, dict):
                return (), dict(inputs), target
            if isinstance(inputs, (tuple, list)):
                return tuple(inputs), {}, target
            return (inputs,), {}, target
        shapes = self.inputs.shapes
        if seq_len is not None:
            if not self.takes_tokens:
                raise UsageError(
                    f"`seq_len` applies to models that take token ids; {self.display_name} takes "
                    f"{self.inputs.describe()}",
                    "leave out `seq_len`, or give the per-sample shape with `input_shape`",
                )
            shapes = [(seq_len,)]
        args = []
        for shape in shapes:
            if self.inputs.dtype in (None, "float"):
                args.append(torch.randn((batch_size, *shape), dtype=float_dtype, device=device))
            else:
                args.append(
                    torch.randint(
                        self.inputs.low,
                        self.inputs.high or 2,
                        (batch_size, *shape),
                        dtype=getattr(torch, self.inputs.dtype),
                        device=device,
                    )
                )
        return tuple(args), {}, None

    def loss_fn(self) -> Callable:
        if self.loss_hook is not None:
            return self.loss_hook
        if self.hf is not None:
            return self.hf.loss
        tokens = self.inputs.dtype not in (None, "float")
        return lambda output, target: default_loss(output, target, tokens=tokens)


def default_loss(output, target=None, *, tokens: bool = False):
    """A loss for any output: cross-entropy against class 0 for logits, MSE otherwise.

    Every floating tensor in the output (tuples, dicts, named tuples such as
    Inception's aux logits) contributes. With a ``target`` tensor: cross-entropy if
    it holds integers, MSE if it holds floats.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils._pytree import tree_leaves

    if hasattr(output, "logits") and not isinstance(output, (tuple, dict)):  # HF-style ModelOutput
        output = output.logits
    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise UsageError(
            "the model's output holds no floating-point tensor to train on",
            f"define {LOSS_HOOK}(output, target) next to the model",
        )
    total = None
    for y in leaves:
        if isinstance(target, torch.Tensor) and len(leaves) == 1:
            if target.is_floating_point():
                loss = F.mse_loss(y, target)
            elif y.dim() == 3 and target.dim() == 2 and tokens:
                loss = F.cross_entropy(y.flatten(0, 1), target.flatten())
            else:
                loss = F.cross_entropy(y, target)
        elif y.dim() >= 2:
            if tokens and y.dim() == 3:
                loss = F.cross_entropy(
                    y.flatten(0, 1), torch.zeros(y.shape[0] * y.shape[1], dtype=torch.long, device=y.device)
                )
            else:
                loss = F.cross_entropy(y, torch.zeros((y.shape[0], *y.shape[2:]), dtype=torch.long, device=y.device))
        else:
            loss = F.mse_loss(y, torch.zeros_like(y))
        total = loss if total is None else total + loss
    return total


# --------------------------------------------------------------------------- torchvision
_TV_FAMILIES = ("segmentation", "video", "detection", "optical_flow", "quantization")
_UNSUPPORTED_FAMILIES = {
    "quantization": "quantized models are inference-only integer models",
}
#: objects per synthetic detection target (boxes, labels; masks and keypoints where the model wants them)
DETECTION_OBJECTS = 4


def _presets() -> dict:
    return _toml_load(PRESETS_FILE) if PRESETS_FILE.exists() else {}


def torchvision_family(name: str) -> str | None:
    """``"classification"``, ``"segmentation"``, ... or None if torchvision has no such model."""
    from torchvision import models

    for family in _TV_FAMILIES:
        if name in models.list_models(module=getattr(models, family)):
            return family
    return "classification" if name in models.list_models() else None


def torchvision_names() -> list[str]:
    from torchvision import models

    return sorted(models.list_models())


def load_torchvision(name: str, kwargs: dict[str, Any]) -> ModelSpec:
    from torchvision import models

    family = torchvision_family(name)
    if family is None:
        close = difflib.get_close_matches(name, torchvision_names(), n=3, cutoff=0.5)
        hint = (
            f"did you mean {', '.join(close)}?"
            if close
            else 'run `python -c "import torchvision; print(torchvision.models.list_models())"` for the names'
        )
        raise ModelLoadError(
            f"unknown model {name!r}: not a torchvision model name nor a path/to/file.py:Class",
            hint + " A model of your own: path/to/file.py:ClassName",
        )
    if family in _UNSUPPORTED_FAMILIES:
        raise ModelLoadError(
            f"{name} is a torchvision {family.replace('_', '-')} model: {_UNSUPPORTED_FAMILIES[family]}",
            f"wrap it in a file with {BATCH_HOOK}() and {LOSS_HOOK}() and pass file.py:factory",
        )
    presets = _presets()
    entry: dict[str, Any] = dict(presets.get("defaults", {}))
    for layer in (presets.get("family", {}).get(family, {}), presets.get("models", {}).get(name, {})):
        entry.update({k: v for k, v in layer.items() if k != "kwargs"})
        entry.setdefault("kwargs", {})
        entry["kwargs"] = {**entry.get("kwargs", {}), **layer.get("kwargs", {})}
    preset_kwargs = {k: (None if v == "none" else v) for k, v in entry.get("kwargs", {}).items()}
    builder = models.get_model_builder(name)

    def factory(**kw):
        return builder(weights=None, **kw)

    if family == "detection":
        shape = tuple(entry.get("input_shape", (3, 480, 640)))
        return detection_spec(name, factory, {**preset_kwargs, **kwargs}, shape)
    if family == "optical_flow":
        shape = tuple(entry.get("input_shape", (3, 224, 224)))
        return ModelSpec(
            ref=name,
            display_name=name,
            factory=factory,
            kwargs={**preset_kwargs, **kwargs},
            inputs=InputSpec(shapes=[shape, shape], dtype="float"),  # two frames
            source="torchvision",
        )
    return ModelSpec(
        ref=name,
        display_name=name,
        factory=factory,
        kwargs={**preset_kwargs, **kwargs},
        inputs=InputSpec(shapes=[tuple(entry.get("input_shape", (3, 224, 224)))], dtype="float"),
        source="torchvision",
    )


def detection_spec(name: str, factory: Callable[..., Any], kwargs: dict[str, Any], shape: tuple) -> ModelSpec:
    """A torchvision detection model (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD) with synthetic data.

    Each batch is ``batch_size`` images of ``shape`` and, per image, :data:`DETECTION_OBJECTS`
    random boxes (label 1), with random masks for Mask R-CNN and 17 keypoints for Keypoint
    R-CNN. In training the model returns its losses; the loss is their sum.
    """
    masks = name.startswith("maskrcnn")
    keypoints = name.startswith("keypointrcnn")

    def batch(batch_size: int, device, dtype):
        import torch

        inputs = spec.inputs  # --input-shape changes it after loading
        if len(inputs.shapes) != 1 or len(inputs.shapes[0]) != 3:
            raise UsageError(
                f"{name} takes images: one input shape C,H,W, got {inputs.describe()}",
                "e.g. --input-shape 3,480,640",
            )
        channels, height, width = inputs.shapes[0]
        n = DETECTION_OBJECTS
        images = [torch.rand(channels, height, width, device=device, dtype=dtype) for _ in range(batch_size)]
        targets = []
        for _ in range(batch_size):
            size = torch.tensor([width, height, width, height], device=device, dtype=torch.float32)
            corner = torch.rand(n, 2, device=device) * 0.5
            extent = 0.1 + torch.rand(n, 2, device=device) * 0.4
            boxes = torch.cat([corner, corner + extent], dim=1) * size
            target = {"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64, device=device)}
            if masks:
                target["masks"] = (torch.rand(n, height, width, device=device) > 0.5).to(torch.uint8)
            if keypoints:
                k = 17
                xy = corner[:, None, :] + torch.rand(n, k, 2, device=device) * extent[:, None, :]
                visible = torch.ones(n, k, 1, device=device)
                target["keypoints"] = torch.cat([xy * size[:2], visible], dim=2)
            targets.append(target)
        return (images, targets), None

    def loss(output, _target):
        if isinstance(output, dict):  # training: the model's losses
            return sum(output.values())
        return default_loss(output)

    spec = ModelSpec(
        ref=name,
        display_name=name,
        factory=factory,
        kwargs=kwargs,
        inputs=InputSpec(shapes=[tuple(shape)], dtype="float"),
        batch_hook=batch,
        loss_hook=loss,
        source="torchvision",
    )
    return spec


# --------------------------------------------------------------------------- user code
def _import_file(path: Path):
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist", "check the path, e.g. models/net.py:Net")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a Python file", "point at a .py file: path/to/file.py:Net")
    module_name = f"memprof_user_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {path}", "the model file must be a Python source file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except SystemExit:
        sys.modules.pop(module_name, None)
        raise ModelLoadError(
            f"importing {path} called sys.exit()", "guard the script part of the file with if __name__ == '__main__':"
        ) from None
    except Exception as exc:
        sys.modules.pop(module_name, None)
        where = ""
        if isinstance(exc, SyntaxError):
            where = f" (line {exc.lineno})"
        raise ModelLoadError(
            f"importing {path} failed{where}: {type(exc).__name__}: {exc}",
            "fix the file so that `python " + str(path) + "` runs",
        ) from None
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"cannot import module {name!r}: {exc}",
            "install it or run memprof from the folder that contains it; for a file use path/to/file.py:Class",
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"importing {name} failed: {type(exc).__name__}: {exc}", "fix the module") from None


def _candidates(module) -> list[str]:
    import torch

    names = []
    for attr, value in vars(module).items():
        if attr.startswith("_") or attr in (BATCH_HOOK, LOSS_HOOK):
            continue
        if (
            inspect.isclass(value)
            and issubclass(value, torch.nn.Module)
            and getattr(value, "__module__", None) == module.__name__
        ):
            names.append(attr)
        elif inspect.isfunction(value) and getattr(value, "__module__", None) == module.__name__:
            names.append(attr)
    return names


def _spec_from_module(module, attr: str, ref: str, where: str, kwargs: dict, source: str) -> ModelSpec:
    import torch

    if not attr:
        options = _candidates(module)
        raise ModelLoadError(
            f"{ref} names no model attribute",
            f"write {where}:ClassName" + (f"; {where} defines {', '.join(options[:6])}" if options else ""),
        )
    if not hasattr(module, attr):
        options = _candidates(module)
        close = difflib.get_close_matches(attr, options, n=3, cutoff=0.4)
        hint = (
            f"did you mean {', '.join(close)}?"
            if close
            else (f"{where} defines {', '.join(options[:8])}" if options else f"{where} defines no nn.Module class")
        )
        raise ModelLoadError(f"{where} has no attribute {attr!r}", hint)
    factory = getattr(module, attr)
    if isinstance(factory, torch.nn.Module):
        raise ModelLoadError(
            f"{ref} is a model instance, not a class or factory",
            "memprof builds the model itself (on fake tensors, without memory): point at the class "
            "or a function that returns the model",
        )
    if not callable(factory):
        raise ModelLoadError(
            f"{ref} is a {type(factory).__name__}, not a model class or factory",
            "point at an nn.Module class or a function that returns one",
        )
    batch_hook = getattr(factory, BATCH_HOOK, None) or getattr(module, BATCH_HOOK, None)
    loss_hook = getattr(factory, LOSS_HOOK, None) or getattr(module, LOSS_HOOK, None)
    return ModelSpec(
        ref=ref,
        display_name=attr if source == "file" else ref,
        factory=factory,
        kwargs=kwargs,
        batch_hook=batch_hook,
        loss_hook=loss_hook,
        source=source,
    )


def spec_from_module(module: Any) -> ModelSpec:
    """A live ``nn.Module`` as a model to estimate: every build is a deep copy of it.

    Under the tracer's FakeTensorMode the copy's parameters and buffers are fake (shapes and
    dtypes, no memory); a real run gets real copies. The module itself is never changed.
    """
    import copy

    import torch

    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"the model is a {type(module).__name__}, not a reference or a torch.nn.Module",
            'pass "resnet50", "path/to/file.py:Net", a config .toml, or an nn.Module instance',
        )

    def fresh(t: Any) -> Any:
        """A tensor like ``t`` made in the current mode and default device: fake under the tracer,
        meta for the formulas, a real copy of the values for a real run."""
        from torch._subclasses.fake_tensor import FakeTensor

        new = torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype)
        if not (new.is_meta or isinstance(new, FakeTensor)):
            with torch.no_grad():
                new.copy_(t.detach())
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(new, requires_grad=t.requires_grad)
        return new

    def factory() -> Any:
        # deepcopy with every parameter and buffer already answered: the module's own storages are never
        # copied as they are (a real storage cannot back a fake or meta tensor)
        memo: dict[int, Any] = {}
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in memo:
                memo[id(t)] = fresh(t)
        try:
            return copy.deepcopy(module, memo)
        except Exception as exc:
            raise ModelLoadError(
                f"{type(module).__name__} cannot be copied: {type(exc).__name__}: {exc}",
                "pass the class or a factory function instead (path/to/file.py:Net)",
            ) from None

    name = type(module).__name__
    return ModelSpec(
        ref=f"<{name} instance>",
        display_name=name,
        factory=factory,
        batch_hook=getattr(module, BATCH_HOOK, None),
        loss_hook=getattr(module, LOSS_HOOK, None),
        source="instance",
    )


def _split_ref(ref: str) -> tuple[str, str]:
    # a Windows drive letter ("C:\\x.py:Net") keeps its first colon
    head, sep, tail = ref.rpartition(":")
    if not sep or (len(head) == 1 and head.isalpha()):
        return ref, ""
    return head, tail


def load_config(path: Path, kwargs: dict[str, Any]) -> ModelSpec:
    """A model config file: ``[model] ref, kwargs``; ``[input] shape(s), dtype, range``; ``[workload]``."""
    data = _toml_load(path)
    model = data.get("model", {})
    if "ref" not in model:
        raise ModelLoadError(f"config {path} has no [model] ref", 'add  [model] ref = "resnet50"  (or file.py:Class)')
    ref = str(model["ref"])
    head, _ = _split_ref(ref)
    if head.endswith(".py") and not Path(head).is_absolute():  # relative to the config file
        candidate = path.parent / head
        if candidate.exists():
            ref = str(candidate) + ref[len(head) :]
    spec = load_model(ref, {**model.get("kwargs", {}), **kwargs})
    inp = data.get("input", {})
    if "shape" in inp or "shapes" in inp:
        shapes = inp.get("shapes") or [inp["shape"]]
        spec.inputs.shapes = [tuple(int(d) for d in s) for s in shapes]
    if "dtype" in inp:
        spec.inputs.dtype = str(inp["dtype"])
    if "range" in inp:
        spec.inputs.low, spec.inputs.high = int(inp["range"][0]), int(inp["range"][1])
    spec.defaults = dict(data.get("workload", {}))
    spec.display_name = str(model.get("name", path.stem))
    spec.source = "config"
    return spec


def load_hf_model(ref: str, kwargs: dict[str, Any]) -> ModelSpec:
    """``hf:<org>/<name>``, a ``config.json`` (or a folder holding one): a Hugging Face model from its config."""
    from . import hf

    model = hf.load_hf(ref, kwargs)
    return ModelSpec(
        ref=ref,
        display_name=model.name,
        factory=model.build,
        kwargs=dict(kwargs),
        inputs=InputSpec(shapes=[(model.default_seq_len,)], dtype="int64", low=0, high=model.vocab_size),
        source="hf",
        hf=model,
    )


def load_timm_model(name: str, kwargs: dict[str, Any]) -> ModelSpec:
    from . import hf

    model = hf.load_timm(name, kwargs)
    return ModelSpec(
        ref=f"timm:{name}",
        display_name=name,
        factory=model.factory,
        kwargs=dict(kwargs),
        inputs=InputSpec(shapes=[model.input_shape], dtype="float"),
        source="timm",
    )


def load_model(ref: str, kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """Resolve a model reference (see module docstring) without building the model."""
    kwargs = dict(kwargs or {})
    ref = str(ref).strip()
    if not ref:
        raise UsageError("no model given", "e.g. memprof estimate resnet50, or path/to/file.py:Net")
    if ref.startswith("hf:"):
        return load_hf_model(ref, kwargs)
    if ref.startswith("timm:"):
        return load_timm_model(ref[5:].strip(), kwargs)
    from .hf import is_hf_path

    if is_hf_path(ref):
        return load_hf_model(ref, kwargs)
    if ref.endswith(".toml"):
        path = Path(ref)
        if not path.exists():
            raise ModelLoadError(f"config file {ref} does not exist", "see configs/ for examples")
        return load_config(path, kwargs)
    head, attr = _split_ref(ref)
    if head.endswith(".py") or Path(head).suffix == ".py" or ("/" in head or "\\" in head):
        path = Path(head)
        if path.suffix != ".py":
            raise ModelLoadError(f"{head} is not a Python file", "write path/to/file.py:ClassName")
        module = _import_file(path)
        return _spec_from_module(module, attr, ref, str(path), kwargs, "file")
    if attr:
        module = _import_module(head)
        return _spec_from_module(module, attr, ref, head, kwargs, "module")
    return load_torchvision(ref, kwargs)
