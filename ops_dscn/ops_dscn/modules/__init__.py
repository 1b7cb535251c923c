"""DSCNX / DSCNY: the DSCN layers of DSAN, with the original constructor arguments and parameter names."""

import torch
import torch.nn.functional as F
from torch import nn

from ..depthwise import DepthwiseConv2d
from ..functional import BACKENDS, check_config, dscn_strip, recording_aten, resolve_backend
from ..pointwise import (
    KeepsPackedWeights,
    keep_packed_weight,
    kept_packed_weight,
    pointwise_conv,
    pointwise_conv_available,
)
from ..strip_offsets import strip_offsets_available

__all__ = ["DSCNX", "DSCNY", "ToChannelsFirst", "ToChannelsLast"]


class ToChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H, W, C) (a view; free when the tensor is in channels_last memory format)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Permutes NCHW to NHWC."""
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    """(N, H, W, C) -> (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Permutes NHWC to NCHW."""
        return x.permute(0, 3, 1, 2)


def _norm_nchw_to_nhwc(channels: int, norm_layer: str) -> nn.Sequential:
    # The container layout fixes the state_dict names ('dw_conv.1.1.weight' for LN), as in the original.
    if norm_layer == "LN":
        return nn.Sequential(ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6))
    if norm_layer == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels), ToChannelsLast())
    raise ValueError(f"norm_layer must be 'LN' or 'BN'; got {norm_layer!r}")


def _act(act_layer: str) -> nn.Module:
    acts = {"GELU": nn.GELU, "ReLU": nn.ReLU, "SiLU": nn.SiLU}
    if act_layer not in acts:
        raise ValueError(f"act_layer must be one of {sorted(acts)}; got {act_layer!r}")
    return acts[act_layer]()


class _DSCNStrip(KeepsPackedWeights, nn.Module):
    """Shared body of DSCNX / DSCNY: offsets predicted from ``off_x``, then DSCN along one axis."""

    on_x: bool = True

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        remove_center: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        # Checked here, at construction, with the op's own checks (ops_dscn.check_config), not at the first forward.
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int; got {channels!r}")
        if isinstance(group, int) and not isinstance(group, bool) and group >= 1 and channels % group != 0:
            raise ValueError(f"channels must be divisible by group; got channels = {channels}, group = {group}")
        check_config(*self._geometry(kernel_size, stride, pad, dilation), group, max(channels // max(group, 1), 1),
                     offset_scale, remove_center, self.on_x)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        if backend == "cpp":
            resolve_backend(backend)  # an error now if the compiled op is not built
        dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
        if isinstance(dw_kernel_size, bool) or not isinstance(dw_kernel_size, int) or dw_kernel_size % 2 != 1 \
                or dw_kernel_size < 1:
            raise ValueError(f"dw_kernel_size must be a positive odd int (the offset branch's conv keeps the input's "
                             f"size); got {dw_kernel_size!r}")
        # The offset branch predicts offsets at every input pixel, so the strip must keep the input's size too.
        if stride != 1 or 2 * pad != dilation * (kernel_size - 1):
            raise ValueError(f"{type(self).__name__}: the strip must keep the input's size (its offsets are predicted "
                             f"at every input pixel): stride == 1 and 2 * pad == dilation * (kernel_size - 1); got "
                             f"stride={stride}, pad={pad}, dilation={dilation}, kernel_size={kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.remove_center = int(remove_center)
        self.backend = backend

        dw = (1, dw_kernel_size) if self.on_x else (dw_kernel_size, 1)
        dw_pad = (0, (dw_kernel_size - 1) // 2) if self.on_x else ((dw_kernel_size - 1) // 2, 0)
        self.dw_conv = nn.Sequential(
            DepthwiseConv2d(channels, kernel_size=dw, padding=dw_pad),
            _norm_nchw_to_nhwc(channels, norm_layer),
            _act(act_layer),
        )
        self.offset = nn.Linear(channels, group * (kernel_size - self.remove_center))
        # Compute the offsets with the fused CPU inference kernel (ops_dscn.strip_offsets) where it applies.
        self.fused_offsets = True

    def _reset_parameters(self) -> None:
        # Zero offsets: the layer starts as a box filter along its axis.
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    @classmethod
    def _geometry(cls, k: int, s: int, p: int, d: int) -> tuple[int, ...]:
        # (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w) of the strip.
        return (1, k, 1, s, 0, p, 1, d) if cls.on_x else (k, 1, s, 1, p, 0, d, 1)

    def _offsets(self, off_x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) offset source -> (N, H, W, G * K') offsets.

        On CPU in float32 (LayerNorm and exact GELU; backend not 'pytorch') the branch runs as one fused operator,
        ``ops_dscn::strip_offsets``, which gives the same result to float rounding, for inference and training (its
        backward recomputes the branch, so autograd keeps only ``off_x``); ``fused_offsets = False`` runs its layers
        one by one. Under autocast the layers run too, so that the offsets come out in autocast's dtype.
        """
        if off_x.dim() != 4 or off_x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__}: off_x must be (N, C, H, W) with C = {self.channels}; got shape "
                             f"{list(off_x.shape)}")
        conv, norm, act = self.dw_conv[0], self.dw_conv[1][-1], self.dw_conv[2]
        # Not while torch.jit traces: tracers (FLOP counters, ONNX export) must see the layers' aten operators.
        if (self.fused_offsets and self.backend != "pytorch" and off_x.dtype == torch.float32
                and not torch.is_autocast_enabled(off_x.device.type) and not recording_aten()
                and strip_offsets_available(off_x) and isinstance(norm, nn.LayerNorm)
                and type(act) is nn.GELU and act.approximate == "none" and self.dw_kernel_size % 2 == 1):
            return torch.ops.ops_dscn.strip_offsets(off_x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps,
                                                    self.offset.weight, self.offset.bias, self.on_x)
        return self.offset(self.dw_conv(off_x))

    def _strip(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        geometry = self._geometry(self.kernel_size, self.stride, self.pad, self.dilation)
        return dscn_strip(x, offset, *geometry, self.group, self.group_channels, self.offset_scale,
                          bool(self.remove_center), self.on_x, self.backend)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, pad={self.pad}, "
                f"dilation={self.dilation}, group={self.group}, offset_scale={self.offset_scale}, "
                f"remove_center={bool(self.remove_center)}, backend={self.backend!r}")


