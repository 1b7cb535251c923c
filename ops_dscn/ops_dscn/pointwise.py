"""A 1x1 convolution with the elementwise operations after it fused, for CPU: ``ops_dscn::pointwise_conv``.

DSAN's attention runs three 1x1 convs per block, each followed by one elementwise operation: ``proj_1`` -> exact
GELU, the gating unit's ``conv`` -> times its input ``u``, ``proj_2`` -> plus the block's shortcut (times the folded
layer scale after ``reparameterize``). :func:`pointwise_conv` computes

    y = act(conv1x1(input, weight) + bias) * gate + residual * residual_scale

as one matrix product on channels_last memory whose output blocks get the epilogue while they are in cache
(``csrc/cpu/pointwise_cpu.cpp``), where the kernel applies (CPU float32/float64), and as those operators one by one,
:func:`pointwise_conv_reference`, elsewhere. Its backward recomputes the product from the input.
"""

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from .conv_mlp import (
    _KERNEL_DTYPES,
    _check_kernel_input,
    _check_same_device,
    _has_cpu_kernel,
    _use_kernel,
    check_packed,
    packed_size,
)
from .functional import _dtype_name, _shape

__all__ = ["KeepsPackedWeights", "keep_packed_weight", "kept_packed_weight", "optimizer_step_count", "pack_weight",
           "pack_weight_available", "pointwise_conv", "pointwise_conv_available", "pointwise_conv_reference"]

_CPU_KERNEL = _has_cpu_kernel("pointwise_conv")
_PACK_KERNEL = _has_cpu_kernel("pack_weight")


def pack_weight_available(weight: torch.Tensor) -> bool:
    """Whether :func:`pack_weight` can pack `weight`: built, a CPU float32 tensor."""
    return _PACK_KERNEL and weight.device.type == "cpu" and weight.dtype == torch.float32


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv / Linear weight in the layout the CPU kernels' matrix products read, for inference.

    :func:`pointwise_conv` (`packed`) and :func:`~ops_dscn.conv_mlp` (`fc1_packed`, `fc2_packed`) otherwise copy
    their weights into this layout, or leave the product to the BLAS, which repacks them, on every call; on one image
    that was 20-30 % of the MLP's time. The packed tensor is a snapshot: pack again after changing the weight.

    Args:
        weight: (C_out, C, 1, 1) or (C_out, C), float32, on the CPU.

    Returns:
        (packed_size(C_out, C),) float32: panels of 64 output channels, each (C, width) with the width padded to
        whole 64-byte vectors. Not differentiable.

    Raises:
        ValueError: Bad shape or dtype.
        RuntimeError: ops_dscn was built without the kernel, or `weight` is not on the CPU.
    """
    if not _PACK_KERNEL:
        raise RuntimeError("pack_weight: ops_dscn was built without the kernel (rebuild ops_dscn)")
    return torch.ops.ops_dscn.pack_weight(weight.detach())


_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# torch.optim's fused steps (Adam / AdamW / SGD with fused=True) update the parameters in place without bumping
# their version counters, so a copy made from a weight (packed, folded) cannot see them: every optimizer step is
# counted here (a hook common to all optimizers), and the copies are keyed on the count too.
register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_step_count() -> int:
    """How many ``torch.optim`` optimizer steps this process has taken (part of what keys kept weight copies)."""
    return _optimizer_steps


def _weight_key(weight: torch.Tensor) -> tuple[int, int | None, int]:
    """What identifies a weight's values between calls: its memory, its version counter (bumped by every in-place
    change through PyTorch's operators; inference tensors, which have none, by their memory only) and the optimizer
    step count (fused steps bump no version counter)."""
    return weight.data_ptr(), None if weight.is_inference() else weight._version, _optimizer_steps


def keep_packed_weight(owner: torch.nn.Module, name: str, weight: torch.Tensor) -> None:
    """Store ``pack_weight(weight)`` as `owner`'s non-persistent buffer `name`, for inference.

    None is stored where packing does not apply (not a CPU float32 weight, or an extension built without the
    kernel). The buffer is not in the state_dict; :func:`kept_packed_weight` reads it back.

    Args:
        owner: The module that uses `weight`.
        name: Buffer name.
        weight: (C_out, C, 1, 1) or (C_out, C).
    """
    packed = pack_weight(weight) if pack_weight_available(weight) else None
    owner.register_buffer(name, packed, persistent=False)
    owner.__dict__.setdefault("_packed_keys", {})[name] = _weight_key(weight)


class KeepsPackedWeights:
    """Mixin for a module that keeps weights packed by :func:`keep_packed_weight` (put it before the nn.Module base).

    ``train()`` and ``eval()`` make every packed weight of the module be packed again at its next use, so that a
    change through ``.data`` (which no version counter sees) takes effect from the next mode switch.
    """

    def train(self, mode: bool = True):
        self.__dict__.pop("_packed_keys", None)
        return super().train(mode)


def kept_packed_weight(owner: torch.nn.Module, name: str, weight: torch.Tensor,
                       input: torch.Tensor) -> torch.Tensor | None:
    """`owner`'s buffer `name` (`weight` packed by :func:`keep_packed_weight`) for a call on `input` that needs no
    gradient of `weight`; None where there is none or it does not apply (a float64 input, another device, gradients).

    In eager mode a buffer packed from other values (the weight changed in place, was replaced, or the module was
    copied) is packed again first; a change through ``.data`` counts from the owner's next ``train()`` / ``eval()``
    where the owner is a :class:`KeepsPackedWeights`. Compiled code takes the buffer as it is: as with inductor's
    freezing, a module with packed weights is a snapshot for inference.
    """
    packed = getattr(owner, name, None)
    if (packed is None or input.dtype != torch.float32 or packed.dtype != torch.float32
            or packed.device != input.device or (torch.is_grad_enabled() and weight.requires_grad)):
        return None
    if not torch.compiler.is_compiling() and owner.__dict__.get("_packed_keys", {}).get(name) != _weight_key(weight):
        keep_packed_weight(owner, name, weight)
        packed = getattr(owner, name)
    return packed


def pointwise_conv_available(input: torch.Tensor) -> bool:
    """Whether the fused kernel can run `input`: built, on CPU, and float32 or float64."""
    return _CPU_KERNEL and input.device.type == "cpu" and input.dtype in _KERNEL_DTYPES


def pointwise_conv_reference(input, weight, bias=None, gelu=False, gate=None, residual=None, residual_scale=None):
    """:func:`pointwise_conv` by PyTorch's operators, one by one (any device and dtype)."""
    y = F.conv2d(input, weight.reshape(weight.shape[0], -1, 1, 1), bias)
    if gelu:
        y = F.gelu(y)
    if gate is not None:
        y = y * gate
    if residual is not None:
        y = y + (residual if residual_scale is None else residual * residual_scale.reshape(-1, 1, 1))
    return y


