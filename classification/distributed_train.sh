#!/usr/bin/env bash
# Distributed training with torchrun: bash distributed_train.sh NUM_PROC [train.py args...]
# NCCL on GPUs, gloo on CPU (chosen by train.py). Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on
# every node, e.g. NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash distributed_train.sh 8 /data/imagenet ...
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 NUM_PROC [train.py args...]   (NUM_PROC: processes per node)" >&2
    exit 2
fi
NUM_PROC=$1
if ! [[ "$NUM_PROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "NUM_PROC (processes per node, the first argument) must be a positive integer, got '$NUM_PROC'" >&2
    exit 2
fi
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PYTHON=${PYTHON:-python}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "$NNODES" = 1 ] && [ -z "${PORT:-}" ]; then
    # single node and no PORT given: torchrun picks a free port, so concurrent runs do not collide
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NUM_PROC" "$HERE/train.py" "$@"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --master_port="${PORT:-29501}" --nproc_per_node="$NUM_PROC" "$HERE/train.py" "$@"
