"""The fast fake-tensor layer (memprof/fastfake.py) gives what FakeTensorMode gives.

* whole traces: with the layer on (cold, warm, at a second batch size) the result equals the
  trace with ``MEMPROF_FAST_FAKE=0``;
* single ops through ``FastFake.run``: misses, cache hits and rule predictions build the same
  fake tensors FakeTensorMode builds, and raise where it raises;
* the rule helpers against PyTorch's own ops on real CPU tensors;
* a rule that disagrees with FakeTensorMode is never trusted.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from memprof.engine import fastfake
from memprof.engine.loading import InputSpec, ModelSpec
from memprof.engine.trace import trace_step
from memprof.engine.workload import PRECISIONS, Workload
from memprof.results import to_dict
from memprof.zoo import GPT, mnist_mlp

aten = torch.ops.aten
_CACHES = ("_FUNCS", "_CACHE", "_RETURNS", "_RULE_CLASSES")


@pytest.fixture(autouse=True)
def fresh_caches():
    """The layer's tables are shared by every trace in the process: each test starts (and leaves) them empty."""

    def clear():
        for name in _CACHES:
            table = getattr(fastfake, name, None)
            if isinstance(table, dict):
                table.clear()

    clear()
    yield
    clear()


# =========================================================================== whole traces
class TinyRes(nn.Module):
    """Conv + BatchNorm2d, a residual add, torch.cat of a channel slice, strided spatial slicing."""

    def __init__(self, channels_last: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(12, 8, 1)
        self.head = nn.Linear(8, 10)
        self.channels_last = channels_last

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = F.relu(self.bn1(self.stem(x)))
        y = F.relu(self.bn2(self.conv(h)) + h)
        z = self.mix(torch.cat([y, h[:, :4]], dim=1))[:, :, 1:-1, ::2]
        return self.head(z.mean((2, 3)))


def _spec(factory, shape, dtype="float", high=None, **kwargs) -> ModelSpec:
    name = getattr(factory, "__name__", "model")
    return ModelSpec(
        ref=name,
        display_name=name,
        factory=factory,
        kwargs=kwargs,
        inputs=InputSpec(shapes=[shape], dtype=dtype, high=high),
        source="module",
    )


def _gpt(**kw) -> ModelSpec:
    return _spec(GPT, (16,), dtype="int64", high=64, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, **kw)


def _resnet18() -> ModelSpec:
    from memprof.cli.common import build_workload

    return build_workload("resnet18", batch_size=2, input_shape=["3,24,24"]).model


AMP = PRECISIONS["amp-bf16"]
#: id -> (model spec factory, workload options, trace target, the two batch sizes)
WORKLOADS = {
    "mlp-adam-cuda": (lambda: _spec(mnist_mlp, (1, 28, 28)), dict(optimizer="adam"), "cuda", (8, 5)),
    "convnet-sgd-cpu": (lambda: _spec(TinyRes, (3, 8, 8)), dict(optimizer="sgd"), "cpu", (2, 3)),
    "convnet-channels-last-adamw-cuda": (
        lambda: _spec(TinyRes, (3, 8, 8), channels_last=True),
        dict(optimizer="adamw"),
        "cuda",
        (3, 2),
    ),
    "convnet-amp-bf16-cuda": (
        lambda: _spec(TinyRes, (3, 8, 8)),
        dict(optimizer="sgd-momentum", precision=AMP),
        "cuda",
        (2, 4),
    ),
    "convnet-eval-cpu": (lambda: _spec(TinyRes, (3, 8, 8)), dict(mode="eval"), "cpu", (2, 5)),
    "gpt-adam-cuda": (_gpt, dict(optimizer="adam"), "cuda", (2, 3)),
    "gpt-amp-bf16-cpu": (_gpt, dict(optimizer="adam", precision=AMP), "cpu", (2, 1)),
    "gpt-eval-cuda": (_gpt, dict(mode="eval"), "cuda", (3, 1)),
    # batch 1 would leave layer4's BatchNorm one value per channel; 3 x 24 x 24 is less work than 2 x 32 x 32
    "resnet18-sgd-cpu": (_resnet18, dict(optimizer="sgd"), "cpu", (2, 3)),
}


def _comparable(result, amp: bool):
    """to_dict(result) without run times; for AMP also without the timeline.

    PyTorch's autocast cache frees its casts in a nondeterministic order, so the AMP timeline can
    differ between two traces of the same step; peak, breakdown and totals may not.
    """
    drop = {"seconds", "trace_seconds"} | ({"timeline"} if amp else set())

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in drop}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(to_dict(result))


class _Recording(fastfake.FastFake):
    made: list = []

    def __init__(self, mode):
        super().__init__(mode)
        _Recording.made.append(self)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_trace_with_the_fast_layer_equals_the_plain_fake_trace(name, monkeypatch):
    make_spec, options, target, batches = WORKLOADS[name]
    workload = Workload(make_spec(), batch_size=batches[0], **options)
    amp = workload.precision.is_amp
    made = _Recording.made = []
    monkeypatch.setattr(fastfake, "FastFake", _Recording)

    monkeypatch.setenv("MEMPROF_FAST_FAKE", "0")
    plain = {b: trace_step(workload.with_batch(b), target=target) for b in batches}
    assert made == []  # switched off: no fast layer in front of FakeTensorMode
    assert not fastfake._CACHE

    monkeypatch.setenv("MEMPROF_FAST_FAKE", "1")
    for b in batches:
        for run in ("cold", "warm"):
            fast = trace_step(workload.with_batch(b), target=target)
            assert fast.op_count == plain[b].op_count > 0
            assert fast.peak_bytes == plain[b].peak_bytes, (b, run)
            assert fast.breakdown_at_peak == plain[b].breakdown_at_peak, (b, run)
            assert _comparable(fast, amp) == _comparable(plain[b], amp), (b, run)
    assert len(made) == 2 * len(batches)
    cold, warm = made[0], made[1]
    assert cold.misses > 0
    assert warm.hits > 0 and warm.misses < cold.misses  # the repeat is served from the cache
    assert warm.hits + warm.predicted > cold.hits + cold.predicted
    assert sum(f.predicted for f in made) > 0  # verified rules or the in-place shortcut were used


