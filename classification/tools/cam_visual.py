#!/usr/bin/env python3
"""Grad-CAM heat-map overlays for a folder of images (the original's ``visualization/cls_cam_visual.py``).

Uses the ``grad-cam`` package (``pip install grad-cam``). The CAM is taken at the output of the last block of
the last stage (``block4[-1]`` for DSAN, as in the original; the last feature stage for other timm models) for
the predicted class, or for ``--class-index``. One ``<image>_<model>.jpg`` overlay is written per image, in the
image's sub-folder of the images folder under the output folder (``a/1.jpg`` gives ``a/1_<model>.jpg``; images
that differ only in their suffix keep it: ``1_png_<model>.jpg``), plus ``cams.csv`` with the image, its overlay, the
class explained and its probability::

    python classification/tools/cam_visual.py --model dsan_t --checkpoint dsan_t.pth.tar \
        --images-dir images/ --out-dir cams/
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from collections.abc import Sequence

import numpy as np
import timm
import torch
from PIL import Image

_CLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _CLS not in sys.path:
    sys.path.insert(0, _CLS)

import model_factory  # noqa: E402
from data import IMG_EXTENSIONS  # noqa: E402

from dsan.cli import device_type  # noqa: E402


def find_images(folder: str, limit: int = 0) -> list[str]:
    """Image files under ``folder`` (recursively, sorted); at most ``limit`` when > 0."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'image folder {folder!r} does not exist')
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMG_EXTENSIONS))
    if not found:
        raise FileNotFoundError(f'no image files ({"/".join(IMG_EXTENSIONS)}) under {folder!r}')
    return found[:limit] if limit > 0 else found


def overlay_paths(images: Sequence[str], images_dir: str, out_dir: str, model_name: str) -> list[str]:
    """A distinct overlay path under ``out_dir`` for each of ``images`` (files under ``images_dir``).

    The path keeps the image's sub-path under ``images_dir`` (images of different sub-folders may share a name),
    its suffix replaced by ``_<model_name>.jpg``; images whose sub-paths differ only in the suffix keep it in the
    name (``1.jpg``, ``1.png``: ``1_jpg_<model>.jpg``, ``1_png_<model>.jpg``).
    """
    stems = [os.path.splitext(os.path.relpath(path, images_dir)) for path in images]
    count = Counter(stem for stem, _ in stems)
    return [os.path.join(out_dir, f'{stem}_{ext.lstrip(".")}_{model_name}.jpg' if count[stem] > 1
                         else f'{stem}_{model_name}.jpg') for stem, ext in stems]


