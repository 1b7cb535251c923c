#!/usr/bin/env bash
# Everything a GPU machine should report, in one command and one output folder (each step's log in its own file):
#   1. bash ops_dscn/selfcheck_cuda.sh: builds ops_dscn with its CUDA kernel, runs the op's and the model's CUDA tests
#      and the op's float32 benchmark at batch 1, 32 and 128 (DSCN against cuDNN's depthwise conv of the same shape);
#   2. the op's float16 benchmark at batch 32 and 128;
#   3. the model table: DSAN-T against efficientformer_l1 and resnet18 at batch 128 with AMP (float16), eager,
#      channels_last and fused in interleaved rounds, then compile on its own (inductor's compilation is long);
#   4. a torch.profiler table of DSAN-T's forward by GPU time (where its time goes).
# Usage: bash scripts/gpu_report.sh [OUT_DIR]  (default gpu_report/); PYTHON picks the interpreter (default python).
# Stops at the first failing step; SKIP_BUILD=1 reuses an installed CUDA build (see selfcheck_cuda.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-gpu_report}" && cd "${1:-gpu_report}" && pwd)"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
cd "$ROOT"
step() { echo "[gpu_report] $1 -> $OUT/$2"; }
SPEED=(classification/tools/get_inf_speed.py dsan_t efficientformer_l1 resnet18 -b 128 --amp --device cuda --iters 30)

step "selfcheck (build, CUDA tests, float32 op benchmark)" selfcheck.log
PYTHON="$PY" bash ops_dscn/selfcheck_cuda.sh --batch 1 32 128 --rounds 3 --no-pytorch 2>&1 | tee "$OUT/selfcheck.log"
step "float16 op benchmark" op_fp16.log
"$PY" ops_dscn/benchmark.py --device cuda --dtype float16 --batch 32 128 --rounds 3 --no-pytorch 2>&1 \
  | tee "$OUT/op_fp16.log"
step "model table, eager modes" models_eager.log
"$PY" "${SPEED[@]}" --modes eager channels_last fused --rounds 3 --out "$OUT/models_eager.json" 2>&1 \
  | tee "$OUT/models_eager.log"
step "model table, compiled" models_compile.log
"$PY" "${SPEED[@]}" --modes channels_last compile --rounds 1 --out "$OUT/models_compile.json" 2>&1 \
  | tee "$OUT/models_compile.log"
step "DSAN-T profile by GPU time" profile.log
"$PY" classification/tools/get_inf_speed.py dsan_t -b 128 --amp --device cuda --modes channels_last --iters 10 \
  --profile 30 2>&1 | tee "$OUT/profile.log"
echo "[gpu_report] done: $OUT"
