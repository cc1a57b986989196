"""Issue 11: no lost reports, no tracebacks, errors that name the real cause - on every command.

Output files that cannot be written, stdout that goes away or fills up, models that raise, bad
values, degraded answers, Ctrl-C: each keeps the report, prints no traceback and exits with its
documented code (:data:`memprof.cli.EXIT_CODES`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memprof.cli import EXIT_CODES, app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

MODELS = textwrap.dedent("""\
    import torch
    from torch import nn


    class Raises(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def helper(self, x):
            raise ValueError("this forward is broken")

        def forward(self, x):
            x = self.fc(x)
            return self.helper(x)


    class BadInit(nn.Module):
        def __init__(self):
            super().__init__()
            raise ValueError("config file missing")


    class NeedsArg(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(8, width)

        def forward(self, x):
            return self.fc(x)


    class InnerBug(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 20)
            self.b = nn.Linear(30, 5)

        def forward(self, x):
            return self.b(self.a(x))


    class KeyErr(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.table = {}

        def forward(self, x):
            return self.fc(x) * self.table["scale"]


    class IntOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x).argmax(-1)
""")
# the lines the errors must point at
LINE = {"Raises": 11, "BadInit": 21, "InnerBug": 40, "KeyErr": 50}


@pytest.fixture()
def models(tmp_path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


def _check(res, code: int, *, error: bool = True) -> str:
    """The contract: exit code, no traceback, and (for errors) one ERROR: line and one HINT: line."""
    out = res.stdout + res.stderr
    assert res.exit_code == code, (res.exit_code, res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in out
    if error:
        lines = res.stderr.splitlines()
        assert sum(ln.startswith("ERROR: ") for ln in lines) == 1, res.stderr
        assert sum(ln.startswith("HINT: ") for ln in lines) == 1, res.stderr
    return res.stderr


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120", NO_COLOR="1", **extra)


def _memprof(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memprof", *args],
        cwd=kwargs.pop("cwd", ROOT),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


# =========================================================================== 1. output files
SCRIPT = "import pathlib, sys\npathlib.Path(sys.argv[1]).write_text('ran')\n"


@pytest.mark.parametrize(
    "args",
    [
        ["find-batch", "memprof.zoo:mnist_mlp", "--device", "cpu", "--memory-limit", "20MiB", "--plot", "/proc/x.svg"],
        ["compare", "memprof.zoo:mnist_mlp", "--plot", "/proc/x.svg"],
        ["profile", "--log", "/proc/x.log", "SCRIPT"],
        ["profile", "--plot", "/proc/x.svg", "SCRIPT"],
        ["profile", "--log", "NOFOLDER/x.log", "SCRIPT"],
    ],
)
def test_unwritable_output_fails_before_any_work(args, tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    marker = tmp_path / "ran.txt"
    args = [str(script) if a == "SCRIPT" else a.replace("NOFOLDER", str(tmp_path / "missing")) for a in args]
    if args[0] == "profile":
        args += [str(marker)]
    res = runner.invoke(app, args)
    err = _check(res, 2)
    assert err.startswith("ERROR: cannot create --") and res.stdout == ""
    assert "trial" not in err and "[1/" not in err and not marker.exists()  # nothing ran


def test_a_file_that_fails_anyway_keeps_the_report(tmp_path):
    full = tmp_path / "full.svg"
    full.symlink_to("/dev/full")  # a device: claimed (it opens), then writing fails with ENOSPC
    res = runner.invoke(app, ["compare", "memprof.zoo:mnist_mlp", "-b", "4", "--dtype", "bf16", "--plot", str(full)])
    err = _check(res, 6)
    assert "fp32 (baseline)" in res.stdout and "bf16" in res.stdout  # the whole report is there
    assert f"ERROR: could not write the plot to {full}: No space left on device" in err
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    log = tmp_path / "full.log"
    log.symlink_to("/dev/full")
    res = runner.invoke(app, ["profile", "--log", str(log), str(script), str(tmp_path / "ran.txt")])
    err = _check(res, 6)
    assert "memprof profile: s.py" in res.stdout and "could not write the log" in err


def test_find_batch_keeps_its_report_when_the_plot_fails(tmp_path):
    full = tmp_path / "full.svg"
    full.symlink_to("/dev/full")
    args = ["find-batch", "memprof.zoo:mnist_mlp", "--device", "cpu", "--memory-limit", "64MiB"]
    res = runner.invoke(app, [*args, "--no-predict", "--max-batch", "2", "--plot", str(full)])
    err = _check(res, 6)
    assert "Largest batch that fits: at least 2" in res.stdout and "could not write the plot" in err


def _limited_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_found_before_the_work(tmp_path):
    """A file system that takes no more bytes (here: a 16 KiB file-size limit) fails when the file is
    claimed, before the script runs, and leaves no file behind."""
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    log = tmp_path / "out.log"
    proc = subprocess.run(
        [sys.executable, "-m", "memprof", "profile", "--log", str(log), str(script), str(tmp_path / "ran.txt")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limited_file_size(16 * 1024),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"ERROR: cannot write --log {log}: File too large\nHINT: free some space")
    assert not log.exists() and not (tmp_path / "ran.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.py"]  # no scratch file either


def test_existing_files_are_replaced_only_with_force(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    log, plot = tmp_path / "old.log", tmp_path / "old.svg"
    log.write_text("keep me")
    plot.write_text("<svg>keep me</svg>")
    for option, path in (("--log", log), ("--plot", plot)):
        res = runner.invoke(app, ["profile", option, str(path), str(script), str(tmp_path / "ran.txt")])
        err = _check(res, 2)
        assert err.startswith(f"ERROR: {option} {path} already exists\nHINT: add --force")
        assert "keep me" in path.read_text() and not (tmp_path / "ran.txt").exists()
    res = runner.invoke(app, ["compare", "memprof.zoo:mnist_mlp", "--plot", str(plot)])
    assert _check(res, 2).startswith("ERROR: --plot") and "[1/" not in res.stderr  # before any trace
    res = runner.invoke(
        app, ["profile", "--force", "--log", str(log), "--plot", str(plot), str(script), str(tmp_path / "ran.txt")]
    )
    _check(res, 0, error=False)
    assert log.read_text().startswith("# memprof profile --log") and "<svg" in plot.read_text()  # matplotlib's svg
    assert f"wrote the log to {log}" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.log", "old.svg", "ran.txt", "s.py"]


def test_devices_need_no_force(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    res = runner.invoke(app, ["profile", "--log", "/dev/null", str(script), str(tmp_path / "ran.txt")])
    _check(res, 0, error=False)


def test_a_claimed_file_is_removed_when_the_run_fails(tmp_path, models):
    log = tmp_path / "new.log"
    res = runner.invoke(app, ["profile", "--log", str(log), str(tmp_path / "no_such_script.py")])
    _check(res, 2)
    plot = tmp_path / "new.svg"
    res = runner.invoke(app, ["compare", f"{models}:BadInit", "--plot", str(plot)])
    _check(res, 2)
    assert not log.exists() and not plot.exists()


# =========================================================================== 2. stdout
def test_a_closed_pipe_ends_quietly_with_141():
    """``memprof ... | head -1``: the reader is gone before memprof writes (here: closed at once)."""
    for args in (["estimate", "memprof.zoo:mnist_mlp", "--no-trace"], ["--help"], ["estimate", "--help"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "memprof", *args],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 141, err
        assert err == ""  # quiet, as a Unix tool killed by SIGPIPE


def test_a_full_stdout_is_one_error_line():
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "memprof", "estimate", "memprof.zoo:mnist_mlp", "--no-trace", "--json"],
            cwd=ROOT,
            env=_env(),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 6
    assert proc.stderr.splitlines() == [
        "ERROR: cannot write the output to stdout: No space left on device",
        "HINT: free some space, or send the output somewhere else (> file on another disk)",
    ]


# =========================================================================== 3. blame
def _blame(args: list[str]) -> tuple[str, str]:
    res = runner.invoke(app, args)
    err = _check(res, 2)
    message, hint = err.splitlines()
    return message, hint


@pytest.mark.parametrize("path", ["formula", "trace"])
def test_a_forward_that_raises_is_shown_as_raised_at_its_line(models, path):
    extra = ["--no-trace"] if path == "formula" else []  # the formula pass runs first; --no-trace: only it
    message, hint = _blame(["estimate", f"{models}:Raises", "-i", "8", "-b", "4", *extra])
    where = f"{models}:{LINE['Raises']}"
    assert message == f"ERROR: the model's forward raised ValueError: this forward is broken (at {where}, in helper)"
    assert f"{models}:{LINE['Raises']}" in hint and "--input-shape" not in hint and "kwargs" not in hint
    message, hint = _blame(["estimate", f"{models}:KeyErr", "-i", "8", *extra])
    assert message.endswith(f"raised KeyError: 'scale' (at {models}:{LINE['KeyErr']})") and "--input-shape" not in hint


def test_the_trace_blames_the_same_line(models):
    """compare and find-batch's prediction trace without the formula pass first."""
    from memprof.commands.workload import make_workload
    from memprof.engine.trace import trace_step
    from memprof.errors import InputShapeError, ModelCodeError

    with pytest.raises(ModelCodeError) as info:
        trace_step(make_workload(f"{models}:Raises", input_shape=(8,), batch_size=4))
    assert info.value.message.endswith(f"raised ValueError: this forward is broken (at {models}:11, in helper)")
    with pytest.raises(InputShapeError) as info:
        trace_step(make_workload(f"{models}:InnerBug", input_shape=(8,), batch_size=4))
    assert f"(at {models}:{LINE['InnerBug']})" in info.value.message
    assert "otherwise the mismatch is in the model's own code" in info.value.hint
    res = runner.invoke(app, ["compare", f"{models}:KeyErr", "-i", "8", "--no-fit"])
    assert "\nERROR: the model's forward raised KeyError: 'scale' (at " in _check(res, 2)


def test_constructor_errors_hint_kwargs_only_for_argument_errors(models):
    message, hint = _blame(["estimate", f"{models}:BadInit", "-i", "8", "--no-trace"])
    assert message == f"ERROR: constructing BadInit() raised ValueError: config file missing (at {models}:21)"
    assert "--model-kwargs" not in hint and f"{models}:21" in hint
    message, hint = _blame(["estimate", f"{models}:NeedsArg", "-i", "8", "--no-trace"])
    assert "missing a required argument: 'width'" in message and "--model-kwargs" in hint
    message, hint = _blame(
        ["estimate", f"{models}:NeedsArg", "-i", "8", "--model-arg", "width=3", "--model-arg", "depth=3", "--no-trace"]
    )
    assert "unexpected keyword argument 'depth'" in message and "--model-kwargs" in hint


def test_input_shape_hint_only_where_the_evidence_points(models):
    # the first layer with parameters rejects what memprof fed it: the input shape, with a shape that works
    message, hint = _blame(["estimate", "memprof.zoo:mnist_mlp", "-i", "3,32,32", "--no-trace", "-b", "2"])
    assert message.startswith("ERROR: layer '1' (Linear) rejected input 2×3072, expects (*, 784): RuntimeError:")
    assert "give the per-sample shape it expects with --input-shape" in hint and "--input-shape 784" in hint
    # a mismatch deeper in (after a layer worked): either the input or the model's code, and where
    message, hint = _blame(["estimate", f"{models}:InnerBug", "-i", "8", "--no-trace"])
    assert f"(at {models}:{LINE['InnerBug']})" in message
    assert hint.startswith("HINT: if the model expects another input size") and f"{models}:{LINE['InnerBug']}" in hint


def test_a_real_step_that_raises_names_its_line(models):
    res = runner.invoke(
        app,
        ["find-batch", f"{models}:Raises", "-i", "8", "--device", "cpu", "--memory-limit", "64MiB", "--no-predict"],
    )
    err = _check(res, 2)
    assert f"ValueError: this forward is broken (at {models}:11, in helper)" in err


# =========================================================================== 4. degraded answers
def test_estimate_that_cannot_trace_says_so_and_exits_5(models):
    res = runner.invoke(app, ["estimate", f"{models}:IntOut", "-i", "8", "-b", "2"])
    err = _check(res, 5)
    assert "  PARTIAL - tracing failed: the model's output holds no floating-point tensor" in res.stdout
    assert err.startswith("ERROR: the training step could not be traced, so the estimate above is the formula's only")
    assert "memprof_loss" in err
    res = runner.invoke(app, ["estimate", f"{models}:IntOut", "-i", "8", "-b", "2", "--json"])
    _check(res, 5)
    doc = json.loads(res.stdout)
    assert doc["headline_source"] == "formula" and "no floating-point tensor" in doc["trace_error"]
    # the same model on find-batch: the step cannot run, bad input (2) - each code means one thing
    res = runner.invoke(
        app, ["find-batch", f"{models}:IntOut", "-i", "8", "--device", "cpu", "--memory-limit", "64MiB", "--no-predict"]
    )
    _check(res, 2)
    # --no-trace is a choice, not a failure
    _check(runner.invoke(app, ["estimate", f"{models}:IntOut", "-i", "8", "--no-trace"]), 0, error=False)


def test_compare_with_a_row_that_cannot_be_traced_exits_5(models):
    res = runner.invoke(app, ["compare", "memprof.zoo:mnist_mlp", "-c", "every-8", "--no-fit", "-b", "2"])
    err = _check(res, 5)
    assert "✗ checkpointing every-8" in res.stdout
    assert "\nERROR: 1 of 2 configurations could not be traced: checkpointing every-8: " in err


def test_compare_keeps_the_other_rows_when_the_tracer_breaks():
    from memprof.commands.compare import compare
    from memprof.commands.workload import make_workload
    from memprof.engine.trace import trace_step

    def flaky(workload, target="cuda"):
        if workload.precision.name != "fp32":
            raise RuntimeError("a tracer bug\nwith details")
        return trace_step(workload, target=target)

    base = make_workload("memprof.zoo:mnist_mlp", batch_size=2)
    result = compare(base, {"dtype": ["bf16"]}, fit=False, trace_fn=flaky, recompute_fn=None)
    (bad,) = [r for r in result.rows if r.error is not None]
    assert bad.label == "bf16" and bad.error == "memprof failed: RuntimeError: a tracer bug"


# =========================================================================== 5. values
@pytest.mark.parametrize(
    "args,needle",
    [
        (["-i", "3,x,224"], "cannot read input shape '3,x,224': expected a number at character 3, found 'x'"),
        (["-i", "3,,224"], "expected a number at character 3, found ','"),
        (["-i", "3,224,"], "expected a number at character 7, found nothing"),
        (["-i", "3;224"], "expected a separator (',') at character 2, found ';'"),
        (["-i", "3,0"], "part 2 is 0: each must be at least 1"),
        (["-i", "-3"], "expected a number at character 1, found '-'"),
        (["-i", "3,²"], "expected a number at character 3, found '²'"),
        (["--token-range", "5"], "cannot read token range '5': expected 2 numbers, found 1"),
        (["--token-range", "0,x"], "expected a number at character 3, found 'x'"),
        (["--model-arg", "=3"], "cannot read model argument '=3'"),
        (["--gpu-memory", "1e400GiB"], "memory size '1e400GiB' is too large"),
    ],
)
def test_bad_values_are_rejected_where_they_go_wrong(args, needle):
    res = runner.invoke(app, ["estimate", "memprof.zoo:mnist_mlp", *args, "--no-trace"])
    assert needle in _check(res, 2)


def test_the_python_api_reads_values_as_strictly():
    import memprof
    from memprof.errors import Interrupted, UsageError

    with pytest.raises(UsageError, match="character 3, found 'x'"):
        memprof.estimate("memprof.zoo:mnist_mlp", input_shape="3,x,224", traced=False)
    r = memprof.estimate("memprof.zoo:mnist_mlp", input_shape="1,28,28", batch_size=2, traced=False)
    assert r.workload["input"] == "1×28×28"
    with pytest.raises(UsageError, match="unknown `device` 'tpu'"):
        memprof.compare("memprof.zoo:mnist_mlp", device="tpu")
    with pytest.raises(UsageError, match="starts below 0"):
        memprof.estimate("memprof.zoo:mnist_mlp", token_range=(-1, 4), traced=False)
    assert issubclass(Interrupted, KeyboardInterrupt)  # Ctrl-C still stops a program that calls the API


def test_good_shapes_still_read():
    from memprof.engine.loading import parse_shape, parse_token_range

    for text in ("3,224,224", "3x224x224", "3×224×224", "(3, 224, 224)", "[3,224,224]", "3 224 224", " 3, 224 ,224 "):
        assert parse_shape(text) == (3, 224, 224)
    assert parse_shape("(784,)") == (784,) and parse_token_range("0:50257") == (0, 50257)


# =========================================================================== 6. profile's traceback
DEEP = textwrap.dedent("""\
    import torch


    def load(n):
        return helper(n)


    def helper(n):
        layer = torch.nn.Linear(4, 4)
        return layer(torch.randn(n, 5))


    def main():
        load(2)


    main()
""")


@pytest.mark.parametrize("json_out", [False, True])
def test_profile_prints_the_scripts_own_traceback(tmp_path, json_out):
    script = tmp_path / "deep.py"
    script.write_text(DEEP)
    res = runner.invoke(app, ["profile", str(script), *(["--json"] if json_out else [])])
    assert res.exit_code == 1 and "memprof/" not in res.stderr and "runpy" not in res.stderr
    if json_out:
        assert json.loads(res.stdout)["outcome"]["traceback"][0].startswith("Traceback of the script")
    else:
        assert "Top lines" in res.stdout
    tb = res.stderr[res.stderr.index("Traceback of the script") :].splitlines()
    assert [ln.strip() for ln in tb[1:9]] == [
        f'File "{script}", line 17, in <module>',
        "main()",
        f'File "{script}", line 14, in main',
        "load(2)",
        f'File "{script}", line 5, in load',
        "return helper(n)",
        f'File "{script}", line 10, in helper',
        "return layer(torch.randn(n, 5))",
    ]
    assert tb[9].startswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert tb[10].startswith("ERROR: the script failed at deep.py:10") and len(tb) == 11


# =========================================================================== 7. words and rendering
COMMANDS = ["estimate", "find-batch", "compare", "profile", "gpus"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_reads_well_at_80_columns(command):
    res = runner.invoke(app, [command, "--help"] if command else ["--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0
    text = res.stdout
    for label in ("<bool>", "<str>", "<int>", "<float>", "<list", "<path>", "\\["):
        assert label not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "seeds'" not in text and "Cruncher" not in text
    # every option name is whole on its line: never folded at one of its hyphens
    assert not re.search(r"--[a-z-]*-\n", text) and not re.search(r"\n\s*-[a-z]+-", text)
    if command:
        import typer.main

        params = typer.main.get_command(app).commands[command].params
        for option in (o for p in params for o in p.opts if o.startswith("--")):
            assert re.search(rf"(^|[ ,]){option}( |$)", text, re.M), option  # listed, whole, on one line


def test_readme_words():
    readme = (ROOT / "README.md").read_text()
    assert "seeds' rule" not in readme and "the seeds' MLPs" not in readme
    for m in re.finditer("Cruncher", readme):  # only as the zoo model's name, explained next to it
        assert readme[m.start() - 15 : m.start()].endswith("memprof.zoo:")


def test_grammar_of_counts():
    from memprof.engine.checkpointing import CheckpointPlan
    from memprof.render import plural

    assert plural(1, "layer") == "1 layer" and plural(2, "layer") == "2 layers"
    assert plural(1_000, "segment") == "1,000 segments"
    plan = CheckpointPlan("sqrt", ("0",), "Sequential (4 modules)", "segments of 2")
    assert plan.describe() == "1 checkpointed segment of 2 over Sequential (4 modules)"
    plan = CheckpointPlan("sqrt", ("0", "2"), "Sequential (6 modules)", "segments of 2")
    assert plan.describe() == "2 checkpointed segments of 2 over Sequential (6 modules)"


def test_tables_read_at_80_columns():
    """The golden results rendered at 80 columns: no line longer, names shortened in the middle."""
    import io

    from conftest import assert_golden
    from rich.console import Console
    from test_compare import golden_result
    from test_estimate_cli import _result

    from memprof.render.compare import render_compare
    from memprof.render.estimate import render_estimate

    estimate = _result()
    names = [f"model.vision_tower.encoder.layers.{i}.self_attn.out_proj" for i in range(6)]
    layers = tuple(dataclasses.replace(row, name=n) for row, n in zip(estimate.analytic.layers, names, strict=True))
    estimate = dataclasses.replace(estimate, analytic=dataclasses.replace(estimate.analytic, layers=layers))
    for name, render in (
        ("compare_table_80cols.txt", lambda c: render_compare(golden_result(), c)),
        ("estimate_80cols.txt", lambda c: render_estimate(estimate, c, layers=None)),
    ):
        buf = io.StringIO()
        render(Console(file=buf, width=80, color_system=None, highlight=False))
        text = buf.getvalue()
        assert max(len(line) for line in text.splitlines()) <= 80, text
        assert_golden(name, text)
    # each long name: one line, its start and its end kept
    rows = [ln.split()[0] for ln in text.splitlines() if ln.startswith("model.")]
    assert rows == [f"model.…{i}.self_attn.out_proj" for i in range(6)]


def test_the_compute_table_reads_at_80_columns():
    """compare's FLOPs and step-time table at 80 columns: the compute columns whole, every label kept."""
    import io

    from rich.console import Console
    from test_compare import compute_result

    from memprof.render.compare import render_compare

    buf = io.StringIO()
    render_compare(compute_result(), Console(file=buf, width=80, color_system=None, highlight=False))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80, text
    table = text.split("Compute per configuration", 1)[1].split("\n\n", 1)[0]
    assert "…" not in table, table
    row = next(line for line in table.splitlines() if line.startswith("checkpointing blocks"))
    assert row.split()[2:] == ["1.03", "T", "32.2", "G", "+33", "%", "10.5", "ms", "3,048"]
    assert "roofline model on NVIDIA H100 SXM5 80GB, not measured" in table


def test_the_gpu_catalog_reads_at_80_columns(monkeypatch):
    """``memprof gpus --catalog`` at 80 columns: every number whole (no "…"), no line longer."""
    from memprof.commands import gpus as gpus_mod
    from memprof.engine import nvml
    from memprof.results import TorchCudaView

    monkeypatch.setattr(gpus_mod.nvml, "query", lambda: nvml.NVMLStatus(False, "NVML Shared Library Not Found"))
    monkeypatch.setattr(gpus_mod, "torch_view", lambda: TorchCudaView("2.5.1", False, None, 0, (), "no CUDA"))
    res = runner.invoke(app, ["gpus", "--catalog"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in res.stdout, res.stdout
    h100 = next(line.split() for line in lines if line.startswith("h100-sxm "))
    assert h100 == ["h100-sxm", "sm90", "79.11", "GiB", "67", "494.7", "989.4", "989.4", "1979", "3.35"]


def test_long_layer_names_lose_their_middle():
    from memprof.render import ellipsize, squeeze

    assert ellipsize("features.1.0.block.3", 20) == "features.1.0.block.3"
    assert ellipsize("encoder.layers.encoder_layer_11.mlp.linear_1", 24) == "encoder.…mlp.linear_1"
    assert ellipsize("a_very_long_name_without_dots", 12) == "a_v…out_dots"
    rows = squeeze(["Layer", "Type"], [["a" * 70, "Linear"]], 40, {0: 10})
    assert rows == [["a" * 10 + "…" + "a" * 21, "Linear"]] and len(rows[0][0]) + 2 + 6 == 40


def test_columns_say_totals_or_at_the_peak():
    """compare's Grads (a full size) and estimate's traced breakdown (alive at the peak) say which they are."""
    import io

    from rich.console import Console
    from test_compare import golden_result, rendered
    from test_estimate_cli import _result

    from memprof.render.estimate import render_estimate

    assert "Params, Grads, Optim., Activ.: full sizes, as held during the step" in rendered(golden_result())
    buf = io.StringIO()
    render_estimate(_result(), Console(file=buf, width=100, color_system=None))
    assert "Breakdown (formula)" in buf.getvalue()  # formula only: full sizes by definition


# =========================================================================== exit codes in one place
def test_exit_codes_are_documented_in_one_table():
    import memprof.cli as cli

    docs = (ROOT / "docs" / "cli.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", docs, re.M))
    assert sorted(int(c) for c in table) == sorted(EXIT_CODES)
    for code in EXIT_CODES:
        assert re.search(rf"^{code}\s", cli.__doc__, re.M), code  # the module docstring lists it too
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "100"})
    for code in EXIT_CODES:
        assert re.search(rf"^  {code}\s", res.stdout, re.M)


# =========================================================================== 8. install size
def test_dependencies_do_not_force_the_cuda_build():
    """memprof asks for torch and torchvision by version only: a CPU build from PyTorch's CPU index
    (versions such as 2.6.0+cpu) satisfies them, and nothing in the metadata pulls CUDA libraries."""
    from packaging.requirements import Requirement

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {Requirement(d).name: Requirement(d) for d in deps}
    assert reqs["torch"].specifier.contains("2.6.0+cpu") and reqs["torchvision"].specifier.contains("0.21.0+cpu")
    assert not [d for d in deps if "cu1" in d or "+cu" in d or d.startswith("nvidia-") and "ml-py" not in d]
    assert not reqs["torch"].url and not reqs["torch"].extras
    # the README gives the CPU-only commands and says how large the default install is
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "5 GB" in readme or "5.2 GB" in readme


@pytest.mark.slow
def test_an_installed_torch_is_kept():
    """``pip install .`` next to an installed torch (a CPU build, after the README's first command)
    installs memprof alone: pip resolves offline here and would download nothing else."""
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet"]
        + ["--report", "-", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr
    doc = json.loads(report.stdout)
    assert [item["metadata"]["name"] for item in doc["install"]] == ["memprof"]


# =========================================================================== Ctrl-C
SLOW_MODEL = textwrap.dedent("""\
    import sys, time
    import torch
    from torch import nn


    class Slow(nn.Module):
        \"\"\"Says when the trace (fake CPU tensors, not the formula's meta pass) reaches a bf16 or fp32 forward.\"\"\"

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.device.type != "meta":
                print(f"TRACING {x.dtype}", file=sys.stderr, flush=True)
                if x.dtype == torch.bfloat16 or "--dtype" not in sys.argv:
                    time.sleep(60)
            return self.fc(x)
""")


def _interrupt_at(args: list[str], marker: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run memprof, send SIGINT when ``marker`` appears on its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "memprof", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + err)


def test_ctrl_c_while_tracing_keeps_the_formula_answer(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_MODEL)
    proc = _interrupt_at(["estimate", "slow.py:Slow", "-i", "8", "-b", "4"], "TRACING", tmp_path)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert "Estimate: " in proc.stdout and "tracing interrupted (Ctrl-C): formula only" in proc.stdout
    assert proc.stderr.splitlines()[-2:] == [
        "ERROR: interrupted",
        "HINT: the estimate above is the formula's only: the trace was stopped by Ctrl-C",
    ]


def test_ctrl_c_in_compare_keeps_the_rows_traced(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_MODEL)
    args = ["compare", "slow.py:Slow", "-i", "8", "-b", "4", "--dtype", "bf16", "--no-fit", "--plot", "bars.svg"]
    proc = _interrupt_at(args, "TRACING torch.bfloat16", tmp_path)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert "fp32 (baseline)" in proc.stdout and "interrupted (Ctrl-C) while tracing bf16" in proc.stdout
    assert "<svg" in (tmp_path / "bars.svg").read_text()  # the plot of what was traced
    assert "ERROR: interrupted" in proc.stderr


def test_ctrl_c_in_a_profiled_script(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(
        "import time, torch\nx = [torch.ones(1000) for _ in range(10)]\nprint('ready', flush=True)\n"
        "while True:\n    time.sleep(0.05)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "memprof", "profile", str(script)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "memprof profile: loop.py" in out and re.search(r"the script was interrupted at loop\.py:[345] ", err), err
    assert err.count("ERROR:") == 1, err  # the line after 'ready' or in the loop; one ERROR line


def _interrupt(args: list[str], after: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "memprof", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["estimate", "resnet18", "-b", "64", "--gpu-memory", "8GiB"],
        ["find-batch", "memprof.zoo:mnist_mlp", "--device", "cpu", "--memory-limit", "1GiB", "--no-predict"],
        ["compare", "memprof.zoo:mnist_mlp", "-b", "8", "--gpu-memory", "1GiB"],
    ],
)
def test_ctrl_c_at_random_moments(args):
    """Ctrl-C anywhere - importing, loading, tracing, measuring, printing - is exit 130 and no traceback."""
    import random

    rng = random.Random(11)
    for after in sorted(rng.uniform(0.2, 8.0) for _ in range(6)):
        proc = _interrupt(args, after)
        assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr, (after, proc.stderr)
        if proc.returncode == 0:  # finished before the signal came
            continue
        assert proc.returncode == 130, (after, proc.returncode, proc.stderr)
        assert "ERROR: interrupted" in proc.stderr
        if args[0] == "find-batch" and "trial 1:" in proc.stderr:
            assert "Trials" in proc.stdout and ("Interrupted" in proc.stdout or "Largest" in proc.stdout)


def test_ctrl_c_inside_a_finalizer_is_delivered_after_it(monkeypatch):
    """Ctrl-C landing in a weakref callback (run while C++ frees a tensor: torch's WeakIdKeyDictionary,
    memprof's storage tracker) used to be swallowed with an "Exception ignored in" traceback, or to
    abort in C++: there the handler re-sends SIGINT 50 ms later; one a finalizer swallowed anyway is
    re-sent silently by the unraisable hook."""
    import signal
    import sys
    import weakref

    from memprof import cli

    if not hasattr(signal, "setitimer"):
        pytest.skip("no interval timers here")
    resent: list[bool] = []
    monkeypatch.setattr(cli, "_resend_later", lambda: resent.append(True))

    class Thing:
        pass

    seen: list[bool] = []
    try:
        thing = Thing()
        weakref.finalize(thing, lambda: (cli._on_sigint(signal.SIGINT, sys._getframe()), seen.append(True)))
        del thing  # the finalizer runs now (reference counting)
        assert seen == [True] and resent == [True]  # no KeyboardInterrupt inside the finalizer: sent again

        import types

        info = types.SimpleNamespace(exc_type=KeyboardInterrupt, exc_value=KeyboardInterrupt(), exc_traceback=None)
        cli._unraisable(info)  # swallowed by a finalizer anyway: re-sent, nothing printed
        assert resent == [True, True]
        with pytest.raises(KeyboardInterrupt):  # outside a finalizer the handler raises at once
            cli._on_sigint(signal.SIGINT, sys._getframe())
    finally:
        cli._SIGINT_SEEN[0] = False


def test_ctrl_c_inside_a_dispatch_mode_switch_is_delivered_after_it(monkeypatch):
    """Ctrl-C between a dispatch mode's push and its pop (FakeTensorMode.__enter__, torch's
    _python_dispatch helpers) left C++ with a mode it did not expect: "terminate called after throwing
    an instance of 'c10::Error' ... trying to set the current FakeTensorMode, but one already exists"
    (CI). There the handler re-sends SIGINT 50 ms later."""
    import signal
    import sys

    from memprof import cli

    resent: list[bool] = []
    monkeypatch.setattr(cli, "_resend_later", lambda: resent.append(True))

    class Interrupting:
        def __enter__(self):
            cli._on_sigint(signal.SIGINT, sys._getframe())  # as if SIGINT arrived inside __enter__
            return self

        def __exit__(self, *exc):
            return False

    try:
        with Interrupting():
            pass
        assert resent == [True]
        with pytest.raises(KeyboardInterrupt):  # in plain code the handler raises at once
            cli._on_sigint(signal.SIGINT, sys._getframe())
    finally:
        cli._SIGINT_SEEN[0] = False


def test_ctrl_c_inside_an_import_is_delivered_after_it(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised inside an import that C++ runs (torch's pybind11 modules) aborts the
    process with "terminate called ...": during an import the handler re-sends SIGINT 50 ms later."""
    import importlib
    import signal
    import sys

    from memprof import cli

    if not hasattr(signal, "setitimer"):
        pytest.skip("no interval timers here")
    (tmp_path / "interrupted_during_import.py").write_text(
        "import signal, sys\nfrom memprof import cli\ncli._on_sigint(signal.SIGINT, sys._getframe())\nDONE = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    old_alarm = signal.getsignal(signal.SIGALRM)
    try:
        module = importlib.import_module("interrupted_during_import")  # no KeyboardInterrupt inside the import
        assert module.DONE
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # ... it comes again shortly
        signal.setitimer(signal.ITIMER_REAL, 0)
        with pytest.raises(KeyboardInterrupt):  # outside an import the handler raises at once
            cli._on_sigint(signal.SIGINT, sys._getframe())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        cli._SIGINT_SEEN[0] = False
        sys.modules.pop("interrupted_during_import", None)
