"""Data parallelism on fake tensors: DDP, FSDP2 and the ZeRO stages traced per rank, against hand-computed bytes."""

from __future__ import annotations

import math

import pytest
import torch

from memprof.engine import distributed
from memprof.engine.loading import InputSpec, ModelSpec
from memprof.engine.trace import trace_step
from memprof.engine.tracking import StorageTracker
from memprof.engine.workload import Workload
from memprof.errors import UsageError
from memprof.results import MemCategory as C
from memprof.zoo import Cruncher

DIM, LAYERS = 128, 4
#: Cruncher(128, 4): four bias-free 128x128 layers and a 1x128 head, float32
SHAPES = [(DIM, DIM)] * LAYERS + [(1, DIM)]
PARAM_BYTES = sum(math.prod(s) for s in SHAPES) * 4
ADAM_STEP_BYTES = 4  # Adam's `step`: one float32 scalar per parameter on the CPU


def cruncher(batch: int = 32, optimizer: str = "adam", **kw) -> Workload:
    spec = ModelSpec(
        ref="Cruncher",
        display_name="Cruncher",
        factory=Cruncher,
        kwargs={"dim": DIM, "num_layers": LAYERS},
        inputs=InputSpec(shapes=[(DIM,)], dtype="float"),
        source="module",
    )
    return Workload(spec, batch_size=batch, optimizer=optimizer, **kw)


def trace(workload: Workload, **kw):
    return trace_step(workload, target="cpu", **kw)


def shard_bytes(world_size: int) -> int:
    """FSDP2 pads every parameter's dim 0 to a multiple of the world size and keeps one chunk."""
    return sum(math.ceil(rows / world_size) * cols * 4 for rows, cols in SHAPES)


def cuda_shard_bytes(world_size: int) -> int:
    """:func:`shard_bytes` with CUDA's 512-byte rounding of every storage."""
    return sum(-(-math.ceil(rows / world_size) * cols * 4 // 512) * 512 for rows, cols in SHAPES)


@pytest.fixture(scope="module")
def single():
    return trace(cruncher())


# --------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("world_size", [2, 16])
def test_ddp_adds_its_gradient_buckets_at_any_world_size(single, world_size):
    r = trace(cruncher(strategy="ddp", world_size=world_size))
    assert r.peak_bytes - single.peak_bytes == PARAM_BYTES  # the buckets: one copy of the gradients
    assert r.totals[C.PARAMETER] == PARAM_BYTES
    assert r.breakdown_at_peak[C.COMMUNICATION] == PARAM_BYTES
    assert r.rank == 0
    assert any("one rank of" in n for n in r.notes)


def test_ddp_gradient_as_bucket_view_costs_nothing(single):
    r = trace(cruncher(strategy="ddp", world_size=4, gradient_as_bucket_view=True))
    assert r.peak_bytes == single.peak_bytes  # the gradients are views into the buckets


# --------------------------------------------------------------------------- FSDP2 / ZeRO-3, ZeRO-2
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_fsdp_shards_parameters_gradients_and_optimizer_state(world_size):
    r = trace(cruncher(strategy="fsdp", world_size=world_size))
    shard = shard_bytes(world_size)
    assert r.totals[C.PARAMETER] == shard
    assert r.totals[C.GRADIENT] == shard
    assert r.totals[C.OPTIMIZER_STATE] == 2 * shard + len(SHAPES) * ADAM_STEP_BYTES
    assert r.breakdown_at_peak.get(C.GATHERED_PARAMETER, 0) > 0


def test_fsdp_at_one_rank_is_the_single_process_step(single):
    assert trace(cruncher(strategy="fsdp", world_size=1)).peak_bytes == single.peak_bytes


def test_model_states_shrink_as_one_over_n_while_activations_stay(single):
    results = {n: trace(cruncher(strategy="zero3", world_size=n)) for n in (2, 8)}
    for n, r in results.items():
        assert r.totals[C.ACTIVATION] == single.totals[C.ACTIVATION]
        states = r.totals[C.PARAMETER] + r.totals[C.GRADIENT] + r.totals[C.OPTIMIZER_STATE]
        single_states = sum(single.totals[c] for c in (C.PARAMETER, C.GRADIENT, C.OPTIMIZER_STATE))
        assert states == pytest.approx(single_states / n, rel=0.02)
    assert results[8].peak_bytes < results[2].peak_bytes < single.peak_bytes


def test_zero2_keeps_parameters_gathered_through_backward():
    # a CUDA step: no gloo buffers, so the peak is where the gathered parameters pile up
    zero2 = trace_step(cruncher(strategy="zero2", world_size=4), target="cuda")
    zero3 = trace_step(cruncher(strategy="zero3", world_size=4), target="cuda")
    assert zero2.totals[C.PARAMETER] == zero3.totals[C.PARAMETER] == cuda_shard_bytes(4)
    # every unit's gathered parameters are alive at once at the end of forward
    assert zero2.breakdown_at_peak[C.GATHERED_PARAMETER] >= LAYERS * DIM * DIM * 4
    assert zero2.peak_bytes > zero3.peak_bytes


# --------------------------------------------------------------------------- ZeRO-1
def test_zero1_shards_only_the_optimizer_state_and_traces_the_heaviest_rank():
    r = trace(cruncher(strategy="zero1", world_size=2))
    # ZeroRedundancyOptimizer gives each parameter (largest first) to the lightest rank:
    # rank 0 gets layers 0 and 2 and the head, rank 1 layers 1 and 3
    heavy = [SHAPES[0], SHAPES[2], SHAPES[4]]
    assert r.rank == 0
    assert r.totals[C.OPTIMIZER_STATE] == sum(2 * math.prod(s) * 4 + ADAM_STEP_BYTES for s in heavy)
    assert r.totals[C.PARAMETER] == r.totals[C.GRADIENT] == PARAM_BYTES


def test_zero1_traces_the_rank_with_the_largest_partition():
    """Layers of 10240, 6144 and 6144 weights: ZeroRedundancyOptimizer puts the largest on rank 0, then
    both others on rank 1 (the lighter one each time), so rank 1 holds more state and is the one traced."""

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(DIM, 80, bias=False)
            self.b = torch.nn.Linear(DIM, 48, bias=False)
            self.c = torch.nn.Linear(DIM, 48, bias=False)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x), self.c(x)], dim=-1)

    spec = ModelSpec("Heads", "Heads", Heads, {}, InputSpec(shapes=[(DIM,)], dtype="float"), source="module")
    r = trace(Workload(spec, batch_size=4, optimizer="sgd-momentum", strategy="zero1", world_size=2))
    assert r.rank == 1
    assert r.totals[C.OPTIMIZER_STATE] == 2 * 48 * DIM * 4  # one momentum buffer for b and c
    r0 = trace_step(
        Workload(spec, batch_size=4, optimizer="sgd-momentum", strategy="zero1", world_size=2), target="cpu", rank=0
    )
    assert r0.totals[C.OPTIMIZER_STATE] == 80 * DIM * 4 and r0.peak_bytes < r.peak_bytes


