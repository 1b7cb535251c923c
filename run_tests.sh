#!/usr/bin/env bash
# Sets everything up (virtual environment, requirements, ops_dscn build, dsan) and runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash run_tests.sh -k dscn -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup_env.sh --test
# shellcheck disable=SC1091
source "${VENV:-.venv}/bin/activate"
# The compiled op is built above: tests that need it must run, not skip (tests/conftest.py, ops_dscn/tests).
export DSAN_REQUIRE_CPP=1
python -m pytest "$@"
