"""A depthwise conv2d whose CPU weight gradient, and its forward on one or two images, run in ops_dscn's kernels.

ATen's (oneDNN's) weight gradient of a depthwise convolution on channels_last CPU tensors was measured at about ten
times the time of the same conv's input gradient (12 ms against 1.3 ms: DSAN-T's stage-1 5x5 conv, batch 16, 2
threads), and DSAN has three kinds of depthwise convs in every block (the attention's 5x5, the offset branches'
1xK / Kx1, the MLP's 3x3). :class:`DepthwiseConv2d` is an ``nn.Conv2d`` (same parameters, names and forward) whose
backward takes the input gradient from ATen and the weight gradient from ``ops_dscn::_dw_conv_weight_grad``
(``csrc/cpu/dw_conv_cpu.cpp``) for CPU float32/float64 tensors; elsewhere it is ``nn.Conv2d`` exactly. Both
gradients are computed on channels_last tensors, which also keeps a ``torch.compile``-d backward (whose tensors
inductor lays out as plain NCHW, as its backward graph has no forward convolution to follow) on the fast path.

The forward of one or two images (batch <= ``FORWARD_MAX_BATCH``, CPU float32/float64, channels_last) runs in
``ops_dscn::dw_conv2d``: on so little work oneDNN's depthwise conv spends most of its time outside the arithmetic,
and the kernel was 2.3-3.4x as fast on DSAN-T's attention 5x5 convs at batch 1 (2 threads); from batch 4 on oneDNN
is as fast or faster, so it keeps larger batches.

Parameter gradients are summed per thread: the same bits on every call at a fixed ``torch.get_num_threads()``,
rounded differently at another thread count.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ._double_backward import recording_backward, twin_gradients
from .conv_mlp import _KERNEL_DTYPES, _check_kernel_input, _check_same_device, _has_cpu_kernel
from .functional import known_true, recording_aten

__all__ = ["DepthwiseConv2d", "FORWARD_MAX_BATCH", "MAX_KERNEL_H", "dw_conv2d", "dw_conv_weight_grad",
           "dw_conv_weight_grad_reference"]

_CPU_KERNEL = _has_cpu_kernel("_dw_conv_weight_grad")
_FORWARD_KERNEL = _has_cpu_kernel("dw_conv2d")
# Largest batch whose forward DepthwiseConv2d runs in ops_dscn::dw_conv2d (see the module doc).
FORWARD_MAX_BATCH = 2
# Tallest kernel the CPU kernels take (kMaxKh in csrc/cpu/dw_conv_cpu.cpp); taller ones go to ATen.
MAX_KERNEL_H = 32


def dw_conv_weight_grad_reference(grad_output, input, kernel_size, stride, padding, dilation):
    """The weight gradient (C, 1, kh, kw) of ``conv2d(input, w, stride, padding, dilation, groups=C)`` from ATen."""
    c = input.shape[1]
    weight = input.new_empty((c, 1, *kernel_size))
    return torch.ops.aten.convolution_backward(grad_output, input, weight, None, stride, padding, dilation, False,
                                               [0, 0], c, [False, True, False])[1]


def dw_conv_weight_grad(grad_output, input, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """The weight gradient (C, 1, kh, kw) of a depthwise ``conv2d(input, w, stride, padding, dilation, groups=C)``.

    Args:
        grad_output: (N, C, Ho, Wo), the output's gradient.
        input: (N, C, H, W); channels_last memory avoids a copy.
        kernel_size, stride, padding, dilation: (h, w) pairs of the convolution (zero padding).

    Returns:
        (C, 1, kh, kw): from the CPU kernel for CPU float32/float64 tensors, else from ATen.
    """
    if (_CPU_KERNEL and input.device.type == "cpu" and input.dtype in _KERNEL_DTYPES
            and kernel_size[0] <= MAX_KERNEL_H):
        return torch.ops.ops_dscn._dw_conv_weight_grad(grad_output, input, *kernel_size, *stride, *padding,
                                                       *dilation)
    return dw_conv_weight_grad_reference(grad_output, input, kernel_size, stride, padding, dilation)


def dw_conv2d(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """``F.conv2d(input, weight, bias, stride, padding, dilation, groups=C)`` by ops_dscn's CPU kernel.

    Args:
        input: (N, C, H, W), CPU float32 or float64; channels_last memory avoids a copy.
        weight: (C, 1, kh, kw), same dtype; kh at most ``MAX_KERNEL_H`` (32).
        bias: (C,) or None.
        stride, padding, dilation: (h, w) pairs (zero padding).

    Returns:
        (N, C, Ho, Wo) in channels_last memory; differentiable (the gradients of :class:`DepthwiseConv2d`).

    Raises:
        ValueError: a shape, dtype or geometry the kernel does not take, named with the value it got.
    """
    return torch.ops.ops_dscn.dw_conv2d(input, weight, bias, *stride, *padding, *dilation)


def _conv_backward(grad, x, weight, bias, stride, padding, dilation, needs):
    """(input, weight, bias) gradients of a depthwise conv2d; None where `needs` (three bools) says not needed."""
    if recording_backward():  # create_graph=True: gradients that can be differentiated again
        return tuple(twin_gradients(lambda x_, w_, b_: F.conv2d(x_, w_, b_, stride, padding, dilation, x_.shape[1]),
                                    (x, weight, bias), grad, needs))
    cl = torch.channels_last
    grad, x = grad.contiguous(memory_format=cl), x.contiguous(memory_format=cl)
    g_x = g_w = g_b = None
    if needs[0]:
        g_x = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                  [0, 0], x.shape[1], [True, False, False])[0]
    if needs[1]:
        g_w = dw_conv_weight_grad(grad, x, weight.shape[2:], stride, padding, dilation)
    if bias is not None and needs[2]:
        g_b = grad.sum((0, 2, 3))
    return g_x, g_w, g_b


class _DepthwiseConv2dFunction(torch.autograd.Function):
    """conv2d(x, weight, bias, stride, padding, dilation, groups=C) with the backward described in the module doc."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation):
        return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.geometry = (stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        return (*_conv_backward(grad, x, weight, bias, *ctx.geometry, ctx.needs_input_grad[:3]), None, None, None)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, groups=channels)`` with ops_dscn's CPU weight gradient.

    Same constructor (``groups`` is fixed to the channel count), parameters, state_dict and forward as
    ``nn.Conv2d``; only the backward differs (see the module doc), and only where gradients are needed, the padding
    is numeric zero padding and the input is 4-D. Without gradients, a channels_last CPU float32/float64 batch of
    at most ``FORWARD_MAX_BATCH`` images runs in ``ops_dscn::dw_conv2d`` (equal to float rounding).

    Args:
        channels: C, input and output channels.
        kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``.
    """

    def __init__(self, channels: int, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True, **kwargs):
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=channels, bias=bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, Ho, Wo)."""
        # The custom backward is for CPU float32/float64 alone. On CUDA ATen's is fast, and under autocast F.conv2d
        # casts x and weight inside the forward while the Function saves them uncast, so the backward would get
        # mixed dtypes (a float16 input with a float32 weight: convolution_backward refuses them on CUDA).
        # Not while torch.jit traces either (a Python Function is an opaque prim::PythonOp to tracers).
        if (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad) and not recording_aten()
                and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and self.weight.dtype == x.dtype
                and not torch.is_autocast_enabled("cpu")
                and self.padding_mode == "zeros" and not isinstance(self.padding, str) and x.dim() == 4):
            return _DepthwiseConv2dFunction.apply(x, self.weight, self.bias, self.stride, self.padding,
                                                  self.dilation)
        # Not while torch.jit traces: tracers (torchprofile's FLOP count, ONNX export) must see an aten conv. A
        # symbolic batch (torch.export / torch.compile with dynamic shapes) takes ATen's conv, which serves any batch,
        # rather than a guard that would tie the program to batches of at most two.
        if (_FORWARD_KERNEL and x.dim() == 4 and known_true(x.shape[0] <= FORWARD_MAX_BATCH)
                and x.device.type == "cpu"
                and x.dtype in _KERNEL_DTYPES and self.weight.dtype == x.dtype and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and self.kernel_size[0] <= MAX_KERNEL_H
                and x.is_contiguous(memory_format=torch.channels_last) and not recording_aten()
                and not torch.is_autocast_enabled("cpu")):  # autocast: nn.Conv2d's bfloat16 conv, as documented
            return torch.ops.ops_dscn.dw_conv2d(x, self.weight, self.bias, *self.stride, *self.padding,
                                                *self.dilation)
        return super().forward(x)


