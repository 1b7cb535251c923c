#!/usr/bin/env bash
# bash detection/dist_train.sh CONFIG GPUS [tools/train.py arguments]
# GPUS processes per node (on a machine without CUDA: CPU processes with gloo). Multi-node: NNODES, NODE_RANK,
# MASTER_ADDR, PORT.
set -euo pipefail
if [[ $# -lt 2 ]]; then echo "usage: $0 CONFIG GPUS [train.py args]" >&2; exit 2; fi
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$DIR/../scripts/dist_run.sh" "$2" "$DIR/tools/train.py" "$1" "${@:3}"
