"""Parameters and FLOPs counted the way the DSAN paper did, for any model holding DSCN layers.

The paper reports torchprofile's ``profile_macs`` as "GFLOPs", and torchprofile does not know the DSCN custom op,
so the op itself counts 0. `count_macs` returns that figure and, for reference, the figure with the op's own
multiply-adds (2 per tap and output element: N * Ho * Wo * C * K' * 2) included. Used by the params/FLOPs tools of
classification, segmentation and detection.
"""
import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torchprofile import profile_macs
from torchprofile.handlers import HANDLER_MAP

import ops_dscn
from dsan.models.dsan import Block, Mlp, PointwiseConv2d
from ops_dscn.modules import DSCNX, DSCNY, _DSCNStrip

__all__ = ['DSCN_OP', 'count_macs', 'count_params']

DSCN_OP = 'ops_dscn::dscn'
_STANDIN_OP = 'dsan_profile::dscn_standin'


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _dscn_own_macs(node) -> int:
    """Multiply-adds of one DSCN call: 2 per tap and output element (two interpolation weights)."""
    out_shape = node.outputs[0].shape  # (N, Ho, Wo, C)
    offset_shape = node.inputs[1].shape  # (N, Ho, Wo, group * K')
    group = node.inputs[10].value if node.operator == DSCN_OP else node.inputs[2].value
    taps = offset_shape[-1] // int(group)
    return 2 * _prod(out_shape) * taps


def _standin_impl(x: torch.Tensor, offset: torch.Tensor, group: int) -> torch.Tensor:
    """Shape-only stand-in of a stride-1, same-padding DSCN call, used only for counting."""
    return x.clone()


def _get_standin_op():
    # Define the op once per process, even if this module is reloaded.
    try:
        return torch.ops.dsan_profile.dscn_standin
    except (AttributeError, RuntimeError):
        op = torch.library.custom_op(_STANDIN_OP, _standin_impl, mutates_args=())
        op.register_fake(lambda x, offset, group: torch.empty_like(x))
        return op


_dscn_standin = _get_standin_op()


class _CountDSCN:
    """Context: register a torchprofile handler giving each DSCN call its own multiply-adds."""

    def __enter__(self):
        self._saved = {op: HANDLER_MAP.get(op, _MISSING) for op in (DSCN_OP, _STANDIN_OP)}
        for op in self._saved:
            HANDLER_MAP[op] = _dscn_own_macs
        return self

    def __exit__(self, *exc):
        for op, h in self._saved.items():
            if h is _MISSING:
                HANDLER_MAP.pop(op, None)
            else:
                HANDLER_MAP[op] = h


_MISSING = object()


class _StandInOp:
    """Context: make the DSCN modules call a shape-only stand-in op when the compiled op is not built.

    The pure-PyTorch twin would be traced into many elementwise ops that torchprofile would count; the
    stand-in keeps the op a single opaque node, as the compiled op is.
    """

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, (DSCNX, DSCNY))]

    def __enter__(self):
        if any(not hasattr(m, '_strip') for m in self.modules):
            raise RuntimeError('The ops_dscn modules changed: cannot count without the compiled op; build ops_dscn.')
        for m in self.modules:
            m._strip = lambda x, offset, _m=m: _dscn_standin(x, offset, _m.group)
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            del m._strip


# Flags of the modules that can run as a fused inference kernel, which torchprofile does not know.
_FUSED_FLAGS = ((Mlp, 'fused_kernel'), (_DSCNStrip, 'fused_offsets'), (PointwiseConv2d, 'fused_epilogue'),
                (Block, 'fold_in_inference'))


@contextlib.contextmanager
def _layer_by_layer(model: nn.Module):
    """Runs the MLPs, the DSCN offset branches and the attention's 1x1 convs of `model` as their separate layers (not
    the fused CPU inference kernels `ops_dscn.conv_mlp` / `strip_offsets` / `pointwise_conv`), and the blocks with
    their BatchNorms and layer scales (not folded on the fly), so that their layers are counted as the paper did."""
    switched = [(m, flag) for m in model.modules() for cls, flag in _FUSED_FLAGS
                if isinstance(m, cls) and getattr(m, flag)]
    for m, flag in switched:
        setattr(m, flag, False)
    try:
        yield
    finally:
        for m, flag in switched:
            setattr(m, flag, True)


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


class _Forward(nn.Module):
    """Trace `fn(model, x)` instead of `model(x)` (e.g. an mm segmentor's `forward(x, mode='tensor')`)."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, torch.Tensor], Any]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(self.model, x)


@torch.no_grad()
def count_macs(
        model: nn.Module,
        img_size: tuple[int, int] = (224, 224),
        forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> tuple[int, int]:
    """torchprofile multiply-accumulates of one image (the paper's "FLOPs").

    Args:
        model: Model in eval mode.
        img_size: (H, W) of the input.
        forward: Called as `forward(model, x)` in place of `model(x)`, for models whose forward needs more.

    Returns:
        (MACs with the DSCN op counted 0 as in the paper, MACs including the op's own multiply-adds).
    """
    x = torch.randn(1, 3, *img_size)
    traced = model if forward is None else _Forward(model, forward)
    use_standin = 'cpp' not in ops_dscn.available_backends()
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='No handlers found')
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        with _CountDSCN(), _layer_by_layer(model), (
                _StandInOp(model) if use_standin else contextlib.nullcontext()):
            per_node = profile_macs(traced, x, reduction=None)
    dscn = sum(v for n, v in per_node.items() if n.operator in (DSCN_OP, _STANDIN_OP))
    total = sum(per_node.values())
    return int(total - dscn), int(total)
