"""Hugging Face and timm models: references, the catalog, training and generation against real CPU runs.

Every number is checked against a real CPU run (``measure_cpu_step``: torch.profiler's memory events,
independent of the tracer), a published parameter count, or a hand-computed formula.
"""

from __future__ import annotations

import json
import warnings

import pytest

transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from memprof.cli import app  # noqa: E402
from memprof.commands.workload import make_workload  # noqa: E402
from memprof.engine import hf  # noqa: E402
from memprof.engine.measure import measure_cpu_step  # noqa: E402
from memprof.engine.trace import trace_step  # noqa: E402
from memprof.errors import MissingDependencyError, ModelLoadError, UsageError  # noqa: E402
from memprof.results import MemCategory as C  # noqa: E402

warnings.filterwarnings("ignore", module="transformers")
runner = CliRunner()


def tiny(tmp_path, model_type: str, **fields) -> str:
    """A tiny config of ``model_type`` (memprof's tiny_config over transformers' defaults), saved to a folder."""
    config = hf.tiny_config(transformers.AutoConfig.for_model(model_type))
    if model_type == "t5":  # as t5-small's config.json has it (transformers' defaults leave it out)
        fields = {"decoder_start_token_id": 0, **fields}
    for key, value in fields.items():
        setattr(config, key, value)
    folder = tmp_path / model_type
    config.save_pretrained(str(folder))
    return str(folder)


def pct(pred: int, real: int) -> float:
    return 100.0 * (pred - real) / real


# --------------------------------------------------------------------------- references and the catalog
def test_llama_3_1_8b_from_the_catalog_has_the_published_parameter_count():
    from memprof.engine.analytic import analyse

    w = make_workload("hf:meta-llama/Llama-3.1-8B", dtype="bf16", optimizer="adamw", seq_len=16)
    assert w.model.hf.published_params == 8_030_261_248
    assert "catalog" in w.model.hf.origin and "huggingface.co/meta-llama/Llama-3.1-8B" in w.model.hf.origin
    assert analyse(w).param_count == 8_030_261_248


@pytest.mark.slow
def test_every_catalog_config_builds_with_its_published_parameter_count():
    import torch

    for entry in hf.catalog():
        model = hf.load_hf("hf:" + entry.name)
        with torch.device("meta"):
            built = model.build()
        n = sum(p.numel() for p in built.parameters())
        if model.task == "seq-cls":  # the published count is the bare encoder's; memprof adds the classifier
            n -= model.config.hidden_size * model.num_labels + model.num_labels
        assert n == entry.params, entry.name


def test_catalog_entries_name_their_source_and_resolve_by_alias():
    names = hf.catalog_names()
    for required in (
        "meta-llama/Llama-3.2-1B",
        "meta-llama/Llama-3.2-3B",
        "meta-llama/Llama-3.1-8B",
        "meta-llama/Llama-3.1-70B",
        "mistralai/Mistral-7B-v0.1",
        "mistralai/Mixtral-8x7B-v0.1",
        "Qwen/Qwen2.5-0.5B",
        "Qwen/Qwen2.5-7B",
        "Qwen/Qwen2.5-72B",
        "google/gemma-2-9b",
        "microsoft/Phi-3-mini-4k-instruct",
        "openai-community/gpt2",
        "google-bert/bert-base-uncased",
        "google-t5/t5-small",
    ):
        assert required in names
    for entry in hf.catalog():
        assert entry.path.is_file() and entry.source.startswith("https://huggingface.co/") and entry.params
    assert hf.catalog_entry("gpt2").name == "openai-community/gpt2"
    assert hf.catalog_entry("META-LLAMA/llama-3.3-70b-instruct").name == "meta-llama/Llama-3.1-70B"


def _hub_cache(tmp_path, repo: str, config: dict):
    folder = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123456789abcdef")
    return tmp_path / "hub"


def test_the_local_hugging_face_cache_comes_before_the_catalog(tmp_path, monkeypatch):
    from huggingface_hub import constants

    small = hf.tiny_config(transformers.AutoConfig.for_model("llama")).to_dict()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_hub_cache(tmp_path, "meta-llama/Llama-3.1-8B", small)))
    model = hf.load_hf("hf:meta-llama/Llama-3.1-8B")
    assert "local Hugging Face cache" in model.origin
    assert model.config.hidden_size == 128 and model.published_params == 8_030_261_248
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert "catalog" in hf.load_hf("hf:meta-llama/Llama-3.1-8B").origin


