# DSAN-T + UPerHead (all four stages, no auxiliary head), ADE20K, 160k iterations.
_base_ = [
    '../_base_/models/upernet_dsan.py',
    '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/adamw_poly_160k.py',
]
norm_cfg = dict(type='SyncBN', requires_grad=True)
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        type='DSAN',
        embed_dims=[32, 64, 160, 256],
        mlp_ratios=[8, 8, 4, 4],
        kernel_sizes=[11, 11, 7, 5],
        dw_kernel_sizes=[11, 11, 7, 5],
        paddings=[5, 5, 3, 2],
        strides=[1, 1, 1, 1],
        dilations=[1, 1, 1, 1],
        groups=[1, 4, 8, 8],
        depths=[3, 3, 5, 2],
        drop_rate=0.0,
        drop_path_rate=0.1,
        norm_cfg=norm_cfg,
        init_cfg=dict(type='Pretrained', checkpoint='pretrained/dsan_t_encoder.pth')),
    decode_head=dict(
        type='UPerHead',
        in_channels=[32, 64, 160, 256],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    test_cfg=dict(mode='whole'))
# 4 images per GPU (the paper: 8 GPUs)
train_dataloader = dict(batch_size=4)
