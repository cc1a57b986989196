"""Frozen parts and LoRA: traced on fake tensors against real CPU steps, and peft's own parameter counts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from memprof.commands.workload import make_workload
from memprof.engine.finetune import LoraSpec, apply_lora, parse_targets, weight_breakdown
from memprof.engine.loading import InputSpec, ModelSpec
from memprof.engine.measure import CpuCapRunner, measure_cpu_step
from memprof.engine.trace import trace_step
from memprof.errors import UsageError
from memprof.results import MemCategory

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (memprof[peft])")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )


def _close(traced: int, measured: int, tol: float = 0.01) -> bool:
    return abs(traced - measured) <= tol * measured


# --------------------------------------------------------------------------- frozen parts
@pytest.mark.parametrize("levers", [{"freeze": ("0",)}, {"train_only": ("4",)}, {"freeze": ("0", "2.weight")}])
def test_frozen_layers_trace_matches_a_real_cpu_step(levers):
    w = make_workload(mlp(), batch_size=64, **levers)
    traced = trace_step(w, target="cpu")
    measured = measure_cpu_step(w)
    assert _close(traced.peak_bytes, measured["peak_bytes"]), (traced.peak_bytes, measured)


def test_activations_upstream_of_the_first_trainable_layer_are_not_kept():
    # a loop that drops the output before backward (the plain loop also keeps the 64 x 10 logits)
    full = trace_step(make_workload(mlp(), batch_size=64, loop="trainer"), target="cpu")
    last = trace_step(make_workload(mlp(), batch_size=64, train_only=["4"], loop="trainer"), target="cpu")
    # only the last Linear trains: it keeps its input (64 x 512 fp32, the second ReLU's output);
    # nothing upstream needs a gradient, so the first ReLU's output (the middle Linear's input,
    # which full training keeps for both the ReLU's and the Linear's backward) is not saved
    kept = last.totals[MemCategory.ACTIVATION]
    assert 64 * 512 * 4 <= kept < 64 * 512 * 4 + 4096
    assert full.totals[MemCategory.ACTIVATION] == kept + 64 * 512 * 4
    # gradients and Adam state for the last layer only: 512 x 10 + 10 parameters
    assert last.totals[MemCategory.GRADIENT] == 5130 * 4
    assert last.totals[MemCategory.OPTIMIZER_STATE] >= 2 * 5130 * 4
    assert last.weights is not None and last.weights.trainable_params == 5130
    assert last.weights.frozen_bytes == (256 * 512 + 512 + 512 * 512 + 512) * 4


def test_freeze_patterns_are_checked():
    with pytest.raises(UsageError, match="matches no parameter"):
        trace_step(make_workload(mlp(), freeze=["backbone.*"]), target="cpu")
    with pytest.raises(UsageError, match="nothing is left to train"):
        trace_step(make_workload(mlp(), freeze=["*"]), target="cpu")
    with pytest.raises(UsageError, match="do not combine"):
        make_workload(mlp(), freeze=["0"], lora_rank=8)


@pytest.mark.slow
def test_freeze_on_a_torchvision_backbone_matches_a_real_cpu_step():
    """Live tensor storages of real CPU steps (what a GPU holds). torch.profiler's allocator events
    also show a 72 MiB oneDNN scratch inside convolution_backward when the input needs no gradient
    (the first trainable conv): a CPU-kernel detail no tensor holds (benchmarks/finetune_cpu.md)."""
    w = make_workload("resnet18", batch_size=8, input_shape=(3, 64, 64), freeze=["conv1", "bn1", "layer1", "layer2"])
    traced = trace_step(w, target="cpu", kernel_scratch=False)
    measured = CpuCapRunner(1 << 40).run(w, 8, steps=3)
    assert measured.peak_allocated_bytes is not None
    assert _close(traced.peak_bytes, measured.peak_allocated_bytes), (traced.peak_bytes, measured)
    assert traced.first_step_peak_bytes == measure_cpu_step(w, steps=1)["peak_bytes"] - 12  # profiler: +12 B
    full = trace_step(w.replace(freeze=()), target="cpu")
    assert traced.totals[MemCategory.ACTIVATION] < full.totals[MemCategory.ACTIVATION]


# --------------------------------------------------------------------------- LoRA
@needs_peft
def test_lora_targets_parse():
    assert parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    assert parse_targets(["ALL-LINEAR"]) == ("all-linear",)
    with pytest.raises(UsageError):
        parse_targets("all-linear,q_proj")
    with pytest.raises(UsageError, match="lora_rank"):
        LoraSpec(0)


@needs_peft
def test_lora_without_dropout_accumulates_the_input_gradient_in_place_as_a_real_step():
    """Eager autograd sums a gradient into the first one in place when nothing else holds it
    (InputBuffer::accumulate); on fake tensors it adds out of place, so the trace used to keep one
    extra input-gradient buffer (64 x 512 fp32, +5.2 %) where each adapter reads its base layer's
    input. memprof.engine.gradaccum gives the trace the real engine's choice."""
    w = make_workload(mlp(), batch_size=64, lora=LoraSpec(8, 16, ("all-linear",), 0.0))
    traced = trace_step(w, target="cpu").peak_bytes
    measured = measure_cpu_step(w)["peak_bytes"]
    assert abs(traced - measured) <= 64, (traced, measured)  # the profiler's few bytes of its own


