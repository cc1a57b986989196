"""Checkpointing really changes the step: same gradients, fewer saved activations, same parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from memprof import zoo
from memprof.engine import checkpointing as C
from memprof.errors import UsageError


def tiny_gpt(dropout: float = 0.0) -> nn.Module:
    return zoo.GPT(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=dropout)


def small_resnet() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def tiny_resnet() -> nn.Module:
    """ResNet with one BasicBlock per stage (4 blocks, 4.9 M parameters): fast to build and run."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


# --------------------------------------------------------------------------- parsing and planning
@pytest.mark.parametrize(
    "text,mode",
    [
        ("none", "none"),
        ("blocks", "blocks"),
        ("per-block", "blocks"),
        ("SQRT", "sqrt"),
        ("every-3", "every-3"),
        ("every_2", "every-2"),
    ],
)
def test_parse_mode(text, mode):
    assert C.parse_mode(text) == mode


@pytest.mark.parametrize("text", ["sometimes", "every-0", "every-x"])
def test_parse_mode_rejects(text):
    with pytest.raises(UsageError) as info:
        C.parse_mode(text)
    assert info.value.hint and "blocks" in info.value.hint


def test_plan_finds_repeated_blocks():
    _, plan = C.plan_checkpointing(small_resnet(), "blocks")
    assert plan.what == "BasicBlock" and plan.count == 8
    assert plan.regions[0] == "layer1.0"
    _, plan = C.plan_checkpointing(tiny_gpt(), "blocks")
    assert plan.what == "Block" and plan.regions == ("blocks.0", "blocks.1", "blocks.2")
    _, plan = C.plan_checkpointing(zoo.UNet(base=4), "blocks")  # every _DoubleConv, bottleneck included
    assert plan.what == "_DoubleConv" and plan.count == 9 and "bottleneck" in plan.regions


def test_plan_falls_back_to_segments_for_plain_sequential():
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(8, 8), nn.ReLU())])
    _, plan = C.plan_checkpointing(model, "blocks")
    assert plan.rule.startswith("segments") and any("no repeated blocks" in n for n in plan.notes)
    _, plan = C.plan_checkpointing(model, "sqrt")  # 16 modules -> 4 segments, 3 checkpointed
    assert plan.count == 3
    _, plan = C.plan_checkpointing(model, "every-2")
    assert plan.count == 7


def test_sqrt_segments_the_block_chain():
    # 8 BasicBlocks in layer1..layer4 (2 each): segments of ceil(8 / ceil(sqrt 8)) = 3 -> one per layer,
    # the last (layer4) left plain as in checkpoint_sequential
    _, plan = C.plan_checkpointing(small_resnet(), "sqrt")
    assert plan.regions == ("layer1[0:2]", "layer2[0:2]", "layer3[0:2]")
    assert plan.describe() == "3 checkpointed segments of 3 over 8 × BasicBlock in 4 nn.Sequential"


def test_no_blocks_is_a_usage_error_with_hint():
    with pytest.raises(UsageError) as info:
        C.apply_checkpointing(zoo.Cruncher(dim=8, num_layers=2), "blocks")
    assert "no repeated blocks" in info.value.message and info.value.hint
    with pytest.raises(UsageError):
        C.apply_checkpointing(tiny_gpt(), "sqrt")


# --------------------------------------------------------------------------- same parameters
def test_parameters_stay_the_same_objects_and_tied():
    model = tiny_gpt()
    before = {name: id(p) for name, p in model.named_parameters()}
    names_before = list(model.state_dict())
    out = C.apply_checkpointing(model, "blocks")
    assert out is model
    assert {name: id(p) for name, p in model.named_parameters()} == before
    assert model.head.weight is model.wte.weight
    assert list(model.state_dict()) == names_before
    assert C.get_plan(model).count == 3 and C.is_checkpointed(model.blocks[0])


def test_deepcopy_rebinds_to_the_copy():
    model = C.apply_checkpointing(tiny_gpt(), "blocks")
    clone = copy.deepcopy(model)
    assert clone.blocks[0]._memprof_original_forward.__self__ is clone.blocks[0]
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(clone(x), model(x))


