"""Helpers shared by the segmentation and detection tools."""
import importlib
import logging
import os
from collections.abc import Mapping, MutableMapping, MutableSequence
from pathlib import Path
from typing import Any

from mmengine.config import Config

__all__ = ['IMAGE_SUFFIXES', 'checkpoint_dataset_meta', 'config_dataset_meta', 'list_images', 'output_names',
           'resolve_config_path', 'set_data_root', 'sync_bn_to_bn', 'whole_inference']

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def sync_bn_to_bn(cfg: Any) -> int:
    """Turn every `type='SyncBN'` norm config inside `cfg` into `type='BN'`, in place.

    `cfg` is an mmengine `Config` or any nesting of dicts, lists and tuples (the dicts inside a tuple are changed
    in place; the tuple itself stays).

    The published configs use SyncBN, which needs CUDA; the tools call this when there is no GPU so that the same
    configs train and test on CPU, in one process or several (gloo).

    Returns:
        How many norm configs were changed.
    """
    changed = 0
    # An mmengine Config is no MutableMapping, but get/values/item assignment reach the ConfigDict it wraps.
    if isinstance(cfg, (MutableMapping, Config)):
        if cfg.get('type') in ('SyncBN', 'MMSyncBN'):
            cfg['type'] = 'BN'
            changed += 1
        for v in cfg.values():
            changed += sync_bn_to_bn(v)
    elif isinstance(cfg, (MutableSequence, tuple)):
        for v in cfg:
            changed += sync_bn_to_bn(v)
    return changed


def set_data_root(cfg: Config, root: str) -> list[str]:
    """Point the train, val and test datasets of `cfg` at `root`, in place, and the evaluators' annotation files with
    them (mmdet's COCO evaluators name ``<data_root>annotations/instances_val2017.json`` in full).

    A ``--cfg-options ...dataset.data_root=`` alone moved the datasets but left the evaluators reading the
    annotations under the config's old root: a missing file, or silently the other copy's annotations.

    Returns:
        The evaluator annotation files changed, as they now read.
    """
    root = str(root)
    old_roots = set()
    for split in ('train', 'val', 'test'):
        loader = cfg.get(f'{split}_dataloader')
        for dataset in _leaf_datasets(loader.get('dataset') if loader else None):
            if dataset.get('data_root'):
                old_roots.add(str(dataset.data_root))
            dataset.data_root = root
    changed = []
    for split in ('val', 'test'):
        evaluators = cfg.get(f'{split}_evaluator')
        for evaluator in evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]:
            ann_file = evaluator.get('ann_file') if evaluator else None
            if not ann_file:
                continue
            # The longest matching root first ('data/coco/' before 'data/').
            old = next((r for r in sorted(old_roots, key=len, reverse=True) if str(ann_file).startswith(r)), None)
            if old is None:
                _logger.warning('%s_evaluator.ann_file %r is not under the datasets\' root(s) %s: left as it is',
                                split, ann_file, sorted(old_roots))
                continue
            evaluator.ann_file = os.path.join(root, str(ann_file)[len(old):].lstrip('/'))
            changed.append(evaluator.ann_file)
    return changed


def _leaf_datasets(dataset: Any) -> list[Any]:
    # The dataset configs that read files: through wrappers (`dataset=`, e.g. RepeatDataset) and concatenations
    # (`datasets=[...]`, ConcatDataset), which take no data_root themselves.
    if dataset is None:
        return []
    if 'data_root' not in dataset and isinstance(dataset.get('datasets'), (list, tuple)):
        return [leaf for d in dataset.datasets for leaf in _leaf_datasets(d)]
    if 'data_root' not in dataset and dataset.get('dataset') is not None:
        return _leaf_datasets(dataset.dataset)
    return [dataset]


def checkpoint_dataset_meta(checkpoint: Any) -> dict[str, Any]:
    """The classes and palette a loaded checkpoint records, lower-case keys; {} when it records none.

    mmengine's runners save ``meta.dataset_meta``; mmseg 0.x / mmdet 2.x saved ``meta.CLASSES`` / ``meta.PALETTE``. A
    bare state_dict, or a checkpoint saved without meta, records none (mmseg's and mmdet's ``init_*`` then put
    Cityscapes' or COCO's classes on the model, whatever it predicts).
    """
    meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
    if not isinstance(meta, Mapping):
        return {}
    if isinstance(meta.get('dataset_meta'), Mapping):
        found = {str(k).lower(): v for k, v in meta['dataset_meta'].items()}
    else:
        found = {k.lower(): meta[k] for k in ('CLASSES', 'PALETTE') if meta.get(k) is not None}
    return {k: v for k, v in found.items() if v is not None} if found.get('classes') else {}


