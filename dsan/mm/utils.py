"""Helpers shared by the segmentation and detection tools."""
import importlib
from collections.abc import MutableMapping, MutableSequence
from pathlib import Path
from typing import Any

from mmengine.config import Config

__all__ = ['IMAGE_SUFFIXES', 'list_images', 'resolve_config_path', 'sync_bn_to_bn', 'whole_inference']

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

