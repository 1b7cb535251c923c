#!/usr/bin/env bash
# Evaluate a released (or own) checkpoint on ImageNet-1K val: top-1 / top-5 and per-image results.
# Usage: bash classification/eval.sh /path/to/imagenet /path/to/dsan_t.pth.tar [dsan_t|dsan_t2|dsan_s] [args...]
set -euo pipefail
DATA=${1:?usage: bash eval.sh /path/to/imagenet CHECKPOINT [MODEL] [args...]}
CHECKPOINT=${2:?usage: bash eval.sh /path/to/imagenet CHECKPOINT [MODEL] [args...]}
# The model argument is optional: a third argument starting with '-' is already a validate.py flag.
MODEL=dsan_t
shift 2
if [[ $# -gt 0 && "$1" != -* ]]; then
  MODEL=$1
  shift
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
${PYTHON:-python} "$HERE/validate.py" "$DATA" --model "$MODEL" --checkpoint "$CHECKPOINT" -b 64 \
    --per-image-csv "output/eval/${MODEL}_per_image.csv" --results-file "output/eval/${MODEL}.json" "$@"
