"""``find_batch``: the largest batch that really fits, found with a handful of real trials.

Orchestration only: the traced prediction (:func:`memprof.engine.fit.fit_batch`) gives the
search its start and slope, :mod:`memprof.engine.measure` runs the real trials, and
:func:`memprof.engine.search.search` decides which batch to try next. Never prints; progress
goes to the ``on_event`` callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ..engine import fit as fitting
from ..engine.measure import Runner, make_runner, workload_recipe
from ..engine.search import Guide, Outcome, search
from ..engine.torchrun import COLLECTIVE_TIMEOUT_S, Launch, check_launch, raise_rank_error, run_job
from ..engine.workload import MAX_SKIPPED_STEPS, Workload
from ..errors import MemprofError, UsageError
from ..results import BatchPrediction, BatchTrial, Capacity, CudaTarget, FindBatchResult, Metric, SearchStatus, Target

DEFAULT_MAX_BATCH = 4096
DEFAULT_STEPS = 2

#: on_event(kind, data): kinds "predict" (start), "predicted" (data: BatchPrediction | None),
#: "trial" (data: batch), "phase" (data: (batch, step, phase)), "trial-done" (data: BatchTrial)
EventCallback = Callable[[str, Any], None]
Predictor = Callable[..., Any]


def _default_predictor(
    workload: Workload,
    capacity_bytes: int,
    *,
    target: Target,
    metric: Metric,
    max_batch: int,
    cuda_target: CudaTarget | None = None,
):
    # the CPU cap counts tensor storages only (as a GPU would), so predict without oneDNN's kernel scratch
    import functools

    from ..engine.trace import trace_step

    return fitting.fit_batch(
        workload,
        capacity_bytes,
        target=target,
        max_batch=max_batch,
        metric=metric,
        kernel_scratch=target != "cpu",
        trace_fn=functools.partial(trace_step, cuda_target=cuda_target if target == "cuda" else None),
    )


def check_search(
    steps: int,
    min_batch: int,
    max_batch: int,
    start: int | None,
    headroom: float,
    multiple_of: int | None,
    target_global_batch: int | None,
) -> float:
    """Validate the search options once (before any model is built or rank started); returns the headroom."""
    if steps < 1:
        raise UsageError(
            f"`steps` must be at least 1, got {steps}", "use 2 or more: the first step creates the optimizer state"
        )
    if min_batch < 1:
        raise UsageError(f"`min_batch` must be at least 1, got {min_batch}", "e.g. `min_batch` 1")
    if max_batch < min_batch:
        raise UsageError(f"`max_batch` {max_batch} is below `min_batch` {min_batch}", "raise `max_batch`")
    if start is not None and not (min_batch <= start <= max_batch):
        raise UsageError(f"`start` {start} is outside [{min_batch}, {max_batch}]", "choose a start between them")
    if multiple_of is not None and multiple_of < 1:
        raise UsageError(f"`multiple_of` must be at least 1, got {multiple_of}", "e.g. `multiple_of` 8")
    if target_global_batch is not None and target_global_batch < 1:
        raise UsageError(f"`target_global_batch` must be at least 1, got {target_global_batch}", "e.g. 1024")
    return fitting.check_headroom(headroom)


@contextlib.contextmanager
def _cudnn_benchmark(runner: Any, cuda_target: CudaTarget | None, notes: list[str]):
    """Trials with ``torch.backends.cudnn.benchmark`` on when the script sets it (``cudnn_benchmark``)."""
    if cuda_target is None or not cuda_target.cudnn_benchmark or runner.device != "cuda":
        yield
        return
    if not hasattr(runner, "dev"):  # isolated trials: each child process starts with PyTorch's default
        notes.append("--cudnn-benchmark: isolated trials ran with cudnn.benchmark off (PyTorch's default)")
        yield
        return
    import torch

    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def scaler_notes(trials: list[BatchTrial], steps: int) -> list[str]:
    """What GradScaler's skipped optimizer steps did to the trials (AMP fp16), as notes."""
    skipped = [t for t in trials if t.skipped_steps]
    if not skipped:
        return []
    never = [t.batch_size for t in skipped if t.fits and t.steps_run - t.skipped_steps < steps]
    counts = sorted({t.skipped_steps for t in skipped})
    how = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    notes = [
        f"GradScaler skipped optimizer.step() in {how} step(s) of {len(skipped)} trial(s) (inf/nan gradients at "
        f"its loss scale); memprof ran extra steps until the optimizer had stepped {steps} times, so the peaks "
        "include its state"
    ]
    if never:
        notes.append(
            f"batch {', '.join(map(str, never))}: the optimizer stepped fewer than {steps} times in "
            f"{MAX_SKIPPED_STEPS + 1} steps (GradScaler skipped them all): the peak misses the optimizer state "
            "and under-measures; check the model's loss for inf/nan"
        )
    return notes


