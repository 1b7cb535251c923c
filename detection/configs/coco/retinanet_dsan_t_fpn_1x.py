# RetinaNet with DSAN-T + FPN (stages 2-4, extra levels on the input), COCO, 1x.
# mmdet's own RetinaNet R-50-FPN with the backbone replaced. The original's detection data base trains and tests at
# 1024x800 (not mmdet's 1333x800), kept here, as its evaluation every 2 epochs.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
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
    neck=dict(in_channels=[32, 64, 160, 256]))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(1024, 800), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(1024, 800), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# 8 GPUs x 4 images
train_dataloader = dict(batch_size=4, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
auto_scale_lr = dict(base_batch_size=32)
train_cfg = dict(val_interval=2)
val_evaluator = dict(classwise=True)
test_evaluator = val_evaluator