def config_dataset_meta(cfg: Config, registry: Any) -> dict[str, Any]:
    """The classes and palette of the config's test dataset, as the dataset itself has them; {} where the config
    names no test dataset or no classes.

    The dataset is built without reading its data (``lazy_init=True``, as mmdet's `init_detector` does), so its
    ``metainfo`` is the dataset's own: class names read from a file, and for a subset of mmseg's classes the palette
    entries of those classes.

    Args:
        cfg: The config.
        registry: The task's dataset registry (``mmseg.registry.DATASETS`` / ``mmdet.registry.DATASETS``); the
            task's default scope must be set (the ``init_*`` functions set it).
    """
    loader = cfg.get('test_dataloader') or {}
    leaves = _leaf_datasets(loader.get('dataset')) if isinstance(loader, Mapping) else []
    if not leaves:
        return {}
    try:
        meta = dict(registry.build({**leaves[0], 'lazy_init': True}).metainfo)
    except Exception as e:  # a dataset class that cannot be built here: its declared METAINFO and metainfo
        _logger.debug('config_dataset_meta: building the test dataset lazily failed (%s)', e)
        cls = leaves[0].get('type')
        cls = registry.get(cls) if isinstance(cls, str) else cls
        meta = dict(getattr(cls, 'METAINFO', None) or {})
        meta.update(leaves[0].get('metainfo') or {})
    if not meta.get('classes') or isinstance(meta['classes'], str):  # a str: a class-name file it did not read
        return {}
    return {k: meta[k] for k in ('classes', 'palette') if meta.get(k) is not None}


def output_names(images: list[Path], tag: str) -> list[str]:
    """File names ``<stem>_<tag>.png`` for `images`, distinct so that no drawing overwrites another: images sharing
    a stem (``a.jpg``, ``a.png``) keep their suffix in the name (``a_jpg_<tag>.png``), and a name still taken (``a.JPG``
    and ``a.jpg``; ``a.jpg`` and a file named ``a_jpg.png``) gets a counter (``a_jpg_<tag>_1.png``)."""
    stems = [p.stem for p in images]
    names, taken = [], set()
    for p in images:
        base = f'{p.stem}_{p.suffix.lstrip(".").lower()}_{tag}' if stems.count(p.stem) > 1 else f'{p.stem}_{tag}'
        name, n = f'{base}.png', 0
        # Case-insensitively: two names differing in case are one file on macOS and Windows.
        while name.lower() in taken:
            n += 1
            name = f'{base}_{n}.png'
        taken.add(name.lower())
        names.append(name)
    return names


def whole_inference(segmentor: Any, x: Any) -> Any:
    """Logits of mmseg's whole-image inference of a batch `x` (N, 3, H, W), resized to (H, W): (N, classes, H, W).

    What `mode='predict'` computes per image with `test_cfg=dict(mode='whole')`, without the data samples; the
    FLOP and speed tools measure this.
    """
    shape = tuple(x.shape[2:])
    return segmentor.encode_decode(x, [dict(img_shape=shape, ori_shape=shape, pad_shape=shape)] * x.shape[0])


def list_images(image_dir: str | Path) -> list[Path]:
    """The images (by suffix) directly inside `image_dir`, sorted.

    Raises:
        FileNotFoundError: `image_dir` does not exist or holds no image.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f'image folder not found: {image_dir}')
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in {image_dir}')
    return images


def resolve_config_path(config: str | Path) -> Path:
    """A config path, with OpenMMLab's `package::relative/path.py` form resolved to the installed package's file.

    Raises:
        FileNotFoundError: No such config file.
    """
    config = str(config)
    if '::' in config:
        package, rel = config.split('::', 1)
        try:
            root = Path(importlib.import_module(package).__file__).parent / '.mim' / 'configs'
        except ImportError as e:
            raise FileNotFoundError(f'config {config}: package {package!r} is not installed') from e
        path = root / rel
    else:
        path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f'config file not found: {config}' + (f' ({path})' if str(path) != config else ''))
    return path

