"""Optimizers beyond ``torch.optim``'s classics: 8-bit and paged AdamW, Adafactor, Lion, and offloaded state.

* ``adamw8bit`` / ``paged-adamw8bit``: stand-ins for ``bitsandbytes.optim.AdamW8bit`` /
  ``PagedAdamW8bit`` that allocate exactly the state bitsandbytes allocates
  (``bitsandbytes/optim/optimizer.py``, ``Optimizer2State.init_state`` and ``get_state_buffer``,
  0.50.1): per parameter with at least ``min_8bit_size`` (4096) values two ``uint8`` states of the
  parameter's shape and two ``float32`` absmax vectors of ``ceil(n / 256)`` blocks; smaller
  parameters two ``float32`` states; the two 256-entry ``float32`` quantization maps once, moved to
  the device at the first 8-bit parameter. The update is one fused in-place kernel
  (``optimizer_update_8bit_blockwise`` / ``optimizer_update_32bit``): no temporaries, so the
  stand-in's step allocates nothing. Paged: the ``uint8`` states of parameters with at least
  100,000 values live in CUDA unified memory (``F.get_paged``: ``cudaMallocManaged``), which torch's
  allocator never sees; the tracer reports them apart (:attr:`TraceResult.paged_bytes`).
* ``lion``: the Lion update as ``lion-pytorch`` (lucidrains) performs it: one ``exp_avg`` state in the
  parameter's dtype; each step clones ``exp_avg`` and makes one more parameter-sized tensor.
* ``adafactor``: ``torch.optim.Adafactor`` (torch >= 2.5): factored second moments (a row and a column
  vector per matrix, the full variance for vectors), no first moment.
* ``adafactor-hf``: ``transformers.optimization.Adafactor`` with the settings HF ``Trainer`` uses
  (``scale_parameter=False, relative_step=False``).
* :class:`OffloadedOptimizer` (``--offload optimizer``): the optimizer steps on the CPU on fp32 master
  copies; the GPU keeps the parameters and their gradients, CPU memory the masters, the gradients
  copied there, the state and the CPU step's temporaries (:mod:`memprof.engine.placement`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from . import placement

#: bitsandbytes' Optimizer2State defaults (optim/optimizer.py, optim/adamw.py)
MIN_8BIT_SIZE = 4096
BLOCKSIZE_8BIT = 256
#: get_state_buffer: paged only for parameters with at least this many values ("> 1 MB")
PAGED_MIN_NUMEL = 100_000
QMAP_SIZE = 256


def adam8bit_state_bytes(numel: int, paged: bool = False) -> tuple[int, int]:
    """(GPU bytes, paged bytes) of bitsandbytes' AdamW8bit / PagedAdamW8bit state for one parameter
    (the two shared quantization maps, 2 KiB in all, not included)."""
    if numel < MIN_8BIT_SIZE:
        return 2 * 4 * numel, 0
    blocks = -(numel // -BLOCKSIZE_8BIT)
    states = 2 * numel
    absmax = 2 * 4 * blocks
    if paged and numel >= PAGED_MIN_NUMEL:
        return absmax, states
    return states + absmax, 0


class AdamW8bit(torch.optim.Optimizer):
    """Stand-in for ``bitsandbytes.optim.AdamW8bit`` (``paged=True``: ``PagedAdamW8bit``): its state, not its math."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, paged: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.paged = paged
        # Optimizer8bit.fill_qmap(): create_dynamic_map(signed=True / False), made on the CPU
        with placement.on("host"):
            self.qmaps: dict[str, torch.Tensor] = {
                "dynamic": torch.zeros(QMAP_SIZE, dtype=torch.float32),
                "udynamic": torch.zeros(QMAP_SIZE, dtype=torch.float32),
            }
        self._qmaps_on_device = False

    def _state_buffer(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.paged or p.numel() < PAGED_MIN_NUMEL:
            return torch.zeros_like(p, dtype=dtype)
        with placement.on("paged"):  # F.get_paged: cudaMallocManaged, a CPU tensor to torch
            return torch.zeros(p.shape, dtype=dtype, device="cpu")

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["step"] = 0
        if p.numel() < MIN_8BIT_SIZE:
            state["state1"] = self._state_buffer(p, torch.float32)
            state["state2"] = self._state_buffer(p, torch.float32)
            return
        if not self._qmaps_on_device:  # name2qmap[...] = name2qmap[...].to(p.device): the CPU copies go
            self.qmaps = {k: torch.zeros(QMAP_SIZE, dtype=torch.float32, device=p.device) for k in self.qmaps}
            self._qmaps_on_device = True
        state["state1"] = self._state_buffer(p, torch.uint8)
        state["qmap1"] = self.qmaps["dynamic"]
        state["state2"] = self._state_buffer(p, torch.uint8)
        state["qmap2"] = self.qmaps["udynamic"]
        blocks = -(p.numel() // -BLOCKSIZE_8BIT)
        state["absmax1"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
        state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self._init_state(p)
                self.state[p]["step"] += 1  # the update itself: one fused in-place CUDA kernel
        return None


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023), stepping as ``lion-pytorch``'s ``update_fn`` does, op for op."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg, grad = state["exp_avg"], p.grad
                p.mul_(1 - lr * wd)
                direction = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_()
                p.add_(direction, alpha=-lr)
                del direction
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        return None


@contextlib.contextmanager
def values_free_item() -> Iterator[None]:
    """``Tensor.item()`` on fake tensors returns 1.0 inside.

    ``torch.optim.Adafactor`` reads two norms with ``.item()`` each step to scale the update; the
    values only choose a number, never a shape or an allocation, so on fake tensors (which hold no
    values) any number traces the same memory.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    real = torch.Tensor.item

    def item(self):
        if isinstance(self, FakeTensor):
            try:
                return real(self)  # constants FakeTensorMode tracks (the step counter)
            except Exception:
                return 1.0 if self.is_floating_point() else 1
        return real(self)

    torch.Tensor.item = item  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.item = real  # type: ignore[method-assign]


def _adafactor_class():
    base = getattr(torch.optim, "Adafactor", None)
    if base is None:
        return None

    class Adafactor(base):  # type: ignore[misc, valid-type]
        """``torch.optim.Adafactor``, traceable on fake tensors (:func:`values_free_item`)."""

        @torch.no_grad()
        def step(self, closure=None):
            with values_free_item():
                return super().step(closure)

    return Adafactor


def make_adafactor(params, foreach: bool):
    cls = _adafactor_class()
    if cls is None:
        from ..errors import UsageError

        raise UsageError(
            f"`optimizer` adafactor needs torch.optim.Adafactor (torch >= 2.5; this is torch {torch.__version__})",
            "use adafactor-hf (transformers' Adafactor) or upgrade torch",
        )
    return cls(params, lr=1e-2, foreach=foreach)


def make_hf_adafactor(params):
    try:
        from transformers.optimization import Adafactor
    except ImportError:
        from ..errors import UsageError

        raise UsageError(
            "`optimizer` adafactor-hf needs the transformers package", 'pip install "memprof[hf]"'
        ) from None
    return Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)


class OffloadedOptimizer:
    """The optimizer step on the CPU (ZeRO-Offload's layout, without sharding).

    fp32 master copies of the trainable parameters live in CPU memory; each step copies the
    gradients there (fp32), runs ``inner`` (built by ``make_inner`` over the masters, with the CPU's
    default implementation) and copies the updated values back into the GPU parameters in place.
    The GPU keeps the parameters and their gradients (until ``zero_grad``), nothing else.
    """

    def __init__(self, params, make_inner):
        self.params = [p for p in params if p.requires_grad]
        with placement.on("host"):
            self.masters = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
            for m in self.masters:
                m.requires_grad_(True)
            self.inner = make_inner(self.masters)
        self.defaults = self.inner.defaults
        self.param_groups = self.inner.param_groups

    @property
    def state(self) -> dict[Any, dict[str, Any]]:
        """Per GPU parameter: its CPU master and the inner optimizer's state for it."""
        return {p: {"master": m, **self.inner.state.get(m, {})} for p, m in zip(self.params, self.masters, strict=True)}

    @torch.no_grad()
    def step(self, closure=None):
        with placement.on("host"):
            for p, m in zip(self.params, self.masters, strict=True):
                m.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32, copy=True)
            self.inner.step()
            for p, m in zip(self.params, self.masters, strict=True):
                if m.grad is None:
                    continue
                p.copy_(m if m.dtype == p.dtype and m.device == p.device else m.to(p.dtype))
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=True)
