"""The offset branch of a DSCN layer fused into one operator for CPU inference and training.

DSCNX / DSCNY predict their offsets with a depthwise strip conv (1xK for the x-strip, Kx1 for the y-strip, zero
'same' padding), a LayerNorm over channels, exact GELU and a Linear to G * K' offsets per pixel.
``ops_dscn::strip_offsets`` computes that per block of pixels in one pass (see ``csrc/cpu/strip_offsets_cpu.cpp``).
Its backward, ``ops_dscn::_strip_offsets_backward``, recomputes the branch from the input (autograd keeps only the
input and the parameters) and returns the gradient of the conv's output and of the LayerNorm and Linear
parameters; the conv's own gradients are then a depthwise conv's input gradient (ATen) and
:func:`ops_dscn.dw_conv_weight_grad`. :func:`strip_offsets` picks the kernel where it applies (a CPU float32/float64
input) and the layers one by one, :func:`strip_offsets_reference`, elsewhere.

Parameter gradients are summed per thread: the same bits on every call at a fixed ``torch.get_num_threads()``,
rounded differently at another thread count.
"""

import torch
import torch.nn.functional as F

from ._double_backward import recording_backward, twin_gradients
from .conv_mlp import _KERNEL_DTYPES, _check_kernel_input, _has_cpu_kernel, _use_kernel
from .depthwise import dw_conv_weight_grad
from .functional import _dtype_name, _shape

__all__ = ["check_strip_offsets_args", "strip_offsets", "strip_offsets_available", "strip_offsets_reference"]

_CPU_KERNEL = _has_cpu_kernel("strip_offsets")


def strip_offsets_available(input: torch.Tensor) -> bool:
    """Whether the fused kernel (forward and backward) can run `input`: built, on CPU, and float32 or float64."""
    return _CPU_KERNEL and input.device.type == "cpu" and input.dtype in _KERNEL_DTYPES


def check_strip_offsets_args(input, dw_weight, dw_bias, ln_weight, ln_bias, eps, lin_weight, lin_bias, on_x):
    """Checks a strip_offsets call as the C++ kernel does (same messages); returns the output shape (N, H, W, GK').

    Raises:
        ValueError: A shape, dtype, device or value the operator does not accept, named with expected and actual.
    """
    _check_kernel_input("strip_offsets", input)
    if dw_weight.dim() != 4:
        raise ValueError(f"strip_offsets: dw_weight must be 4-D; got shape {_shape(dw_weight)}")
    if lin_weight.dim() != 2:
        raise ValueError(f"strip_offsets: lin_weight must be 2-D (G * K', C); got shape {_shape(lin_weight)}")
    n, c, h, w = input.shape
    across = dw_weight.shape[2] if on_x else dw_weight.shape[3]
    if across != 1:  # a kernel along the wrong axis: say so rather than report a shape built from its other side
        layout = "[C, 1, 1, K] (a kernel along W, on_x=True)" if on_x else "[C, 1, K, 1] (a kernel along H, on_x=False)"
        raise ValueError(f"strip_offsets: dw_weight must have shape {layout}; got {_shape(dw_weight)}")
    k = dw_weight.shape[3] if on_x else dw_weight.shape[2]
    if k % 2 != 1:
        raise ValueError(f"strip_offsets: the depthwise kernel length must be odd ('same' padding); got {k}")
    gk = lin_weight.shape[0]
    params = [(dw_weight, "dw_weight", (c, 1, 1, k) if on_x else (c, 1, k, 1)), (dw_bias, "dw_bias", (c,)),
              (ln_weight, "ln_weight", (c,)), (ln_bias, "ln_bias", (c,)), (lin_weight, "lin_weight", (gk, c)),
              (lin_bias, "lin_bias", (gk,))]
    for t, name, expected in params:
        if t is None:
            continue
        if tuple(t.shape) != expected:
            raise ValueError(f"strip_offsets: {name} must have shape [{', '.join(map(str, expected))}]; got "
                             f"{_shape(t)}")
        if t.dtype != input.dtype:
            raise ValueError(f"strip_offsets: {name} dtype must equal input dtype {_dtype_name(input.dtype)}; got "
                             f"{_dtype_name(t.dtype)}")
        if t.device != input.device:
            raise ValueError(f"strip_offsets: {name} must be on the input's device {input.device}; got {t.device}")
    if not eps >= 0:
        raise ValueError(f"strip_offsets: eps must be >= 0; got {eps}")
    return n, h, w, gk


def _conv_padding(dw_weight: torch.Tensor, on_x: bool) -> tuple[int, int]:
    k = dw_weight.shape[3] if on_x else dw_weight.shape[2]
    return (0, (k - 1) // 2) if on_x else ((k - 1) // 2, 0)


def strip_offsets_reference(input, dw_weight, dw_bias, ln_weight, ln_bias, eps, lin_weight, lin_bias, on_x):
    """The branch layer by layer in PyTorch operators (any device and dtype, differentiable)."""
    padding = _conv_padding(dw_weight, on_x)
    x = F.conv2d(input, dw_weight, dw_bias, padding=padding, groups=input.shape[1]).permute(0, 2, 3, 1)
    x = F.gelu(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps))
    return F.linear(x, lin_weight, lin_bias)


