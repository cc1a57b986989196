"""Trace speed of two source trees, measured alternately in one run (fair on a shared, noisy machine).

    git archive main | tar -x -C /tmp/before          # the tree to compare with
    PYTHONPATH=. python scripts/bench_ab.py /tmp/before . resnet50 densenet121 --rounds 3

Each round runs, for each model and each tree in turn (A, B, then B, A in the next round), one fresh
process that traces the workload (batch 64, Adam, target "cuda", as ``scripts/bench_trace.py``) once
cold (the first trace: what one ``memprof estimate`` pays) and then ``--warm`` more times (the best is
kept). The table gives the median over the rounds for each tree and B's change in per cent; ``--cpu``
times the process's CPU time instead of the wall clock (less sensitive to other jobs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

RUN = """
import sys, time
sys.path.insert(0, {root!r})
from memprof.cli.common import build_workload
from memprof.engine.trace import trace_step
w = build_workload({name!r}, batch_size=64, optimizer="adam")
clock = time.{clock}
t = clock(); trace_step(w, target="cuda"); cold = clock() - t
warm = []
for _ in range({warm}):
    t = clock(); trace_step(w, target="cuda"); warm.append(clock() - t)
print(cold, min(warm) if warm else cold)
"""


def run(root: str, name: str, warm: int, clock: str = "perf_counter") -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", RUN.format(root=os.path.abspath(root), name=name, warm=warm, clock=clock)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    cold, best = proc.stdout.split()[-2:]
    return float(cold), float(best)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="tree A (before)")
    parser.add_argument("b", help="tree B (after)")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument(
        "--cpu", action="store_true", help="process CPU time instead of wall time (less sensitive to other jobs)"
    )
    args = parser.parse_args()
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name in args.models:
            order = (args.a, args.b) if r % 2 == 0 else (args.b, args.a)
            for root in order:
                clock = "process_time" if args.cpu else "perf_counter"
                times.setdefault((name, root), []).append(run(root, name, args.warm, clock))
            a, b = times[(name, args.a)][-1], times[(name, args.b)][-1]
            print(f"round {r + 1} {name}: A cold {a[0]:.2f} warm {a[1]:.2f} | B cold {b[0]:.2f} warm {b[1]:.2f}")
        load.append(os.getloadavg()[0])
    print()
    what = "process CPU time" if args.cpu else "wall time"
    print(
        f"A = {args.a}, B = {args.b}; {what}; {args.rounds} rounds alternating; 1-minute load average "
        f"{min(load):.1f}-{max(load):.1f}"
    )
    print()
    print("| model | A first trace s | B first trace s | change | A warm best s | B warm best s | change |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        a, b = times[(name, args.a)], times[(name, args.b)]
        ac, bc = statistics.median(t[0] for t in a), statistics.median(t[0] for t in b)
        aw, bw = statistics.median(t[1] for t in a), statistics.median(t[1] for t in b)
        print(
            f"| {name} | {ac:.2f} | {bc:.2f} | {100 * (bc - ac) / ac:+.1f} % | {aw:.2f} | {bw:.2f} | "
            f"{100 * (bw - aw) / aw:+.1f} % |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
