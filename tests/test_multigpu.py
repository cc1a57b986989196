"""Multi-GPU commands: per-rank estimates and sweeps, the strategy axis of compare, bad input, and the real
torchrun jobs (per-rank measurement, find-batch and profile on 2 CPU processes with gloo)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import assert_golden
from rich.console import Console
from typer.testing import CliRunner

from memprof.cli import app
from memprof.commands.compare import compare
from memprof.commands.scaling import scale
from memprof.engine import distributed, torchrun
from memprof.engine.loading import InputSpec, ModelSpec
from memprof.engine.torchrun import Launch, _agree, _Reply, check_launch
from memprof.engine.trace import trace_step
from memprof.engine.workload import Workload
from memprof.errors import MeasureError, UsageError
from memprof.render.charts import figure, scaling_chart, svg_text, terminal
from memprof.render.scaling import render_scaling
from memprof.results import BatchTrial, Capacity, ScalingResult, ScalingRow
from memprof.units import GiB, MiB
from memprof.zoo import Cruncher

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
GPT_KWARGS = '{"vocab_size": 512, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128}'
DIM = 128
PARAM_BYTES = (4 * DIM * DIM + DIM) * 4


def cruncher(batch: int = 32, **kw) -> Workload:
    spec = ModelSpec(
        "Cruncher", "Cruncher", Cruncher, {"dim": DIM, "num_layers": 4}, InputSpec([(DIM,)], "float"), source="module"
    )
    return Workload(spec, batch_size=batch, **kw)


# --------------------------------------------------------------------------- sweeps over world sizes
def test_scale_shrinks_model_states_keeps_activations_and_raises_the_batch():
    w = cruncher(strategy="fsdp", world_size=8)
    result = scale(w, [1, 2, 8], capacity=Capacity(64 * MiB, "test"), target="cpu")
    one, two, eight = result.rows
    assert (one.strategy, two.strategy) == ("none", "fsdp")
    assert one.activation_bytes == two.activation_bytes == eight.activation_bytes
    assert two.model_state_bytes == pytest.approx(one.model_state_bytes / 2, rel=0.02)
    assert eight.model_state_bytes == pytest.approx(one.model_state_bytes / 8, rel=0.05)
    assert one.peak_bytes > two.peak_bytes > eight.peak_bytes
    assert one.max_batch < two.max_batch < eight.max_batch
    assert eight.global_batch == 8 * eight.max_batch
    # the batch each row reports fits under the tracer, and one more does not
    for row, n in ((two, 2), (eight, 8)):
        fits = trace_step(w.replace(world_size=n, batch_size=row.max_batch), target="cpu").peak_bytes
        over = trace_step(w.replace(world_size=n, batch_size=row.max_batch + 1), target="cpu").peak_bytes
        assert fits <= 64 * MiB < over


def _scaling_result() -> ScalingResult:
    rows = (
        ScalingRow(1, "none", 3 * GiB, 3 * GiB, 2 * GiB, 700 * MiB, 0, 0, None, 10, 8, True, "backward"),
        ScalingRow(8, "fsdp", 1228 * MiB, 1300 * MiB, 256 * MiB, 700 * MiB, 200 * MiB, 64 * MiB, None, 40, 32, True),
        ScalingRow(64, "fsdp", 1000 * MiB, 1100 * MiB, 32 * MiB, 700 * MiB, 200 * MiB, 64 * MiB, None, 44, 35, True),
    )
    workload = {"model": "gpt-test", "batch_size": 8, "dtype": "bf16", "optimizer": "adamw", "mode": "train"}
    return ScalingResult(
        workload, "fsdp", "cuda", "nvml", Capacity(4 * GiB, "--gpu-memory"), None, 0.8, rows, ("world size 1 ...",)
    )


def test_scaling_render_golden():
    console = Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None)
    render_scaling(_scaling_result(), console)
    text = console.file.getvalue()
    assert_golden("scaling_table.txt", text)
    assert "gather+comm" in text and "batch/rank" in text


def test_scaling_charts_show_every_size_and_the_capacity():
    result = _scaling_result()
    chart = scaling_chart(result)
    assert [b.label for b in chart.bars] == ["1 rank", "8 ranks", "64 ranks"]
    # each bar's parts sum to the rank's peak; the capacity is the limit
    assert [sum(b.values) for b in chart.bars] == [b.total for b in chart.bars] == [r.peak_bytes for r in result.rows]
    assert chart.limit is not None and chart.limit.y == 4 * GiB
    text = terminal(chart, width=40).plain
    lines = text.splitlines()
    assert lines[1].lstrip().startswith("1 rank") and "batch/rank 10" in lines[1]
    assert "64 ranks" in lines[3] and "batch/rank 44" in lines[3]
    assert "| capacity 4.0 GiB" in text
    # bars are proportional: the 1-rank bar (3 GiB of a 4 GiB scale, 40 columns) has 30 cells; the capacity at 40
    assert lines[1].index("|") == lines[1].index("█") + 39
    assert sum(lines[1].count(g) for g in "█░▒·") == 30
    fig = figure(chart)
    ax = fig.axes[0]
    assert ax.get_xlim()[1] > 4 * GiB
    assert [a for a in ax.lines if a.get_gid() == "capacity"][0].get_xdata()[0] == 4 * GiB
    svg = svg_text(chart)
    assert 'id="capacity"' in svg and 'id="bar-2-segment-0"' in svg and "batch/rank 44" in svg


# --------------------------------------------------------------------------- compare's strategy axis
def test_compare_rows_per_strategy():
    result = compare(cruncher(), {"strategy": ["ddp:4", "fsdp:4"]}, target="cpu", fit=False)
    rows = {r.label: r for r in result.rows}
    base, ddp, fsdp = rows["fp32 (baseline)"], rows["ddp × 4"], rows["fsdp × 4"]
    assert ddp.peak_bytes - base.peak_bytes == PARAM_BYTES  # DDP's buckets
    assert fsdp.parameter_bytes < base.parameter_bytes / 3
    assert fsdp.workload["strategy"] == "fsdp" and fsdp.workload["world_size"] == 4


# --------------------------------------------------------------------------- bad input
def _estimate(*args):
    return runner.invoke(app, ["estimate", "memprof.zoo:mnist_mlp", "--gpu-memory", "8GiB", *args])


@pytest.mark.parametrize(
    "args, words, hint",
    [
        (["--strategy", "zero9"], "unknown --strategy 'zero9'", "ddp, zero1, zero2, zero3, fsdp"),
        (["--world-size", "8"], "--world-size needs --strategy", "--strategy"),
        (["--strategy", "ddp", "--world-size", "two"], "cannot read --world-size", "1,2,8,64,1024"),
        (["--strategy", "ddp", "--offload", "params"], "--offload params needs a sharded strategy", "fsdp"),
    ],
)
def test_bad_parallel_options_are_one_line_and_a_hint(args, words, hint):
    res = _estimate(*args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("ERROR: ") and lines[1].startswith("HINT: ")
    assert words in lines[0] and hint in lines[1]
    assert "Traceback" not in res.output


def test_a_strategy_the_installed_torch_lacks(monkeypatch):
    monkeypatch.setattr(distributed, "_fully_shard", lambda: None)
    res = _estimate("--strategy", "fsdp", "--world-size", "8")
    assert res.exit_code == 2
    assert "needs FSDP2 (torch.distributed.fsdp.fully_shard)" in res.stderr and "HINT: upgrade to torch" in res.stderr


def test_more_processes_than_gpus(monkeypatch):
    monkeypatch.setattr(torchrun, "cuda_device_count", lambda: 2)
    with pytest.raises(UsageError) as info:
        check_launch(Launch(4), "cuda")
    assert info.value.message == "`nproc_per_node` 4 is more than the 2 CUDA device(s) here"
    assert "one process per GPU" in info.value.hint
    check_launch(Launch(2), "cuda")  # as many as there are: fine
    check_launch(Launch(4), "cpu")  # CPU processes need no GPU


def test_find_batch_nproc_needs_a_strategy_and_strategy_needs_nproc():
    res = runner.invoke(
        app, ["find-batch", "memprof.zoo:mnist_mlp", "--strategy", "ddp", "--device", "cpu", "--memory-limit", "1GiB"]
    )
    assert res.exit_code == 2 and "needs --nproc-per-node" in res.stderr
    with pytest.raises(UsageError) as info:
        check_launch(Launch(2, nnodes=2), "cpu")
    assert "rendezvous endpoint" in info.value.message
    assert Launch(2).torchrun_args() == ["--nproc-per-node=2", "--standalone"]
    assert Launch(4, 2, 1, "10.0.0.1:29500", "job7").torchrun_args() == [
        "--nproc-per-node=4",
        "--nnodes=2",
        "--node-rank=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29500",
        "--rdzv-id=job7",
    ]


# --------------------------------------------------------------------------- the ranks' agreement
def _trial(batch, fits, peak=None, leaked=0, cap=100):
    return BatchTrial(
        batch, fits, 2 if fits else 0, 1.0, peak, capacity_bytes=cap, leaked_bytes=leaked, error=None if fits else "OOM"
    )


def test_ranks_agree_an_oom_on_any_rank_is_an_oom_for_all():
    replies = [_Reply(0, None, ("MeasureError", "batch 7: the training step failed: Timed out waiting", None)),
               _Reply(1, _trial(7, False, leaked=0, cap=90))]  # fmt: skip
    agreed = _agree(replies, 30)
    assert not agreed.fits and agreed.error == "rank 1: OOM" and agreed.capacity_bytes == 90


def test_ranks_agree_on_the_largest_peak_and_every_leftover():
    agreed = _agree([_Reply(0, _trial(7, True, 50, 0)), _Reply(1, _trial(7, True, 60, 128, cap=90))], 30)
    assert agreed.fits and agreed.peak_allocated_bytes == 60 and agreed.rank_peaks_bytes == (50, 60)
    assert agreed.leaked_bytes == 128 and agreed.capacity_bytes == 90


def test_a_rank_failing_for_another_reason_stops_the_search():
    with pytest.raises(MeasureError) as info:
        _agree([_Reply(0, _trial(7, True, 50)), _Reply(1, None, ("MeasureError", "shape mismatch", "fix it"))], 30)
    assert info.value.message == "rank 1: shape mismatch" and info.value.hint == "fix it"
    with pytest.raises(MeasureError) as timed_out:
        _agree([_Reply(0, None, ("MeasureError", "Timed out waiting 30000ms", None))], 30)
    assert "--collective-timeout" in timed_out.value.hint


# --------------------------------------------------------------------------- real torchrun jobs (2 CPU processes)
def _gpt(strategy: str) -> Workload:
    from memprof.commands.workload import make_workload

    return make_workload(
        "memprof.zoo:GPT",
        batch_size=4,
        model_kwargs=json.loads(GPT_KWARGS),
        input_shape=[(64,)],
        input_dtype="int64",
        strategy=strategy,
        world_size=2,
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_each_rank_of_a_real_job_matches_the_prediction(strategy):
    w = _gpt(strategy)
    predicted = trace_step(w, target="cpu").peak_bytes
    measured = torchrun.measure_ranks(w, Launch(2))
    assert sorted(measured) == [0, 1]
    for rank in measured.values():
        assert abs(predicted - rank["peak_bytes"]) / rank["peak_bytes"] <= 0.02


@pytest.mark.slow
def test_find_batch_on_two_processes_is_exact_within_six_trials():
    from memprof.commands.find_batch import find_batch_torchrun

    cap = 37 * MiB + 12_345  # awkward
    result = find_batch_torchrun(_gpt("fsdp"), Launch(2), device="cpu", memory_limit=cap)
    assert result is not None and result.status == "exact"
    assert len(result.trials) <= 6
    largest = result.largest_batch
    by_batch = {t.batch_size: t for t in result.trials}
    assert by_batch[largest].fits and not by_batch[largest + 1].fits
    assert len(by_batch[largest].rank_peaks_bytes) == 2  # both ranks ran it, both fit
    assert all(p <= cap for p in by_batch[largest].rank_peaks_bytes)
    assert all(t.leaked_bytes == 0 for t in result.trials)  # every rank verified clean after every trial
    assert result.workload["world_size"] == 2 and "2 ranks" in result.device


@pytest.mark.slow
def test_an_oom_on_one_rank_only_is_agreed_by_both():
    """Rank 1 gets the smaller cap: it runs out of memory where rank 0 does not, and both recover."""
    from memprof.commands.find_batch import find_batch_torchrun

    caps = [48 * MiB, 32 * MiB]
    result = find_batch_torchrun(_gpt("ddp"), Launch(2), device="cpu", memory_limit=caps, collective_timeout=15)
    assert result is not None and result.status == "exact"
    assert result.capacity.total_bytes == 32 * MiB
    ooms = [t for t in result.trials if not t.fits]
    assert ooms and all(t.error.startswith("rank 1: ") for t in ooms)
    assert all(t.leaked_bytes == 0 for t in result.trials)


@pytest.mark.slow
def test_profile_every_rank_of_a_torchrun_job():
    from memprof.commands.profile import profile_ranks

    output: list[str] = []
    result = profile_ranks(ROOT / "scripts/examples/train_ddp.py", ["--steps", "2"], Launch(2), on_output=output.append)
    assert [rank for rank, _ in result.ranks] == [0, 1] and result.missing == () and result.exit_code == 0
    peaks = {rank: p.peak.bytes for rank, p in result.ranks}
    assert peaks[1] > peaks[0]  # rank 1 trains on twice the batch
    assert result.highest[0] == 1
    assert any("rank 1: final loss" in line for line in output)
    assert all(p.outcome.status == "ok" for _, p in result.ranks)
