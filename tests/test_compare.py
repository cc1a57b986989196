"""memprof compare: variants, deltas, sorting and verdict with a fake tracer; goldens; JSON; CLI on a tiny GPT."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from types import SimpleNamespace

import pytest
from conftest import assert_golden
from rich.console import Console
from typer.testing import CliRunner

from memprof.cli import app
from memprof.cli.compare import compare_document
from memprof.commands import compare as C
from memprof.engine.loading import InputSpec, ModelSpec
from memprof.engine.workload import Workload, optimizer_state_count
from memprof.errors import TraceError, UsageError
from memprof.render.charts import bar_cells, compare_chart
from memprof.render.compare import render_compare, verdict_text
from memprof.results import (
    Capacity,
    CompareFit,
    CompareMeasurement,
    CompareResult,
    CompareRow,
    RecomputeInfo,
    StepTime,
)
from memprof.results import MemCategory as M

KiB = 1024


def fake_workload(batch: int = 32, **kw) -> Workload:
    spec = ModelSpec(ref="fake", display_name="fakenet", factory=lambda: None, inputs=InputSpec([(3, 8, 8)], "float"))
    return Workload(spec, batch_size=batch, **kw)


def fake_trace(workload: Workload, *, target: str = "cuda"):
    """Bytes by hand: 400 KiB of fp32 parameters, 10 KiB of activations per sample (x compute bytes / 4;
    x 0.25 checkpointed, which adds 5 KiB/sample of recomputed temporaries), 2 KiB/sample of eval temporaries."""
    p = workload.precision
    params = 400 * KiB * p.param_bytes // 4
    train = workload.mode == "train"
    grads = params if train else 0
    opt = optimizer_state_count(workload.optimizer) * params if train else 0
    per = 10 * KiB * p.compute_bytes // 4
    acts = workload.batch_size * per if train else 0
    temps = 2 * KiB * workload.batch_size
    if train and workload.checkpointing != "none":
        acts //= 4
        temps += 5 * KiB * workload.batch_size
    breakdown = {M.PARAMETER: params, M.GRADIENT: grads, M.OPTIMIZER_STATE: opt, M.ACTIVATION: acts, M.TEMPORARY: temps}
    breakdown = {k: v for k, v in breakdown.items() if v}
    peak = sum(breakdown.values())
    totals = {M.PARAMETER: params, M.BUFFER: 0, M.INPUT: 0}
    if train:
        totals.update({M.GRADIENT: grads, M.OPTIMIZER_STATE: opt, M.ACTIVATION: acts})
    return SimpleNamespace(
        peak_bytes=peak,
        breakdown_at_peak=breakdown,
        totals=totals,
        peak_phase="backward" if train else "forward",
        peak_module="layer1" if train else None,
        trace_seconds=0.01,
        predicted_nvml_bytes=peak + 100 * KiB,
    )


def fake_recompute(workload):
    return SimpleNamespace(
        plan="4 × Block (repeated blocks)",
        regions=4,
        forward_flops=3_000_000,
        recompute_flops=2_700_000,
        extra_pct=30.0,
        batchnorm_recomputed=False,
    )


def run(base=None, axes=None, **kw):
    kw.setdefault("trace_fn", fake_trace)
    kw.setdefault("recompute_fn", fake_recompute)
    return C.compare(base or fake_workload(), axes, **kw)


def row(result, label) -> CompareRow:
    return next(r for r in result.rows if r.label == label)


# --------------------------------------------------------------------------- variants
def test_default_variants():
    labels = [v.label for v in C.make_variants(fake_workload())]
    assert labels == ["fp32 (baseline)", "amp-fp16", "amp-bf16", "fp16", "checkpointing blocks"]


def test_axis_values_are_normalised_and_deduplicated():
    variants = C.make_variants(
        fake_workload(),
        {
            "dtype": ["amp", "AMP-FP16", "fp32"],
            "checkpointing": ["per-block"],
            "optimizer": ["SGD"],
            "batch_size": ["64"],
        },
    )
    assert [v.label for v in variants] == ["fp32 (baseline)", "amp-fp16", "sgd", "checkpointing blocks", "batch 64"]
    assert variants[1].changes == {"dtype": "amp-fp16"} and variants[4].workload.batch_size == 64


def test_combine_makes_the_product_and_drops_duplicates():
    variants = C.make_variants(
        fake_workload(), {"dtype": ["amp-bf16"], "optimizer": ["sgd"], "mode": ["eval"]}, combine=True
    )
    labels = [v.label for v in variants]
    # 2 x 2 x 2 = 8 combinations; in eval the optimizer does nothing: eval+sgd == eval, amp+eval+sgd == amp+eval
    assert labels == [
        "fp32 (baseline)",
        "eval (no_grad)",
        "sgd",
        "amp-bf16",
        "amp-bf16 + eval (no_grad)",
        "amp-bf16 + sgd",
    ]


@pytest.mark.parametrize(
    "axes,word",
    [
        ({"dtype": ["fp8"]}, "dtype"),
        ({"checkpointing": ["often"]}, "checkpointing"),
        ({"batch_size": [0]}, "batch size"),
        ({"colour": ["red"]}, "axis"),
        ({"mode": ["infer"]}, "mode"),
    ],
)
def test_bad_axis_values_are_usage_errors(axes, word):
    with pytest.raises(UsageError) as info:
        C.make_variants(fake_workload(), axes)
    assert word in info.value.message and info.value.hint


# --------------------------------------------------------------------------- compare logic
def test_deltas_sorting_and_verdict():
    result = run(axes={"dtype": ["amp-fp16", "fp16"], "checkpointing": ["blocks"], "mode": ["eval"], "batch_size": [8]})
    labels = [r.label for r in result.rows]
    # baseline, then same batch + mode by peak, then other batch sizes, then eval
    assert labels == ["fp32 (baseline)", "fp16", "amp-fp16", "checkpointing blocks", "batch 8", "eval (no_grad)"]
    base = row(result, "fp32 (baseline)")
    assert base.peak_bytes == 400 * KiB * 4 + 32 * 10 * KiB + 64 * KiB and base.delta_bytes == 0
    amp = row(result, "amp-fp16")
    # AMP: fp32 master weights, gradients and optimizer state kept, activations halved
    assert (amp.parameter_bytes, amp.gradient_bytes, amp.optimizer_state_bytes) == (
        base.parameter_bytes,
        base.gradient_bytes,
        base.optimizer_state_bytes,
    )
    assert amp.activation_bytes == base.activation_bytes // 2
    assert amp.delta_bytes == -160 * KiB and amp.delta_pct == pytest.approx(-100 * 160 / 1984)
    fp16 = row(result, "fp16")
    assert fp16.parameter_bytes == base.parameter_bytes // 2
    ev = row(result, "eval (no_grad)")
    assert ev.gradient_bytes == 0 and ev.optimizer_state_bytes == 0 and ev.activation_bytes == 0
    ck = row(result, "checkpointing blocks")
    assert ck.activation_bytes < base.activation_bytes and ck.recompute.recompute_flops == 2_700_000
    assert base.recompute is None and amp.recompute is None
    # best: lowest peak among same-batch training rows; eval is lower still but not an alternative
    assert result.best_label == "fp16" and row(result, "fp16").best
    assert result.safe_best_label == "amp-fp16"
    assert sum(r.best for r in result.rows) == 1
    text = verdict_text(result)
    assert text.startswith("Lowest peak: fp16") and "master weights" in text and "with them: amp-fp16" in text


def test_nothing_better_than_the_baseline():
    result = run(axes={"optimizer": ["adam"], "batch_size": [64]})
    assert result.best_label is None
    assert "No configuration lowers the peak" in verdict_text(result)


def test_failing_rows():
    def trace(workload, *, target):
        if workload.checkpointing != "none":
            raise TraceError("checkpointing broke", "try another mode")
        return fake_trace(workload, target=target)

    result = run(axes={"checkpointing": ["sqrt"], "dtype": ["bf16"]}, trace_fn=trace)
    assert [r.label for r in result.rows] == ["fp32 (baseline)", "bf16", "checkpointing sqrt"]
    assert result.rows[-1].error == "checkpointing broke (try another mode)" and result.rows[-1].peak_bytes is None
    # the default set drops a row it cannot make, with a note
    result = run(trace_fn=trace)
    assert "checkpointing blocks" not in [r.label for r in result.rows]
    assert any("checkpointing blocks left out" in n for n in result.notes)
    # a failing baseline is the user's error
    with pytest.raises(TraceError):
        run(base=fake_workload(checkpointing="blocks"), trace_fn=trace)


def test_fit_and_capacity_note():
    def fit_fn(workload, capacity, *, target, headroom, max_batch, traced, trace_fn):
        best = (capacity - 3 * traced.totals[M.PARAMETER]) // (12 * KiB)
        return CompareFit("nvml", best, int(headroom * best), workload.batch_size <= best)

    result = run(axes={"dtype": ["amp-bf16"]}, capacity=Capacity(10 * 2**20, "--gpu-memory"), fit_fn=fit_fn)
    assert row(result, "fp32 (baseline)").fit.max_batch == (10 * 2**20 - 3 * 400 * KiB) // (12 * KiB)
    assert "largest batch" in verdict_text(result)
    result = run(axes={"dtype": ["amp-bf16"]}, capacity_note="no GPU here")
    assert result.capacity is None and "no GPU here" in result.notes[-1]
    assert all(r.fit is None for r in result.rows)


def test_traced_fit_finds_the_exact_largest_batch_in_a_few_traces():
    calls = []

    def trace(workload, *, target):
        calls.append(workload.batch_size)
        return fake_trace(workload, target=target)

    w = fake_workload(32)
    capacity = 5 * 2**20
    fit = C.traced_fit(w, capacity, target="cpu", headroom=0.8, max_batch=None, traced=fake_trace(w), trace_fn=trace)
    peak = lambda b: fake_trace(w.with_batch(b)).peak_bytes  # noqa: E731
    assert peak(fit.max_batch) <= capacity < peak(fit.max_batch + 1)
    assert fit.exact and fit.recommended_batch == int(0.8 * fit.max_batch) and fit.metric == "allocated"
    assert len(calls) <= 3  # the guide trace, the prediction, its confirmation


def test_measurements_and_errors():
    def measure(workload):
        if workload.precision.name == "fp16":
            return C.Measured(peak_bytes=None, oom=True, note="out of memory")
        return C.Measured(peak_bytes=int(fake_trace(workload).peak_bytes * 1.02))

    result = run(axes={"dtype": ["fp16", "amp-bf16"]}, measure_fn=measure, find_fn=lambda w: 77)
    m = row(result, "amp-bf16").measured
    assert m.error_pct == pytest.approx(100 * (1 / 1.02 - 1), abs=0.01) and m.max_batch == 77
    assert row(result, "fp16").measured.oom and row(result, "fp16").measured.error_pct is None


def test_progress_is_reported():
    seen = []
    run(axes={"dtype": ["bf16"]}, on_progress=lambda i, n, label: seen.append((i, n, label)))
    assert seen == [(1, 2, "fp32 (baseline)"), (2, 2, "bf16")]


# --------------------------------------------------------------------------- rendering (hand-built results)
def _row(label, peak_parts, *, baseline=False, best=False, changes=None, dtype="fp32", fit=None, **kw):
    parts = dict(peak_parts)
    peak = sum(parts.values())
    return CompareRow(
        label=label,
        changes=changes or {},
        baseline=baseline,
        best=best,
        workload={"model": "resnet50", "batch_size": 32, "dtype": dtype, "mode": "train"},
        peak_bytes=peak,
        parameter_bytes=parts.get(M.PARAMETER, 0),
        gradient_bytes=parts.get(M.GRADIENT, 0),
        optimizer_state_bytes=parts.get(M.OPTIMIZER_STATE, 0),
        activation_bytes=parts.get(M.ACTIVATION, 0),
        temporary_bytes=parts.get(M.TEMPORARY, 0),
        input_bytes=0,
        buffer_bytes=0,
        breakdown_at_peak=parts,
        delta_bytes=kw.pop("delta", 0),
        delta_pct=kw.pop("pct", 0.0),
        peak_phase="backward",
        peak_module=kw.pop("module", "layer4.2.relu"),
        fit=fit,
        recompute=kw.pop("recompute", None),
        measured=kw.pop("measured", None),
        error=kw.pop("error", None),
        notes=kw.pop("notes", ()),
    )


MiB = 2**20


def golden_result() -> CompareResult:
    P, OPT = 97 * MiB, 194 * MiB
    rows = (
        _row(
            "fp32 (baseline)",
            {
                M.PARAMETER: P,
                M.GRADIENT: 7 * MiB,
                M.OPTIMIZER_STATE: OPT,
                M.ACTIVATION: 2603 * MiB,
                M.TEMPORARY: 24 * MiB,
            },
            baseline=True,
            fit=CompareFit("nvml", 820, 656, True),
        ),
        _row(
            "fp16",
            {
                M.PARAMETER: P // 2,
                M.GRADIENT: 3 * MiB,
                M.OPTIMIZER_STATE: OPT // 2,
                M.ACTIVATION: 1100 * MiB,
                M.TEMPORARY: 12 * MiB,
            },
            best=True,
            dtype="fp16",
            delta=-1664 * MiB,
            pct=-56.9,
            fit=CompareFit("nvml", 1700, 1360, True),
            notes=("fp16: no fp32 master weights",),
        ),
        _row(
            "checkpointing blocks",
            {
                M.PARAMETER: P,
                M.GRADIENT: 64 * MiB,
                M.OPTIMIZER_STATE: OPT,
                M.ACTIVATION: 882 * MiB,
                M.TEMPORARY: 122 * MiB,
            },
            delta=-1566 * MiB,
            pct=-53.5,
            module="layer3.5.relu",
            fit=CompareFit("nvml", 1650, 1320, True, exact=False),
            recompute=RecomputeInfo(
                "16 × Bottleneck (repeated blocks)", 16, 261_700_000_000, 254_000_000_000, 32.4, True
            ),
        ),
        _row(
            "amp-fp16",
            {
                M.PARAMETER: P,
                M.GRADIENT: 7 * MiB,
                M.OPTIMIZER_STATE: OPT,
                M.ACTIVATION: 1380 * MiB,
                M.TEMPORARY: 12 * MiB,
            },
            dtype="amp-fp16",
            delta=-1235 * MiB,
            pct=-41.0,
            fit=CompareFit("nvml", 1420, 1136, True),
            measured=CompareMeasurement("allocated", 1700 * MiB, 1690 * MiB, -0.6, max_batch=1400),
        ),
        CompareRow(
            label="checkpointing sqrt",
            changes={"checkpointing": "sqrt"},
            workload={"model": "resnet50", "batch_size": 32, "dtype": "fp32", "mode": "train"},
            baseline=False,
            peak_bytes=None,
            parameter_bytes=None,
            gradient_bytes=None,
            optimizer_state_bytes=None,
            activation_bytes=None,
            temporary_bytes=None,
            input_bytes=None,
            buffer_bytes=None,
            breakdown_at_peak={},
            delta_bytes=None,
            delta_pct=None,
            peak_phase=None,
            peak_module=None,
            fit=None,
            recompute=None,
            measured=None,
            error="no nn.Sequential to cut (use blocks)",
        ),
    )
    return CompareResult(
        model="resnet50",
        base_workload={
            "model": "resnet50",
            "batch_size": 32,
            "input": "3×224×224",
            "optimizer": "adam",
            "mode": "train",
        },
        target="cuda",
        peak_metric="torch.cuda.max_memory_allocated()",
        capacity=Capacity(80 * 2**30, "--gpu-memory"),
        capacity_note=None,
        headroom=0.8,
        rows=rows,
        best_label="fp16",
        safe_best_label="checkpointing blocks",
        notes=("a result note",),
    )


def rendered(result) -> str:
    buf = io.StringIO()
    render_compare(result, Console(file=buf, width=120, no_color=True, highlight=False, force_terminal=False))
    return buf.getvalue()


def test_golden_table():
    assert_golden("compare_table.txt", rendered(golden_result()))


def _step_time(seconds: float, batch: int = 32) -> StepTime:
    return StepTime(
        gpu="NVIDIA H100 SXM5 80GB",
        seconds=seconds,
        forward_seconds=seconds / 3,
        backward_seconds=2 * seconds / 3,
        optimizer_seconds=0.0,
        compute_bound_seconds=seconds / 4,
        memory_bound_seconds=3 * seconds / 4,
        step_bytes=10 * 2**30,
        samples_per_second=batch / seconds,
        tokens_per_second=None,
        peak_flops_per_s={"tf32": 494.7e12},
        bandwidth_bytes_per_s=3.35e12,
    )


def compute_result() -> CompareResult:
    """The golden result with traced FLOPs and the step-time model: checkpointing's compute beside its memory."""
    base = golden_result()
    per_sample = {"fp32 (baseline)": 24.3e9, "fp16": 24.3e9, "checkpointing blocks": 32.2e9, "amp-fp16": 24.3e9}
    times = {"fp32 (baseline)": 0.0082, "fp16": 0.0041, "checkpointing blocks": 0.0105, "amp-fp16": 0.0045}
    rows = []
    for r in base.rows:
        if r.label in per_sample:
            f = per_sample[r.label]
            r = dataclasses.replace(
                r,
                step_flops=int(32 * f),
                flops_per_sample=f,
                compute_delta_pct=None if r.baseline else 100.0 * (f - 24.3e9) / 24.3e9,
                step_time=_step_time(times[r.label]),
            )
        rows.append(r)
    return dataclasses.replace(base, rows=tuple(rows), gpu="NVIDIA H100 SXM5 80GB")