@needs_peft
@pytest.mark.parametrize("dropout", [0.05, 0.1])
def test_lora_mlp_trace_matches_a_real_peft_step(dropout):
    w = make_workload(mlp(), batch_size=64, lora=LoraSpec(8, 16, ("all-linear",), dropout))
    traced = trace_step(w, target="cpu")
    measured = measure_cpu_step(w)
    assert _close(traced.peak_bytes, measured["peak_bytes"]), (traced.peak_bytes, measured)
    weights = traced.weights
    assert weights is not None
    # r x (in + out) per adapted Linear: 8 x (256 + 512) + 8 x (512 + 512) + 8 x (512 + 10)
    assert weights.adapter_params == weights.trainable_params == 8 * (768 + 1024 + 522)
    assert weights.adapter_bytes == 4 * weights.adapter_params
    assert weights.trainable_bytes == 0  # everything else is frozen by peft
    # gradients and Adam state for the adapters only
    assert traced.totals[MemCategory.GRADIENT] == weights.adapter_bytes


@needs_peft
def test_lora_counts_are_peft_counts():
    spec = LoraSpec(4, 8, ("0", "4"), 0.0)
    ours = weight_breakdown(apply_lora(mlp(), spec))
    import peft

    theirs = peft.get_peft_model(
        mlp(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "4"])
    ).get_nb_trainable_parameters()
    assert (ours.trainable_params, ours.all_params) == theirs


@needs_peft
def test_lora_unknown_target_names_the_linear_layers():
    with pytest.raises(UsageError, match="q_proj") as info:
        apply_lora(mlp(), LoraSpec(4, targets=("q_proj",)))
    assert info.value.hint is not None and "lora_targets" in info.value.hint and "0,2,4" in info.value.hint


