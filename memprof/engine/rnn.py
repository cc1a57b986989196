"""What recurrent layers allocate inside their kernels: oneDNN's LSTM on the CPU, cuDNN's RNNs on CUDA.

No dispatch mode sees these bytes; the tracer (:mod:`memprof.engine.trace`) adds them around the
ops that make them, and lists them as modelled (:class:`memprof.results.ModelledBytes`).

oneDNN LSTM (the CPU)
---------------------
On the CPU, ``nn.LSTM`` (float32; bfloat16 where the CPU has native bf16, no ``proj_size``, no
packed sequence) runs one ``aten.mkldnn_rnn_layer`` per layer and direction
(``aten/src/ATen/native/mkldnn/RNN.cpp``). The other recurrent layers (GRU, RNN, LSTM with
``proj_size`` or a packed sequence) are decomposed into ATen cell ops the trace sees exactly.

``mkldnn_rnn_layer`` returns a *workspace* (``uint8``) saved for backward; FakeTensorMode's
meta kernel returns it empty. Its size is oneDNN's ``set_workspace_sizes`` / ``set_offsets``
(``src/cpu/rnn/rnn_utils.{hpp,cpp}``): with ``ld(n, s)`` = ``n`` rounded up to 64 bytes of
``s``-byte elements, plus 64 bytes more when that is a multiple of 256 elements (oneDNN's
``get_good_ld``), ``G`` = 4 gates, ``L`` = ``max(input_size, hidden_size)``, ``e`` the element size,
each part rounded up to a 4 KiB page::

    gates        T·B·ld(G·H, e)·e
    h states     T·B·ld(H, e)·e
    states       2·(T+1)·B·ld(L, e)·e
    c states     2·(T+1)·B·H·e
    diff layer   2·(T+1)·B·ld(L, 4)·4
    diff iter    2·(T+1)·B·ld(L, 4)·4
    diff c       2·(T+1)·B·H·4

Inside the op (freed before it returns; measured per op with torch.profiler, torch 2.14 /
oneDNN 3.12): ``bias_ih + bias_hh`` (``G·H·e``), the weights reordered to oneDNN's ``ldigo``
layout (``(I + H)·ld(G·H, e)·e``) and the scratchpad ``page(T·B·ld(G·H, s)·s) + page(B·ld(H, e)·e)
+ page(B·ld(H, 4)·4) + 4664`` (``s``: 4 forward, ``e`` backward). Backward also holds zeros for
missing ``grad_hy``/``grad_cy``, contiguous copies of strided gradients, fp32 copies of half
gradients, the weight gradients in oneDNN's padded layout where ``ld(I, 4) != I`` / ``ld(H, 4) != H``
(``G·H·ld(·, 4)·4``) and a ``G·H·4`` buffer, and returns a separate clone of the bias gradient for
``bias_hh`` (made after the scratch is freed; it is counted instead of the buffer, which has its
size). Inference (no grad) keeps no workspace; it holds the weights with ``G·H`` padded to 64
(128 for one sample) and a scratchpad of ``page(2·(T+1)·B·ld(L, e)·e) + page(2·(T+1)·B·H·e) +
page(S·B·ld(G·H, 4)·4) + page(B·ld(H, e)·e) + 4952`` with ``S`` = 1 step (every step for B = 1),
measured on 15 shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .overheads import Kind

PAGE = 4096
#: scratchpad bytes beyond the pages of its parts (pointer arrays and alignment, measured)
_SCRATCH_EXTRA = PAGE + 568
_INFERENCE_EXTRA = PAGE + 856
ONEDNN_WHAT = "oneDNN LSTM scratch"
ONEDNN_WORKSPACE_WHAT = "oneDNN LSTM workspace"
ONEDNN_SOURCE = "oneDNN rnn_utils (workspace) + per-op torch.profiler measurements (scratch), oneDNN 3.12"


def onednn_kind(what: str, verified: bool) -> Kind:
    """The modelled kind of a oneDNN LSTM allocation (verified: measured in this dtype)."""
    return Kind(what, ONEDNN_SOURCE, verified)


def _page(n: int) -> int:
    return -(-n // PAGE) * PAGE


def good_ld(dim: int, esize: int) -> int:
    """oneDNN's ``get_good_ld``: 64-byte aligned, and not a multiple of 256 elements (4K aliasing)."""
    per = 64 // esize
    ld = -(-dim // per) * per
    return ld + per if ld % 256 == 0 else ld


@dataclass(frozen=True)
class LstmShape:
    seq: int  # T
    batch: int  # B
    input_size: int  # I
    hidden: int  # H
    esize: int  # bytes per element of input/weights
    c_esize: int  # bytes per element of the cell state
    gates: int = 4


def lstm_shape(args) -> LstmShape:
    """The shape of an ``aten.mkldnn_rnn_layer`` / ``mkldnn_rnn_layer_backward`` call (input is T×B×I)."""
    x, w0 = args[0], args[1]
    hidden = int(w0.shape[0]) // 4
    cx = args[6]
    esize = x.element_size()
    return LstmShape(
        int(x.shape[0]),
        int(x.shape[1]),
        int(x.shape[2]),
        hidden,
        esize,
        cx.element_size() if cx is not None else esize,
    )


def onednn_lstm_workspace(s: LstmShape) -> int:
    """Bytes of the workspace ``mkldnn_rnn_layer`` returns in training (oneDNN's ``set_offsets``)."""
    t, b, h, e = s.seq, s.batch, s.hidden, s.esize
    widest = max(s.input_size, h)
    parts = (
        t * b * good_ld(s.gates * h, e) * e,
        t * b * good_ld(h, e) * e,
        2 * (t + 1) * b * good_ld(widest, e) * e,
        2 * (t + 1) * b * h * s.c_esize,
        2 * (t + 1) * b * good_ld(widest, 4) * 4,
        2 * (t + 1) * b * good_ld(widest, 4) * 4,
        2 * (t + 1) * b * h * 4,
    )
    return sum(_page(p) for p in parts)


def _scratchpad(s: LstmShape, scratch_esize: int) -> int:
    t, b, h, e = s.seq, s.batch, s.hidden, s.esize
    gates = t * b * good_ld(s.gates * h, scratch_esize) * scratch_esize
    return _page(gates) + _page(b * good_ld(h, e) * e) + _page(b * good_ld(h, 4) * 4) + _SCRATCH_EXTRA


def _weights_reordered(s: LstmShape) -> int:
    return (s.input_size + s.hidden) * good_ld(s.gates * s.hidden, s.esize) * s.esize


def onednn_lstm_forward_scratch(s: LstmShape, training: bool = True) -> int:
    """Bytes ``mkldnn_rnn_layer`` holds inside the op besides its outputs: bias sum, reordered weights, scratchpad."""
    bias = s.gates * s.hidden * s.esize
    if training:
        return bias + _weights_reordered(s) + _scratchpad(s, 4)
    # inference: brgemm weights (gates padded to 64, to 128 for a single sample) and a scratchpad
    # that holds the states of every step (no workspace) and one step's gates (every step's for B = 1)
    t, b, h, e = s.seq, s.batch, s.hidden, s.esize
    padded = -(-s.gates * h // (128 if b == 1 else 64)) * (128 if b == 1 else 64)
    steps = t if b == 1 else 1
    scratch = (
        _page(2 * (t + 1) * b * good_ld(max(s.input_size, h), e) * e)
        + _page(2 * (t + 1) * b * h * s.c_esize)
        + _page(steps * b * good_ld(s.gates * h, 4) * 4)
        + _page(b * good_ld(h, e) * e)
        + _INFERENCE_EXTRA
    )
    return bias + (s.input_size + h) * padded * e + scratch


def onednn_lstm_backward_scratch(args) -> int:
    """Bytes ``mkldnn_rnn_layer_backward`` holds inside the op besides its outputs."""
    s = lstm_shape(args)
    h, b, e = s.hidden, s.batch, s.esize
    hx, cx, grad_out, grad_hy, grad_cy = args[5], args[6], args[10], args[11], args[12]
    total = s.gates * h * e  # bias_ih + bias_hh
    state = b * h * e
    # zeros for missing gradients, contiguous copies of strided ones (both of the state's size)
    for grad, needed in ((grad_out, True), (grad_hy, True), (grad_cy, cx is not None)):
        if grad is None:
            if needed and grad is not grad_out:
                total += state
        elif not grad.is_contiguous():
            total += grad.numel() * grad.element_size()
    if cx is not None and hx is not None and _same_storage(hx, cx):
        total += state  # cx is cloned when it shares hx's storage
    if e != 4:  # half gradients are copied to fp32 for oneDNN
        total += s.seq * b * h * 4 + 2 * b * h * 4
    for dim in (s.input_size, h):
        if good_ld(dim, 4) != dim:  # weight gradient in oneDNN's padded layout, then reordered
            total += s.gates * h * good_ld(dim, 4) * 4
    # a G·H·4 buffer lives with the scratchpad; the bias-gradient clone the op returns (an output,
    # G·H·4 too) is made after both are freed, so the buffer is already counted by that output
    return total + _weights_reordered(s) + _scratchpad(s, e)


def _same_storage(a, b) -> bool:
    try:
        return a.untyped_storage()._cdata == b.untyped_storage()._cdata
    except Exception:  # pragma: no cover - tensors without storage
        return False


# =========================================================================== cuDNN (CUDA)
#: parts of a cuDNN RNN step whose sizes are modelled here, not taken from cuDNN
CUDNN_WORKSPACE_WHAT = "cuDNN RNN workspace"
CUDNN_RESERVE_WHAT = "cuDNN RNN reserve space"
CUDNN_DROPOUT_WHAT = "cuDNN RNN dropout state"
CUDNN_SOURCE = (
    "PyTorch aten/src/ATen/native/cudnn/RNN.cpp (what is allocated, when, and what backward keeps); "
    "sizes of cudnnGetRNNTempSpaceSizes / cudnnDropoutGetStatesSize modelled by memprof (cuDNN, unverified)"
)
CUDNN_WORKSPACE = Kind(CUDNN_WORKSPACE_WHAT, CUDNN_SOURCE)
CUDNN_RESERVE = Kind(CUDNN_RESERVE_WHAT, CUDNN_SOURCE)
CUDNN_DROPOUT = Kind(CUDNN_DROPOUT_WHAT, CUDNN_SOURCE)
#: gates per cell (cuDNN's and PyTorch's order differ, their number does not)
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
#: cuDNN keeps a dropout RNG state per device once an RNN with dropout trains ("slightly over 2MB",
#: PyTorch's get_dropout_state; cudnnDropoutGetStatesSize depends on the GPU)
CUDNN_DROPOUT_STATE_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class CudnnRnn:
    """One ``_cudnn_rnn`` call: what PyTorch passes to cuDNN."""

    mode: str  # lstm | gru | rnn_tanh | rnn_relu
    seq: int
    batch: int
    input_size: int
    hidden: int
    proj: int  # 0 = no projection
    layers: int
    directions: int
    esize: int  # element size of input and weights

    @property
    def out(self) -> int:
        return self.proj or self.hidden

    @property
    def math_esize(self) -> int:
        return max(self.esize, 4)  # PyTorch's promote_rnn_math_type: half math runs in float32

    def workspace_bytes(self) -> int:
        """Model of cuDNN's RNN workspace: one layer's input GEMM for every step, both directions, in math precision."""
        return self.directions * self.seq * self.batch * GATES[self.mode] * self.hidden * self.math_esize

    def reserve_bytes(self) -> int:
        """Model of cuDNN's training reserve space: what backward needs per layer, direction, step and sample.

        LSTM: the gates, the cell state and the output (``4H + H + out``); GRU: the gates, the
        recurrent term of the new gate and the output (``3H + H + H``); RNN: the pre-activation
        and the output (``2H``).
        """
        h = self.hidden
        per = {"lstm": 4 * h + h + self.out, "gru": 5 * h}.get(self.mode, 2 * h)
        return self.layers * self.directions * self.seq * self.batch * per * self.esize


def cudnn_rnn_function():
    """A ``torch.autograd.Function`` that allocates what ``_cudnn_rnn`` and its backward allocate, no more.

    Built lazily (imports torch). ``forward(ctx, call, hooks, x, hx, cx, *weights)``: ``call`` is a
    :class:`CudnnRnn` plus ``batch_first`` and ``train``; ``hooks.mark(tensor, what)`` labels the
    modelled storages.
    """
    import torch

    class CudnnRNN(torch.autograd.Function):
        @staticmethod
        def forward(ctx, call, hooks, batch_first, train, x, hx, cx, *weights):
            t, b = call.seq, call.batch
            seq_major = x.transpose(0, 1) if batch_first else x
            x_c = seq_major.contiguous()  # a copy when batch_first
            output = torch.empty((t, b, call.directions * call.out), dtype=x.dtype, device=x.device)
            hy = torch.empty((call.layers * call.directions, b, call.out), dtype=hx.dtype, device=x.device)
            cy = (
                torch.empty((call.layers * call.directions, b, call.hidden), dtype=cx.dtype, device=x.device)
                if cx is not None
                else torch.empty((0,), dtype=hx.dtype, device=x.device)
            )
            workspace = torch.empty((call.workspace_bytes(),), dtype=torch.uint8, device=x.device)
            hooks.mark(workspace, CUDNN_WORKSPACE)
            reserve = torch.empty((call.reserve_bytes() if train else 0,), dtype=torch.uint8, device=x.device)
            hooks.mark(reserve, CUDNN_RESERVE)
            del workspace, x_c, seq_major
            if batch_first:
                output = output.transpose(0, 1)
            ctx.call, ctx.hooks, ctx.batch_first = call, hooks, batch_first
            ctx.has_cx = cx is not None
            ctx.save_for_backward(x, hx, cx, output, reserve, *weights)
            return output, hy, cy

        @staticmethod
        def backward(ctx, grad_output, grad_hy, grad_cy):
            call, hooks, batch_first = ctx.call, ctx.hooks, ctx.batch_first
            x, hx, cx, output, _reserve, *weights = ctx.saved_tensors
            if grad_output is None:
                grad_output = torch.zeros_like(output, memory_format=torch.contiguous_format)
            if grad_hy is None:
                grad_hy = torch.zeros_like(hx, memory_format=torch.contiguous_format)
            if ctx.has_cx and grad_cy is None:
                grad_cy = torch.zeros_like(cx, memory_format=torch.contiguous_format)
            # _cudnn_rnn_backward_input
            x_c = (x.transpose(0, 1) if batch_first else x).contiguous()
            dy = (grad_output.transpose(0, 1) if batch_first else grad_output).contiguous()
            dx = torch.empty(x_c.shape, dtype=x.dtype, device=x.device)
            dhy = grad_hy.contiguous()
            dcy = grad_cy.contiguous() if ctx.has_cx else None
            dhx = torch.empty(hx.shape, dtype=hx.dtype, device=x.device)
            dcx = torch.empty(cx.shape, dtype=cx.dtype, device=x.device) if ctx.has_cx else None
            workspace = torch.empty((call.workspace_bytes(),), dtype=torch.uint8, device=x.device)
            hooks.mark(workspace, CUDNN_WORKSPACE)
            del workspace, x_c, dy, dhy, dcy, grad_output, grad_hy, grad_cy
            if batch_first:
                dx = dx.transpose(0, 1)
            grads: list = [None] * len(weights)
            if any(ctx.needs_input_grad[7:]):
                # _cudnn_rnn_backward_weight: one zeroed buffer, each weight's gradient a view of it
                x_c = (x.transpose(0, 1) if batch_first else x).contiguous()
                dw = torch.zeros((sum(w.numel() for w in weights),), dtype=weights[0].dtype, device=x.device)
                workspace = torch.empty((call.workspace_bytes(),), dtype=torch.uint8, device=x.device)
                hooks.mark(workspace, CUDNN_WORKSPACE)
                del workspace, x_c
                offset = 0
                for i, w in enumerate(weights):
                    grads[i] = dw.narrow(0, offset, w.numel()).view(w.shape)
                    offset += w.numel()
                del dw
            return None, None, None, None, dx, dhx, dcx, *grads

    return CudnnRNN


def cudnn_call(mode: str, x, hx, cx, weights, num_layers: int, bidirectional: bool, batch_first: bool) -> CudnnRnn:
    """The :class:`CudnnRnn` of an unpacked ``_VF.lstm/gru/rnn_tanh/rnn_relu`` call."""
    t, b = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    hidden, proj = int(hx.shape[2]), 0
    if cx is not None and cx.shape[2] != hx.shape[2]:  # LSTM with projections
        hidden, proj = int(cx.shape[2]), int(hx.shape[2])
    return CudnnRnn(
        mode,
        int(t),
        int(b),
        int(x.shape[2]),
        hidden,
        proj,
        int(num_layers),
        2 if bidirectional else 1,
        x.element_size(),
    )


def shape_only_rnns():
    """A context manager under which nn.LSTM/GRU/RNN return empty outputs of the right shapes at once.

    For the meta-device forward of the formulas (:mod:`memprof.engine.analytic`), which only reads
    module outputs: the real decomposition runs a few ops per time step, which takes seconds
    for long sequences even on the meta device. Packed sequences keep the real path.
    """
    import contextlib

    import torch

    @contextlib.contextmanager
    def patched():
        vf = torch._VF

        def make(mode: str):
            real = getattr(torch._C._VariableFunctions, mode)

            def call(*args, **kwargs):
                lstm = mode == "lstm"
                unpacked = len(args) == 9 and not kwargs and isinstance(args[1 if lstm else 2], (list, tuple))
                if not unpacked:
                    return real(*args, **kwargs)
                x, hidden, _params, _bias, num_layers, _dropout, _train, bidirectional, batch_first = args
                hx, cx = (hidden[0], hidden[1]) if lstm else (hidden, None)
                spec = cudnn_call(mode, x, hx, cx, (), num_layers, bidirectional, batch_first)
                t, b = (spec.batch, spec.seq) if batch_first else (spec.seq, spec.batch)
                output = x.new_empty((t, b, spec.directions * spec.out))
                hy = hx.new_empty(hx.shape)
                return (output, hy, cx.new_empty(cx.shape)) if cx is not None else (output, hy)

            return call

        for mode in GATES:
            setattr(vf, mode, make(mode))
        try:
            yield
        finally:
            for mode in GATES:
                vf.__dict__.pop(mode, None)

    return patched()
