"""Hugging Face transformers and timm models: references, the shipped catalog, inputs, loss and generation.

Model references handled here (``memprof.engine.loading`` routes them):

* ``hf:<org>/<name>``: the architecture from the model's ``config.json`` alone (never the weights),
  through ``AutoConfig``. The file comes from the local Hugging Face cache first, then from the
  catalog that ships inside memprof (``configs/hf/``, :func:`catalog`), and only then is the single
  ``config.json`` downloaded. Offline and not found: one error that lists the catalog.
* a path to a ``config.json`` (any ``*.json``), or to a model folder that holds one;
* ``timm:<name>``: a timm model, built with ``pretrained=False``.

The model is built by the caller (on fake tensors or the meta device when tracing, so a 70B config
costs no memory). ``transformers`` and ``timm`` are optional (``pip install "memprof[hf]"``) and
imported only when such a reference is used.

Training runs the way Hugging Face trains: a causal LM is called as ``model(input_ids=...,
attention_mask=..., labels=input_ids)`` and its own loss is used; a sequence-classification encoder
gets ``labels`` of shape (batch,); a seq2seq model (T5) gets ``labels`` of the target length. Token
ids are drawn from the config's vocabulary. With ``padding`` the first sample's second half is
padding: the attention mask then holds zeros, which is what makes Hugging Face build an explicit
attention mask (and the labels there are -100, as the data collators make them).

Mixture-of-experts layers route tokens by value. Under ``routing`` memprof forces the routing the
experts see (in traces and in real runs alike), so the memory follows a stated assumption:
``balanced`` (slot j of token t goes to expert (t*top_k + j) mod experts: tokens*top_k/experts each)
or ``worst`` (every token to the same top_k experts).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import MissingDependencyError, ModelLoadError, UsageError

EXTRA = 'pip install "memprof[hf]"'
#: configs/hf/ (through the package link memprof/_configs, shipped in wheels too)
CATALOG_DIR = Path(__file__).resolve().parent.parent / "_configs" / "hf"
CATALOG_FILE = CATALOG_DIR / "catalog.toml"
#: what a Hugging Face model is trained as; see :func:`default_task`
TASKS = ("causal-lm", "seq-cls", "seq2seq", "masked-lm")
#: the sequence length when none is given: this, or the model's positions when they are fewer
DEFAULT_SEQ_LEN = 2048
#: the routing assumptions for mixture-of-experts layers
ROUTINGS = ("balanced", "worst")
#: the attention implementations memprof can ask for
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
#: the KV caches generation can use (None: what the model's generation config asks for)
KV_CACHES = ("dynamic", "static")


def require(module: str, what: str) -> Any:
    """Import an optional dependency or raise the one-line error that names the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{what} needs the `{module}` package, which is not installed", f"install the extra: {EXTRA}"
        ) from None


# =========================================================================== catalog
@dataclass(frozen=True)
class CatalogEntry:
    """One shipped config: the hub name, its file under ``configs/hf/``, where it was published, its parameters."""

    name: str
    file: str
    source: str
    params: int | None = None
    aliases: tuple[str, ...] = ()
    note: str | None = None

    @property
    def path(self) -> Path:
        return CATALOG_DIR / self.file


@functools.lru_cache(maxsize=1)
def catalog() -> tuple[CatalogEntry, ...]:
    """The Hugging Face configs that ship with memprof (``configs/hf/catalog.toml``)."""
    if not CATALOG_FILE.exists():
        return ()
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    with open(CATALOG_FILE, "rb") as fh:
        data = tomllib.load(fh)
    return tuple(
        CatalogEntry(
            name=str(m["name"]),
            file=str(m["file"]),
            source=str(m["source"]),
            params=int(m["params"]) if "params" in m else None,
            aliases=tuple(str(a) for a in m.get("aliases", ())),
            note=m.get("note"),
        )
        for m in data.get("model", [])
    )


def catalog_entry(name: str) -> CatalogEntry | None:
    """The catalog entry for a hub name or one of its aliases (case-insensitive)."""
    key = name.strip().lower()
    for entry in catalog():
        if key == entry.name.lower() or key in (a.lower() for a in entry.aliases):
            return entry
    return None


