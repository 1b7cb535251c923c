# mmdet's runtime (default_scope 'mmdet', DetLocalVisualizer, checkpoint every epoch) plus the DSAN backbone,
# registered by importing the `dsan.mm` package (pip install -e . at the repository root).
_base_ = 'mmdet::_base_/default_runtime.py'
custom_imports = dict(imports=['dsan.mm'], allow_failed_imports=False)
