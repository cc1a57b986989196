"""The real console entry point in a new process: exit codes and complete output with the fast exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120")
    return subprocess.run(
        [sys.executable, "-m", "memprof", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_json_output_is_complete_and_exit_code_zero():
    proc = _run("estimate", "resnet18", "--batch-size", "2", "--input-shape", "3,32,32", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # the whole document was flushed before the process ended
    assert doc["kind"] == "estimate"
    # resnet18: 11,689,512 fp32 parameters, and the traced peak holds them, their gradients and Adam's state
    assert doc["analytic"]["param_count"] == 11_689_512
    assert doc["traced"]["peak_bytes"] > 4 * 11_689_512 * 4


def test_bad_model_is_one_error_line_and_exit_code_two():
    proc = _run("estimate", "no_such_model_xyz")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("ERROR: unknown model 'no_such_model_xyz'")
    assert "Traceback" not in proc.stderr


def test_does_not_fit_exit_code():
    proc = _run("estimate", "resnet18", "--batch-size", "2", "--input-shape", "3,32,32", "--gpu-memory", "1MiB")
    assert proc.returncode == 4, proc.stdout + proc.stderr