def pointwise_conv(input, weight, bias=None, gelu=False, gate=None, residual=None, residual_scale=None,
                   backend="auto", packed=None):
    """``act(conv1x1(input) + bias) * gate + residual * residual_scale``; act is the exact GELU if `gelu`.

    Args:
        input: (N, C, H, W); channels_last memory avoids a copy.
        weight: (C_out, C, 1, 1) or (C_out, C).
        bias: (C_out,) or None.
        gelu: Apply the exact (erf) GELU after the bias.
        gate: (N, C_out, H, W) or None: multiplies the activation.
        residual: (N, C_out, H, W) or None: added last.
        residual_scale: C_out values ((C_out,) or (C_out, 1, 1)) multiplying `residual`, or None (1).
        backend: 'auto' (the kernel where it applies), 'cpp' (the kernel, or an error) or 'pytorch' (the reference).
        packed: ``pack_weight(weight)`` (float32), made once for inference, or None. It must be packed from
            `weight`: the forward's product reads it in place of `weight` (the backward and the reference path use
            `weight`).

    Returns:
        (N, C_out, H, W); channels_last memory from the kernel. Differentiable.
    """
    if _use_kernel("pointwise_conv", backend, pointwise_conv_available(input), _CPU_KERNEL, input):
        if packed is None:
            return torch.ops.ops_dscn.pointwise_conv(input, weight, bias, gelu, gate, residual, residual_scale)
        return torch.ops.ops_dscn.pointwise_conv(input, weight, bias, gelu, gate, residual, residual_scale, packed)
    return pointwise_conv_reference(input, weight, bias, gelu, gate, residual, residual_scale)


