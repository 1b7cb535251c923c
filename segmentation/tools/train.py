"""Train a DSAN segmentor with mmsegmentation (mmengine's stock Runner.from_cfg).

Examples:
    python segmentation/tools/train.py segmentation/configs/ham/ham_dsan_t_ade20k_160k.py
    python segmentation/tools/train.py CONFIG --work-dir work_dirs/run1 --resume            # latest checkpoint
    python segmentation/tools/train.py CONFIG --data-root /data/ade/ADEChallengeData2016   # train, val and test sets
    bash segmentation/dist_train.sh CONFIG 8                                                 # 8 GPUs
"""
from dsan.mm.tools import train

if __name__ == '__main__':
    train(task='seg')