def find_batch(
    workload: Workload,
    *,
    device: str = "cuda",
    memory_limit: int | None = None,
    steps: int = DEFAULT_STEPS,
    min_batch: int = 1,
    max_batch: int = DEFAULT_MAX_BATCH,
    start: int | None = None,
    headroom: float = fitting.DEFAULT_HEADROOM,
    multiple_of: int | None = None,
    target_global_batch: int | None = None,
    isolate: bool = False,
    predict: bool = True,
    predictor: Predictor | None = None,
    on_event: EventCallback | None = None,
    search_axis: str = "batch_size",
    seq_multiple_of: int = 1,
    runner: Runner | None = None,
    prediction_seconds: float | None = None,
    cuda_target: CudaTarget | None = None,
) -> FindBatchResult:
    """Search the largest batch for which ``steps`` real training steps fit.

    ``search_axis="seq_len"`` searches the longest sequence instead, at the workload's batch size
    (a multiple of ``seq_multiple_of`` tokens, up to the model's positions): the result's batch
    fields then hold sequence lengths in tokens (``axis`` says so).

    ``device="cpu"`` needs ``memory_limit`` (bytes): live tensor bytes are capped there
    and crossing the cap raises PyTorch's CPU out-of-memory error. ``predictor`` replaces
    the traced prediction (signature of :func:`memprof.engine.fit.fit_batch`, returning an
    object with ``max_batch``, ``slope_bytes_per_sample`` and ``intercept_bytes``);
    ``predict=False`` searches without one (geometric growth capped by ``max_batch``).
    ``runner`` replaces the runner ``device``/``memory_limit``/``isolate`` choose (rank 0 of a torchrun
    job passes a :class:`memprof.engine.torchrun.DistributedRunner`: the batch is then per rank, and
    ``target_global_batch`` counts every rank's samples).
    ``cuda_target`` is the architecture the prediction is for (default: the local GPU's); the
    trials always run on the local device.
    """
    headroom = check_search(steps, min_batch, max_batch, start, headroom, multiple_of, target_global_batch)

    if search_axis not in ("batch_size", "seq_len"):
        raise UsageError(f"unknown `search` axis {search_axis!r}", "choose batch or seq-len")
    if search_axis == "seq_len":
        return _find_seq_len(
            workload,
            device=device,
            memory_limit=memory_limit,
            steps=steps,
            headroom=headroom,
            unit=seq_multiple_of,
            isolate=isolate,
            predict=predict,
            on_event=on_event,
            max_tokens=max_batch if max_batch != DEFAULT_MAX_BATCH else None,
            cuda_target=cuda_target,
        )
    if runner is None:
        runner = make_runner(device, memory_limit, isolate)
    return _search_with(
        runner,
        workload,
        steps=steps,
        min_batch=min_batch,
        max_batch=max_batch,
        start=start,
        headroom=headroom,
        multiple_of=multiple_of,
        target_global_batch=target_global_batch,
        predict=predict,
        predictor=predictor,
        on_event=on_event,
        memory_limit=memory_limit,
        prediction_seconds=prediction_seconds,
        cuda_target=cuda_target,
    )


