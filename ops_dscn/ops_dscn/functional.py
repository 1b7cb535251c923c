"""Functional DSCN API, backend selection, and the Python-side registrations of the compiled operator.

The compiled operator's schema is declared once in ``csrc/dscn.cpp`` (``torch.ops.ops_dscn.dscn`` and its private
``torch.ops.ops_dscn._dscn_backward``); its autograd formula and fake (meta) kernel are registered here with
``torch.library`` so that it works with autograd, ``torch.compile`` and ``torch.export``.
"""

import logging
import math
import warnings

import torch

from .pytorch_impl import dscn_pytorch

__all__ = ["BACKENDS", "available_backends", "extension_available", "extension_error", "resolve_backend", "dscn",
           "dscn_strip"]

_logger = logging.getLogger(__name__)

#: Backend names accepted everywhere a ``backend`` argument is taken.
BACKENDS = ("auto", "cpp", "pytorch")

try:  # importing the extension runs its TORCH_LIBRARY registrations
    from . import _C  # noqa: F401

    _EXT_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _EXT_ERROR = f"{type(exc).__name__}: {exc}"
    if "site-packages" not in __file__:
        _EXT_ERROR += f" (ops_dscn was imported from the source tree {__file__}; run from another directory)"

_warned_fallback = False


def extension_available() -> bool:
    """Whether the compiled operator (``ops_dscn._C``) was built and loaded."""
    return _EXT_ERROR is None


def extension_error() -> str | None:
    """Why the compiled operator could not be loaded, or None if it was."""
    return _EXT_ERROR


def available_backends() -> list[str]:
    """Concrete backends usable in this process: ``'cpp'`` (if built) and ``'pytorch'``."""
    return (["cpp"] if extension_available() else []) + ["pytorch"]


def resolve_backend(backend: str) -> str:
    """Maps a backend name to the concrete backend that will run.

    Args:
        backend: ``'auto'`` (the compiled op when built, else the pure-PyTorch op with one warning), ``'cpp'``
            (the compiled op; an error if it is not built) or ``'pytorch'``.

    Returns:
        ``'cpp'`` or ``'pytorch'``.
    """
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "pytorch":
        return "pytorch"
    if extension_available():
        return "cpp"
    if backend == "cpp":
        raise RuntimeError(
            "backend='cpp' was requested but the compiled DSCN operator is not available "
            f"({_EXT_ERROR}). Build it with `cd ops_dscn && python setup.py install` or "
            "`pip install --no-build-isolation ./ops_dscn`, or use backend='pytorch'."
        )
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"ops_dscn: the compiled DSCN operator is not available ({_EXT_ERROR}); using the pure-PyTorch "
            "implementation, which is much slower. Build ops_dscn to use the compiled one.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "pytorch"


