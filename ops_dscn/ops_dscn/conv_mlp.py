"""DSAN's convolutional MLP fused into one operator on CPU, forward and backward.

The MLP of a DSAN block is fc1 (1x1 conv, C -> hidden) -> depthwise 3x3 conv -> exact GELU -> fc2 (1x1 conv,
hidden -> C_out). Run as four operators, each streams the hidden tensor (4-8x wider than the input) through memory,
forward and backward, and autograd keeps three of them; ``ops_dscn::conv_mlp`` computes it a few image rows at a
time so that the hidden rows stay in cache, and its backward (``ops_dscn::_conv_mlp_backward``) recomputes them
from the input, the only tensor autograd keeps (see ``csrc/cpu/conv_mlp_cpu.cpp``). :func:`conv_mlp` picks that
kernel where it applies (a CPU float32/float64 input) and the unfused PyTorch operators, :func:`conv_mlp_reference`,
elsewhere.

Parameter gradients are summed per thread: the same bits on every call at a fixed ``torch.get_num_threads()``,
rounded differently at another thread count.
"""

import torch
import torch.nn.functional as F

from ._double_backward import recording_backward, twin_gradients
from .functional import _dtype_name, _shape, extension_available

__all__ = ["check_conv_mlp_args", "conv_mlp", "conv_mlp_available", "conv_mlp_reference"]

_KERNEL_DTYPES = (torch.float32, torch.float64)
_BACKENDS = ("auto", "cpp", "pytorch")


def _has_cpu_kernel(op: str) -> bool:
    """Whether the extension registered a CPU kernel for ``ops_dscn::<op>`` (False on a build without the op)."""
    if not extension_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"ops_dscn::{op}", torch._C.DispatchKey.CPU)
    except RuntimeError:  # an older build of the extension, without the op
        return False


