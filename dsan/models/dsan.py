"""DSAN: Deformable Spatial Attention Network.

Paper: `DSAN: Exploring the Relationship between Deformable Convolution and Spatial Attention`
(Zewen Yu, Xiaoqin Zhang, Li Zhao, Guobao Xiao; TechRxiv 2024).

@article{yu2024dsan,
  title={DSAN: Exploring the Relationship between Deformable Convolution and Spatial Attention},
  author={Yu, Zewen and Zhang, Xiaoqin and Zhao, Li and Xiao, Guobao},
  journal={TechRxiv},
  year={2024}
}

Original code: https://github.com/MarcYugo/DSAN-Deformable-Spatial-Attention

This is the only definition of the DSAN backbone in the repository. Classification builds it with
``timm.create_model('dsan_t')`` (``dsan_t2``, ``dsan_s``); segmentation and detection build
``dsan.mm.backbone.DSANBackbone``, a subclass of `DSAN` registered as the OpenMMLab backbone ``DSAN``. Module,
parameter and buffer names match the original code so its released checkpoints load with ``strict=True``.

Activations are kept in ``torch.channels_last`` memory (NCHW logical shape, NHWC memory): the depthwise
convolutions are fast in that layout and the NHWC view handed to the DSCN operator is free.

For inference, `DSAN.reparameterize()` (or timm's ``timm.utils.reparameterize_model``) folds every BatchNorm and
layer scale into a convolution (see `Block.reparameterize`).

The file follows timm's layout: blocks, stage parts, the model, `checkpoint_filter_fn` (with what else knows the
architecture of a checkpoint: `describe_state_dict`, `infer_groups`), the pretrained configs and the registered
variants. Reading checkpoint files is generic and lives in `dsan.models._checkpoint`.
"""
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import DropPath, LayerNorm2d, register_notrace_function, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices

try:
    import ops_dscn
    from ops_dscn import DepthwiseConv2d
    from ops_dscn.functional import known_true
    from ops_dscn.modules import DSCNX, DSCNY
except ImportError as e:  # e.g. from the repository root, where the un-installed ops_dscn/ folder is a namespace
    raise ImportError(f'dsan needs the ops_dscn operator package ({e}): install it with `pip install '
                      '--no-build-isolation ./ops_dscn` (or `cd ops_dscn && python setup.py install`)') from e

from ..compile import compile_kwargs
from ._checkpoint import (
    CheckpointError,
    NoPretrainedWeightsError,
    check_state_dict,
    extract_state_dict,
    read_checkpoint,
)
from ._checkpoint import load_checkpoint as _load_checkpoint

__all__ = [
    'DSAN', 'DSA', 'DSCNPair', 'Block', 'OverlapPatchEmbed', 'Mlp', 'check_strip_geometry', 'checkpoint_filter_fn',
    'describe_state_dict', 'infer_groups', 'load_checkpoint',
    # Re-exported from `_checkpoint` (imported from here by dsan.mm and the tools).
    'CheckpointError', 'NoPretrainedWeightsError', 'extract_state_dict', 'read_checkpoint',
]

_logger = logging.getLogger(__name__)

# `core_op`, an earlier name of `backend` in InternImage's DCNv3 style (not an option of the original DSAN code, which
# always calls the compiled op): 'dscn' (the compiled op) or 'dscn_pytorch' (its pure-PyTorch twin).
_CORE_OP_BACKENDS = {'dscn': 'cpp', 'dscn_pytorch': 'pytorch'}


def _backend_arg(backend: str | None, core_op: str | None) -> str:
    """The DSCN backend name given as `backend` or as the deprecated `core_op`, checked by ops_dscn.

    Args:
        backend: One of `ops_dscn.BACKENDS` ('auto', 'cpp', 'pytorch'); None is 'auto'.
        core_op: Deprecated alias: 'dscn' is backend='cpp', 'dscn_pytorch' is backend='pytorch'.

    Returns:
        The backend *name*: the DSCN modules resolve it at each call, for the device of their input.

    Raises:
        ValueError: Unknown name, or `backend` and `core_op` disagree.
        RuntimeError: 'cpp' requested but the compiled op is not built.
    """
    if core_op is not None:
        if core_op not in _CORE_OP_BACKENDS:
            raise ValueError(f"core_op must be one of {tuple(_CORE_OP_BACKENDS)}; got {core_op!r} (core_op is "
                             f'deprecated: use backend=, one of {ops_dscn.BACKENDS}).')
        alias = _CORE_OP_BACKENDS[core_op]
        if backend is not None and backend != alias:
            raise ValueError(f'backend={backend!r} and core_op={core_op!r} (backend={alias!r}) disagree: '
                             'give only backend=.')
        warnings.warn(f'DSAN: core_op={core_op!r} is deprecated, use backend={alias!r}.', FutureWarning, stacklevel=3)
        backend = alias
    backend = 'auto' if backend is None else backend
    if backend != 'auto':  # 'auto' is always valid; it resolves (and warns of a missing kernel) per call and device
        ops_dscn.resolve_backend(backend)  # unknown name: ValueError; 'cpp' without the compiled op: RuntimeError
    return backend


# --------------------------------------------------------------------------------------------------------
# Inference fusion: folding the BatchNorms and layer scales into the 1x1 / patch convolutions (see
# `Block.reparameterize`). The folded weights are computed in float64 and cast back to the parameters' dtype.


def _require_eval(module: nn.Module, what: str) -> None:
    """Raise if `module` or any submodule is in training mode (a BatchNorm would use batch statistics).

    Raises:
        RuntimeError: Some module is in training mode.
    """
    training = [name or type(module).__name__ for name, m in module.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f'{what}.reparameterize() folds the BatchNorm running statistics into the convolutions and is for '
            f'inference only: call .eval() on the model first (in training mode: {", ".join(training[:3])}'
            + (f' and {len(training) - 3} more)' if len(training) > 3 else ')'))


def _bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as a per-channel affine map, bn(x) = scale * x + shift.

    Args:
        bn: `nn.BatchNorm2d` or `nn.SyncBatchNorm` with running statistics.

    Returns:
        (scale, shift), each (C,) float64 on the BatchNorm's device.

    Raises:
        TypeError: `bn` is not a BatchNorm (another `norm_layer` cannot be folded).
        ValueError: The BatchNorm keeps no running statistics (it normalises with batch statistics in eval too).
    """
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        raise TypeError(f'Only BatchNorm2d / SyncBatchNorm can be folded into a convolution, got {type(bn).__name__}.')
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError('A BatchNorm without running statistics (track_running_stats=False) cannot be folded.')
    # Detached: what is folded from them (e.g. `DSA.shortcut_scale`, a buffer) must not hold an autograd graph.
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


@torch.no_grad()
def _set_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Overwrite the weight and bias of `conv` in place (same Parameter objects; a bias is added if it had none)."""
    conv.weight.copy_(weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias)


def _conv_bias(conv: nn.Conv2d) -> torch.Tensor:
    """The (C_out,) float64 bias of `conv` (zeros when it has none)."""
    if conv.bias is None:
        return torch.zeros(conv.out_channels, dtype=torch.float64, device=conv.weight.device)
    return conv.bias.double()


@torch.no_grad()
def _inductor_freezes() -> bool:
    """Whether inductor freezes the weights of the graphs it compiles (`torch._inductor.config.freezing`)."""
    config = sys.modules.get('torch._inductor.config')
    return bool(config is not None and config.freezing)


