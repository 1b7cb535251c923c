#!/usr/bin/env bash
# bash detection/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py arguments]
# GPUS processes per node (on a machine without CUDA: CPU processes with gloo). Multi-node: NNODES, NODE_RANK,
# MASTER_ADDR, PORT.
set -euo pipefail
if [[ $# -lt 3 ]]; then echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py args]" >&2; exit 2; fi
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$DIR/../scripts/dist_run.sh" "$3" "$DIR/tools/test.py" "$1" "$2" "${@:4}"
