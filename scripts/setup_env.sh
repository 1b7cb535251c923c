#!/usr/bin/env bash
# Sets up a working environment from nothing but Python 3.10+ and pip:
#   - a virtual environment (.venv, or $VENV) if there is none,
#   - the pinned requirements (requirements.txt; with --test also requirements-test.txt),
#   - the ops_dscn extension (C++ CPU kernel; CUDA too when a GPU is visible or FORCE_CUDA=1),
#   - the dsan package itself (editable),
#   - with --mm (implied by --test): the OpenMMLab stack for segmentation/ and detection/ (scripts/install_mm.sh:
#     mmcv is built from source the first time, 10-21 minutes on 2 cores, then installed from a cached wheel).
# Usage: bash scripts/setup_env.sh [--test] [--mm]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
REQ="$ROOT/requirements.txt"
MM=0
for arg in "$@"; do
  case "$arg" in
    --test) REQ="$ROOT/requirements-test.txt"; MM=1 ;;
    --mm) MM=1 ;;
    *) echo "usage: $0 [--test] [--mm]" >&2; exit 2 ;;
  esac
done

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
echo "[setup] installing $(basename "$REQ")"
python -m pip install -q -r "$REQ"
echo "[setup] building ops_dscn"
python -m pip install -q --no-build-isolation "$ROOT/ops_dscn"
python -m pip install -q --no-build-isolation -e "$ROOT"
python - <<'PY'
import ops_dscn
print(f"[setup] ops_dscn {ops_dscn.__version__}: backends {ops_dscn.available_backends()}")
if not ops_dscn.extension_available():
    raise SystemExit(f"[setup] the compiled DSCN operator did not load: {ops_dscn.extension_error()}")
PY
if [[ "$MM" == 1 ]]; then
  bash "$ROOT/scripts/install_mm.sh"
fi
