"""DSCN, the deformable strip convolution of DSAN, as a PyTorch operator.

Public API:
    - :func:`ops_dscn.dscn`: the functional operator (channels-last input, one offset per tap along one axis).
    - :class:`ops_dscn.modules.DSCNX` / :class:`ops_dscn.modules.DSCNY`: the original modules (same names and
      parameters as the original code, so checkpoints load).
    - :class:`ops_dscn.functions.DSCNFunction`: the original 16-argument entry point, kept for compatibility.
    - :func:`ops_dscn.dscn_pytorch`: the pure-PyTorch implementation; ``backend='pytorch'`` selects it anywhere.
    - :func:`ops_dscn.conv_mlp`: DSAN's convolutional MLP (fc1, depthwise 3x3, GELU, fc2) fused on CPU, with a fused
      backward.
    - :func:`ops_dscn.strip_offsets`: a DSCN layer's offset branch (strip conv, LayerNorm, GELU, Linear) fused
      on CPU, with a fused backward.
    - :func:`ops_dscn.gelu`: the exact GELU on CPU with a fast (vectorized, memory-bound) forward and backward.
    - :func:`ops_dscn.pointwise_conv`: a 1x1 conv with its elementwise epilogue fused on CPU;
      :func:`ops_dscn.pack_weight` packs a weight once for it and for :func:`ops_dscn.conv_mlp` (inference).
    - :class:`ops_dscn.DepthwiseConv2d`: ``nn.Conv2d`` with groups = channels whose CPU weight gradient runs in a
      channels_last kernel (:func:`ops_dscn.dw_conv_weight_grad`).
"""

from .activation import gelu, gelu_available
from .conv_mlp import check_conv_mlp_args, conv_mlp, conv_mlp_available, conv_mlp_reference
from .depthwise import DepthwiseConv2d, dw_conv2d, dw_conv_weight_grad, dw_conv_weight_grad_reference
from .functional import (
    BACKENDS,
    available_backends,
    check_args,
    check_config,
    compiled_device_types,
    dscn,
    dscn_strip,
    extension_available,
    extension_error,
    recording_aten,
    resolve_backend,
)
from .pointwise import (
    KeepsPackedWeights,
    keep_packed_weight,
    kept_packed_weight,
    optimizer_step_count,
    pack_weight,
    pack_weight_available,
    pointwise_conv,
    pointwise_conv_available,
    pointwise_conv_reference,
)
from .pytorch_impl import dscn_pytorch
from .strip_offsets import check_strip_offsets_args, strip_offsets, strip_offsets_available, strip_offsets_reference

__version__ = "1.0.0"

__all__ = ["BACKENDS", "DepthwiseConv2d", "available_backends", "check_args", "check_config", "check_conv_mlp_args",
           "compiled_device_types", "conv_mlp", "conv_mlp_available", "conv_mlp_reference", "dscn", "dscn_pytorch",
           "dscn_strip", "extension_available", "extension_error", "gelu", "gelu_available", "resolve_backend",
           "check_strip_offsets_args", "strip_offsets", "strip_offsets_available", "strip_offsets_reference",
           "dw_conv2d", "pointwise_conv", "pointwise_conv_available", "pointwise_conv_reference",
           "dw_conv_weight_grad", "dw_conv_weight_grad_reference", "pack_weight", "pack_weight_available",
           "KeepsPackedWeights", "keep_packed_weight", "kept_packed_weight", "optimizer_step_count", "recording_aten"]
