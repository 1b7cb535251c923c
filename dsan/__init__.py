"""DSAN: Deformable Spatial Attention Network.

Subpackages: `dsan.models` (the backbone and checkpoint loading; importing `dsan` or `dsan.models` registers
`dsan_t`, `dsan_t2` and `dsan_s` with timm), `dsan.mm` (the OpenMMLab backbone adapter and mm tool helpers),
`dsan.data` (the bundled demo dataset), `dsan.flops` (parameter and FLOP counting as in the paper) and
`dsan.profiling` (the speed tools' torch.profiler tables).
"""
from . import models  # noqa: F401  (registers the timm models)

__version__ = '0.1.0'
