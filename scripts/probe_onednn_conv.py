"""Measure the scratch oneDNN holds inside one CPU ``convolution_backward`` and set it against the model.

For each shape of a grid (2-D and 3-D; batch, channels, spatial size, kernel, stride, padding,
dilation, grad_output's layout), thread count, dtype and ``output_mask``, run ONE
``aten.convolution_backward`` under torch.profiler memory events (every CPU allocator
allocation and free inside the op, oneDNN's scratchpad included), and compare

    measured = peak of the op's own allocations − the bytes of the gradients it returns

with ``memprof.engine.overheads.onednn_conv_scratch`` (what the CPU trace holds next to the
outputs). The oneDNN implementation that ran (``ONEDNN_VERBOSE``) is printed with each row.
Each thread count runs in its own process (oneDNN reads the thread count when it builds a
primitive). Writes ``benchmarks/onednn_conv_scratch.md`` and ``.json``.

    PYTHONPATH=. python scripts/probe_onednn_conv.py              # threads 1, 2, 4
    PYTHONPATH=. python scripts/probe_onednn_conv.py --threads 2  # one process, printed only
    PYTHONPATH=. python scripts/probe_onednn_conv.py --threads 2 --only 3-D,dilated  # shapes whose label has these
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Shape(NamedTuple):
    """One convolution: 2-D or 3-D (as many spatial sizes as ``spatial`` has), NCHW / NCDHW tensors."""

    label: str
    n: int
    c: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    co: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    #: grad_output's layout: "contiguous", or "channels_last" (ViT's patch embedding: its output is
    #: flattened and transposed to tokens, so its gradient comes back channels-last)
    grad_layout: str = "contiguous"


def conv(label, n, c, spatial, k, co, stride=1, pad=0, dilation=1, grad_layout="contiguous") -> Shape:
    """A :class:`Shape`; ``spatial`` as an int is a square 2-D map, other ints repeat over its dimensions."""
    spatial = (spatial, spatial) if isinstance(spatial, int) else tuple(spatial)

    def dims(v):
        return (v,) * len(spatial) if isinstance(v, int) else tuple(v)

    return Shape(label, n, c, spatial, dims(k), co, dims(stride), dims(pad), dims(dilation), grad_layout)


SHAPES: list[Shape] = [
    conv("resnet layer4 3x3 @2x2", 2, 512, 2, 3, 512, 1, 1),
    conv("resnet layer4 3x3 @2x2 b8", 8, 512, 2, 3, 512, 1, 1),
    conv("resnet layer4 3x3 @4x4", 2, 512, 4, 3, 512, 1, 1),
    conv("3x3 @8x8", 2, 512, 8, 3, 512, 1, 1),
    conv("3x3 @4x4 b16", 16, 512, 4, 3, 512, 1, 1),
    conv("3x3 256 @4x4", 2, 256, 4, 3, 256, 1, 1),
    conv("3x3 64 @2x2", 2, 64, 2, 3, 64, 1, 1),
    conv("3x3 s2 256->512 @4x4", 2, 256, 4, 3, 512, 2, 1),
    conv("3x3 s2 256->512 @2x2", 2, 256, 2, 3, 512, 2, 1),
    conv("3x3 @1x1", 4, 256, 1, 3, 256, 1, 1),
    conv("3x3 @16x16", 4, 128, 16, 3, 128, 1, 1),
    conv("3x3 @32x32 b8", 8, 64, 32, 3, 64, 1, 1),
    conv("1x1 @2x2", 2, 512, 2, 1, 512, 1, 0),
    conv("1x1 s2 256->512 @4x4", 2, 256, 4, 1, 512, 2, 0),
    conv("1x1 @1x1 (SE)", 8, 64, 1, 1, 256, 1, 0),
    conv("stem 7x7 s2 3->64 @64", 2, 3, 64, 7, 64, 2, 3),
    conv("patch 16x16 s16 3->768 @64", 4, 3, 64, 16, 768, 16, 0),
    conv("patch 4x4 s4 3->96 @64", 2, 3, 64, 4, 96, 4, 0),
    conv("5x5 @4x4", 2, 128, 4, 5, 128, 1, 2),
    conv("3x3 @2x2 batch 1", 1, 512, 2, 3, 512, 1, 1),
    conv("3x3 s2 64->128 @28 b8", 8, 64, 28, 3, 128, 2, 1),
    conv("1x1 s2 64->128 @28 b8", 8, 64, 28, 1, 128, 2, 0),
    conv("1x1 16->64 @1x1 b32 (SE)", 32, 16, 1, 1, 64, 1, 0),
    conv("3x3 16 @8x8 b32", 32, 16, 8, 3, 16, 1, 1),
    conv("1x1 16->24 @8x8 b32", 32, 16, 8, 1, 24, 1, 0),
    # ViT's patch embedding as the model runs it: its output becomes tokens, its gradient comes back channels-last
    conv("ViT patch 16x16 s16 3->768 @64, grad channels-last", 4, 3, 64, 16, 768, 16, 0, grad_layout="channels_last"),
    # DeepLabV3's ASPP (dilation 12/24/36 at output stride 8) and smaller dilated maps
    conv("dilated 3x3 d12 960->256 @8x8 (ASPP)", 2, 960, 8, 3, 256, 1, 12, 12),
    conv("dilated 3x3 d36 960->256 @8x8 (ASPP)", 2, 960, 8, 3, 256, 1, 36, 36),
    conv("dilated 3x3 d2 64 @16x16", 2, 64, 16, 3, 64, 1, 2, 2),
    conv("dilated 3x3 d2 32 @32x32 b4", 4, 32, 32, 3, 32, 1, 2, 2),
    conv("dilated 3x3 d2 s2 64->128 @16x16", 2, 64, 16, 3, 128, 2, 2, 2),
    # 3-D convolutions of torchvision's video ResNets (r3d_18, mc3_18) at 8x64x64 clips
    conv("3-D stem 3x7x7 s1,2,2 3->64 @8x64x64", 2, 3, (8, 64, 64), (3, 7, 7), 64, (1, 2, 2), (1, 3, 3)),
    conv("3-D 3x3x3 64 @8x32x32", 2, 64, (8, 32, 32), 3, 64, 1, 1),
    conv("3-D 3x3x3 s2 64->128 @8x32x32", 2, 64, (8, 32, 32), 3, 128, 2, 1),
    conv("3-D 1x1x1 s2 64->128 @8x32x32", 2, 64, (8, 32, 32), 1, 128, 2, 0),
    conv("3-D 3x3x3 128 @4x16x16", 2, 128, (4, 16, 16), 3, 128, 1, 1),
    conv("3-D 3x3x3 256 @2x8x8", 2, 256, (2, 8, 8), 3, 256, 1, 1),
    conv("3-D 3x3x3 s2 256->512 @2x8x8", 2, 256, (2, 8, 8), 3, 512, 2, 1),
    conv("3-D 3x3x3 512 @1x4x4", 2, 512, (1, 4, 4), 3, 512, 1, 1),
    conv("3-D 1x3x3 s1,2,2 64->128 @8x32x32", 2, 64, (8, 32, 32), (1, 3, 3), 128, (1, 2, 2), (0, 1, 1)),
    conv("3-D 1x3x3 128 @8x16x16", 2, 128, (8, 16, 16), (1, 3, 3), 128, 1, (0, 1, 1)),
    conv("3-D 1x3x3 512 @8x4x4", 2, 512, (8, 4, 4), (1, 3, 3), 512, 1, (0, 1, 1)),
    conv("3-D 1x1x1 s1,2,2 128->256 @8x16x16", 2, 128, (8, 16, 16), 1, 256, (1, 2, 2), 0),
]
MASKS = [(True, True, False), (False, True, False), (True, False, False), (True, True, True)]
DTYPES = ["float32", "bfloat16"]


def _verbose_impls(fn):
    """Run ``fn`` with oneDNN's verbose log on; return its result and the convolution implementations."""
    import torch

    fd = sys.stdout.fileno()
    sys.stdout.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                result = fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, fd)
            os.close(saved)
        tmp.seek(0)
        lines = tmp.read().decode(errors="replace").splitlines()
    impls = []
    for line in lines:
        parts = line.split(",")
        if ",exec," in line and len(parts) > 7 and parts[5] == "convolution":
            impls.append(f"{parts[7]}:{parts[6]}")
    return result, impls


