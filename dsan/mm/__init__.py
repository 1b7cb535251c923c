"""OpenMMLab integration: importing this package registers the `DSAN` backbone for mmseg and mmdet.

Configs load it with ``custom_imports = dict(imports=['dsan.mm'], allow_failed_imports=False)``.
"""
from .backbone import DSANBackbone, sync_bn_available
from .utils import sync_bn_to_bn

__all__ = ['DSANBackbone', 'sync_bn_available', 'sync_bn_to_bn']