# --------------------------------------------------------------------------- same gradients
def _grads(model, x, seed=0):
    torch.manual_seed(seed)
    out = model(x)
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize(
    "factory,mode,x",
    [
        (lambda: tiny_gpt(dropout=0.1), "blocks", lambda: torch.randint(0, 64, (2, 16))),
        (lambda: zoo.UNet(base=4), "blocks", lambda: torch.randn(2, 3, 32, 32)),  # BatchNorm, skips
        (lambda: tiny_resnet(), "sqrt", lambda: torch.randn(2, 3, 32, 32)),
        (
            lambda: nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.Tanh())]),
            "sqrt",
            lambda: torch.randn(4, 16),
        ),
    ],
)
def test_checkpointed_step_gives_identical_gradients(factory, mode, x):
    torch.manual_seed(0)
    plain = factory().train()
    ckpt = C.apply_checkpointing(copy.deepcopy(plain), mode)
    inputs = x()
    loss_a, grads_a = _grads(plain, inputs)
    count = C.recompute_count()
    loss_b, grads_b = _grads(ckpt, inputs)
    assert C.recompute_count() > count  # backward really recomputed the regions
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


class _Dense(nn.Module):
    """DenseNet-style: each layer gets the growing feature list, which the block mutates afterwards."""

    class Layer(nn.Module):
        def __init__(self, cin: int):
            super().__init__()
            self.bn = nn.BatchNorm1d(cin)
            self.fc = nn.Linear(cin, 4)
            self.out = nn.Linear(4, 4)

        def forward(self, features):
            return self.out(torch.relu(self.fc(self.bn(torch.cat(features, 1)))))

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(self.Layer(8 + 4 * i) for i in range(3))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


def test_mutated_list_arguments_are_recomputed_as_passed():
    torch.manual_seed(0)
    plain = _Dense()
    ckpt = C.apply_checkpointing(copy.deepcopy(plain), "blocks")
    assert C.get_plan(ckpt).what == "Layer"
    x = torch.randn(4, 8)
    _, grads_a = _grads(plain, x)
    _, grads_b = _grads(ckpt, x)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_no_grad_forward_bypasses_checkpoint():
    model = C.apply_checkpointing(tiny_gpt(), "blocks").eval()
    count = C.recompute_count()
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 16)))
    assert C.recompute_count() == count


# --------------------------------------------------------------------------- activations drop
def _saved_bytes_after_forward(model, x) -> int:
    """Real CPU bytes alive after forward + loss that were not alive before (saved activations + output)."""
    from memprof.engine.tracking import StorageTracker

    tracker = StorageTracker()
    with tracker:
        loss = model(x).float().pow(2).mean()
        alive = tracker.current_bytes
    loss.backward()
    tracker.detach()
    return alive


@pytest.mark.parametrize(
    "factory,x,ratio",
    [
        (
            lambda: zoo.GPT(vocab_size=64, block_size=64, n_layer=6, n_head=2, n_embd=64),
            lambda: torch.randint(0, 64, (4, 64)),
            0.5,
        ),
        # the stem (conv1, bn1, relu, maxpool) is outside the blocks and stays saved
        (lambda: tiny_resnet(), lambda: torch.randn(4, 3, 64, 64), 0.7),
    ],
)
def test_real_activation_memory_drops(factory, x, ratio):
    torch.manual_seed(0)
    plain = factory()
    ckpt = C.apply_checkpointing(copy.deepcopy(plain), "blocks")
    inputs = x()
    plain_bytes = _saved_bytes_after_forward(plain, inputs)
    ckpt_bytes = _saved_bytes_after_forward(ckpt, inputs)
    assert ckpt_bytes < ratio * plain_bytes, (plain_bytes, ckpt_bytes)


def test_workload_step_runs_checkpointed_on_fake_tensors():
    """The tracer's path: build_model + train_step under FakeTensorMode with checkpointing on."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.engine.loading import load_model
    from memprof.engine.workload import Workload, prepare, train_step

    spec = load_model("memprof.zoo:GPT", dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    spec.inputs.shapes = [(16,)]
    workload = Workload(spec, batch_size=2, checkpointing="blocks")
    with FakeTensorMode():
        prepared = prepare(workload, "cpu")
        count = C.recompute_count()
        train_step(prepared)
    assert C.recompute_count() - count == 2
    assert C.get_plan(prepared.model).what == "Block"


def test_recompute_cost_counts_the_checkpointed_forward():
    from memprof.engine.loading import load_model
    from memprof.engine.workload import Workload

    spec = load_model("memprof.zoo:GPT", dict(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32))
    spec.inputs.shapes = [(16,)]
    from memprof.engine.flops import recompute_cost

    cost = recompute_cost(Workload(spec, batch_size=2, checkpointing="blocks"))
    assert cost.regions == 4
    # every block is recomputed; only the head's matmul is outside: 2*B*T*C*V FLOPs
    head = 2 * 2 * 16 * 32 * 64
    assert cost.forward_flops - cost.recompute_flops == head
    assert 0 < cost.extra_pct < 100 / 3
