"""OpenMMLab integration: importing this package registers the `DSAN` backbone for mmseg and mmdet.

Configs load it with ``custom_imports = dict(imports=['dsan.mm'], allow_failed_imports=False)``. Importing it also
makes mmengine read local checkpoints with `dsan.mm.checkpoint.load_checkpoint_file` (see there why).
"""
try:
    import mmengine  # noqa: F401
except ImportError as e:  # the OpenMMLab stack is an extra: say how to get it rather than which module is missing
    raise ImportError(f'dsan.mm needs the OpenMMLab stack ({e}): install it with `bash scripts/install_mm.sh` '
                      '(mmengine, mmcv built once and cached, mmseg, mmdet)') from e

from . import checkpoint  # noqa: E402
from .backbone import DSANBackbone, sync_bn_available  # noqa: E402
from .checkpoint import load_checkpoint_file  # noqa: E402
from .utils import sync_bn_to_bn  # noqa: E402

__all__ = ['DSANBackbone', 'load_checkpoint_file', 'sync_bn_available', 'sync_bn_to_bn']

# mmengine 0.10.7 + torch >= 2.6 cannot read mmengine's own checkpoints: read them with an allowlist instead.
checkpoint.install()