def _search_with(
    runner: Any,
    workload: Workload,
    *,
    steps: int,
    min_batch: int = 1,
    max_batch: int = DEFAULT_MAX_BATCH,
    start: int | None = None,
    headroom: float = fitting.DEFAULT_HEADROOM,
    multiple_of: int | None = None,
    target_global_batch: int | None = None,
    predict: bool = True,
    predictor: Predictor | None = None,
    on_event: EventCallback | None = None,
    memory_limit: int | None = None,
    prediction_seconds: float | None = None,
    cuda_target: CudaTarget | None = None,
) -> FindBatchResult:
    """The search of :func:`find_batch` with a given runner (one integer axis: the batch, or blocks of tokens)."""
    t0 = time.perf_counter()
    emit = on_event or (lambda kind, data: None)
    ranks = workload.world_size if workload.distributed else 1
    metric = runner.metric
    notes: list[str] = []
    capacity_bytes = runner.capacity_bytes()
    if runner.device == "cpu":
        assert capacity_bytes is not None  # a CPU runner has a cap
        source = "--memory-limit" if ranks == 1 else f"--memory-limit (the smallest of {ranks} ranks)"
        capacity = Capacity(int(capacity_bytes), source, "cpu")
        if cuda_target is not None and not cuda_target.assumed and not cuda_target.source.startswith("local"):
            raise UsageError("`gpu` and `gpu_arch` are for CUDA trials", "leave them out with `device` cpu")
    else:
        capacity = Capacity(capacity_bytes or 0, "torch.cuda.mem_get_info: free + reserved at start", runner.describe())
        if cuda_target is not None and cuda_target.gpu is not None and cuda_target.source.startswith("--gpu"):
            from ..engine.catalog import match_device

            local = match_device(runner.describe())
            if local is None or local.key != cuda_target.gpu.key:
                notes.append(
                    f"the prediction is for {cuda_target.gpu.key} ({cuda_target.arch}), the trials ran on "
                    f"{runner.describe()}: the capacity is the local GPU's"
                )

    # ---- prediction --------------------------------------------------------------------
    prediction: BatchPrediction | None = None
    guide: Guide | None = None
    interrupted = False
    if predict:
        emit("predict", None)
        tp = time.perf_counter()
        try:
            target: Target = "cpu" if runner.device == "cpu" else "cuda"
            pred_metric, pred_capacity = metric, capacity_bytes
            if pred_capacity is None:  # isolated CUDA: the parent does not touch CUDA; NVML's free memory
                from ..engine import nvml

                info = nvml.device_info(getattr(runner, "arg", 0))
                pred_metric, pred_capacity = Metric.NVML, (info.free_bytes if info else None)
            if pred_capacity:
                extra = {}
                if predictor is None and target == "cuda":
                    from ..engine.catalog import resolve_target, with_capacity

                    extra = {"cuda_target": with_capacity(cuda_target or resolve_target(), pred_capacity)}
                fit = (predictor or _default_predictor)(
                    workload, pred_capacity, target=target, metric=pred_metric, max_batch=max_batch, **extra
                )
                per_sample, fixed = int(fit.slope_bytes_per_sample), int(fit.intercept_bytes)
                at_max = getattr(fit, "peak_at_max_bytes", None)
                if fit.max_batch and at_max is not None:
                    # anchor the line at the traced limit: the trials all happen near it
                    fixed = int(at_max - per_sample * fit.max_batch)
                prediction = BatchPrediction(
                    fit.max_batch,
                    per_sample,
                    fixed,
                    pred_metric,
                    prediction_seconds if prediction_seconds is not None else time.perf_counter() - tp,
                    int(getattr(fit, "traces", 0)),
                )
                same_units = pred_metric == metric
                guide = Guide(
                    max_batch=fit.max_batch if fit.max_batch is not None else 0,
                    bytes_per_sample=float(per_sample) or None,
                    fixed_bytes=float(fixed) if same_units else None,
                )
        except KeyboardInterrupt:
            interrupted = True
        except MemprofError as exc:
            notes.append(f"no traced prediction ({exc.message}); searched without one")
        except Exception as exc:  # noqa: BLE001 - the real trials do not need the prediction
            notes.append(f"no traced prediction ({type(exc).__name__}: {exc}); searched without one")
        emit("predicted", prediction)

    # ---- trials ------------------------------------------------------------------------
    trials: list[BatchTrial] = []

    def predicted_at(batch: int) -> int | None:
        if prediction is None or prediction.metric != metric:
            return None
        return int(prediction.intercept_bytes + prediction.slope_bytes_per_sample * batch)

    def probe(batch: int) -> Outcome:
        emit("trial", batch)
        trial = runner.run(workload, batch, steps, lambda step, phase: emit("phase", (batch, step, phase)))
        trial = replace(trial, predicted_bytes=predicted_at(batch))
        trials.append(trial)
        if trial.leaked_bytes:
            notes.append(f"batch {batch}: {trial.leaked_bytes} bytes were still allocated after the cleanup")
        emit("trial-done", trial)
        # near the capacity the reserved peak saturates: the search reads the slope from the allocated one
        allocated = trial.peak_allocated_bytes if metric != Metric.ALLOCATED else None
        return Outcome(trial.fits, fitting.value_of(trial, metric), trial.capacity_bytes, allocated)

    def on_step(step) -> None:
        trials[-1] = replace(trials[-1], reason=step.reason)

    status: SearchStatus
    if interrupted:
        status, largest, smallest_oom = "interrupted", None, None
    else:
        # on the CPU cap the tracer predicts the very bytes the cap counts: start at its answer;
        # on CUDA start 10 % below it (the allocator, workspaces and fragmentation add error)
        first_fraction = 1.0 if runner.device == "cpu" else 0.9
        with _cudnn_benchmark(runner, cuda_target, notes):
            res = search(
                probe,
                capacity_bytes=capacity_bytes,
                guide=guide,
                min_batch=min_batch,
                max_batch=max_batch,
                start=start,
                on_step=on_step,
                first_fraction=first_fraction,
            )
        status, largest, smallest_oom = res.status, res.largest_fit, res.smallest_oom
        if res.capacity_bytes and runner.device != "cpu":
            capacity = replace(capacity, total_bytes=int(res.capacity_bytes))
        if len(trials) > res.trials:  # the interrupted trial: measured but not counted by the search
            trials.pop()

    notes.extend(scaler_notes(trials, steps))

    # ---- the answer --------------------------------------------------------------------
    points = {t.batch_size: v for t in trials if t.fits and (v := fitting.value_of(t, metric)) is not None}
    intercept, slope = fitting.affine_fit(points)
    if slope is None and points and prediction is not None:
        ((b, p),) = points.items()
        slope, intercept = float(prediction.slope_bytes_per_sample), p - prediction.slope_bytes_per_sample * b
    rec = fitting.recommend(largest, headroom, multiple_of)
    if largest is not None and rec is None:
        notes.append(f"no multiple of {multiple_of} fits: the largest batch is {largest}")
    expected = None
    if rec is not None:
        if rec in points:
            expected = points[rec]
        elif slope is not None and intercept is not None:  # affine_fit gives both or neither
            expected = int(round(intercept + slope * rec))
    headroom_left = capacity.total_bytes - expected if expected is not None and capacity.total_bytes else None
    # with several ranks each step takes `ranks` per-rank batches: accumulate over the per-rank share
    per_rank_target = None
    if target_global_batch is not None:
        per_rank_target = math.ceil(target_global_batch / ranks)
        if ranks > 1 and target_global_batch % ranks:
            notes.append(f"the global batch {target_global_batch} is not a multiple of the {ranks} ranks")
    accum, micro = fitting.accumulation(per_rank_target, rec)
    exact_accum = None
    if accum is not None and micro is not None and per_rank_target and rec and accum * micro != per_rank_target:
        exact_accum = fitting.exact_accumulation(per_rank_target, rec)
    return FindBatchResult(
        workload=workload.describe() | {"batch_size": None},
        device=runner.describe(),
        capacity=capacity,
        metric=metric,
        steps=steps,
        status=status,
        largest_batch=largest,
        smallest_oom_batch=smallest_oom,
        recommended_batch=rec,
        recommended_expected_bytes=expected,
        headroom_left_bytes=headroom_left,
        headroom=headroom,
        multiple_of=multiple_of,
        min_batch=min_batch,
        max_batch=max_batch,
        trials=tuple(trials),
        ooms=sum(1 for t in trials if not t.fits),
        prediction=prediction,
        slope_bytes_per_sample=slope,
        intercept_bytes=intercept,
        target_global_batch=target_global_batch,
        grad_accum_steps=accum,
        micro_batch=micro,
        exact_accumulation=exact_accum,
        wall_seconds=time.perf_counter() - t0,
        notes=tuple(notes),
    )


