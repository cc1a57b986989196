"""Real trials: the CPU cap's error (type, message, byte count), OOM recognition, recovery, isolation, CUDA."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from memprof.commands.find_batch import scaler_notes
from memprof.engine.loading import InputSpec, ModelSpec, load_model
from memprof.engine.measure import CpuCapRunner, IsolatedRunner, cpu_oom_message, is_oom_error, oom_kind
from memprof.engine.workload import MAX_SKIPPED_STEPS, Workload, get_precision
from memprof.errors import MeasureError

W_BYTES = 256 * 256 * 4  # Linear(256, 256, bias=False)


def _sum_loss(output, target):
    return output.sum()


def linear_workload(batch=64, optimizer="sgd", made=None, loop="plain"):
    def factory():
        model = nn.Linear(256, 256, bias=False)
        if made is not None:
            made.append(weakref.ref(model))
        return model

    spec = ModelSpec(
        ref="test:linear",
        display_name="linear",
        factory=factory,
        inputs=InputSpec(shapes=[(256,)], dtype="float"),
        loss_hook=_sum_loss,
        source="module",
    )
    return Workload(model=spec, batch_size=batch, optimizer=optimizer, loop=loop)


def test_cpu_cap_peak_is_hand_computed():
    # SGD, sum loss: the peak is in backward: weight + its gradient + the input (saved by mm) + two 4-byte scalars
    b = 64
    trial = CpuCapRunner(10**9).run(linear_workload(b, loop="trainer"), b, steps=1)
    assert trial.fits and trial.steps_run == 1
    x_bytes = b * 256 * 4
    assert 2 * W_BYTES + x_bytes <= trial.peak_allocated_bytes <= 2 * W_BYTES + x_bytes + 16
    assert trial.leaked_bytes == 0
    # a plain loop keeps the output (b x 256 floats) alive through backward as well
    plain = CpuCapRunner(10**9).run(linear_workload(b, loop="plain"), b, steps=1)
    y_bytes = b * 256 * 4
    assert 2 * W_BYTES + x_bytes + y_bytes <= plain.peak_allocated_bytes <= 2 * W_BYTES + x_bytes + y_bytes + 16


def test_cpu_cap_raises_exactly_when_live_bytes_cross_it():
    b = 64
    peak = CpuCapRunner(10**9).run(linear_workload(b), b, steps=2).peak_allocated_bytes
    assert CpuCapRunner(peak).run(linear_workload(b), b, steps=2).fits  # the cap itself is allowed
    trial = CpuCapRunner(peak - 1).run(linear_workload(b), b, steps=2)
    assert not trial.fits
    assert trial.attempted_bytes == peak
    assert trial.oom_detected_by == "exception type"
    assert trial.oom_phase == "step 1 backward"
    assert "DefaultCPUAllocator: can't allocate memory: you tried to allocate 262144 bytes" in trial.error
    assert f"cap of {peak - 1} bytes" in trial.error


def test_cpu_cap_counts_parameters_and_inputs_before_the_step():
    # weight 262,144 B + input 64 x 256 x 4 = 65,536 B are resident: a cap below that fails in setup
    trial = CpuCapRunner(W_BYTES + 65536 - 1).run(linear_workload(64), 64, steps=2)
    assert not trial.fits and trial.oom_phase == "setup" and trial.steps_run == 0
    assert trial.attempted_bytes == W_BYTES + 65536


def test_cap_error_is_what_lightning_and_accelerate_recognise():
    exc = torch.OutOfMemoryError(cpu_oom_message(100, 1100, 1000))
    # both libraries' test: a RuntimeError with one argument containing this text
    assert isinstance(exc, RuntimeError) and len(exc.args) == 1
    assert "DefaultCPUAllocator: can't allocate memory" in exc.args[0]
    try:
        from lightning.pytorch.utilities.memory import is_oom_error as lightning_is_oom
    except ImportError:
        lightning_is_oom = None
    if lightning_is_oom is not None:
        assert lightning_is_oom(exc)
    try:
        from accelerate.utils.memory import should_reduce_batch_size
    except ImportError:
        should_reduce_batch_size = None
    if should_reduce_batch_size is not None:
        assert should_reduce_batch_size(exc)


@pytest.mark.parametrize(
    "exc, kind",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "exception type"),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.1 GiB total)"), "message"),
        (
            RuntimeError(
                "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous "
                "input."
            ),
            "message",
        ),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), "message"),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                "allocate 1 bytes."
            ),
            "message",
        ),
        (MemoryError(), "exception type"),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x2)"), None),
        (ValueError("out of memory"), None),
    ],
)
def test_oom_recognition(exc, kind):
    assert oom_kind(exc) == kind
    assert is_oom_error(exc) == (kind is not None)


def test_recovery_drops_everything_the_trial_held():
    made: list = []
    trial = CpuCapRunner(W_BYTES + 70000).run(linear_workload(64, optimizer="adam", made=made), 64, steps=2)
    assert not trial.fits and trial.leaked_bytes == 0
    gc.collect()
    assert made and all(ref() is None for ref in made), "the model outlived its trial"


def test_a_real_error_is_not_taken_for_oom():
    spec = ModelSpec(
        ref="test:bad",
        display_name="bad",
        factory=lambda: nn.Linear(256, 256),
        inputs=InputSpec(shapes=[(7,)], dtype="float"),
        loss_hook=_sum_loss,
        source="module",
    )
    with pytest.raises(MeasureError, match="training step failed .step 1 forward.: RuntimeError"):
        CpuCapRunner(10**9).run(Workload(model=spec, batch_size=4), 4, steps=1)


def test_isolated_trial_matches_in_process():
    spec = load_model("memprof.zoo:mnist_mlp", {})
    workload = Workload(model=spec, batch_size=8, optimizer="sgd")
    here = CpuCapRunner(10**9).run(workload, 8, steps=2)
    phases: list = []
    there = IsolatedRunner("cpu", 10**9, "cpu").run(workload, 8, steps=2, on_phase=lambda s, p: phases.append((s, p)))
    assert there.fits and there.peak_allocated_bytes == here.peak_allocated_bytes
    assert (2, "optimizer") in phases


@pytest.mark.gpu
def test_cuda_trial_measures_and_recovers():
    from memprof.engine.measure import CudaRunner

    runner = CudaRunner(0)
    workload = linear_workload(64, optimizer="adam")
    trial = runner.run(workload, 64, steps=2)
    assert trial.fits and trial.peak_allocated_bytes >= 4 * W_BYTES
    assert trial.peak_reserved_bytes >= trial.peak_allocated_bytes
    assert trial.leaked_bytes == 0
    huge = runner.capacity_bytes() // (256 * 4) + 1  # the input alone exceeds what torch can reserve
    oom = runner.run(workload, huge, steps=2)
    assert not oom.fits and oom.oom_detected_by == "exception type" and oom.leaked_bytes == 0


def test_cpu_cap_peak_equals_tensor_only_trace_for_a_conv_model():
    """find-batch predicts its CPU cap with the tracer: both must count the same bytes.

    The cap counts tensor storages only (as a GPU would), so the prediction leaves out the
    scratch oneDNN convolutions hold inside the op (kernel_scratch=False); with it, the
    prediction is higher than what the cap sees.
    """
    import torch

    from memprof.cli.common import build_workload
    from memprof.engine.measure import CpuCapRunner
    from memprof.engine.trace import trace_step

    torch.manual_seed(0)
    workload = build_workload("memprof.zoo:seed004_convstack", batch_size=3, input_shape=["3,24,24"], optimizer="adam")
    measured = CpuCapRunner(1 << 40).run(workload, 3, steps=2)
    assert measured.fits
    tensors_only = trace_step(workload, target="cpu", kernel_scratch=False)
    with_scratch = trace_step(workload, target="cpu")
    assert tensors_only.peak_bytes == measured.peak_allocated_bytes
    assert with_scratch.peak_bytes > tensors_only.peak_bytes


# --------------------------------------------------------------------------- GradScaler's skipped steps (amp-fp16)
def _ones_batch(b, device, dtype):
    return torch.ones(b, 256, dtype=dtype, device=device), None


def scaled_linear_workload(optimizer: str, loss_factor: float = 1.0, batch: int = 64) -> Workload:
    """Linear(256, 256) on all-ones inputs, loss = factor x sum: the fp16 weight gradient is batch x factor x the
    loss scale in every element, so GradScaler (initial scale 65536 = 2**16) skips every step whose scale makes
    it overflow fp16 (> 65504), halving the scale each time."""
    spec = ModelSpec(
        ref="test:linear",
        display_name="linear",
        factory=lambda: nn.Linear(256, 256, bias=False),
        inputs=InputSpec(shapes=[(256,)], dtype="float"),
        batch_hook=_ones_batch,
        loss_hook=lambda output, target: output.float().sum() * loss_factor,
        source="module",
    )
    return Workload(model=spec, batch_size=batch, optimizer=optimizer, precision=get_precision("amp-fp16"))


def test_skipped_scaler_steps_are_rerun_so_the_peak_holds_the_optimizer_state():
    # gradient 64 x scale: inf for scales 2**16 ... 2**10 (64 x 1024 = 65536 > 65504), finite at 512: 7 skipped
    # steps, then the two real ones. Before, the two steps both skipped optimizer.step(): SGD's momentum buffer never
    # existed and the peak was SGD's without momentum (in the GPU run: resnet50 sgd-momentum 311 MiB vs 405 traced).
    momentum = CpuCapRunner(10**9).run(scaled_linear_workload("sgd-momentum"), 64, steps=2)
    plain = CpuCapRunner(10**9).run(scaled_linear_workload("sgd"), 64, steps=2)
    for trial in (momentum, plain):
        assert trial.fits and trial.skipped_steps == 7 and trial.steps_run == 9 and trial.leaked_bytes == 0
    assert momentum.peak_allocated_bytes - plain.peak_allocated_bytes == W_BYTES  # the momentum buffer, fp32
    # Adam: exp_avg + exp_avg_sq (2 x W) are resident at the second step's peak, plus its step's temporaries
    adam = CpuCapRunner(10**9).run(scaled_linear_workload("adam"), 64, steps=2)
    assert adam.skipped_steps == 7 and adam.peak_allocated_bytes >= plain.peak_allocated_bytes + 2 * W_BYTES


def test_a_scaler_that_never_steps_is_reported_not_hidden():
    # factor 2**20: the gradient overflows down to scale 2**16 / 2**11 = 32 (64 x 32 x 2**20 = 2**31): more than
    # MAX_SKIPPED_STEPS skipped in a row, so the trial stops and says so (find-batch's notes name the batch)
    trial = CpuCapRunner(10**9).run(scaled_linear_workload("sgd-momentum", 2.0**20), 64, steps=2)
    assert trial.fits and trial.skipped_steps == MAX_SKIPPED_STEPS + 1 == trial.steps_run
    notes = scaler_notes([trial], steps=2)
    assert len(notes) == 2 and notes[1].startswith("batch 64: the optimizer stepped fewer than 2 times")
    ok = CpuCapRunner(10**9).run(scaled_linear_workload("sgd-momentum"), 64, steps=2)
    (note,) = scaler_notes([ok], steps=2)
    assert "skipped optimizer.step() in 7 step(s) of 1 trial(s)" in note
