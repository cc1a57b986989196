"""Loading, workload and units: the pieces every command stands on."""

from __future__ import annotations

import pytest
import torch

from memprof.engine.loading import default_loss, load_model, parse_kwargs, parse_shape
from memprof.engine.workload import Workload, get_optimizer_name, get_precision, prepare, train_step
from memprof.errors import ModelLoadError, UsageError
from memprof.units import GiB, MiB, parse_bytes


def test_parse_bytes_units():
    assert parse_bytes("24GiB") == 24 * GiB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 GiB") == int(1.5 * GiB)
    assert parse_bytes("512MiB") == 512 * MiB
    assert parse_bytes("1024") == 1024
    for bad in ("lots", "12XB", "-1GiB", "0"):
        with pytest.raises(UsageError):
            parse_bytes(bad)


def test_parse_shape_and_kwargs():
    assert parse_shape("3,224,224") == (3, 224, 224)
    assert parse_shape("3x32x32") == (3, 32, 32)
    assert parse_shape("(128)") == (128,)
    with pytest.raises(UsageError):
        parse_shape("3,a")
    assert parse_kwargs('{"num_classes": 10}', ["dropout=0.5", "name=abc"]) == {
        "num_classes": 10,
        "dropout": 0.5,
        "name": "abc",
    }
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_kwargs("{num_classes: 10}")


def test_precision_and_optimizer_names():
    assert get_precision("amp").name == "amp-fp16"
    assert get_precision("bf16").param_bytes == 2
    assert get_precision("amp-bf16").param_bytes == 4 and get_precision("amp-bf16").compute_bytes == 2
    assert get_optimizer_name("momentum") == "sgd-momentum"
    with pytest.raises(UsageError, match="unknown dtype"):
        get_precision("fp8")
    with pytest.raises(UsageError, match="unknown optimizer"):
        get_optimizer_name("lamb")


def test_unknown_torchvision_name_suggests_close_names():
    with pytest.raises(ModelLoadError) as info:
        load_model("resnet5")
    assert "resnet50" in info.value.hint


def test_presets_give_model_specific_inputs():
    assert load_model("inception_v3").inputs.shapes == [(3, 299, 299)]
    vit = load_model("vit_h_14")
    assert vit.inputs.shapes == [(3, 518, 518)] and vit.kwargs["image_size"] == 518
    assert load_model("resnet50").inputs.shapes == [(3, 224, 224)]


def test_user_file_class_kwargs_and_hooks(tmp_path):
    f = tmp_path / "net.py"
    f.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(5, width)\n"
        "    def forward(self, a, scale=1.0):\n"
        "        return self.fc(a) * scale\n"
        "def memprof_batch(batch_size, device, dtype):\n"
        "    return {'a': torch.randn(batch_size, 5, device=device, dtype=dtype), 'scale': 2.0}, "
        "torch.randn(batch_size, 3, device=device)\n"
    )
    spec = load_model(f"{f}:Net", {"width": 3})
    w = Workload(model=spec, batch_size=4, optimizer="sgd")
    prepared = prepare(w)
    assert prepared.kwargs["a"].shape == (4, 5) and prepared.target.shape == (4, 3)
    before = prepared.model.fc.weight.detach().clone()
    train_step(prepared)
    assert not torch.equal(before, prepared.model.fc.weight)  # the step really trained
    with pytest.raises(ModelLoadError, match="constructing Net"):
        load_model(f"{f}:Net").instantiate()  # width missing
    with pytest.raises(ModelLoadError, match="has no attribute 'Nett'") as info:
        load_model(f"{f}:Nett")
    assert "Net" in info.value.hint
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(f"{tmp_path}/missing.py:Net")


def test_embedding_first_model_gets_token_ids():
    spec = load_model("memprof.zoo:GPT", {"vocab_size": 100, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8})
    spec.inputs.shapes = [(16,)]
    prepared = prepare(Workload(model=spec, batch_size=3))
    (idx,) = prepared.args
    assert idx.dtype == torch.int64 and idx.shape == (3, 16) and int(idx.max()) < 100
    train_step(prepared)


def test_default_loss_handles_tuples_and_segmentation():
    logits = torch.randn(4, 10, requires_grad=True)
    aux = torch.randn(4, 10, requires_grad=True)
    seg = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = default_loss((logits, aux))
    assert loss.shape == () and torch.isclose(
        loss,
        torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
        + torch.nn.functional.cross_entropy(aux, torch.zeros(4, dtype=torch.long)),
    )
    assert default_loss({"out": seg}).shape == ()


def test_batch_size_must_be_positive():
    with pytest.raises(UsageError):
        Workload(model=load_model("resnet18"), batch_size=0)


def test_input_dtype_takes_torch_names():
    """``--input-dtype long`` is torch.long (int64), ``int`` torch.int (int32), as torch spells them."""
    from memprof.commands.workload import make_workload

    for name, canonical, dtype in (("long", "int64", torch.int64), ("torch.int", "int32", torch.int32)):
        w = make_workload("memprof.zoo:mnist_mlp", batch_size=2, input_shape=(1, 28, 28), input_dtype=name)
        assert w.model.inputs.dtype == canonical
        (x,), _, _ = w.make_batch("cpu")
        assert x.dtype == dtype
    with pytest.raises(UsageError, match="`input_dtype` must be one of"):
        make_workload("memprof.zoo:mnist_mlp", input_dtype="complex")
