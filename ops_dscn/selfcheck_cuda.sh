#!/usr/bin/env bash
# CUDA self-check of the DSCN operator, one command on any GPU machine (run from anywhere):
#
#     bash ops_dscn/selfcheck_cuda.sh            # uses the active Python environment (torch installed)
#
# 1. builds and installs ops_dscn with its CUDA kernel (FORCE_CUDA=1, for the visible GPU's architecture unless
#    TORCH_CUDA_ARCH_LIST is set), unless SKIP_BUILD=1 and the installed one already has a CUDA kernel;
# 2. runs every CUDA test of the op (float64/float32/float16/bfloat16 forward and backward against the float64
#    reference, x and y gradcheck, stride, dilation, offset_scale != 1, remove_center, non-contiguous inputs, a second
#    GPU when present, determinism alert, autocast), with DSCN_REQUIRE_CUDA=1 so that none can pass by skipping;
#    then the model's CUDA tests (dsan_t on the GPU against the CPU in float64, outputs and every gradient; an
#    autocast AdamW step in float16 and bfloat16; inductor against eager);
# 3. runs the CUDA benchmark (DSCN against the depthwise convolution of the same shape, DSAN-T and DSAN-S stages).
# Exits non-zero on the first failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"

"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"selfcheck_cuda: no usable GPU (torch {torch.__version__}, CUDA {torch.version.cuda})")
for i in range(torch.cuda.device_count()):
    print(f"[selfcheck] GPU {i}: {torch.cuda.get_device_name(i)}, capability {torch.cuda.get_device_capability(i)}")
PY

has_cuda_kernel() {
  (cd / && "$PY" -c "import ops_dscn, sys; sys.exit(0 if 'cuda' in ops_dscn.compiled_device_types() else 1)") 2>/dev/null
}
if [[ "${SKIP_BUILD:-0}" == "1" ]] && has_cuda_kernel; then
  echo "[selfcheck] SKIP_BUILD=1: using the installed ops_dscn"
else
  echo "[selfcheck] building ops_dscn with its CUDA kernel"
  FORCE_CUDA=1 "$PY" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$ROOT/ops_dscn"
fi
has_cuda_kernel || { echo "[selfcheck] the installed ops_dscn has no CUDA kernel" >&2; exit 1; }

echo "[selfcheck] CUDA tests"
cd "$ROOT"
DSCN_REQUIRE_CUDA=1 "$PY" -m pytest ops_dscn/tests/test_dscn.py -k cuda -p no:cacheprovider -q -rs
echo "[selfcheck] model CUDA tests"
"$PY" -m pytest tests/test_models.py -k cuda -p no:cacheprovider -q -rs

echo "[selfcheck] CUDA benchmark"
"$PY" ops_dscn/benchmark.py --device cuda "$@"
echo "[selfcheck] passed"