def measure(shape: Shape, mask, dtype_name: str) -> dict:
    import torch
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from memprof.engine.overheads import onednn_conv_scratch

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    x = torch.randn(shape.n, shape.c, *shape.spatial, dtype=dtype)
    w = torch.randn(shape.co, shape.c, *shape.kernel, dtype=dtype)
    conv_nd = torch.nn.functional.conv3d if len(shape.spatial) == 3 else torch.nn.functional.conv2d
    y = conv_nd(x, w, stride=shape.stride, padding=shape.padding, dilation=shape.dilation)
    g = torch.randn_like(y)
    if shape.grad_layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last if g.dim() == 4 else torch.channels_last_3d)
    zeros = [0] * len(shape.spatial)
    args = (g, x, w, [shape.co], list(shape.stride), list(shape.padding), list(shape.dilation), False, zeros, 1)
    args += (list(mask),)

    def run():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = torch.ops.aten.convolution_backward.default(*args)
        return prof, out

    (prof, out), impls = _verbose_impls(run)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    outputs = sum(t.untyped_storage().nbytes() for t in out if t is not None)
    measured = peak - outputs
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        modelled = onednn_conv_scratch(torch.ops.aten.convolution_backward.default, fargs)
    return {
        "shape": shape.label,
        "input": list(x.shape),
        "weight": list(w.shape),
        "stride": list(shape.stride),
        "padding": list(shape.padding),
        "dilation": list(shape.dilation),
        "grad_layout": shape.grad_layout,
        "threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "mask": "".join("1" if m else "0" for m in mask),
        "weight_bytes": w.numel() * w.element_size(),
        "measured_bytes": measured,
        "modelled_bytes": modelled,
        "impls": impls,
    }


