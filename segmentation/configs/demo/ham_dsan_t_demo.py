# The segmentation demo (segmentation/run_demo.sh): DSAN-T + LightHamHead on the generated shapes in ADE20K layout
# (python -m dsan.data.demo --task segmentation --out data/demo_seg), in a few minutes on a CPU. The backbone starts
# from a DSAN-T classification checkpoint (as the paper's from ImageNet; the demo from the classification demo's)
# given with --cfg-options model.backbone.init_cfg.checkpoint=FILE, else from scratch. The background is a class here
# (11 classes), so the all-background prediction is the baseline to beat. Everything else is ham_dsan_t_ade20k_160k.py.
_base_ = '../ham/ham_dsan_t_ade20k_160k.py'
data_root = 'data/demo_seg'
crop_size = (128, 128)
max_iters = 600
metainfo = dict(
    classes=('background', 'disk', 'ring', 'square', 'frame', 'triangle_up', 'triangle_down', 'plus', 'cross',
             'star', 'bars'),
    palette=[[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
             [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]])
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(drop_path_rate=0.0, init_cfg=dict(type='Pretrained', checkpoint=None)),
    decode_head=dict(num_classes=11))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
# --tta: the same ratios of the test scale as the paper configs (ade20k.py), each also flipped; background is a class.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale=(int(crop_size[0] * r), int(crop_size[1] * r)), keep_ratio=True)
         for r in img_ratios],
        [dict(type='RandomFlip', prob=0., direction='horizontal'),
         dict(type='RandomFlip', prob=1., direction='horizontal')],
        [dict(type='LoadAnnotations', reduce_zero_label=False)],
        [dict(type='PackSegInputs')],
    ]),
]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
               seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(
    batch_size=8, num_workers=2,
    dataset=dict(_delete_=True, **dataset, pipeline=train_pipeline,
                 data_prefix=dict(img_path='images/training', seg_map_path='annotations/training')))
val_dataloader = dict(
    batch_size=1, num_workers=2,
    dataset=dict(_delete_=True, **dataset, pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation')))
test_dataloader = val_dataloader
# A short run: a higher lr than the 160k recipe, a short warmup and poly decay over the run.
optim_wrapper = dict(optimizer=dict(lr=6e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', power=1.0, eta_min=1e-6, by_epoch=False, begin=50, end=max_iters),
]
# No validation during training: run_demo.sh evaluates the final checkpoint with tools/test.py.
train_cfg = dict(max_iters=max_iters, val_interval=max_iters, val_begin=max_iters + 1)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1, save_best=None))
