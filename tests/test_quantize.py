"""bitsandbytes storage rules (hand-computed from its 0.50.1 source), the stand-ins, and QLoRA traces."""

from __future__ import annotations

import pytest
import torch

from memprof.commands.workload import make_workload
from memprof.engine import quantize as q
from memprof.engine.finetune import LoraSpec
from memprof.engine.optimizers import adam8bit_state_bytes
from memprof.engine.trace import trace_step


# --------------------------------------------------------------------------- storage rules
@pytest.mark.parametrize(
    ("out_f", "in_f", "expected"),
    [
        # n = out * in values; packed (n + 1) // 2 uint8; absmax ceil(n / 64) float32; code 16 float32
        (64, 64, 4096 // 2 + 4 * 64 + 64),
        (4096, 4096, 8_388_608 + 4 * 262_144 + 64),
        (1024, 4096, 2_097_152 + 4 * 65_536 + 64),
        (3, 5, 8 + 4 * 1 + 64),  # 15 values: 8 bytes (the last half empty), one partial block
        (14336, 4096, 29_360_128 + 4 * 917_504 + 64),
    ],
)
def test_4bit_layer_bytes(out_f, in_f, expected):
    assert q.layer_bytes("nf4", out_f, in_f) == expected
    assert q.layer_bytes("fp4", out_f, in_f) == expected


@pytest.mark.parametrize(
    ("out_f", "in_f", "expected"),
    [
        # double quantization: absmax uint8 (ceil(n/64)), second-level float32 per 256 blocks,
        # the 256-entry float32 dynamic map copied per layer, a float32 offset, the 16-entry code
        (4096, 4096, 8_388_608 + 262_144 + 4 * 1024 + 1024 + 4 + 64),
        (64, 64, 2048 + 64 + 4 * 1 + 1024 + 4 + 64),
        (14336, 4096, 29_360_128 + 917_504 + 4 * 3584 + 1024 + 4 + 64),
        (3, 5, 8 + 1 + 4 + 1024 + 4 + 64),
    ],
)
def test_4bit_double_quant_layer_bytes(out_f, in_f, expected):
    assert q.layer_bytes("nf4", out_f, in_f, double_quant=True) == expected


@pytest.mark.parametrize(("out_f", "in_f"), [(64, 64), (4096, 4096), (1024, 4096), (3, 5)])
def test_int8_layer_bytes(out_f, in_f):
    # int8 weight (CB) + one float32 scale per output row (SCB)
    assert q.layer_bytes("int8", out_f, in_f) == out_f * in_f + 4 * out_f


def test_8bit_optimizer_state_rules():
    # below min_8bit_size (4096 values): two float32 states
    assert adam8bit_state_bytes(4095) == (2 * 4 * 4095, 0)
    # two uint8 states + two float32 absmax per 256 values
    assert adam8bit_state_bytes(4096) == (2 * 4096 + 2 * 4 * 16, 0)
    assert adam8bit_state_bytes(4097) == (2 * 4097 + 2 * 4 * 17, 0)
    # paged: the uint8 states of tensors with at least 100,000 values go to unified memory
    assert adam8bit_state_bytes(99_999, paged=True) == (2 * 99_999 + 2 * 4 * 391, 0)
    assert adam8bit_state_bytes(1_000_000, paged=True) == (2 * 4 * 3907, 2_000_000)


# --------------------------------------------------------------------------- Llama-3-8B
LLAMA3_8B_LINEAR_VALUES = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)  # 6,979,321,856
LLAMA3_8B_ROWS = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)  # 1,376,256 output rows


def llama3_8b_meta():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _quantized_bytes(model) -> tuple[int, int]:
    layers = [m for m in model.modules() if q.is_quantized_layer(m)]
    total = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    total += sum(b.numel() * b.element_size() for m in layers for b in m.buffers(recurse=False))
    return len(layers), total


def test_llama3_8b_nf4_bytes():
    assert LLAMA3_8B_LINEAR_VALUES == 6_979_321_856
    model = llama3_8b_meta()
    n = q.apply_quantization(
        model, "nf4", double_quant=False, compute_dtype=torch.bfloat16, weight_dtype=torch.bfloat16
    )
    # transformers quantizes every nn.Linear except lm_head (the output embeddings / last module)
    assert n == 32 * 7
    assert type(model.lm_head) is torch.nn.Linear
    layers, total = _quantized_bytes(model)
    # 4 bits per value + one float32 absmax per 64 values + a 16-entry float32 code per layer
    assert total == 3_489_660_928 + 436_207_616 + 224 * 64 == 3_925_882_880


def test_llama3_8b_nf4_double_quant_bytes():
    model = llama3_8b_meta()
    q.apply_quantization(model, "nf4", double_quant=True, compute_dtype=torch.bfloat16, weight_dtype=torch.bfloat16)
    _, total = _quantized_bytes(model)
    absmax8 = LLAMA3_8B_LINEAR_VALUES // 64  # 109,051,904 uint8
    nested = 32 * 4 * (1024 + 256 + 256 + 1024 + 3 * 3584)  # float32 per 256 blocks, per layer
    assert total == 3_489_660_928 + absmax8 + nested + 224 * (1024 + 4 + 64) == 3_600_661_376