def test_unknown_hub_name_offline_lists_the_catalog(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        hf.load_hf("hf:someone/not-a-model")
    assert "HF_HUB_OFFLINE" in info.value.message and "meta-llama/Llama-3.1-8B" in info.value.message
    res = runner.invoke(app, ["estimate", "hf:someone/not-a-model", "--no-trace"])
    assert res.exit_code == 2
    assert res.stderr.startswith("ERROR: hf:someone/not-a-model") and "HINT:" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 2 and "Traceback" not in res.stderr


def test_missing_extra_names_it(monkeypatch):
    real = hf.importlib.import_module

    def no_transformers(name, *a, **k):
        if name.split(".")[0] in ("transformers", "timm"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(hf.importlib, "import_module", no_transformers)
    for ref in ("hf:gpt2", "timm:resnet18"):
        with pytest.raises(MissingDependencyError) as info:
            make_workload(ref)
        assert 'pip install "memprof[hf]"' in info.value.hint
    res = runner.invoke(app, ["estimate", "timm:resnet18", "--no-trace"])
    assert res.exit_code == 2 and "memprof[hf]" in res.stderr and "Traceback" not in res.stderr


def test_a_config_transformers_cannot_build(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_architecture", "hidden_size": 8}))
    with pytest.raises(ModelLoadError) as info:
        make_workload(str(tmp_path))
    assert "cannot build a config of model type 'no_such_architecture'" in info.value.message
    assert "upgrade transformers" in info.value.hint
    (tmp_path / "x.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="no `model_type`"):
        make_workload(str(tmp_path / "x.json"))


def test_a_sequence_longer_than_the_positions(tmp_path):
    path = tiny(tmp_path, "gpt2")  # 1024 learned positions
    with pytest.raises(UsageError) as info:
        make_workload(path, seq_len=1025)
    assert "1024 positions" in info.value.message and "at most 1024" in info.value.hint
    with pytest.raises(UsageError, match="new_tokens"):
        make_workload(path, seq_len=1000, mode="generate", new_tokens=100)
    res = runner.invoke(app, ["estimate", path, "--seq-len", "4096", "--no-trace"])
    assert res.exit_code == 2 and "ERROR: --seq-len 4096 is longer than the 1024 positions" in res.stderr


def test_sequence_options_are_checked(tmp_path):
    with pytest.raises(UsageError, match="takes images"):
        make_workload("resnet18", seq_len=128)
    with pytest.raises(UsageError, match="Hugging Face"):
        make_workload("resnet18", mode="generate")
    with pytest.raises(UsageError, match="`loop`"):
        make_workload("resnet18", loop="keras")
    bert = tiny(tmp_path, "bert")
    with pytest.raises(UsageError, match="does not generate"):
        make_workload(bert, mode="generate")


# --------------------------------------------------------------------------- training, against real CPU steps
@pytest.mark.parametrize("loop, padding", [("plain", False), pytest.param("trainer", True, marks=pytest.mark.slow)])
def test_tiny_llama_trace_equals_a_real_cpu_step(tmp_path, loop, padding):
    w = make_workload(tiny(tmp_path, "llama"), batch_size=2, seq_len=64, optimizer="adamw", loop=loop, padding=padding)
    traced = trace_step(w, target="cpu")
    real = measure_cpu_step(w)
    assert abs(pct(traced.peak_bytes, real["peak_bytes"])) <= 0.01


def test_a_plain_loop_keeps_the_logits_through_backward(tmp_path):
    path = tiny(tmp_path, "llama")
    b, t, vocab = 2, 64, 1000
    plain = trace_step(make_workload(path, batch_size=b, seq_len=t, loop="plain"), target="cpu")
    trainer = trace_step(make_workload(path, batch_size=b, seq_len=t, loop="trainer"), target="cpu")
    assert plain.peak_bytes - trainer.peak_bytes == b * t * vocab * 4  # fp32 logits, alive at the peak


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gpt_neox", "opt"])
def test_architectures_outside_the_catalog(tmp_path, model_type):
    w = make_workload(tiny(tmp_path, model_type), batch_size=2, seq_len=64, optimizer="adamw")
    assert abs(pct(trace_step(w, target="cpu").peak_bytes, measure_cpu_step(w)["peak_bytes"])) <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type",
    ["falcon", "phi", "stablelm", "gemma", "gemma3_text", "olmo2", "starcoder2", "gptj", "bloom", "cohere",
     "gpt_bigcode", "olmoe", "qwen3", "roberta", "distilbert", "bart", "t5", "gemma2", "qwen2_moe"],
)  # fmt: skip
@pytest.mark.parametrize("loop", ["plain", "trainer"])
def test_more_architectures_both_loops(tmp_path, model_type, loop):
    w = make_workload(tiny(tmp_path, model_type), batch_size=2, seq_len=96, optimizer="adamw", loop=loop)
    assert abs(pct(trace_step(w, target="cpu").peak_bytes, measure_cpu_step(w)["peak_bytes"])) <= 1.0


@pytest.mark.slow
def test_checkpointing_uses_the_models_own_switch(tmp_path):
    w = make_workload(tiny(tmp_path, "llama"), batch_size=2, seq_len=64, checkpointing="blocks")
    traced = trace_step(w, target="cpu")
    assert abs(pct(traced.peak_bytes, measure_cpu_step(w)["peak_bytes"])) <= 0.01
    # each decoder layer keeps only its input (batch x seq x hidden floats) for the recomputation
    layers = [row for row in traced.saved_by_block if row.type == "LlamaDecoderLayer"]
    # (+ the 5056-byte CPU RNG state torch.utils.checkpoint keeps per call when it runs on the CPU)
    assert layers and layers[0].count == 2 and layers[0].bytes_each == 2 * 64 * 128 * 4 + 5056


def test_the_block_table_names_decoder_layers_and_their_parts(tmp_path):
    traced = trace_step(make_workload(tiny(tmp_path, "llama"), batch_size=2, seq_len=64), target="cpu")
    row = traced.saved_by_block[0]
    assert row.name == "model.layers.0-1" and row.type == "LlamaDecoderLayer" and row.count == 2
    parts = dict(row.parts)
    assert {"self_attn", "mlp", "input_layernorm"} <= set(parts) and sum(parts.values()) == row.bytes_each


# --------------------------------------------------------------------------- mixture of experts
@pytest.mark.slow
@pytest.mark.parametrize("experts", ["eager", None])
def test_moe_routing_assumptions_against_real_steps_with_the_routing_forced(tmp_path, experts):
    path = tiny(tmp_path, "mixtral", intermediate_size=1024, vocab_size=64)
    kwargs = {"experts_implementation": experts} if experts else None
    peaks = {}
    for routing in ("balanced", "worst"):
        w = make_workload(path, batch_size=2, seq_len=128, routing=routing, model_kwargs=kwargs, loop="trainer")
        traced = trace_step(w, target="cpu")
        real = measure_cpu_step(w)["peak_bytes"]
        if experts == "eager":
            # known gap: `weight[expert_idx]` with a 0-dim index tensor is a view (select) in a plain run but a
            # copy (index) under a dispatch mode, where the index has no value for C++ to read
            assert 0 <= pct(traced.peak_bytes, real) <= 5.0
        else:
            assert traced.peak_bytes == real
        assert w.describe()["routing"] == routing
        peaks[routing] = traced.peak_bytes
    if experts == "eager":  # one expert at a time: the routing decides how large each expert's rows are
        assert peaks["worst"] != peaks["balanced"]
    else:  # grouped_mm: one row per (token, expert) pair whatever the routing
        assert peaks["worst"] == peaks["balanced"]


def test_forced_routing_is_what_the_assumption_says():
    import torch

    moe = hf.MoEInfo(experts=4, top_k=2)
    balanced = hf.forced_routing(6, moe, "balanced", "cpu")
    assert torch.bincount(balanced.flatten(), minlength=4).tolist() == [3, 3, 3, 3]  # 6 tokens x 2 / 4
    assert hf.forced_routing(6, moe, "worst", "cpu").unique().tolist() == [0, 1]


# --------------------------------------------------------------------------- generation
def test_generation_against_real_generate_and_the_kv_formula(tmp_path):
    path = tiny(tmp_path, "llama", num_key_value_heads=2)  # 4 heads, 2 KV heads (grouped-query), head dim 32
    b, prompt, new = 2, 48, 8
    for cache in ("dynamic", "static"):
        w = make_workload(path, batch_size=b, seq_len=prompt, mode="generate", new_tokens=new, kv_cache=cache)
        traced = trace_step(w, target="cpu")
        assert abs(pct(traced.peak_bytes, measure_cpu_step(w, steps=1)["peak_bytes"])) <= 2.0
        assert set(traced.phase_peaks) >= {"prefill", "decode"}
        # 2 (K, V) x 2 layers x batch x 2 KV heads x 32 x (prompt + new - 1) tokens x 4 bytes
        formula = 2 * 2 * b * 2 * 32 * (prompt + new - 1) * 4
        assert hf.kv_cache_formula(w.model.hf.config, b, prompt + new - 1, 4) == formula
        if cache == "dynamic":
            assert traced.kv_cache_bytes == formula
        else:  # the static cache also keeps one int64 position counter per layer
            assert formula <= traced.kv_cache_bytes <= formula + 2 * 8


def test_generation_counts_the_prefill_as_the_forward(tmp_path):
    # generate's prefill computes the logits of the last prompt token only (logits_to_keep=1): the eval
    # forward less the lm_head rows of the other b x (seq - 1) tokens, 2 x hidden x vocab FLOPs each
    path = tiny(tmp_path, "llama")
    b, seq = 2, 64
    gen = make_workload(path, batch_size=b, seq_len=seq, mode="generate", new_tokens=4)
    ev = make_workload(path, batch_size=b, seq_len=seq, mode="eval")
    prefill = trace_step(gen, target="cuda", count_flops=True).flops
    forward = trace_step(ev, target="cuda", count_flops=True).flops
    assert prefill.backward_flops == 0
    assert forward.forward_flops - prefill.forward_flops == 2 * 128 * 1000 * b * (seq - 1)


@pytest.mark.slow
def test_sliding_window_caches_hold_the_window(tmp_path):
    path = tiny(tmp_path, "mistral")  # tiny_config: sliding window 64
    w = make_workload(path, batch_size=1, seq_len=96, mode="generate", new_tokens=4)
    traced = trace_step(w, target="cpu")
    # 2 (K, V) x 2 layers x 2 KV heads x 32 x the window's 64 tokens x 4 bytes: the dynamic cache's keys are a
    # view of the last 63 tokens into the 64-token concatenation; each layer also keeps its window as one int64
    formula = hf.kv_cache_formula(w.model.hf.config, 1, 99, 4)
    assert formula == 2 * 2 * 2 * 32 * 64 * 4
    assert formula <= traced.kv_cache_bytes <= formula + 2 * 8
    assert abs(pct(traced.peak_bytes, measure_cpu_step(w, steps=1)["peak_bytes"])) <= 2.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type",
    [
        "gpt2",
        "qwen2",
        "gemma2",
        "phi3",
        "mixtral",
        pytest.param(
            "t5",
            marks=pytest.mark.xfail(strict=True, reason="open: T5 generate traced 10 % above the real run"),
        ),
    ],
)
def test_generation_of_more_architectures(tmp_path, model_type):
    w = make_workload(tiny(tmp_path, model_type), batch_size=2, seq_len=80, mode="generate", new_tokens=12)
    assert abs(pct(trace_step(w, target="cpu").peak_bytes, measure_cpu_step(w, steps=1)["peak_bytes"])) <= 2.0


# --------------------------------------------------------------------------- attention as CUDA runs it
def _activations(path: str, attn: str, padding: bool) -> list[int]:
    out = []
    for t in (256, 512, 768):  # equally spaced: a line has a second difference of 0
        w = make_workload(path, batch_size=1, seq_len=t, attn=attn, padding=padding, loop="trainer")
        out.append(trace_step(w, target="cuda").totals[C.ACTIVATION])
    return out


def _second_difference(a: list[int]) -> int:
    return a[2] - 2 * a[1] + a[0]


@pytest.mark.slow
def test_sdpa_activations_grow_linearly_in_the_sequence_length(tmp_path):
    path = tiny(tmp_path, "llama", max_position_embeddings=4096)
    assert _second_difference(_activations(path, "sdpa", padding=False)) == 0
    assert _second_difference(_activations(path, "eager", padding=False)) > 0  # eager keeps the T x T matrix


@pytest.mark.slow
def test_sdpa_with_padding_grows_linearly_but_for_the_additive_mask_each_layer_keeps(tmp_path):
    # with padding Hugging Face passes a bool B x 1 x T x T mask; CUDA's memory-efficient kernel (the one
    # chosen for a masked fp32 call) takes it made additive in the query's dtype, one per call, and keeps it
    # for backward: layers x T^2 x 4 bytes is quadratic. No B x H x T x T attention matrix is kept (the math
    # path would keep heads x T^2 x 4 bytes and more per layer).
    path = tiny(tmp_path, "llama", max_position_embeddings=4096)
    layers = transformers.AutoConfig.from_pretrained(path).num_hidden_layers
    squares = _second_difference([t * t for t in (256, 512, 768)])
    assert _second_difference(_activations(path, "sdpa", padding=True)) == layers * 4 * squares


# --------------------------------------------------------------------------- inverse questions
@pytest.mark.slow
def test_longest_sequence_is_exact_to_the_multiple(tmp_path):
    from memprof.engine.fit import fit_seq_len

    w = make_workload(tiny(tmp_path, "llama", max_position_embeddings=4096), batch_size=2, seq_len=128)
    capacity = trace_step(w.replace(seq_len=700), target="cpu").peak_bytes
    fit = fit_seq_len(w, capacity, target="cpu", multiple_of=32)
    assert fit.max_seq_len == 672 and fit.max_seq_len % 32 == 0  # 700 fits; 704 needs more
    assert fit.peak_at_max_bytes <= capacity < fit.peak_at_next_bytes
    assert trace_step(w.replace(seq_len=704), target="cpu").peak_bytes > capacity


@pytest.mark.slow
def test_grid_agrees_with_the_batch_fit(tmp_path):
    from memprof.engine.fit import fit_batch, fit_grid

    w = make_workload(tiny(tmp_path, "llama"), batch_size=1, seq_len=64)
    capacity = trace_step(w.replace(batch_size=6, seq_len=128), target="cpu").peak_bytes
    grid = fit_grid(w, capacity, [1, 2, 4, 8, 16], [64, 128, 256], target="cpu")
    for seq, largest in zip(grid.seq_lens, grid.max_batch, strict=True):
        assert largest == fit_batch(w.replace(seq_len=seq), capacity, target="cpu", max_batch=16).max_batch
    assert grid.max_batch[1] == 6 and grid.fits(4, 128) and not grid.fits(8, 128)


@pytest.mark.slow
def test_estimate_on_the_cpu_fits_the_grid_and_sequence_on_the_cpu_step(tmp_path):
    """estimate(device="cpu", memory_limit=..., grid=..., fit_seq_len=True): the fits trace the CPU step."""
    import memprof
    from memprof.engine.fit import fit_batch

    ref = tiny(tmp_path, "llama")
    w = make_workload(ref, batch_size=2, seq_len=64, optimizer="adamw")
    capacity = trace_step(w.replace(batch_size=3), target="cpu").peak_bytes
    r = memprof.estimate(
        ref, batch_size=2, seq_len=64, optimizer="adamw", device="cpu", memory_limit=capacity,
        grid=([1, 2, 4], [32, 64]), fit_seq_len=True,
    )  # fmt: skip
    assert r.target == "cpu" and r.grid is not None and r.grid.metric == "allocated"
    assert r.grid.max_batch[1] == 3 == fit_batch(w, capacity, target="cpu", max_batch=4).max_batch
    assert r.seq_fit is not None and r.seq_fit.max_seq_len >= 64
    assert trace_step(w.replace(seq_len=r.seq_fit.max_seq_len), target="cpu").peak_bytes <= capacity
    assert trace_step(w.replace(seq_len=r.seq_fit.max_seq_len + 1), target="cpu").peak_bytes > capacity


@pytest.mark.slow
def test_estimate_cli_on_a_config_json(tmp_path):
    path = tiny(tmp_path, "qwen2")
    svg = tmp_path / "grid.svg"
    res = runner.invoke(
        app,
        ["estimate", path, "-b", "2", "--seq-len", "128", "--gpu-memory", "1GiB", "--fit", "seq-len",
         "--grid", "--grid-batches", "1,8,64", "--grid-seq-lens", "128,512", "--plot", str(svg), "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["workload"]["seq_len"] == 128 and doc["workload"]["loop"] == "plain"
    assert doc["seq_fit"]["max_seq_len"] is not None and doc["grid"]["seq_lens"] == [128, 512]
    assert doc["traced"]["saved_by_block"][0]["type"] == "Qwen2DecoderLayer"
    chart = svg.read_text()  # the grid chart: its boundary line and axes (tests/test_charts.py checks its cells)
    assert chart.startswith("<?xml") and 'id="boundary"' in chart and "batch size" in chart


@pytest.mark.slow
def test_compare_takes_seq_len_and_loop_axes(tmp_path):
    res = runner.invoke(
        app,
        ["compare", tiny(tmp_path, "llama"), "-b", "2", "--seq-len", "64", "--seq-len", "128", "--loop", "trainer",
         "--dtype", "bf16", "--no-fit", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = {r["label"]: r for r in json.loads(res.stdout)["rows"]}
    assert {"fp32 (baseline)", "128 tokens", "trainer loop", "bf16"} <= set(rows)
    assert rows["128 tokens"]["peak_bytes"] > rows["fp32 (baseline)"]["peak_bytes"] > rows["trainer loop"]["peak_bytes"]


@pytest.mark.slow
def test_find_batch_searches_the_sequence_length_on_a_real_device(tmp_path):
    from memprof.commands.find_batch import find_batch
    from memprof.engine.measure import CpuCapRunner

    w = make_workload(tiny(tmp_path, "llama"), batch_size=2, seq_len=64)
    cap = 30 * 2**20
    res = find_batch(w, device="cpu", memory_limit=cap, search_axis="seq_len", seq_multiple_of=16)
    assert res.axis == "seq_len" and res.status == "exact" and res.largest_batch % 16 == 0
    real = CpuCapRunner(cap)
    assert real.run(w.replace(seq_len=res.largest_batch), 2).fits
    assert not real.run(w.replace(seq_len=res.largest_batch + 16), 2).fits


@pytest.mark.slow
def test_the_issues_check_command_offline():
    res = runner.invoke(
        app,
        ["estimate", "hf:meta-llama/Llama-3.1-8B", "--dtype", "bf16", "--optimizer", "adamw", "--seq-len", "4096",
         "--batch-size", "1", "--gpu-memory", "80GiB", "--json"],
        env={"HF_HUB_OFFLINE": "1", "COLUMNS": "120"},
    )  # fmt: skip
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.stdout)
    assert doc["analytic"]["param_count"] == 8_030_261_248 == doc["workload"]["published_params"]
    traced = doc["traced"]
    assert traced["breakdown_at_peak"]["parameter"] == 2 * 8_030_261_248
    assert traced["breakdown_at_peak"]["optimizer_state"] >= 4 * 8_030_261_248  # AdamW's two bf16 moments
    assert doc["fit"]["source"] == "traced"


# --------------------------------------------------------------------------- timm
@pytest.mark.slow
def test_timm_model_is_traced_like_any_other():
    pytest.importorskip("timm")
    w = make_workload("timm:resnet18", batch_size=2)
    assert w.model.inputs.shapes == [(3, 224, 224)]
    traced = trace_step(w, target="cpu", kernel_scratch=False)
    from memprof.engine.measure import CpuCapRunner

    real = CpuCapRunner(1 << 40).run(w, 2)
    assert abs(pct(traced.peak_bytes, real.peak_allocated_bytes)) <= 0.5
    with pytest.raises(ModelLoadError, match="timm has no model"):
        make_workload("timm:resnet1800")


# --------------------------------------------------------------------------- known values on fake tensors
def test_shadows_answer_value_questions_and_forget_unknown_writes():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.engine.shadow import Shadows
    from memprof.engine.tracking import StorageTracker

    shadows = Shadows()
    tracker = StorageTracker()
    tracker.run_op = shadows.run
    with FakeTensorMode(allow_non_fake_inputs=True), tracker, shadows.active():
        mask = torch.ones((2, 8), dtype=torch.long)
        mask[0, 5:] = 0
        assert bool(mask.all()) is False and int(mask.sum()) == 13
        assert torch.nonzero(mask).shape == (13, 2)  # sized from the known values
        x = torch.randn(2, 8)
        mask.copy_(x > 0)  # written from unknown values: forgotten
        with pytest.raises(Exception, match="local_scalar_dense"):
            bool(mask.all())
