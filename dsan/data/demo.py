"""Procedural demo datasets that the repository generates itself (no download).

Every image is a *scene*: a cluttered background (random colour gradient, pixel noise and thin line
segments) with one or more foreground shapes drawn in random colours, sizes, positions and small
rotations. The shape categories differ only in their spatial structure (a disk and a ring, a square
and a square frame, a triangle pointing up or down, a plus and a cross, ...), and colours are drawn
independently of the category, so a model has to learn shape, not colour statistics.

The same scene renderer produces three layouts:

* ``classification`` — ImageNet folder layout ``{train,val}/<class>/<image>.jpg``, one shape per image.
* ``segmentation`` — ADE20K layout ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` (0 = background, ``k + 1`` = category ``k``), or Cityscapes
  layout ``leftImg8bit/{train,val}/demo/*_leftImg8bit.png`` and ``gtFine/{train,val}/demo/*_labelTrainIds.png``.
* ``detection`` — COCO layout ``{train2017,val2017}/*.jpg`` and ``annotations/instances_{split}.json``
  with boxes, areas and uncompressed-RLE masks.

Example::

    python -m dsan.data.demo --out data/demo_cls
    python -m dsan.data.demo --task segmentation --out data/demo_seg --size 128
    python -m dsan.data.demo --task segmentation --layout cityscapes --out data/demo_cityscapes
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    'SHAPES', 'SceneObject', 'Scene', 'render_shape_alpha', 'render_scene',
    'SEG_LAYOUTS', 'make_classification', 'make_segmentation', 'make_detection', 'main',
]

_logger = logging.getLogger(__name__)

#: Shape categories, in label order. Pairs differ only in structure (filled vs hollow, orientation).
SHAPES: tuple[str, ...] = (
    'disk', 'ring', 'square', 'frame', 'triangle_up', 'triangle_down', 'plus', 'cross', 'star', 'bars',
)

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for anti-aliased edges
_MAX_ROTATION = 15.0  # degrees; small enough that plus/cross and up/down triangles stay distinct


@dataclass
class SceneObject:
    """One foreground shape of a scene.

    Attributes:
        category: Index into :data:`SHAPES`.
        mask: Boolean (H, W) mask of the pixels the shape covers in the final image (after occlusion).
        bbox: Tight box of ``mask`` as ``(x, y, w, h)`` in pixels (COCO convention).
    """

    category: int
    mask: np.ndarray
    bbox: tuple[int, int, int, int]


@dataclass
class Scene:
    """A rendered scene.

    Attributes:
        image: (H, W, 3) uint8 RGB image.
        objects: Foreground shapes, in drawing order (later ones occlude earlier ones).
    """

    image: np.ndarray
    objects: list[SceneObject]

    def semantic_mask(self) -> np.ndarray:
        """Return the (H, W) uint8 label map: 0 background, ``category + 1`` elsewhere."""
        seg = np.zeros(self.image.shape[:2], np.uint8)
        for obj in self.objects:
            seg[obj.mask] = obj.category + 1
        return seg


def _rotate(points: np.ndarray, angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return points @ rot.T


def _regular_polygon(n: int, radius: float, phase_deg: float) -> np.ndarray:
    t = np.deg2rad(phase_deg) + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _rect(cx: float, cy: float, hw: float, hh: float) -> np.ndarray:
    return np.array([[cx - hw, cy - hh], [cx + hw, cy - hh], [cx + hw, cy + hh], [cx - hw, cy + hh]])


def _shape_polygons(shape: str, r: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Polygons (centred at the origin, radius ``r``) to fill, and polygons to cut out afterwards."""
    if shape == 'disk':
        return [_regular_polygon(64, r, 0)], []
    if shape == 'ring':
        return [_regular_polygon(64, r, 0)], [_regular_polygon(64, 0.55 * r, 0)]
    if shape == 'square':
        return [_rect(0, 0, 0.8 * r, 0.8 * r)], []
    if shape == 'frame':
        return [_rect(0, 0, 0.8 * r, 0.8 * r)], [_rect(0, 0, 0.45 * r, 0.45 * r)]
    if shape == 'triangle_up':  # image y grows downwards: apex at -y
        return [_regular_polygon(3, r, -90)], []
    if shape == 'triangle_down':
        return [_regular_polygon(3, r, 90)], []
    if shape == 'plus':
        return [_rect(0, 0, r, 0.25 * r), _rect(0, 0, 0.25 * r, r)], []
    if shape == 'cross':
        return [_rotate(_rect(0, 0, r, 0.25 * r), 45), _rotate(_rect(0, 0, 0.25 * r, r), 45)], []
    if shape == 'star':
        outer = _regular_polygon(5, r, -90)
        inner = _regular_polygon(5, 0.4 * r, -90 + 36)
        return [np.stack([outer, inner], axis=1).reshape(10, 2)], []
    if shape == 'bars':
        return [_rect(0, -0.5 * r, r, 0.22 * r), _rect(0, 0.5 * r, r, 0.22 * r)], []
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def render_shape_alpha(
        shape: str,
        size: tuple[int, int],
        center: tuple[float, float],
        radius: float,
        angle: float = 0.0,
) -> np.ndarray:
    """Rasterise one shape to an anti-aliased coverage map.

    Args:
        shape: One of :data:`SHAPES`.
        size: Output ``(height, width)`` in pixels.
        center: Shape centre ``(x, y)`` in pixels.
        radius: Half the shape's extent in pixels.
        angle: Rotation in degrees (counter-clockwise on screen).

    Returns:
        (H, W) float32 coverage in [0, 1].
    """
    h, w = size
    s = _SUPERSAMPLE
    canvas = Image.new('L', (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    fill, holes = _shape_polygons(shape, radius * s)
    offset = np.array(center) * s
    for value, polys in ((255, fill), (0, holes)):
        for poly in polys:
            pts = _rotate(poly, -angle) + offset
            draw.polygon([tuple(p) for p in pts.tolist()], fill=value)
    alpha = canvas.resize((w, h), Image.Resampling.BOX)
    return np.asarray(alpha, np.float32) / 255.0


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _contrasting_color(rng: np.random.Generator, ref: np.ndarray, min_dist: float = 90.0) -> np.ndarray:
    for _ in range(100):
        c = _random_color(rng)
        if np.linalg.norm(c - ref) >= min_dist:
            return c
    return 255.0 - ref


def _background(rng: np.random.Generator, h: int, w: int, noise: float, clutter: int) -> np.ndarray:
    c0, c1 = _random_color(rng), _random_color(rng)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(theta) * xx / max(w - 1, 1) + np.sin(theta) * yy / max(h - 1, 1))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    if clutter:
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(clutter):
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            length, a = rng.uniform(0.1, 0.4) * min(h, w), rng.uniform(0, 2 * np.pi)
            draw.line([(x0, y0), (x0 + length * np.cos(a), y0 + length * np.sin(a))],
                      fill=tuple(int(v) for v in _random_color(rng)), width=1)
        img = np.asarray(pil, np.float32)
    return img + rng.normal(0, noise, size=img.shape)


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0, 0, 0, 0
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def render_scene(
        rng: np.random.Generator,
        size: tuple[int, int],
        categories: Sequence[int],
        scale: tuple[float, float] = (0.25, 0.45),
        noise: float = 12.0,
        clutter: int = 4,
) -> Scene:
    """Render a scene with the given shape categories on a cluttered background.

    Args:
        rng: Random generator (the scene is a pure function of its state).
        size: ``(height, width)`` in pixels.
        categories: Shape category index (into :data:`SHAPES`) of each object, drawn in order.
        scale: Range of the object radius as a fraction of ``min(height, width)``.
        noise: Standard deviation of the additive pixel noise (0-255 scale).
        clutter: Number of thin random line segments in the background.

    Returns:
        The rendered :class:`Scene`; objects hidden completely by later ones keep an empty mask.
    """
    h, w = size
    img = _background(rng, h, w, noise=0.0, clutter=clutter)
    bg_mean = img.reshape(-1, 3).mean(0)
    masks, objects = [], []
    for cat in categories:
        radius = rng.uniform(*scale) * min(h, w)
        cx = rng.uniform(radius, w - radius)
        cy = rng.uniform(radius, h - radius)
        angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
        alpha = render_shape_alpha(SHAPES[cat], (h, w), (cx, cy), radius, angle)
        color = _contrasting_color(rng, bg_mean)
        # a mild shading gradient across the object, so its colour is not a single flat value
        shade = 1.0 + 0.25 * (np.linspace(-1, 1, w)[None, :, None] * rng.uniform(-1, 1))
        img = img * (1 - alpha[..., None]) + np.clip(color * shade, 0, 255) * alpha[..., None]
        mask = alpha > 0.5
        for m in masks:  # later objects occlude earlier ones
            m &= ~mask
        masks.append(mask)
        objects.append(cat)
    img = img + rng.normal(0, noise, size=img.shape)
    image = np.clip(img, 0, 255).astype(np.uint8)
    objs = [SceneObject(category=int(c), mask=m, bbox=_mask_bbox(m)) for c, m in zip(objects, masks)]
    return Scene(image=image, objects=objs)


_STAGE_PREFIX = '.partial-'


@contextlib.contextmanager
def _staged_output(out: str, overwrite: bool):
    """Yield a staging folder inside `out`; when the body succeeds, move each of its entries into `out`, replacing the
    entry of the same name (``train/``, ``annotations/``, ``classes.txt`` ...) whole.

    So an interrupted run leaves `out` as it was (a rerun starts clean), and ``overwrite`` replaces what an earlier
    run wrote instead of mixing its files with the new ones. Other entries of `out` are left alone.

    Raises:
        FileExistsError: `out` holds files and ``overwrite`` is false.
    """
    if os.path.isdir(out):
        for name in os.listdir(out):  # the staging folder of a run that was killed
            if name.startswith(_STAGE_PREFIX):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        if os.listdir(out) and not overwrite:
            raise FileExistsError(f'output directory {out!r} exists and is not empty (pass --overwrite to replace '
                                  'the files an earlier run wrote)')
    os.makedirs(out, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=out)
    try:
        yield stage
        # Folders first: the files (classes.txt, which run_demo.sh takes as "complete") arrive last.
        for name in sorted(os.listdir(stage), key=lambda n: (os.path.isfile(os.path.join(stage, n)), n)):
            dst = os.path.join(out, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)
            elif os.path.lexists(dst):
                os.remove(dst)
            os.replace(os.path.join(stage, name), dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# Smallest image side the scenes render at (a shape's radius is a fraction of the side).
MIN_SIZE = 16


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        low = MIN_SIZE if name == 'size' else 1
        if not isinstance(value, int) or value < low:
            raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')


def _class_names(num_classes: int) -> list[str]:
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be between 2 and {len(SHAPES)}, got {num_classes}")
    return [f'{i:02d}_{name}' for i, name in enumerate(SHAPES[:num_classes])]


def make_classification(
        out: str,
        num_classes: int = 10,
        train_per_class: int = 300,
        val_per_class: int = 50,
        size: int = 64,
        seed: int = 0,
        overwrite: bool = False,
) -> dict[str, int]:
    """Write a shape-classification set in ImageNet folder layout.

    Args:
        out: Output root; ``out/train/<class>/*.jpg`` and ``out/val/<class>/*.jpg`` are written.
        num_classes: Number of categories (the first ``num_classes`` of :data:`SHAPES`).
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        size: Image side in pixels.
        seed: Seed; the same arguments always give byte-identical files.
        overwrite: Allow writing into a non-empty directory.

    Returns:
        Number of images written per split.
    """
    names = _class_names(num_classes)
    _check_counts(train_per_class=train_per_class, val_per_class=val_per_class, size=size)
    with _staged_output(out, overwrite) as stage:  # written here, moved into `out` when complete
        counts = {}
        for split_idx, (split, per_class) in enumerate((('train', train_per_class), ('val', val_per_class))):
            for label, name in enumerate(names):
                d = os.path.join(stage, split, name)
                os.makedirs(d, exist_ok=True)
                rng = np.random.default_rng([seed, split_idx, label])
                for i in range(per_class):
                    scene = render_scene(rng, (size, size), [label])
                    Image.fromarray(scene.image).save(os.path.join(d, f'{split}_{label:02d}_{i:05d}.jpg'), quality=95)
            counts[split] = per_class * num_classes
        with open(os.path.join(stage, 'classes.txt'), 'w') as f:
            f.write('\n'.join(names) + '\n')
        return counts


def _scene_categories(rng: np.random.Generator, num_classes: int, max_objects: int) -> list[int]:
    n = int(rng.integers(1, max_objects + 1))
    return [int(c) for c in rng.integers(0, num_classes, size=n)]


SEG_LAYOUTS = ('ade20k', 'cityscapes')


def make_segmentation(
        out: str,
        num_classes: int = 10,
        num_train: int = 400,
        num_val: int = 100,
        size: int = 128,
        max_objects: int = 4,
        seed: int = 0,
        overwrite: bool = False,
        layout: str = 'ade20k',
) -> dict[str, int]:
    """Write a semantic-segmentation set in ADE20K or Cityscapes layout.

    Label maps hold 0 for the background and ``k + 1`` for shape ``k`` in both layouts.

    * ``ade20k``: ``images/{training,validation}/demo_<split>_<i>.jpg`` and
      ``annotations/{training,validation}/demo_<split>_<i>.png`` (mmseg's ADE20KDataset reads them with
      ``reduce_zero_label``, so there the background is ignored and shape ``k`` is class ``k``).
    * ``cityscapes``: ``leftImg8bit/{train,val}/demo/demo_<i>_000019_leftImg8bit.png`` and
      ``gtFine/{train,val}/demo/demo_<i>_000019_gtFine_labelTrainIds.png`` (train ids: the background is
      id 0, shape ``k`` id ``k + 1``; at most 18 shapes fit the 19 Cityscapes ids).

    Args:
        out: Output root.
        num_classes: Number of shape categories.
        num_train: Training images.
        num_val: Validation images.
        size: Image side in pixels.
        max_objects: Each scene has 1 to ``max_objects`` shapes (they may overlap).
        seed: Seed.
        overwrite: Allow writing into a non-empty directory.
        layout: ``'ade20k'`` or ``'cityscapes'``.

    Returns:
        Number of images written per split.
    """
    if layout not in SEG_LAYOUTS:
        raise ValueError(f'layout must be one of {SEG_LAYOUTS}, got {layout!r}')
    _class_names(num_classes)
    if layout == 'cityscapes' and num_classes > 18:
        raise ValueError('the Cityscapes layout has 19 train ids (background + 18 shapes), '
                         f'got num_classes={num_classes}')
    _check_counts(num_train=num_train, num_val=num_val, size=size, max_objects=max_objects)
    with _staged_output(out, overwrite) as stage:  # written here, moved into `out` when complete
        counts = {}
        splits = ('training', 'validation') if layout == 'ade20k' else ('train', 'val')
        for split_idx, (split, n) in enumerate(zip(splits, (num_train, num_val))):
            if layout == 'ade20k':
                img_dir, ann_dir = os.path.join(stage, 'images', split), os.path.join(stage, 'annotations', split)
            else:
                img_dir = os.path.join(stage, 'leftImg8bit', split, 'demo')
                ann_dir = os.path.join(stage, 'gtFine', split, 'demo')
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(ann_dir, exist_ok=True)
            # The same seed stream for both layouts: the same arguments give the same scenes in either.
            rng = np.random.default_rng([seed, 100 + split_idx])
            for i in range(n):
                scene = render_scene(rng, (size, size), _scene_categories(rng, num_classes, max_objects),
                                     scale=(0.12, 0.3))
                image, mask = Image.fromarray(scene.image), Image.fromarray(scene.semantic_mask())
                if layout == 'ade20k':
                    stem = f'demo_{split}_{i:06d}'
                    image.save(os.path.join(img_dir, stem + '.jpg'), quality=95)
                    mask.save(os.path.join(ann_dir, stem + '.png'))
                else:
                    stem = f'demo_{split_idx}{i:05d}_000019'
                    image.save(os.path.join(img_dir, stem + '_leftImg8bit.png'))
                    mask.save(os.path.join(ann_dir, stem + '_gtFine_labelTrainIds.png'))
            counts[split] = n
        with open(os.path.join(stage, 'classes.txt'), 'w') as f:
            f.write('\n'.join(('background',) + SHAPES[:num_classes]) + '\n')
        return counts


def mask_to_rle(mask: np.ndarray) -> dict[str, list]:
    """Encode a boolean mask as COCO uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = np.asarray(mask, np.uint8).flatten(order='F')
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {'counts': [int(c) for c in counts], 'size': [int(mask.shape[0]), int(mask.shape[1])]}


def make_detection(
        out: str,
        num_classes: int = 10,
        num_train: int = 400,
        num_val: int = 100,
        size: int = 128,
        max_objects: int = 4,
        seed: int = 0,
        overwrite: bool = False,
) -> dict[str, int]:
    """Write an instance detection/segmentation set in COCO layout.

    Files: ``train2017/*.jpg``, ``val2017/*.jpg`` and ``annotations/instances_{train2017,val2017}.json``
    (category ids start at 1; masks are uncompressed RLE; fully occluded shapes are dropped).

    Args:
        out: Output root.
        num_classes: Number of shape categories.
        num_train: Training images.
        num_val: Validation images.
        size: Image side in pixels.
        max_objects: Each scene has 1 to ``max_objects`` shapes.
        seed: Seed.
        overwrite: Allow writing into a non-empty directory.

    Returns:
        Number of images written per split.
    """
    _class_names(num_classes)
    _check_counts(num_train=num_train, num_val=num_val, size=size, max_objects=max_objects)
    with _staged_output(out, overwrite) as stage:  # written here, moved into `out` when complete
        os.makedirs(os.path.join(stage, 'annotations'), exist_ok=True)
        categories = [{'id': k + 1, 'name': SHAPES[k], 'supercategory': 'shape'} for k in range(num_classes)]
        counts = {}
        ann_id = 1
        for split_idx, (split, n) in enumerate((('train2017', num_train), ('val2017', num_val))):
            os.makedirs(os.path.join(stage, split), exist_ok=True)
            rng = np.random.default_rng([seed, 200 + split_idx])
            images, annotations = [], []
            for i in range(n):
                scene = render_scene(rng, (size, size), _scene_categories(rng, num_classes, max_objects),
                                     scale=(0.12, 0.3))
                file_name = f'{split_idx * 10_000_000 + i + 1:012d}.jpg'
                Image.fromarray(scene.image).save(os.path.join(stage, split, file_name), quality=95)
                images.append(
                    {'id': split_idx * 10_000_000 + i + 1, 'file_name': file_name, 'height': size, 'width': size})
                for obj in scene.objects:
                    area = int(obj.mask.sum())
                    if area == 0:
                        continue
                    annotations.append({
                        'id': ann_id, 'image_id': images[-1]['id'], 'category_id': obj.category + 1,
                        'bbox': list(obj.bbox), 'area': area, 'iscrowd': 0, 'segmentation': mask_to_rle(obj.mask),
                    })
                    ann_id += 1
            with open(os.path.join(stage, 'annotations', f'instances_{split}.json'), 'w') as f:
                json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)
            counts[split] = n
        return counts


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--task', default='classification', choices=('classification', 'segmentation', 'detection'),
                   help='dataset layout: ImageNet folders, ADE20K or COCO (default: classification)')
    p.add_argument('--out', required=True, help='output directory')
    p.add_argument('--num-classes', type=int, default=10, help=f'number of shape classes, 2..{len(SHAPES)}')
    p.add_argument('--train-per-class', type=int, default=300, help='classification: training images per class')
    p.add_argument('--val-per-class', type=int, default=50, help='classification: validation images per class')
    p.add_argument('--num-train', type=int, default=400, help='segmentation/detection: training images')
    p.add_argument('--num-val', type=int, default=100, help='segmentation/detection: validation images')
    p.add_argument('--size', type=int, default=None, help='image side (default: 64 classification, 128 otherwise)')
    p.add_argument('--max-objects', type=int, default=4, help='segmentation/detection: shapes per image, at most')
    p.add_argument('--layout', default='ade20k', choices=SEG_LAYOUTS,
                   help='segmentation: ADE20K (images/, annotations/) or Cityscapes (leftImg8bit/, gtFine/) layout')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--overwrite', action='store_true', help='write into a non-empty output directory')
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """Command-line entry point; returns the number of images written per split.

    A bad argument or a non-empty output folder without ``--overwrite`` exits with a one-line error (status 2).
    """
    args = _parse_args(argv)
    start = time.time()
    try:
        if args.task == 'classification':
            counts = make_classification(args.out, args.num_classes, args.train_per_class, args.val_per_class,
                                         size=64 if args.size is None else args.size, seed=args.seed,
                                         overwrite=args.overwrite)
        else:
            fn = make_detection
            extra = {}
            if args.task == 'segmentation':
                fn, extra = make_segmentation, dict(layout=args.layout)
            counts = fn(args.out, args.num_classes, args.num_train, args.num_val,
                        size=128 if args.size is None else args.size, max_objects=args.max_objects, seed=args.seed,
                        overwrite=args.overwrite, **extra)
    except (ValueError, OSError) as e:  # bad arguments, a non-empty or unwritable output folder
        print(f'dsan.data.demo: error: {e}', file=sys.stderr)
        raise SystemExit(2) from None
    summary = ', '.join(f'{k}: {v}' for k, v in counts.items())
    print(f'wrote {args.task} demo data to {args.out} ({summary} images) in {time.time() - start:.1f}s')
    return counts


if __name__ == '__main__':
    main()
