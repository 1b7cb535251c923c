#!/usr/bin/env bash
# The segmentation demo, from nothing but Python 3 + pip: sets up the environment and the OpenMMLab stack
# (scripts/setup_env.sh --mm; the first mmcv build takes 10-21 minutes, later runs reuse the cached wheel),
# generates the demo shapes in ADE20K layout (no download), trains DSAN-T + LightHamHead on them with
# segmentation/tools/train.py (a few minutes on a CPU), evaluates mIoU with tools/test.py, prints the mIoU of the
# all-background prediction next to it, and writes coloured overlays.
# The backbone starts from PRETRAINED, by default the newest classification demo checkpoint
# (output/demo/*/model_best.pth.tar from `bash run_demo.sh`) when there is one, else from scratch (PRETRAINED=none).
# Environment: VENV (default .venv), DATA (default data/demo_seg), ITERS (default: the config's 600), PRETRAINED.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export VENV="${VENV:-$ROOT/.venv}"
DATA="${DATA:-data/demo_seg}"
CONFIG=segmentation/configs/demo/ham_dsan_t_demo.py
WORK="work_dirs/demo_seg-$(date +%Y%m%d-%H%M%S)"
START=$(date +%s)
if [[ -n "${ITERS:-}" && ! "$ITERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "segmentation/run_demo.sh: ITERS must be a positive integer; got '$ITERS'" >&2
  exit 2
fi

echo "== 1/5 setting up the environment and the OpenMMLab stack (scripts/setup_env.sh --mm)"
bash scripts/setup_env.sh --mm
PY="$VENV/bin/python"

echo "== 2/5 generating the demo data in $DATA"
if [[ -f "$DATA/classes.txt" ]]; then
  echo "$DATA exists, reusing it"
else
  "$PY" -m dsan.data.demo --task segmentation --out "$DATA"
fi

OPTS=(train_dataloader.dataset.data_root="$DATA" val_dataloader.dataset.data_root="$DATA"
      test_dataloader.dataset.data_root="$DATA")
PRETRAINED="${PRETRAINED:-$(ls -t output/demo/*/model_best.pth.tar 2>/dev/null | head -1 || true)}"
if [[ -n "$PRETRAINED" && "$PRETRAINED" != none ]]; then
  echo "backbone initialised from $PRETRAINED"
  OPTS+=(model.backbone.init_cfg.checkpoint="$PRETRAINED")
else
  echo "backbone trained from scratch (run 'bash run_demo.sh' first for a pretrained one, or set PRETRAINED=FILE)"
fi
if [[ -n "${ITERS:-}" ]]; then
  WARMUP=$(( ITERS < 100 ? ITERS / 2 : 50 ))  # the config's 50 warmup iterations, or half of a shorter run
  OPTS+=(train_cfg.max_iters="$ITERS" train_cfg.val_interval="$ITERS" train_cfg.val_begin=$((ITERS + 1))
         default_hooks.checkpoint.interval="$ITERS" param_scheduler.0.end="$WARMUP"
         param_scheduler.1.begin="$WARMUP" param_scheduler.1.end="$ITERS")
fi
echo "== 3/5 training DSAN-T + LightHamHead ($CONFIG) -> $WORK"
"$PY" segmentation/tools/train.py "$CONFIG" --work-dir "$WORK" --cfg-options "${OPTS[@]}"
CKPT="$(ls "$WORK"/iter_*.pth | sort -V | tail -1)"

echo "== 4/5 evaluating $CKPT"
"$PY" segmentation/tools/test.py "$CONFIG" "$CKPT" --work-dir "$WORK/test" --cfg-options "${OPTS[@]}" \
  2>&1 | tee "$WORK/test.log"
MIOU=$(grep -o 'mIoU: [0-9.]*' "$WORK/test.log" | tail -1 | cut -d' ' -f2)
BASE=$("$PY" segmentation/tools/baseline_miou.py "$DATA/annotations/validation" --num-classes 11 | grep -o 'mIoU [0-9.]*' \
  | cut -d' ' -f2)

echo "== 5/5 overlays of 8 validation images -> $WORK/overlays"
mkdir -p "$WORK/val_images"
ls "$DATA/images/validation"/*.jpg | head -8 | xargs -I{} cp {} "$WORK/val_images/"
"$PY" segmentation/tools/visualize.py "$CONFIG" "$CKPT" --image-dir "$WORK/val_images" --out-dir "$WORK/overlays" \
  --palette checkpoint

echo
echo "Segmentation demo done in $(( $(date +%s) - START ))s: DSAN-T + LightHamHead mIoU ${MIOU} on the demo validation"
echo "set (11 classes) vs ${BASE} for predicting background everywhere (backbone: ${PRETRAINED:-from scratch})."
echo "Overlays: $WORK/overlays, log: $WORK"
