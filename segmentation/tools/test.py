"""Evaluate a DSAN segmentor checkpoint (mmengine, or an original mmseg 0.x file, loaded without conversion).

Examples:
    python segmentation/tools/test.py segmentation/configs/ham/ham_dsan_t_ade20k_160k.py ham_dsan_t_ade20k.pth
    python segmentation/tools/test.py CONFIG CHECKPOINT --tta                  # multi-scale + flip (the MS column)
    python segmentation/tools/test.py CONFIG CHECKPOINT --show-dir vis --out preds
    bash segmentation/dist_test.sh CONFIG CHECKPOINT 8
"""
from dsan.mm.tools import test

if __name__ == '__main__':
    test(task='seg')
