"""Tests of ops_dscn.DepthwiseConv2d and its CPU weight-gradient kernel, against float64 references and gradcheck."""
import os

import pytest
import torch
import torch.nn.functional as F
from isa_check import ISAS, run_under_isa
from torch._subclasses.fake_tensor import FakeTensorMode

import ops_dscn
from ops_dscn import DepthwiseConv2d, dw_conv_weight_grad

HAS_KERNEL = ops_dscn.depthwise._CPU_KERNEL
pytestmark = pytest.mark.skipif(not HAS_KERNEL and os.environ.get("DSAN_REQUIRE_CPP") != "1",
                                reason=f"compiled op not built: {ops_dscn.extension_error()}")
CL = torch.channels_last


def weight_grad64(grad, x, kernel, stride, padding, dilation):
    """The weight gradient written out independently: for each tap, the sum of the gradient times the shifted input."""
    g, x = grad.double(), F.pad(x.double(), (padding[1], padding[1], padding[0], padding[0]))
    ho, wo = g.shape[2:]
    out = torch.zeros(x.shape[1], 1, *kernel, dtype=torch.float64)
    for ky in range(kernel[0]):
        for kx in range(kernel[1]):
            y0, x0 = ky * dilation[0], kx * dilation[1]
            patch = x[:, :, y0:y0 + (ho - 1) * stride[0] + 1:stride[0], x0:x0 + (wo - 1) * stride[1] + 1:stride[1]]
            out[:, 0, ky, kx] = (g * patch).sum((0, 2, 3))
    return out


# (n, c, h, w, kernel, stride, padding, dilation): DSAN's depthwise convs (3x3, 5x5, 1xK and Kx1 strips), channel
# counts that leave vector tails, images narrower than the kernel, strides and dilations, a kernel without a
# register specialisation (2x4).
CASES = [
    (2, 32, 14, 15, (3, 3), (1, 1), (1, 1), (1, 1)), (2, 16, 9, 11, (5, 5), (1, 1), (2, 2), (1, 1)),
    (2, 32, 7, 23, (1, 11), (1, 1), (0, 5), (1, 1)), (2, 32, 23, 7, (11, 1), (1, 1), (5, 0), (1, 1)),
    (1, 20, 6, 9, (1, 15), (1, 1), (0, 7), (1, 1)), (3, 5, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 17, 6, 5, (2, 4), (1, 1), (1, 2), (1, 1)), (2, 24, 11, 10, (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 48, 12, 13, (3, 3), (1, 2), (2, 2), (2, 2)), (2, 8, 5, 4, (7, 1), (1, 1), (3, 0), (1, 1)),
    (1, 64, 3, 3, (5, 5), (1, 1), (2, 2), (1, 1)), (1, 3, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1)),
]


def make(n, c, h, w, kernel, stride, padding, dilation, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    g = torch.randn(n, c, ho, wo, generator=gen, dtype=torch.float64)
    return x.to(dtype).contiguous(memory_format=CL), g.to(dtype).contiguous(memory_format=CL)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_weight_grad_matches_float64(case):
    n, c, h, w, kernel, stride, padding, dilation = case
    x, g = make(*case, dtype=torch.float64)
    expected = weight_grad64(g, x, kernel, stride, padding, dilation)
    got64 = dw_conv_weight_grad(g, x, kernel, stride, padding, dilation)
    assert got64.shape == (c, 1, *kernel) and got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected, atol=1e-11, rtol=1e-11)
    # float32, and from NCHW memory (the kernel makes channels_last copies)
    got32 = dw_conv_weight_grad(g.float().contiguous(), x.float().contiguous(), kernel, stride, padding, dilation)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got32.double(), expected, atol=2e-6 * scale * max(1, n * h * w) ** 0.5, rtol=1e-5)
    # ATen's float64 weight gradient agrees (the reference function above is independent of it)
    torch.testing.assert_close(ops_dscn.dw_conv_weight_grad_reference(g, x, kernel, stride, padding, dilation),
                               expected, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    x, g = make(3, 32, 10, 12, (5, 5), (1, 1), (2, 2), (1, 1), dtype=torch.float64)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = dw_conv_weight_grad(g, x, (5, 5), (1, 1), (2, 2), (1, 1))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, weight_grad64(g, x, (5, 5), (1, 1), (2, 2), (1, 1)), atol=1e-11, rtol=1e-11)


