# Mask R-CNN with DSAN-T + FPN, COCO, 1x. Paper: 24.3 M params, 188.6 GFLOPs at 800x1280, box AP 42.6, mask AP 38.9.
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
        embed_dims=[32, 64, 160, 256],
        mlp_ratios=[8, 8, 4, 4],
        kernel_sizes=[11, 11, 7, 5],
        dw_kernel_sizes=[11, 11, 7, 5],
        paddings=[5, 5, 3, 2],
        strides=[1, 1, 1, 1],
        dilations=[1, 1, 1, 1],
        groups=[1, 4, 8, 8],
        drop_rate=0.0,
        drop_path_rate=0.1,
        depths=[3, 3, 5, 2],
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint='pretrained/dsan_t_encoder.pth')),
    neck=dict(type='FPN', in_channels=[32, 64, 160, 256], out_channels=256, num_outs=5))
# 8 GPUs x 2 images
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(base_batch_size=16)
val_evaluator = dict(classwise=True)
test_evaluator = val_evaluator
# The best checkpoint by box mAP (the original's 'auto': mmdet 2.x's first metric; in 3.x with classwise=True the
# first key is one class's AP)
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=3, save_last=True, save_best='coco/bbox_mAP',
                                     rule='greater'))
