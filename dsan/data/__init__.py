"""Data helpers.

:mod:`dsan.data.demo` generates the procedural demo datasets (classification in ImageNet folder layout,
segmentation in ADE20K layout, detection in COCO layout); run it as ``python -m dsan.data.demo --help``.
"""
