# mmseg's Cityscapes settings (data/cityscapes: leftImg8bit/ + gtFine/*_labelTrainIds.png; 512x1024 crops of
# images resized to 2048x1024 with ratio 0.5-2.0, flip, photometric distortion; test at 2048x1024 keeping the
# ratio; multi-scale + flip tta_pipeline), as the original's.
_base_ = 'mmseg::_base_/datasets/cityscapes.py'