def _out_len(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def _check_4d(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D {layout}; got {t.dim()}-D shape {tuple(t.shape)}")


def _check_args(input, offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                group_channels, offset_scale, remove_center, on_x) -> None:
    """Validates a DSCN call; every message names the argument with the expected and the actual value."""
    _check_4d("input", input, "(N, H, W, C) channels-last")
    _check_4d("offset", offset, "(N, H_out, W_out, group * K)")
    if input.device != offset.device:
        raise ValueError(f"input and offset must be on the same device; got input on {input.device} and offset on "
                         f"{offset.device}")
    if input.dtype != offset.dtype:
        raise ValueError(
            f"input and offset must have the same dtype; got input {input.dtype} and offset {offset.dtype}")
    if not input.dtype.is_floating_point:
        raise ValueError(f"input must be a floating point tensor; got {input.dtype}")
    for name, value, minimum in (("kernel_h", kernel_h, 1), ("kernel_w", kernel_w, 1), ("stride_h", stride_h, 1),
                                 ("stride_w", stride_w, 1), ("pad_h", pad_h, 0), ("pad_w", pad_w, 0),
                                 ("dilation_h", dilation_h, 1), ("dilation_w", dilation_w, 1), ("group", group, 1),
                                 ("group_channels", group_channels, 1)):
        _check_int(name, value, minimum)
    if not isinstance(offset_scale, (int, float)) or isinstance(offset_scale, bool) or not math.isfinite(offset_scale):
        raise ValueError(f"offset_scale must be a finite number; got {offset_scale!r}")
    if on_x and kernel_h != 1:
        raise ValueError(f"an x-strip (on_x=True) needs kernel_h == 1; got kernel_h = {kernel_h}")
    if not on_x and kernel_w != 1:
        raise ValueError(f"a y-strip (on_x=False) needs kernel_w == 1; got kernel_w = {kernel_w}")
    n, h, w, c = input.shape
    if c != group * group_channels:
        raise ValueError(f"input channels must equal group * group_channels = {group} * {group_channels} = "
                         f"{group * group_channels}; got {c} (input shape {tuple(input.shape)})")
    k = kernel_w if on_x else kernel_h
    if remove_center and k % 2 == 0:
        raise ValueError(f"remove_center needs an odd kernel size; got {k}")
    taps = k - int(bool(remove_center))
    if taps < 1:
        raise ValueError("remove_center with kernel size 1 leaves no tap")
    h_out = _out_len(h, kernel_h, stride_h, pad_h, dilation_h)
    w_out = _out_len(w, kernel_w, stride_w, pad_w, dilation_w)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"kernel, stride, pad and dilation give an empty output: input (H, W) = ({h}, {w}), output "
                         f"(H_out, W_out) = ({h_out}, {w_out})")
    expected = (n, h_out, w_out, group * taps)
    if tuple(offset.shape) != expected:
        raise ValueError(f"offset must have shape (N, H_out, W_out, group * K') = {expected}; got "
                         f"{tuple(offset.shape)}")


def dscn_strip(
    input: torch.Tensor,
    offset: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    on_x: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """DSCN with the original operator's full argument list (see :func:`dscn` for the semantics).

    Args:
        input: (N, H, W, C) channels-last, C = group * group_channels.
        offset: (N, H_out, W_out, group * K'), K' = K - remove_center, taps in kernel order.
        kernel_h, kernel_w: kernel extent; the one across the strip must be 1 (kernel_h for ``on_x``).
        stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w: geometry per axis.
        group: number of offset groups; group_channels: channels per group.
        offset_scale: multiplies the learned offsets and the tap spacing around the kernel centre.
        remove_center: skip the centre tap (odd kernels only).
        on_x: sample along W (x-strip) if True, along H (y-strip) if False.
        backend: ``'auto'``, ``'cpp'`` or ``'pytorch'`` (see :func:`resolve_backend`).

    Returns:
        (N, H_out, W_out, C), in the dtype of ``input``.
    """
    if (input.dtype != offset.dtype and isinstance(input, torch.Tensor) and isinstance(offset, torch.Tensor)
            and torch.is_autocast_enabled(input.device.type)):
        # Autocast may hand over tensors of different precision; compute in the wider one.
        dtype = torch.promote_types(input.dtype, offset.dtype)
        input, offset = input.to(dtype), offset.to(dtype)
    _check_args(input, offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                group_channels, offset_scale, remove_center, on_x)
    args = (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
            float(offset_scale), bool(remove_center), bool(on_x))
    if resolve_backend(backend) == "cpp":
        return torch.ops.ops_dscn.dscn(input, offset, *args)
    return dscn_pytorch(input, offset, *args)


def dscn(
    input: torch.Tensor,
    offset: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    pad: int = 0,
    dilation: int = 1,
    group: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    axis: str = "x",
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable strip convolution: a sum of K linearly interpolated samples along one axis.

    For the x-strip (``axis='x'``; the y-strip swaps the roles of H and W), with c = dilation * (K - 1) // 2 and
    s = offset_scale, tap k of output pixel (n, h, w_out) and group g samples row h at

        loc = w_out * stride - pad + c + s * (k * dilation - c + offset[n, h, w_out, g * K' + k])

    and ``out[n, h, w_out, g * gc + j] = sum_k value_k`` with ``value = (1 - l) * x[floor(loc)] + l * x[floor(loc)
    + 1]``, l = loc - floor(loc), where a neighbour outside the image reads as 0. A tap contributes only if
    -1 < loc < W; NaN, +-Inf and huge offsets therefore make the tap contribute 0 (and receive a 0 gradient) —
    nothing outside the input is ever read. With zero offsets the op is a zero-padded box filter of K taps.

    Args:
        input: (N, H, W, C) channels-last (NHWC), C = group * group_channels. Non-contiguous tensors are copied.
        offset: (N, H_out, W_out, group * K'), K' = K - remove_center, taps ordered left→right (x) or top→bottom (y).
        kernel_size: K, taps along the axis.
        stride: stride along the axis (the other axis is not strided).
        pad: zero padding along the axis.
        dilation: spacing of the taps along the axis.
        group: number of offset groups (channels of a group share the offsets).
        offset_scale: s above.
        remove_center: skip tap K // 2 (odd K only).
        axis: ``'x'`` (along W) or ``'y'`` (along H).
        backend: ``'auto'`` (compiled op if built, else pure PyTorch with one warning), ``'cpp'`` or ``'pytorch'``.

    Returns:
        (N, H_out, W_out, C) channels-last, in the dtype of ``input``: H_out = H for the x-strip and
        W_out = (W + 2 * pad - (dilation * (K - 1) + 1)) // stride + 1 (and symmetrically for y).

    Example:
        >>> x = torch.randn(2, 8, 8, 16)
        >>> off = torch.zeros(2, 8, 8, 4 * 3)
        >>> dscn(x, off, kernel_size=3, pad=1, group=4).shape
        torch.Size([2, 8, 8, 16])
    """
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y'; got {axis!r}")
    _check_4d("input", input, "(N, H, W, C) channels-last")
    _check_int("group", group, 1)
    if input.shape[-1] % group != 0:
        raise ValueError(f"input channels must be divisible by group; got C = {input.shape[-1]}, group = {group}")
    gc = input.shape[-1] // group
    if axis == "x":
        return dscn_strip(input, offset, 1, kernel_size, 1, stride, 0, pad, 1, dilation, group, gc, offset_scale,
                          remove_center, True, backend)
    return dscn_strip(input, offset, kernel_size, 1, stride, 1, pad, 0, dilation, 1, group, gc, offset_scale,
                      remove_center, False, backend)


# ---------------------------------------------------------------------------------------------------------------
# torch.library registrations of the compiled operator (only when it is built)

if extension_available():

    @torch.library.register_fake("ops_dscn::dscn")
    def _dscn_fake(input, offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                   group, group_channels, offset_scale, remove_center, on_x):
        n, h, w, c = input.shape
        h_out = _out_len(h, kernel_h, stride_h, pad_h, dilation_h)
        w_out = _out_len(w, kernel_w, stride_w, pad_w, dilation_w)
        torch._check(offset.shape[0] == n, lambda: "offset batch must match input batch")
        return input.new_empty((n, h_out, w_out, c))

    @torch.library.register_fake("ops_dscn::_dscn_backward")
    def _dscn_backward_fake(grad_output, input, offset, *args):
        return torch.empty_like(input), torch.empty_like(offset)

    def _setup_context(ctx, inputs, output):
        input, offset, *args = inputs
        ctx.save_for_backward(input, offset)
        ctx.args = args

    def _backward(ctx, grad_output):
        input, offset = ctx.saved_tensors
        grad_input, grad_offset = torch.ops.ops_dscn._dscn_backward(grad_output.contiguous(), input, offset,
                                                                    *ctx.args)
        return (grad_input, grad_offset) + (None,) * len(ctx.args)

    torch.library.register_autograd("ops_dscn::dscn", _backward, setup_context=_setup_context)
    _logger.debug("ops_dscn: compiled operator loaded")