def resolve_target_layer(model: torch.nn.Module, name: str = '') -> torch.nn.Module:
    """The module whose activations and gradients make the CAM.

    Args:
        model: The classifier.
        name: Dotted module name; a ModuleList / Sequential resolves to its last element. Default: ``block4``
            for DSAN, else the last entry of timm's ``feature_info``.
    """
    if not name:
        name = 'block4' if hasattr(model, 'block4') else model.feature_info[-1]['module']
    try:
        layer = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f'model has no module {name!r} (--target-layer)') from e
    if isinstance(layer, (torch.nn.ModuleList, torch.nn.Sequential)):
        layer = layer[-1]
    return layer


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Command-line entry point; returns the written overlay paths."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', '--model_name', default='dsan_t', help='model name (default: dsan_t)')
    p.add_argument('--checkpoint', default='',
                   help='weights (original DSAN files, timm or this repo\'s checkpoints); default: '
                        'pretrained/<model>.pth.tar, where the original tool read them')
    p.add_argument('--random-weights', action='store_true',
                   help='explain an untrained model (for a smoke test; without weights the CAM means nothing)')
    p.add_argument('--use-ema', action='store_true', help='use the EMA weights of a training checkpoint')
    p.add_argument('--images-dir', '--images_dir', default='images', help='folder of images (searched recursively)')
    p.add_argument('--out-dir', '--cams_dir', default='cams', help='output folder for the overlays')
    p.add_argument('--img-size', type=int, default=None, help='input size (default: the model config, 224)')
    p.add_argument('--target-layer', default='', help='dotted module name (default: block4[-1] for DSAN)')
    p.add_argument('--method', default='gradcam', choices=('gradcam', 'gradcam++', 'layercam', 'eigencam'),
                   help='CAM method from the grad-cam package')
    p.add_argument('--class-index', type=int, default=None, help='explain this class instead of the prediction')
    p.add_argument('--alpha', type=float, default=0.5, help='heat-map weight in the overlay')
    p.add_argument('--max-images', type=int, default=0, help='at most this many images (0: all)')
    p.add_argument('--device', type=device_type, default='', help='"cuda" or "cpu" (default: cuda when available)')
    args = p.parse_args(argv)
    if args.img_size is not None and args.img_size < 1:
        p.error(f'argument --img-size: must be >= 1, got {args.img_size}')
    if args.max_images < 0:
        p.error(f'argument --max-images: must be >= 0, got {args.max_images}')
    if not 0 <= args.alpha <= 1:
        p.error(f'argument --alpha: must be in [0, 1], got {args.alpha}')
    try:
        images = find_images(args.images_dir, args.max_images)
    except FileNotFoundError as e:
        p.error(f'argument --images-dir: {e}')

    try:
        from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:
        raise SystemExit(f'cam_visual.py needs the grad-cam package: pip install grad-cam ({e})') from e
    methods = {'gradcam': GradCAM, 'gradcam++': GradCAMPlusPlus, 'layercam': LayerCAM, 'eigencam': EigenCAM}

    if args.checkpoint and args.random_weights:
        p.error('argument --random-weights: not allowed with --checkpoint')
    if not args.checkpoint and not args.random_weights:
        # The original built the model with pretrained=True, which read this file; a CAM of random weights (what a
        # missing file used to give, silently) explains nothing.
        default = os.path.join('pretrained', f'{args.model.split(".")[0]}.pth.tar')
        if not os.path.isfile(default):
            p.error(f'argument --checkpoint: required (no {default} either, where the original tool read the '
                    'weights); --random-weights explains an untrained model')
        args.checkpoint = default
        print(f'cam_visual: weights from {default}', file=sys.stderr)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if not timm.is_model(args.model.split('.')[0]):  # a pretrained tag (name.tag) is the model's
        p.error(f'argument --model: unknown timm model {args.model!r}')
    try:
        model = model_factory.create(args.model, checkpoint=args.checkpoint, use_ema=args.use_ema,
                                     pretrained=False).to(device).eval()
    except (model_factory.ModelError, FileNotFoundError) as e:
        p.error(f'argument --checkpoint: {e}')
    # The class count is known only now (a checkpoint's classifier sets it).
    if args.class_index is not None and not 0 <= args.class_index < model.num_classes:
        p.error(f'argument --class-index: must be in [0, {model.num_classes - 1}] ({args.model} has '
                f'{model.num_classes} classes), got {args.class_index}')
    cfg = model.pretrained_cfg
    size = args.img_size or cfg.get('input_size', (3, 224, 224))[-1]
    mean = torch.tensor(cfg.get('mean', (0.5, 0.5, 0.5))).view(3, 1, 1)
    std = torch.tensor(cfg.get('std', (0.5, 0.5, 0.5))).view(3, 1, 1)
    cam = methods[args.method](model=model, target_layers=[resolve_target_layer(model, args.target_layer)])
    os.makedirs(args.out_dir, exist_ok=True)

    written, rows = [], []
    for path, out in zip(images, overlay_paths(images, args.images_dir, args.out_dir, args.model)):
        try:
            rgb = np.asarray(Image.open(path).convert('RGB').resize((size, size), Image.Resampling.BICUBIC),
                             np.float32) / 255.0
        except OSError as e:
            raise SystemExit(f'cannot decode image file {path!r}: {e}') from e
        x = ((torch.from_numpy(rgb).permute(2, 0, 1) - mean) / std).unsqueeze(0).to(device)
        with torch.no_grad():
            prob = model(x).softmax(-1)[0]
        cls = int(prob.argmax()) if args.class_index is None else args.class_index
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)])[0]
        heat_rgb = _colormap(heat)
        overlay = (1 - args.alpha) * rgb + args.alpha * heat_rgb
        os.makedirs(os.path.dirname(out), exist_ok=True)
        Image.fromarray(np.uint8(np.clip(overlay, 0, 1) * 255)).save(out, quality=95)
        written.append(out)
        rows.append((path, out, cls, f'{float(prob[cls]):.4f}'))
        print(f'{out}  class {cls}  p={float(prob[cls]):.3f}')
    with open(os.path.join(args.out_dir, 'cams.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['image', 'overlay', 'class', 'prob'])
        w.writerows(rows)
    return written


def _colormap(heat: np.ndarray) -> np.ndarray:
    import matplotlib
    return matplotlib.colormaps['jet'](np.clip(heat, 0, 1))[..., :3].astype(np.float32)


if __name__ == '__main__':
    main()
