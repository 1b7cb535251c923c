"""Second derivatives through the compiled operators (create_graph=True), checked in float64.

The backward kernels have no derivative of their own; a recorded backward goes through the ops' pure-PyTorch twins
(ops_dscn/_double_backward.py). gradgradcheck compares every second derivative with finite differences of the
first, and the DSCN op's is also compared with its twin's.
"""
import os

import _use_installed  # noqa: F401  (first: the installed ops_dscn, not the source tree)
import pytest
import torch
from torch.autograd import gradgradcheck

import ops_dscn
from ops_dscn.depthwise import _DepthwiseConv2dFunction

needs_ext = pytest.mark.skipif(not ops_dscn.extension_available() and os.environ.get("DSAN_REQUIRE_CPP") != "1",
                               reason=f"compiled op not built: {ops_dscn.extension_error()}")
D = torch.float64


def _offsets(shape, generator):
    # Integer part plus a fraction in [0.2, 0.8]: finite differences never move a sample across a pixel boundary,
    # where the interpolation has a kink.
    whole = torch.randint(-2, 3, shape, generator=generator).to(D)
    return (whole + 0.2 + 0.6 * torch.rand(shape, generator=generator, dtype=D)).requires_grad_()


@needs_ext
@pytest.mark.parametrize("axis", ["x", "y"])
def test_dscn_second_derivatives(axis):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 4, generator=g, dtype=D, requires_grad=True)
    off = _offsets((1, 4, 5, 2 * 3), g)

    def op(x, off):
        return ops_dscn.dscn(x, off, 3, pad=1, group=2, axis=axis, backend="cpp")

    assert gradgradcheck(op, (x, off))
    # The same second-order gradients as the twin's own autograd.
    results = []
    for backend in ("cpp", "pytorch"):
        xb, ob = x.detach().clone().requires_grad_(), off.detach().clone().requires_grad_()
        out = ops_dscn.dscn(xb, ob, 3, pad=1, group=2, axis=axis, backend=backend)
        gx, = torch.autograd.grad((out ** 2).sum(), xb, create_graph=True)
        (gx ** 2).sum().backward()
        results.append((xb.grad, ob.grad))
    assert results[0][1].abs().max() > 0  # the offsets' second-order term, which used to be dropped
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)


@needs_ext
def test_gelu_second_derivative():
    x = torch.randn(2, 3, 4, dtype=D, requires_grad=True)
    assert gradgradcheck(lambda t: ops_dscn.gelu(t, backend="cpp"), (x,))


@needs_ext
@pytest.mark.parametrize("on_x", [True, False])
def test_strip_offsets_second_derivatives(on_x):
    g = torch.Generator().manual_seed(1)
    c, k, gk = 4, 3, 6
    x = torch.randn(1, c, 3, 4, generator=g, dtype=D).contiguous(memory_format=torch.channels_last)
    params = [torch.randn(*s, generator=g, dtype=D) * 0.5 for s in
              ((c, 1, 1, k) if on_x else (c, 1, k, 1), (c,), (c,), (c,), (gk, c), (gk,))]
    params[2] += 1  # LayerNorm weight near 1
    tensors = [x, *params]
    for t in tensors:
        t.requires_grad_()

    def op(x, dw_w, dw_b, ln_w, ln_b, lin_w, lin_b):
        return ops_dscn.strip_offsets(x, dw_w, dw_b, ln_w, ln_b, 1e-6, lin_w, lin_b, on_x, backend="cpp")

    assert gradgradcheck(op, tuple(tensors))


@needs_ext
def test_conv_mlp_second_derivatives():
    g = torch.Generator().manual_seed(2)
    c, hidden, c_out = 3, 6, 4
    shapes = ((1, c, 4, 4), (hidden, c, 1, 1), (hidden,), (hidden, 1, 3, 3), (hidden,), (c_out, hidden, 1, 1),
              (c_out,), (1, c_out, 4, 4))
    tensors = tuple((torch.randn(*s, generator=g, dtype=D) * 0.5).requires_grad_() for s in shapes)

    def op(*t):
        return ops_dscn.conv_mlp(*t, backend="cpp")

    assert gradgradcheck(op, tensors)


@needs_ext
def test_depthwise_conv_second_derivatives():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=D).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(3, 1, 3, 3, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=D, requires_grad=True)
    # The module's training path (ATen forward, ops_dscn weight gradient) and the batch <= 2 forward kernel.
    assert gradgradcheck(lambda *t: _DepthwiseConv2dFunction.apply(*t, (1, 1), (1, 2), (1, 2)), (x, w, b))
    assert gradgradcheck(lambda *t: ops_dscn.dw_conv2d(*t, (2, 1), (1, 1)), (x, w, b))