class _SeqRunner:
    """A runner whose "batch" is a number of ``unit``-token blocks of the sequence, at a fixed batch size."""

    def __init__(self, runner: Any, unit: int):
        self.runner = runner
        self.unit = unit
        self.device = runner.device
        self.metric = runner.metric

    def describe(self) -> str:
        return self.runner.describe()

    def capacity_bytes(self) -> int | None:
        return self.runner.capacity_bytes()

    def run(self, workload: Workload, k: int, steps: int = 2, on_phase: Any = None) -> BatchTrial:
        trial = self.runner.run(workload.replace(seq_len=k * self.unit), workload.batch_size, steps, on_phase)
        return replace(trial, batch_size=k)


def _find_seq_len(
    workload: Workload,
    *,
    device: str,
    memory_limit: int | None,
    steps: int,
    headroom: float,
    unit: int,
    isolate: bool,
    predict: bool,
    on_event: EventCallback | None,
    max_tokens: int | None,
    cuda_target: CudaTarget | None = None,
) -> FindBatchResult:
    """find-batch on the sequence axis: the same search (in blocks of ``unit`` tokens), answered in tokens."""
    if isinstance(unit, bool) or not isinstance(unit, int) or unit < 1:
        raise UsageError(f"`seq_multiple_of` must be a positive integer, got {unit!r}", "e.g. 64")
    if workload.seq_len is None:
        raise UsageError(
            f"{workload.model.display_name} takes no token sequence: there is no sequence length to search",
            "search the batch instead, or use a language model (hf:...)",
        )
    positions = workload.model.max_positions
    reserve = (workload.new_tokens or 0) if workload.mode == "generate" else 0
    limit_tokens = positions - reserve if positions is not None else fitting.SEQ_SEARCH_LIMIT
    if max_tokens is not None:
        limit_tokens = min(limit_tokens, max_tokens)
    max_k = max(1, limit_tokens // unit)
    base = make_runner(device, memory_limit, isolate)
    runner = _SeqRunner(base, unit)

    def predictor(
        w: Workload,
        capacity_bytes: int,
        *,
        target: Target,
        metric: Metric,
        max_batch: int,
        cuda_target: CudaTarget | None = None,
    ) -> Any:
        import functools

        from ..engine.trace import trace_step

        fit = fitting.fit_seq_len(
            w,
            capacity_bytes,
            target=target,
            metric=metric,
            multiple_of=unit,
            kernel_scratch=target != "cpu",
            trace_fn=functools.partial(trace_step, cuda_target=cuda_target if target == "cuda" else None),
        )
        k = None if fit.max_seq_len is None else fit.max_seq_len // unit
        at_max = fit.peak_at_max_bytes
        return _SeqPrediction(k, fit.slope_bytes_per_token * unit, fit.intercept_bytes, at_max, fit.traces)

    def in_tokens(kind: str, data: Any) -> None:
        if on_event is None:
            return
        if kind == "predicted" and data is not None and data.max_batch is not None:
            data = replace(data, max_batch=data.max_batch * unit)
        elif kind == "trial":
            data = data * unit
        elif kind == "phase":
            data = (data[0] * unit, *data[1:])
        elif kind == "trial-done":
            data = replace(data, batch_size=data.batch_size * unit)
        on_event(kind, data)

    result = _search_with(
        runner,
        workload,
        steps=steps,
        max_batch=max_k,
        headroom=headroom,
        predict=predict,
        predictor=predictor,
        on_event=in_tokens,
        memory_limit=memory_limit,
        cuda_target=cuda_target,
    )

    def tokens(k: int | None) -> int | None:
        return None if k is None else k * unit

    trials = tuple(replace(t, batch_size=t.batch_size * unit) for t in result.trials)
    pred = result.prediction
    if pred is not None:
        pred = replace(
            pred, max_batch=tokens(pred.max_batch), slope_bytes_per_sample=int(pred.slope_bytes_per_sample / unit)
        )
    slope = result.slope_bytes_per_sample / unit if result.slope_bytes_per_sample is not None else None
    notes = list(result.notes)
    if result.largest_batch is not None and result.largest_batch == max_k and positions is not None:
        notes.append(f"the model's positions ({positions}) end the search, not the memory")
    return replace(
        result,
        workload=workload.describe() | {"seq_len": None},
        largest_batch=tokens(result.largest_batch),
        smallest_oom_batch=tokens(result.smallest_oom_batch),
        recommended_batch=tokens(result.recommended_batch),
        min_batch=unit,
        max_batch=max_k * unit,
        multiple_of=unit if unit > 1 else None,
        trials=trials,
        prediction=pred,
        slope_bytes_per_sample=slope,
        axis="seq_len",
        seq_batch_size=workload.batch_size,
        notes=tuple(notes),
        target_global_batch=None,
        grad_accum_steps=None,
        micro_batch=None,
        exact_accumulation=None,
    )


@dataclasses.dataclass(frozen=True)
class _SeqPrediction:
    max_batch: int | None
    slope_bytes_per_sample: float
    intercept_bytes: float
    peak_at_max_bytes: int | None
    traces: int


# =========================================================================== several processes
#: strategies find-batch runs under torchrun (the real steps need the real thing)
TORCHRUN_STRATEGIES = ("ddp", "fsdp", "zero2", "zero3", "zero1")


def find_batch_torchrun(
    workload: Workload,
    launch: Launch,
    *,
    device: str = "cuda",
    memory_limit: int | Sequence[int] | None = None,
    steps: int = DEFAULT_STEPS,
    min_batch: int = 1,
    max_batch: int = DEFAULT_MAX_BATCH,
    start: int | None = None,
    headroom: float = fitting.DEFAULT_HEADROOM,
    multiple_of: int | None = None,
    target_global_batch: int | None = None,
    predict: bool = True,
    collective_timeout: float = COLLECTIVE_TIMEOUT_S,
    on_event: EventCallback | None = None,
    on_output: Callable[[str], None] | None = None,
) -> FindBatchResult | None:
    """``find_batch`` as a real ``torchrun`` job of ``launch.world_size`` ranks: the largest per-rank batch
    whose real steps fit on every rank.

    The per-rank prediction is traced here (fake process group, no memory), then torchrun starts the
    ranks: rank 0 runs the search, every rank runs every trial (``workload.strategy``: DDP or FSDP2 over
    the job's process group), and an out-of-memory error on any rank is one for all
    (:class:`memprof.engine.torchrun.DistributedRunner`; when one rank runs out of memory where the
    others do not, they wait at most ``collective_timeout`` seconds in a collective). On the CPU each
    rank's live tensor bytes are capped at ``memory_limit`` (one value, or one per local rank); on CUDA
    each rank uses its own GPU (NCCL). Returns rank 0's result; None on the other nodes of a multi-node
    job (rank 0 reports).
    """
    headroom = check_search(steps, min_batch, max_batch, start, headroom, multiple_of, target_global_batch)
    if not workload.distributed:
        raise UsageError(
            "`nproc_per_node` needs a `strategy`: the ranks train one model together",
            "add `strategy` ddp or fsdp (find-batch under torchrun runs DDP or FSDP2 for real)",
        )
    device = (device or "cuda").strip().lower()
    limits = _limits(memory_limit, device, launch)
    check_launch(launch, device)
    workload = workload.replace(world_size=launch.world_size)
    emit = on_event or (lambda kind, data: None)
    prediction, seconds = None, None
    if predict:
        emit("predict", None)
        tp = time.perf_counter()
        prediction = _torchrun_prediction(workload, device, limits, max_batch)
        seconds = time.perf_counter() - tp
    options = {
        "steps": steps,
        "min_batch": min_batch,
        "max_batch": max_batch,
        "start": start,
        "headroom": headroom,
        "multiple_of": multiple_of,
        "target_global_batch": target_global_batch,
        "prediction_seconds": seconds,
    }
    job = {
        "kind": "find-batch",
        "recipe": workload_recipe(workload),
        "device": device,
        "memory_limits": limits,
        "options": options,
        "prediction": prediction,
        "collective_timeout": collective_timeout,
    }
    if collective_timeout <= 0:
        raise UsageError(f"`collective_timeout` must be positive, got {collective_timeout}", "e.g. 120 (seconds)")
    result = run_job(launch, job, on_event=on_event, on_output=on_output)
    reply = result.ranks.get(0)
    if reply is None and launch.node_rank != 0 and result.returncode == 0:
        return None
    if result.returncode != 0 or not (isinstance(reply, tuple) and reply[0] == "result"):
        raise_rank_error(result, "the find-batch torchrun job")
    assert isinstance(reply, tuple)
    found: FindBatchResult = reply[1]
    return replace(found, wall_seconds=found.wall_seconds + (seconds or 0.0))


def _limits(memory_limit: int | Sequence[int] | None, device: str, launch: Launch) -> list[int] | None:
    if device == "cpu":
        if memory_limit is None:
            raise UsageError(
                "--device cpu needs --memory-limit",
                "e.g. --device cpu --memory-limit 4GiB (each rank's live tensor bytes are capped)",
            )
        limits = [int(memory_limit)] if isinstance(memory_limit, int) else [int(v) for v in memory_limit]
        if len(limits) not in (1, launch.nproc_per_node):
            raise UsageError(
                f"{len(limits)} memory limits for {launch.nproc_per_node} processes per node",
                "give one limit for every rank, or one per local rank: 4GiB,3GiB",
            )
        if any(v <= 0 for v in limits):
            raise UsageError("memory limits must be positive", "e.g. --memory-limit 4GiB")
        return limits
    if memory_limit is not None:
        raise UsageError("--memory-limit is for --device cpu", "on GPUs each rank's device memory is the limit")
    if not (device == "cuda" or device.startswith("cuda:")):
        raise UsageError(f"unknown device {device!r}", "write cuda or cpu")
    return None


def _torchrun_prediction(workload: Workload, device: str, limits: list[int] | None, max_batch: int):
    """The per-rank traced fit the search starts from (None when it cannot be traced: the search goes without)."""
    target: Target = "cpu" if device == "cpu" else "cuda"
    if limits:
        capacity, metric = min(limits), Metric.ALLOCATED
    else:
        from ..engine import nvml

        info = nvml.device_info(0)
        if info is None:
            return None
        capacity, metric = info.free_bytes, Metric.RESERVED
    try:
        return _default_predictor(workload, capacity, target=target, metric=metric, max_batch=max_batch)
    except MemprofError:
        return None
