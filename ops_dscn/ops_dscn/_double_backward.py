"""Second derivatives of the compiled operators, through their pure-PyTorch twins.

The compiled backward kernels (``ops_dscn::_dscn_backward``, ``_strip_offsets_backward``, ``_conv_mlp_backward``,
``_gelu_backward``, ``_dw_conv_weight_grad``) have no derivative of their own: a gradient taken through them with
``create_graph=True`` would silently lose every second-order term. Autograd enables grad mode inside a backward
only when it records that backward (``create_graph=True``), so each op's backward formula asks
:func:`recording_backward` and, if so, returns the gradients of its twin instead: the same function in
differentiable PyTorch operators, so gradient penalties and ``gradgradcheck`` see the true second derivatives. The
ordinary backward (grad mode off) and ``torch.compile``'s traced backward keep the kernels.
"""

from collections.abc import Callable, Sequence

import torch

__all__ = ["recording_backward", "twin_gradients"]


def recording_backward() -> bool:
    """Whether the running backward is itself recorded by autograd (``create_graph=True``)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def twin_gradients(twin: Callable[..., torch.Tensor], inputs: Sequence, grad_output: torch.Tensor,
                   needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """Differentiable gradients of ``twin(*inputs)`` with respect to the inputs that `needs` marks.

    Args:
        twin: The op's function in differentiable PyTorch operators, taking `inputs`.
        inputs: The op's inputs as autograd saved them (tensors keep their graph), plus any non-tensor arguments.
        grad_output: The gradient of the twin's output.
        needs: Per input, whether its gradient is wanted (``ctx.needs_input_grad``).

    Returns:
        One entry per input: its gradient (with a graph, so it can be differentiated again), or None where not
        wanted. An input the output does not depend on gets zeros.
    """
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs))
              if need and isinstance(t, torch.Tensor) and t.requires_grad]
    grads: list[torch.Tensor | None] = [None] * len(inputs)
    if not wanted:
        return grads
    with torch.enable_grad():
        output = twin(*inputs)
    found = torch.autograd.grad(output, [inputs[i] for i in wanted], grad_output, create_graph=True,
                                allow_unused=True)
    for i, g in zip(wanted, found):
        grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return grads
