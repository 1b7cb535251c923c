"""Datasets for classification: ImageNet folder layout checks and a dataset that names broken files.

The heavy lifting (transforms, RandAugment, random erasing, samplers, loaders) is timm's; this module only
adds the input checks that turn a wrong path, an empty class folder or a corrupt image into an error that
names the offending path.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import ImageDataset, create_dataset
from timm.data.readers.class_map import load_class_map
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key

_logger = logging.getLogger(__name__)


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, also for 0 bits: Pillow 13 refuses 0, which timm's 'PosterizeIncreasing' gives at
    magnitude 10 (the recipe's rand-m9-mstd0.5-inc1 draws it now and then, and training stopped there). Pillow
    before 13, as in the original's runs, made the image black: every value & ~255."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    # Before any transform is built: timm's AugmentOp looks its function up by name when it is created.
    from timm.data import auto_augment
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


_patch_timm_posterize()

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp')


class DatasetError(ValueError):
    """The dataset directory is missing or not in the expected layout."""


class CorruptImageError(OSError):
    """An image file of the dataset cannot be decoded."""


def _list_images(folder: str) -> list[str]:
    # Symlinked folders are followed (datasets are often assembled from links), but each real folder is read once:
    # a link back to an ancestor would otherwise repeat its images until the path grows too long.
    found = []
    seen = set()
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        found.extend(os.path.join(dirpath, f) for f in files if f.lower().endswith(IMG_EXTENSIONS))
    return found


_SPLIT_NAMES = ('train', 'val', 'validation', 'test')


def _holds_folders(path: str) -> bool:
    # A split folder holds class folders; a class that happens to be named 'train' (CIFAR-100) holds images.
    return os.path.isdir(path) and any(e.is_dir() for e in os.scandir(path))


def search_split(root: str, split: str, allow_root: bool = False) -> str:
    """The split folder name to use under ``root``: ``split``, or its other spelling (``val`` / ``validation``) when
    only that folder exists, as timm's folder datasets searched for the original's ``validation`` default.

    Args:
        root: The dataset folder.
        split: The split asked for.
        allow_root: With neither spelling under ``root``, and no split folder at all there (its sub-folders are
            classes), evaluate ``root`` itself: returns ''. timm 0.4.12 (the original's validate.py) did, so
            ``validate.py /data/imagenet/val`` worked.
    """
    other = {'val': 'validation', 'validation': 'val'}.get(split)
    if not root or os.path.isdir(os.path.join(root, split)):
        return split
    if other and os.path.isdir(os.path.join(root, other)):
        _logger.info('split folder %r not found: using %r', os.path.join(root, split), os.path.join(root, other))
        return other
    if allow_root and os.path.isdir(root) and not any(_holds_folders(os.path.join(root, s)) for s in _SPLIT_NAMES):
        _logger.info('split folder %r not found and %r holds no split folder: evaluating its class folders',
                     os.path.join(root, split), root)
        return ''
    return split


def check_image_folder(root: str, split: str) -> list[str]:
    """Check ``root/split`` is an ImageNet-layout folder and return its class names (sorted).

    Args:
        root: Dataset root (the folder holding ``train/`` and ``val/``).
        split: Split sub-folder name.

    Returns:
        Class-folder names in timm's order (natural sort: 'c2' before 'c10'), which is the label order.

    Raises:
        DatasetError: naming the missing root or split folder, or every class folder without images.
    """
    if not root:
        raise DatasetError('no data directory given: pass it as the first argument or with --data-dir')
    if not os.path.isdir(root):
        raise DatasetError(f'data directory {root!r} does not exist (expected ImageNet layout '
                           f'{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)')
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DatasetError(f'split folder {split_dir!r} does not exist (expected {split_dir}/<class>/*.jpg; '
                           f'found in {root!r}: {sorted(os.listdir(root))}; --split NAME picks another)')
    classes = sorted((e.name for e in os.scandir(split_dir) if e.is_dir(follow_symlinks=True)), key=natural_key)
    if not classes:
        raise DatasetError(f'split folder {split_dir!r} has no class sub-folders (expected {split_dir}/<class>/*.jpg)')
    empty = [os.path.join(split_dir, c) for c in classes if not _list_images(os.path.join(split_dir, c))]
    if empty:
        shown = ', '.join(repr(e) for e in empty[:10]) + (f' and {len(empty) - 10} more' if len(empty) > 10 else '')
        raise DatasetError(f'class folder(s) without any image file ({"/".join(IMG_EXTENSIONS)}): {shown}')
    return classes


def check_val_classes(train_classes: list[str], val_classes: list[str], root: str, train_split: str,
                      val_split: str) -> None:
    """Check that every validation class folder is a training class (its label is the training split's index).

    A validation split without some classes is allowed (logged); one with a class the training split lacks is an
    error, since that class has no label the model could predict.

    Raises:
        DatasetError: naming the validation classes that are not training classes.
    """
    extra = sorted(set(val_classes) - set(train_classes))
    if extra:
        shown = ', '.join(repr(c) for c in extra[:10]) + (f' and {len(extra) - 10} more' if len(extra) > 10 else '')
        raise DatasetError(f'class folder(s) of {os.path.join(root, val_split)!r} not in '
                           f'{os.path.join(root, train_split)!r}: {shown}')
    missing = len(train_classes) - len(val_classes)
    if missing:
        _logger.warning('%s has no folder for %d of the %d training classes; its labels are the training indices',
                        os.path.join(root, val_split), missing, len(train_classes))


def class_map_difference(old: dict[str, int], new: dict[str, int], limit: int = 5) -> str:
    """How two ``{class name: index}`` maps differ, in one line: the classes only in each and those re-indexed."""
    def shown(items):
        items = sorted(items)
        return ', '.join(map(str, items[:limit])) + (f' and {len(items) - limit} more' if len(items) > limit else '')
    parts = []
    if set(old) - set(new):
        parts.append(f'only in the checkpoint: {shown(set(old) - set(new))}')
    if set(new) - set(old):
        parts.append(f'only in the folders: {shown(set(new) - set(old))}')
    moved = [f'{c} {old[c]} -> {new[c]}' for c in set(old) & set(new) if old[c] != new[c]]
    if moved:
        parts.append(f'other indices: {shown(moved)}')
    return '; '.join(parts)


def read_class_map(class_map: str | dict, root: str = '') -> dict:
    """A ``{class name: index}`` map from a ``.txt`` (one class per line: the line number is the index) or ``.pkl``
    file (timm's formats; a relative path may also be relative to ``root``), or a dict as it is.

    Raises:
        DatasetError: the file is missing, has another suffix or holds no valid map.
    """
    if isinstance(class_map, dict):
        mapping = class_map
    else:
        try:
            mapping = load_class_map(class_map, root)
        except (AssertionError, OSError, ValueError, EOFError) as e:  # timm asserts on a missing file / suffix
            raise DatasetError(f'--class-map {class_map!r}: {e}') from None
    bad = [k for k, v in mapping.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if not mapping or bad:
        raise DatasetError(f'--class-map {class_map!r} must map class names to indices >= 0; '
                           + (f'got {_shown([f"{k}: {mapping[k]!r}" for k in bad])}' if bad else 'it is empty'))
    return mapping


def _shown(items: list[str], limit: int = 5) -> str:
    return ', '.join(repr(i) for i in items[:limit]) + (f' and {len(items) - limit} more' if len(items) > limit else '')


class ClassFolderReader(ReaderImageFolder):
    """ImageNet layout reader: every image under ``root/<class>/`` (at any depth) is labelled ``<class>``.

    timm's folder reader labels an image by the folder that directly holds it, so ``cat/2019/x.jpg`` would become
    class '2019' and an image directly in ``root`` class ''; it also reads fewer suffixes than
    :func:`check_image_folder` accepts. This reader labels by the top-level folder, reads every suffix of
    ``IMG_EXTENSIONS``, skips (with a warning) image files directly in ``root`` and keeps timm's class order
    (natural sort) and sample order, so flat ImageNet folders get exactly timm's labels.

    Args:
        root: The split folder (``<data>/train``).
        class_map: Optional class-to-index map: a file (timm's: ``.txt``, one class per line, the line number being
            its index; or a pickled dict ``.pkl``) or a dict.
    """

    def __init__(self, root: str, class_map: str | dict = ''):
        super(ReaderImageFolder, self).__init__()
        self.root = root
        classes = sorted((e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True)), key=natural_key)
        if class_map:
            self.class_to_idx = read_class_map(class_map, root)
            unmapped = [c for c in classes if c not in self.class_to_idx]
            if unmapped:
                _logger.warning('%s: %d class folder(s) not in the class map are not read: %s', root,
                                len(unmapped), _shown(unmapped))
        else:
            self.class_to_idx = {c: i for i, c in enumerate(classes)}
        stray = sorted(e.name for e in os.scandir(root)
                       if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if stray:
            _logger.warning('%s: %d image file(s) outside the class folders are not read: %s', root, len(stray),
                            _shown(stray))
        samples = [(f, self.class_to_idx[c]) for c in classes if c in self.class_to_idx
                   for f in _list_images(os.path.join(root, c))]
        self.samples = sorted(samples, key=lambda s: natural_key(s[0]))


class StrictImageDataset(ImageDataset):
    """timm's :class:`~timm.data.ImageDataset` that fails on an unreadable image, naming the file.

    timm's dataset logs and silently skips to the next sample; for a benchmark that changes the evaluated set,
    so by default a corrupt file is an error here (``skip_bad_images=True`` restores timm's behaviour).
    """

    def __init__(self, *args, skip_bad_images: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_bad_images = skip_bad_images
        # With skipping, sample i may be read from a later file: which one, per index, in memory shared with the
        # loader's worker processes (-1: not read yet), so that per-image results name the file really read.
        self.read_from = torch.full((len(self.reader),), -1, dtype=torch.int64).share_memory_() \
            if skip_bad_images else None

    def __getitem__(self, index):
        first = index
        for _ in range(self._max_retries if self.skip_bad_images else 1):
            fileobj, target = self.reader[index]
            try:
                with fileobj if hasattr(fileobj, 'close') else open(fileobj, 'rb') as f:
                    img = _decode(Image.open(f), self.input_img_mode or 'RGB')
                break
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                path = self.reader.filename(index, absolute=True)
                if not self.skip_bad_images:
                    raise CorruptImageError(f'cannot decode image file {path!r}: {e}') from e
                _logger.warning('skipped unreadable image %r (index %d): %s', path, index, e)
                index = (index + 1) % len(self.reader)
        else:
            raise CorruptImageError(f'{self._max_retries} consecutive images could not be decoded (the last: {path!r})')
        if self.read_from is not None:
            self.read_from[first] = index
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def _decode(img: Image.Image, mode: str) -> Image.Image:
    """Decode all pixels of ``img`` into ``mode``. 16-bit greyscale keeps its top 8 bits: PIL's convert clips it
    at 255 instead, which turned almost every pixel of a 16-bit PNG white."""
    if img.mode.startswith('I;16'):
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8), 'L')
    return img.convert(mode)


def build_dataset(
        name: str,
        root: str,
        split: str,
        is_training: bool,
        class_map: str = '',
        skip_bad_images: bool = False,
        **kwargs,
) -> ImageDataset:
    """Create a dataset: checked ImageNet folders for ``name == ''``, else :func:`timm.data.create_dataset`.

    Args:
        name: timm dataset type ('' for a plain folder dataset, e.g. 'torch/cifar10', 'hfds/...').
        root: Dataset root.
        split: Split folder / name.
        is_training: Training split (affects iterable datasets only).
        class_map: Optional class-to-index map: a file, or a dict (e.g. the training split's ``class_to_idx``).
        skip_bad_images: Skip unreadable images with a warning instead of raising.
        **kwargs: Passed to :func:`timm.data.create_dataset` for non-folder datasets.
    """
    if name:
        return create_dataset(name, root=root, split=split, is_training=is_training, class_map=class_map, **kwargs)
    check_image_folder(root, split)
    split_dir = os.path.join(root, split)
    ds = StrictImageDataset(split_dir, reader=ClassFolderReader(split_dir, class_map), input_img_mode='RGB',
                            skip_bad_images=skip_bad_images)
    if not len(ds):
        raise DatasetError(f'no image of {split_dir!r} belongs to a class of the class map')
    _logger.info('%s: %d images in %d classes', split_dir, len(ds), len(ds.reader.class_to_idx))
    return ds


def num_classes_of(dataset) -> int | None:
    """Number of classes of a folder dataset (one more than its largest label), or None when it cannot be told."""
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    return max(class_to_idx.values()) + 1 if class_to_idx else None


__all__ = ['ClassFolderReader', 'CorruptImageError', 'DatasetError', 'StrictImageDataset', 'build_dataset',
           'check_image_folder', 'num_classes_of', 'read_class_map']
