# The detection demo (detection/run_demo.sh): Mask R-CNN DSAN-T + FPN on the generated shapes in COCO layout
# (python -m dsan.data.demo --task detection --out data/demo_det), a few minutes on a CPU. Everything not set here
# is mask_rcnn_dsan_t_fpn_1x.py. The backbone starts from a DSAN-T classification checkpoint (e.g. the classification
# demo's) given with --cfg-options model.backbone.init_cfg.checkpoint=FILE, else from scratch. The images are 128 px
# and are used at that size (instead of 1333x800). On a CPU most of Mask R-CNN's time goes to the RoI heads, so 64
# RoIs are sampled per image instead of 512.
_base_ = '../coco/mask_rcnn_dsan_t_fpn_1x.py'
data_root = 'data/demo_det/'
metainfo = dict(classes=('disk', 'ring', 'square', 'frame', 'triangle_up', 'triangle_down', 'plus', 'cross', 'star',
                         'bars'))
max_epochs = 3
model = dict(
    # checkpoint=None: from scratch; run_demo.sh passes the classification demo's checkpoint when there is one.
    backbone=dict(drop_path_rate=0.0, init_cfg=dict(type='Pretrained', checkpoint=None)),
    roi_head=dict(bbox_head=dict(num_classes=10), mask_head=dict(num_classes=10)),
    train_cfg=dict(rcnn=dict(sampler=dict(num=64))))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8, num_workers=2,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline,
                 filter_cfg=dict(filter_empty_gt=True, min_size=4)))
val_dataloader = dict(batch_size=1, num_workers=2,
                      dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json', classwise=True)
test_evaluator = val_evaluator
# A short run: a higher lr than the COCO recipe, warmup over 50 iterations, x0.1 for the last epoch.
optim_wrapper = dict(optimizer=dict(lr=4e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[max_epochs - 1], gamma=0.1),
]
# No validation during training: run_demo.sh evaluates the final checkpoint with tools/test.py.
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs, val_begin=max_epochs + 1)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_epochs, max_keep_ckpts=1, save_best=None))
