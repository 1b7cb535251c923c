# The 1x schedule of every DSAN detection config: 12 epochs, lr x0.1 after epochs 8 and 11, linear warmup over 500
# iterations from 0.001 x lr (mmdet's schedule_1x), with AdamW lr 1e-4 and weight decay 0.05 instead of SGD.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=0.05))