class DSCNX(_DSCNStrip):
    """DSCN along W (kernel 1×K) with an input projection; offsets come from a 1×Kd depthwise conv of ``off_x``.

    Args:
        channels: C, channels of the input and output.
        kernel_size: K, taps of the strip.
        dw_kernel_size: Kd of the depthwise conv that predicts offsets (default: K).
        stride: stride along W.
        pad: zero padding along W ((K - 1) // 2 keeps the width).
        dilation: tap spacing along W.
        group: offset groups; C must be divisible by it.
        offset_scale: scale of the learned offsets.
        act_layer: 'GELU', 'ReLU' or 'SiLU' after the offset branch's norm.
        norm_layer: 'LN' (LayerNorm eps 1e-6) or 'BN' in the offset branch.
        remove_center: skip the centre tap.
        backend: 'auto', 'cpp' or 'pytorch' (see :func:`ops_dscn.resolve_backend`); may be changed later through
            the ``backend`` attribute.
    """

    on_x = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_proj = nn.Linear(self.channels, self.channels)
        # input_proj's weight packed for ops_dscn.pointwise_conv (`pack_weights`), or None; not in the state_dict.
        self.register_buffer("input_proj_packed", None, persistent=False)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        super()._reset_parameters()
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.zeros_(self.input_proj.bias)

    def pack_weights(self) -> None:
        """Keep input_proj's weight packed (:func:`~ops_dscn.pack_weight`) for CPU float32 inference.

        The projection then runs as :func:`~ops_dscn.pointwise_conv` with the bias fused, reading the packed weight,
        where ``nn.Linear`` leaves it to the BLAS, which repacks the weight on every call (and, in a graph frozen by
        inductor, adds the bias in a pass of its own). For inference only: with gradients, float64, autocast,
        torch.jit tracing or the 'pytorch' backend the ``nn.Linear`` runs. See :func:`~ops_dscn.kept_packed_weight`
        for when the packed copy is used and refreshed.
        """
        keep_packed_weight(self, "input_proj_packed", self.input_proj.weight)

    # Least channel count at which the projection runs as a 1x1 convolution when gradients are needed. nn.Linear
    # leaves it to the BLAS (MKL, whose kernels are AVX2 on AMD CPUs); oneDNN's convolution forward+backward took
    # 0.55-0.64x its time for DSAN-T's stages 2-4 (64-256 channels, batch 16, 2 threads, Zen 5) and 1.14x at 32
    # channels (stage 1).
    conv_projection_min_channels = 64

    def _projection_as_conv(self, input: torch.Tensor) -> bool:
        return (torch.is_grad_enabled() and input.device.type == "cpu" and input.dtype == torch.float32
                and input.dim() == 4 and input.is_contiguous() and self.channels >= self.conv_projection_min_channels
                and self.backend != "pytorch" and not recording_aten()
                and not torch.is_autocast_enabled(input.device.type))

    def _project(self, input: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
        proj = self.input_proj
        if packed is None:
            packed = kept_packed_weight(self, "input_proj_packed", proj.weight, input)
        elif torch.is_grad_enabled() and proj.weight.requires_grad:
            packed = None  # the weight's gradient needs the layer
        if (packed is None or self.backend == "pytorch" or (torch.is_grad_enabled() and input.requires_grad)
                or recording_aten() or torch.is_autocast_enabled(input.device.type)
                or not pointwise_conv_available(input) or input.dim() != 4):
            if self._projection_as_conv(input):
                # (N, H, W, C) -> (N, C, H, W) is a channels_last view of the same memory, and back.
                weight = proj.weight.view(*proj.weight.shape, 1, 1)
                return F.conv2d(input.permute(0, 3, 1, 2), weight, proj.bias).permute(0, 2, 3, 1)
            return proj(input)
        # (N, H, W, C) -> (N, C, H, W) is a view of the same memory (channels_last), and back.
        return pointwise_conv(input.permute(0, 3, 1, 2), proj.weight, proj.bias, packed=packed).permute(0, 2, 3, 1)

    def forward(self, input: torch.Tensor, off_x: torch.Tensor,
                input_proj_packed: torch.Tensor | None = None) -> torch.Tensor:
        """(N, H, W, C) input and (N, C, H, W) offset source -> (N, H, W_out, C).

        `input_proj_packed`: ``ops_dscn.pack_weight(self.input_proj.weight)`` made by the caller (a model that keeps
        its own packed copies), used in place of the kept one for CPU float32 inference; None: the kept one, if any.
        """
        return self._strip(self._project(input, input_proj_packed), self._offsets(off_x))


class DSCNY(_DSCNStrip):
    """DSCN along H (kernel K×1), no input projection; offsets come from a Kd×1 depthwise conv of ``off_x``.

    Args are those of :class:`DSCNX` with H in place of W.
    """

    on_x = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reset_parameters()

    def forward(self, input: torch.Tensor, off_x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) input and (N, C, H, W) offset source -> (N, H_out, W, C)."""
        return self._strip(input, self._offsets(off_x))
