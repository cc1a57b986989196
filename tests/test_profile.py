"""``memprof profile``: real scripts run in-process on CPU, hand-computed bytes; renders from hand-built results."""

from __future__ import annotations

import io
import json
import sys
import textwrap

import pytest
import torch
from conftest import assert_golden
from rich.console import Console
from typer.testing import CliRunner

from memprof.cli import app
from memprof.engine.profiler import profile_script
from memprof.errors import NoGPUError, UsageError
from memprof.render.profile import format_log, render_profile
from memprof.results import (
    LeakSuspect,
    LineStat,
    MemCategory,
    ModuleStat,
    ProfileCuda,
    ProfilePeak,
    ProfileResult,
    ScriptOutcome,
    TensorGroup,
    TimelineSample,
    to_dict,
)

runner = CliRunner()

# Linear(256, 512) + Linear(512, 10): weights and biases, fp32
PARAM_BYTES = (256 * 512 + 512 + 512 * 10 + 10) * 4  # 546,856
SPIKE_BYTES = 2_000_000 * 4

TRAIN = textwrap.dedent("""\
    import sys
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(256, 512)
            self.fc2 = nn.Linear(512, 10)

        def forward(self, x):
            h = F.relu(self.fc1(x))
            return self.fc2(h)


    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    known = torch.zeros(1000, 250)
    for i in range(int(sys.argv[1])):
        x = torch.randn(64, 256)
        y = torch.randint(0, 10, (64,))
        out = model(x)
        loss = crit(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == 2:
            spike = torch.zeros(2_000_000)
            del spike
    print("trained", sys.argv[1:], __name__)
""")
KNOWN_LINE = 22  # known = torch.zeros(1000, 250)
SPIKE_LINE = 32

LEAK = textwrap.dedent("""\
    import torch
    import torch.nn as nn

    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for step in range(8):
        x = torch.randn(32, 128)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss)
""")

CRASH = textwrap.dedent("""\
    import torch

    keep = torch.ones(256, 256)
    for i in range(5):
        t = torch.randn(100, 100)
        if i == 3:
            raise ValueError("bad batch %d" % i)
""")


