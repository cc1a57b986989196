"""Overhead of ``memprof profile`` on small CPU training scripts: the same loop with and without the profiler.

Each case writes a training script to a temporary folder; the script times every training step
(after a warm-up step, so imports and first-call costs are excluded) and writes the median step
time to a file: CPU time of the thread (``time.thread_time``; torch runs with one thread, and CPU
autograd runs on the calling thread, so this is all the step's work) - robust when other jobs
share the machine - and wall time. It runs in a fresh subprocess as ``python train.py`` (plain), as
``python -m memprof profile train.py`` (line mode, the default) and with ``--log`` (log mode),
``--repeats`` times each, interleaved. Reported: per mode the best (minimum) of the repeats'
median step CPU times - the estimator least disturbed by other load on a shared machine - and
the slowdown profiled / plain from those; the median over repeats and the wall-time slowdown too.

    python scripts/bench_profile.py                  # all cases, 5 repeats
    python scripts/bench_profile.py --repeats 7 --markdown
    python scripts/bench_profile.py --breakdown --repeats 3   # where the overhead goes
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TEMPLATE = textwrap.dedent("""\
    import sys, time
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    torch.set_num_threads({threads})
    model = {model}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    x = torch.randn({batch}, {inp})
    y = torch.randint(0, 10, ({batch},))


    def step():
        out = model(x)
        loss = crit(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss


    step()  # warm-up: first-call costs and Adam's state are not timed
    cpu, wall = [], []
    for i in range({steps}):
        c0, t0 = time.thread_time(), time.perf_counter()
        loss = step()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    cpu.sort()
    wall.sort()
    open(sys.argv[1], "w").write(repr((cpu[len(cpu) // 2], wall[len(wall) // 2])))
""")

CASES = {
    # name: (model expression, batch, input features, steps)
    "mlp-small (784-256-10, batch 64)": (
        "nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))",
        64,
        784,
        300,
    ),
    "mlp (784-1024-1024-10, batch 128)": (
        "nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))",
        128,
        784,
        100,
    ),
    "cnn (2 conv + linear, batch 32, 1x28x28)": (
        "nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), "
        "nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 10))",
        32,
        784,
        60,
    ),
}


def run_once(script: Path, out: Path, mode: str) -> tuple[float, float, float]:
    """(median step CPU seconds, median step wall seconds, both measured inside the script; process seconds)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if mode == "plain":
        cmd = [sys.executable, str(script), str(out)]
    else:
        extra = ["--log", str(out.with_suffix(".log"))] if mode == "log" else []
        cmd = [sys.executable, "-m", "memprof", "profile", *extra, str(script), "--", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu, step_wall = eval(out.read_text())
    return cpu, step_wall, wall


def breakdown(repeats: int) -> None:
    """Where the line mode's overhead goes, in-process on the smallest case: each layer added in turn."""
    import runpy

    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path.insert(0, str(REPO))
    from memprof.engine import profiler as P

    class Bare(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model, batch, inp, steps = next(iter(CASES.values()))
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "train.py", Path(tmp) / "t.txt"
        script.write_text(TEMPLATE.format(model=model, batch=batch, inp=inp, steps=steps, threads=1))

        def run() -> float:
            sys.argv = [str(script), str(out)]
            runpy.run_path(str(script), run_name="__main__")
            return eval(out.read_text())[0]

        def bare() -> float:
            with Bare():
                return run()

        def recorder(hooks: bool, trace: bool) -> float:
            rec = P._ProfileRecorder(tmp, log=False, cuda_samples=False)
            if hooks:
                rec.install_hooks()
            try:
                with rec:
                    if trace:
                        sys.settrace(rec.make_global_trace())
                    try:
                        return run()
                    finally:
                        sys.settrace(None)
            finally:
                rec.remove_hooks()
                rec.close()

        def full() -> float:
            P.profile_script(script, [str(out)])
            return eval(out.read_text())[0]

        variants = {
            "plain": run,
            "any dispatch mode (pass-through)": bare,
            "+ storage accounting": lambda: recorder(False, False),
            "+ module/optimizer hooks": lambda: recorder(True, False),
            "+ line tracing (sys.settrace)": lambda: recorder(True, True),
            "memprof profile (all of it)": full,
        }
        res: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for k, f in variants.items():
                res[k].append(f())
    base = min(res["plain"])
    print(f"\nBreakdown, {next(iter(CASES))}, in-process, CPU ms/step (best of {repeats}):\n")
    print("| variant | CPU ms/step | vs plain |")
    print("|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {min(v) * 1000:.2f} | {min(v) / base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the script (default 1)")
    ap.add_argument("--modes", default="plain,line,log")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--breakdown", action="store_true", help="only the in-process overhead breakdown")
    args = ap.parse_args()
    if args.breakdown:
        breakdown(args.repeats)
        return
    modes = args.modes.split(",")
    rows = []
    load0 = f"{os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, batch, inp, steps) in CASES.items():
            script = Path(tmp) / "train.py"
            script.write_text(TEMPLATE.format(model=model, batch=batch, inp=inp, steps=steps, threads=args.threads))
            cpu: dict[str, list[float]] = {m: [] for m in modes}
            wall: dict[str, list[float]] = {m: [] for m in modes}
            proc: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(args.repeats):
                for m in modes:
                    c, w, p = run_once(script, Path(tmp) / "t.txt", m)
                    cpu[m].append(c)
                    wall[m].append(w)
                    proc[m].append(p)
            best = {m: min(v) for m, v in cpu.items()}
            med = {m: statistics.median(v) for m, v in cpu.items()}
            bestw = {m: min(v) for m, v in wall.items()}
            medp = {m: statistics.median(v) for m, v in proc.items()}
            rows.append((name, steps, best, med, bestw, medp))
            print(
                f"{name}: CPU "
                + ", ".join(f"{m} {best[m] * 1000:.2f} ms/step" for m in modes)
                + "".join(f", {m} x{best[m] / best['plain']:.2f}" for m in modes if m != "plain")
                + "  (CPU ms/step per run: "
                + "; ".join(f"{m} " + "/".join(f"{v * 1000:.2f}" for v in cpu[m]) for m in modes)
                + ")"
                + f"  (wall best: {', '.join(f'{m} {bestw[m] * 1000:.2f}' for m in modes)})",
                file=sys.stderr,
            )
    if args.markdown:
        print(
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {__import__('torch').__version__}, torch threads {args.threads}, {args.repeats} runs per mode "
            f"(interleaved); load average before/after {load0} / {os.getloadavg()[0]:.2f}.\n"
        )
        others = [m for m in modes if m != "plain"]
        head = (
            ["case", "steps"]
            + [f"{m} CPU ms/step" for m in modes]
            + [f"{m} slowdown (CPU, best)" for m in others]
            + [f"{m} slowdown (CPU, median)" for m in others]
            + [f"{m} slowdown (wall, best)" for m in others]
            + [f"{m} process s" for m in modes]
        )
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for name, steps, best, med, bestw, medp in rows:
            cells = (
                [name, str(steps)]
                + [f"{best[m] * 1000:.2f}" for m in modes]
                + [f"{best[m] / best['plain']:.2f}x" for m in others]
                + [f"{med[m] / med['plain']:.2f}x" for m in others]
                + [f"{bestw[m] / bestw['plain']:.2f}x" for m in others]
                + [f"{medp[m]:.1f}" for m in modes]
            )
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