# =========================================================================== single ops through FastFake.run
def _meta(t):
    """What a fake tensor's consumers can see."""
    if t is None:
        return None
    if isinstance(t, (list, tuple)):
        return type(t), [_meta(x) for x in t]
    assert type(t) is FakeTensor
    return (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.fake_device, t.untyped_storage().nbytes())


def _mode_and_fast():
    mode = FakeTensorMode()
    return mode, fastfake.FastFake(mode)


def _bn_args(x):
    c = x.shape[1]
    return (x, torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c), True, 0.1, 1e-5)


def test_first_call_goes_to_fake_tensor_mode_and_a_repeat_is_a_cache_hit():
    mode, fast = _mode_and_fast()
    with mode:
        a, b = torch.empty(5, 7), torch.empty(7, 3)
        x = torch.empty(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
        conv = (x, torch.empty(8, 3, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        calls = [
            (aten.mm.default, (a, b), None),
            (aten.add.Tensor, (a, a), {"alpha": 2}),
            (aten.native_batch_norm.default, _bn_args(x), None),
            (aten.convolution.default, conv, None),
        ]
        for func, args, kwargs in calls:
            expected = _meta(func(*args, **(kwargs or {})))
            misses, hits = fast.misses, fast.hits
            first = fast.run(func, args, kwargs)
            assert (fast.misses, fast.hits) == (misses + 1, hits), func
            again = fast.run(func, args, kwargs)
            assert (fast.misses, fast.hits) == (misses + 1, hits + 1), func
            assert _meta(first) == _meta(again) == expected, func
            outs = again if isinstance(again, tuple) else (again,)
            storages = {t.untyped_storage()._cdata for t in outs}
            assert len(storages) == len(outs)  # fresh storages, one per output ...
            assert not storages & {t.untyped_storage()._cdata for t in (a, b, x)}  # ... none of them an input's
            assert all(t.fake_mode is mode for t in outs)


def test_a_rule_is_used_after_two_verified_shapes_and_matches_fake_tensor_mode():
    mode, fast = _mode_and_fast()
    with mode:
        shapes = [(2, 4, 5, 5), (3, 4, 5, 5), (6, 4, 3, 7), (1, 4, 2, 2)]
        for i, shape in enumerate(shapes):
            x = torch.empty(shape)
            expected = _meta(aten.native_batch_norm.default(*_bn_args(x)))
            before = fast.predicted
            got = fast.run(aten.native_batch_norm.default, _bn_args(x), None)
            assert _meta(got) == expected, shape
            assert fast.predicted == before + (i >= fastfake._VERIFY), shape
        classes = [v for k, v in fastfake._RULE_CLASSES.items() if k[0] is aten.native_batch_norm.default]
        assert len(classes) == 1 and classes[0] and classes[0][0] >= fastfake._VERIFY

        for i, n in enumerate((10, 12, 9, 11)):  # slice, a view rule
            x = torch.empty(n, 6)[1:]
            expected = _meta(aten.slice.Tensor(x, 0, 2, -1, 2))
            before = fast.predicted
            view = fast.run(aten.slice.Tensor, (x, 0, 2, -1, 2), None)
            assert _meta(view) == expected
            assert view.untyped_storage()._cdata == x.untyped_storage()._cdata  # a view of x's storage
            assert fast.predicted == before + (i >= fastfake._VERIFY)


def test_inplace_op_returns_its_argument_without_asking_fake_tensor_mode():
    mode, fast = _mode_and_fast()
    with mode:
        x, row = torch.empty(4, 3), torch.empty(3)
        assert fast.run(aten.add_.Tensor, (x, row), None) is x
        assert fast.run(aten.mul_.Scalar, (x, 0.5), None) is x
        xs = [torch.empty(2), torch.empty(3, 3)]
        assert fast.run(aten._foreach_add_.List, (xs, [torch.empty(2), torch.empty(3, 3)]), {"alpha": 1.0}) is None
        assert fast.predicted == 3 and fast.misses == 0
        assert _meta(x) == ((4, 3), (3, 1), 0, torch.float32, torch.device("cpu"), 48)


def _wrong_mm_rule(args, kwargs):
    a, b = args
    return (((b.shape[1], a.shape[0]), (a.shape[0], 1)),)  # transposed output


def _first_shape_only_rule():
    seen = []

    def rule(args, kwargs):
        a, b = args
        seen.append(((a.shape[0], b.shape[1]), (b.shape[1], 1)))
        return (seen[0],)  # right for the first call only

    return rule


@pytest.mark.parametrize("make_rule", [lambda: _wrong_mm_rule, _first_shape_only_rule], ids=["always-wrong", "stale"])
def test_a_rule_that_disagrees_with_fake_tensor_mode_is_never_trusted(make_rule):
    mode, fast = _mode_and_fast()
    fast._rules[("mm", "fresh")] = make_rule()
    with mode:
        for m, n in [(5, 3), (6, 4), (7, 2), (8, 9), (5, 3)]:
            a, b = torch.empty(m, 11), torch.empty(11, n)
            out = fast.run(aten.mm.default, (a, b), None)
            assert (
                _meta(out)
                == _meta(aten.mm.default(a, b))
                == ((m, n), (n, 1), 0, torch.float32, torch.device("cpu"), 4 * m * n)
            )
    cls = [k for k in fastfake._RULE_CLASSES if k[0] is aten.mm.default]
    assert len(cls) == 1 and fastfake._RULE_CLASSES[cls[0]] is False
    assert fast.predicted == 0 and fast.misses == 4 and fast.hits == 1


def test_a_wrong_pointwise_rule_is_never_trusted(monkeypatch):
    def wrong(args, kwargs):
        t = args[0]
        return ((tuple(t.shape), tuple(reversed(fastfake._contiguous_strides(tuple(reversed(t.shape)))))),)

    monkeypatch.setattr(fastfake, "_pointwise_rule", wrong)
    mode, fast = _mode_and_fast()
    with mode:
        for shape in [(4, 5), (6, 7), (3, 9), (8, 2)]:
            x = torch.empty(shape)
            assert _meta(fast.run(aten.relu.default, (x,), None)) == _meta(aten.relu.default(x))
    cls = [k for k in fastfake._RULE_CLASSES if k[0] is aten.relu.default]
    assert len(cls) == 1 and fastfake._RULE_CLASSES[cls[0]] is False
    assert fast.predicted == 0


def test_a_rule_that_pytorch_disagrees_with_for_a_whole_class_is_never_used():
    """Channels-last-3d convolutions: the conv rule gives contiguous strides, PyTorch keeps channels-last-3d."""
    if getattr(fastfake, "_conv_rule", None) is None:
        pytest.skip("fastfake has no convolution rule")
    mode, fast = _mode_and_fast()
    cl3d = torch.channels_last_3d
    with mode:
        w = torch.empty(4, 3, 3, 3, 3)
        for i, shape in enumerate([(2, 3, 4, 5, 6), (3, 3, 5, 5, 5), (2, 3, 6, 4, 4), (4, 3, 3, 3, 3)]):
            x = torch.empty(shape).contiguous(memory_format=cl3d)
            args = (x, w, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1)
            expected = aten.convolution.default(*args)
            if i == 0:  # what makes the rule wrong for this class
                assert expected.is_contiguous(memory_format=cl3d) and not expected.is_contiguous()
            assert _meta(fast.run(aten.convolution.default, args, None)) == _meta(expected)
    classes = [v for k, v in fastfake._RULE_CLASSES.items() if k[0] is aten.convolution.default]
    assert classes == [False] and fast.predicted == 0 and fast.misses == 4


def test_a_rule_that_raises_is_ignored():
    def broken(args, kwargs):
        raise IndexError("no such dimension")

    mode, fast = _mode_and_fast()
    fast._rules[("mm", "fresh")] = broken
    with mode:
        for m in (3, 4, 5):
            a, b = torch.empty(m, 2), torch.empty(2, 6)
            assert _meta(fast.run(aten.mm.default, (a, b), None)) == _meta(aten.mm.default(a, b))
    assert fast.predicted == 0 and fast.misses == 3
    assert not [k for k in fastfake._RULE_CLASSES if k[0] is aten.mm.default]


# --------------------------------------------------------------------------- edge calls: same answer or same error
def _warm_slice(run):
    for n in (7, 8, 9):  # verifies the slice rule's class (float32, 2-d, contiguous)
        run(aten.slice.Tensor, (torch.empty(n, 3), 0, 1, 5, 1), None)


def _warm_add(run):
    for shape in [(2, 4, 3), (3, 4, 3), (5, 2, 3)]:  # verifies add's class (float32, 3-d, contiguous)
        x = torch.empty(shape)
        run(aten.add.Tensor, (x, x), None)


def _edge_empty_slice(run):
    _warm_slice(run)
    return run(aten.slice.Tensor, (torch.empty(6, 3), 0, 4, 2, 1), None)


def _edge_slice_dim_out_of_range(run):
    _warm_slice(run)
    return run(aten.slice.Tensor, (torch.empty(6, 3), 2, 0, 2, 1), None)


def _edge_expand_new_leading_size1_dim(run):
    for n in (4, 5, 7):  # verifies expand's class (float32, 2-d, contiguous)
        run(aten.expand.default, (torch.empty(n, 3), [2, n, 3]), None)
    return run(aten.expand.default, (torch.empty(6, 3), [1, 6, 3]), None)  # aten: strides (18, 3, 1)


def _edge_add_size1_dim_strides(run):
    _warm_add(run)
    x = torch.empty(2, 3, 1).transpose(1, 2)  # shape (2, 1, 3), strides (3, 1, 1): "contiguous"
    return run(aten.add.Tensor, (x, x), None)


def _edge_inplace_int_plus_float(run):
    return run(aten.add_.Tensor, (torch.empty(4, 3, dtype=torch.int64), torch.empty(4, 3)), None)


def _edge_inplace_device_mismatch(run):
    return run(aten.add_.Tensor, (torch.empty(4, 3, device="cuda"), torch.empty(4, 3)), None)


def _edge_inplace_not_broadcastable(run):
    return run(aten.add_.Tensor, (torch.empty(4, 3), torch.empty(4)), None)


def _edge_foreach_tensor_lists_of_two_lengths(run):
    return run(aten._foreach_add_.List, ([torch.empty(2), torch.empty(3)], [torch.empty(2)]), None)


def _edge_foreach_scalar_list_too_short(run):
    return run(aten._foreach_add_.ScalarList, ([torch.empty(2), torch.empty(3)], [1.0]), None)


def _edge_factory_after_default_dtype_change(run):
    run(aten.full.default, ([2, 3], 1.0), {"device": torch.device("cpu"), "pin_memory": False})
    torch.set_default_dtype(torch.float64)
    try:
        return run(aten.full.default, ([2, 3], 1.0), {"device": torch.device("cpu"), "pin_memory": False})
    finally:
        torch.set_default_dtype(torch.float32)


EDGES = {name[len("_edge_") :]: fn for name, fn in dict(globals()).items() if name.startswith("_edge_")}


def _outcome(edge, run, mode):
    try:
        with mode:
            return "ok", _meta(edge(run))
    except Exception as exc:  # FakeTensorMode's own errors: the fast layer must raise them too
        return "raises", type(exc).__name__


@pytest.mark.parametrize("edge", list(EDGES))
def test_fast_layer_gives_fake_tensor_modes_answer_or_error(edge):
    plain_mode = FakeTensorMode()
    expected = _outcome(EDGES[edge], lambda f, a, k: f(*a, **(k or {})), plain_mode)
    for name in _CACHES:
        getattr(fastfake, name).clear()
    mode, fast = _mode_and_fast()
    got = _outcome(EDGES[edge], fast.run, mode)
    assert got == expected, f"{edge}: FastFake.run gives {got}, FakeTensorMode {expected}"


# =========================================================================== rule helpers vs real ops
def _helper(name):
    """A rule helper of fastfake, or skip: the module is being worked on and helpers come and go."""
    fn = getattr(fastfake, name, None)
    if fn is None:
        pytest.skip(f"fastfake.{name} no longer exists")
    return fn


def _pytorch_agrees(rule, real, fake):
    """The rule gives PyTorch's answer: the real op's, or FakeTensorMode's where the two differ (the layer's truth)."""
    return rule == real or (real != fake and rule == fake)


def _fake_of(mode, value):
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [mode.from_tensor(t) for t in value]
    return value


def _view_meta(t):
    return tuple(t.shape), tuple(t.stride()), t.storage_offset()


def _sketch_view(got):
    return None if got is None else (tuple(got[0]), tuple(got[1]), got[2])


def _slice_inputs():
    base = torch.randn(6, 10)
    return {
        "contiguous": base,
        "transposed": base.t(),
        "sliced": base[1:, ::3],
        "offset-sliced-transposed": base[2:, 1::2].t(),
        "expanded": torch.randn(1, 10).expand(6, 10),
    }


SLICE_STARTS = [None, 0, 1, 4, -1, -3, -100, 100]
SLICE_ENDS = [None, 0, 2, 5, -1, -2, -100, 100]
SLICE_STEPS = [1, 2, 3, 7]


def _slice_cases(empty: bool):
    for (name, x), dim, start, end, step in itertools.product(
        _slice_inputs().items(), [0, 1, -1, -2], SLICE_STARTS, SLICE_ENDS, SLICE_STEPS
    ):
        real = aten.slice.Tensor(x, dim, start, end, step)
        if (real.numel() == 0) == empty:
            yield name, x, (dim, start, end, step), real


def test_slice_rule_matches_aten_slice():
    rule = _helper("_slice_rule")
    checked = 0
    for name, x, args, real in _slice_cases(empty=False):
        assert _sketch_view(rule((x, *args), {})) == _view_meta(real), (name, args)
        checked += 1
    assert checked > 500
    x = torch.randn(4, 6)[:, 1:]  # fewer arguments: the schema's defaults
    assert _sketch_view(rule((x,), {})) == _view_meta(aten.slice.Tensor(x))
    assert _sketch_view(rule((x, 1), {})) == _view_meta(aten.slice.Tensor(x, 1))
    assert _sketch_view(rule((x, 1, 2), {})) == _view_meta(aten.slice.Tensor(x, 1, 2))


def test_slice_rule_matches_aten_slice_for_empty_results():
    rule = _helper("_slice_rule")
    wrong = []
    for name, x, args, real in _slice_cases(empty=True):
        got = _sketch_view(rule((x, *args), {}))
        if got is not None and got != _view_meta(real):
            wrong.append((name, args, _view_meta(real), got))
    assert not wrong, f"{len(wrong)} empty slices differ, e.g. (input, args, aten, rule): {wrong[:3]}"


def test_slice_rule_declines_what_it_cannot_answer():
    rule = _helper("_slice_rule")
    x = torch.randn(4, 6)
    assert rule((x, 1, 0, 4, 0), {}) is None  # step 0 is an error in aten
    assert rule((x, 1, 0, 4, -1), {}) is None
    assert rule((torch.tensor(1.0), 0, 0, 1, 1), {}) is None  # 0-dim
    assert rule((x, 1, 0, 4), {"step": 1}) is None


# --------------------------------------------------------------------------- the other view rules
VIEW_INPUTS = {
    "contiguous": lambda: torch.randn(2, 3, 4),
    "offset": lambda: torch.randn(5, 3, 4)[1:3],
    "permuted": lambda: torch.randn(4, 3, 2).permute(2, 1, 0),
    "size-1-dim": lambda: torch.randn(2, 3, 1).transpose(1, 2),
    "leading-1": lambda: torch.randn(1, 3, 4),
    "expanded": lambda: torch.randn(1, 3, 1).expand(2, 3, 4),
    "1-d": lambda: torch.randn(5),
    "0-dim": lambda: torch.tensor(1.0),
    "empty": lambda: torch.randn(0, 3),
}


def _view_calls(rule_name):
    """(input name, aten op, arguments) for valid calls of the views a rule answers."""
    for name, make in VIEW_INPUTS.items():
        x = make()
        n = x.dim()
        if rule_name == "_unsqueeze_rule":
            for d in range(-n - 1, n + 1):
                yield name, aten.unsqueeze.default, (x, d)
        elif rule_name == "_transpose_rule":
            for a, b in itertools.product(range(-n, n), repeat=2):
                yield name, aten.transpose.int, (x, a, b)
        elif rule_name == "_permute_rule":
            for p in itertools.permutations(range(n)):
                yield name, aten.permute.default, (x, list(p))
            if n:
                yield name, aten.permute.default, (x, list(range(-n, 0)))
        elif rule_name == "_t_rule" and n <= 2:
            yield name, aten.t.default, (x,)
        elif rule_name == "_same_view_rule":
            yield name, aten.detach.default, (x,)
            yield name, aten.alias.default, (x,)
        elif rule_name == "_select_rule":
            for d in range(-n, n):
                for i in range(-x.shape[d], x.shape[d]):
                    yield name, aten.select.int, (x, d, i)
        elif rule_name == "_expand_rule":
            for lead in ([], [1], [2], [1, 1], [3, 1]):
                for keep in itertools.product(*[(s, -1) + ((4,) if s == 1 else ()) for s in x.shape]):
                    yield name, aten.expand.default, (x, lead + list(keep))
        elif rule_name == "_view_rule" and x.is_contiguous():
            numel = x.numel()
            shapes = [[numel], [-1], [1, numel], [numel, 1], [1, -1, 1]]
            shapes += [[2, -1], [numel // 2, 1, 2]] if numel % 2 == 0 and numel else []
            shapes += [[3, 0], [0, 1, 3]] if numel == 0 else []
            for shape in shapes:
                yield name, aten.view.default, (x, shape)
                yield name, aten._unsafe_view.default, (x, shape)
        elif rule_name == "_as_strided_rule" and x.untyped_storage().nbytes() // x.element_size() >= 4:
            yield name, aten.as_strided.default, (x, [2], [1], 1)
            yield name, aten.as_strided.default, (x, [2, 2], [1, 2])
            yield name, aten.as_strided.default, (x, [3], [1], None)


VIEW_RULES = [
    "_unsqueeze_rule",
    "_transpose_rule",
    "_permute_rule",
    "_t_rule",
    "_same_view_rule",
    "_select_rule",
    "_expand_rule",
    "_view_rule",
    "_as_strided_rule",
]


@pytest.mark.parametrize("rule_name", VIEW_RULES)
def test_view_rules_match_real_views(rule_name):
    rule = _helper(rule_name)
    mode = FakeTensorMode()
    wrong, answered = [], 0
    for name, func, args in _view_calls(rule_name):
        got = _sketch_view(rule(args, {}))
        if got is None:
            continue
        answered += 1
        real = _view_meta(func(*args))
        with mode:
            fake = _view_meta(func(*[_fake_of(mode, a) for a in args]))
        if not _pytorch_agrees(got, real, fake):
            wrong.append((name, _view_meta(args[0]), args[1:], "aten", real, "rule", got))
    assert answered >= 3  # the rule answers the plain cases
    assert not wrong, f"{len(wrong)} calls differ, e.g. (input, its metadata, args, ...): {wrong[:3]}"


DIM_OUT_OF_RANGE = {  # rule -> (aten op, arguments for a 4 x 3 tensor x), every call an IndexError in aten
    "_slice_rule": (aten.slice.Tensor, lambda x: (x, 2, 0, 1, 1)),
    "_transpose_rule": (aten.transpose.int, lambda x: (x, 0, 2)),
    "_permute_rule": (aten.permute.default, lambda x: (x, [1, 2])),
    "_unsqueeze_rule": (aten.unsqueeze.default, lambda x: (x, 3)),
    "_select_rule": (aten.select.int, lambda x: (x, 2, 0)),
    "_cat_rule": (aten.cat.default, lambda x: ([x, x], 2)),
}


@pytest.mark.parametrize("rule_name", list(DIM_OUT_OF_RANGE))
def test_rules_give_no_answer_for_a_dimension_out_of_range(rule_name):
    """aten raises IndexError; a rule that answers lets a verified class hide the error (see the edge tests)."""
    rule = _helper(rule_name)
    func, make_args = DIM_OUT_OF_RANGE[rule_name]
    args = make_args(torch.randn(4, 3))
    with pytest.raises(IndexError):
        func(*args)
    try:
        got = rule(args, {})
    except (IndexError, ValueError, TypeError):
        got = None
    shown = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
    assert got is None, f"{rule_name}{shown} answered {got}; aten raises IndexError"


# --------------------------------------------------------------------------- pointwise
POINTWISE_INPUTS = {
    "contiguous": lambda: torch.randn(2, 3, 4, 5),
    "channels-last": lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
    "channels-last-3d": lambda: torch.randn(2, 3, 2, 4, 5).contiguous(memory_format=torch.channels_last_3d),
    "transposed": lambda: torch.randn(6, 10).t(),
    "permuted": lambda: torch.randn(2, 3, 4, 5).permute(3, 1, 0, 2),
    "sliced": lambda: torch.randn(6, 10)[1:, ::3],
    "sliced-transposed": lambda: torch.randn(6, 10)[:, ::2].t(),
    "expanded": lambda: torch.randn(1, 10).expand(6, 10),
    "0-dim": lambda: torch.tensor(3.0),
    "empty": lambda: torch.randn(0, 3),
    "channels-last-1x1": lambda: torch.randn(4, 8, 1, 1).contiguous(memory_format=torch.channels_last),
    "unsqueezed": lambda: torch.randn(2, 3).unsqueeze(1),
    "size-1-dim-transposed": lambda: torch.randn(2, 3, 1).transpose(1, 2),
    "size-1-dim-permuted-4d": lambda: torch.randn(1, 3, 2, 1).permute(0, 2, 3, 1),
}


def _pointwise_check(rule, x, y):
    real = torch.add(x, y)
    mode = FakeTensorMode()
    with mode:
        fake = aten.add.Tensor(mode.from_tensor(x), mode.from_tensor(y))
    got = rule((x, y), {})
    assert got is not None and len(got) == 1, (x.stride(), y.stride())
    got = (tuple(got[0][0]), tuple(got[0][1]))
    assert _pytorch_agrees(got, (tuple(real.shape), real.stride()), (tuple(fake.shape), fake.stride())), (
        x.stride(),
        y.stride(),
        "rule",
        got[1],
        "torch.add",
        real.stride(),
        "FakeTensorMode",
        fake.stride(),
    )


@pytest.mark.parametrize("layout", list(POINTWISE_INPUTS))
def test_pointwise_rule_matches_torch_add(layout):
    x = POINTWISE_INPUTS[layout]()
    _pointwise_check(_helper("_pointwise_rule"), x, x)


def test_pointwise_rule_matches_torch_add_for_mixed_layouts_and_0dim_operands():
    rule = _helper("_pointwise_rule")
    layouts = {
        "contiguous": lambda: torch.randn(2, 3, 4, 5),
        "channels-last": lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
        "permuted-dense": lambda: torch.randn(5, 3, 2, 4).permute(2, 1, 3, 0),
        "sliced": lambda: torch.randn(2, 3, 4, 10)[..., ::2],
        "expanded": lambda: torch.randn(2, 3, 4, 1).expand(2, 3, 4, 5),
    }
    for (a, make_a), (b, make_b) in itertools.product(layouts.items(), repeat=2):
        if a != b:
            _pointwise_check(rule, make_a(), make_b())
    for make in layouts.values():
        _pointwise_check(rule, make(), torch.tensor(2.0))
        _pointwise_check(rule, torch.tensor(2.0), make())


def test_pointwise_rule_declines_broadcasting_and_lists():
    rule = _helper("_pointwise_rule")
    x = torch.randn(4, 5)
    assert rule((x, torch.randn(5)), {}) is None  # broadcasting
    assert rule((x, torch.randn(4, 1)), {}) is None
    assert rule(([x, x], [x, x]), {}) is None  # foreach lists
    assert rule((2.0, 3.0), {}) is None  # no tensor


# --------------------------------------------------------------------------- batch norm, layer norm, matmuls
BN_INPUTS = {
    "contiguous-4d": lambda: torch.randn(4, 3, 5, 5),
    "channels-last": lambda: torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last),
    "channels-last-1x1": lambda: torch.randn(4, 8, 1, 1).contiguous(memory_format=torch.channels_last),
    "batch-1": lambda: torch.randn(1, 3, 5, 5),
    "2d": lambda: torch.randn(6, 3),
    "3d": lambda: torch.randn(6, 3, 7),
    "5d": lambda: torch.randn(2, 3, 2, 4, 5),
    "channels-last-3d": lambda: torch.randn(2, 3, 2, 4, 5).contiguous(memory_format=torch.channels_last_3d),
}
MASKS = [[True, True, True], [True, False, False], [False, True, True], [True, True, False], [False, False, False]]


def _out_meta(outs):
    if isinstance(outs, torch.Tensor):
        outs = (outs,)
    return tuple(None if t is None else (tuple(t.shape), tuple(t.stride())) for t in outs)


def _rule_meta(sketch):
    return tuple(None if s is None else (tuple(s[0]), tuple(s[1])) for s in sketch)


def _real_and_fake(func, args):
    real = _out_meta(func(*args))
    mode = FakeTensorMode()
    with mode:
        fake = _out_meta(func(*[_fake_of(mode, a) for a in args]))
    return real, fake


def _rule_check(rule, func, args):
    got = rule(args, {})
    if got is None:
        return False
    real, fake = _real_and_fake(func, args)
    assert _pytorch_agrees(_rule_meta(got), real, fake), (func, _rule_meta(got), "aten", real, "fake", fake)
    return True


@pytest.mark.parametrize("layout", list(BN_INPUTS))
def test_batch_norm_rules_match_native_batch_norm_and_its_backward(layout):
    rule, backward_rule = _helper("_batch_norm_rule"), _helper("_batch_norm_backward_rule")
    x = BN_INPUTS[layout]()
    args = _bn_args(x)
    assert _rule_check(rule, aten.native_batch_norm.default, args)
    out, mean, invstd = aten.native_batch_norm.default(*args)
    assert _out_meta((mean, invstd)) == (((x.shape[1],), (1,)),) * 2  # saved mean and inverse std

    for grad in (torch.randn_like(out), torch.randn(out.shape)):
        for mask in MASKS:
            bargs = (grad, x, args[1], args[3], args[4], mean, invstd, True, 1e-5, mask)
            answered = _rule_check(backward_rule, aten.native_batch_norm_backward.default, bargs)
            assert answered == (grad.stride() == x.stride()), mask  # only for a gradient laid out like the input


def test_batch_norm_rules_decline_eval_mode_and_odd_layouts():
    rule, backward_rule = _helper("_batch_norm_rule"), _helper("_batch_norm_backward_rule")
    x = torch.randn(4, 3, 5, 5)
    args = list(_bn_args(x))
    args[5] = False  # running statistics: other outputs
    assert rule(tuple(args), {}) is None
    odd = torch.randn(4, 5, 5, 3).permute(0, 3, 1, 2).transpose(2, 3)
    assert rule(_bn_args(odd), {}) is None
    out, mean, invstd = aten.native_batch_norm.default(*_bn_args(x))
    bargs = (out, x, args[1], args[3], args[4], mean, invstd, False, 1e-5, [True, True, True])
    assert backward_rule(bargs, {}) is None


LN_INPUTS = {
    "3d": lambda: torch.randn(2, 5, 8),
    "2d": lambda: torch.randn(4, 8),
    "4d": lambda: torch.randn(2, 3, 4, 8),
    "batch-1": lambda: torch.randn(1, 1, 8),
    "transposed": lambda: torch.randn(5, 2, 8).transpose(0, 1),
}


@pytest.mark.parametrize("layout", list(LN_INPUTS))
def test_layer_norm_rules_match_native_layer_norm_and_its_backward(layout):
    rule, backward_rule = _helper("_layer_norm_rule"), _helper("_layer_norm_backward_rule")
    x = LN_INPUTS[layout]()
    for k, affine in itertools.product((1, 2), (True, False)):
        norm = list(x.shape[-k:])
        weight, bias = (torch.randn(norm), torch.randn(norm)) if affine else (None, None)
        args = (x, norm, weight, bias, 1e-5)
        assert _rule_check(rule, aten.native_layer_norm.default, args)
        out, mean, rstd = aten.native_layer_norm.default(*args)
        for mask in MASKS:
            if not affine and (mask[1] or mask[2]):
                continue  # no weight, no weight gradient: autograd never asks (and aten raises)
            bargs = (torch.randn_like(out), x, norm, mean, rstd, weight, bias, mask)
            assert _rule_check(backward_rule, aten.native_layer_norm_backward.default, bargs)
    assert rule((x, [7], None, None, 1e-5), {}) is None  # not the trailing shape


def test_matmul_rule_matches_mm_addmm_and_bmm():
    rule = _helper("_mm_rule")
    for m, k, n in [(3, 4, 5), (1, 4, 5), (3, 1, 5), (3, 4, 1), (1, 1, 1), (0, 4, 5)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for a_, b_ in itertools.product((a, a.t().contiguous().t()), (b, b.t().contiguous().t())):
            assert _rule_check(rule, aten.mm.default, (a_, b_))
            assert _rule_check(rule, aten.addmm.default, (torch.randn(n), a_, b_))
            assert _rule_check(rule, aten.addmm.default, (torch.randn(m, n), a_, b_))
            assert _rule_check(rule, aten.bmm.default, (a_[None].expand(2, m, k), b_[None].expand(2, k, n)))
        assert _rule_check(rule, aten.bmm.default, (torch.randn(2, k, m).transpose(1, 2), torch.randn(2, k, n)))
    assert rule((torch.randn(3, 4), torch.randn(5, 6)), {}) is None  # inner sizes differ: aten's error
    assert rule((torch.randn(2, 3, 4), torch.randn(4, 6)), {}) is None


CONV_CASES = [  # (input shape, weight shape, stride, padding, dilation, groups)
    ((2, 3, 8, 8), (6, 3, 3, 3), 1, 1, 1, 1),
    ((1, 4, 5, 7), (4, 4, 1, 1), 2, 0, 1, 1),
    ((2, 3, 9, 9), (6, 3, 3, 3), 2, 1, 2, 1),
    ((2, 4, 6, 6), (8, 1, 3, 3), 1, 1, 1, 4),  # depthwise
    ((2, 8, 1, 1), (4, 8, 1, 1), 1, 0, 1, 1),  # 1x1 spatial
    ((2, 3, 10), (4, 3, 3), 1, 1, 1, 1),  # conv1d
    ((2, 3, 4, 5, 6), (4, 3, 3, 3, 3), 1, 1, 1, 1),  # conv3d
]


@pytest.mark.parametrize("formats", ["contiguous", "channels-last-input", "channels-last-weight", "channels-last"])
def test_convolution_rules_match_convolution_and_its_backward(formats):
    rule, backward_rule = _helper("_conv_rule"), _helper("_conv_backward_rule")
    answered = 0
    for xs, ws, stride, padding, dilation, groups in CONV_CASES:
        x, w = torch.randn(xs), torch.randn(ws)
        if len(xs) == 4 and formats in ("channels-last-input", "channels-last"):
            x = x.contiguous(memory_format=torch.channels_last)
        if len(xs) == 4 and formats in ("channels-last-weight", "channels-last"):
            w = w.contiguous(memory_format=torch.channels_last)
        n = len(xs) - 2
        args = (x, w, None, [stride] * n, [padding] * n, [dilation] * n, False, [0] * n, groups)
        answered += _rule_check(rule, aten.convolution.default, args)
        out = aten.convolution.default(*args)
        for grad in (torch.randn_like(out), torch.randn(out.shape)):
            for mask in ([True, True, True], [False, True, True], [True, True, False]):
                bargs = (grad, x, w, [ws[0]], *args[3:9], mask)
                answered += _rule_check(backward_rule, aten.convolution_backward.default, bargs)
    assert answered == len(CONV_CASES) * 7


def test_convolution_rule_declines_transposed_convolutions():
    rule = _helper("_conv_rule")
    x, w = torch.randn(2, 3, 5, 5), torch.randn(3, 4, 3, 3)
    assert rule((x, w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1), {}) is None


def test_cat_rule_matches_cat():
    rule = _helper("_cat_rule")
    cases = [
        ([(2, 3, 4, 5), (2, 1, 4, 5)], 1),
        ([(2, 3, 4, 5)] * 3, 0),
        ([(4, 3), (4, 2), (4, 1), (4, 5)], 1),
        ([(4, 3), (0, 3)], 0),
        ([(4, 3), (4, 3)], -1),
        ([(2, 3, 1, 1), (2, 5, 1, 1)], 1),
        ([(7,)], 0),
        ([(3,), (5,)], 0),
        ([(2, 3, 4)] * 2, -2),
    ]
    for shapes, dim in cases:
        for dtypes in ([torch.float32] * len(shapes), [torch.float32] + [torch.bfloat16] * (len(shapes) - 1)):
            tensors = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes, strict=False)]
            assert _rule_check(rule, aten.cat.default, (tensors, dim)), (shapes, dim)
    cl = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert rule(([cl, cl], 1), {}) is None  # not contiguous: FakeTensorMode decides
    assert rule(([torch.randn(2, 3), torch.randn(3, 3)], 1), {}) is None  # sizes differ off the cat dimension


# --------------------------------------------------------------------------- in-place arguments
def test_inplace_ok_accepts_broadcastable_arguments_and_refuses_the_rest():
    inplace_ok = _helper("_inplace_ok")
    real = torch.randn(4, 3)
    mode = FakeTensorMode()
    ok = lambda *args, **kwargs: inplace_ok(args, kwargs, FakeTensor)  # noqa: E731
    with mode:
        x = torch.empty(4, 3)
        for other in (
            torch.empty(4, 3),
            torch.empty(3),
            torch.empty(1, 3),
            torch.empty(4, 1),
            torch.empty(()),
            torch.empty(1, 1),
        ):
            assert ok(x, other), tuple(other.shape)
        assert ok(x, 2.0) and ok(x) and ok(x, x, alpha=0.5)
        for other in (torch.empty(4), torch.empty(2, 3), torch.empty(1, 4, 3), torch.empty(3, 1, 1)):
            assert not ok(x, other), tuple(other.shape)
        assert not ok(x, other=torch.empty(4))
        assert not ok(x, real)  # a real tensor: FakeTensorMode decides
        assert not ok(x, [torch.empty(3)])
        assert not ok(2.0, x)
        assert not ok()

        a, b = torch.empty(2, 3), torch.empty(5)
        assert ok([a, b], [torch.empty(2, 3), torch.empty(5)])
        assert ok([a, b], [torch.empty(3), torch.empty(1)])
        assert ok([a, b], torch.empty(()))  # one 0-dim tensor for all
        assert ok([a, b], 2.0) and ok([a, b], [1.0, 2.0])
        assert not ok([a, b], [torch.empty(2, 3)])  # shorter list
        assert not ok([a, b], [torch.empty(2, 3), torch.empty(5), torch.empty(5)])  # longer list
        assert not ok([a, b], [torch.empty(5), torch.empty(2, 3)])  # not broadcastable pairwise
        assert not ok([a, b], torch.empty(3))  # a 1-d tensor for a list
        assert not ok([a, 2.0], [a, b])
        assert not ok([], [])


def test_inplace_ok_refuses_a_scalar_list_of_another_length():
    inplace_ok = _helper("_inplace_ok")
    mode = FakeTensorMode()
    with mode:
        tensors = [torch.empty(2, 3), torch.empty(5)]
        for scalars in ([1.0], [1.0, 2.0, 3.0]):
            with pytest.raises(RuntimeError):  # what PyTorch does with it
                aten._foreach_add_.ScalarList(tensors, scalars)
            assert not inplace_ok((tensors, scalars), {}, FakeTensor), scalars


def test_clone_to_a_memory_format_follows_the_format_not_the_input():
    """clone(x, memory_format=contiguous) of a permuted dense input is contiguous, whatever came before.

    Regression: the pointwise rule answered clone like an elementwise op (the input's strides), and two
    calls of one class that happened to agree (an already-contiguous layout) made it trusted; a later
    permuted input of the same class then kept its strides and a view in attention's backward failed.
    """
    mode, fast = _mode_and_fast()
    kwargs = {"memory_format": torch.contiguous_format}
    with mode:
        # Llama's repeat_kv: an expanded key/value made contiguous (two classes-mates of different shapes)
        inputs = [torch.empty(n, 2, 1, 256, 32).expand(n, 2, 2, 256, 32) for n in (32, 62, 7)]
        inputs.append(torch.empty(3, 2, 4, 24, 8).permute(1, 3, 0, 2, 4))  # strides (768, 8, 1536, 192, 1)
        for x in inputs:
            expected = _meta(aten.clone.default(x, **kwargs))
            got = fast.run(aten.clone.default, (x,), kwargs)
            assert _meta(got) == expected, x.stride()