@pytest.fixture()
def script(tmp_path):
    def write(text: str, name: str = "train.py"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def _line(result: ProfileResult, line: int) -> LineStat:
    return next(ln for ln in result.lines if ln.line == line)


def test_training_script_real_values(script):
    path = script(TRAIN)
    before_argv, before_path, before_trace = sys.argv[:], sys.path[:], sys.gettrace()
    from torch.nn.modules import module as mm

    hooks_before = (len(mm._global_forward_pre_hooks), len(mm._global_forward_hooks))
    r = profile_script(path, ["4"], top=0)
    # the run leaves nothing behind
    assert (sys.argv, sys.path, sys.gettrace()) == (before_argv, before_path, before_trace)
    assert (len(mm._global_forward_pre_hooks), len(mm._global_forward_hooks)) == hooks_before
    assert r.outcome == ScriptOutcome("ok", 0)
    # the line making a known 1,000,000-byte tensor shows +1,000,000, once
    known = _line(r, KNOWN_LINE)
    assert (known.hits, known.max_delta_bytes, known.alloc_bytes) == (1, 1_000_000, 1_000_000)
    assert known.live_at_exit_bytes == 1_000_000
    assert _line(r, 23).hits == 5  # the for line: 4 iterations + the last test
    # the peak: the spike, after step(): params + grads + Adam state + the spike alive
    p = r.peak
    assert p.location == f"train.py:{SPIKE_LINE}" and p.phase == "script"
    assert p.breakdown[MemCategory.PARAMETER] == PARAM_BYTES
    assert p.breakdown[MemCategory.GRADIENT] == PARAM_BYTES
    assert p.breakdown[MemCategory.OPTIMIZER_STATE] == 2 * PARAM_BYTES + 4 * 4  # exp_avg, exp_avg_sq, 4 step scalars
    assert p.tensors[0].shape == (2_000_000,) and p.tensors[0].bytes == SPIKE_BYTES
    assert p.tensors[0].origin == f"train.py:{SPIKE_LINE}"
    assert p.bytes == sum(p.breakdown.values())
    assert _line(r, SPIKE_LINE).max_delta_bytes == SPIKE_BYTES
    # Adam's state appears at the first step(): +2 x params + the step scalars
    assert _line(r, 30).max_delta_bytes == 2 * PARAM_BYTES + 16
    # modules: fc1's forward keeps its (64, 512) fp32 output
    mods = {m.name: m for m in r.modules}
    assert mods["Net.fc1"].forward_added_bytes == 64 * 512 * 4
    assert mods["Net.fc1"].type == "Linear" and mods["Net.fc1"].calls == 4
    assert mods["Net.fc1"].backward_alloc_bytes >= 4 * 512 * 256 * 4  # its weight gradient, every step
    assert mods["Net"].calls == 4 and mods["CrossEntropyLoss"].calls == 4
    assert not r.leaks
    assert r.device == "cpu" and r.cuda is None


def test_leak_is_flagged(script):
    r = profile_script(script(LEAK, "leak.py"))
    origins = {lk.origin: lk for lk in r.leaks}
    assert "leak.py:9" in origins  # loss = model(x)...: every execution's graph is alive
    assert origins["leak.py:9"].hits_alive == 8
    graph = origins["global 'losses'"]
    assert graph.hits_alive == 8 and "autograd graph" in graph.reason


def test_leak_inside_a_function_is_flagged_at_the_peak(script):
    # everything is freed when main() returns; the growth is still visible at the peak
    r = profile_script(
        script(
            textwrap.dedent("""\
        import torch


        def main():
            w = torch.randn(64, 64, requires_grad=True)
            kept = []
            for step in range(6):
                y = (torch.randn(16, 64) @ w).relu().sum()
                y.backward(retain_graph=True)
                kept.append(y)


        main()
    """),
            "leak_in_main.py",
        )
    )
    assert r.at_exit_bytes == 0
    (lk,) = r.leaks
    assert lk.origin == "leak_in_main.py:8" and lk.hits_alive == 6 and "at the peak" in lk.reason
    # each kept graph: the (16, 64) input, the (16, 64) matmul output saved by relu, the scalar sum
    assert lk.live_bytes == 6 * (2 * 16 * 64 * 4 + 4)


def test_crash_gives_partial_profile(script):
    r = profile_script(script(CRASH, "crash.py"))
    assert r.outcome.status == "exception" and r.outcome.exit_code == 1
    assert r.outcome.location == "crash.py:7" and r.outcome.error == "ValueError: bad batch 3"
    assert _line(r, 3).max_delta_bytes == 256 * 256 * 4
    assert _line(r, 5).hits == 4
    res = runner.invoke(app, ["profile", str(script(CRASH, "crash.py"))])
    assert res.exit_code == 1
    assert "Top lines" in res.stdout and "crash.py:3" in res.stdout
    # after the profile: the script's own traceback (its frames only), then one ERROR line
    lines = res.stderr.splitlines()
    assert lines[0] == "Traceback of the script (most recent call last; its own files only):"
    assert lines[1].endswith('crash.py", line 7, in <module>') and lines[2].strip().startswith("raise ValueError")
    assert lines[3] == "ValueError: bad batch 3"
    assert lines[4].startswith("ERROR: the script failed at crash.py:7") and len(lines) == 5
    assert "memprof" not in "\n".join(lines[:4]) and "runpy" not in res.stderr
    assert "Traceback" not in res.stdout


def test_sys_exit_and_argv(script, tmp_path):
    path = script(
        "import sys\nopen(sys.argv[2], 'w').write(repr((sys.argv, __name__)))\nsys.exit(int(sys.argv[1]))\n", "ex.py"
    )
    out = tmp_path / "seen.txt"
    res = runner.invoke(app, ["profile", str(path), "--", "3", str(out)])
    assert res.exit_code == 3
    assert eval(out.read_text()) == ([str(path), "3", str(out)], "__main__")
    res = runner.invoke(app, ["profile", str(path), "0", str(out)])
    assert res.exit_code == 0


def test_log_file(script, tmp_path):
    log = tmp_path / "log.txt"
    res = runner.invoke(app, ["profile", "--log", str(log), str(script(TRAIN)), "--", "3"])
    assert res.exit_code == 0, res.stderr
    text = log.read_text()
    assert f"train.py:{KNOWN_LINE}" in text
    block = text.split(f"train.py:{KNOWN_LINE} ")[1].splitlines()
    assert "total" in block[0] and "known = torch.zeros(1000, 250)" in block[0]
    assert block[1].strip() == "+ 1 x (1000, 250) float32 cpu 976.6 KiB"
    assert "- 1 x (2000000) float32 cpu 7.6 MiB  from train.py:32" in text  # the del of the spike


def test_json_keeps_script_output_off_stdout(script):
    res = runner.invoke(app, ["profile", "--json", str(script(TRAIN)), "--", "2"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema_version"] == 1 and doc["kind"] == "profile"
    assert doc["outcome"]["status"] == "ok"
    assert doc["peak"]["breakdown"]["parameter"] == PARAM_BYTES
    assert "trained ['2'] __main__" in res.stderr


def test_plots(script, tmp_path, monkeypatch):
    svg, page = tmp_path / "t.svg", tmp_path / "t.html"
    res = runner.invoke(app, ["profile", "--plot", str(svg), str(script(CRASH, "crash.py"))])
    assert res.exit_code == 1
    assert "<svg" in svg.read_text() and "peak 334.1 KiB at crash.py:5" in svg.read_text()
    res = runner.invoke(app, ["profile", "--plot", str(page), str(script(CRASH, "crash.py"))])
    assert "<html>" in page.read_text() and "<svg" in page.read_text() and "crash.py:5" in page.read_text()
    png = tmp_path / "t.png"
    res = runner.invoke(app, ["profile", "--plot", str(png), str(script(CRASH, "crash.py"))])
    assert res.exit_code == 1 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = runner.invoke(app, ["profile", "--plot", str(tmp_path / "t.png"), str(script(CRASH, "crash.py"))])
    assert res.exit_code == 2 and "matplotlib" in res.stderr and "HINT:" in res.stderr


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["profile", "no_such_script.py"], 2, "not found"),
        (["profile", "--plot", "x.gif", "no_such_script.py"], 2, "unknown format"),
        (["profile", "--top", "0", "x.py"], 2, "--top"),
    ],
)
def test_usage_errors(args, code, words):
    res = runner.invoke(app, args)
    assert res.exit_code == code
    assert res.stderr.startswith("ERROR: ") and words in res.stderr and "\nHINT: " in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_snapshot_needs_cuda(script):
    with pytest.raises(NoGPUError):
        profile_script(script(CRASH), snapshot_path="s.pickle")
    res = runner.invoke(app, ["profile", "--snapshot", "s.pickle", str(script(CRASH))])
    assert res.exit_code == 3 and "--snapshot needs CUDA" in res.stderr


