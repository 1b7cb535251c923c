# adamw_poly_160k.py over 80k iterations.
_base_ = './adamw_poly_160k.py'
max_iters = 80000
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=1e-6, by_epoch=False, begin=1500, end=max_iters),
]
train_cfg = dict(max_iters=max_iters)
