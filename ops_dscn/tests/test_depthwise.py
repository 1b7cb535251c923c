"""Tests of ops_dscn.DepthwiseConv2d and its CPU kernels (forward, weight gradient): float64 references, gradcheck."""
import os

import _use_installed  # noqa: F401  (first: the installed ops_dscn, not the source tree)
import pytest
import torch
import torch.nn.functional as F
from isa_check import ISAS, run_under_isa
from torch._subclasses.fake_tensor import FakeTensorMode

import ops_dscn
from ops_dscn import DepthwiseConv2d, dw_conv2d, dw_conv_weight_grad

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


def conv64(x, weight, bias, stride, padding, dilation):
    """The depthwise conv written out independently: for each tap, the weight times the shifted input, summed."""
    x = F.pad(x.double(), (padding[1], padding[1], padding[0], padding[0]))
    kernel = weight.shape[2:]
    ho = (x.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    out = torch.zeros(x.shape[0], x.shape[1], ho, wo, dtype=torch.float64)
    if bias is not None:
        out += bias.double().view(1, -1, 1, 1)
    for ky in range(kernel[0]):
        for kx in range(kernel[1]):
            y0, x0 = ky * dilation[0], kx * dilation[1]
            patch = x[:, :, y0:y0 + (ho - 1) * stride[0] + 1:stride[0], x0:x0 + (wo - 1) * stride[1] + 1:stride[1]]
            out += patch * weight[:, 0, ky, kx].double().view(1, -1, 1, 1)
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
    # the forward's blocks: widths with 8- and 4-column blocks and an overlapping last block (DSAN-T's 5x5 at 56, 28,
    # 14 and 7), a 7x7 kernel, and an interior as wide as one block
    (1, 32, 4, 56, (5, 5), (1, 1), (2, 2), (1, 1)), (2, 16, 5, 14, (5, 5), (1, 1), (2, 2), (1, 1)),
    (1, 48, 7, 7, (5, 5), (1, 1), (2, 2), (1, 1)), (1, 20, 9, 19, (7, 7), (1, 1), (3, 3), (1, 1)),
    (1, 24, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1)), (1, 16, 6, 13, (3, 3), (1, 1), (0, 2), (1, 1)),
    # dsan_t2's stage-1 strips (19 taps; the Kx1 one is taller than 16 rows) and the tallest kernel the kernels take
    (1, 16, 21, 9, (19, 1), (1, 1), (9, 0), (1, 1)), (2, 8, 5, 24, (1, 19), (1, 1), (0, 9), (1, 1)),
    (1, 8, 33, 4, (32, 1), (1, 1), (15, 0), (1, 1)),
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