def test_user_modules_next_to_the_script_count_and_workers_do_not_hang(tmp_path):
    (tmp_path / "helper.py").write_text("import torch\n\n\ndef make(n):\n    return torch.zeros(n, 100)\n")
    (tmp_path / "main.py").write_text(
        textwrap.dedent("""\
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from helper import make

        dl = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=16, num_workers=1)
        n = sum(len(b[0]) for b in dl)
        kept = make(n)
    """)
    )
    r = profile_script(tmp_path / "main.py")
    assert r.outcome.status == "ok"
    helper = next(ln for ln in r.lines if ln.file == "helper.py")
    assert (helper.line, helper.max_delta_bytes) == (5, 64 * 100 * 4)
    assert next(ln for ln in r.lines if ln.file == "main.py" and ln.line == 7).live_at_exit_bytes == 0  # via helper
    assert r.at_exit_bytes >= 64 * 100 * 4
    assert "helper" not in sys.modules  # imported from the script's folder: forgotten with it


def test_device_filter(script):
    r = profile_script(script(CRASH, "crash.py"), device="cpu")
    assert r.peak.bytes == 256 * 256 * 4 + 2 * 100 * 100 * 4
    if not torch.cuda.is_available():
        with pytest.raises(NoGPUError):
            profile_script(script(CRASH, "crash.py"), device="cuda")
    with pytest.raises(UsageError):
        profile_script(script(CRASH, "crash.py"), device="tpu")


def test_cuda_only_count_of_a_cpu_script_says_so(script, monkeypatch):
    # a GPU machine running a CPU script: --device auto counts CUDA memory, of which there is none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    r = profile_script(script(CRASH, "crash.py"), device="auto")
    assert r.peak.bytes == 0 and r.cuda is None
    assert "--device cpu" in _render(r)


def test_missing_script_raises():
    with pytest.raises(UsageError):
        profile_script("/nonexistent/train.py")


