"""scripts/validate_gpu.py runs only on a GPU; its CPU side (cases, predictions) must work anywhere."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _module():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import validate_gpu

        return validate_gpu
    finally:
        sys.path.remove(str(SCRIPTS))


def test_issue_17_cases_are_listed():
    vg = _module()
    names = [name for name, _, _ in vg.cases(quick=True, names=[], cuda_only=True)]
    wanted = ("dropout_mlp p=0.1", "dropout_mlp p=0:", "SoftmaxAttention", "GPT LM head", "attn dropout", "Padded")
    for needle in wanted:
        assert any(needle in n for n in names), needle
    everything = vg.cases(quick=True, names=[])
    assert len(everything) > len(names)  # plus the CPU zoo in fp32 and amp-fp16


def test_predictions_without_a_gpu(capsys):
    vg = _module()
    assert vg.main(["--list", "--cuda-cases", "--gpu-arch", "sm80", "dropout_mlp", "Padded"]) == 0
    out = capsys.readouterr().out
    assert "predicting for sm80 (--gpu-arch sm80)" in out
    assert "dropout_mlp p=0.1:2048" in out and "efficientx2" in out


def test_without_cuda_the_measuring_run_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        return
    vg = _module()
    assert vg.main(["--cuda-cases", "dropout"]) == 3
    assert "CUDA is not available" in capsys.readouterr().err
