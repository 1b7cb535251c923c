"""DSAN: Deformable Spatial Attention Network (backbone, checkpoints, tools).

Importing `dsan` (or `dsan.models`) registers `dsan_t`, `dsan_t2` and `dsan_s` with timm.
"""
from . import models  # noqa: F401  (registers the timm models)

__version__ = '0.1.0'
