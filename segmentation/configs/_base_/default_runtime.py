# mmseg's runtime (default_scope 'mmseg', local visualiser, SegTTAModel for --tta) plus the DSAN backbone,
# registered by importing the `dsan.mm` package (pip install -e . at the repository root).
_base_ = 'mmseg::_base_/default_runtime.py'
custom_imports = dict(imports=['dsan.mm'], allow_failed_imports=False)
