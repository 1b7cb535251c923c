"""Colour overlays of a segmentor's predictions for a folder of images, with a legend of the classes found.

A config and checkpoint go in with an image folder; for each image `OUT_DIR/NAME_TAG.png` comes out: the image with
the predicted label map blended over it in the dataset's palette (ADE20K, Cityscapes, or the checkpoint's own),
and a legend of the classes present.

Examples:
    python segmentation/tools/visualize.py segmentation/configs/ham/ham_dsan_t_ade20k_160k.py ham_dsan_t.pth \
        --image-dir demo_images --out-dir segm_mask
    python segmentation/tools/visualize.py CONFIG CHECKPOINT --palette cityscapes --opacity 0.6 --device cuda:0
"""
import argparse
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from dsan.cli import device_type

_logger = logging.getLogger('visualize')

PALETTES = ('auto', 'checkpoint', 'config', 'ade20k', 'cityscapes')


def dataset_meta(name: str) -> tuple[list[str], list[list[int]]]:
    """Classes and palette of mmseg's 'ade20k' or 'cityscapes' dataset."""
    from mmseg.datasets import ADE20KDataset, CityscapesDataset
    meta = {'ade20k': ADE20KDataset.METAINFO, 'cityscapes': CityscapesDataset.METAINFO}[name]
    return list(meta['classes']), [list(c) for c in meta['palette']]


def _colours(meta: dict, num_classes: int) -> list[list[int]]:
    palette = meta.get('palette')
    if palette is not None and len(palette) >= num_classes:
        return [list(c) for c in palette[:num_classes]]
    # Classes without colours (a metainfo naming classes only): fixed colours, the same on every run.
    return np.random.default_rng(0).integers(0, 256, size=(num_classes, 3)).tolist()


def resolve_meta(palette: str, num_classes: int, checkpoint_meta: dict,
                 config_meta: dict) -> tuple[list[str], list[list[int]], str]:
    """Classes and colours of the overlays.

    Args:
        palette: 'checkpoint' (the classes the checkpoint records), 'config' (the config's test dataset), 'ade20k',
            'cityscapes', or 'auto': the first of checkpoint, config, and then ADE20K for 150 classes or Cityscapes for
            19, whose classes number `num_classes`.
        num_classes: The classes the model predicts.
        checkpoint_meta, config_meta: ``dsan.mm.utils.checkpoint_dataset_meta`` / ``config_dataset_meta``.

    Returns:
        (classes, colours, where they came from).

    Raises:
        ValueError: The chosen source names no classes, or not `num_classes` of them.
    """
    sources = {'checkpoint': checkpoint_meta, 'config': config_meta}
    if palette == 'auto':
        fits = [name for name, meta in sources.items() if len(meta.get('classes', ())) == num_classes]
        fits += [{150: 'ade20k', 19: 'cityscapes'}[num_classes]] if num_classes in (150, 19) else []
        if not fits:
            found = ', '.join(f'the {name} names {len(meta["classes"])}' for name, meta in sources.items()
                              if meta.get('classes')) or 'neither the checkpoint nor the config names any'
            raise ValueError(f'--palette auto: no class names for the model\'s {num_classes} classes ({found}); '
                             'pass a config whose test dataset has them')
        palette = fits[0]
    if palette in sources:
        meta = sources[palette]
        if not meta.get('classes'):
            raise ValueError(f'--palette {palette}: the {palette} names no classes; pass --palette auto, config, '
                             'ade20k or cityscapes')
        classes = [str(c) for c in meta['classes']]
        colours = _colours(meta, len(classes))
    else:
        classes, colours = dataset_meta(palette)
    if len(classes) != num_classes:
        raise ValueError(f'--palette {palette} has {len(classes)} classes but the model predicts {num_classes}')
    return classes, colours, palette