def _check_args(input, weight, bias, gate, residual, residual_scale, packed=None):
    """Checks a pointwise_conv call as the C++ kernel does (same messages, same order); returns the output shape.

    Raises:
        ValueError: naming the argument, what it must be and what it got.
    """
    op = "pointwise_conv"
    _check_kernel_input(op, input)
    dtype = _dtype_name(input.dtype)

    def same_dtype(t, name):
        if t.dtype != input.dtype:
            raise ValueError(f"{op}: {name} dtype must equal input dtype {dtype}; got {_dtype_name(t.dtype)}")
        _check_same_device(op, input, **{name: t})

    n, c, h, w = input.shape
    if not ((weight.dim() == 4 and weight.shape[2:] == (1, 1)) or weight.dim() == 2):
        raise ValueError(f"{op}: weight must have shape (C_out, C, 1, 1) or (C_out, C); got {_shape(weight)}")
    if weight.shape[1] != c:
        raise ValueError(f"{op}: weight must have C = {c} input channels (the input's); got {weight.shape[1]} in "
                         f"shape {_shape(weight)}")
    same_dtype(weight, "weight")
    co = weight.shape[0]
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != co:
            raise ValueError(f"{op}: bias must have shape ({co},); got {_shape(bias)}")
        same_dtype(bias, "bias")
    if residual_scale is not None:
        if residual is None:
            raise ValueError(f"{op}: residual_scale needs a residual; got none")
        if residual_scale.numel() != co or residual_scale.dim() not in (1, 3):
            raise ValueError(f"{op}: residual_scale must have shape ({co},) or ({co}, 1, 1); got "
                             f"{_shape(residual_scale)}")
        same_dtype(residual_scale, "residual_scale")
    if packed is not None:
        check_packed(op, "packed", packed, co, c, input)
    out = (n, co, h, w)
    for t, name in ((gate, "gate"), (residual, "residual")):
        if t is not None:
            if tuple(t.shape) != out:
                raise ValueError(f"{op}: {name} must have the output's shape [{', '.join(map(str, out))}]; got "
                                 f"{_shape(t)}")
            same_dtype(t, name)
    return out


if _CPU_KERNEL:

    @torch.library.register_fake("ops_dscn::pointwise_conv")
    def _pointwise_conv_fake(input, weight, bias=None, gelu=False, gate=None, residual=None, residual_scale=None,
                             packed=None):
        shape = _check_args(input, weight, bias, gate, residual, residual_scale, packed)
        return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=torch.channels_last)

    def _pointwise_conv_setup_context(ctx, inputs, output):
        input, weight, bias, gelu, gate, residual, residual_scale = inputs[:7]
        ctx.save_for_backward(input, weight, bias, gate, residual, residual_scale)
        ctx.gelu = gelu

    def _pointwise_conv_backward(ctx, grad):
        input, weight, bias, gate, residual, residual_scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        co = weight.shape[0]
        w2 = weight.reshape(co, -1)
        g_res = g_scale = g_gate = None
        if residual is not None:
            if need[5]:
                g_res = grad if residual_scale is None else grad * residual_scale.reshape(-1, 1, 1)
            if residual_scale is not None and need[6]:
                g_scale = (grad * residual).sum((0, 2, 3)).reshape(residual_scale.shape)
        g_x = g_w = g_b = None
        if any(need[:3]) or (gate is not None and need[4]):
            # The product again (autograd kept the input only), then back through the activation and the gate.
            x = input.permute(0, 2, 3, 1)  # NHWC view: free for channels_last memory
            z = F.linear(x, w2, bias)
            a = F.gelu(z) if ctx.gelu else z
            g = grad.permute(0, 2, 3, 1)
            if gate is not None:
                gp = gate.permute(0, 2, 3, 1)
                if need[4]:
                    g_gate = (g * a).permute(0, 3, 1, 2)
                g = g * gp
            if ctx.gelu:
                g = torch.ops.aten.gelu_backward(g, z)
            g2 = g.reshape(-1, co)
            if need[0]:
                g_x = (g2 @ w2).reshape(x.shape).permute(0, 3, 1, 2)
            if need[1]:
                g_w = (g2.t() @ x.reshape(-1, x.shape[-1])).reshape(weight.shape)
            if bias is not None and need[2]:
                g_b = g2.sum(0)
        return g_x, g_w, g_b, None, g_gate, g_res, g_scale, None  # no gradient for the packed weight

    torch.library.register_autograd("ops_dscn::pointwise_conv", _pointwise_conv_backward,
                                    setup_context=_pointwise_conv_setup_context)


if _PACK_KERNEL:

    @torch.library.register_fake("ops_dscn::pack_weight")
    def _pack_weight_fake(weight):
        if not ((weight.dim() == 4 and weight.shape[2:] == (1, 1)) or weight.dim() == 2):
            raise ValueError(f"pack_weight: weight must have shape (C_out, C, 1, 1) or (C_out, C); got "
                             f"{_shape(weight)}")
        if weight.dtype != torch.float32:
            raise ValueError(f"pack_weight: weight dtype must be float32; got {_dtype_name(weight.dtype)}")
        return weight.new_empty(packed_size(weight.shape[0], weight.shape[1]))
