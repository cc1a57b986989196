"""Keep the output samples in README.md and docs/*.md real: run each sample's command and paste its output.

A sample is a marker line followed by a fenced code block::

    <!-- sample: memprof estimate resnet50 --layers 3 -->
    ```text
    $ memprof estimate resnet50 --layers 3
    ...what the command printed...
    ```

``<!-- sample: memprof ARGS | head -N -->`` keeps the first N lines. The command runs as
``python -m memprof ARGS`` from the repository root, 100 columns wide, no colour, stdout only.

    python scripts/samples.py            # rewrite every sample from a real run (review the diff)
    python scripts/samples.py --check    # exit 1 if a sample no longer matches what the code prints

``--check`` ignores durations ("0.28 s", "12 ms"), which differ from run to run.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- sample: (?P<cmd>.+?) -->\s*$")
FENCE = re.compile(r"^```")
DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?(?:s|ms|µs)\b")
COLUMNS = "100"


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def parse(cmd: str) -> tuple[list[str], int | None]:
    head = None
    if "|" in cmd:
        cmd, _, pipe = cmd.partition("|")
        match = re.fullmatch(r"\s*head -(\d+)\s*", pipe)
        if not match:
            raise SystemExit(f"unsupported pipe in sample {cmd!r}: only '| head -N'")
        head = int(match.group(1))
    args = shlex.split(cmd)
    if not args or args[0] != "memprof":
        raise SystemExit(f"a sample must run memprof, got {cmd!r}")
    return args, head


def run(cmd: str) -> str:
    args, head = parse(cmd)
    env = dict(os.environ, COLUMNS=COLUMNS, NO_COLOR="1", TERM="dumb", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "memprof", *args[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    lines = proc.stdout.rstrip("\n").splitlines()
    if head is not None:
        lines = lines[:head]
    shown = " ".join(args)
    return "\n".join([f"$ {shown}", *lines]) + "\n"


def samples(text: str) -> list[tuple[str, int, int]]:
    """(command, first line of the block's body, line after its closing fence) for each sample."""
    lines = text.splitlines(keepends=True)
    found = []
    i = 0
    while i < len(lines):
        match = MARKER.match(lines[i])
        if match and i + 1 < len(lines) and FENCE.match(lines[i + 1]):
            end = i + 2
            while end < len(lines) and not FENCE.match(lines[end]):
                end += 1
            found.append((match.group("cmd"), i + 2, end))
            i = end
        i += 1
    return found


def normalise(text: str) -> str:
    return DURATION.sub("<t>", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of rewriting; exit 1 on a difference")
    parser.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and docs/*.md)")
    opts = parser.parse_args()
    stale = 0
    for path in [f.resolve() for f in opts.files] or documents():
        text = path.read_text()
        lines = text.splitlines(keepends=True)
        found = samples(text)
        for cmd, start, end in reversed(found):
            fresh = run(cmd)
            old = "".join(lines[start:end])
            if opts.check:
                if normalise(old) != normalise(fresh):
                    stale += 1
                    print(f"{path.relative_to(ROOT)}: sample `{cmd}` no longer matches the output", file=sys.stderr)
            else:
                lines[start:end] = [fresh]
        if not opts.check and found:
            path.write_text("".join(lines))
            print(f"{path.relative_to(ROOT)}: {len(found)} sample(s) regenerated", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