def test_golden_compute_columns():
    text = rendered(compute_result())
    assert_golden("compare_compute.txt", text)
    table = text.split("Memory and compute", 1)[1]
    line = next(line for line in table.splitlines() if line.startswith("checkpointing blocks"))
    assert "-53.5 %" in line and "+33 %" in line and "3,048" in line  # memory saved and compute added, one row
    assert "not measured" in text


def test_compute_columns_in_json():
    doc = json.loads(json.dumps(compare_document(compute_result())))
    row = doc["rows"][2]
    assert row["label"] == "checkpointing blocks" and row["compute_delta_pct"] == pytest.approx(32.5, abs=0.1)
    assert row["step_time"]["label"] == "model, not measured" and row["step_time"]["samples_per_second"] > 3000


def test_bars_keep_the_total_width():
    chart = compare_chart(golden_result())
    widest = chart.bars[0]
    assert sum(n for _, n in bar_cells(widest, widest.total, 40)) == 40
    # stacked in category order; 7 MiB of gradients is under half a character of 2.9 GiB and vanishes
    drawn = [chart.segments[i].label for i, _ in bar_cells(widest, widest.total, 40)]
    assert drawn == [M.PARAMETER.value, M.OPTIMIZER_STATE.value, M.ACTIVATION.value]


