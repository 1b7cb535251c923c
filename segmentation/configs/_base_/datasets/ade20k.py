# mmseg's ADE20K settings (data/ade/ADEChallengeData2016, 512x512 crops of images resized to 2048x512 with ratio
# 0.5-2.0, flip, photometric distortion; multi-scale + flip tta_pipeline), with the original's test pipeline:
# resize to 2048x512 keeping the ratio, then to a multiple of 32.
_base_ = 'mmseg::_base_/datasets/ade20k.py'
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=32),
    # annotations are loaded after the resize: the metric compares at the original size
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
