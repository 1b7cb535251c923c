"""A depthwise conv2d whose CPU weight gradient runs in ops_dscn's kernel.

ATen's (oneDNN's) weight gradient of a depthwise convolution on channels_last CPU tensors was measured at about ten
times the time of the same conv's input gradient (12 ms against 1.3 ms: DSAN-T's stage-1 5x5 conv, batch 16, 2
threads), and DSAN has three kinds of depthwise convs in every block (the attention's 5x5, the offset branches'
1xK / Kx1, the MLP's 3x3). :class:`DepthwiseConv2d` is an ``nn.Conv2d`` (same parameters, names and forward) whose
backward takes the input gradient from ATen and the weight gradient from ``ops_dscn::_dw_conv_weight_grad``
(``csrc/cpu/dw_conv_cpu.cpp``) for CPU float32/float64 tensors; elsewhere it is ``nn.Conv2d`` exactly. Both
gradients are computed on channels_last tensors, which also keeps a ``torch.compile``-d backward (whose tensors
inductor lays out as plain NCHW, as its backward graph has no forward convolution to follow) on the fast path.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .conv_mlp import _KERNEL_DTYPES, _check_kernel_input, _has_cpu_kernel

__all__ = ["DepthwiseConv2d", "dw_conv_weight_grad", "dw_conv_weight_grad_reference"]

_CPU_KERNEL = _has_cpu_kernel("_dw_conv_weight_grad")


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
    if _CPU_KERNEL and input.device.type == "cpu" and input.dtype in _KERNEL_DTYPES:
        return torch.ops.ops_dscn._dw_conv_weight_grad(grad_output, input, *kernel_size, *stride, *padding,
                                                       *dilation)
    return dw_conv_weight_grad_reference(grad_output, input, kernel_size, stride, padding, dilation)


class _DepthwiseConv2dFunction(torch.autograd.Function):
    """conv2d(x, weight, bias, stride, padding, dilation, groups=C) with the backward described in the module doc."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation):
        return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        cl = torch.channels_last
        grad, x = grad.contiguous(memory_format=cl), x.contiguous(memory_format=cl)
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                      [0, 0], x.shape[1], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            g_w = dw_conv_weight_grad(grad, x, weight.shape[2:], stride, padding, dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_b = grad.sum((0, 2, 3))
        return g_x, g_w, g_b, None, None, None


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, groups=channels)`` with ops_dscn's CPU weight gradient.

    Same constructor (``groups`` is fixed to the channel count), parameters, state_dict and forward as
    ``nn.Conv2d``; only the backward differs (see the module doc), and only where gradients are needed, the padding
    is numeric zero padding and the input is 4-D.

    Args:
        channels: C, input and output channels.
        kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``.
    """

    def __init__(self, channels: int, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True, **kwargs):
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=channels, bias=bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, Ho, Wo)."""
        if (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str) and x.dim() == 4):
            return _DepthwiseConv2dFunction.apply(x, self.weight, self.bias, self.stride, self.padding,
                                                  self.dilation)
        return super().forward(x)


if _CPU_KERNEL:

    @torch.library.register_fake("ops_dscn::_dw_conv_weight_grad")
    def _dw_conv_weight_grad_fake(grad_output, input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                  dilation_h, dilation_w):
        _check_kernel_input("dw_conv_weight_grad", input)
        return input.new_empty((input.shape[1], 1, kernel_h, kernel_w))
