"""The README's output samples are real: each one is what the command prints today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # runs every README sample (a few memprof processes)
def test_readme_samples_match_what_the_commands_print():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "samples.py"), "--check", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr


def test_sample_markers_parse_and_durations_are_ignored():
    sys.path.insert(0, str(ROOT / "scripts"))
    import samples

    text = "<!-- sample: memprof gpus --catalog | head -3 -->\n```text\nold\n```\n<!-- /sample -->\n"
    found = samples.samples(text)
    assert found == [("memprof gpus --catalog | head -3", 2, 3)]
    assert samples.parse("memprof gpus --catalog | head -3") == (["memprof", "gpus", "--catalog"], 3)
    assert samples.normalise("traced in 2.38 s, 12 ms") == samples.normalise("traced in 0.3 s, 7 ms")
    with pytest.raises(SystemExit):
        samples.parse("python -c 1")
