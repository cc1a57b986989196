"""Rendering for ``memprof find-batch``: live progress on stderr, the trial table, the answer, a terminal chart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import format_bytes, format_pct, precise_bytes
from .charts import batch_chart, terminal, write

_METRIC_LABEL = {"allocated": "live tensor bytes", "reserved": "torch reserved"}


def _verdict(trial) -> str:
    return "fits" if trial.fits else "OOM"


def _measured(trial, metric: str) -> int | None:
    return trial.peak_reserved_bytes if metric == "reserved" else trial.peak_allocated_bytes


def _error_pct(trial, metric: str) -> float | None:
    measured = _measured(trial, metric)
    if not trial.fits or measured is None or trial.predicted_bytes is None or measured == 0:
        return None
    return 100.0 * (trial.predicted_bytes - measured) / measured


# --------------------------------------------------------------------------- live progress
class TrialProgress:
    """Shows what the search is doing on stderr while trials run: batch, phase, elapsed.

    On a terminal: a Rich live display. Elsewhere (logs, CI, pipes): one plain line per
    finished trial, so a long search never looks frozen.
    """

    def __init__(self, console: Console, unit: str = "batch"):
        self.console = console
        self.unit = unit  # what a trial's number is: "batch", or "tokens" (find-batch --search seq-len)
        self.live: Live | None = None
        self.t0 = time.perf_counter()
        self.trial_t0 = self.t0
        self.batch: int | None = None
        self.step = 0
        self.phase = ""
        self.done: list[Any] = []
        self.state = "starting"

    def __enter__(self) -> TrialProgress:
        if self.console.is_terminal:
            self.live = Live(
                self._render(), console=self.console, refresh_per_second=8, transient=True, get_renderable=self._render
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None

    def _render(self):
        now = time.perf_counter()
        lines = []
        for t in self.done[-8:]:
            what = format_bytes(t.peak_reserved_bytes or t.peak_allocated_bytes) if t.fits else f"in {t.oom_phase}"
            lines.append(
                Text(
                    f"  {self.unit} {t.batch_size:>6}  {_verdict(t):<4}  {what}  {t.seconds:.1f} s",
                    style="green" if t.fits else "red",
                )
            )
        if self.state == "predict":
            lines.append(Text(f"  tracing a prediction ... {now - self.t0:.1f} s", style="cyan"))
        elif self.batch is not None:
            where = f"step {self.step} {self.phase}" if self.step else "building model and batch"
            lines.append(
                Text(
                    f"  trial {len(self.done) + 1}: {self.unit} {self.batch}  {where}  "
                    f"{now - self.trial_t0:.1f} s  (total {now - self.t0:.1f} s)",
                    style="cyan",
                )
            )
        return Group(Text("memprof find-batch", style="bold"), *lines)

    def on_event(self, kind: str, data: Any) -> None:
        if kind == "predict":
            self.state = "predict"
        elif kind == "predicted":
            self.state = "trials"
            if self.live is None and data is not None:
                self.console.print(
                    f"prediction: largest {self.unit} {data.max_batch or 'none (nothing fits)'} "
                    f"({format_bytes(data.slope_bytes_per_sample)}/{'sample' if self.unit == 'batch' else 'block'}, "
                    "traced in "
                    f"{data.seconds:.1f} s)",
                    highlight=False,
                )
        elif kind == "trial":
            self.batch, self.step, self.phase = data, 0, ""
            self.trial_t0 = time.perf_counter()
        elif kind == "phase":
            _, self.step, self.phase = data
        elif kind == "trial-done":
            self.done.append(data)
            self.batch = None
            if self.live is None:
                t = data
                extra = (
                    f"peak {format_bytes(_measured(t, 'reserved') or t.peak_allocated_bytes)}"
                    if t.fits
                    else f"out of memory in {t.oom_phase}"
                )
                self.console.print(
                    f"trial {len(self.done)}: {self.unit} {t.batch_size} {_verdict(t)}, {extra} ({t.seconds:.1f} s)",
                    highlight=False,
                )
        if self.live is not None:
            self.live.refresh()


# --------------------------------------------------------------------------- tables
def trial_table(result) -> Table:
    metric = result.metric
    cuda = metric == "reserved"
    table = Table(title="Trials", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column(
        "tokens" if getattr(result, "axis", "batch_size") == "seq_len" else "batch", justify="right", no_wrap=True
    )
    table.add_column("why", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("peak alloc" if cuda else "peak live", justify="right", no_wrap=True)
    if cuda:
        table.add_column("peak reserved", justify="right", no_wrap=True)
        table.add_column("NVML used", justify="right", no_wrap=True)
    table.add_column("predicted", justify="right", no_wrap=True)
    table.add_column("error", justify="right", no_wrap=True)
    ranks = any(t.rank_peaks_bytes for t in result.trials)
    if ranks:
        table.add_column("ranks (min-max)", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    for i, t in enumerate(result.trials, 1):
        if t.fits:
            verdict = Text("fits", style="green")
        else:
            where = (t.oom_phase or "").replace("step ", "s")
            for long, short in (("forward", "fwd"), ("backward", "bwd"), ("optimizer", "opt")):
                where = where.replace(long, short)
            verdict = Text(f"OOM {where}".strip(), style="red")
        peak = format_bytes(t.peak_allocated_bytes) if t.peak_allocated_bytes is not None else "-"
        row = [str(i), str(t.batch_size), t.reason or "", verdict, peak]
        if cuda:
            row += [format_bytes(t.peak_reserved_bytes), format_bytes(t.nvml_used_bytes)]
        row += [format_bytes(t.predicted_bytes), format_pct(_error_pct(t, metric), 1, signed=True)]
        if ranks:
            row.append(_spread(t.rank_peaks_bytes))
        row.append(f"{t.seconds:.1f} s")
        table.add_row(*row)
    return table


def _spread(peaks) -> str:
    known = [p for p in peaks or () if p is not None]
    if not known:
        return "-"
    low, high = min(known), max(known)
    return format_bytes(low) if low == high else f"{format_bytes(low)}-{format_bytes(high)}"


def answer_lines(result) -> list[str]:
    if getattr(result, "axis", "batch_size") == "seq_len":
        return _seq_answer_lines(result)
    cap = result.capacity
    lines = []
    if result.largest_batch is None:
        if result.status == "interrupted":
            lines.append("Interrupted before any batch was found to fit.")
        else:
            lines.append(f"Nothing fits: batch {result.min_batch} does not fit in {format_bytes(cap.total_bytes)}.")
        return lines
    if result.status == "exact":
        lines.append(
            f"Largest batch that fits: {result.largest_batch} (batch {result.smallest_oom_batch} runs out of memory)"
        )
    elif result.status == "max_batch":
        lines.append(f"Largest batch that fits: at least {result.largest_batch} (--max-batch; the limit is higher)")
    elif result.status == "interrupted":
        hi = f", {result.smallest_oom_batch} does not" if result.smallest_oom_batch else ""
        lines.append(f"Interrupted: so far batch {result.largest_batch} fits{hi}")
    else:
        lines.append(f"Largest batch found to fit: {result.largest_batch} (search stopped: {result.status})")
    if result.recommended_batch is not None:
        rounding = f", multiple of {result.multiple_of}" if result.multiple_of else ""
        so_far = " so far" if result.status == "interrupted" else ""
        lines.append(
            f"Recommended batch{so_far}: {result.recommended_batch} "
            f"({result.headroom:g} x {result.largest_batch}{rounding})"
        )
        if result.recommended_expected_bytes is not None:
            left = result.headroom_left_bytes
            pct = f" ({100 * left / cap.total_bytes:.0f} %)" if left is not None and cap.total_bytes else ""
            lines.append(
                f"  expected peak {format_bytes(result.recommended_expected_bytes)} of "
                f"{format_bytes(cap.total_bytes)}; headroom left {precise_bytes(left)}{pct}"
            )
    if result.grad_accum_steps is not None:
        target = result.target_global_batch
        eff = result.grad_accum_steps * result.micro_batch
        line = f"Global batch {target}: {result.grad_accum_steps} gradient-accumulation steps of {result.micro_batch}"
        ranks = result.workload.get("world_size") if result.workload.get("strategy") else None
        if ranks:
            line += f" per rank × {ranks} ranks"
            eff *= ranks
        if eff != target:
            line += f" (= {eff})"
            exact = result.exact_accumulation
            if exact:
                line += f", or {exact[0]} x {exact[1]} for exactly {target}"
        lines.append(line)
    oom = result.ooms
    overheads = sorted(t.cuda_overhead_bytes for t in result.trials if t.cuda_overhead_bytes is not None)
    if overheads:
        lines.append(
            f"CUDA context and workspaces (NVML process usage - torch reserved): "
            f"{format_bytes(overheads[len(overheads) // 2])}, on top of the limit's reserved bytes"
        )
    n = len(result.trials)
    lines.append(f"{n} trial{'s' if n != 1 else ''}, {oom} out of memory, {result.wall_seconds:.1f} s")
    return lines


def write_plot(result, path: Path) -> Path:
    """Peak memory vs batch as a file: .svg, .png, .pdf or .html (see :func:`memprof.render.charts.write`)."""
    return write(batch_chart(result), path)


def _seq_answer_lines(result) -> list[str]:
    """The answer of a sequence-length search (``--search seq-len``): in tokens, at a fixed batch."""
    cap = result.capacity
    at = f"at batch {result.seq_batch_size}"
    if result.largest_batch is None:
        if result.status == "interrupted":
            return ["Interrupted before any sequence length was found to fit."]
        return [f"Nothing fits: {result.min_batch} tokens {at} do not fit in {format_bytes(cap.total_bytes)}."]
    if result.status == "exact":
        nxt = f" ({result.smallest_oom_batch} run out of memory)" if result.smallest_oom_batch else ""
        lines = [f"Longest sequence that fits {at}: {result.largest_batch} tokens{nxt}"]
    elif result.status == "max_batch":
        lines = [f"Longest sequence that fits {at}: at least {result.largest_batch} tokens (the search's limit)"]
    else:
        lines = [f"Longest sequence found to fit {at}: {result.largest_batch} tokens (search: {result.status})"]
    if result.recommended_batch is not None:
        lines.append(f"Recommended: {result.recommended_batch} tokens ({result.headroom:g} x {result.largest_batch})")
    lines.extend(f"Note: {n}" for n in result.notes)
    n = len(result.trials)
    lines.append(f"{n} trial{'s' if n != 1 else ''}, {result.ooms} out of memory, {result.wall_seconds:.1f} s")
    return lines


def header_lines(result) -> list[str]:
    w = result.workload
    opt = f", optimizer {w['optimizer']}" if w.get("optimizer") else ""
    lines = [
        f"Model {w['model']}  input {w['input']}  {w['dtype']}{opt}, mode {w['mode']}",
        f"Device {result.device}",
        *(
            [f"Parallel {w['strategy']} × {w['world_size']} ranks: batches are per rank, a trial runs on every rank"]
            if w.get("strategy")
            else []
        ),
        f"Limit {format_bytes(result.capacity.total_bytes)} of {_METRIC_LABEL.get(result.metric, result.metric)} "
        f"({result.capacity.source}); {result.steps} steps per trial",
    ]
    p = result.prediction
    if p is not None:
        seq = getattr(result, "axis", "batch_size") == "seq_len"
        largest = f"longest sequence {p.max_batch} tokens" if seq else f"largest batch {p.max_batch}"
        mb = "nothing fits" if p.max_batch in (None, 0) else largest
        lines.append(
            f"Prediction (traced): {mb}; {format_bytes(p.intercept_bytes)} + "
            f"{format_bytes(p.slope_bytes_per_sample)}/{'token' if seq else 'sample'} ({p.seconds:.1f} s)"
        )
    return lines


def render_find_batch(result, console: Console, *, chart: bool = True) -> None:
    for line in header_lines(result):
        console.print(line, highlight=False)
    if result.trials:
        console.print()
        console.print(trial_table(result))
    console.print()
    for line in answer_lines(result):
        console.print(line, highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if chart and any(t.fits for t in result.trials):
        console.print()
        console.print(terminal(batch_chart(result)))
