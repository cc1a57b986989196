"""The one module tracker (memprof.engine.modtrack) behind the tracer, the analytic estimate and the profiler:
forward stack, backward attribution through autograd sequence numbers, errors, names, hooks removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from memprof.engine.modtrack import ModuleTracker


class _Spy(TorchDispatchMode):
    """Records, for every op, the autograd node running it and the module the tracker names."""

    def __init__(self, modules: ModuleTracker):
        super().__init__()
        self.modules = modules
        self.seen: list[tuple[str, str | None, str | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        self.seen.append((func.__name__, type(node).__name__ if node else None, self.modules.current()))
        return func(*args, **(kwargs or {}))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x)) * 2  # the multiplication is the block's own node


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), Block(), nn.Linear(8, 2))


def test_forward_stack_names_and_innermost():
    model = _net()
    seen = []
    with ModuleTracker(on_enter=lambda m, name, a, k: seen.append(name)).attach(model) as modules:
        with _Spy(modules) as spy:
            model(torch.randn(4, 8))
    assert seen == ["Sequential", "0", "1", "1.fc", "1.act", "2"]
    ops = {(op, module) for op, _, module in spy.seen}
    assert ("addmm.default", "1.fc") in ops and ("relu.default", "1.act") in ops and ("mul.Tensor", "1") in ops
    assert not modules.stack  # balanced


def test_backward_names_the_module_whose_forward_made_the_node():
    model = _net()
    x = torch.randn(4, 8)  # needs no gradient: the first layer's backward is still its own
    with ModuleTracker().attach(model) as modules:
        loss = model(x).pow(2).sum()  # pow and sum are made after the model: no module
        with _Spy(modules) as spy:
            loss.backward()
    by_node: dict[str, set] = {}
    for _, node, module in spy.seen:
        by_node.setdefault(node, set()).add(module)
    assert by_node["SumBackward0"] == {None} and by_node["PowBackward0"] == {None}
    assert by_node["ReluBackward0"] == {"1.act"} and by_node["MulBackward0"] == {"1"}
    assert by_node["AccumulateGrad"] == {None}  # made outside any forward
    addmm = [m for op, node, m in spy.seen if node == "AddmmBackward0"]
    assert set(addmm) == {"2", "1.fc", "0"} and addmm.index("2") < addmm.index("1.fc") < addmm.index("0")


def test_checkpoint_recomputation_runs_in_the_forward_stack():
    model = _net()
    x = torch.randn(4, 8, requires_grad=True)
    with ModuleTracker().attach(model) as modules:
        h = model[0](x)
        h = checkpoint(model[1], h, use_reentrant=False)
        loss = model[2](h).sum()
        with _Spy(modules) as spy:
            loss.backward()
    # the block's forward runs again inside backward (while autograd runs the first node that needs its
    # saved tensors): its ops are the recomputed modules'; the backward ops are the modules' that made the nodes
    recomputed = [(node, m) for op, node, m in spy.seen if op == "addmm.default" and m == "1.fc"]
    assert recomputed and all(node is not None for node, _ in recomputed)
    assert {m for op, _, m in spy.seen if op == "threshold_backward.default"} == {"1.act"}


def test_failed_is_the_innermost_call_that_raised():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    modules = ModuleTracker(on_enter=lambda m, name, args, k: tuple(args[0].shape))
    with pytest.raises(RuntimeError), modules.attach(model):
        model(torch.zeros(2, 5))
    assert modules.failed is not None and modules.failed.name == "0" and modules.failed.data == (2, 5)
    assert not modules.stack  # popped on the way out (always_call)
    with modules.attach(model):
        model(torch.zeros(2, 4))
    assert modules.failed is None  # reset by the next call
    for m in model.modules():  # every hook removed, also after a failure
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_global_hooks_name_every_module_that_runs():
    model = _net()
    stray = nn.Tanh()  # not in the model's tree, called inside it

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return stray(self.net(x))

    names = []
    with ModuleTracker(on_enter=lambda m, name, a, k: names.append(name)).attach():
        Outer()(torch.randn(2, 8))
    assert names == ["Outer", "Outer.net", "Outer.net.0", "Outer.net.1", "Outer.net.1.fc", "Outer.net.1.act"] + [
        "Outer.net.2",
        "Outer.<Tanh>",
    ]


def test_marks_stay_few_when_no_node_is_made():
    model = _net()
    with ModuleTracker().attach(model) as modules, torch.no_grad():
        for _ in range(100):
            model(torch.randn(2, 8))
    assert len(modules._marks) <= 2  # no autograd node made: nothing to tell apart


def test_names_of_a_shared_module_and_the_root():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    seen = []
    with ModuleTracker(on_enter=lambda m, name, a, k: seen.append(name)).attach(model, root_name="(model)"):
        model(torch.randn(1, 4))
    assert seen == ["(model)", "0", "1", "0"]  # hooked once, named by its first name
