"""The exact (erf) GELU as a CPU operator with a fast backward: ``ops_dscn::gelu``.

ATen's float GELU and GELU backward are compute-bound on CPU (2-4 ns per element on 2 threads, several times a
multiply's time); ``csrc/cpu/gelu_cpu.cpp`` evaluates the same function with the vectorized float erf and exp of
the fused kernels and runs at memory speed. DSAN uses it where a GELU stays on its own in training (the attention's
``proj_1``, the MLPs too small for the fused MLP kernel). :func:`gelu` picks the kernel where it applies (a CPU
float32/float64 tensor) and ``F.gelu`` elsewhere; both compute ``x * Phi(x)`` to float rounding.
"""

import torch
import torch.nn.functional as F

from ._double_backward import recording_backward, twin_gradients
from .conv_mlp import _KERNEL_DTYPES, _check_same_device, _has_cpu_kernel, _use_kernel
from .functional import _dtype_name, _shape

__all__ = ["gelu", "gelu_available"]

_CPU_KERNEL = _has_cpu_kernel("gelu")


def gelu_available(input: torch.Tensor) -> bool:
    """Whether the kernel can run `input`: built, on CPU, and float32 or float64."""
    return _CPU_KERNEL and input.device.type == "cpu" and input.dtype in _KERNEL_DTYPES


def gelu(input: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The exact GELU, ``input * Phi(input)``, elementwise.

    Args:
        input: A tensor of any shape; a dense one (e.g. channels_last) is read in place and its strides kept.
        backend: 'auto' (the kernel where it applies), 'cpp' (the kernel, or an error) or 'pytorch' (``F.gelu``).

    Returns:
        A tensor of `input`'s shape, dtype and (for dense inputs) strides. Differentiable.
    """
    if _use_kernel("gelu", backend, gelu_available(input), _CPU_KERNEL, input):
        return torch.ops.ops_dscn.gelu(input)
    return F.gelu(input)


def _check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"{op}: {name} dtype must be one of float32, float64; got {_dtype_name(t.dtype)}")


if _CPU_KERNEL:

    @torch.library.register_fake("ops_dscn::gelu")
    def _gelu_fake(input):
        _check_dtype("gelu", "input", input)
        return torch.empty_like(input)

    @torch.library.register_fake("ops_dscn::_gelu_backward")
    def _gelu_backward_fake(grad_output, input):
        _check_dtype("_gelu_backward", "input", input)
        if grad_output.shape != input.shape:
            raise ValueError(f"_gelu_backward: grad_output must have the input's shape {_shape(input)}; got "
                             f"{_shape(grad_output)}")
        _check_same_device("_gelu_backward", input, grad_output=grad_output)
        return torch.empty_like(input)

    def _gelu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _gelu_backward(ctx, grad):
        (input,) = ctx.saved_tensors
        if recording_backward():  # create_graph=True: a gradient that can be differentiated again
            return twin_gradients(F.gelu, (input,), grad, ctx.needs_input_grad)[0]
        return torch.ops.ops_dscn._gelu_backward(grad, input)

    torch.library.register_autograd("ops_dscn::gelu", _gelu_backward, setup_context=_gelu_setup_context)
