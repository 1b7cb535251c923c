"""Boxes, class names, scores and instance masks of a detector's predictions for a folder of images.

The original's `det_box_ins_mask_visual.py`: a config and checkpoint go in with an image folder; for each image
`OUT_DIR/NAME_TAG.png` comes out with the detections above `--score-thr` drawn by mmdet's DetLocalVisualizer in the
COCO palette (or 'random'; 'voc' and 'citys' hold 20 and 8 colours, for models of as many classes at most). Images
sharing a name stem keep their suffix in the output name.

Examples:
    python detection/tools/visualize.py detection/configs/coco/mask_rcnn_dsan_t_fpn_1x.py mask_rcnn_dsan_t.pth \
        --image-dir demo_images --out-dir det_mask --score-thr 0.3
"""
import argparse
import logging
import os
import warnings
from pathlib import Path

from tqdm import tqdm

from dsan.cli import device_type

_logger = logging.getLogger('visualize')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='detection config file')
    parser.add_argument('checkpoint', help='detector checkpoint (mmengine or original mmdet 2.x)')
    parser.add_argument('--image-dir', '--image_dir', default='images', help='folder of input images')
    parser.add_argument('--out-dir', '--out_dir', default='det_mask', help='folder for the drawings')
    parser.add_argument('--tag', default=None, help='suffix of the output names (default: the config name)')
    parser.add_argument('--palette', default='coco', choices=['coco', 'voc', 'citys', 'random'],
                        help='colours of boxes and masks')
    parser.add_argument('--score-thr', '--score_thr', type=float, default=0.3,
                        help='draw detections scoring at least this')
    parser.add_argument('--device', type=device_type, default='cpu', help="'cpu' or 'cuda:0'")
    args = parser.parse_args(argv)
    if not 0.0 <= args.score_thr <= 1.0:
        parser.error(f'--score-thr must be in [0, 1], got {args.score_thr}')
    return args


def lower_score_thr(model_cfg, score_thr: float) -> None:
    """Let the detector keep detections down to `score_thr`: the configs' test_cfg drops those under 0.05 before
    the drawing threshold applies, so a lower --score-thr drew nothing more (Mask R-CNN: ``test_cfg.rcnn``,
    RetinaNet: ``test_cfg``)."""
    test_cfg = model_cfg.get('test_cfg') or {}
    for stage in (test_cfg, test_cfg.get('rcnn')):
        if stage and stage.get('score_thr') is not None and stage['score_thr'] > score_thr:
            stage['score_thr'] = score_thr


def head_num_classes(model) -> int | None:
    """The classes the detector's box head predicts (Mask R-CNN: ``roi_head.bbox_head``; RetinaNet: ``bbox_head``)."""
    roi_head = getattr(model, 'roi_head', None)
    for head in (getattr(roi_head, 'bbox_head', None), getattr(model, 'bbox_head', None)):
        if isinstance(getattr(head, 'num_classes', None), int):
            return head.num_classes
    return None


def resolve_classes(checkpoint_meta: dict, config_meta: dict, num_classes: int | None) -> tuple[tuple, str]:
    """The class names to draw: the checkpoint's, else those of the config's test dataset (mmdet's `init_detector`
    labels a checkpoint without them with COCO's 80, whatever the model predicts).

    Returns:
        (classes, 'checkpoint' or 'config').

    Raises:
        SystemExit: Neither names classes, or not `num_classes` of them.
    """
    for source, meta in (('checkpoint', checkpoint_meta), ('config', config_meta)):
        if meta.get('classes'):
            classes = tuple(str(c) for c in meta['classes'])
            if num_classes is not None and len(classes) != num_classes:
                raise SystemExit(f'visualize.py: error: the {source} names {len(classes)} classes but the model '
                                 f'predicts {num_classes}')
            return classes, source
    raise SystemExit('visualize.py: error: neither the checkpoint nor the config\'s test dataset names the classes')


def main(argv=None) -> list[Path]:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    import mmcv
    from mmdet.apis import inference_detector, init_detector
    from mmdet.registry import DATASETS
    from mmdet.visualization import DetLocalVisualizer
    from mmdet.visualization.palette import get_palette

    from dsan.mm.tools import load_checkpoint_strictly, load_config
    from dsan.mm.utils import checkpoint_dataset_meta, config_dataset_meta, list_images, output_names
    for path, what in ((args.config, 'config'), (args.checkpoint, 'checkpoint')):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{what} file not found: {path}')
    images = list_images(args.image_dir)

    cfg = load_config(args.config, None, None, 'none')
    cfg.model.backbone.init_cfg = None  # the checkpoint holds the backbone: do not read the pretrained encoder
    lower_score_thr(cfg.model, args.score_thr)
    # Built without the checkpoint (init_detector loads non-strictly), which is read once, strictly, below; its
    # "use COCO classes" warning does not apply: the classes are resolved below.
    with warnings.catch_warnings(record=True):
        model = init_detector(cfg, None, device=args.device, palette=args.palette)
    checkpoint = load_checkpoint_strictly(model, args.checkpoint, 'visualize.py')
    classes, source = resolve_classes(checkpoint_dataset_meta(checkpoint), config_dataset_meta(cfg, DATASETS),
                                      head_num_classes(model))
    model.dataset_meta = {**model.dataset_meta, 'classes': classes}
    _logger.info('class names: %s', source)
    num_classes = len(classes)
    colours = len(get_palette(args.palette, 0))
    if args.palette in ('voc', 'citys') and colours < num_classes:  # mmdet asserts at the first drawing
        raise SystemExit(f'visualize.py: error: --palette {args.palette} has {colours} colours, fewer than the '
                         f"model's {num_classes} classes: use coco or random")
    visualizer = DetLocalVisualizer(name=f'dsan_det_vis_{os.getpid()}', bbox_color=args.palette,
                                    mask_color=args.palette, text_color=(200, 200, 200))
    visualizer.dataset_meta = model.dataset_meta
    tag = args.tag or Path(args.config).stem
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, name in tqdm(list(zip(images, output_names(images, tag))), desc='detections', unit='img'):
        result = inference_detector(model, str(path))
        image = mmcv.imread(str(path), channel_order='rgb')
        out = out_dir / name
        visualizer.add_datasample(path.stem, image, data_sample=result, draw_gt=False, show=False,
                                  pred_score_thr=args.score_thr, out_file=str(out))
        written.append(out)
    _logger.info('wrote %d drawings to %s', len(written), out_dir)
    return written


if __name__ == '__main__':
    main()  # its return value is for callers; the exit status is 0 (errors exit through argparse or raise)