def test_llama3_8b_int8_bytes():
    model = llama3_8b_meta()
    q.apply_quantization(model, "int8", double_quant=False, compute_dtype=None, weight_dtype=torch.bfloat16)
    _, total = _quantized_bytes(model)
    assert total == LLAMA3_8B_LINEAR_VALUES + 4 * LLAMA3_8B_ROWS == 6_984_826_880


# --------------------------------------------------------------------------- traced stand-ins
def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(256, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 8),
    )


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_lora_trace_matches_the_stand_in_run_for_real(method):
    """The stand-ins run on real CPU tensors too: the trace sees what they allocate."""
    from memprof.engine.measure import measure_cpu_step

    # the loop shape this test was written for (the output dropped before backward); the plain loop: below
    lora = LoraSpec(8, 16, ("all-linear",), 0.05)
    w = make_workload(mlp(), batch_size=2048, quantize=method, lora=lora, loop="trainer")
    traced = trace_step(w, target="cpu")
    measured = measure_cpu_step(w)["peak_bytes"]
    assert abs(traced.peak_bytes - measured) <= 0.01 * measured
    weights = traced.weights
    assert weights is not None and weights.quantized_layers == 3
    assert weights.frozen_bytes + weights.quant_state_bytes >= sum(
        q.layer_bytes(method, o, i) for o, i in ((1024, 256), (1024, 1024), (8, 1024))
    )


@pytest.mark.xfail(strict=True, reason="open: int8 LoRA in a plain loop traces 11 % above the real step")
def test_quantized_lora_int8_plain_loop_matches_a_real_step():
    from memprof.engine.measure import measure_cpu_step

    w = make_workload(mlp(), batch_size=2048, quantize="int8", lora=LoraSpec(8, 16, ("all-linear",), 0.05))
    measured = measure_cpu_step(w)["peak_bytes"]
    assert abs(trace_step(w, target="cpu").peak_bytes - measured) <= 0.01 * measured


def _peak_during(fn) -> tuple[int, object]:
    from memprof.engine.tracking import StorageTracker

    tracker = StorageTracker()
    with tracker:
        result = fn()
    return tracker.peak_bytes, result


def test_4bit_forward_and_backward_allocate_what_bitsandbytes_allocates():
    """gemm_4bit's fallback (more than 1536 rows): nested absmax dequantized (two float32 vectors),
    the weight dequantized in the input dtype, F.linear; backward: one float32 absmax, the weight
    in quant_state.dtype, the matmul."""
    layer = q.Linear4bit(
        512,
        256,
        None,
        quant_type="nf4",
        double_quant=True,
        compute_dtype=torch.float32,
        weight_dtype=torch.float32,
        device="cpu",
    )
    x = torch.randn(2048, 512, requires_grad=True)
    blocks = 512 * 256 // 64
    peak, out = _peak_during(lambda: layer(x))
    assert peak == 2 * 4 * blocks + 4 * 512 * 256 + 4 * 2048 * 256
    grad = torch.ones_like(out)
    peak, _ = _peak_during(lambda: out.backward(grad))
    # the absmax goes when dequantize_4bit returns, before the matmul: weight + grad_x
    assert peak == max(4 * blocks + 4 * 512 * 256, 4 * 512 * 256 + 4 * 2048 * 512)


def test_int8_forward_keeps_the_input_and_backward_dequantizes_the_weight():
    layer = q.Linear8bitLt(512, 256, None, threshold=6.0, weight_dtype=torch.float32, device="cpu")
    x = torch.randn(2048, 512, requires_grad=True)
    rows = 2048
    peak, out = _peak_during(lambda: layer(x))
    # fp16 input copy, int8 copy, float32 row stats, abs() (fp16) and the outlier mask (bool),
    # then int32 product, fp16 dequantized result, the output in the input dtype
    quant = 2 * rows * 512 + rows * 512 + 4 * rows
    assert peak == max(
        quant + 2 * rows * 512 + rows * 512, 4 * rows * 256 + 2 * rows * 256 + 4 * rows * 256 + rows * 512 + 4 * rows
    )
    grad = torch.ones_like(out)
    peak, _ = _peak_during(lambda: out.backward(grad))
    # the int8 weight dequantized in the input dtype, a float32 row-scale column, the matmul
    assert peak == 4 * 256 * 512 + 4 * 256 + 4 * rows * 512


def test_quantize_needs_a_linear_layer():
    from memprof.errors import UsageError

    w = make_workload(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), input_shape=(3, 8, 8), quantize="nf4")
    with pytest.raises(UsageError, match="no nn.Linear"):
        trace_step(w, target="cpu")
