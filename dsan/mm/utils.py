"""Helpers shared by the segmentation and detection tools."""
from collections.abc import MutableMapping, MutableSequence
from typing import Any

__all__ = ['sync_bn_to_bn']


def sync_bn_to_bn(cfg: Any) -> int:
    """Turn every `type='SyncBN'` norm config inside `cfg` (nested dicts and lists) into `type='BN'`, in place.

    The published configs use SyncBN, which needs CUDA; the tools call this when there is no GPU so that the same
    configs train and test on CPU, in one process or several (gloo).

    Returns:
        How many norm configs were changed.
    """
    changed = 0
    if isinstance(cfg, MutableMapping):
        if cfg.get('type') in ('SyncBN', 'MMSyncBN'):
            cfg['type'] = 'BN'
            changed += 1
        for v in cfg.values():
            changed += sync_bn_to_bn(v)
    elif isinstance(cfg, MutableSequence):
        for v in cfg:
            changed += sync_bn_to_bn(v)
    return changed