def overlay(image: np.ndarray, labels: np.ndarray, colours: list[list[int]], classes: list[str],
            opacity: float = 0.5, legend: bool = True) -> Image.Image:
    """Blend a label map over an image and add a legend of the classes present.

    Args:
        image: (H, W, 3) uint8 RGB image.
        labels: (H, W) integer class indices; values outside [0, len(colours)) (e.g. 255, ignore) are left clear.
        colours: RGB colour of each class.
        classes: Name of each class.
        opacity: Weight of the colour mask in [0, 1].
        legend: Draw a legend column on the right.

    Returns:
        The RGB overlay, `legend` column included.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f'image {image.shape[:2]} and labels {labels.shape} differ in size')
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f'opacity must be in [0, 1], got {opacity}')
    lut = np.asarray(colours, dtype=np.uint8)
    valid = (labels >= 0) & (labels < len(lut))
    mask = lut[np.where(valid, labels, 0)]
    out = image.astype(np.float32)
    out[valid] = (1 - opacity) * out[valid] + opacity * mask[valid]
    result = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    if not legend:
        return result
    present, counts = np.unique(labels[valid], return_counts=True)
    order = present[np.argsort(-counts)]  # largest area first
    font = ImageFont.load_default()
    row = 16
    width = 12 + max((int(font.getlength(classes[c])) for c in order), default=0) + 28
    canvas = Image.new('RGB', (result.width + width, max(result.height, row * len(order) + 8)), (255, 255, 255))
    canvas.paste(result, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, c in enumerate(order):
        y = 4 + i * row
        draw.rectangle([result.width + 6, y + 2, result.width + 18, y + 12], fill=tuple(int(v) for v in lut[c]),
                       outline=(0, 0, 0))
        draw.text((result.width + 24, y), classes[c], fill=(0, 0, 0), font=font)
    return canvas


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='segmentation config file')
    parser.add_argument('checkpoint', help='segmentor checkpoint (mmengine or original mmseg 0.x)')
    parser.add_argument('--image-dir', '--image_dir', default='images', help='folder of input images')
    parser.add_argument('--out-dir', '--out_dir', default='segm_mask', help='folder for the overlays')
    parser.add_argument('--tag', default=None, help='suffix of the output names (default: the config name)')
    parser.add_argument('--palette', choices=PALETTES, default='auto',
                        help="class names and colours: 'auto' takes the checkpoint's, else those of the config's test "
                             "dataset, else ADE20K's for 150 classes or Cityscapes' for 19")
    parser.add_argument('--opacity', type=float, default=0.5, help='weight of the colour mask')
    parser.add_argument('--no-legend', dest='legend', action='store_false', help='no legend column')
    parser.add_argument('--device', type=device_type, default='cpu', help="'cpu' or 'cuda:0'")
    return parser.parse_args(argv)


def main(argv=None) -> list[Path]:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    import mmcv
    from mmseg.apis import inference_model, init_model
    from mmseg.registry import DATASETS

    from dsan.mm.tools import load_checkpoint_strictly, load_config
    from dsan.mm.utils import checkpoint_dataset_meta, config_dataset_meta, list_images, output_names
    for path, what in ((args.config, 'config'), (args.checkpoint, 'checkpoint')):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{what} file not found: {path}')
    images = list_images(args.image_dir)

    cfg = load_config(args.config, None, None, 'none')
    cfg.model.backbone.init_cfg = None  # the checkpoint holds the backbone: do not read the pretrained encoder
    # Built without the checkpoint: init_model loads non-strictly, needs the file's 'meta' (a bare state_dict was a
    # KeyError) and, without dataset_meta there, labels the model with Cityscapes' classes.
    model = init_model(cfg, None, device=args.device)
    checkpoint = load_checkpoint_strictly(model, args.checkpoint, 'visualize.py')
    classes, colours, source = resolve_meta(args.palette, model.decode_head.num_classes,
                                            checkpoint_dataset_meta(checkpoint), config_dataset_meta(cfg, DATASETS))
    model.dataset_meta = dict(classes=tuple(classes), palette=colours)
    _logger.info('class names and colours: %s', source)
    tag = args.tag or Path(args.config).stem
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, name in tqdm(list(zip(images, output_names(images, tag))), desc='overlays', unit='img'):
        # Decoded once, as the test pipeline's LoadImageFromFile does (EXIF orientation applied), and the model given
        # these very pixels: drawing on a separately opened file put a rotated phone photo's labels out of place.
        bgr = mmcv.imread(str(path))
        if bgr is None:
            raise ValueError(f'cannot decode image file {str(path)!r}')
        result = inference_model(model, bgr)
        labels = result.pred_sem_seg.data[0].cpu().numpy()
        image = np.ascontiguousarray(bgr[..., ::-1])
        out = out_dir / name
        overlay(image, labels, colours, classes, args.opacity, args.legend).save(out)
        written.append(out)
    _logger.info('wrote %d overlays to %s', len(written), out_dir)
    return written


if __name__ == '__main__':
    main()  # its return value is for callers; the exit status is 0 (errors exit through argparse or raise)
