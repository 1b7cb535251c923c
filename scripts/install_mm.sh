#!/usr/bin/env bash
# Installs the OpenMMLab stack of requirements-mm.txt (mmengine, mmcv with its compiled ops, mmsegmentation,
# mmdetection, pycocotools) into the virtual environment $VENV (default: the active one, $VIRTUAL_ENV, else the
# repository's .venv). Idempotent.
#
# mmcv 2.1.0 publishes no wheel for torch 2.14, and its sdist does not build against it as shipped:
#   1. its setup.py imports pkg_resources: it needs setuptools < 81 and --no-build-isolation;
#   2. it asks for C++14/C++17, while torch 2.14's headers need C++20.
# So the sdist is taken from the package index, its setup.py is patched to C++20, and it is built with its ops
# (MMCV_WITH_OPS=1; CUDA ops too when torch sees a GPU or FORCE_CUDA=1). The debug info of the compiled
# library is stripped (a 32 MB wheel becomes about 1.4 MB) and the wheel is cached, keyed by mmcv, Python,
# torch and CUDA flavour, so the first build takes 10-21 minutes on 2 cores and every later install seconds.
#
# Environment: VENV, DSAN_WHEEL_CACHE (default ~/.cache/dsan/wheels), MAX_JOBS (parallel compile jobs),
# FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST (build the CUDA ops without a visible GPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# An installation by hand (README) runs this inside the user's own activated environment.
VENV="${VENV:-${VIRTUAL_ENV:-$ROOT/.venv}}"
REQ="$ROOT/requirements-mm.txt"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[install_mm] no virtual environment at $VENV: activate yours, set VENV=/path/to/env, or run 'bash scripts/setup_env.sh' first" >&2
  exit 1
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

MMCV_VERSION="$(sed -n 's/^mmcv==\([0-9.]*\).*/\1/p' "$REQ")"
if [[ -z "$MMCV_VERSION" ]]; then
  echo "[install_mm] $REQ pins no mmcv==VERSION" >&2
  exit 1
fi

mmcv_ok() {
  python - "$MMCV_VERSION" <<'PY' 2>/dev/null
import sys
import mmcv
from mmcv.ops import nms  # noqa: F401  (loads the compiled mmcv._ext)
sys.exit(0 if mmcv.__version__ == sys.argv[1] else 1)
PY
}

if mmcv_ok; then
  echo "[install_mm] mmcv $MMCV_VERSION with compiled ops already installed"
else
  # The flavour decides the cache key: a wheel built for one torch / CUDA setting is not valid for another.
  read -r PYTAG TORCH_VER WITH_CUDA ARCHS < <(python - <<'PY'
import os, sys, torch
cuda = torch.version.cuda is not None and (torch.cuda.is_available() or os.environ.get('FORCE_CUDA') == '1')
archs = os.environ.get('TORCH_CUDA_ARCH_LIST', '')
if cuda and not archs and torch.cuda.is_available():
    archs = ';'.join(sorted({'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
print(f'cp{sys.version_info.major}{sys.version_info.minor}', torch.__version__.split('+')[0], int(cuda),
      (archs or 'default').replace(';', '_').replace(' ', '_'))
PY
)
  if [[ "$WITH_CUDA" == 1 ]]; then
    FLAVOUR="cu$(python -c 'import torch; print(torch.version.cuda)')-sm${ARCHS}"
    export FORCE_CUDA=1
    [[ "$ARCHS" != default ]] && export TORCH_CUDA_ARCH_LIST="${ARCHS//_/;}"
  else
    FLAVOUR=cpu
  fi
  CACHE="${DSAN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dsan/wheels}/mmcv-$MMCV_VERSION-$PYTAG-torch$TORCH_VER-$FLAVOUR"
  WHEEL="$(ls "$CACHE"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -1 || true)"
  if [[ -z "$WHEEL" ]]; then
    START=$(date +%s)
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    echo "[install_mm] building mmcv $MMCV_VERSION ($FLAVOUR) from its sdist: 10-21 minutes on 2 cores, once;"
    echo "[install_mm] the wheel is then cached in $CACHE"
    python -m pip download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$WORK"
    tar -xzf "$WORK/mmcv-$MMCV_VERSION.tar.gz" -C "$WORK"
    SRC="$WORK/mmcv-$MMCV_VERSION"
    # torch >= 2.10's headers use C++20 features; every -std=c++14/17 of the sdist becomes c++20.
    sed -i -E 's/c\+\+1[47]/c++20/g' "$SRC/setup.py"
    grep -q 'c++20' "$SRC/setup.py" || { echo "[install_mm] patching $SRC/setup.py to C++20 failed" >&2; exit 1; }
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" python -m pip wheel --no-build-isolation --no-deps \
      "$SRC" -w "$WORK/dist" > "$WORK/build.log" 2>&1 \
      || { tail -40 "$WORK/build.log"; echo "[install_mm] the mmcv build failed (log above)" >&2; exit 1; }
    # Strip the debug info of the compiled ops (32 MB -> ~1.4 MB) and repack, so pip's RECORD hashes match.
    python -m wheel unpack "$WORK"/dist/mmcv-*.whl -d "$WORK/unpacked" > /dev/null
    find "$WORK/unpacked" -name '_ext*.so' -exec strip --strip-debug {} +
    mkdir -p "$WORK/stripped"
    python -m wheel pack "$WORK"/unpacked/mmcv-* -d "$WORK/stripped" > /dev/null
    # Publish into the cache atomically: a build interrupted half-way never leaves a wheel to be trusted.
    mkdir -p "$CACHE"
    built="$(ls "$WORK"/stripped/*.whl)"
    cp "$built" "$CACHE/.tmp-$(basename "$built")"
    mv "$CACHE/.tmp-$(basename "$built")" "$CACHE/$(basename "$built")"
    WHEEL="$CACHE/$(basename "$built")"
    echo "[install_mm] built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1)) in $(( $(date +%s) - START ))s"
  else
    echo "[install_mm] using the cached $WHEEL"
  fi
  python -m pip install -q "mmcv @ file://$WHEEL"
fi

echo "[install_mm] installing $(basename "$REQ")"
python -m pip install -q -r "$REQ"
mmcv_ok || { echo "[install_mm] mmcv $MMCV_VERSION with compiled ops does not import" >&2; exit 1; }
python - <<'PY'
import mmcv, mmdet, mmengine, mmseg
print(f'[install_mm] mmengine {mmengine.__version__}, mmcv {mmcv.__version__} (compiled ops), '
      f'mmsegmentation {mmseg.__version__}, mmdet {mmdet.__version__}')
PY