def strip_offsets(
        input: torch.Tensor,
        dw_weight: torch.Tensor,
        dw_bias: torch.Tensor | None,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        eps: float,
        lin_weight: torch.Tensor,
        lin_bias: torch.Tensor | None,
        on_x: bool,
        backend: str = "auto",
) -> torch.Tensor:
    """``linear(gelu(layer_norm(dwconv_strip(input))))``: a DSCN layer's offsets, fused on CPU.

    Args:
        input: (N, C, H, W) offset source; channels_last memory avoids a copy.
        dw_weight: (C, 1, 1, K) for the x-strip (`on_x`), (C, 1, K, 1) for the y-strip; K odd, 'same' zero padding.
        dw_bias: (C,) or None.
        ln_weight, ln_bias: (C,) LayerNorm affine parameters; eps: its epsilon.
        lin_weight: (G * K', C); lin_bias: (G * K',) or None.
        on_x: The strip runs along W (True) or H (False).
        backend: 'auto' runs the fused kernel (differentiable) when :func:`strip_offsets_available`, else
            :func:`strip_offsets_reference`; 'cpp' requires the kernel; 'pytorch' always runs the reference.

    Returns:
        (N, H, W, G * K') offsets, contiguous.

    Raises:
        ValueError: Bad shapes, dtypes, devices or values, or an unknown backend.
        RuntimeError: backend='cpp' where the kernel cannot run.
    """
    args = (input, dw_weight, dw_bias, ln_weight, ln_bias, eps, lin_weight, lin_bias, on_x)
    if not _use_kernel("strip_offsets", backend, strip_offsets_available(input), _CPU_KERNEL, input):
        return strip_offsets_reference(*args)
    return torch.ops.ops_dscn.strip_offsets(*args)


if _CPU_KERNEL:

    @torch.library.register_fake("ops_dscn::strip_offsets")
    def _strip_offsets_fake(*args):
        return args[0].new_empty(check_strip_offsets_args(*args))

    @torch.library.register_fake("ops_dscn::_strip_offsets_backward")
    def _strip_offsets_backward_fake(grad_output, input, dw_weight, dw_bias, ln_weight, ln_bias, eps, lin_weight,
                                     on_x):
        n, h, w, gk = check_strip_offsets_args(input, dw_weight, dw_bias, ln_weight, ln_bias, eps, lin_weight, None,
                                               on_x)
        if tuple(grad_output.shape) != (n, h, w, gk):
            raise ValueError(f"strip_offsets backward: grad_output must have shape [{n}, {h}, {w}, {gk}]; got "
                             f"{_shape(grad_output)}")
        c = input.shape[1]
        return (input.new_empty((n, h, w, c)).permute(0, 3, 1, 2), input.new_empty(c), input.new_empty(c),
                input.new_empty((gk, c)), input.new_empty(gk))

    def _setup_context(ctx, inputs, output):
        input, dw_weight, dw_bias, ln_weight, ln_bias, eps, lin_weight, lin_bias, on_x = inputs
        # Only the input and the parameters are kept: the backward recomputes the branch.
        ctx.save_for_backward(input, dw_weight, dw_bias, ln_weight, ln_bias, lin_weight, lin_bias)
        ctx.eps, ctx.on_x = eps, on_x
        ctx.has_bias = (dw_bias is not None, lin_bias is not None)

    def _backward(ctx, grad_output):
        input, dw_weight, dw_bias, ln_weight, ln_bias, lin_weight, lin_bias = ctx.saved_tensors
        if recording_backward():  # create_graph=True: gradients that can be differentiated again
            return tuple(twin_gradients(strip_offsets_reference, (input, dw_weight, dw_bias, ln_weight, ln_bias,
                                                                  ctx.eps, lin_weight, lin_bias, ctx.on_x),
                                        grad_output, ctx.needs_input_grad))
        g_conv, g_lnw, g_lnb, g_linw, g_linb = torch.ops.ops_dscn._strip_offsets_backward(
            grad_output, input, dw_weight, dw_bias, ln_weight, ln_bias, ctx.eps, lin_weight, ctx.on_x)
        padding = _conv_padding(dw_weight, ctx.on_x)
        x = input.contiguous(memory_format=torch.channels_last)  # g_conv is channels_last: both on the fast path
        needs = ctx.needs_input_grad
        g_in = g_w = g_b = None
        if needs[0]:
            g_in = torch.ops.aten.convolution_backward(g_conv, x, dw_weight, None, [1, 1], list(padding), [1, 1],
                                                      False, [0, 0], x.shape[1], [True, False, False])[0]
        if needs[1]:
            g_w = dw_conv_weight_grad(g_conv, x, dw_weight.shape[2:], padding=padding)
        has_dw_bias, has_lin_bias = ctx.has_bias
        if has_dw_bias and needs[2]:
            g_b = g_conv.sum((0, 2, 3))
        return g_in, g_w, g_b, g_lnw, g_lnb, None, g_linw, g_linb if has_lin_bias else None, None

    torch.library.register_autograd("ops_dscn::strip_offsets", _backward, setup_context=_setup_context)