def conv_pair(c, kernel, padding, stride=1, dilation=1, bias=True, dtype=torch.float64):
    torch.manual_seed(0)
    ours = DepthwiseConv2d(c, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias).to(dtype)
    ref = torch.nn.Conv2d(c, c, kernel, stride=stride, padding=padding, dilation=dilation, groups=c,
                          bias=bias).to(dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("kernel,padding,stride,bias", [((3, 3), 1, 1, True), ((1, 11), (0, 5), 1, True),
                                                         ((5, 5), 2, 2, False)])
def test_module_gradients_equal_nn_conv2d(kernel, padding, stride, bias):
    ours, ref = conv_pair(12, kernel, padding, stride, bias=bias)
    assert list(ours.state_dict()) == list(ref.state_dict())  # the same names: checkpoints load either way
    x = torch.randn(2, 12, 9, 13, dtype=torch.float64).contiguous(memory_format=CL)
    grads = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.cos(y.detach()))
        grads.append([xi.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_gradcheck():
    ours, _ = conv_pair(6, (3, 5), (1, 2))
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w, b: ops_dscn.depthwise._DepthwiseConv2dFunction.apply(
        t, w, b, (1, 1), (1, 2), (1, 1)), (x, ours.weight, ours.bias))


def test_only_the_gradients_asked_for_and_no_gradient_path():
    ours, ref = conv_pair(8, 3, 1, dtype=torch.float32)
    x = torch.randn(1, 8, 6, 6)
    ours.requires_grad_(False)
    xi = x.clone().requires_grad_()
    ours(xi).sum().backward()  # input gradient only
    assert xi.grad is not None and ours.weight.grad is None
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))  # inference: plain nn.Conv2d forward


def test_torch_compile_backward():
    ours, ref = conv_pair(16, 5, 2, dtype=torch.float32)
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=CL)

    def loss(m, t):
        return m(t).square().sum()

    compiled = torch.compile(lambda t: loss(ours, t), fullgraph=True, backend="aot_eager")
    xi = x.clone().requires_grad_()
    compiled(xi).backward()
    xr = x.clone().requires_grad_()
    loss(ref, xr).backward()
    torch.testing.assert_close(xi.grad, xr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-3, rtol=1e-4)


def test_opcheck():
    x, g = make(2, 8, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1))
    torch.library.opcheck(torch.ops.ops_dscn._dw_conv_weight_grad.default, (g, x, 3, 3, 1, 1, 1, 1, 1, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input_is_named():
    x, g = make(2, 8, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1))
    op = torch.ops.ops_dscn._dw_conv_weight_grad
    with pytest.raises(ValueError, match=r"grad_output must have shape \[2, 8, 5, 6\]; got \[2, 8, 5, 5\]"):
        op(g[..., :5], x, 3, 3, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="grad_output dtype must equal input dtype float32; got float64"):
        op(g.double(), x, 3, 3, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="input dtype must be one of float32, float64; got float16"):
        op(g.half(), x.half(), 3, 3, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"stride and dilation must be >= 1 and padding >= 0; got kernel \(3, 3\), "
                                         r"stride \(0, 1\)"):
        op(g, x, 3, 3, 0, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="kernel_h must be at most 16; got 17"):
        op(g, x, 17, 1, 1, 1, 8, 0, 1, 1)
    gh, xh = g.half(), x.half()
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="input dtype must be one of float32, float64"):
        op(mode.from_tensor(gh), mode.from_tensor(xh), 3, 3, 1, 1, 1, 1, 1, 1)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_simd_path(isa, tmp_path):
    """The kernel's baseline, AVX2 and AVX-512 builds against float64, with vector tails and every specialisation."""
    script_text = (
        "import torch\n"
        "from test_depthwise import CASES, make, weight_grad64\n"
        "from ops_dscn import dw_conv_weight_grad\n"
        "for case in CASES:\n"
        "    x, g = make(*case, dtype=torch.float64)\n"
        "    exp = weight_grad64(g, x, *case[4:])\n"
        "    torch.testing.assert_close(dw_conv_weight_grad(g, x, *case[4:]), exp, atol=1e-11, rtol=1e-11)\n"
        "    got = dw_conv_weight_grad(g.float(), x.float(), *case[4:]).double()\n"
        "    torch.testing.assert_close(got, exp, atol=1e-4 * exp.abs().max().item(), rtol=1e-5)\n"
        "print('ok')\n"
    )
    run_under_isa(isa, script_text, tmp_path)
