"""Fuzzing the command line: random option values on every command must keep the contract.

The contract (docs/cli.md): the exit code is one of the documented ones; never a traceback; a
run that fails on bad input (exit 2, 3) prints exactly one ``ERROR:`` line and one ``HINT:`` line;
with ``--json``, stdout is one JSON document or nothing.

The default run tries a few dozen examples per command (tiny models, formula-only where the
command allows, so each example takes well under a second); ``MEMPROF_FUZZ_EXAMPLES`` or the slow
profile raises the count.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memprof.cli import EXIT_CODES, app

runner = CliRunner()

EXAMPLES = int(os.environ.get("MEMPROF_FUZZ_EXAMPLES", "25"))
FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
SLOW = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ----------------------------------------------------------------------------- value strategies
junk = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
numbers = st.one_of(
    st.integers(-5, 70).map(str), st.integers(-(10**20), 10**20).map(str), st.floats(allow_nan=True).map(str)
)
sizes = st.one_of(
    st.builds(
        lambda n, u: f"{n}{u}",
        st.one_of(st.integers(-2, 10**6), st.floats(-1, 1e30), st.sampled_from([float("nan"), float("inf")])),
        st.sampled_from(["", "B", "KiB", "MiB", "GiB", "GB", "kb", "XB", " GiB", "TiB"]),
    ),
    junk,
)
dims = st.one_of(st.integers(-2, 64).map(str), st.sampled_from(["x", "", " ", "0", "1e3", "²", "-", "(", ")"]))
shapes = st.one_of(
    st.builds(
        lambda ds, sep, wrap: wrap[0] + sep.join(ds) + wrap[1],
        st.lists(dims, min_size=0, max_size=4),
        st.sampled_from([",", "x", "×", " ", ", ", ";"]),
        st.sampled_from([("", ""), ("(", ")"), ("[", "]"), ("(", ""), ("", ",")]),
    ),
    junk,
)
dtypes = st.one_of(st.sampled_from(["fp32", "fp16", "bf16", "amp-fp16", "amp-bf16", "fp8", "FP32", ""]), junk)
optimizers = st.one_of(st.sampled_from(["sgd", "sgd-momentum", "adam", "adamw", "adagrad", "rmsprop", "lion"]), junk)
json_texts = st.one_of(
    st.sampled_from(['{"num_classes": 10}', "{}", "[1, 2]", "{dim: 4}", "null", '{"dim": -1}', '{"dim": "x"}']),
    st.dictionaries(st.sampled_from(["dim", "num_layers", "width", "bogus"]), st.integers(-3, 8), max_size=2).map(
        json.dumps
    ),
    junk,
)
batches = st.one_of(st.integers(-3, 40).map(str), numbers, junk)
paths = st.sampled_from(
    ["/proc/x.svg", "/nonexistent/dir/x.svg", "out.svg", "out.png", "out.gif", "out", "/dev/null", "", "."]
)
models = st.sampled_from(
    [
        "memprof.zoo:mnist_mlp",
        "memprof.zoo:Cruncher",
        "memprof.zoo:cifar_mlp",
        "memprof.zoo:nope",
        "no_such_model",
        "memprof.zoo",
        "/nonexistent.py:Net",
        "memprof.zoo:gpt_param_count",
        "",
    ]
)


def _options(draw, spec: dict[str, st.SearchStrategy]) -> list[str]:
    """A random subset of ``spec``'s options, each with a drawn value (flags: ``None``)."""
    chosen = draw(st.lists(st.sampled_from(sorted(spec)), unique=True, max_size=4))
    out: list[str] = []
    for name in chosen:
        value = spec[name]
        out.append(name)
        if value is not None:
            out.append(draw(value))
    return out


COMMON = {
    "--batch-size": batches,
    "--input-shape": shapes,
    "--token-range": st.one_of(shapes, st.sampled_from(["0,10", "5,2", "-1,4", "0:100"])),
    "--model-kwargs": json_texts,
    "--model-arg": st.one_of(st.sampled_from(["dim=4", "num_layers=1", "=3", "x", "a b=2", "dim=[1]"]), junk),
    "--input-dtype": st.one_of(st.sampled_from(["float", "int64", "int8", "complex"]), junk),
    "--headroom": st.one_of(st.sampled_from(["0.8", "0", "1", "1.5", "-1", "nan", "inf"]), numbers),
}


def _contract(res, *, json_out: bool) -> None:
    out = res.stdout + res.stderr
    assert res.exit_code in EXIT_CODES, (res.exit_code, out[-1500:])
    assert "Traceback (most recent call last)" not in out, out[-3000:]  # (a profiled script's own is allowed)
    assert res.exit_code != 70, out[-1500:]  # an internal error is a bug, not an answer
    if res.exit_code in (2, 3):
        lines = res.stderr.splitlines()
        assert sum(ln.startswith("ERROR: ") for ln in lines) == 1, res.stderr
        assert sum(ln.startswith("HINT: ") for ln in lines) == 1, res.stderr
        assert lines[-2].startswith("ERROR: ") and lines[-1].startswith("HINT: "), res.stderr
    if json_out and res.stdout.strip():
        json.loads(res.stdout)  # one whole JSON document


