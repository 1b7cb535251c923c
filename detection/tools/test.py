"""Evaluate a DSAN detector checkpoint (mmengine, or an original mmdet 2.x file, loaded without conversion).

Examples:
    python detection/tools/test.py detection/configs/coco/mask_rcnn_dsan_t_fpn_1x.py mask_rcnn_dsan_t.pth
    python detection/tools/test.py CONFIG CHECKPOINT --show-dir vis --out results.pkl
    python detection/tools/test.py CONFIG CHECKPOINT --data-root /data/coco   # images and annotations there
    bash detection/dist_test.sh CONFIG CHECKPOINT 8
"""
from dsan.mm.tools import test

if __name__ == '__main__':
    test(task='det')