def test_json_document():
    doc = json.loads(json.dumps(compare_document(golden_result())))
    assert doc["kind"] == "compare" and doc["schema_version"] == 1
    assert doc["rows"][0]["breakdown_at_peak"]["parameter"] == 97 * MiB
    assert doc["rows"][2]["recompute"]["recompute_flops"] == 254_000_000_000
    assert doc["verdict"].startswith("Lowest peak: fp16") and doc["best_label"] == "fp16"


# --------------------------------------------------------------------------- CLI (real tracer, tiny GPT)
GPT = [
    "memprof.zoo:GPT",
    "--model-kwargs",
    '{"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}',
    "-i",
    "16",
    "-b",
    "4",
]


def invoke(*args):
    return CliRunner().invoke(app, ["compare", *args])


def test_cli_json_rows_behave():
    res = invoke(*GPT, "--no-fit", "--dtype", "amp-bf16", "--dtype", "bf16", "-c", "blocks", "--mode", "eval", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    rows = {r["label"]: r for r in doc["rows"]}
    base, amp, bf16 = rows["fp32 (baseline)"], rows["amp-bf16"], rows["bf16"]
    ck, ev = rows["checkpointing blocks"], rows["eval (no_grad)"]
    assert amp["parameter_bytes"] == base["parameter_bytes"]
    assert amp["optimizer_state_bytes"] == base["optimizer_state_bytes"]
    assert bf16["parameter_bytes"] < 0.6 * base["parameter_bytes"]  # half, plus 512-byte rounding of small tensors
    assert ck["activation_bytes"] < base["activation_bytes"] / 2
    assert ck["recompute"]["regions"] == 2 and ck["recompute"]["recompute_flops"] > 0
    assert ev["gradient_bytes"] == 0 and ev["optimizer_state_bytes"] == 0
    assert doc["capacity"] is None and doc["target"] == "cuda"


def test_cli_cpu_measure_agrees_with_prediction(tmp_path):
    plot = tmp_path / "bars.svg"
    res = invoke(
        *GPT, "--device", "cpu", "--memory-limit", "32MiB", "--measure", "-c", "blocks", "--plot", str(plot), "--json"
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert "<svg" in plot.read_text() and all(r["label"] in plot.read_text() for r in doc["rows"])
    assert doc["target"] == "cpu" and doc["capacity"]["source"] == "--memory-limit"
    for r in doc["rows"]:
        assert abs(r["measured"]["error_pct"]) < 2.0, r["label"]
        assert r["fit"]["max_batch"] > 4 and r["fit"]["metric"] == "allocated"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--plot", "/no/such/folder/x.svg"], "does not exist"),
        (["--plot", "bars.gif"], "unknown format"),
        (["--find-batch"], "needs --measure"),
        (["--memory-limit", "1GiB", "--device", "cuda"], "--memory-limit is for --device cpu"),
        (["--dtype", "fp8"], "unknown dtype"),
        (["-c", "often"], "unknown checkpointing mode"),
        (["--headroom", "1.5"], "--headroom"),
    ],
)
def test_cli_usage_errors(args, message):
    res = invoke(*GPT, *args)
    assert res.exit_code == 2
    assert message in res.stderr and "HINT:" in res.stderr and "Traceback" not in res.output


