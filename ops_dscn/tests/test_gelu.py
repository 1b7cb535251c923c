"""Tests of ops_dscn.gelu, the exact GELU's CPU kernel and its backward, against float64 formulas."""
import math
import os

import _use_installed  # noqa: F401  (first: the installed ops_dscn, not the source tree)
import pytest
import torch
import torch.nn.functional as F
from isa_check import ISAS, run_under_isa
from torch._subclasses.fake_tensor import FakeTensorMode

import ops_dscn
from ops_dscn import gelu

HAS_KERNEL = ops_dscn.gelu_available(torch.empty(0))
pytestmark = pytest.mark.skipif(not HAS_KERNEL and os.environ.get("DSAN_REQUIRE_CPP") != "1",
                                reason=f"compiled op not built: {ops_dscn.extension_error()}")
CL = torch.channels_last


def gelu64(x):
    """The exact GELU in float64, from erf."""
    x = x.double()
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_grad64(x):
    """d gelu / dx in float64: Phi(x) + x * phi(x)."""
    x = x.double()
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def sample(*shape, dtype=torch.float32, seed=0, scale=3.0):
    """Values over the whole range that matters (|x| up to ~15, past erf's +-1 saturation), plus exact specials."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    flat = x.view(-1)
    specials = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, 8.0, -8.0, 40.0, -40.0, 100.0, -100.0],
                            dtype=torch.float64)
    k = min(flat.numel(), specials.numel())
    flat[:k] = specials[:k]
    return x.to(dtype)


# Sizes: below one vector, vector tails, several parallel chunks (the kernel splits 32768-element grains).
SIZES = [(1,), (7,), (16,), (37,), (3, 5, 7, 11), (2, 64, 33, 17)]


@pytest.mark.parametrize("shape", SIZES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_and_gradient_match_float64_formulas(shape, dtype):
    x = sample(*shape, dtype=dtype)
    g = sample(*shape, dtype=dtype, seed=1, scale=1.0)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)
    y = torch.ops.ops_dscn.gelu(x)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), gelu64(x), **tol)
    dx = torch.ops.ops_dscn._gelu_backward(g, x)
    torch.testing.assert_close(dx.double(), g.double() * gelu_grad64(x), **tol)
    if dtype == torch.float32:  # and with ATen's float GELU, the function it replaces
        torch.testing.assert_close(y, F.gelu(x), atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(dx, torch.ops.aten.gelu_backward(g, x), atol=2e-6, rtol=2e-6)


def test_autograd_and_gradcheck():
    x = sample(3, 4, 5, dtype=torch.float64, scale=2.0).requires_grad_()
    g = sample(3, 4, 5, dtype=torch.float64, seed=2)
    (dx,) = torch.autograd.grad(gelu(x), x, g)
    torch.testing.assert_close(dx, g * gelu_grad64(x.detach()), atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(torch.ops.ops_dscn.gelu, (x,))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_layouts_are_kept_and_thread_counts_agree(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = sample(2, 16, 40, 50).contiguous(memory_format=CL)
        g = sample(2, 16, 40, 50, seed=3)  # NCHW: not x's layout, copied into it
        y = gelu(x, backend="cpp")
        assert y.is_contiguous(memory_format=CL)
        torch.testing.assert_close(y.double(), gelu64(x), atol=2e-6, rtol=2e-6)
        dx = torch.ops.ops_dscn._gelu_backward(g, x)
        assert dx.is_contiguous(memory_format=CL)
        torch.testing.assert_close(dx.double(), g.double() * gelu_grad64(x), atol=2e-6, rtol=2e-6)
        # a strided (non-dense) view is copied; its values are still right
        v = x[:, ::3, 1:, ::2]
        torch.testing.assert_close(gelu(v, backend="cpp").double(), gelu64(v), atol=2e-6, rtol=2e-6)
        t = x.transpose(1, 3)  # dense in another order: read in place, strides kept
        assert gelu(t, backend="cpp").stride() == t.stride()
    finally:
        torch.set_num_threads(old)


def test_empty_and_scalar():
    assert torch.ops.ops_dscn.gelu(torch.empty(0, 3)).shape == (0, 3)
    x = torch.tensor(1.5, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.ops_dscn.gelu(x), gelu64(x), atol=1e-15, rtol=1e-15)


def test_opcheck():
    torch.library.opcheck(torch.ops.ops_dscn.gelu.default, (sample(2, 8, 3, 4).requires_grad_(),))
    torch.library.opcheck(torch.ops.ops_dscn._gelu_backward.default, (sample(2, 8, 3, 4), sample(2, 8, 3, 4, seed=4)))


def test_compiles():
    x = sample(2, 8, 5, 5)
    fn = torch.compile(lambda t: gelu(t) * 2, fullgraph=True, backend="inductor")
    torch.testing.assert_close(fn(x), F.gelu(x) * 2, atol=2e-6, rtol=2e-6)


def _bad_cases():
    # The op is named, not looked up: without the compiled op torch.ops.ops_dscn has no `gelu`, and looking it up here
    # would fail the module's collection instead of letting the skip marker apply.
    x = sample(2, 3)
    yield "gelu", (x.half(),), "gelu: input dtype must be one of float32, float64; got float16"
    yield "gelu", (x.int(),), "gelu: input dtype must be one of float32, float64; got int32"
    yield "_gelu_backward", (x[:1], x), \
        r"_gelu_backward: grad_output must have the input's shape \[2, 3\]; got \[1, 3\]"
    yield "_gelu_backward", (x.double(), x), \
        "_gelu_backward: grad_output dtype must equal input dtype float32; got float64"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[2][:50] if isinstance(c, tuple) else str(c))
def test_bad_input_is_named_by_the_kernel(case):
    op_name, args, match = case
    with pytest.raises(ValueError, match=match):
        getattr(torch.ops.ops_dscn, op_name)(*args)


def test_fake_kernel_checks_dtype_and_keeps_layout():
    x = sample(2, 8, 3, 4).contiguous(memory_format=CL)
    half = x.half()
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert torch.ops.ops_dscn.gelu(fx).stride() == x.stride()
        with pytest.raises(ValueError, match="gelu: input dtype must be one of float32, float64; got float16"):
            torch.ops.ops_dscn.gelu(mode.from_tensor(half))


def test_backend_choice():
    x = sample(4, 4).half()
    with pytest.raises(RuntimeError, match="backend='cpp' needs the compiled kernel and a CPU float32/float64 input; "
                                           "got a float16 tensor on cpu"):
        gelu(x, backend="cpp")
    with pytest.raises(ValueError, match="backend must be one of"):
        gelu(x, backend="cuda")
    assert gelu(x).dtype == torch.float16  # 'auto' falls back to F.gelu
    torch.testing.assert_close(gelu(x.float(), backend="pytorch"), F.gelu(x.float()))


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_simd_path(isa, tmp_path):
    """The baseline, AVX2 and AVX-512 builds against float64 (lengths with vector tails)."""
    script_text = (
        "import torch\n"
        "from test_gelu import gelu64, gelu_grad64, sample\n"
        "for n in (1, 5, 16, 23, 100, 70001):\n"
        "    x, g = sample(n), sample(n, seed=5)\n"
        "    torch.testing.assert_close(torch.ops.ops_dscn.gelu(x).double(), gelu64(x), atol=2e-6, rtol=2e-6)\n"
        "    dx = torch.ops.ops_dscn._gelu_backward(g, x).double()\n"
        "    torch.testing.assert_close(dx, g.double() * gelu_grad64(x), atol=2e-6, rtol=2e-6)\n"
        "print('ok')\n"
    )
    run_under_isa(isa, script_text, tmp_path)


def test_a_gradient_on_another_device_is_named():
    """A meta tensor among CPU ones sends the call to the fake kernel, which used to return uninitialized memory."""
    with pytest.raises(ValueError, match="_gelu_backward: grad_output must be on the input's device cpu; got meta"):
        torch.ops.ops_dscn._gelu_backward(torch.randn(3, device="meta"), torch.randn(3))


def test_gradient_vanishes_for_huge_negative_inputs():
    """float32: exp below -87 is 0, so gelu'(z) = Phi(z) + z phi(z) goes to 0 as z -> -inf (with exp held at
    exp(-87) below, the z phi(z) term grew with |z|: -2.2 at z = -3.4e38). In the vector body and in a tail."""
    vals = torch.tensor([-1e30, -1e36, -1e38, -3.4e38, -20.0, -13.3, -13.0, 20.0, 1e38, -1.0], dtype=torch.float32)
    for x in (vals, torch.cat([vals, vals, vals])):  # 10 values: a tail only; 30: a 16-wide body and a tail
        dx = torch.ops.ops_dscn._gelu_backward(torch.ones_like(x), x)
        torch.testing.assert_close(dx.double(), gelu_grad64(x), atol=1e-7, rtol=1e-6)


def test_backward_does_not_depend_on_where_an_element_falls():
    """Tails go through the vector code: an element's gradient is the same bits whether it lies in a vector or in
    the tail, so the result does not depend on the thread count that places the tails."""
    x, g = sample(1000, seed=5), sample(1000, seed=6)
    full = torch.ops.ops_dscn._gelu_backward(g, x)
    for start in range(1, 17):
        assert torch.equal(torch.ops.ops_dscn._gelu_backward(g[start:], x[start:]), full[start:]), start
    big_x, big_g = sample(100003, seed=7), sample(100003, seed=8)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(torch.ops.ops_dscn._gelu_backward(big_g, big_x))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(r, results[0]) for r in results[1:])