def catalog_names() -> list[str]:
    return [e.name for e in catalog()]


# =========================================================================== resolving a config
def _offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the hub's host: the download library would otherwise retry for half a minute."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _not_found(name: str, why: str) -> ModelLoadError:
    names = catalog_names()
    return ModelLoadError(
        f"hf:{name}: {why}; memprof's catalog holds {', '.join(names)}",
        "use one of those, a model already in the Hugging Face cache, or a path to a config.json "
        "(or to a model folder holding one)",
    )


def resolve_hub(name: str) -> tuple[Path, str]:
    """The ``config.json`` of a hub model and where it came from: the local cache, the catalog, or a download."""
    name = name.strip().strip("/")
    if not name:
        raise UsageError("`hf:` needs a model name", "e.g. hf:meta-llama/Llama-3.1-8B")
    hub = require("huggingface_hub", f"hf:{name}")
    try:
        cached = hub.try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id: the catalog and the hub will say so below
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached), f"the local Hugging Face cache ({cached})"
    entry = catalog_entry(name)
    if entry is not None and entry.path.is_file():
        return entry.path, f"memprof's catalog (configs/hf/{entry.file}, from {entry.source})"
    if _offline():
        raise _not_found(
            name, "not in the local Hugging Face cache, not in memprof's catalog, and HF_HUB_OFFLINE is set"
        )
    if not _hub_reachable():
        raise _not_found(
            name, "not in the local Hugging Face cache nor in memprof's catalog, and the hub is unreachable"
        )
    import logging

    for logger in ("huggingface_hub", "huggingface_hub.utils._http"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        path = hub.hf_hub_download(name, "config.json", etag_timeout=5)
    except Exception as exc:
        kind = type(exc).__name__
        if "Gated" in kind:
            raise ModelLoadError(
                f"hf:{name} is a gated model: its config.json needs a Hugging Face token",
                "run `huggingface-cli login` (after accepting the license on the model's page), or pass a path "
                "to a config.json",
            ) from None
        if "RepositoryNotFound" in kind or "EntryNotFound" in kind and "LocalEntry" not in kind:
            raise _not_found(name, "the hub has no such model (or no config.json in it)") from None
        raise _not_found(name, f"downloading its config.json failed ({kind})") from None
    return Path(path), f"downloaded from the Hugging Face hub ({path})"


#: `--model-arg` keys that are not config fields: what to train the model as, and how to build it
_BUILD_OPTIONS = ("task", "experts_implementation")


def read_config(path: Path, ref: str, overrides: dict[str, Any] | None = None) -> Any:
    """``AutoConfig`` for a ``config.json``; ``overrides`` set config fields (``--model-arg num_hidden_layers=2``)."""
    transformers = require("transformers", ref)
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}", "check the path") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})", "fix the file") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(
            f"{path} is not a Hugging Face model config: it has no `model_type`",
            "point at the config.json of a transformers model",
        )
    model_type = data["model_type"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.AutoConfig.for_model(**data)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        remote = " (it needs trust_remote_code: custom code memprof does not run)" if "auto_map" in data else ""
        raise ModelLoadError(
            f"transformers {transformers.__version__} cannot build a config of model type {model_type!r}{remote}: "
            f"{first}",
            "upgrade transformers (pip install -U transformers), or pick a model whose architecture it knows",
        ) from None
    for key, value in (overrides or {}).items():
        if key in _BUILD_OPTIONS:
            continue
        if not hasattr(config, key):
            raise UsageError(
                f"`model_kwargs` {key!r} is not a field of the {model_type} config",
                "--model-arg sets config fields, e.g. --model-arg num_hidden_layers=2",
            )
        setattr(config, key, value)
    return config


# =========================================================================== the model
def _mapping_names(transformers: Any, attr: str) -> dict[str, Any]:
    auto = importlib.import_module("transformers.models.auto.modeling_auto")
    return dict(getattr(auto, attr, {}) or {})


def default_task(config: Any) -> str:
    """What to train a config as: seq2seq for encoder-decoders, causal LM for decoders, classification for encoders."""
    transformers = require("transformers", "a Hugging Face model")
    model_type = config.model_type
    causal = _mapping_names(transformers, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    masked = _mapping_names(transformers, "MODEL_FOR_MASKED_LM_MAPPING_NAMES")
    seq2seq = _mapping_names(transformers, "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES")
    seqcls = _mapping_names(transformers, "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES")
    if getattr(config, "is_encoder_decoder", False) and model_type in seq2seq:
        return "seq2seq"
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) and not a.startswith(("Bert", "Roberta")) for a in archs):
        if model_type in causal:
            return "causal-lm"
    if model_type in causal and model_type not in masked:
        return "causal-lm"
    if model_type in seqcls:
        return "seq-cls"
    if model_type in masked:
        return "masked-lm"
    if model_type in causal:
        return "causal-lm"
    raise ModelLoadError(
        f"memprof does not know how to train a {model_type!r} model (no causal-LM, seq2seq, classification "
        "or masked-LM head for it in transformers)",
        "wrap it in a file with memprof_batch() and memprof_loss() and pass file.py:factory",
    )


_AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
}


def _positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter()
        except Exception:
            return config
    return config


@dataclass
class MoEInfo:
    experts: int
    top_k: int


@dataclass
class HFModel:
    """A Hugging Face model known by its config: how to build it, feed it, train it and generate with it."""

    ref: str  # as the user wrote it
    name: str  # shown in headers
    origin: str  # where the config came from
    config: Any
    task: str
    published_params: int | None = None
    kind: str = "hf"
    notes: list[str] = field(default_factory=list)
    #: from_config keyword arguments (experts_implementation="eager" for the per-expert loop)
    build_options: dict[str, Any] = field(default_factory=dict)
    #: the attention implementation the last built model uses ("sdpa", "eager", ...)
    attn_used: str | None = None

    # -- facts from the config ----------------------------------------------------------
    @property
    def text_config(self) -> Any:
        return _text_config(self.config)

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.text_config, "vocab_size", None) or getattr(self.config, "vocab_size", 2) or 2)

    @property
    def max_positions(self) -> int | None:
        if self.task == "seq2seq" and getattr(self.config, "model_type", "") in ("t5", "mt5", "umt5", "longt5"):
            return None  # relative position buckets: any length runs (n_positions is a recommendation)
        return _positions(self.text_config)

    @property
    def default_seq_len(self) -> int:
        positions = self.max_positions
        return min(DEFAULT_SEQ_LEN, positions) if positions else DEFAULT_SEQ_LEN

    @property
    def moe(self) -> MoEInfo | None:
        c = self.text_config
        experts = next(
            (getattr(c, a) for a in ("num_local_experts", "num_experts", "n_routed_experts") if getattr(c, a, None)),
            None,
        )
        top_k = next((getattr(c, a) for a in ("num_experts_per_tok", "top_k", "moe_topk") if getattr(c, a, None)), None)
        if isinstance(experts, int) and isinstance(top_k, int) and experts > 1:
            return MoEInfo(experts, top_k)
        return None

    @property
    def num_labels(self) -> int:
        return int(getattr(self.config, "num_labels", 2) or 2)

    @property
    def can_generate(self) -> bool:
        return self.task in ("causal-lm", "seq2seq")

    def describe_inputs(self, batch: int | None, seq_len: int | None, padding: bool) -> str:
        seq = seq_len or self.default_seq_len
        ids = f"token ids {batch or '?'}×{seq} (vocabulary {self.vocab_size:,})"
        extra = " + attention mask" + (" with padding" if padding else "")
        if self.task == "seq-cls":
            extra += f" + labels ({self.num_labels} classes)"
        elif self.task == "seq2seq":
            extra += f" + labels {batch or '?'}×{seq}"
        else:
            extra += " + labels = input ids"
        return ids + extra

    # -- building -------------------------------------------------------------------------
    def build(self, attn: str | None = None) -> Any:
        """The model, built from the config on the current default device (fake/meta when tracing)."""
        transformers = require("transformers", self.ref)
        auto = getattr(transformers, _AUTO_CLASSES[self.task])
        import torch

        # in float32, whatever dtype the config names (transformers builds in it): memprof then converts the
        # model to the workload's dtype, as it does every model
        kwargs: dict[str, Any] = {"dtype": torch.float32, **self.build_options}
        if attn:
            kwargs["attn_implementation"] = attn
        transformers.logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = auto.from_config(self.config, **kwargs)
            self.attn_used = getattr(getattr(model, "config", None), "_attn_implementation", None)
            return model
        except MemoryError:
            raise
        except Exception as exc:
            if _data_dependent(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hint = "choose another --attn (sdpa or eager)" if attn and "attn" in first.lower() else None
            raise ModelLoadError(
                f"transformers {transformers.__version__} cannot build {self.name} as {_AUTO_CLASSES[self.task]}: "
                f"{type(exc).__name__}: {first}",
                hint or "upgrade transformers, or check the config (--model-arg overrides fields)",
            ) from None

    # -- one training batch -----------------------------------------------------------------
    def make_batch(self, batch: int, seq_len: int | None, device: Any, padding: bool = False) -> dict[str, Any]:
        """The keyword arguments of one training step (labels included: the model computes its own loss)."""
        import torch

        seq = seq_len or self.default_seq_len
        ids = torch.randint(0, self.vocab_size, (batch, seq), dtype=torch.long, device=device)
        mask = torch.ones((batch, seq), dtype=torch.long, device=device)
        if padding:
            mask[0, seq - seq // 2 :] = 0  # right padding: the first sample's second half
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.task == "seq-cls":
            kwargs["labels"] = torch.randint(0, self.num_labels, (batch,), dtype=torch.long, device=device)
            if getattr(self.config, "type_vocab_size", 0):
                kwargs["token_type_ids"] = torch.zeros((batch, seq), dtype=torch.long, device=device)
        elif self.task == "seq2seq":
            kwargs["labels"] = torch.randint(0, self.vocab_size, (batch, seq), dtype=torch.long, device=device)
        else:
            kwargs["labels"] = ids.masked_fill(mask == 0, -100) if padding else ids
        if self.pad_token_id is None and self.task == "seq-cls" and batch > 1:
            # sequence classification finds each sample's last token through pad_token_id
            self.config.pad_token_id = 0
        return kwargs

    @property
    def pad_token_id(self) -> int | None:
        value = getattr(self.config, "pad_token_id", None)
        return value if isinstance(value, int) else None

    @staticmethod
    def loss(output: Any, target: Any = None) -> Any:
        """The model's own loss (labels were passed)."""
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, (tuple, list)) and output:
            loss = output[0]
        if loss is None:
            raise UsageError(
                "the Hugging Face model returned no loss although labels were passed",
                "wrap it in a file with memprof_batch() and memprof_loss() and pass file.py:factory",
            )
        return loss

    # -- the step's context ---------------------------------------------------------------------
    @contextlib.contextmanager
    def step_context(self, model: Any, routing: str, fake: bool, meta: bool = False) -> Iterator[None]:
        """Around a step: quiet transformers; force the MoE routing; on fake tensors, let Hugging Face read the
        values memprof knows (attention masks, positions) instead of taking its tracing paths; on the meta
        device (the formulas' forward), make it take them (meta tensors have no values at all)."""
        transformers = require("transformers", self.ref)
        handles: list[Any] = []
        if self.moe is not None:
            handles = _force_routing(model, self.moe, routing)
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            transformers.logging.set_verbosity_error()
            if fake:
                stack.enter_context(_values_known())
            elif meta:
                stack.enter_context(_values_known(meta=True))
            try:
                yield
            finally:
                for h in handles:
                    h.remove()

    # -- generation ---------------------------------------------------------------------------
    def generate_inputs(self, batch: int, prompt: int, device: Any, padding: bool = False) -> dict[str, Any]:
        import torch

        ids = torch.randint(0, self.vocab_size, (batch, prompt), dtype=torch.long, device=device)
        mask = torch.ones((batch, prompt), dtype=torch.long, device=device)
        if padding:
            mask[0, : prompt // 2] = 0  # left padding, as generation needs it
        return {"input_ids": ids, "attention_mask": mask}

    def generate(
        self,
        model: Any,
        inputs: dict[str, Any],
        new_tokens: int,
        kv_cache: str | None,
        on_forward: Callable[[int], None] | None = None,
        on_cache: Callable[[Any], None] | None = None,
        stop_after: int | None = None,
    ) -> Any:
        """``model.generate`` greedily for exactly ``new_tokens`` tokens (no early stop at an end token).

        ``on_forward(i)`` is called before the model's i-th forward (1: the prefill); ``on_cache(cache)``
        after each forward, with the KV cache the model returned. ``stop_after`` ends the generation
        after that many tokens, everything else (a static cache's length) still sized for ``new_tokens``.
        """
        import torch

        transformers = require("transformers", self.ref)
        calls = [0]

        def pre(module: Any, args: Any, kwargs: Any) -> None:
            calls[0] += 1
            if on_forward is not None:
                on_forward(calls[0])

        def post(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            cache = getattr(output, "past_key_values", None)
            if cache is not None and on_cache is not None:
                on_cache(cache)

        handles = [
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True),
        ]
        options: dict[str, Any] = {
            "max_new_tokens": new_tokens,
            "do_sample": False,
            "eos_token_id": None,
            "num_beams": 1,
        }
        if stop_after is not None:
            prompt = int(inputs["input_ids"].shape[-1])

            criterion: Any = transformers.StoppingCriteria

            class StopAfter(criterion):
                def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                    done = input_ids.shape[-1] >= prompt + int(stop_after or 0)
                    return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

            options["stopping_criteria"] = transformers.StoppingCriteriaList([StopAfter()])
        if kv_cache == "static":
            options["cache_implementation"] = "static"
        elif kv_cache == "dynamic":
            options["cache_implementation"] = "dynamic"
        gen_config = getattr(model, "generation_config", None)
        if gen_config is not None:
            for attr in ("temperature", "top_p", "top_k"):
                if hasattr(gen_config, attr):
                    options.setdefault(attr, None)
        try:
            with torch.no_grad():
                return model.generate(**inputs, **options)
        finally:
            for h in handles:
                h.remove()


def _data_dependent(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return "DataDependent" in text or "item()" in text or "data-dependent" in text.lower()


# =========================================================================== fake tensors with known values
@contextlib.contextmanager
def _values_known(meta: bool = False) -> Iterator[None]:
    """Hugging Face asks ``is_tracing(tensor)`` before reading a mask's values, and says yes for any fake
    tensor: it then skips its shortcuts (e.g. no explicit causal mask when nothing is padded) that a real
    run takes. memprof's tracer knows the values of small integer tensors (:mod:`memprof.engine.shadow`):
    for those, the answer is the real run's. With ``meta``, meta tensors count as traced (no values)."""
    from . import shadow

    originals: list[tuple[Any, str, Any]] = []
    utils = sys.modules.get("transformers.utils.import_utils")
    original = getattr(utils, "is_tracing", None)
    if original is not None:

        def is_tracing(tensor: Any = None) -> bool:
            if meta:
                return bool(original(tensor)) or getattr(getattr(tensor, "device", None), "type", None) == "meta"
            if tensor is not None and shadow.known(tensor):
                return bool(original(None))
            return bool(original(tensor))

        for name, module in list(sys.modules.items()):
            if name.startswith("transformers") and getattr(module, "is_tracing", None) is original:
                originals.append((module, "is_tracing", original))
                setattr(module, "is_tracing", is_tracing)  # noqa: B010 - a module attribute, patched while tracing
    try:
        yield
    finally:
        for module, attr, value in originals:
            setattr(module, attr, value)


# =========================================================================== mixture of experts
def _expert_modules(model: Any, moe: MoEInfo) -> list[Any]:
    """The modules that receive ``(hidden_states, top_k_index, top_k_weights)``: Hugging Face's experts."""
    import inspect

    found = []
    for module in model.modules():
        if getattr(module, "num_experts", None) != moe.experts:
            continue
        try:
            params = list(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            continue
        if len(params) >= 3 and params[1] in ("top_k_index", "router_indices", "selected_experts"):
            found.append(module)
    return found


def forced_routing(tokens: int, moe: MoEInfo, routing: str, device: Any) -> Any:
    """The expert indices (tokens, top_k) under a routing assumption."""
    import torch

    slots = torch.arange(moe.top_k, dtype=torch.long, device=device)
    if routing == "worst":
        return slots.unsqueeze(0).expand(tokens, moe.top_k).contiguous()
    rows = torch.arange(tokens, dtype=torch.long, device=device).unsqueeze(1)
    return (rows * moe.top_k + slots.unsqueeze(0)) % moe.experts


def _force_routing(model: Any, moe: MoEInfo, routing: str) -> list[Any]:
    import torch

    def pre(module: Any, args: Any, kwargs: Any) -> Any:
        args = list(args)
        index = args[1] if len(args) > 1 else None
        key = None
        if index is None:
            key = next((k for k in ("top_k_index", "router_indices", "selected_experts") if k in kwargs), None)
            index = kwargs.get(key) if key else None
        if not isinstance(index, torch.Tensor) or index.dim() != 2:
            return None
        forced = forced_routing(index.shape[0], moe, routing, index.device).to(index.dtype)
        if key is None:
            args[1] = forced
        else:
            kwargs = dict(kwargs)
            kwargs[key] = forced
        return tuple(args), kwargs

    return [m.register_forward_pre_hook(pre, with_kwargs=True) for m in _expert_modules(model, moe)]


# =========================================================================== loading
def _display(ref: str) -> str:
    return ref.split(":", 1)[1] if ref.startswith(("hf:", "timm:")) else ref


def load_hf(ref: str, overrides: dict[str, Any] | None = None) -> HFModel:
    """``hf:<org>/<name>``, a ``config.json`` path or a folder holding one -> :class:`HFModel`."""
    overrides = dict(overrides or {})
    task = overrides.pop("task", None)
    build_options = {k: overrides.pop(k) for k in _BUILD_OPTIONS if k in overrides and k != "task"}
    published = None
    if ref.startswith("hf:"):
        name = ref[3:]
        path, origin = resolve_hub(name)
        entry = catalog_entry(name)
        published = entry.params if entry is not None and not overrides else None
        display = name
    else:
        path = Path(ref)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{ref}: no such config file", "point at a config.json or a folder that holds one")
        origin = f"the file {path}"
        display = path.parent.name if path.name == "config.json" else path.stem
    config = read_config(path, ref, overrides)
    if task is not None and task not in TASKS:
        raise UsageError(f"unknown task {task!r}", f"choose one of: {', '.join(TASKS)} (--model-arg task=causal-lm)")
    model = HFModel(
        ref=ref,
        name=display,
        origin=origin,
        config=config,
        task=task or default_task(config),
        published_params=published,
        build_options=build_options,
    )
    if model.task == "seq-cls" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    return model


@dataclass
class TimmModel:
    name: str
    input_shape: tuple[int, ...]
    factory: Callable[..., Any]


def load_timm(name: str, kwargs: dict[str, Any]) -> TimmModel:
    """``timm:<name>``: the model (never pretrained) and its default input shape."""
    timm = require("timm", f"timm:{name}")
    if not name:
        raise UsageError("`timm:` needs a model name", "e.g. timm:resnet50")
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        raise ModelLoadError(
            f"timm has no model {name!r}",
            f"did you mean {', '.join(close)}?" if close else 'run python -c "import timm; print(timm.list_models())"',
        )
    shape: tuple[int, ...] = (3, 224, 224)
    try:
        cfg = timm.get_pretrained_cfg(name)
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        if size:
            shape = tuple(int(d) for d in size)
    except Exception:
        pass

    def factory(**kw: Any) -> Any:
        return timm.create_model(name, pretrained=False, **kw)

    return TimmModel(name=name, input_shape=shape, factory=factory)


def is_hf_path(ref: str) -> bool:
    """A path to a config.json (any ``*.json``), or to a folder that holds a config.json."""
    if ref.endswith(".json"):
        return True
    path = Path(ref)
    return path.is_dir() and (path / "config.json").is_file()


# =========================================================================== KV cache formula
def kv_cache_formula(config: Any, batch: int, tokens: int, bytes_per_element: int, static: bool = False) -> int:
    """The KV cache by formula: 2 (K and V) x layers x batch x kv heads x head dim x cached tokens x bytes.

    Grouped-query attention: ``num_key_value_heads`` heads (``num_attention_heads`` without GQA).
    Sliding-window layers hold ``sliding_window`` tokens: the static cache allocates them, and the dynamic
    one keeps a view of its last ``sliding_window - 1`` tokens into the concatenation with the newest token
    (the storage of ``sliding_window`` tokens stays alive); ``tokens`` is what a full-attention layer holds.
    """
    c = _text_config(config)
    layers = int(getattr(c, "num_hidden_layers", 0) or getattr(c, "n_layer", 0) or 0)
    heads = int(getattr(c, "num_attention_heads", 0) or getattr(c, "n_head", 0) or 0)
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    hidden = int(getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0) or 0)
    head_dim = int(getattr(c, "head_dim", None) or (hidden // heads if heads else 0))
    window = getattr(c, "sliding_window", None)
    # as Hugging Face's caches read a config: its layer_types, else every layer slides when a window is set
    types = getattr(c, "layer_types", None) or [("sliding_attention" if window else "full_attention")] * layers
    total = 0
    for kind in types[:layers]:
        held = tokens
        if window and kind == "sliding_attention":
            held = min(tokens, int(window))
        total += 2 * batch * kv_heads * head_dim * held * bytes_per_element
    return total


# =========================================================================== tiny configs (validation)
_TINY = {
    "layers": (("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers"), 2),
    "hidden": (("hidden_size", "n_embd", "d_model"), 128),
    "heads": (("num_attention_heads", "n_head", "num_heads", "n_heads"), 4),
    "inner": (("intermediate_size", "ffn_dim", "d_ff", "n_inner"), 256),
}


def tiny_config(config: Any, *, layers: int = 2, hidden: int = 128, heads: int = 4, vocab: int = 1000) -> Any:
    """The same architecture at a size a CPU trains in a second: ``layers`` layers of width ``hidden``,
    ``heads`` attention heads (grouped-query heads kept grouped), a ``vocab``-token vocabulary, 4 experts
    (top-2) for mixture-of-experts models, sliding windows of 64. For validation against real CPU steps."""
    transformers = require("transformers", "tiny_config")
    data = config.to_dict()
    for key in ("_name_or_path", "architectures", "transformers_version", "auto_map"):
        data.pop(key, None)
    sizes = {"layers": layers, "hidden": hidden, "heads": heads, "inner": 2 * hidden}
    for what, (names, _) in _TINY.items():
        for name in names:
            if isinstance(data.get(name), int):
                data[name] = sizes[what]
    old_heads = next((config.to_dict().get(n) for n in _TINY["heads"][0] if config.to_dict().get(n)), heads)
    for name in ("num_key_value_heads", "num_kv_heads"):
        kv = data.get(name)
        if isinstance(kv, int) and kv:
            data[name] = heads if kv >= old_heads else (1 if kv == 1 else max(1, heads // 2))
    if isinstance(data.get("head_dim"), int):
        data["head_dim"] = hidden // heads
    if isinstance(data.get("d_kv"), int):
        data["d_kv"] = hidden // heads
    if "rotary_dim" in data and isinstance(data.get("rotary_dim"), int):
        data["rotary_dim"] = (hidden // heads) // 2
    data["vocab_size"] = vocab
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id"):
        value = data.get(name)
        if isinstance(value, int) and value >= vocab:
            data[name] = vocab - 1 - ("bos" in name)
        elif isinstance(value, list):
            data[name] = [v if v < vocab else vocab - 1 for v in value]
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(data.get(name), int) and data[name] > 1:
            data[name] = 4
    if isinstance(data.get("num_experts_per_tok"), int):
        data["num_experts_per_tok"] = 2
    for name, value in (("moe_intermediate_size", hidden // 2), ("shared_expert_intermediate_size", hidden)):
        if isinstance(data.get(name), int):
            data[name] = value
    if isinstance(data.get("sliding_window"), int):
        data["sliding_window"] = 64
    if isinstance(data.get("max_window_layers"), int):
        data["max_window_layers"] = layers
    if isinstance(data.get("layer_types"), list):
        data["layer_types"] = list(data["layer_types"])[:layers]
    if data.get("rope_scaling") and isinstance(data["rope_scaling"], dict):
        data["rope_scaling"] = dict(data["rope_scaling"])
    return transformers.AutoConfig.for_model(**data)
