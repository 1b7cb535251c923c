#!/usr/bin/env bash
# The detection demo, from nothing but Python 3 + pip: sets up the environment and the OpenMMLab stack
# (scripts/setup_env.sh --mm; the first mmcv build takes 10-21 minutes, later runs reuse the cached wheel),
# generates the demo shapes in COCO layout (no download), trains Mask R-CNN DSAN-T + FPN on them with
# detection/tools/train.py (CPU is fine), evaluates box and mask AP with tools/test.py (pycocotools), and draws the
# detections of a few validation images.
# The backbone starts from PRETRAINED, by default the newest classification demo checkpoint
# (output/demo/*/model_best.pth.tar from `bash run_demo.sh`) when there is one, else from scratch (PRETRAINED=none).
# Environment: VENV (default .venv), DATA (default data/demo_det), EPOCHS (default: the config's 3), PRETRAINED.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export VENV="${VENV:-$ROOT/.venv}"
DATA="${DATA:-data/demo_det}"
CONFIG=detection/configs/demo/mask_rcnn_dsan_t_demo.py
WORK="work_dirs/demo_det-$(date +%Y%m%d-%H%M%S)"
START=$(date +%s)
if [[ -n "${EPOCHS:-}" && ! "$EPOCHS" =~ ^[1-9][0-9]*$ ]]; then
  echo "detection/run_demo.sh: EPOCHS must be a positive integer; got '$EPOCHS'" >&2
  exit 2
fi

echo "== 1/5 setting up the environment and the OpenMMLab stack (scripts/setup_env.sh --mm)"
bash scripts/setup_env.sh --mm
PY="$VENV/bin/python"

echo "== 2/5 generating the demo data in $DATA"
if [[ -f "$DATA/annotations/instances_val2017.json" ]]; then
  echo "$DATA exists, reusing it"
else
  "$PY" -m dsan.data.demo --task detection --out "$DATA" --num-train 240 --num-val 100
fi

PRETRAINED="${PRETRAINED:-$(ls -t output/demo/*/model_best.pth.tar 2>/dev/null | head -1 || true)}"
OPTS=(train_dataloader.dataset.data_root="$DATA/" val_dataloader.dataset.data_root="$DATA/"
      test_dataloader.dataset.data_root="$DATA/" val_evaluator.ann_file="$DATA/annotations/instances_val2017.json"
      test_evaluator.ann_file="$DATA/annotations/instances_val2017.json")
if [[ -n "$PRETRAINED" && "$PRETRAINED" != none ]]; then
  echo "backbone initialised from $PRETRAINED"
  OPTS+=(model.backbone.init_cfg.checkpoint="$PRETRAINED")
else
  echo "backbone trained from scratch (run 'bash run_demo.sh' first for a pretrained one, or set PRETRAINED=FILE)"
fi
if [[ -n "${EPOCHS:-}" ]]; then
  OPTS+=(train_cfg.max_epochs="$EPOCHS" train_cfg.val_interval="$EPOCHS" train_cfg.val_begin=$((EPOCHS + 1))
         default_hooks.checkpoint.interval="$EPOCHS" param_scheduler.1.end="$EPOCHS"
         "param_scheduler.1.milestones=[$((EPOCHS - 1))]")
fi
echo "== 3/5 training Mask R-CNN DSAN-T ($CONFIG) -> $WORK"
"$PY" detection/tools/train.py "$CONFIG" --work-dir "$WORK" --cfg-options "${OPTS[@]}"
CKPT="$(ls "$WORK"/epoch_*.pth | sort -V | tail -1)"

echo "== 4/5 evaluating $CKPT (COCO box and mask AP)"
"$PY" detection/tools/test.py "$CONFIG" "$CKPT" --work-dir "$WORK/test" --cfg-options "${OPTS[@]}" \
  2>&1 | tee "$WORK/test.log"
BOX=$(grep -o 'coco/bbox_mAP: [0-9.]*' "$WORK/test.log" | tail -1 | cut -d' ' -f2)
MASK=$(grep -o 'coco/segm_mAP: [0-9.]*' "$WORK/test.log" | tail -1 | cut -d' ' -f2)

echo "== 5/5 drawings of 8 validation images -> $WORK/vis"
mkdir -p "$WORK/val_images"
ls "$DATA/val2017"/*.jpg | head -8 | xargs -I{} cp {} "$WORK/val_images/"
"$PY" detection/tools/visualize.py "$CONFIG" "$CKPT" --image-dir "$WORK/val_images" --out-dir "$WORK/vis" \
  --score-thr 0.3

echo
echo "Detection demo done in $(( $(date +%s) - START ))s: Mask R-CNN DSAN-T on the demo validation set (10 classes):"
echo "box AP ${BOX}, mask AP ${MASK}. Drawings: $WORK/vis, log: $WORK"
