#!/usr/bin/env bash
# The GPU checks of one lent session, in one command (see docs/cuda.md): the real CUDA steps
# against the traced predictions, pytest's CUDA tests, find-batch on CUDA, step time.
# Runs from the repository root without installing memprof; results go under $OUT/r
# (default /tmp/memprof-gpu) and into $OUT/gpu_results.tgz.
#   OUT=/tmp/x bash scripts/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/memprof-gpu}
R=$OUT/r
mkdir -p "$R"
export PYTHONPATH=. PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PYTHON:-python3}
SHARDS=${SHARDS:-4}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$R/timeline.txt"; }
{ nvidia-smi; $PY -c "import torch, torchvision, sys; print(sys.version); print(torch.__version__, torchvision.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.get_device_name(), torch.cuda.get_device_capability())"; } > "$R/env.txt" 2>&1
stamp "env done"
# 1. memory matrix (sharded: each process measures its own caching allocator) + pytest -m gpu
for ((i = 0; i < SHARDS; i++)); do
  timeout "${T_MATRIX:-230}" $PY scripts/validate_gpu.py --quick --shard "$i/$SHARDS" --out "$R/matrix$i" > "$R/matrix$i.log" 2>&1 &
done
timeout "${T_MATRIX:-230}" $PY -m pytest -m gpu -q -p no:cacheprovider > "$R/pytest_gpu.log" 2>&1 &
if [ -n "${DIAG:-}" ]; then  # C++ stacks of the allocations the trace misses (names: substrings of cases)
  DIAG_STACKS=all timeout "${T_MATRIX:-230}" $PY scripts/diagnose_gpu.py --out "$R/diag" $DIAG > "$R/diag.log" 2>&1 &
fi
wait
stamp "matrix + pytest done"
# 2. find-batch on CUDA, alone on the GPU (it fills it)
timeout "${T_FB:-75}" $PY -m memprof find-batch resnet50 --dtype amp-bf16 --optimizer adam --json > "$R/fb_resnet50.json" 2> "$R/fb_resnet50.err"
stamp "find-batch resnet50 rc=$?"
timeout "${T_FB:-75}" $PY -m memprof find-batch configs/gpt2-small.toml --json > "$R/fb_gpt2.json" 2> "$R/fb_gpt2.err"
stamp "find-batch gpt2-small rc=$?"
# GradScaler (amp-fp16): its first steps are skipped while the scaled gradients overflow
timeout "${T_FB:-75}" $PY -m memprof find-batch resnet50 --dtype amp-fp16 --optimizer adam --json > "$R/fb_resnet50_fp16.json" 2> "$R/fb_resnet50_fp16.err"
stamp "find-batch resnet50 amp-fp16 rc=$?"
# 3. step time (and the same steps' memory), alone on the GPU (T_STEP=0 skips it)
if [ "${T_STEP:-110}" != 0 ]; then
  timeout "${T_STEP:-110}" $PY scripts/validate_gpu.py --step-time --out "$R/steptime" > "$R/steptime.log" 2>&1
  stamp "step time rc=$?"
fi
tar czf "$OUT/gpu_results.tgz" -C "$OUT" r
cp "$R/timeline.txt" "$OUT/timeline.txt"
