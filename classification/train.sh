#!/usr/bin/env bash
# The paper's ImageNet-1K recipe on 8 GPUs: its command (64 images per GPU, lr 1e-3, drop path 0.1, 16 workers);
# the rest are train.py's defaults (AdamW wd 0.05, cosine 300 + 10 cooldown epochs, 5 warmup epochs from 1e-6,
# RandAugment, mixup/cutmix, ...). No AMP, as in the paper's command (float32); append --amp for speed.
# Usage: bash classification/train.sh /path/to/imagenet [dsan_t|dsan_t2|dsan_s] [extra train.py args]
# (or MODEL=dsan_s DROP_PATH=0.2 NUM_GPUS=4 bash classification/train.sh /path/to/imagenet, as the original's)
set -euo pipefail
DATA=${1:?usage: bash train.sh /path/to/imagenet [MODEL] [args...]}
# The model argument is optional: a second argument starting with '-' is already a train.py flag.
MODEL=${MODEL:-dsan_t}
shift
if [[ $# -gt 0 && "$1" != -* ]]; then
  MODEL=$1
  shift
fi
DROP_PATH=${DROP_PATH:-0.1}
NUM_GPUS=${NUM_GPUS:-8}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$HERE/distributed_train.sh" "$NUM_GPUS" "$DATA" --model "$MODEL" -b 64 --lr 1e-3 --drop-path "$DROP_PATH" \
    --workers 16 --output output/imagenet "$@"