def test_cli_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = invoke(*GPT, "--plot", str(tmp_path / "x.png"))
    assert res.exit_code == 2 and "matplotlib" in res.stderr and "pip install" in res.stderr


def test_cli_measure_without_gpu_says_what_to_do():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    res = invoke(*GPT, "--measure")
    assert res.exit_code == 3 and "--device cpu" in res.stderr


def test_capacity_from_flag_nvml_or_nothing(monkeypatch):
    from memprof.commands.compare import resolve_capacity
    from memprof.engine import nvml

    cap, note = resolve_capacity("cuda", 24 * 2**30, None)
    assert cap.total_bytes == 24 * 2**30 and cap.source == "--gpu-memory" and note is None
    gpu = nvml.GPUInfo(0, "NVIDIA H100 80GB HBM3", None, 80 * 10**9, 10**9, 79 * 10**9)
    monkeypatch.setattr(nvml, "device_info", lambda index=0: gpu)
    cap, _ = resolve_capacity("cuda", None, None)
    assert cap.total_bytes == 80 * 10**9 and cap.source == "NVML: NVIDIA H100 80GB HBM3 (GPU 0)"
    monkeypatch.setattr(nvml, "device_info", lambda index=0: None)
    monkeypatch.setattr(nvml, "available", lambda: (False, "NVML could not start: driver not loaded"))
    cap, note = resolve_capacity("cuda", None, None)
    assert cap is None and "driver not loaded" in note and "--gpu-memory" in note
    cap, note = resolve_capacity("cpu", None, 8 * 2**30)
    assert cap.source == "--memory-limit" and cap.total_bytes == 8 * 2**30


def test_same_peak_larger_batch_counts_as_better():
    # at a small batch the peak sits in the optimizer step: AMP does not move it, but fits a larger batch
    from memprof.engine.workload import get_precision

    def trace(workload, *, target):
        return fake_trace(workload.replace(precision=get_precision("fp32")), target=target)

    def fit_fn(workload, capacity, *, target, headroom, max_batch, traced, trace_fn):
        best = 200 if workload.precision.is_amp else 100
        return CompareFit("nvml", best, int(headroom * best), True)

    result = run(
        axes={"dtype": ["amp-bf16", "bf16"]}, trace_fn=trace, fit_fn=fit_fn, capacity=Capacity(2**30, "--gpu-memory")
    )
    assert row(result, "amp-bf16").delta_bytes == 0 and result.best_label == "amp-bf16"
    assert [r.label for r in result.rows] == ["fp32 (baseline)", "amp-bf16", "bf16"]
    assert verdict_text(result).startswith("Same peak, larger batch: amp-bf16 (")