def _run(args: list[str]):
    json_out = "--json" in args
    res = runner.invoke(app, args)
    _contract(res, json_out=json_out)
    return res


@st.composite
def estimate_args(draw):
    spec = {
        **COMMON,
        "--dtype": dtypes,
        "--optimizer": optimizers,
        "--mode": st.one_of(st.sampled_from(["train", "eval", "infer"]), junk),
        "--gpu-memory": sizes,
        "--layers": st.one_of(st.integers(-2, 5).map(str), junk),
        "--all-layers": None,
    }
    return ["estimate", draw(models), *_options(draw, spec), "--no-trace", *draw(st.sampled_from([[], ["--json"]]))]


@st.composite
def find_batch_args(draw):
    spec = {
        **COMMON,
        "--memory-limit": sizes,
        "--steps": st.one_of(st.integers(-1, 3).map(str), junk),
        "--min-batch": st.one_of(st.integers(-1, 3).map(str), junk),
        "--max-batch": st.one_of(st.integers(-1, 4).map(str), junk),
        "--start": st.one_of(st.integers(-1, 4).map(str), junk),
        "--multiple-of": st.one_of(st.integers(-1, 4).map(str), junk),
        "--target-global-batch": st.one_of(st.integers(-1, 9).map(str), junk),
        "--device": st.one_of(st.sampled_from(["cpu", "cuda", "cuda:1", "tpu", ""]), junk),
        "--plot": paths,
    }
    # small steps keep it quick: a tiny model, few trials, no traced prediction
    base = ["find-batch", draw(models), "--no-predict", "--no-chart", "--max-batch", "4", "--device", "cpu"]
    return [*base, *_options(draw, spec), *draw(st.sampled_from([[], ["--json"]]))]


@st.composite
def compare_args(draw):
    spec = {
        **COMMON,
        "--dtype": dtypes,
        "--optimizer": optimizers,
        "--checkpointing": st.one_of(st.sampled_from(["blocks", "sqrt", "every-2", "every-0", "none", "all"]), junk),
        "--mode": st.sampled_from(["train", "eval", "infer"]),
        "--gpu-memory": sizes,
        "--max-batch": st.one_of(st.integers(-1, 4).map(str), junk),
        "--device": st.sampled_from(["cpu", "cuda", "tpu"]),
        "--memory-limit": sizes,
        "--find-batch": None,
        "--plot": paths,
        "--combine": None,
    }
    # --no-fit and an explicit short list of rows keep each example to a trace or two of a tiny model
    return ["compare", draw(models), "--no-fit", *_options(draw, spec), *draw(st.sampled_from([[], ["--json"]]))]


@st.composite
def profile_args(draw):
    spec = {
        "--log": paths,
        "--plot": paths,
        "--snapshot": paths,
        "--device": st.one_of(st.sampled_from(["auto", "cuda", "cpu", "all", "gpu"]), junk),
        "--top": st.one_of(st.integers(-1, 3).map(str), junk),
        "--force": None,
    }
    script = draw(st.sampled_from(["SCRIPT", "/nonexistent.py", ".", "SCRIPT_FAILS"]))
    return ["profile", *_options(draw, spec), *draw(st.sampled_from([[], ["--json"]])), script]


PROFILED = "import torch\nx = torch.ones(64, 64)\ny = x @ x\n"


def _materialise(args: list[str], tmp_path) -> list[str]:
    """Relative output paths land in a fresh folder; SCRIPT becomes a real tiny script."""
    script = tmp_path / "s.py"
    script.write_text(PROFILED)
    failing = tmp_path / "fails.py"
    failing.write_text("raise ValueError('boom')\n")
    out = []
    for a in args:
        if a == "SCRIPT":
            a = str(script)
        elif a == "SCRIPT_FAILS":
            a = str(failing)
        elif a.startswith("out"):
            a = str(tmp_path / a)
        out.append(a)
    return out


def _fresh(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FAST
@given(args=estimate_args())
def test_estimate_fuzz(args, tmp_path_factory):
    _run(args)


@FAST
@given(args=find_batch_args())
def test_find_batch_fuzz(args, tmp_path_factory):
    _run(_materialise(args, _fresh(tmp_path_factory)))


@settings(FAST, max_examples=max(5, EXAMPLES // 2))
@given(args=compare_args())
def test_compare_fuzz(args, tmp_path_factory):
    _run(_materialise(args, _fresh(tmp_path_factory)))


@FAST
@given(args=profile_args())
def test_profile_fuzz(args, tmp_path_factory):
    res = _run(_materialise(args, _fresh(tmp_path_factory)))
    if res.exit_code == 1:  # the script raised: its own traceback, then one ERROR line
        assert "Traceback of the script" in res.stderr and "ValueError: boom" in res.stderr


@FAST
@given(json_flag=st.booleans(), extra=st.lists(st.sampled_from(["--bogus", "-x", "--json", "1"]), max_size=2))
def test_gpus_fuzz(json_flag, extra):
    _run(["gpus", *(["--json"] if json_flag else []), *extra])


@pytest.mark.slow
@SLOW
@given(
    args=st.one_of(estimate_args(), find_batch_args(), compare_args(), profile_args()),
)
def test_every_command_fuzz_long(args, tmp_path_factory):
    _run(_materialise(args, _fresh(tmp_path_factory)))
