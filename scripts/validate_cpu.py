"""Superseded by ``scripts/validate_zoo.py``, which holds these workloads and 37 more.

Kept so that ``scripts/validate_gpu.py`` (which runs the same workloads on a GPU) and old commands
keep working: ``ZOO`` lists the original 20 workloads as (name, model ref, command-line options),
plus four recurrent ones whose CUDA estimate rests on the cuDNN RNN model (a GPU run checks it);
running this script runs the original 20 through ``validate_zoo.py``:

    PYTHONPATH=. python scripts/validate_cpu.py            # = validate_zoo.py with the original 20
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from validate_zoo import ZOO as CASES  # noqa: E402
from validate_zoo import main as zoo_main  # noqa: E402

ORIGINAL = (
    "resnet18:8:112 adam",
    "resnet50:4:128 sgd-momentum",
    "mobilenet_v3_small:16:128 adam",
    "vgg11:2:64 sgd",
    "densenet121:4:64 adam",
    "efficientnet_b0:4:128 adam",
    "vit_b_16:4:64 sgd",
    "convnext_tiny:2:64 adamw",
    "mnist_mlp:64 sgd (seed 002)",
    "cifar_mlp:128 adam (seed 002)",
    "Cruncher:256 adagrad (seed 000)",
    "seed004_convstack:2:128 sgd",
    "GPT 4L-256d:4x128 adamw",
    "UNet:2:64 adam",
    "SharedLinear:64 adam",
    "resnet18:8:112 adam amp-bf16",
    "GPT 4L-256d:4x128 adamw amp-bf16",
    "mnist_mlp:64 adam eval",
    "mobilenet_v3_small:32:128 eval",
    "UNet:4:64 adam bf16",
    "resnet18:2:64 adam",
    "resnet18:8:64 adam, frozen conv1,bn1,layer1,layer2",
)


def _cli(options: dict) -> dict:
    """make_workload's typed options as the command line's (memprof.cli.common.build_workload)."""
    out = dict(options)
    if "input_shape" in out:
        out["input_shape"] = [",".join(str(d) for d in out["input_shape"])]
    if "model_kwargs" in out:
        out["model_kwargs"] = json.dumps(out["model_kwargs"])
    return out


#: and, for validate_gpu.py, the recurrent rows whose CUDA prediction rests on the cuDNN RNN model
GPU_EXTRA = (
    "LSTM LM 2L:8x64 adam",
    "LSTM LM 3L bi seq-first:4x32 sgd",
    "GRU LM 2L bi:8x64 adam",
    "RNN tanh LM 2L:8x64 adam",
)

ZOO: list[tuple[str, str, dict]] = [
    (c.name, c.ref, _cli(c.options)) for c in CASES if c.name in ORIGINAL or c.name in GPU_EXTRA
]

if __name__ == "__main__":
    sys.exit(zoo_main([*ORIGINAL, *sys.argv[1:]]))