# Registrations are static: read once, so that torch.compile does not graph-break on the dispatcher query.
_CPU_KERNEL = _has_cpu_kernel("conv_mlp")


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use_kernel(op: str, backend: str, usable: bool, built: bool, input: torch.Tensor) -> bool:
    """Whether `backend` runs the fused kernel of ``ops_dscn::<op>`` (True) or its reference (False).

    Raises:
        ValueError: Unknown backend.
        RuntimeError: backend='cpp' where the kernel cannot run (`usable` False).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"{op}: backend must be one of {_BACKENDS}; got {backend!r}")
    if backend == "pytorch":
        return False
    if backend == "auto":
        return usable
    if not usable:
        raise RuntimeError(
            f"{op}: backend='cpp' needs the compiled kernel and a CPU float32/float64 input; got a "
            f"{_dtype_name(input.dtype)} tensor on {input.device}"
            + ("" if built else f" and ops_dscn was built without {op} (rebuild ops_dscn)"))
    return True


def _check_kernel_input(op: str, input: torch.Tensor) -> None:
    """The input checks the CPU kernels of conv_mlp, strip_offsets and _dw_conv_weight_grad share (same messages).

    Raises:
        ValueError: `input` is not 4-D (N, C, H, W), or not float32 / float64.
    """
    if input.dim() != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W); got {input.dim()}-D with shape {_shape(input)}")
    if input.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"{op}: input dtype must be one of float32, float64; got {_dtype_name(input.dtype)}")


def _check_same_device(op: str, input: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    # For the fake kernels: a meta tensor among CPU ones sends the call to them, and they must not return a tensor of
    # uninitialized memory on the input's device.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise ValueError(f"{op}: {name} must be on the input's device {input.device}; got {t.device}")


# The layout of ops_dscn::pack_weight (csrc/cpu/cpu_small_gemm.h, PanelMatrix): panels of 64 output columns, each
# (C, width) with the width padded to whole 16-float (64-byte) vectors, three vectors padded to four.
_PANEL = 64
_LANE = 16


def packed_size(c_out: int, c_in: int) -> int:
    """Number of float32 values in ``pack_weight`` of a (c_out, c_in) weight."""
    size = 0
    for c in range(0, c_out, _PANEL):
        ld = -(-min(_PANEL, c_out - c) // _LANE) * _LANE
        size += c_in * (4 * _LANE if ld == 3 * _LANE else ld)
    return size


def check_packed(op: str, name: str, packed: torch.Tensor, c_out: int, c_in: int, input: torch.Tensor) -> None:
    """Checks a packed weight argument as the C++ kernels do (same messages).

    Raises:
        ValueError: `packed` is not the 1-D contiguous float32 CPU packed form of a (c_out, c_in) weight, or `input`
            is not float32.
    """
    if input.dtype != torch.float32:
        raise ValueError(f"{op}: {name} (packed weights) needs a float32 input; got {_dtype_name(input.dtype)}")
    size = packed_size(c_out, c_in)
    if packed.dim() != 1 or packed.numel() != size:
        raise ValueError(f"{op}: {name} must have shape ({size},), the packed form of a ({c_out}, {c_in}) weight "
                         f"(ops_dscn.pack_weight); got {_shape(packed)}")
    if packed.dtype != torch.float32:
        raise ValueError(f"{op}: {name} dtype must be float32; got {_dtype_name(packed.dtype)}")
    if packed.device.type != "cpu":
        raise ValueError(f"{op}: {name} must be a CPU tensor; got {packed.device}")
    if not packed.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; got strides {list(packed.stride())}")


def conv_mlp_available(input: torch.Tensor) -> bool:
    """Whether the fused kernel (forward and backward) can run `input`: built, on CPU, and float32 or float64."""
    return _CPU_KERNEL and input.device.type == "cpu" and input.dtype in _KERNEL_DTYPES


def check_conv_mlp_args(input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, residual=None,
                        residual_name="residual"):
    """Checks a conv_mlp call as the C++ kernel does (same messages) and returns the output shape.

    Used by the fake kernels, so compiled and eager code reject the same calls (the backward's grad_output is
    checked as a residual, named `residual_name`).

    Returns:
        (N, C_out, H, W).

    Raises:
        ValueError: A shape, dtype or device that the operator does not accept, named with expected and actual.
    """
    _check_kernel_input("conv_mlp", input)
    if fc1_weight.dim() != 4:
        raise ValueError(f"conv_mlp: fc1_weight must be 4-D (hidden, C, 1, 1); got shape {_shape(fc1_weight)}")
    if fc2_weight.dim() != 4:
        raise ValueError(f"conv_mlp: fc2_weight must be 4-D (C_out, hidden, 1, 1); got shape {_shape(fc2_weight)}")
    n, c, h, w = input.shape
    hidden, c_out = fc1_weight.shape[0], fc2_weight.shape[0]

    def same(t, name):
        if t.dtype != input.dtype:
            raise ValueError(f"conv_mlp: {name} dtype must equal input dtype {_dtype_name(input.dtype)}; got "
                             f"{_dtype_name(t.dtype)}")
        if t.device != input.device:
            raise ValueError(f"conv_mlp: {name} must be on the input's device {input.device}; got {t.device}")

    for t, name, expected in ((fc1_weight, "fc1_weight", (hidden, c, 1, 1)),
                              (dw_weight, "dw_weight", (hidden, 1, 3, 3)),
                              (fc2_weight, "fc2_weight", (c_out, hidden, 1, 1))):
        if tuple(t.shape) != expected:
            raise ValueError(f"conv_mlp: {name} must have shape [{', '.join(map(str, expected))}]; got {_shape(t)}")
        same(t, name)
    for t, name, expected in ((fc1_bias, "fc1_bias", hidden), (dw_bias, "dw_bias", hidden),
                              (fc2_bias, "fc2_bias", c_out)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != expected:
            raise ValueError(f"conv_mlp: {name} must have shape ({expected},); got {_shape(t)}")
        same(t, name)
    if residual is not None:
        name = residual_name
        if tuple(residual.shape) != (n, c_out, h, w):
            raise ValueError(f"conv_mlp: {name} must have shape [{n}, {c_out}, {h}, {w}]; got {_shape(residual)}")
        if residual.dtype != input.dtype:
            raise ValueError(f"conv_mlp: {name} dtype must equal input dtype {_dtype_name(input.dtype)}; got "
                             f"{_dtype_name(residual.dtype)}")
        if residual.device != input.device:
            raise ValueError(f"conv_mlp: {name} must be on the input's device {input.device}; got {residual.device}")
    return n, c_out, h, w


def conv_mlp_reference(input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, residual=None):
    """The unfused MLP in PyTorch operators (any device and dtype, differentiable): what the kernel computes."""
    x = F.conv2d(input, fc1_weight, fc1_bias)
    x = F.gelu(F.conv2d(x, dw_weight, dw_bias, padding=1, groups=dw_weight.shape[0]))
    x = F.conv2d(x, fc2_weight, fc2_bias)
    return x if residual is None else x + residual


def conv_mlp(
        input: torch.Tensor,
        fc1_weight: torch.Tensor,
        fc1_bias: torch.Tensor | None,
        dw_weight: torch.Tensor,
        dw_bias: torch.Tensor | None,
        fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor | None,
        residual: torch.Tensor | None = None,
        backend: str = "auto",
        fc1_packed: torch.Tensor | None = None,
        fc2_packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fc2(gelu(dwconv3x3(fc1(input)))) [+ residual]``, fused on CPU for inference.

    Args:
        input: (N, C, H, W); channels_last memory avoids a copy.
        fc1_weight: (hidden, C, 1, 1); fc1_bias: (hidden,) or None.
        dw_weight: (hidden, 1, 3, 3), depthwise, padding 1; dw_bias: (hidden,) or None.
        fc2_weight: (C_out, hidden, 1, 1); fc2_bias: (C_out,) or None.
        residual: (N, C_out, H, W) added to the output, or None.
        backend: 'auto' runs the fused kernel when :func:`conv_mlp_available`, else :func:`conv_mlp_reference`;
            'cpp' requires the kernel; 'pytorch' always runs the reference. The kernel is differentiable in every
            input (second derivatives through the reference).
        fc1_packed, fc2_packed: ``pack_weight(fc1_weight)`` and ``pack_weight(fc2_weight)`` (float32), made once for
            inference so that the kernel does not copy the weights on every call; both or neither. They must be
            packed from the weights given (the forward reads them in place of the weights; the backward and the
            reference path use the weights). Ignored by the reference path.

    Returns:
        (N, C_out, H, W); channels_last memory from the kernel.

    Raises:
        ValueError: Bad shapes, dtypes or devices (also from the reference path's checks), or an unknown backend.
        RuntimeError: backend='cpp' where the kernel cannot run.
    """
    tensors = (input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, residual)
    if not _use_kernel("conv_mlp", backend, conv_mlp_available(input), _CPU_KERNEL, input):
        return conv_mlp_reference(*tensors)
    if fc1_packed is None and fc2_packed is None:
        return torch.ops.ops_dscn.conv_mlp(*tensors)
    return torch.ops.ops_dscn.conv_mlp(*tensors, fc1_packed, fc2_packed)


