# Mask R-CNN with DSAN-S + FPN, COCO, 1x. Paper: 39.5 M params, 235.4 GFLOPs at 800x1280, box AP 46.1, mask AP 41.5.
# mmdet's own Mask R-CNN R-50-FPN with the backbone replaced.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    '../_base_/schedule_adamw_1x.py',
    '../_base_/default_runtime.py',
]
model = dict(
    backbone=dict(
        _delete_=True,
        type='DSAN',
        embed_dims=[64, 128, 320, 512],
        mlp_ratios=[8, 8, 4, 4],
        kernel_sizes=[15, 13, 7, 5],
        dw_kernel_sizes=[9, 7, 5, 5],
        paddings=[7, 6, 3, 2],
        strides=[1, 1, 1, 1],
        dilations=[1, 1, 1, 1],
        groups=[4, 8, 16, 16],
        drop_rate=0.0,
        drop_path_rate=0.1,
        depths=[2, 2, 5, 3],
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint='pretrained/dsan_s_encoder.pth')),
    neck=dict(type='FPN', in_channels=[64, 128, 320, 512], out_channels=256, num_outs=5))
# 4 GPUs x 4 images
train_dataloader = dict(batch_size=4)
auto_scale_lr = dict(base_batch_size=16)
val_evaluator = dict(classwise=True)
test_evaluator = val_evaluator
# The best checkpoint by box mAP (the original's 'auto': mmdet 2.x's first metric; in 3.x with classwise=True the
# first key is one class's AP)
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=3, save_last=True, save_best='coco/bbox_mAP',
                                     rule='greater'))