def _fold_affine_after_conv(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make `conv(x)` compute `scale * conv(x) + shift` (per output channel).

    Args:
        conv: Any convolution; changed in place.
        scale: (C_out,) per-channel factor.
        shift: (C_out,) per-channel offset.
    """
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    _set_conv(conv, weight, _conv_bias(conv) * scale + shift)


@torch.no_grad()
def _fold_affine_before_conv(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make `conv(x)` compute `conv(scale * x + shift)` (per input channel).

    Exact only for a dense 1x1 convolution without padding (a padded border would see `shift`, not 0), which is
    checked.

    Args:
        conv: Dense 1x1 convolution; changed in place.
        scale: (C_in,) per-channel factor.
        shift: (C_in,) per-channel offset.

    Raises:
        ValueError: `conv` is not a dense, unpadded 1x1 convolution.
    """
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.padding not in ((0, 0), 'valid'):
        raise ValueError(f'Cannot fold an affine map into the input of {conv}: needs a dense 1x1 conv, no padding.')
    weight = conv.weight.double()  # (C_out, C_in, 1, 1)
    bias = _conv_bias(conv) + weight[:, :, 0, 0] @ shift
    _set_conv(conv, weight * scale.view(1, -1, 1, 1), bias)


def _scaled_bias(conv: nn.Conv2d, scale: torch.Tensor) -> torch.Tensor | None:
    """``scale * conv.bias`` (None without a bias), the bias of ``scale * conv(x)``."""
    return None if conv.bias is None else conv.bias * scale


@register_notrace_function  # a call in torch.fx graphs (it reads the rank); fx wraps no `_` name
def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _channel_norm(factory: Callable[[int], nn.LayerNorm], dim: int) -> LayerNorm2d:
    """The LayerNorm that `factory` (the original's `norm_layer`, e.g. ``partial(nn.LayerNorm, eps=1e-6)``) builds,
    as a norm over the channels of NCHW maps with the same epsilon and parameters."""
    ln = factory(dim)
    return LayerNorm2d(dim, eps=ln.eps, affine=ln.elementwise_affine, bias=ln.bias is not None)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU: ``ops_dscn.gelu`` for CPU float32, ``F.gelu`` elsewhere (the same function to float rounding).

    ATen's float GELU and its backward are compute-bound on CPU; the op's vectorized forms ran 2.2-3x and 1.4-1.9x as
    fast on DSAN-T's training shapes (b16, 2 threads), about 1 % of a training step. float64 keeps ATen's (the
    reference numbers); torch.jit tracing (FLOP counters, ONNX) sees ``F.gelu``. Under torch.compile the op stays where
    a gradient flows through the GELU: inductor's own GELU kernels (its vectorized erf, the backward fused with the
    gradient sums around it) made a compiled DSAN-T training step 2.5-3.5 % slower (b16, 2 threads, seven pairs of
    processes; an earlier machine showed no difference). Without a gradient (inference) ``F.gelu`` is left to
    inductor, which with freezing fuses it into the convolution before it.
    """
    if x.dtype == torch.float32 and ops_dscn.gelu_available(x) and not ops_dscn.recording_aten() and (
            not torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad)):
        return ops_dscn.gelu(x)
    return F.gelu(x)


class PointwiseConv2d(ops_dscn.KeepsPackedWeights, nn.Conv2d):
    """1x1 ``nn.Conv2d`` (same parameters, names and results) that runs single-image inference as a matrix product.

    On one channels_last image oneDNN's 1x1 convolution spends much of its time outside the arithmetic: a plain
    ``F.linear`` on the NHWC view was 1.3-2.5x as fast for DSAN-T's attention convs at batch 1, but as fast or
    slower from batch 4 on (2 threads); DSAN-T's batch-1 forward gained about 5 %. Used for CPU float32 inference
    of single images only (no gradient needed); the result equals the convolution's to float rounding.

    `epilogue` runs the conv with the elementwise operation after it (GELU, a gate product, a scaled residual sum)
    as one operator, `ops_dscn.pointwise_conv`, in CPU float32 inference (``fused_epilogue``, default True); under
    torch.compile, without a packed weight (`pack_weight`), for batches up to ``compile_max_batch`` only.
    """

    fused_epilogue = True
    # Largest batch for which the kernel runs inside torch.compile when it has no packed weight. Beyond it the layers
    # are left to inductor, whose frozen graph runs them as prepacked oneDNN convolutions with the GELU / product /
    # sum fused as post-ops: paired compiled DSAN-T forwards (2 threads, 6-8 interleaved rounds) gave the layers 1.07x
    # at batch 16 and 1.08x at batch 32, the kernel 1.09x at batch 8 and 1.05x at batch 1. With the weight packed
    # (a reparameterized model) the kernel runs at every batch: 1.01-1.02x the layers at batch 16 and 1.04-1.10x at
    # batch 32 (the whole compiled forward, 5 interleaved rounds).
    compile_max_batch = 8

    def __init__(self, *args: Any, **kwargs: Any):
        """Arguments as `nn.Conv2d`'s."""
        super().__init__(*args, **kwargs)
        # The weight packed for the kernel's product (`pack_weight`), or None; not in the state_dict.
        self.register_buffer('packed_weight', None, persistent=False)

    def pack_weight(self) -> None:
        """Keep the weight packed for `ops_dscn.pointwise_conv` (``ops_dscn.pack_weight``), for inference.

        The kernel then reads it instead of packing the weight (or leaving the product to the BLAS, which repacks
        it) on every call: 1.1-1.5x faster for DSAN-T's attention convs at batch 1 and 1.2-1.35x at batch 32 (2
        threads, AVX-512). Called by `Block.reparameterize`. See `ops_dscn.kept_packed_weight` for when the packed
        copy is used and refreshed.
        """
        ops_dscn.keep_packed_weight(self, 'packed_weight', self.weight)

    def _use_epilogue_kernel(self, x: torch.Tensor, *operands: torch.Tensor | None, packed: bool = False) -> bool:
        # float64 keeps the layer-by-layer path (the reference model's numbers); no kernel under gradients (its
        # backward recomputes the product, slower than autograd's saved tensors), torch.jit tracing (FLOP counters
        # and ONNX export must see the aten operators) or autocast (the layers give autocast's dtypes).
        if not (self.fused_epilogue and x.dtype == torch.float32 and x.dim() == 4 and self.groups == 1
                and ops_dscn.pointwise_conv_available(x)) or ops_dscn.recording_aten():
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        # A symbolic batch (dynamic shapes) counts as a large one: a guard on it would tie the compiled or exported
        # program to one side of compile_max_batch.
        if (torch.compiler.is_compiling() and not packed
                and not known_true(x.shape[0] <= self.compile_max_batch)):
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or any(
            t is not None and t.requires_grad for t in operands)))

    def epilogue(
            self,
            x: torch.Tensor,
            gelu: bool = False,
            gate: torch.Tensor | None = None,
            residual: torch.Tensor | None = None,
            residual_scale: torch.Tensor | None = None,
            weights: tuple[torch.Tensor, torch.Tensor] | None = None,
            packed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``gelu?(conv(x)) * gate + residual * residual_scale``, fused where it applies.

        Args:
            x: (N, C_in, H, W); channels_last memory avoids a copy.
            gelu: Apply the exact GELU to the conv's output.
            gate: (N, C_out, H, W) multiplying the (activated) output, or None.
            residual: (N, C_out, H, W) added last, or None.
            residual_scale: (C_out, 1, 1) multiplying `residual`, or None (1).
            weights: (weight (C_out, C_in, 1, 1), bias (C_out,)) used in place of the module's, or None.
            packed: ``ops_dscn.pack_weight`` of the weight used (`weights`' or the module's), or None: without
                `weights`, the kept `packed_weight` then, if any.

        Returns:
            (N, C_out, H, W).
        """
        weight, bias = (self.weight, self.bias) if weights is None else weights
        if weights is None and packed is None:
            packed = ops_dscn.kept_packed_weight(self, 'packed_weight', self.weight, x)
        if self._use_epilogue_kernel(x, gate, residual, residual_scale, packed=packed is not None):
            return ops_dscn.pointwise_conv(x, weight, bias, gelu, gate, residual, residual_scale, packed=packed)
        y = self(x) if weights is None else F.conv2d(x, weight, bias)
        if gelu:
            y = _gelu(y)
        if gate is not None:
            y = gate * y
        if residual is None:
            return y
        return y + residual if residual_scale is None else torch.addcmul(y, residual, residual_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W)."""
        if (x.dtype == torch.float32 and x.device.type == 'cpu' and x.dim() == 4
                and known_true(x.shape[0] == 1) and x.is_contiguous(memory_format=torch.channels_last)
                and self.groups == 1 and not ops_dscn.recording_aten()  # tracers see the conv
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            w = self.weight.view(self.out_channels, self.in_channels)
            return F.linear(x.permute(0, 2, 3, 1), w, self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


class DWConv(nn.Module):
    """Depthwise 3x3 convolution of the MLP (kept as a module for the original `mlp.dwconv.dwconv` names)."""

    def __init__(self, dim: int):
        """
        Args:
            dim: Number of channels.
        """
        super().__init__()
        self.dwconv = DepthwiseConv2d(dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        return self.dwconv(x)


class Mlp(ops_dscn.KeepsPackedWeights, nn.Module):
    """Convolutional MLP: 1x1 conv, depthwise 3x3 conv, GELU, 1x1 conv.

    On CPU in float32 (exact GELU, no active dropout) the four layers run as one fused operator,
    `ops_dscn.conv_mlp`, which keeps the wide hidden tensor in cache; it computes the same function to float
    rounding. In training its backward recomputes the hidden tensor from the input, so autograd keeps only that
    (not the three hidden tensors of the unfused layers). ``fused_kernel=False`` (``fused_mlp=False`` on the
    model) always runs the layers one by one.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int | None = None,
            out_features: int | None = None,
            act_layer: type[nn.Module] = nn.GELU,
            drop: float = 0.,
            fused_kernel: bool = True,
    ):
        """
        Args:
            in_features: Input channels.
            hidden_features: Hidden channels (defaults to `in_features`).
            out_features: Output channels (defaults to `in_features`).
            act_layer: Activation layer.
            drop: Dropout rate after the activation and after `fc2`.
            fused_kernel: Run `ops_dscn.conv_mlp` where it applies (see the class docstring).
        """
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.drop = nn.Dropout(drop)
        self.fused_kernel = fused_kernel
        # fc1's and fc2's weights packed for the fused kernel (`pack_weights`), or None; not in the state_dict.
        self.register_buffer('fc1_packed', None, persistent=False)
        self.register_buffer('fc2_packed', None, persistent=False)

    def pack_weights(self) -> None:
        """Keep fc1's and fc2's weights packed for `ops_dscn.conv_mlp` (``ops_dscn.pack_weight``), for inference.

        The kernel otherwise copies them on every call, or (below 1024 pixels a call, where that copy did not pay)
        leaves its products to the BLAS, which repacks them: with the packed weights the MLP ran 1.2-1.35x as fast
        on DSAN-T's 28x28, 14x14 and 7x7 maps at batch 1 (2 threads, AVX-512). Called by `Block.reparameterize`.
        See `ops_dscn.kept_packed_weight` for when the packed copies are used and refreshed.
        """
        ops_dscn.keep_packed_weight(self, 'fc1_packed', self.fc1.weight)
        ops_dscn.keep_packed_weight(self, 'fc2_packed', self.fc2.weight)

    # Least H * W at which the fused kernel runs when gradients are needed. It works image by image, and on small
    # maps (DSAN-T stages 3-4 at 224: 14x14, 7x7) its matrix products are too small: there the layers were 1.0-1.25x
    # as fast, at 28x28 and 56x56 the fused forward+backward 1.3-2.7x (`python ops_dscn/benchmark.py --fused --train
    # --batch 16 --threads 2`).
    fused_train_min_pixels = 28 * 28

    def _use_fused_kernel(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        # float64 keeps the layer-by-layer path, so double-precision results stay those of the reference model.
        # Not while torch.jit traces: tracers (FLOP counters, ONNX export) must see the layers' aten operators.
        if (not self.fused_kernel or x.dtype != torch.float32 or not ops_dscn.conv_mlp_available(x)
                or ops_dscn.recording_aten()):
            return False
        if type(self.act) is not nn.GELU or self.act.approximate != 'none' or (self.training and self.drop.p > 0):
            return False
        # The grad mode first, and a symbolic map size (dynamic shapes) counts as a small one: without gradients the
        # kernel runs at every size, so a guard on the size would only tie a compiled or exported program to it.
        if not torch.is_grad_enabled() or known_true(
                x.shape[2] * x.shape[3] >= self.fused_train_min_pixels):
            return True
        return not (x.requires_grad or any(p.requires_grad for p in self.parameters())
                    or (residual is not None and residual.requires_grad))

    def forward(
            self,
            x: torch.Tensor,
            residual: torch.Tensor | None = None,
            weights: tuple[torch.Tensor, ...] | None = None,
            packed: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """(N, C, H, W) -> (N, C_out, H, W), plus `residual` (N, C_out, H, W) when given.

        `weights`: (fc1 weight, fc1 bias, fc2 weight, fc2 bias) used in place of the layers' (see `Block`), or None;
        `packed`: ``ops_dscn.pack_weight`` of those fc1 and fc2 weights, or None (only read with `weights`).
        """
        fc1_w, fc1_b, fc2_w, fc2_b = (
            (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias) if weights is None else weights)
        if self._use_fused_kernel(x, residual):
            dw = self.dwconv.dwconv
            p1, p2 = packed if weights is not None and packed is not None else (None, None)
            if weights is None:
                p1 = ops_dscn.kept_packed_weight(self, 'fc1_packed', self.fc1.weight, x)
                p2 = ops_dscn.kept_packed_weight(self, 'fc2_packed', self.fc2.weight, x)
            if p1 is None or p2 is None:
                p1 = p2 = None
            return ops_dscn.conv_mlp(x, fc1_w, fc1_b, dw.weight, dw.bias, fc2_w, fc2_b, residual, backend='cpp',
                                     fc1_packed=p1, fc2_packed=p2)
        x = self.fc1(x) if weights is None else F.conv2d(x, fc1_w, fc1_b)
        x = self.dwconv(x)
        x = self.drop(_gelu(x) if type(self.act) is nn.GELU and self.act.approximate == 'none' else self.act(x))
        x = self.drop(self.fc2(x) if weights is None else F.conv2d(x, fc2_w, fc2_b))
        return x if residual is None else x + residual


class DSCNPair(nn.Module):
    """Spatial gating unit: depthwise 5x5 conv, x-strip DSCN, y-strip DSCN, 1x1 conv, gate the input."""

    def __init__(self, dim: int, kernel_size: int, dw_kernel_size: int, group: int, backend: str = 'auto'):
        """
        Args:
            dim: Number of channels.
            kernel_size: Taps of each DSCN strip (odd); padding is 'same', stride and dilation are 1.
            dw_kernel_size: Kernel of the depthwise strip conv in each offset branch.
            group: DSCN groups (offset groups sharing one set of tap offsets).
            backend: DSCN operator backend: 'auto', 'cpp' or 'pytorch'.
        """
        super().__init__()
        pad = (kernel_size - 1) // 2
        self.conv0 = DepthwiseConv2d(dim, kernel_size=5, padding=2)
        self.dscn_x = DSCNX(
            dim, kernel_size, dw_kernel_size, stride=1, pad=pad, dilation=1, group=group, backend=backend)
        self.dscn_y = DSCNY(
            dim, kernel_size, dw_kernel_size, stride=1, pad=pad, dilation=1, group=group, backend=backend)
        self.conv = PointwiseConv2d(dim, dim, 1)

    def forward(
            self,
            x: torch.Tensor,
            packed: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W).

        Args:
            x: (N, C, H, W).
            packed: ``ops_dscn.pack_weight`` of `conv`'s weight and of `dscn_x`'s input projection weight, used in
                place of their kept copies (CPU float32 inference; see `Block`), or None.
        """
        p_conv, p_proj = (None, None) if packed is None else packed
        u = x
        x = self.conv0(x)
        # (N, C, H, W) -> (N, H, W, C); free when x is channels_last. Both offset branches read conv0's output.
        attn = self.dscn_x(x.permute(0, 2, 3, 1), x, input_proj_packed=p_proj)
        attn = self.dscn_y(attn, x)
        # (N, H, W, C) -> (N, C, H, W); conv(.) * u
        return self.conv.epilogue(attn.permute(0, 3, 1, 2), gate=u, packed=p_conv)


class DSA(nn.Module):
    """Deformable spatial attention: 1x1 conv, GELU, DSCNPair gating, 1x1 conv, inner residual."""

    def __init__(self, dim: int, kernel_size: int, dw_kernel_size: int, group: int, backend: str = 'auto'):
        """
        Args:
            dim: Number of channels.
            kernel_size: Taps of each DSCN strip.
            dw_kernel_size: Kernel of the depthwise strip conv in each offset branch.
            group: DSCN groups.
            backend: DSCN operator backend.
        """
        super().__init__()
        self.proj_1 = PointwiseConv2d(dim, dim, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = DSCNPair(dim, kernel_size, dw_kernel_size, group, backend=backend)
        self.proj_2 = PointwiseConv2d(dim, dim, 1)
        # (C, 1, 1) factor of the inner shortcut, set by `Block.reparameterize`; None (not in the state_dict): 1.
        self.register_buffer('shortcut_scale', None)

    def forward(
            self,
            x: torch.Tensor,
            add_input: bool = False,
            weights: tuple[torch.Tensor, ...] | None = None,
            packed: tuple[torch.Tensor | None, ...] | None = None,
    ) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W).

        Args:
            x: (N, C, H, W).
            add_input: Add `x` once more (a reparameterized block's residual, whose norm1 is folded away): it joins
                the inner shortcut as one scaled sum in the last conv's output pass.
            weights: (proj_1 weight, proj_1 bias, proj_2 weight, proj_2 bias, shortcut_scale) used in place of the
                module's (see `Block`), or None.
            packed: ``ops_dscn.pack_weight`` of the proj_1 and proj_2 weights in `weights`, then of the spatial
                gating unit's `conv` and `dscn_x.input_proj` weights (see `DSCNPair`), or None.
        """
        p1, p2, *p_sgu = (None, None) if packed is None else packed
        if weights is None:
            w1 = w2 = None
            scale = self.shortcut_scale
        else:
            w1, w2, scale = weights[:2], weights[2:4], weights[4]
        shortcut = x
        if add_input:
            scale = x.new_full((x.shape[1], 1, 1), 2.) if scale is None else scale + 1.
        if type(self.activation) is nn.GELU and self.activation.approximate == 'none':
            x = self.proj_1.epilogue(x, gelu=True, weights=w1, packed=p1)  # the GELU joins the conv's output pass
        else:
            x = self.activation(self.proj_1(x) if w1 is None else F.conv2d(x, *w1))
        x = self.spatial_gating_unit(x, packed=tuple(p_sgu) or None)
        return self.proj_2.epilogue(x, residual=shortcut, residual_scale=scale, weights=w2, packed=p2)


# Leaves for torch.fx (timm's feature_cls='fx', create_feature_extractor): their forwards choose kernels by the
# input's device, dtype, layout and size, which a symbolic trace cannot branch on.
@register_notrace_module
class Block(nn.Module):
    """DSAN block: BN -> DSA and BN -> Mlp, each with layer scale, drop path and a residual.

    `reparameterize` folds the BNs and layer scales into the 1x1 convolutions for inference.
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int,
            dw_kernel_size: int,
            group: int,
            mlp_ratio: float = 4.,
            drop: float = 0.,
            drop_path: float = 0.,
            layer_scale_init_value: float = 1e-2,
            act_layer: type[nn.Module] = nn.GELU,
            backend: str = 'auto',
            norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
            fused_mlp: bool = True,
    ):
        """
        Args:
            dim: Number of channels.
            kernel_size: Taps of each DSCN strip.
            dw_kernel_size: Kernel of the depthwise strip conv in each offset branch.
            group: DSCN groups.
            mlp_ratio: MLP hidden channels / `dim`.
            drop: Dropout rate inside the MLP.
            drop_path: Stochastic depth rate of both residual branches.
            layer_scale_init_value: Initial value of `layer_scale_1` and `layer_scale_2`.
            act_layer: MLP activation layer.
            backend: DSCN operator backend.
            norm_layer: Builds `norm1` / `norm2` from the channel count (BatchNorm2d; SyncBN in mm runs).
            fused_mlp: Let the MLP run as the fused CPU kernel where it applies (see `Mlp`).
        """
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = DSA(dim, kernel_size, dw_kernel_size, group, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, fused_kernel=fused_mlp)
        self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.fused = False  # set by `reparameterize`

    # Eval-mode CPU float32 inference of a block that is not reparameterized computes what `reparameterize` would
    # make of it: the BatchNorms and layer scales folded into the 1x1 convs. That saves the norms' and the layer
    # scales' passes over the feature maps and lets the residual adds join the kernels' output passes. The result
    # equals the layer-by-layer one to float rounding; False: always the layers. In eager mode the folded weights and
    # their packed copies (`ops_dscn.pack_weight`) are kept between calls and made again when any tensor they come
    # from has changed (replaced, or its memory or version counter: in-place updates, `load_state_dict`, `.to()`,
    # EMA steps), after any torch.optim step (fused steps bump no version counter) and after `train()` / `eval()`,
    # so that a change no version counter sees (through `.data`, to inference tensors) counts from the next
    # `eval()`. Under torch.compile they are made in the graph (constants with freezing), never kept.
    fold_in_inference = True

    def _use_folded_inference(self, x: torch.Tensor) -> bool:
        if not self.fold_in_inference or self.training or x.dtype != torch.float32 or x.device.type != 'cpu':
            return False
        if ops_dscn.recording_aten() or (torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            return False  # tracers (FLOP counts) must see the norms; gradients must reach the block's parameters
        return all(isinstance(n, (nn.BatchNorm2d, nn.SyncBatchNorm)) and n.running_mean is not None
                   and n.running_var is not None for n in (self.norm1, self.norm2))

    def _folded_sources(self) -> tuple[list[torch.Tensor | None], tuple[Any, ...]]:
        """The tensors the folded weights are made from, and their state: memory, device and version (the norms'
        eps too)."""
        sgu = self.attn.spatial_gating_unit
        tensors = [self.layer_scale_1, self.layer_scale_2, sgu.conv.weight, sgu.dscn_x.input_proj.weight]
        for m in (self.norm1, self.norm2, self.attn.proj_1, self.attn.proj_2, self.mlp.fc1, self.mlp.fc2):
            tensors += [m.weight, m.bias]
            if m is self.norm1 or m is self.norm2:
                tensors += [m.running_mean, m.running_var]
        state = tuple(None if t is None else (t.data_ptr(), t.device, None if t.is_inference() else t._version)
                      for t in tensors)
        # Fused optimizer steps change weights without a version bump: the step count covers them.
        return tensors, state + (self.norm1.eps, self.norm2.eps, ops_dscn.optimizer_step_count())

    def _packed(self, attn_w: tuple[torch.Tensor, ...], mlp_w: tuple[torch.Tensor, ...]) -> tuple[tuple[Any, ...], ...]:
        """The weights packed for the kernels, None where packing does not apply: DSA's (the folded proj_1 and
        proj_2, the spatial gating unit's conv and DSCNX input projection, which `reparameterize` packs too) and the
        folded (fc1, fc2)."""
        sgu = self.attn.spatial_gating_unit
        packs = [ops_dscn.pack_weight(w) if ops_dscn.pack_weight_available(w) else None
                 for w in (attn_w[0], attn_w[2], sgu.conv.weight, sgu.dscn_x.input_proj.weight, mlp_w[0], mlp_w[2])]
        return tuple(packs[:4]), tuple(packs[4:])

    def _inference_weights(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], Any, Any]:
        """`_folded_weights` and the weights packed for the kernels (`_packed`), kept between eager calls (see
        `fold_in_inference`)."""
        if torch.compiler.is_compiling():
            attn_w, mlp_w = self._folded_weights()
            # With inductor's freezing the folded weights are constants and so are their packed copies, folded at
            # compile time: DSAN-T at batch 1 ran 1.16x as fast with them, and at batch 32 1.10x as fast as with the
            # 1x1 convs left to inductor (as a reparameterized model runs). Without freezing the packing would run on
            # every call (0.94x at batch 1), and above `compile_max_batch` images the 1x1 convs stay with inductor.
            if _inductor_freezes():
                return attn_w, mlp_w, *self._packed(attn_w, mlp_w)
            return attn_w, mlp_w, None, None
        tensors, state = self._folded_sources()
        kept = self.__dict__.get('_kept_inference_weights')
        # The kept tensors themselves are compared (not only their addresses, which a new tensor may reuse).
        if kept is None or kept[1] != state or any(a is not b for a, b in zip(kept[0], tensors)):
            with torch.no_grad():
                attn_w, mlp_w = self._folded_weights()
                kept = (tensors, state, attn_w, mlp_w, *self._packed(attn_w, mlp_w))
            self.__dict__['_kept_inference_weights'] = kept  # not a buffer: not moved, saved or copied
        return kept[2:]

    def train(self, mode: bool = True) -> 'Block':
        """As `nn.Module.train`; also drops the kept inference weights (see `fold_in_inference`)."""
        self.__dict__.pop('_kept_inference_weights', None)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # .to() / .double() / .cuda() / .half() replace the tensors the kept weights come from. Drop the old copies
        # now: a module converted for float64, another device or autocast may never run the folded path again, and
        # would otherwise hold float32 CPU copies of its weights (115 MiB for dsan_s).
        self.__dict__.pop('_kept_inference_weights', None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy and pickling leave out the kept inference weights: a copy makes its own on its first call.
        state = self.__dict__.copy()
        state.pop('_kept_inference_weights', None)
        return state

    def _folded_weights(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The weights `reparameterize` would give (float32 arithmetic): DSA's and the Mlp's `weights` arguments."""
        def scale_shift(bn):
            a = torch.rsqrt(bn.running_var + bn.eps)
            a = a if bn.weight is None else a * bn.weight
            b = -bn.running_mean * a
            return a, (b if bn.bias is None else b + bn.bias)

        def before(conv, a, b):  # conv(a * x + b)
            w = conv.weight * a.view(1, -1, 1, 1)
            shift = conv.weight.flatten(1) @ b
            return w, (shift if conv.bias is None else conv.bias + shift)

        def after(conv, s, shift):  # s * conv(x) + shift
            return conv.weight * s.view(-1, 1, 1, 1), (shift if conv.bias is None else s * conv.bias + shift)

        (a1, b1), (a2, b2) = scale_shift(self.norm1), scale_shift(self.norm2)
        s1, s2 = self.layer_scale_1, self.layer_scale_2
        attn, mlp = self.attn, self.mlp
        return ((*before(attn.proj_1, a1, b1), *after(attn.proj_2, s1, s1 * b1), (s1 * a1).view(-1, 1, 1)),
                (*before(mlp.fc1, a2, b2), *after(mlp.fc2, s2, torch.zeros_like(s2))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.fused:  # norm1 and layer_scale_1 live in attn, norm2 and layer_scale_2 in mlp
            if isinstance(self.drop_path, nn.Identity) or not self.training:
                # the residual adds join the output passes of the attention's last conv and of the MLP kernel
                x = self.attn(x, add_input=True)
                return self.mlp(x, residual=x)
            x = x + self.drop_path(self.attn(x))
            return x + self.drop_path(self.mlp(x))
        if self._use_folded_inference(x):
            attn_weights, mlp_weights, attn_packed, mlp_packed = self._inference_weights()
            x = self.attn(x, add_input=True, weights=attn_weights, packed=attn_packed)
            return self.mlp(x, residual=x, weights=mlp_weights, packed=mlp_packed)
        if self.training and not ops_dscn.recording_aten():
            return self._forward_train(x)
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))
        return x

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward: the layer-by-layer block with each layer scale folded into the conv before it.

        ``ls * (conv(s) + shortcut) = conv(s; ls * W, ls * b) + ls * shortcut``: autograd then differentiates a
        product of small weight tensors, not a pass over the feature map (forward, backward and the layer scale's
        gradient reduction), and without drop path the MLP's residual joins its kernel's output pass. The same
        function as the plain form to float rounding; 5-10 % of a DSAN-T training step went on those passes.
        """
        attn, mlp = self.attn, self.mlp
        s1, s2 = self.layer_scale_1, self.layer_scale_2
        attn_weights = (attn.proj_1.weight, attn.proj_1.bias, attn.proj_2.weight * s1.view(-1, 1, 1, 1),
                        _scaled_bias(attn.proj_2, s1), s1.view(-1, 1, 1))  # the last: the inner shortcut's scale
        mlp_weights = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight * s2.view(-1, 1, 1, 1), _scaled_bias(mlp.fc2, s2))
        x = x + self.drop_path(attn(self.norm1(x), weights=attn_weights))
        if isinstance(self.drop_path, nn.Identity):
            return mlp(self.norm2(x), residual=x, weights=mlp_weights)
        return x + self.drop_path(mlp(self.norm2(x), weights=mlp_weights))

    def reparameterize(self) -> None:
        """Fold the BatchNorms and layer scales into the block's 1x1 convolutions, in place, for inference.

        With norm1(x) = a1 * x + b1, norm2(x) = a2 * x + b2 (running statistics) and the layer scales s1, s2,
        all per channel, the attention branch s1 * (proj_2(z) + norm1(x)), z = sgu(gelu(proj_1(norm1(x)))),
        becomes proj_2'(z) + (s1 * a1) * x with proj_1' = proj_1(a1 * . + b1), proj_2' = s1 * proj_2 + s1 * b1
        and `attn.shortcut_scale` = s1 * a1 (DSA's inner shortcut adds the *normalised* input); the MLP branch
        s2 * fc2(...(fc1(norm2(x)))) becomes fc2'(...(fc1'(x))) with fc1' = fc1(a2 * . + b2), fc2' = s2 * fc2.
        `norm1` and `norm2` become `nn.Identity`, the layer scales None, and `forward` takes the fused path (drop
        path still wraps each branch). The result equals the eval-mode output up to float rounding. Called on
        every block by `DSAN.reparameterize` and by `timm.utils.reparameterize_model`; a second call does nothing.
        The five folded 1x1 weights and the DSCNX input projection's weight are also kept packed for the CPU
        kernels (`Mlp.pack_weights`, `PointwiseConv2d.pack_weight`, `DSCNX.pack_weights`; non-persistent buffers,
        so the state_dict is unchanged).

        Raises:
            RuntimeError: The block is in training mode (the BatchNorms would use batch statistics).
            TypeError: The norms are not BatchNorms.
        """
        if self.fused:
            return
        _require_eval(self, type(self).__name__)
        a1, b1 = _bn_scale_shift(self.norm1)
        a2, b2 = _bn_scale_shift(self.norm2)
        s1, s2 = self.layer_scale_1.detach().double(), self.layer_scale_2.detach().double()
        _fold_affine_before_conv(self.attn.proj_1, a1, b1)
        _fold_affine_after_conv(self.attn.proj_2, s1, s1 * b1)
        self.attn.shortcut_scale = (s1 * a1).view(-1, 1, 1).to(self.attn.proj_2.weight)
        _fold_affine_before_conv(self.mlp.fc1, a2, b2)
        _fold_affine_after_conv(self.mlp.fc2, s2, torch.zeros_like(s2))
        # The folded 1x1 weights packed once for the CPU kernels' products (inference; not in the state_dict).
        for conv in (self.attn.proj_1, self.attn.spatial_gating_unit.conv, self.attn.proj_2):
            if isinstance(conv, PointwiseConv2d):
                conv.pack_weight()
        self.attn.spatial_gating_unit.dscn_x.pack_weights()
        if isinstance(self.mlp, Mlp):
            self.mlp.pack_weights()
        self.norm1 = nn.Identity().eval()  # in the model's (eval) mode, as what it replaces
        self.norm2 = nn.Identity().eval()
        self.layer_scale_1 = None
        self.layer_scale_2 = None
        self.fused = True


@register_notrace_module
class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: strided conv + BatchNorm."""

    def __init__(
            self,
            patch_size: int = 7,
            stride: int = 4,
            in_chans: int = 3,
            embed_dim: int = 768,
            norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        """
        Args:
            patch_size: Conv kernel size (padding is `patch_size // 2`).
            stride: Conv stride (the downsampling factor).
            in_chans: Input channels.
            embed_dim: Output channels.
            norm_layer: Builds the norm from the channel count.
        """
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, embed_dim, H / stride, W / stride)."""
        return self.norm(self.proj(x))

    def reparameterize(self) -> None:
        """Fold the BatchNorm (running statistics) into `proj`, in place, and make `norm` an `nn.Identity`.

        For inference; a second call does nothing (see `Block.reparameterize`).

        Raises:
            RuntimeError: The module is in training mode.
            TypeError: `norm` is not a BatchNorm.
        """
        if isinstance(self.norm, nn.Identity):
            return
        _require_eval(self, type(self).__name__)
        _fold_affine_after_conv(self.proj, *_bn_scale_shift(self.norm))
        self.norm = nn.Identity().eval()


def check_strip_geometry(kernel_sizes: Sequence[int], pads: Sequence[int] | None, strides: Sequence[int] | None,
                         dilations: Sequence[int] | None, pads_name: str = 'paddings') -> None:
    """Check the original constructors' per-stage DSCN `pads`, `strides` and `dilations` (None: not given).

    Every DSAN uses 'same' padding (K - 1) / 2, stride 1 and dilation 1, which is all the model here builds; the
    original configs spell them out.

    Raises:
        ValueError: A value differs, naming the argument, the expected and the given values.
    """
    ks = list(kernel_sizes)
    for name, values, expected in ((pads_name, pads, [(k - 1) // 2 for k in ks]),
                                   ('strides', strides, [1] * len(ks)), ('dilations', dilations, [1] * len(ks))):
        if values is not None and list(values)[:len(ks)] != expected:
            raise ValueError(f"{name} must be {expected} for kernel_sizes {ks} (DSAN's DSCN layers use 'same' "
                             f'padding, stride 1 and dilation 1), got {list(values)}.')


class DSAN(nn.Module):
    """DSAN backbone with a linear classifier; the defaults build DSAN-T (`dsan_t`).

    Stage i (1..4) is `patch_embed{i}` -> `block{i}` (ModuleList of Block) -> `norm{i}` (LayerNorm over the
    channels of the NCHW map); the head averages the last stage and applies `head`.
    """

    # Inductor options for torch.compile, applied by `compile` and `dsan.compile.compile_model` (which the
    # classification tools use): layout optimization would lay out the DSCN ops' saved (N, H, W, C) activations as
    # if they were (N, C, H, W) and copy each of them twice around every call (see `dsan.compile`).
    inductor_options = {'layout_optimization': False}

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (32, 64, 160, 256),
            depths: Sequence[int] = (3, 3, 5, 2),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            kernel_sizes: Sequence[int] = (11, 11, 7, 5),
            dw_kernel_sizes: Sequence[int] = (11, 11, 7, 5),
            groups: Sequence[int] = (1, 4, 8, 8),
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            layer_scale_init_value: float = 1e-2,
            norm_eps: float = 1e-6,
            backend: str | None = None,
            core_op: str | None = None,
            channels_last: bool = True,
            norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
            fused_mlp: bool = True,
            img_size: int | None = None,
            pads: Sequence[int] | None = None,
            strides: Sequence[int] | None = None,
            dilations: Sequence[int] | None = None,
            num_stages: int | None = None,
            flag: bool = False,
    ):
        """
        Args:
            in_chans: Input image channels.
            num_classes: Classifier outputs (0 for no classifier).
            global_pool: 'avg' or '' (no pooling in `forward_head`).
            embed_dims: Channels of the four stages.
            depths: Blocks per stage.
            mlp_ratios: MLP expansion per stage.
            kernel_sizes: DSCN taps per stage (odd; 'same' padding (K - 1) / 2).
            dw_kernel_sizes: Depthwise strip conv kernel of the offset branches per stage.
            groups: DSCN groups per stage.
            drop_rate: Dropout rate inside the MLPs (as the original's `drop_rate`).
            drop_path_rate: Stochastic depth rate, linear from 0 over all blocks.
            layer_scale_init_value: Initial layer scale.
            norm_eps: Epsilon of the stage LayerNorms (1e-6 classification, 1e-5 in the mm backbones).
            backend: DSCN operator backend, one of `ops_dscn.BACKENDS`: 'auto' (the compiled op when it is built,
                else the pure-PyTorch one), 'cpp' (the compiled op; an error here if it is not built) or
                'pytorch'; None is 'auto'. The DSCN modules keep the name and resolve it at each call for the
                device of their input, so a model built on the CPU runs the right kernel after `.cuda()`.
            core_op: Deprecated alias of `backend`, an earlier name of it (FutureWarning): 'dscn' is
                backend='cpp', 'dscn_pytorch' backend='pytorch'; a ValueError if it disagrees with `backend`.
            channels_last: Convert the input to channels_last memory so every activation stays NHWC in memory.
            norm_layer: Builds every BatchNorm (patch embeddings, `norm1`/`norm2` of the blocks) from the
                channel count; the mm adapter passes SyncBN or BN built from its `norm_cfg`. A factory of
                LayerNorms is taken as the original's `norm_layer` (the stage norms; its variants pass
                `partial(nn.LayerNorm, eps=1e-6)`): the stage norms are built with it, and BatchNorm elsewhere.
            fused_mlp: On CPU in float32, training and inference, run each MLP as one fused operator
                (`ops_dscn.conv_mlp`: the hidden tensor stays in cache, and training keeps only the MLP's input
                for the backward; same results to float rounding). False runs its layers one by one everywhere.
            img_size, pads, strides, dilations, num_stages, flag: The original constructor's arguments, accepted
                so that code written for it builds the same model. `img_size` and `flag` change nothing (any input
                size works); `pads`, `strides` and `dilations` must be what every DSAN uses ('same' padding
                (K - 1) / 2, stride 1, dilation 1) and `num_stages` the length of the per-stage lists.
        """
        super().__init__()
        del img_size, flag  # the original's: the input size is free, and `flag` only skipped `self.num_classes`
        if num_stages is not None and num_stages != len(depths):
            raise ValueError(f'num_stages must be the number of per-stage entries ({len(depths)}), got {num_stages} '
                             '(fewer stages: timm features_only=True / out_indices, or dsan.mm.DSANBackbone).')
        num_stages = len(depths)
        check_strip_geometry(kernel_sizes, pads, strides, dilations, pads_name='pads')
        # The stage norms are LayerNorms over the channels of the NCHW maps (timm's LayerNorm2d: the same weights and
        # arithmetic as the original's nn.LayerNorm over tokens), so that a hook on `norm{i}` (timm's
        # feature_cls='hook', FeatureHooks, Grad-CAM) sees the stage's NCHW output.
        stage_norm = partial(LayerNorm2d, eps=norm_eps)
        # Exactly nn.LayerNorm (the original's): a subclass such as timm's LayerNorm2d is a norm over NCHW maps,
        # which may stand in for the BatchNorms.
        if type(norm_layer(embed_dims[0])) is nn.LayerNorm:
            stage_norm, norm_layer = partial(_channel_norm, norm_layer), nn.BatchNorm2d
        for name, seq in (('embed_dims', embed_dims), ('mlp_ratios', mlp_ratios), ('kernel_sizes', kernel_sizes),
                          ('dw_kernel_sizes', dw_kernel_sizes), ('groups', groups)):
            if len(seq) != num_stages:
                raise ValueError(f'{name} has {len(seq)} entries, expected {num_stages} (one per stage).')
        for k in kernel_sizes:
            if k % 2 == 0:
                raise ValueError(f'DSCN kernel sizes must be odd for same padding, got {list(kernel_sizes)}.')
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}.")
        backend = _backend_arg(backend, core_op)
        self.backend = backend
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.depths = list(depths)
        self.num_stages = num_stages
        self.embed_dims = list(embed_dims)
        self.kernel_sizes = list(kernel_sizes)
        self.groups = list(groups)
        self.channels_last = channels_last
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        self.feature_info = []

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth decay rule
        cur = 0
        for i in range(num_stages):
            patch_embed = OverlapPatchEmbed(
                patch_size=7 if i == 0 else 3,
                stride=4 if i == 0 else 2,
                in_chans=in_chans if i == 0 else embed_dims[i - 1],
                embed_dim=embed_dims[i],
                norm_layer=norm_layer,
            )
            block = nn.ModuleList([
                Block(
                    embed_dims[i], kernel_sizes[i], dw_kernel_sizes[i], groups[i],
                    mlp_ratio=mlp_ratios[i], drop=drop_rate, drop_path=dpr[cur + j],
                    layer_scale_init_value=layer_scale_init_value, backend=backend, norm_layer=norm_layer,
                    fused_mlp=fused_mlp,
                )
                for j in range(depths[i])])
            cur += depths[i]
            setattr(self, f'patch_embed{i + 1}', patch_embed)
            setattr(self, f'block{i + 1}', block)
            setattr(self, f'norm{i + 1}', stage_norm(embed_dims[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f'norm{i + 1}'))

        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        # torch keeps the module in the hook by weak reference (a bound method would keep every model alive after del).
        self.register_load_state_dict_pre_hook(DSAN._check_loaded_groups)

    def _check_loaded_groups(self, state_dict, prefix, *_) -> None:
        # Runs before any weight is copied, on every route (load_state_dict, timm's checkpoint_path=, mmengine's
        # load_checkpoint): a checkpoint of another DSCN grouping (the paper's DSAN-T row has [4, 8, 16, 16], the
        # code [1, 4, 8, 8]) gave 50 size mismatches that did not say why.
        offsets = {k[len(prefix):]: v for k, v in state_dict.items()
                   if k.startswith(prefix) and _OFFSET_KEY.match(k[len(prefix):]) and isinstance(v, torch.Tensor)}
        if not offsets:
            return
        try:
            theirs = infer_groups(offsets, self.kernel_sizes)
        except CheckpointError:
            return  # not this architecture: torch's own report names the mismatched keys
        if theirs != self.groups:
            raise CheckpointError(
                f'The checkpoint has DSCN groups {theirs} per stage, this model {self.groups}: build it with '
                f'groups={theirs} (timm.create_model(..., groups={theirs}), --model-kwargs groups=..., or '
                "model.backbone.groups in an mm config), or load the file through timm.create_model(..., "
                "pretrained=True, pretrained_cfg_overlay=dict(file=PATH)), dsan.models.load_checkpoint or "
                'validate.py --checkpoint, which read the groups from it.')

    def __prepare_scriptable__(self) -> 'DSAN':
        # torch.jit.script calls this first: one clear error instead of TorchScript's about an inner helper.
        raise RuntimeError('DSAN cannot be scripted with torch.jit.script: its layers choose kernels by the input\'s '
                           'device, dtype, layout and size at run time. Use torch.export, torch.compile or '
                           'torch.jit.trace (eval mode) instead.')

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Applied last over the whole model, as in the original: overrides the zero-init of the DSCN offsets.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`nn.Module.compile` (compiles this module's forward in place) with `inductor_options` merged into the
        inductor options; a ``mode`` is turned into its options (see `dsan.compile.compile_kwargs`)."""
        super().compile(*args, **compile_kwargs(self, **kwargs))

    def set_backend(self, backend: str | None = None, core_op: str | None = None) -> None:
        """Switch every DSCN module to another backend.

        Args:
            backend: 'auto', 'cpp' or 'pytorch' (see the constructor).
            core_op: Deprecated alias of `backend` ('dscn' or 'dscn_pytorch').

        Raises:
            TypeError: Neither argument given.
            ValueError: Unknown name, or `backend` and `core_op` disagree.
            RuntimeError: 'cpp' requested but the compiled op is not built.
        """
        if backend is None and core_op is None:
            raise TypeError(f'set_backend() needs backend=, one of {ops_dscn.BACKENDS}.')
        self.backend = _backend_arg(backend, core_op)
        for m in self.modules():
            if isinstance(m, (DSCNX, DSCNY)):
                m.backend = self.backend

    def reparameterize(self) -> None:
        """Fuse the model for inference, in place: every BatchNorm and layer scale goes into a convolution.

        Calls `OverlapPatchEmbed.reparameterize` and `Block.reparameterize` on every stage; the fused model
        computes the eval-mode output with no BatchNorm left and fewer parameters (the state_dict changes: no
        `norm1`/`norm2`/`layer_scale_*`/`patch_embed*.norm` entries, an `attn.shortcut_scale` buffer per block).
        `timm.utils.reparameterize_model(model)` does the same on a deep copy. A second call does nothing.

        Raises:
            RuntimeError: The model is in training mode (call `.eval()` first).
        """
        _require_eval(self, type(self).__name__)
        for m in self.modules():
            if isinstance(m, (OverlapPatchEmbed, Block)):
                m.reparameterize()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay.

        The original listed only names that do not exist in DSAN; 1-D parameters (biases, norms, layer
        scales) are excluded by timm's optimizer factory anyway, so this is empty.
        """
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regex groups of parameter names for layer-wise learning rate decay."""
        return dict(
            stem=r'^patch_embed1\.',
            blocks=r'^(?:patch_embed|block|norm)(\d+)' if coarse else [
                (r'^patch_embed(\d+)\.', (-1,)),
                (r'^block(\d+)\.(\d+)\.', None),
                (r'^norm(\d+)\.', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable activation checkpointing of every block."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """Return the classifier module."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one with `num_classes` outputs (0 removes it)."""
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}.")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)
        self.head.train(self.training)  # a new module is in training mode; the model's mode is what counts

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Run stage `i` (0-based): (N, C_in, H, W) -> (N, C_i, H / r_i, W / r_i), normalised."""
        x = getattr(self, f'patch_embed{i + 1}')(x)
        for blk in getattr(self, f'block{i + 1}'):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        # LayerNorm2d permutes (N, C, H, W) -> (N, H, W, C) -> (N, C, H, W): both views are free when x is
        # channels_last, and the result stays channels_last.
        return getattr(self, f'norm{i + 1}')(x)

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return to_channels_last(x) if self.channels_last else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C_4, H / 32, W / 32) normalised last-stage features."""
        x = self._prepare_input(x)
        for i in range(self.num_stages):
            x = self._stage(i, x)
        return x

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The original's `forward_backbone`: (N, 3, H, W) -> (N, H / 32 * W / 32, C_4), the normalised last-stage
        features as tokens. (The original's `forward_features` returned them pooled, (N, C_4); here it follows
        timm: the feature map, with `forward_head(x, pre_logits=True)` pooling it.)"""
        return self.forward_features(x).flatten(2).transpose(1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, C, h, w) -> (N, num_classes), or the pooled (N, C) features when `pre_logits`."""
        if self.global_pool == 'avg':
            x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward returning the normalised output of selected stages.

        Args:
            x: Input images (N, 3, H, W).
            indices: Take the last n stages if int, all if None, else the listed stage indices.
            norm: Unused: every stage output is already normalised by its `norm{i}`.
            stop_early: Stop after the last requested stage.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the list of intermediates.

        Returns:
            List of (N, C_i, H / 2^(i+2), W / 2^(i+2)) features, or (final features, that list).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"DSAN intermediates are only available as 'NCHW', got {output_fmt!r}.")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last = max_index if stop_early or intermediates_only else self.num_stages - 1
        x = self._prepare_input(x)
        intermediates = []
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Remove stages after the last requested intermediate (and the head); return the kept indices."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for name in (f'patch_embed{i + 1}', f'block{i + 1}', f'norm{i + 1}'):
                delattr(self, name)
        if max_index + 1 < self.num_stages:
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        self.num_stages = max_index + 1
        if prune_head or max_index + 1 < len(self.depths):
            self.reset_classifier(0, '')
        return take_indices




# --------------------------------------------------------------------------------------------------------
# Checkpoints: what knows the DSAN architecture (reading and checking files is in `_checkpoint`)


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Widths and depths of a DSAN state_dict, with the variant they match (for error messages)."""
    dims, depths = [], []
    for i in range(1, 5):
        w = state_dict.get(f'patch_embed{i}.proj.weight')
        if w is None:
            break
        dims.append(int(w.shape[0]))
        blocks = {int(k.split('.')[1]) for k in state_dict if k.startswith(f'block{i}.')}
        depths.append(max(blocks) + 1 if blocks else 0)
    if not dims:
        return 'no DSAN patch_embed weights'
    match = [name for name, args in _MODEL_ARGS.items()
             if list(args['embed_dims']) == dims and list(args['depths']) == depths]
    return f'embed_dims {dims}, depths {depths}' + (f' (looks like {match[0]})' if match else '')


_OFFSET_KEY = re.compile(r'^block(\d+)\.(\d+)\.attn\.spatial_gating_unit\.dscn_([xy])\.offset\.weight$')


def infer_groups(state_dict: Mapping[str, torch.Tensor], kernel_sizes: Sequence[int]) -> list[int]:
    """Read the DSCN groups of each stage from a state_dict (offset.weight rows = groups * K).

    Args:
        state_dict: Clean DSAN state_dict (see `extract_state_dict`).
        kernel_sizes: DSCN taps per stage of the architecture it is meant for.

    Returns:
        Groups per stage.

    Raises:
        CheckpointError: A stage has no offset weights, rows not divisible by K, or blocks disagree.
    """
    found: dict[int, set[int]] = {}
    for k, v in state_dict.items():
        m = _OFFSET_KEY.match(k)
        if m is None:
            continue
        stage = int(m.group(1)) - 1
        if stage >= len(kernel_sizes):
            raise CheckpointError(f'{k}: stage {stage + 1} does not exist in a {len(kernel_sizes)}-stage model.')
        ks = kernel_sizes[stage]
        if v.dim() != 2 or v.shape[0] % ks:
            raise CheckpointError(
                f'{k} has shape {tuple(v.shape)}: rows must be groups * kernel_size = groups * {ks}; '
                f'the checkpoint belongs to another architecture ({describe_state_dict(state_dict)}).')
        found.setdefault(stage, set()).add(v.shape[0] // ks)
    groups = []
    for stage in range(len(kernel_sizes)):
        g = found.get(stage)
        if not g:
            raise CheckpointError(
                f'No DSCN offset weights for stage {stage + 1} (block{stage + 1}.*.attn.spatial_gating_unit.'
                'dscn_x.offset.weight): not a DSAN checkpoint, or a different depth.')
        if len(g) > 1:
            raise CheckpointError(f'Stage {stage + 1} mixes DSCN groups {sorted(g)} across blocks.')
        groups.append(g.pop())
    return groups


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module, use_ema: bool = False,
                         strict: bool = True, source: str | None = None, require_head: bool | None = None) -> dict:
    """Turn any supported checkpoint format into a state_dict for `model` and check that it fits.

    Used by timm as `pretrained_filter_fn`. Unwraps `state_dict` / `model` (or the EMA weights when
    `use_ema`), strips wrapper prefixes, drops the classifier when `model` has none, restores missing
    BatchNorm `num_batches_tracked` counters, and raises with the list of missing, unexpected and
    mismatched-shape keys when the backbone weights do not fit. The classifier (absent from encoder files,
    another size for another `num_classes`) is left to the caller: timm drops it when `num_classes`
    differs from the pretrained config; `load_checkpoint` checks it.

    Args:
        state_dict: Checkpoint dict or state_dict.
        model: Target DSAN model.
        use_ema: Prefer the EMA weights of a training checkpoint.
        strict: False (timm's ``pretrained_strict=False``): what does not fit is logged as a warning, not raised,
            and the weights whose shape differs from the model's are left out (the model keeps its own).
        source: The file the checkpoint was read from, named in the errors.
        require_head: The caller loads the classifier strictly, so a checkpoint without one (an encoder file) is
            an error when `model` has a classifier. None: decide as timm's ``load_pretrained`` loads it, strictly
            when `strict` and the model's ``num_classes`` equals its pretrained config's.

    Returns:
        State_dict for `model.load_state_dict`. A first conv of another input channel count (the model's
        ``in_chans``) is left for timm to adapt (``adapt_input_conv``), as for its own models.

    Raises:
        CheckpointError: The weights do not fit `model`, or it needs a classifier the checkpoint lacks; the
            message names the file and lists what is wrong.
    """
    state_dict = extract_state_dict(state_dict, use_ema=use_ema)
    # Described before the model's own BN counters are added below: the widths and depths are the file's.
    described = describe_state_dict(state_dict)
    name = f'Checkpoint {source}' if source else 'Checkpoint'
    expected = model.state_dict()
    if 'head.weight' not in expected:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
    elif 'head.weight' not in state_dict:
        if require_head is None:
            pretrained_classes = (getattr(model, 'pretrained_cfg', None) or {}).get('num_classes')
            require_head = strict and getattr(model, 'num_classes', None) == pretrained_classes
        if require_head:
            # Otherwise torch's load_state_dict reports the bare "Missing key(s): head.weight".
            raise CheckpointError(
                f'{name} has no classifier (head.weight, head.bias): it is a backbone/encoder file ({described}), '
                f'but the model has a {expected["head.weight"].shape[0]}-class head. Build the model without one '
                '(num_classes=0, or features_only=True), or load non-strictly (pretrained_strict=False / '
                "strict=False) to keep the model's own, untrained head.")
    for k, v in expected.items():
        if k.endswith('num_batches_tracked') and k not in state_dict:
            state_dict[k] = v.clone()
    ignore = ['head.']
    first, theirs = 'patch_embed1.proj.weight', state_dict.get('patch_embed1.proj.weight')
    if (first in expected and isinstance(theirs, torch.Tensor) and theirs.dim() == 4
            and theirs.shape[1] != expected[first].shape[1] and theirs.shape[0] == expected[first].shape[0]
            and theirs.shape[2:] == expected[first].shape[2:]):
        ignore.append(first)  # timm's load_pretrained adapts it to in_chans after this filter
    adapted = first if first in ignore else None
    try:
        check_state_dict(
            state_dict, model, ignore_prefixes=tuple(ignore),
            header=f'{name} does not fit the model ({type(model).__name__}, groups='
                   f'{getattr(model, "groups", "?")}); checkpoint: {described}')
    except CheckpointError as e:
        if strict:
            raise
        _logger.warning('%s\n(pretrained_strict=False: loading what fits)', e)
    if not strict:
        # timm loads with strict=False, which skips missing and unexpected keys but still fails on a shape.
        misfit = [k for k, v in state_dict.items()
                  if k in expected and k != adapted and tuple(v.shape) != tuple(expected[k].shape)]
        # A classifier of another class count is left out without a word, as timm does for its models when
        # num_classes differs from the file's (pretrained_strict or not).
        named = [k for k in misfit if not k.startswith('head.')]
        if named:
            _logger.warning("pretrained_strict=False: %d weights of %s have another shape than the model's and are "
                            'not loaded (the model keeps its own): %s', len(named), source or 'the checkpoint',
                            ', '.join(named[:12]) + (f', ... ({len(named) - 12} more)' if len(named) > 12 else ''))
        state_dict = {k: v for k, v in state_dict.items() if k not in misfit}
    return state_dict


def load_checkpoint(
        model: nn.Module,
        checkpoint: str | os.PathLike | Mapping[str, Any],
        use_ema: bool = False,
        strict: bool = True,
        weights_only: bool = True,
) -> None:
    """Load an original or converted DSAN checkpoint into `model` (`checkpoint_filter_fn`, then a checked load).

    Args:
        model: DSAN model whose groups match the checkpoint (see `infer_groups`).
        checkpoint: File path or an already loaded checkpoint/state_dict.
        use_ema: Load the EMA weights of a training checkpoint.
        strict: Also require the classifier to match; otherwise a missing classifier or one of another shape
            is skipped (the model keeps its own).
        weights_only: See `read_checkpoint`.

    Raises:
        CheckpointError: The checkpoint does not fit; the message names the file and lists what is wrong.
    """
    source = None if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    _load_checkpoint(model, checkpoint, use_ema=use_ema, strict=strict, weights_only=weights_only,
                     filter_fn=partial(checkpoint_filter_fn, source=source, require_head=strict), classifier='head')


# --------------------------------------------------------------------------------------------------------
# Creation, configs and registration

# The released weights are linked from the original README, not hosted anywhere timm can download them from.
_RELEASED_WEIGHTS = 'https://github.com/MarcYugo/DSAN-Deformable-Spatial-Attention'


def _no_weights_message(variant: str) -> str:
    return (
        f'{variant} has no downloadable pretrained weights: the released DSAN checkpoints are linked from the '
        f'original README ({_RELEASED_WEIGHTS}) and must be downloaded by hand. Save the file (e.g. {variant}.pth.tar) '
        f"and load it with timm.create_model('{variant}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='{variant}.pth.tar')), or instead of --pretrained pass "
        f'--initial-checkpoint {variant}.pth.tar to classification/train.py or --checkpoint {variant}.pth.tar to '
        'classification/validate.py; the segmentation and detection configs read pretrained/dsan_{t,s}_encoder.pth '
        '(tools/convert_checkpoint.py --encoder writes it).')


def _pretrained_state_dict(variant: str, kwargs: dict[str, Any], use_ema: bool) -> tuple[dict | None, str | None]:
    """The pretrained weights given as a file or a state_dict (None when timm downloads them: url, hub), and the
    file they come from (None: not a file).

    Raises:
        NoPretrainedWeightsError: The pretrained config names no weights at all (the default ones).
    """
    pretrained_cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if pretrained_cfg.state_dict is not None:
        return extract_state_dict(pretrained_cfg.state_dict, use_ema=use_ema), None
    if pretrained_cfg.file:
        return extract_state_dict(read_checkpoint(pretrained_cfg.file), use_ema=use_ema), str(pretrained_cfg.file)
    if pretrained_cfg.url or pretrained_cfg.hf_hub_id:
        return None, None
    raise NoPretrainedWeightsError(_no_weights_message(variant))


def _create_dsan(variant: str, pretrained: bool, model_args: Mapping[str, Any], **kwargs) -> DSAN:
    """Build `variant` from its `model_args`, updated by the caller's `kwargs`.

    With `pretrained`, the DSCN groups are read from the checkpoint unless `groups` is in `kwargs` (the
    released DSAN-T file's grouping is not documented, see `infer_groups`).
    """
    use_ema = kwargs.pop('pretrained_use_ema', False)
    source = None
    if pretrained:
        # Groups must be known before construction: read them from the checkpoint, then hand the unwrapped
        # state_dict to timm so the file is read once (timm's own reader prefers EMA and rejects the
        # argparse.Namespace that CheckpointSaver files hold).
        state_dict, source = _pretrained_state_dict(variant, kwargs, use_ema)
        if state_dict is not None:
            if 'groups' not in kwargs:
                kwargs['groups'] = infer_groups(state_dict, kwargs.get('kernel_sizes', model_args['kernel_sizes']))
                _logger.info('%s: DSCN groups %s read from the checkpoint.', variant, kwargs['groups'])
            overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
            overlay.update(state_dict=state_dict, custom_load=False)
            kwargs['pretrained_cfg_overlay'] = overlay
    model = build_model_with_cfg(
        DSAN, variant, pretrained,
        # features_only: timm builds the model with its classifier and drops it after loading, not from the file.
        pretrained_filter_fn=partial(checkpoint_filter_fn, strict=kwargs.get('pretrained_strict', True),
                                     source=source, require_head=False if kwargs.get('features_only') else None),
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **dict(model_args, **kwargs),
    )
    # Do not keep the weights alive inside the pretrained config.
    for m in (model, getattr(model, 'model', None)):
        cfg = getattr(m, 'pretrained_cfg', None)
        if isinstance(cfg, dict):
            cfg.pop('state_dict', None)
    return model


def _cfg(url: str = '', **kwargs) -> dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.9,
        'interpolation': 'bicubic',
        'mean': IMAGENET_INCEPTION_MEAN,  # (0.5, 0.5, 0.5)
        'std': IMAGENET_INCEPTION_STD,  # (0.5, 0.5, 0.5)
        'first_conv': 'patch_embed1.proj',
        'classifier': 'head',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # No url: the released weights are not downloadable (`pretrained=True` alone raises NoPretrainedWeightsError);
    # load a downloaded file with pretrained_cfg_overlay=dict(file=PATH).
    'dsan_t.in1k': _cfg(),
    'dsan_t2.in1k': _cfg(),
    'dsan_s.in1k': _cfg(),
})

# The variants' architectures (the official code's; `describe_state_dict` matches checkpoints against them too).
# A pretrained checkpoint's own DSCN groups take precedence over `groups` (see `infer_groups`).
_MODEL_ARGS: dict[str, dict[str, Any]] = {
    'dsan_t': dict(
        embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), mlp_ratios=(8, 8, 4, 4),
        kernel_sizes=(11, 11, 7, 5), dw_kernel_sizes=(11, 11, 7, 5), groups=(1, 4, 8, 8)),
    'dsan_t2': dict(
        embed_dims=(32, 64, 160, 256), depths=(3, 3, 8, 2), mlp_ratios=(8, 8, 4, 4),
        kernel_sizes=(19, 15, 13, 7), dw_kernel_sizes=(19, 15, 13, 7), groups=(4, 8, 16, 16)),
    'dsan_s': dict(
        embed_dims=(64, 128, 320, 512), depths=(2, 2, 5, 3), mlp_ratios=(8, 8, 4, 4),
        kernel_sizes=(15, 13, 7, 5), dw_kernel_sizes=(9, 7, 5, 5), groups=(4, 8, 16, 16)),
}


@register_model
def dsan_t(pretrained: bool = False, **kwargs) -> DSAN:
    """DSAN-T: 4.48 M params, 0.94 GFLOPs at 224 with the official groups [1, 4, 8, 8]."""
    return _create_dsan('dsan_t', pretrained, _MODEL_ARGS['dsan_t'], **kwargs)


@register_model
def dsan_t2(pretrained: bool = False, **kwargs) -> DSAN:
    """DSAN-T2: 6.04 M params, 1.29 GFLOPs at 224."""
    return _create_dsan('dsan_t2', pretrained, _MODEL_ARGS['dsan_t2'], **kwargs)


@register_model
def dsan_s(pretrained: bool = False, **kwargs) -> DSAN:
    """DSAN-S: 19.88 M params, 3.20 GFLOPs at 224."""
    return _create_dsan('dsan_s', pretrained, _MODEL_ARGS['dsan_s'], **kwargs)
