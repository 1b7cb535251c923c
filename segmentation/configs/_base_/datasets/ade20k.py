# mmseg's ADE20K settings (data/ade/ADEChallengeData2016, 512x512 crops of images resized to 2048x512 with ratio
# 0.5-2.0, flip, photometric distortion), with the original's test pipelines: resize to 2048x512 keeping the ratio,
# then to a multiple of 32; and for --tta the same at 0.5-1.75x that scale, each also flipped.
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

# Multi-scale + flip testing (tools/test.py --tta: the table's "MS" mIoU) as the original's aug-test: the scales are
# ratios of the test scale 2048x512, not of each image's own size (mmseg 1.x's default tta_pipeline), so an image is
# tested around the size it is tested at without --tta.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale=(int(2048 * r), int(512 * r)), keep_ratio=True) for r in img_ratios],
        [dict(type='ResizeToMultiple', size_divisor=32)],
        [dict(type='RandomFlip', prob=0., direction='horizontal'),
         dict(type='RandomFlip', prob=1., direction='horizontal')],
        [dict(type='LoadAnnotations', reduce_zero_label=True)],
        [dict(type='PackSegInputs')],
    ]),
]