@needs_peft
def test_published_peft_count_mt0_large():
    """peft's README: LoraConfig(task_type=SEQ_2_SEQ_LM, r=8, lora_alpha=32, lora_dropout=0.1) on
    bigscience/mt0-large prints "trainable params: 2359296 || all params: 1231940608"."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MT5Config(
        vocab_size=250112,
        d_model=1024,
        d_kv=64,
        d_ff=2816,
        num_layers=24,
        num_heads=16,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
    )
    config.tie_word_embeddings = False  # mt0-large's config.json: its lm_head is its own
    with torch.device("meta"):
        model = transformers.MT5ForConditionalGeneration(config)
    # ... while encoder and decoder read the one shared embedding (T5Stack(config, self.shared))
    model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared
    weights = weight_breakdown(apply_lora(model, LoraSpec(8, 32, (), 0.1)))
    assert weights.trainable_params == 2_359_296
    assert weights.all_params == 1_231_940_608
    assert weights.peft_line() == "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915"


def tiny_llama_spec(seq_len: int = 64) -> ModelSpec:
    """A tiny Llama built from its config (HF models are built by a factory, not deep-copied)."""
    return ModelSpec(
        ref="tiny-llama",
        display_name="tiny-llama",
        factory=tiny_llama,
        inputs=InputSpec(shapes=[(seq_len,)], dtype="int64", low=0, high=512),
        source="module",
    )


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@needs_peft
@pytest.mark.slow
def test_lora_tiny_llama_trace_matches_a_real_peft_step():
    w = make_workload(tiny_llama_spec(), batch_size=2, lora=LoraSpec(8, 16, (), 0.05))
    traced = trace_step(w, target="cpu")
    measured = measure_cpu_step(w)
    assert _close(traced.peak_bytes, measured["peak_bytes"]), (traced.peak_bytes, measured)
    weights = traced.weights
    assert weights is not None
    # peft's default for llama: q_proj and v_proj; q: 8 x (128 + 128), v: 8 x (128 + 64) per layer
    assert weights.trainable_params == 2 * (8 * 256 + 8 * 192)


# --------------------------------------------------------------------------- command line and compare
@needs_peft
def test_cli_estimate_with_levers_reports_the_weights():
    import json

    from typer.testing import CliRunner

    from memprof.cli import app

    args = ["estimate", "memprof.zoo:mnist_mlp", "-i", "1,28,28", "--lora-rank", "4", "--lora-targets", "all-linear"]
    result = CliRunner().invoke(app, [*args, "--optimizer", "lion", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["workload"]["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["all-linear"], "dropout": 0.0}
    weights = doc["traced"]["weights"]
    # mnist_mlp: Linear(784,128) + Linear(128,10); LoRA r=4: 4 x (784 + 128) + 4 x (128 + 10)
    assert weights["trainable_params"] == 4 * 912 + 4 * 138
    assert doc["analytic"]["weights"]["trainable_params"] == weights["trainable_params"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora-alpha", "16"], "--lora-alpha needs --lora-rank"),
        (["--lora-rank", "-2"], "--lora-rank must be a positive integer"),
        (["--quantize", "int4"], "unknown --quantize"),
        (["--offload", "gpu"], "unknown offload"),
        (["--double-quant", "--quantize", "int8"], "--double-quant applies to 4-bit"),
        (["--offload", "optimizer", "--optimizer", "adamw8bit"], "does not combine with adamw8bit"),
    ],
)
def test_cli_lever_errors(args, message):
    from typer.testing import CliRunner

    from memprof.cli import app

    result = CliRunner().invoke(app, ["estimate", "memprof.zoo:mnist_mlp", "-i", "1,28,28", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


@needs_peft
def test_compare_ranks_levers_by_largest_batch():
    from memprof.commands.compare import compare
    from memprof.results import Capacity

    base = make_workload(mlp(), batch_size=64)
    result = compare(
        base,
        {"lora": [LoraSpec(4, targets=("all-linear",))], "optimizer": ["adamw8bit"], "offload": ["optimizer"]},
        target="cpu",
        capacity=Capacity(16 * 2**20, "--memory-limit", "cpu"),
        recompute_fn=None,
    )
    rows = {r.label: r for r in result.rows}
    assert set(rows) == {"fp32 (baseline)", "LoRA r=4", "adamw8bit", "optimizer on the CPU"}
    batches = [rows[label].fit.max_batch for label in result.ranked_by_batch]
    assert batches == sorted(batches, reverse=True) and len(batches) == 4
    assert result.best_lever_label == result.ranked_by_batch[0] != "fp32 (baseline)"
    assert result.best_lever_gain == batches[0] - rows["fp32 (baseline)"].fit.max_batch > 0
    # fp32 masters + CPU gradients + Adam's two states (+ the CPU step's temporaries) of 399,370 parameters
    host = rows["optimizer on the CPU"].host_peak_bytes
    assert host is not None and host >= 16 * 399_370


@needs_peft
@pytest.mark.slow
def test_compare_example_from_the_issue_on_a_tiny_llama():
    """`memprof compare <llama> --gpu-memory ... --lora-rank 16 --quantize nf4 --optimizer adamw8bit --combine`."""
    from typer.testing import CliRunner

    from memprof.cli import app

    model = "scripts/examples/tiny_llama.py:build"
    args = ["compare", model, "--gpu-memory", "2GiB", "--lora-rank", "16", "--quantize", "nf4"]
    result = CliRunner().invoke(app, [*args, "--optimizer", "adamw8bit", "--combine", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "Ranked by the largest batch that fits" in result.stdout
    assert "buys the most" in result.stdout
