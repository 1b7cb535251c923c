"""OpenMMLab integration: importing this package registers the `DSAN` backbone for mmseg and mmdet.

Configs load it with ``custom_imports = dict(imports=['dsan.mm'], allow_failed_imports=False)``. Importing it also
makes mmengine read local checkpoints with `dsan.mm.checkpoint.load_checkpoint_file` (see there why).
"""
from . import checkpoint
from .backbone import DSANBackbone, sync_bn_available
from .checkpoint import load_checkpoint_file
from .utils import sync_bn_to_bn

__all__ = ['DSANBackbone', 'load_checkpoint_file', 'sync_bn_available', 'sync_bn_to_bn']

# mmengine 0.10.7 + torch >= 2.6 cannot read mmengine's own checkpoints: read them with an allowlist instead.
checkpoint.install()