# ------------------------------------------------------------------------------- golden renders
def _hand_built(cuda: bool = False) -> ProfileResult:
    mib = 1024 * 1024
    peak = ProfilePeak(
        bytes=14 * mib,
        time_s=1.25,
        op_index=4210,
        location="train.py:31",
        source="loss.backward()",
        module="Net.fc1",
        phase="backward",
        breakdown={
            MemCategory.PARAMETER: 2 * mib,
            MemCategory.GRADIENT: 2 * mib,
            MemCategory.OPTIMIZER_STATE: 4 * mib,
            MemCategory.ACTIVATION: 5 * mib,
            MemCategory.TEMPORARY: mib,
        },
        tensors=(
            TensorGroup((64, 512), "float32", "cpu", "train.py:14", MemCategory.ACTIVATION, 10, 5 * mib),
            TensorGroup((512, 1024), "float32", "cpu", "train.py:10", MemCategory.PARAMETER, 1, 2 * mib),
        ),
    )
    lines = (
        LineStat("train.py", 30, "opt.step()", 5, 4 * mib, 4 * mib, 9 * mib, 13 * mib, 4 * mib),
        LineStat("train.py", 27, "out = model(x)", 5, 0, 5 * mib // 2, 0, 12 * mib, 0),
        LineStat("train.py", 3, "import torch", 1, 0, 0, 0, 0, 0),
    )
    modules = (
        ModuleStat("Net", "Net", 5, 5 * mib // 2, 12 * mib, 0, None),
        ModuleStat("Net.fc1", "Linear", 5, 2 * mib, 11 * mib, 10 * mib, 14 * mib),
    )
    leaks = (
        LeakSuspect(
            "train.py:28",
            "loss = crit(out, y)",
            3 * mib,
            24,
            8,
            8,
            "memory allocated by 8 of its 8 executions is still alive at exit",
        ),
    )
    c = (
        ProfileCuda("NVIDIA H100 80GB HBM3", 14 * mib, 22 * mib, 20 * mib, 540 * mib, 520 * mib, "snap.pickle")
        if cuda
        else None
    )
    return ProfileResult(
        script="/home/u/train.py",
        argv=("--epochs", "1"),
        device="cuda:0 (NVIDIA H100 80GB HBM3)" if cuda else "cpu",
        wall_s=2.5,
        ops=12345,
        outcome=ScriptOutcome("ok", 0),
        peak=peak,
        at_exit_bytes=8 * mib,
        lines=lines,
        modules=modules,
        leaks=leaks,
        cuda=c,
        timeline=(TimelineSample(0.0, 0), TimelineSample(1.25, 14 * mib), TimelineSample(2.5, 8 * mib)),
    )


def _render(result: ProfileResult, width: int = 120) -> str:
    buf = io.StringIO()
    render_profile(result, Console(file=buf, width=width, color_system=None, highlight=False), top=10)
    return buf.getvalue()


def test_golden_render_cpu():
    assert_golden("profile_cpu.txt", _render(_hand_built()))


def test_golden_render_narrow_terminal():
    text = _render(_hand_built(), width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert_golden("profile_cpu_80cols.txt", text)


def test_golden_render_cuda():
    assert_golden("profile_cuda.txt", _render(_hand_built(cuda=True)))


def test_json_and_log():
    r = _hand_built()
    d = to_dict(r)
    assert "_timeline" not in d and d["peak"]["breakdown"]["optimizer_state"] == 4 * 1024 * 1024
    assert format_log(r).startswith("# memprof profile --log: train.py --epochs 1 on cpu")


@pytest.mark.gpu
def test_cuda_profile_snapshot_and_context_gap(script, tmp_path):
    path = script(
        textwrap.dedent("""\
        import torch

        model = torch.nn.Linear(1024, 1024).cuda()
        x = torch.randn(256, 1024, device="cuda")
        for _ in range(3):
            model(x).sum().backward()
    """),
        "cuda_train.py",
    )
    snap = tmp_path / "snap.pickle"
    r = profile_script(path, snapshot_path=snap)
    assert r.outcome.status == "ok" and r.device.startswith("cuda:")
    assert r.cuda is not None and r.cuda.max_allocated_bytes >= (1024 * 1024 + 1024) * 4
    assert r.peak.breakdown[MemCategory.PARAMETER] == (1024 * 1024 + 1024) * 4
    assert all(g.device == "cuda" for g in r.peak.tensors)
    import pickle

    with open(snap, "rb") as fh:
        data = pickle.load(fh)
    assert "segments" in data and "device_traces" in data  # what pytorch.org/memory_viz reads
    if r.cuda.nvml_process_bytes is not None:
        assert r.cuda.context_bytes == r.cuda.nvml_process_bytes - r.cuda.reserved_at_exit_bytes
        assert r.cuda.context_bytes > 0
