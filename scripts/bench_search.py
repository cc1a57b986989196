"""Benchmark: memprof find-batch vs Lightning's Tuner.scale_batch_size vs accelerate's find_executable_batch_size.

Same model, same device, same cap, same training step (forward, loss, backward,
Adam step, zero_grad) for every finder. On the CPU the cap is memprof's enforced
live-tensor-bytes cap (``memprof.engine.measure.CpuMemoryCap``), which raises
``torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory: ...")`` - the
error both Lightning's ``is_oom_error`` and accelerate's ``should_reduce_batch_size``
recognise - so all three finders see real OOMs at the same byte count.

The ground truth is checked independently: the largest batch ``b`` with a capped step
that fits and ``b + 1`` that does not (memprof's answer, re-verified by two more
trials that no finder is charged for).

    pip install lightning accelerate        # the `bench` extra
    python scripts/bench_search.py --cap 150MiB --out benchmarks/search_cpu.md
    python scripts/bench_search.py --device cuda --resolution 224 --max-batch 16384 \
        --out benchmarks/search_cuda.md          # with a GPU: larger images so the limit is below max-batch

Per finder: result, exact?, trials, OOMs, wall time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from memprof.engine.loading import InputSpec, ModelSpec  # noqa: E402
from memprof.engine.workload import Workload, make_optimizer, prepare, train_step  # noqa: E402

STEPS = 2  # steps per trial, for every finder


class BenchNet(nn.Module):
    """A small CNN (not in memprof's zoo): two conv blocks, global pooling, a classifier."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def bench_workload(resolution: int) -> Workload:
    spec = ModelSpec(
        ref="scripts/bench_search.py:BenchNet",
        display_name="BenchNet",
        factory=BenchNet,
        inputs=InputSpec(shapes=[(3, resolution, resolution)], dtype="float"),
        source="file",
    )
    return Workload(model=spec, batch_size=1, optimizer="adam")


@dataclass
class Row:
    finder: str
    result: int | None
    trials: int
    ooms: int
    seconds: float
    sizes: list = field(default_factory=list)
    note: str = ""
    cpu_seconds: float = 0.0
    runs: list = field(default_factory=list)  # wall seconds of every repetition


# --------------------------------------------------------------------------- the device
class Device:
    """CPU under memprof's cap, or a real CUDA device (no cap: its own memory)."""

    def __init__(self, kind: str, cap_bytes: int | None):
        self.kind = kind
        self.cap_bytes = cap_bytes

    @property
    def torch_device(self):
        return torch.device("cuda", 0) if self.kind == "cuda" else torch.device("cpu")

    def capped(self, resident):
        """A context that enforces the cap (CPU) or does nothing (CUDA)."""
        if self.kind == "cuda":
            import contextlib

            return contextlib.nullcontext()
        from memprof.engine.measure import CpuMemoryCap

        cap = CpuMemoryCap(self.cap_bytes)
        cap.register(resident)
        return cap

    def clean(self):
        gc.collect()
        if self.kind == "cuda":
            torch.cuda.empty_cache()


def _resident(prepared):
    return [list(prepared.model.parameters()), list(prepared.model.buffers()), prepared.args]


def run_trial(workload: Workload, dev: Device, batch: int) -> None:
    """One plain trial (STEPS shared training steps); raises the OOM like a training script would."""
    prepared = prepare(workload.with_batch(batch), dev.torch_device)
    cap = dev.capped(_resident(prepared))
    try:
        with cap:
            for _ in range(STEPS):
                train_step(prepared)
    finally:
        if hasattr(cap, "close"):
            cap.close()


def fits(workload: Workload, dev: Device, batch: int) -> bool:
    from memprof.engine.measure import is_oom_error

    try:
        run_trial(workload, dev, batch)
        return True
    except Exception as exc:  # noqa: BLE001
        if not is_oom_error(exc):
            raise
        return False
    finally:
        dev.clean()


# --------------------------------------------------------------------------- finders
def memprof_finder(workload: Workload, dev: Device, max_batch: int) -> Row:
    from memprof.commands.find_batch import find_batch

    t0 = time.perf_counter()
    res = find_batch(
        workload,
        device=dev.kind,
        memory_limit=dev.cap_bytes if dev.kind == "cpu" else None,
        steps=STEPS,
        max_batch=max_batch,
    )
    seconds = time.perf_counter() - t0
    pred = res.prediction
    note = f"prediction {pred.max_batch} ({pred.seconds:.1f} s of tracing)" if pred else "no prediction"
    return Row(
        "memprof find-batch",
        res.largest_batch,
        len(res.trials),
        res.ooms,
        seconds,
        [(t.batch_size, t.fits) for t in res.trials],
        note,
    )


def lightning_finder(workload: Workload, dev: Device, mode: str, margin: float, max_batch: int) -> Row:
    import lightning as L  # noqa: N812
    from lightning.pytorch.tuner import Tuner
    from torch.utils.data import DataLoader, Dataset

    loss_fn = workload.model.loss_fn()
    shape = workload.model.inputs.shapes[0]
    log: list = []  # (batch, fits) per trial

    class Images(Dataset):
        base = torch.randn(64, *shape)

        def __len__(self):
            return 1 << 30

        def __getitem__(self, i):
            return self.base[i % 64]

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = workload.model.instantiate()
            self.batch_size = 2
            self.cap = None

        def train_dataloader(self):
            return DataLoader(Images(), batch_size=self.batch_size, num_workers=0)

        def configure_optimizers(self):
            return make_optimizer(workload.optimizer, self.parameters(), dev.kind)

        def training_step(self, batch, batch_idx):
            return loss_fn(self.net(batch), None)

        def on_train_batch_start(self, batch, batch_idx):
            if batch_idx == 0:
                log.append([len(batch), True])
            if dev.kind == "cpu":
                if self.cap is None:
                    from memprof.engine.measure import CpuMemoryCap

                    self.cap = CpuMemoryCap(dev.cap_bytes)
                self.cap.register([list(self.parameters()), list(self.buffers()), batch])

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            # the whole step (training_step + backward inside the closure, then Adam) runs under the cap
            try:
                with self.cap if self.cap is not None else _null():
                    optimizer.step(closure=optimizer_closure)
            except Exception:
                log[-1][1] = False
                raise

    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    model = Lit()
    trainer = L.Trainer(
        accelerator="gpu" if dev.kind == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    size = (
        Tuner(trainer).scale_batch_size(
            model, mode=mode, steps_per_trial=STEPS, init_val=2, max_trials=25, margin=margin, max_val=max_batch
        )
        if mode == "binsearch"
        else Tuner(trainer).scale_batch_size(
            model, mode=mode, steps_per_trial=STEPS, init_val=2, max_trials=25, max_val=max_batch
        )
    )
    seconds = time.perf_counter() - t0
    if model.cap is not None:
        model.cap.close()
    name = f"Lightning {mode}" + (f" (margin {margin:g})" if mode == "binsearch" else "")
    return Row(name, size, len(log), sum(1 for _, ok in log if not ok), seconds, [tuple(x) for x in log])


def _null():
    import contextlib

    return contextlib.nullcontext()


def accelerate_finder(workload: Workload, dev: Device, start: int) -> Row:
    from accelerate.utils import find_executable_batch_size

    log: list = []

    @find_executable_batch_size(starting_batch_size=start)
    def train(batch_size):
        log.append([batch_size, False])
        run_trial(workload, dev, batch_size)
        log[-1][1] = True
        return batch_size

    t0 = time.perf_counter()
    try:
        size = train()
    except RuntimeError as exc:  # "No executable batch size found, reached zero."
        size, note = None, str(exc)
    else:
        note = f"starting_batch_size={start}"
    seconds = time.perf_counter() - t0
    return Row(
        "accelerate find_executable_batch_size",
        size,
        len(log),
        sum(1 for _, ok in log if not ok),
        seconds,
        [tuple(x) for x in log],
        note,
    )


FINDERS = {
    "memprof": lambda w, d, a: memprof_finder(w, d, a.max_batch),
    "lightning-power": lambda w, d, a: lightning_finder(w, d, "power", 0.0, a.max_batch),
    "lightning-binsearch": lambda w, d, a: lightning_finder(w, d, "binsearch", 0.0, a.max_batch),
    "lightning-binsearch-default": lambda w, d, a: lightning_finder(w, d, "binsearch", 0.05, a.max_batch),
    "accelerate": lambda w, d, a: accelerate_finder(w, d, a.accelerate_start),
}


def warm_up(dev: Device) -> str:
    """Imports and first-use costs, paid once per process, kept out of every finder's time."""
    t0 = time.perf_counter()
    import accelerate  # noqa: F401
    import lightning  # noqa: F401

    t1 = time.perf_counter()
    from memprof.engine.trace import trace_step

    tiny = Workload(
        model=ModelSpec(
            ref="tiny",
            display_name="tiny",
            factory=lambda: nn.Linear(4, 2),
            inputs=InputSpec(shapes=[(4,)], dtype="float"),
        ),
        batch_size=2,
    )
    trace_step(tiny, target="cuda" if dev.kind == "cuda" else "cpu")
    t2 = time.perf_counter()
    return (
        f"import lightning + accelerate {t1 - t0:.1f} s; "
        f"memprof's first fake-tensor trace of a tiny model {t2 - t1:.1f} s"
    )


# --------------------------------------------------------------------------- report
def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = [f"torch {torch.__version__}"]
    for mod in ("lightning", "accelerate"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} not installed")
    return f"{cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}; " + ", ".join(versions)


def table(rows: list[Row], truth: int | None) -> str:
    out = [
        "| finder | result | exact? | trials | OOMs | wall time (median) | CPU time | tried (✓ fits, ✗ OOM) |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        exact = (
            "n/a"
            if truth is None
            else (
                "yes"
                if r.result == truth
                else f"no ({'+' if (r.result or 0) > truth else ''}{(r.result or 0) - truth})"
            )
        )
        tried = " ".join(f"{b}{'✓' if ok else '✗'}" for b, ok in r.sizes)
        note = f" — {r.note}" if r.note else ""
        runs = " / ".join(f"{x:.1f}" for x in r.runs) if len(r.runs) > 1 else ""
        wall = f"{r.seconds:.1f} s" + (f" ({runs})" if runs else "")
        out.append(
            f"| {r.finder} | {r.result} | {exact} | {r.trials} | {r.ooms} | {wall} | {r.cpu_seconds:.1f} s | "
            f"{tried}{note} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    from memprof.units import parse_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--cap", default="150MiB", help="CPU cap on live tensor bytes (CPU only)")
    ap.add_argument("--resolution", type=int, default=32, help="input resolution (square images)")
    ap.add_argument("--max-batch", type=int, default=8192)
    ap.add_argument(
        "--accelerate-start",
        type=int,
        default=1024,
        help="accelerate's starting_batch_size (it only searches downwards)",
    )
    ap.add_argument("--finders", default="memprof,lightning-power,lightning-binsearch,accelerate")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--repeat", type=int, default=1, help="run each finder this many times; report the median")
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("ERROR: --device cuda needs a CUDA GPU and none is available", file=sys.stderr)
        print("HINT: run the CPU benchmark (the default): python scripts/bench_search.py --cap 150MiB", file=sys.stderr)
        return 3
    dev = Device(args.device, parse_bytes(args.cap) if args.device == "cpu" else None)
    workload = bench_workload(args.resolution)
    finders = [f.strip() for f in args.finders.split(",") if f.strip()]
    warm = warm_up(dev)
    rows: list[Row] = []
    for name in finders:
        if name not in FINDERS:
            print(f"ERROR: unknown finder {name!r}; choose from {', '.join(FINDERS)}", file=sys.stderr)
            return 2
    for name in finders:
        runs = []
        for rep in range(args.repeat):
            print(f"running {name} ({rep + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
            c0 = time.process_time()
            row = FINDERS[name](workload, dev, args)
            row.cpu_seconds = time.process_time() - c0
            dev.clean()
            runs.append(row)
            print(
                f"  {row.finder}: {row.result} in {row.trials} trials, {row.ooms} OOMs, {row.seconds:.1f} s "
                f"(CPU {row.cpu_seconds:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        runs.sort(key=lambda r: r.seconds)
        median = runs[len(runs) // 2]
        median.runs = [r.seconds for r in runs]
        rows.append(median)
    # the ground truth, checked independently of every finder
    truth = next((r.result for r in rows if r.finder.startswith("memprof")), None)
    verified = ""
    if truth is not None:
        ok, next_ok = fits(workload, dev, truth), fits(workload, dev, truth + 1)
        verified = f"batch {truth} fits: {ok}; batch {truth + 1} fits: {next_ok}"
        if not ok or next_ok:
            truth = None
            verified += " (memprof's answer is NOT the limit)"
    where = (
        f"CPU, live tensor bytes capped at {args.cap}"
        if dev.kind == "cpu"
        else f"CUDA: {torch.cuda.get_device_name(0)}"
    )
    cmd = "python scripts/bench_search.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join(
        [
            f"# Batch-size finders on {('the CPU under a cap' if dev.kind == 'cpu' else 'CUDA')}",
            "",
            f"- command: `{cmd.strip()}`",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- machine: {_machine()}",
            "- workload: BenchNet (3 conv + linear, defined in the script), "
            f"input 3×{args.resolution}×{args.resolution}, "
            f"Adam, fp32, {STEPS} training steps per trial for every finder",
            f"- device: {where}",
            f"- ground truth (checked separately): {verified or 'n/a'}",
            f"- wall time: median of {args.repeat} run(s) (all runs in brackets); "
            "CPU time: that run's process CPU time "
            f"(less sensitive to other load on the machine). Excluded for every finder: imports and one-time "
            f"warm-up ({warm})",
            "",
            table(rows, truth),
            "",
        ]
    )
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
