# DSAN-S + LightHamHead, ADE20K, 80k iterations.
_base_ = [
    '../_base_/models/ham_dsan.py',
    '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py',
    '../_base_/schedules/adamw_poly_80k.py',
]
norm_cfg = dict(type='SyncBN', requires_grad=True)
ham_norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        type='DSAN',
        embed_dims=[64, 128, 320, 512],
        mlp_ratios=[8, 8, 4, 4],
        kernel_sizes=[15, 13, 7, 5],
        dw_kernel_sizes=[9, 7, 5, 5],
        paddings=[7, 6, 3, 2],
        strides=[1, 1, 1, 1],
        dilations=[1, 1, 1, 1],
        groups=[4, 8, 16, 16],
        depths=[2, 2, 5, 3],
        drop_rate=0.0,
        drop_path_rate=0.1,
        norm_cfg=norm_cfg,
        init_cfg=dict(type='Pretrained', checkpoint='pretrained/dsan_s_encoder.pth')),
    decode_head=dict(
        type='LightHamHead',
        in_channels=[128, 320, 512],
        in_index=[1, 2, 3],
        channels=512,
        ham_channels=512,
        ham_kwargs=dict(MD_R=16),
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=ham_norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    test_cfg=dict(mode='whole'))
# 4 images per GPU (the paper: 8 GPUs)
train_dataloader = dict(batch_size=4)
