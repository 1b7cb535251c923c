#!/usr/bin/env bash
# Builds ops_dscn with AddressSanitizer in a scratch copy and runs the operator's tests and the model's kernel tests
# against that build: any read or write of the CPU kernels outside their tensors stops the run with ASan's report.
# A developer check (not part of CI: the instrumented build alone takes 10-25 minutes on two cores).
#
#   bash scripts/asan_check.sh [SCRATCH_DIR] [extra pytest arguments]
#
# Needs g++ with libasan (Debian: part of g++). Uses $PYTHON (default: the `python` on PATH), which must have torch
# and the test requirements; the installed ops_dscn is not touched.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/ops_dscn"
SCRATCH="${1:-$(mktemp -d -t ops_dscn_asan.XXXXXX)}"
shift || true
PY="${PYTHON:-python}"
CXX_BIN="${CXX:-g++}"
ASAN_LIB="$("$CXX_BIN" -print-file-name=libasan.so)"
STDCXX_LIB="$("$CXX_BIN" -print-file-name=libstdc++.so.6)"
if [[ "$ASAN_LIB" != /* || ! -e "$ASAN_LIB" ]]; then
    echo "asan_check: $CXX_BIN has no AddressSanitizer runtime (libasan.so not found)" >&2
    exit 2
fi

echo "asan_check: building an instrumented copy in $SCRATCH"
rm -rf "$SCRATCH/ops_dscn"
mkdir -p "$SCRATCH"
cp -r "$HERE" "$SCRATCH/ops_dscn"
rm -rf "$SCRATCH/ops_dscn/build" "$SCRATCH"/ops_dscn/ops_dscn/_C*.so
# The copy's tests test the copy (the module normally steps aside for an installed ops_dscn).
printf '"""asan_check: test this folder in place."""\n' > "$SCRATCH/ops_dscn/tests/_use_installed.py"
(cd "$SCRATCH/ops_dscn" && CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g" LDFLAGS="-fsanitize=address" \
    "$PY" setup.py build_ext --inplace > "$SCRATCH/build.log" 2>&1) \
    || { tail -n 30 "$SCRATCH/build.log"; exit 1; }

# The ASan runtime must be loaded first; libstdc++ too, or ASan cannot intercept C++ exceptions thrown by libraries
# that torch loads later (triton). Leak checks are off: Python and torch keep allocations until exit.
export LD_PRELOAD="$ASAN_LIB $STDCXX_LIB"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=66:log_path=$SCRATCH/asan"
export DSAN_REQUIRE_CPP=1
status=0
echo "asan_check: operator tests (every SIMD build, via their subprocesses)"
(cd "$SCRATCH/ops_dscn" && "$PY" -m pytest -q tests -m "not slow" -p no:cacheprovider \
    --ignore=tests/test_cuda_emulated.py --ignore=tests/test_packaging.py "$@") || status=$?
if [[ $status -eq 0 ]]; then
    echo "asan_check: model tests that run the kernels"
    (cd "$ROOT" && PYTHONPATH="$SCRATCH/ops_dscn" "$PY" -m pytest -q tests/test_fusion.py tests/test_models.py \
        tests/test_compile.py -m "not slow" -p no:cacheprovider "$@") || status=$?
fi
if compgen -G "$SCRATCH/asan.*" > /dev/null; then
    echo "asan_check: AddressSanitizer reported:" >&2
    head -n 60 "$SCRATCH"/asan.* >&2
    exit 66
fi
[[ $status -eq 0 ]] && echo "asan_check: passed (no ASan report)"
exit $status