if _CPU_KERNEL:

    @torch.library.register_fake("ops_dscn::conv_mlp")
    def _conv_mlp_fake(input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, residual=None,
                       fc1_packed=None, fc2_packed=None):
        shape = check_conv_mlp_args(input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, residual)
        if (fc1_packed is None) != (fc2_packed is None):
            raise ValueError("conv_mlp: fc1_packed and fc2_packed must be given together; got only "
                             + ("fc1_packed" if fc1_packed is not None else "fc2_packed"))
        if fc1_packed is not None:
            check_packed("conv_mlp", "fc1_packed", fc1_packed, fc1_weight.shape[0], fc1_weight.shape[1], input)
            check_packed("conv_mlp", "fc2_packed", fc2_packed, fc2_weight.shape[0], fc2_weight.shape[1], input)
        return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=torch.channels_last)

    @torch.library.register_fake("ops_dscn::_conv_mlp_backward")
    def _conv_mlp_backward_fake(grad_output, input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight):
        check_conv_mlp_args(input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, None, grad_output,
                            residual_name="grad_output")
        hidden, c_out = fc1_weight.shape[0], fc2_weight.shape[0]
        new = fc1_weight.new_empty
        return (torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=torch.channels_last),
                new(fc1_weight.shape), new(hidden), new(dw_weight.shape), new(hidden), new(fc2_weight.shape),
                new(c_out))

    def _setup_context(ctx, inputs, output):
        input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, residual = inputs[:8]
        # Only the input and the weights are kept: the backward recomputes the hidden rows.
        ctx.save_for_backward(input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias)
        ctx.has_bias = (fc1_bias is not None, dw_bias is not None, fc2_bias is not None)
        ctx.has_residual = residual is not None

    def _backward(ctx, grad_output):
        input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias = ctx.saved_tensors
        if recording_backward():  # create_graph=True: gradients that can be differentiated again
            grads = twin_gradients(conv_mlp_reference, (input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight,
                                                        fc2_bias), grad_output, ctx.needs_input_grad[:7])
            # The residual is added: its gradient is grad_output itself, whatever its value.
            return (*grads, grad_output if ctx.needs_input_grad[7] else None, None, None)
        g_in, g_w1, g_b1, g_wd, g_bd, g_w2, g_b2 = torch.ops.ops_dscn._conv_mlp_backward(
            grad_output, input, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight)
        has_b1, has_bd, has_b2 = ctx.has_bias
        return (g_in, g_w1, g_b1 if has_b1 else None, g_wd, g_bd if has_bd else None, g_w2, g_b2 if has_b2 else None,
                grad_output if ctx.has_residual else None, None, None)  # no gradients for the packed weights

    torch.library.register_autograd("ops_dscn::conv_mlp", _backward, setup_context=_setup_context)