# --------------------------------------------------------------------------- the tracer's shortcuts
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_replayed_steps_equal_traced_steps(strategy):
    w = cruncher(strategy=strategy, world_size=4)
    replayed = trace(w, steps=3)
    traced = trace(w, steps=3, replay_steps=False)
    assert (replayed.peak_bytes, replayed.first_step_peak_bytes, replayed.steady_peak_bytes) == (
        traced.peak_bytes,
        traced.first_step_peak_bytes,
        traced.steady_peak_bytes,
    )
    assert replayed.totals == traced.totals
    # gloo's buffers stay modelled in replayed steps too (a replayed record keeps its origin)
    assert replayed.modelled == traced.modelled


def test_tracker_counts_storage_resizes():
    """FSDP2 frees and re-gathers parameters with UntypedStorage.resize_: no op, but memory all the same."""
    t = torch.empty(100)
    events: list[tuple[str, int]] = []
    tracker = StorageTracker(
        on_alloc=lambda k, n, f: events.append(("+", n)), on_free=lambda k, n: events.append(("-", n))
    )
    tracker.register([t])
    with tracker:
        t.untyped_storage().resize_(0)
        assert tracker.current_bytes == 0
        t.untyped_storage().resize_(800)
        assert tracker.current_bytes == 800
    t.untyped_storage().resize_(0)  # not watched once the tracker is closed
    assert tracker.current_bytes == 800
    assert events == [("+", 400), ("-", 400), ("+", 800)]
    assert tracker.peak_bytes == 800
    del t
    assert tracker.current_bytes == 0


def test_offload_moves_model_states_to_the_host_on_cuda():
    w = cruncher(strategy="fsdp", world_size=4)
    kept = trace_step(w, target="cuda")
    off = trace_step(w.replace(offload="params"), target="cuda")
    assert off.host_bytes is not None and off.host_bytes > 0
    assert C.PARAMETER not in off.breakdown_at_peak and C.OPTIMIZER_STATE not in off.breakdown_at_peak
    assert kept.peak_bytes - off.peak_bytes >= kept.breakdown_at_peak[C.OPTIMIZER_STATE]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "fields, words",
    [
        ({"strategy": "zero4"}, "unknown `strategy`"),
        ({"world_size": 8}, "needs a `strategy`"),
        ({"strategy": "ddp", "world_size": 0}, "`world_size` must be a positive integer"),
        ({"strategy": "ddp", "world_size": 2, "offload": "params"}, "`offload` params needs a sharded strategy"),
        ({"strategy": "ddp", "world_size": 2, "offload": "disk"}, "unknown offload"),
        ({"strategy": "ddp", "world_size": 2, "bucket_cap_mb": 0}, "`bucket_cap_mb` must be positive"),
    ],
)
def test_bad_plans_are_one_line_with_a_hint(fields, words):
    with pytest.raises(UsageError) as info:
        cruncher(**fields)
    assert words in info.value.message and "\n" not in info.value.message
    assert info.value.hint


def test_a_torch_without_fsdp2_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "_fully_shard", lambda: None)
    with pytest.raises(UsageError) as info:
        cruncher(strategy="fsdp", world_size=2)
    assert "FSDP2" in info.value.message and "ddp" in info.value.hint
    assert cruncher(strategy="ddp", world_size=2).strategy == "ddp"  # DDP needs no FSDP2


def test_strategy_aliases():
    assert distributed.get_strategy("FSDP2") == "fsdp"
    assert distributed.get_strategy("shard_grad_op") == "zero2"
    assert distributed.get_strategy("zero-1") == "zero1"
