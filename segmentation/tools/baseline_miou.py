"""mIoU of a constant prediction (by default: everything background) on a folder of label maps.

The demo reports its mIoU next to this baseline. IoU per class is accumulated over all pixels, as mmseg's IoUMetric
does; classes absent from both the labels and the prediction are left out of the mean (NaN there), pixels equal to
`--ignore-index` are skipped. The label maps are read as mmseg reads them: with `--reduce-zero-label` (ADE20K) raw 0 is
ignored and every other value moves down by one.

Examples:
    python segmentation/tools/baseline_miou.py data/demo_seg/annotations/validation --num-classes 11
    python segmentation/tools/baseline_miou.py data/ade/ADEChallengeData2016/annotations/validation \
        --num-classes 150 --reduce-zero-label
    python segmentation/tools/baseline_miou.py data/cityscapes/gtFine/val --num-classes 19 \
        --suffix _gtFine_labelTrainIds.png
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def constant_prediction_miou(label_paths: list[Path], num_classes: int, label: int = 0,
                             ignore_index: int = 255, reduce_zero_label: bool = False) -> float:
    """mIoU (in %) of predicting `label` at every pixel of the label maps `label_paths`.

    `reduce_zero_label` maps the raw values as mmseg's LoadAnnotations does: 0 and 255 to 255, any other v to v - 1.

    Raises:
        ValueError: `label` is not a class, or the maps hold values outside the classes and `ignore_index`.
    """
    if not 0 <= label < num_classes:
        raise ValueError(f'label must be in [0, {num_classes}), got {label}')
    if not label_paths:
        raise ValueError('no label maps given')
    area_label = np.zeros(num_classes, np.int64)
    for path in label_paths:
        gt = np.asarray(Image.open(path)).astype(np.int64)
        if reduce_zero_label:  # mmseg's mapping, 255 hard-coded as there: raw 0 and 255 become 255
            gt = np.where((gt == 0) | (gt == 255), 255, gt - 1)
        valid = gt != ignore_index
        bad = np.unique(gt[valid & (gt >= num_classes)])
        if bad.size:
            raise ValueError(f'{path}: values {bad.tolist()} are not classes 0..{num_classes - 1} nor the ignore '
                             f'index {ignore_index}')
        area_label += np.bincount(gt[valid].ravel(), minlength=num_classes)
    total = area_label.sum()
    # Predicting `label` everywhere: its intersection is its own area and its union every valid pixel; every other
    # class has intersection 0 and union its own area.
    union = area_label.astype(np.float64)
    union[label] = total
    inter = np.zeros(num_classes)
    inter[label] = area_label[label]
    with np.errstate(invalid='ignore'):
        iou = inter / np.where(union > 0, union, np.nan)
    return float(np.nanmean(iou) * 100)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('ann_dir', help='folder of label maps (searched recursively for files ending in --suffix)')
    parser.add_argument('--num-classes', type=int, required=True)
    parser.add_argument('--label', type=int, default=0, help='the constant prediction (default 0, background)')
    parser.add_argument('--ignore-index', type=int, default=255)
    parser.add_argument('--reduce-zero-label', action='store_true',
                        help='raw 0 is ignored and the classes are the values minus one (ADE20K)')
    parser.add_argument('--suffix', default='.png',
                        help="end of the label maps' names (Cityscapes: _gtFine_labelTrainIds.png; default .png)")
    args = parser.parse_args(argv)
    paths = sorted(p for p in Path(args.ann_dir).rglob(f'*{args.suffix}') if p.is_file())
    if not paths:
        parser.error(f'no label maps ending in {args.suffix!r} under {args.ann_dir}')
    try:
        miou = constant_prediction_miou(paths, args.num_classes, args.label, args.ignore_index,
                                        args.reduce_zero_label)
    except ValueError as e:
        parser.error(str(e))
    print(f'constant-{args.label} prediction: mIoU {miou:.2f} over {len(paths)} label maps')
    return miou


if __name__ == '__main__':
    main()  # its return value is for callers; the exit status is 0 (errors exit through argparse or raise)
