"""``memprof find-batch`` end to end on the CPU under a cap, plus its renderings and exit codes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import assert_golden
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memprof.cli import app
from memprof.commands.find_batch import find_batch
from memprof.engine.fit import accumulation, exact_accumulation, recommend
from memprof.engine.loading import load_model
from memprof.engine.measure import CpuCapRunner
from memprof.engine.workload import Workload
from memprof.results import BatchPrediction, BatchTrial, Capacity, FindBatchResult

runner = CliRunner()
MODEL = "memprof.zoo:mnist_mlp"
CAP = 2_950_001  # an awkward cap: the limit falls at batch 165 with Adam, 2 steps


def _run(*args):
    return runner.invoke(app, ["find-batch", MODEL, *args])


def _mlp(optimizer="adam", loop="plain"):
    return Workload(model=load_model(MODEL, {}), batch_size=1, optimizer=optimizer, loop=loop)


def test_cpu_find_batch_is_exact_and_verified(tmp_path):
    plot = tmp_path / "peak.svg"
    res = _run(
        "--device", "cpu", "--memory-limit", str(CAP), "--json", "--plot", str(plot), "--target-global-batch", "1000"
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "find-batch" and doc["schema_version"] == 1 and doc["status"] == "exact"
    largest = doc["largest_batch"]
    assert doc["smallest_oom_batch"] == largest + 1
    assert len(doc["trials"]) <= 4 and doc["ooms"] <= 2
    assert doc["recommended_batch"] == int(0.8 * largest)
    assert doc["grad_accum_steps"] * doc["micro_batch"] >= 1000
    # check the answer ourselves: the reported batch fits under the cap and the next one does not
    cap_runner = CpuCapRunner(CAP)
    assert cap_runner.run(_mlp(), largest, steps=2).fits
    assert not cap_runner.run(_mlp(), largest + 1, steps=2).fits
    assert "<svg" in plot.read_text() and f"recommended batch {doc['recommended_batch']}" in plot.read_text()


def test_cpu_find_batch_table_and_chart():
    res = _run("--device", "cpu", "--memory-limit", "3000000", "--multiple-of", "8", "--optimizer", "sgd")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "Trials" in out and "Largest batch that fits:" in out and "Recommended batch:" in out
    assert "multiple of 8" in out and "o measured (fits)" in out
    assert "trial 1: batch" in res.stderr  # progress on stderr, one line per trial off a terminal


def test_search_without_prediction_is_exact_too():
    # "exact" means the search itself ran the answer (fits) and the answer + 1 (OOM) for real
    # the trial budget below was set with the output dropped before backward (where the limit falls matters)
    res = find_batch(_mlp("sgd", loop="trainer"), device="cpu", memory_limit=CAP, predict=False)
    assert res.status == "exact" and res.prediction is None and len(res.trials) <= 8
    by_batch = {t.batch_size: t.fits for t in res.trials}
    assert by_batch[res.largest_batch] is True and by_batch[res.largest_batch + 1] is False


def test_nothing_fits_exits_4():
    res = _run("--device", "cpu", "--memory-limit", "100kB")
    assert res.exit_code == 4, res.output
    assert "ERROR: not even batch 1 fits in 97.7 KiB" in res.stderr
    assert "HINT:" in res.stderr and "Traceback" not in res.output


def test_no_gpu_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    res = _run()
    assert res.exit_code == 3
    assert res.stderr.splitlines()[0] == "ERROR: find-batch needs a CUDA GPU and none is available"
    assert "--device cpu --memory-limit 4GiB" in res.stderr and "memprof estimate" in res.stderr


def test_bad_inputs_fail_before_any_trial(tmp_path):
    res = _run("--device", "cpu", "--memory-limit", "4GiB", "--plot", str(tmp_path / "missing" / "x.svg"))
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = _run("--device", "cpu", "--memory-limit", "4GiB", "--plot", str(tmp_path / "x.gif"))
    assert res.exit_code == 2 and ".svg" in res.stderr
    res = _run("--device", "cpu")
    assert res.exit_code == 2 and "--memory-limit" in res.stderr
    res = _run("--device", "cpu", "--memory-limit", "4GiB", "--max-batch", "0")
    assert res.exit_code == 2 and "--max-batch" in res.stderr


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = _run("--device", "cpu", "--memory-limit", "4GiB", "--plot", str(tmp_path / "x.svg"))
    assert res.exit_code == 2 and "matplotlib" in res.stderr and "pip install" in res.stderr


def test_ctrl_c_prints_what_was_found_and_exits_130(monkeypatch):
    real_run = CpuCapRunner.run
    calls = []

    def run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(CpuCapRunner, "run", run)
    res = _run("--device", "cpu", "--memory-limit", str(CAP))
    assert res.exit_code == 130, res.output
    assert "Interrupted: so far batch" in res.stdout
    assert "ERROR: interrupted" in res.stderr


@settings(max_examples=300, deadline=None)
@given(thousandths=st.integers(1, 1000), largest=st.integers(1, 1_000_000))
def test_recommend_is_floor_of_the_typed_headroom(thousandths, largest):
    """One rounding rule: floor(headroom x largest) in exact decimal arithmetic (0.35 x 180 = 63, not 62)."""
    headroom = thousandths / 1000  # a headroom as typed, up to 3 decimals
    assert recommend(largest, headroom) == max(1, thousandths * largest // 1000)
    for multiple in (8, 64):
        rec = recommend(largest, headroom, multiple)
        if largest < multiple:
            assert rec is None
        else:
            assert rec is not None and rec % multiple == 0 and rec <= largest
            floor = max(1, thousandths * largest // 1000)
            assert rec == (floor // multiple * multiple or largest // multiple * multiple)


def test_recommend_and_accumulation():
    assert recommend(180, 0.35) == 63  # issue 10: two copies of the rule gave 62
    assert recommend(181, 0.8, None) == 144
    assert recommend(181, 0.8, 64) == 128
    assert recommend(100, 0.8, 128) is None
    assert recommend(10, 0.8, 16) is None
    assert recommend(1, 0.8, None) == 1
    assert accumulation(1000, 144) == (7, 143)  # the fewest steps: 7 x 143 = 1001
    assert exact_accumulation(1000, 144) == (8, 125)  # or 8 x 125 = 1000 exactly
    assert accumulation(1024, 256) == (4, 256)
    assert accumulation(1009, 300) == (4, 253)  # a prime: rounds the global batch up to 1012
    assert exact_accumulation(1009, 300) is None
    assert accumulation(None, 300) == (None, None)


def _hand_built() -> FindBatchResult:
    cap = 3 * 1024**3
    trials = (
        BatchTrial(
            1470,
            True,
            2,
            2.41,
            peak_allocated_bytes=2_899_102_720,
            capacity_bytes=cap,
            predicted_bytes=2_899_102_720,
            reason="prediction",
            leaked_bytes=0,
        ),
        BatchTrial(
            1633,
            True,
            2,
            2.66,
            peak_allocated_bytes=3_220_172_800,
            capacity_bytes=cap,
            predicted_bytes=3_210_000_000,
            reason="extrapolate",
            leaked_bytes=0,
        ),
        BatchTrial(
            1634,
            False,
            0,
            1.93,
            capacity_bytes=cap,
            error="DefaultCPUAllocator: can't allocate memory: ...",
            oom_detected_by="exception type",
            oom_phase="step 1 backward",
            attempted_bytes=3_221_300_000,
            predicted_bytes=3_212_000_000,
            reason="confirm",
            leaked_bytes=0,
        ),
    )
    return FindBatchResult(
        workload={
            "model": "resnet18",
            "batch_size": None,
            "input": "3×64×64",
            "dtype": "fp32",
            "optimizer": "adam",
            "mode": "train",
            "checkpointing": "none",
            "inplace_relu": False,
        },
        device="cpu (live tensor bytes capped)",
        capacity=Capacity(cap, "--memory-limit", "cpu"),
        metric="allocated",
        steps=2,
        status="exact",
        largest_batch=1633,
        smallest_oom_batch=1634,
        recommended_batch=1304,
        recommended_expected_bytes=2_576_000_000,
        headroom_left_bytes=cap - 2_576_000_000,
        headroom=0.8,
        multiple_of=8,
        min_batch=1,
        max_batch=4096,
        trials=trials,
        ooms=1,
        prediction=BatchPrediction(1634, 1_960_000, 17_900_000, "allocated", 0.9, 4),
        slope_bytes_per_sample=1_966_000.0,
        intercept_bytes=10_000_000.0,
        target_global_batch=4096,
        grad_accum_steps=4,
        micro_batch=1024,
        wall_seconds=8.0,
        notes=(),
    )


def test_golden_rendering():
    from rich.console import Console

    from memprof.render.find_batch import render_find_batch

    console = Console(width=100, record=True, file=open("/dev/null", "w"), color_system=None)
    render_find_batch(_hand_built(), console)
    assert_golden("find_batch_cpu.txt", console.export_text())


def _hand_built_cuda() -> FindBatchResult:
    cap = 79_000_000_000
    common = dict(capacity_bytes=cap, leaked_bytes=0)
    trials = (
        BatchTrial(
            201,
            True,
            2,
            3.1,
            peak_allocated_bytes=70_100_000_000,
            peak_reserved_bytes=71_300_000_000,
            nvml_used_bytes=71_900_000_000,
            cuda_overhead_bytes=600_000_000,
            predicted_bytes=70_900_000_000,
            reason="prediction",
            **common,
        ),
        BatchTrial(
            223,
            True,
            2,
            3.4,
            peak_allocated_bytes=77_700_000_000,
            peak_reserved_bytes=78_950_000_000,
            nvml_used_bytes=79_550_000_000,
            cuda_overhead_bytes=600_000_000,
            predicted_bytes=78_600_000_000,
            reason="extrapolate",
            **common,
        ),
        BatchTrial(
            224,
            False,
            1,
            2.2,
            peak_reserved_bytes=78_990_000_000,
            error="CUDA out of memory. Tried to ...",
            oom_detected_by="exception type",
            oom_phase="step 2 forward",
            predicted_bytes=78_950_000_000,
            reason="confirm",
            **common,
        ),
    )
    base = _hand_built()
    return replace(
        base,
        device="cuda:0 NVIDIA H100 80GB HBM3",
        metric="reserved",
        capacity=Capacity(cap, "torch.cuda.mem_get_info: free + reserved at start", "cuda:0"),
        largest_batch=223,
        smallest_oom_batch=224,
        recommended_batch=176,
        recommended_expected_bytes=62_400_000_000,
        headroom_left_bytes=cap - 62_400_000_000,
        trials=trials,
        prediction=BatchPrediction(224, 351_000_000, 300_000_000, "reserved", 1.2, 4),
        target_global_batch=None,
        grad_accum_steps=None,
        micro_batch=None,
    )


def test_golden_rendering_cuda():
    from rich.console import Console

    from memprof.render.find_batch import render_find_batch

    console = Console(width=120, record=True, file=open("/dev/null", "w"), color_system=None)
    render_find_batch(_hand_built_cuda(), console, chart=False)
    assert_golden("find_batch_cuda.txt", console.export_text())


@pytest.mark.gpu
def test_cuda_find_batch_respects_max_batch_and_reports_overhead():
    res = find_batch(_mlp("sgd"), device="cuda", max_batch=64)
    assert res.status == "max_batch" and res.largest_batch == 64 and len(res.trials) <= 2
    trial = res.trials[-1]
    assert trial.peak_reserved_bytes >= trial.peak_allocated_bytes > 0
    assert trial.leaked_bytes == 0


@pytest.mark.gpu
def test_cuda_isolated_trials():
    res = find_batch(_mlp("sgd"), device="cuda", max_batch=8, isolate=True, predict=False)
    assert res.largest_batch == 8 and "child process" in res.device
    assert all(t.capacity_bytes for t in res.trials)  # each child measured what it could reserve