def make_weights(c, kernel, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(c, 1, *kernel, generator=gen, dtype=torch.float64)
    return w.to(dtype), torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_float64(case):
    n, c, h, w, kernel, stride, padding, dilation = case
    x, _ = make(*case, dtype=torch.float64)
    weight, bias = make_weights(c, kernel, torch.float64)
    for b in (bias, None):
        expected = conv64(x, weight, b, stride, padding, dilation)
        got = dw_conv2d(x, weight, b, stride, padding, dilation)
        assert got.shape == expected.shape and got.is_contiguous(memory_format=CL)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    # float32, from NCHW memory (the kernel makes a channels_last copy)
    got32 = dw_conv2d(x.float().contiguous(), weight.float(), bias.float(), stride, padding, dilation)
    expected = conv64(x, weight, bias, stride, padding, dilation)
    torch.testing.assert_close(got32.double(), expected, atol=1e-5 * max(1, kernel[0] * kernel[1]) ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_forward_thread_counts_agree(threads):
    x, _ = make(3, 32, 10, 12, (5, 5), (1, 1), (2, 2), (1, 1), dtype=torch.float64)
    weight, bias = make_weights(32, (5, 5), torch.float64)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = dw_conv2d(x, weight, bias, (1, 1), (2, 2), (1, 1))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, conv64(x, weight, bias, (1, 1), (2, 2), (1, 1)), atol=1e-12, rtol=1e-12)


def test_module_forward_uses_the_kernel_up_to_the_batch_limit(monkeypatch):
    ours, ref = conv_pair(24, 5, 2, dtype=torch.float32)
    limit = ops_dscn.depthwise.FORWARD_MAX_BATCH
    xs = {n: torch.randn(n, 24, 11, 13).contiguous(memory_format=CL) for n in (1, limit, limit + 1)}
    with torch.no_grad():
        expected = {n: ref(x) for n, x in xs.items()}

        def no_aten(*args, **kwargs):
            raise AssertionError("ATen's convolution ran")

        monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", no_aten)
        for n in (1, limit):
            torch.testing.assert_close(ours(xs[n]), expected[n], atol=1e-5, rtol=1e-5)
        with pytest.raises(AssertionError, match="ATen's convolution ran"):
            ours(xs[limit + 1])  # larger batches: oneDNN
        with pytest.raises(AssertionError, match="ATen's convolution ran"):
            ours(xs[1].contiguous())  # NCHW memory: ATen, no copy


def test_module_keeps_aten_for_tracers_and_tall_kernels(monkeypatch):
    """torch.jit tracers (torchprofile's FLOP count, ONNX export) see an aten convolution, and kernels taller than
    MAX_KERNEL_H run in ATen, forward and weight gradient alike."""
    ours, _ = conv_pair(24, 5, 2, dtype=torch.float32)
    x = torch.randn(1, 24, 11, 13).contiguous(memory_format=CL)
    with torch.no_grad():
        graph = torch.jit.trace(ours, x).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::_convolution" in kinds and not any(k.startswith("ops_dscn::") for k in kinds), kinds

    tall = ops_dscn.depthwise.MAX_KERNEL_H + 1
    module = DepthwiseConv2d(8, (tall, 1), padding=(tall // 2, 0))
    x = torch.randn(1, 8, tall + 2, 5, dtype=torch.float64).contiguous(memory_format=CL)
    with torch.no_grad():
        torch.testing.assert_close(module.double()(x), conv64(x, module.weight, module.bias, (1, 1),
                                                              (tall // 2, 0), (1, 1)))
    g = torch.randn(1, 8, tall + 2, 5, dtype=torch.float64)
    expected = weight_grad64(g, x, (tall, 1), (1, 1), (tall // 2, 0), (1, 1))
    torch.testing.assert_close(dw_conv_weight_grad(g, x, (tall, 1), (1, 1), (tall // 2, 0), (1, 1)), expected)


def test_forward_gradcheck_and_opcheck():
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, 3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, u, v: dw_conv2d(t, u, v, (1, 2), (1, 2), (1, 1)), (x, w, b))
    assert torch.autograd.gradcheck(lambda t, u: dw_conv2d(t, u, None, (1, 1), (2, 1), (2, 1)), (x, w))
    x32 = torch.randn(2, 8, 6, 7).contiguous(memory_format=CL)
    w32, b32 = make_weights(8, (3, 3), torch.float32)
    torch.library.opcheck(torch.ops.ops_dscn.dw_conv2d.default, (x32, w32, b32, 1, 1, 1, 1, 1, 1))
    torch.library.opcheck(torch.ops.ops_dscn.dw_conv2d.default,
                          (x32.requires_grad_(), w32.requires_grad_(), None, 2, 1, 0, 1, 1, 2))


def test_forward_compiles_at_batch_one():
    ours, ref = conv_pair(16, 5, 2, dtype=torch.float32)
    x = torch.randn(1, 16, 12, 12).contiguous(memory_format=CL)
    with torch.no_grad():
        compiled = torch.compile(ours, fullgraph=True)
        torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5)


def test_forward_bad_input_is_named():
    x, _ = make(2, 8, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1))
    w, b = make_weights(8, (3, 3), torch.float32)
    op = torch.ops.ops_dscn.dw_conv2d
    with pytest.raises(ValueError, match=r"weight must have shape \(C, 1, kh, kw\) with C = 8 \(the input's "
                                         r"channels\); got \[4, 1, 3, 3\]"):
        op(x, w[:4], b, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\); got \[7\]"):
        op(x, w, b[:7], 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="weight dtype must equal input dtype float32; got float64"):
        op(x, w.double(), b, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="input dtype must be one of float32, float64; got float16"):
        op(x.half(), w.half(), None, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"the output size must be at least 1x1; got -3x4 for input 5x6, kernel 3x3"):
        op(x, w, b, 1, 1, 0, 0, 4, 1)
    with pytest.raises(ValueError, match=r"stride and dilation must be >= 1 and padding >= 0, all below 2\^31; got "
                                         r"kernel \(3, 3\), stride \(1, 0\)"):
        op(x, w, b, 1, 0, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="kernel_h must be at most 32; got 33"):
        op(x, torch.zeros(8, 1, 33, 1), None, 1, 1, 8, 0, 1, 1)
    xh, wh = x.half(), w.half()
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="input dtype must be one of float32, float64"):
        op(mode.from_tensor(xh), mode.from_tensor(wh), None, 1, 1, 1, 1, 1, 1)


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


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_under_autocast_is_nn_conv2d(x_dtype):
    """Under autocast F.conv2d casts inside the forward: the module must be nn.Conv2d's autocast path exactly.

    (A custom Function would save the uncast input and weight, and its backward would mix dtypes.)
    """
    ours, ref = conv_pair(12, (1, 11), (0, 5), 1, dtype=torch.float32)
    x = torch.randn(2, 12, 9, 13).to(x_dtype).contiguous(memory_format=CL)
    results = []
    for m in (ours, ref):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xi)
        y.float().backward(torch.cos(y.detach().float()))
        results.append([y, xi.grad, *(p.grad for p in m.parameters())])
    assert results[0][0].dtype == torch.bfloat16
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


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
    with pytest.raises(ValueError, match=r"stride and dilation must be >= 1 and padding >= 0, all below 2\^31; got "
                                         r"kernel \(3, 3\), stride \(0, 1\)"):
        op(g, x, 3, 3, 0, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="kernel_h must be at most 32; got 33"):
        op(g, x, 33, 1, 1, 1, 16, 0, 1, 1)
    gh, xh = g.half(), x.half()
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="input dtype must be one of float32, float64"):
        op(mode.from_tensor(gh), mode.from_tensor(xh), 3, 3, 1, 1, 1, 1, 1, 1)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_simd_path(isa, tmp_path):
    """The kernels' baseline, AVX2 and AVX-512 builds against float64, with vector tails and every specialisation."""
    script_text = (
        "import torch\n"
        "from test_depthwise import CASES, conv64, make, make_weights, weight_grad64\n"
        "from ops_dscn import dw_conv2d, dw_conv_weight_grad\n"
        "for case in CASES:\n"
        "    x, g = make(*case, dtype=torch.float64)\n"
        "    exp = weight_grad64(g, x, *case[4:])\n"
        "    torch.testing.assert_close(dw_conv_weight_grad(g, x, *case[4:]), exp, atol=1e-11, rtol=1e-11)\n"
        "    got = dw_conv_weight_grad(g.float(), x.float(), *case[4:]).double()\n"
        "    torch.testing.assert_close(got, exp, atol=1e-4 * exp.abs().max().item(), rtol=1e-5)\n"
        "    w, b = make_weights(case[1], case[4], torch.float64)\n"
        "    exp = conv64(x, w, b, *case[5:])\n"
        "    torch.testing.assert_close(dw_conv2d(x, w, b, *case[5:]), exp, atol=1e-12, rtol=1e-12)\n"
        "    got = dw_conv2d(x.float(), w.float(), b.float(), *case[5:]).double()\n"
        "    torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-5)\n"
        "print('ok')\n"
    )
    run_under_isa(isa, script_text, tmp_path)


def test_a_tensor_on_another_device_is_named():
    """A meta tensor among CPU ones sends the call to the fake kernel, which used to return uninitialized memory."""
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, 1, 3, 3), torch.randn(4)
    with pytest.raises(ValueError, match="dw_conv2d: weight must be on the input's device cpu; got meta"):
        dw_conv2d(x, w.to("meta"), b, padding=(1, 1))
    with pytest.raises(ValueError, match="dw_conv2d: bias must be on the input's device cpu; got meta"):
        dw_conv2d(x, w, b.to("meta"), padding=(1, 1))
    with pytest.raises(ValueError, match="dw_conv_weight_grad: grad_output must be on the input's device cpu; got "
                                         "meta"):
        dw_conv_weight_grad(torch.randn(1, 4, 5, 5, device="meta"), x, (3, 3), padding=(1, 1))


def test_geometry_that_overflows_or_leaves_no_output_is_rejected():
    """Geometry values are bounded by 2^31 (a padding of 2^63 - 1 used to wrap around to an output of one row), and
    the output length is a floor division: a window longer than the padded input is an error, as in F.conv2d."""
    x = torch.randn(1, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match=r"dw_conv2d: kernel, stride and dilation must be >= 1 and padding >= 0, all "
                                         r"below 2\^31; got .* padding \(9223372036854775807, 0\)"):
        dw_conv2d(x, w, padding=(2**63 - 1, 0))
    with pytest.raises(ValueError, match=r"dw_conv_weight_grad: .* all below 2\^31; got kernel \(3, 3\), stride "
                                         r"\(4294967296, 1\)"):
        dw_conv_weight_grad(torch.randn(1, 4, 1, 2), x, (3, 3), stride=(2**32, 1))
    tall = torch.randn(4, 1, 5, 1)
    with pytest.raises(RuntimeError):  # F.conv2d refuses it too
        F.conv2d(x, tall, stride=(2, 1), groups=4)
    with pytest.raises(ValueError, match=r"dw_conv2d: the output size must be at least 1x1; got 0x4"):
        dw_conv2d(x, tall, stride=(2, 1))
