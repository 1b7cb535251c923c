# mmseg's Cityscapes settings (data/cityscapes: leftImg8bit/ + gtFine/*_labelTrainIds.png; 512x1024 crops of
# images resized to 2048x1024 with ratio 0.5-2.0, flip, photometric distortion; test at 2048x1024 keeping the
# ratio; for --tta the same at 0.5-1.75x that scale, each also flipped), as the original's.
_base_ = 'mmseg::_base_/datasets/cityscapes.py'

# Multi-scale + flip testing (tools/test.py --tta) as the original's aug-test: ratios of the test scale 2048x1024 (the
# same as mmseg 1.x's ratios of the image's own size for Cityscapes' 2048x1024 images, but not for other sizes).
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale=(int(2048 * r), int(1024 * r)), keep_ratio=True) for r in img_ratios],
        [dict(type='RandomFlip', prob=0., direction='horizontal'),
         dict(type='RandomFlip', prob=1., direction='horizontal')],
        [dict(type='LoadAnnotations')],
        [dict(type='PackSegInputs')],
    ]),
]