if _CPU_KERNEL:

    @torch.library.register_fake("ops_dscn::_dw_conv_weight_grad")
    def _dw_conv_weight_grad_fake(grad_output, input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                  dilation_h, dilation_w):
        _check_kernel_input("dw_conv_weight_grad", input)
        _check_same_device("dw_conv_weight_grad", input, grad_output=grad_output)
        return input.new_empty((input.shape[1], 1, kernel_h, kernel_w))

if _FORWARD_KERNEL:

    @torch.library.register_fake("ops_dscn::dw_conv2d")
    def _dw_conv2d_fake(input, weight, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w):
        _check_kernel_input("dw_conv2d", input)
        _check_same_device("dw_conv2d", input, weight=weight, bias=bias)
        n, c, h, w = input.shape
        kh, kw = weight.shape[2:]
        ho = (h + 2 * pad_h - dilation_h * (kh - 1) - 1) // stride_h + 1
        wo = (w + 2 * pad_w - dilation_w * (kw - 1) - 1) // stride_w + 1
        return torch.empty((n, c, ho, wo), dtype=input.dtype, device=input.device,
                           memory_format=torch.channels_last)

    def _dw_conv2d_setup_context(ctx, inputs, output):
        input, weight, bias, *geometry = inputs
        ctx.save_for_backward(input, weight, bias)
        ctx.geometry = ((geometry[0], geometry[1]), (geometry[2], geometry[3]), (geometry[4], geometry[5]))

    def _dw_conv2d_backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        return (*_conv_backward(grad, x, weight, bias, *ctx.geometry, ctx.needs_input_grad[:3]), *([None] * 6))

    torch.library.register_autograd("ops_dscn::dw_conv2d", _dw_conv2d_backward, setup_context=_dw_conv2d_setup_context)
