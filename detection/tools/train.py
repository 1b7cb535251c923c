"""Train a DSAN detector with mmdetection (mmengine's stock Runner.from_cfg).

Examples:
    python detection/tools/train.py detection/configs/coco/mask_rcnn_dsan_t_fpn_1x.py
    python detection/tools/train.py CONFIG --work-dir work_dirs/run1 --resume             # latest checkpoint
    python detection/tools/train.py CONFIG --data-root /data/coco      # datasets and evaluators' annotation files
    bash detection/dist_train.sh CONFIG 8                                                  # 8 GPUs
"""
from dsan.mm.tools import train

if __name__ == '__main__':
    train(task='det')
