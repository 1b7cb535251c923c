#!/usr/bin/env bash
# The README's first command. From nothing but Python 3 + pip: sets everything up (virtual environment,
# requirements, builds ops_dscn, installs dsan), generates the demo data (no download), trains DSAN-T on the
# demo data on this machine (CPU is fine: a few minutes), evaluates it printing top-1, and prints the
# params/FLOPs table next to the paper's.
# Environment: VENV (default .venv), DATA (default data/demo_cls), EPOCHS (default: configs/demo.yaml's).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
export VENV="${VENV:-$ROOT/.venv}"
DATA="${DATA:-data/demo_cls}"
START=$(date +%s)

echo "== 1/5 setting up the environment (scripts/setup_env.sh)"
bash scripts/setup_env.sh
PY="$VENV/bin/python"

echo "== 2/5 generating the demo data in $DATA"
if [[ -f "$DATA/classes.txt" ]]; then
  echo "$DATA exists, reusing it"
else
  "$PY" -m dsan.data.demo --out "$DATA"
fi

RUN="dsan_t-$(date +%Y%m%d-%H%M%S)"
echo "== 3/5 training DSAN-T on $DATA (classification/configs/demo.yaml) -> output/demo/$RUN"
"$PY" classification/train.py "$DATA" -c classification/configs/demo.yaml --experiment "$RUN" \
  ${EPOCHS:+--epochs "$EPOCHS"} --no-progress

echo "== 4/5 evaluating output/demo/$RUN/model_best.pth.tar"
"$PY" classification/validate.py "$DATA" --model dsan_t --checkpoint "output/demo/$RUN/model_best.pth.tar" \
  --img-size 64 --crop-pct 1.0 -b 128 -j 2 --no-progress \
  --per-image-csv "output/demo/$RUN/val_per_image.csv" --results-file "output/demo/$RUN/val_results.json" \
  | tee "output/demo/$RUN/val.txt"

echo "== 5/5 params / FLOPs at 224 next to the paper"
"$PY" classification/tools/get_flops.py --paper-table

TOP1=$(grep -o 'top1 [0-9.]*' "output/demo/$RUN/val.txt" | head -1 | cut -d' ' -f2)
echo
echo "Demo done in $(( $(date +%s) - START ))s: DSAN-T top-1 on the demo validation set = ${TOP1}% (10 classes,"
echo "chance 10%). Curves: output/demo/$RUN/training_curves.png, log: output/demo/$RUN/log.txt"
