# The schedule of every DSAN segmentation config: AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01, no decay
# on the parameters named `norm` (the BatchNorms and the stage LayerNorms; the LayerNorms inside the DSCN offset
# branches, `...dw_conv.1.1`, keep it, as in the original), 10x lr on the decode head; linear warmup over 1500 iterations from 1e-6 x lr, then poly (power 1) down
# to 1e-6 at the last iteration; checkpoint and evaluation every 2000 iterations.
max_iters = 160000
interval = 2000
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    # The original's list also had 'pos_block' (from PVT), which names no DSAN parameter.
    paramwise_cfg=dict(custom_keys={
        'norm': dict(decay_mult=0.),
        'head': dict(lr_mult=10.),
    }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=1e-6, by_epoch=False, begin=1500, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=interval)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=interval, max_keep_ckpts=3,
                    save_best='mIoU', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