def masks(shape: Shape) -> list[tuple[bool, bool, bool]]:
    """The output masks probed; a 3-channel stem's input never needs a gradient: weight and bias only."""
    return MASKS + [(False, True, True)] if shape.c == 3 else MASKS


def child(threads: int, only: list[str]) -> list[dict]:
    import logging

    import torch

    logging.getLogger("torch.profiler").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    rows = []
    for dtype in DTYPES:
        for shape in SHAPES:
            if only and not any(o in shape.label for o in only):
                continue
            for mask in masks(shape):
                rows.append(measure(shape, mask, dtype))
    return rows


def fmt(rows: list[dict]) -> list[str]:
    lines = [
        "| shape | threads | dtype | mask | weight B | measured B | modelled B | model − measured | oneDNN impls |",
        "|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        diff = r["modelled_bytes"] - r["measured_bytes"]
        lines.append(
            f"| {r['shape']} | {r['threads']} | {r['dtype']} | {r['mask']} | {r['weight_bytes']:,} | "
            f"{r['measured_bytes']:,} | {r['modelled_bytes']:,} | {diff:+,} | {' '.join(r['impls']) or '(native)'} |"
        )
    return lines


def main(argv: list[str]) -> int:
    only = argv[argv.index("--only") + 1].split(",") if "--only" in argv else []
    if "--child" in argv:
        threads = int(argv[argv.index("--child") + 1])
        print("JSON" + json.dumps(child(threads, only)))
        return 0
    threads_list = [int(argv[argv.index("--threads") + 1])] if "--threads" in argv else [1, 2, 4]
    rows: list[dict] = []
    for threads in threads_list:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        command = [sys.executable, __file__, "--child", str(threads)] + (["--only", ",".join(only)] if only else [])
        proc = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("JSON"))
        rows += json.loads(line[4:])
    lines = fmt(rows)
    print("\n".join(lines))
    if "--threads" in argv or only:
        return 0
    import torch

    exact = sum(1 for r in rows if r["modelled_bytes"] == r["measured_bytes"])
    within = sum(1 for r in rows if abs(r["modelled_bytes"] - r["measured_bytes"]) <= 4096)
    under = [r for r in rows if r["modelled_bytes"] < r["measured_bytes"] - 4096]
    misses = [r for r in rows if r["modelled_bytes"] != r["measured_bytes"]]
    strided = [r for r in misses if r["mask"][0] == "1" and "backward_data:brgconv_strided" in " ".join(r["impls"])]
    others = sorted({f"{r['shape']} ({r['dtype']}, mask {r['mask']})" for r in misses if r not in strided})
    notes = [
        f"Not exact: {len(strided)} cases whose grad_input runs `brgconv_strided` "
        "(`brgemm_convolution_bwd_strided_t`: its per-thread scratchpad is not modelled; a 3-channel stem's "
        "input never needs a gradient in training)" + (f"; {', '.join(others)}." if others else "."),
        "",
    ]
    header = [
        "# oneDNN scratch inside one CPU convolution_backward: measured vs modelled",
        "",
        "Generated by `PYTHONPATH=. python scripts/probe_onednn_conv.py` "
        f"(torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{os.cpu_count()} cores; threads above the core count only oversubscribe, the memory is the same).",
        "",
        "measured = peak of the op's own allocations (torch.profiler memory events) − the gradients it returns;",
        "modelled = `memprof.engine.overheads.onednn_conv_scratch` (held next to the outputs by the CPU trace).",
        "mask = output_mask (grad_input, grad_weight, grad_bias).",
        "",
        f"**{len(rows)} cases: {exact} exact, {within} within 4 KiB, {len(under)} under-predicted by more.**",
        "",
        *notes,
    ]
    out = ROOT / "benchmarks"
    (out / "onednn_conv_scratch.md").write_text("\n".join(header + lines) + "\n")
    (out / "onednn_conv_scratch.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
