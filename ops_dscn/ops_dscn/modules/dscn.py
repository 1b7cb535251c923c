"""The original module path of the DSCN layers (``ops_dscn/modules/dscn.py``), for code written against it.

The original's other copy of this file, ``ops_dscn/dscn.py``, cannot be a module here: ``ops_dscn.dscn`` is the
operator function. Import the layers from ``ops_dscn.modules`` (or this module) instead.
"""

from torch import nn

from . import DSCNX, DSCNY, ToChannelsFirst, ToChannelsLast

__all__ = ["DSCNX", "DSCNY", "build_act_layer", "build_norm_layer", "to_channels_first", "to_channels_last"]

# The original's names of the two permutations.
to_channels_first = ToChannelsFirst
to_channels_last = ToChannelsLast


def build_norm_layer(dim: int, norm_layer: str, in_format: str = "channels_last", out_format: str = "channels_last",
                     eps: float = 1e-6) -> nn.Sequential:
    """A BatchNorm ('BN', which works on NCHW) or LayerNorm ('LN', on NHWC) between the given layouts.

    Args:
        dim: Channels.
        norm_layer: 'BN' or 'LN'.
        in_format / out_format: 'channels_last' (N, H, W, C) or 'channels_first' (N, C, H, W) of the input and
            output; the permutations the norm needs are added around it.
        eps: The LayerNorm's epsilon (BatchNorm keeps PyTorch's 1e-5, as in the original).
    """
    formats = ("channels_last", "channels_first")
    for name, value in (("in_format", in_format), ("out_format", out_format)):
        if value not in formats:
            raise ValueError(f"{name} must be one of {formats}; got {value!r}")
    if norm_layer not in ("BN", "LN"):
        raise ValueError(f"norm_layer must be 'BN' or 'LN'; got {norm_layer!r}")
    # The layout the norm itself works in.
    native = "channels_first" if norm_layer == "BN" else "channels_last"
    layers: list[nn.Module] = []
    if in_format != native:
        layers.append(ToChannelsFirst() if native == "channels_first" else ToChannelsLast())
    layers.append(nn.BatchNorm2d(dim) if norm_layer == "BN" else nn.LayerNorm(dim, eps=eps))
    if out_format != native:
        layers.append(ToChannelsLast() if native == "channels_first" else ToChannelsFirst())
    return nn.Sequential(*layers)


def build_act_layer(act_layer: str) -> nn.Module:
    """'ReLU', 'SiLU' (both in place, as in the original) or 'GELU'."""
    acts = {"ReLU": lambda: nn.ReLU(inplace=True), "SiLU": lambda: nn.SiLU(inplace=True), "GELU": nn.GELU}
    if act_layer not in acts:
        raise ValueError(f"act_layer must be one of {sorted(acts)}; got {act_layer!r}")
    return acts[act_layer]()
