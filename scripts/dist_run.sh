#!/usr/bin/env bash
# Launches NPROC processes of an mm tool with torchrun: NCCL on GPUs, gloo on CPU (the tools pick the backend).
# Usage: bash scripts/dist_run.sh NPROC TOOL.py [tool arguments]   (the tasks' dist_train.sh / dist_test.sh)
# Multi-node: NNODES (default 1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (29500).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC TOOL.py [args]" >&2
  exit 2
fi
NPROC=$1
TOOL=$2
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "GPUS (processes per node) must be a positive integer, got '$NPROC'" >&2
  exit 2
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$PORT" \
  --nproc_per_node="$NPROC" \
  "$TOOL" "${@:3}" --launcher pytorch
