"""Tests of ops_dscn.strip_offsets, a DSCN layer's offset branch fused for CPU (forward, backward), against float64."""
import os

import _use_installed  # noqa: F401  (first: the installed ops_dscn, not the source tree)
import pytest
import torch
import torch.nn.functional as F
from isa_check import ISAS, run_under_isa
from torch._subclasses.fake_tensor import FakeTensorMode

import ops_dscn
from ops_dscn import strip_offsets, strip_offsets_reference
from ops_dscn.modules import DSCNX, DSCNY

HAS_KERNEL = ops_dscn.strip_offsets_available(torch.empty(0))
pytestmark = pytest.mark.skipif(not HAS_KERNEL and os.environ.get("DSAN_REQUIRE_CPP") != "1",
                                reason=f"compiled op not built: {ops_dscn.extension_error()}")


def reference64(x, dw, dwb, lnw, lnb, eps, lw, lb, on_x):
    """The branch written out independently of the op's Python reference: float64, explicit taps and moments."""
    x, dw, lnw, lnb, lw = (t.double() for t in (x, dw, lnw, lnb, lw))
    k = dw.shape[3] if on_x else dw.shape[2]
    p = (k - 1) // 2
    xp = F.pad(x, (p, p, 0, 0) if on_x else (0, 0, p, p))
    h, w = x.shape[2:]
    taps = dw.reshape(dw.shape[0], k)
    a = sum((xp[:, :, :, t:t + w] if on_x else xp[:, :, t:t + h, :]) * taps[:, t].view(1, -1, 1, 1) for t in range(k))
    if dwb is not None:
        a = a + dwb.double().view(1, -1, 1, 1)
    a = a.permute(0, 2, 3, 1)
    mean = a.mean(-1, keepdim=True)
    var = ((a - mean) ** 2).mean(-1, keepdim=True)
    a = (a - mean) / torch.sqrt(var + eps) * lnw + lnb.double()
    a = 0.5 * a * (1 + torch.erf(a / 2 ** 0.5))
    y = a @ lw.t()
    return y if lb is None else y + lb.double()


def make(n, c, h, w, k, gk, on_x, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    x = r(n, c, h, w).contiguous(memory_format=torch.channels_last)
    dw = r(c, 1, 1, k, scale=1 / k) if on_x else r(c, 1, k, 1, scale=1 / k)
    return [x, dw, r(c) if bias else None, r(c, scale=0.3, shift=1.0), r(c, scale=0.2), 1e-6,
            r(gk, c, scale=c ** -0.5), r(gk) if bias else None, on_x]


# DSAN's branches (C, Kd, G * K') and sizes that leave vector tails, windows longer than the image, a single pixel.
# G * K' of 1-64 takes the kernel's register-blocked Linear in float32 (one, two and four vectors, and three run as
# four; 2 and 3 outputs a pixel leave vector overhangs longer than a row), 112 (DSAN-S stage 3) BLAS.
CASES = [(2, 32, 9, 13, 11, 11), (1, 64, 6, 5, 11, 44), (2, 160, 4, 5, 7, 56), (1, 256, 3, 3, 5, 40),
         (2, 5, 4, 3, 5, 10), (1, 16, 1, 1, 3, 4), (1, 20, 2, 7, 9, 3), (1, 24, 5, 6, 5, 24),
         (3, 8, 5, 7, 3, 2), (1, 320, 3, 4, 7, 112)]


@pytest.mark.parametrize("on_x", [True, False], ids=["x", "y"])
@pytest.mark.parametrize("n,c,h,w,k,gk", CASES)
def test_matches_float64_reference(n, c, h, w, k, gk, on_x):
    args = make(n, c, h, w, k, gk, on_x)
    ref = reference64(*args)
    with torch.no_grad():
        y64 = torch.ops.ops_dscn.strip_offsets(*args)
        a32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        y32 = torch.ops.ops_dscn.strip_offsets(*a32)
        layers32 = strip_offsets_reference(*a32)
    assert y64.shape == (n, h, w, gk) and y64.is_contiguous()
    torch.testing.assert_close(y64, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y32.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y32, layers32, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("on_x", [True, False], ids=["x", "y"])
@pytest.mark.parametrize("n,h,w", [(3, 7, 6), (2, 24, 23)], ids=["small", "several-blocks-per-thread"])
def test_without_biases_from_nchw_memory_and_any_thread_count(on_x, n, h, w):
    """Pixel blocks are cut per thread count (126 pixels: one block per thread; 1104: several of at most 256)."""
    args = make(n, 12, h, w, 5, 9, on_x, bias=False)
    args[0] = args[0].contiguous()
    ref = reference64(*args)
    a32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]  # float32: the kernel's own Linear
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                torch.testing.assert_close(torch.ops.ops_dscn.strip_offsets(*args), ref, atol=1e-12, rtol=1e-12)
                torch.testing.assert_close(torch.ops.ops_dscn.strip_offsets(*a32).double(), ref, atol=1e-5,
                                           rtol=1e-5)
    finally:
        torch.set_num_threads(old)


def test_opcheck():
    for on_x in (True, False):
        args = make(2, 8, 5, 6, 3, 6, on_x, dtype=torch.float32)
        torch.library.opcheck(torch.ops.ops_dscn.strip_offsets.default, tuple(args),
                              test_utils=("test_schema", "test_faketensor"))


def _bad_cases():
    x, dw, dwb, lnw, lnb, eps, lw, lb, on_x = make(2, 8, 5, 6, 3, 6, True, dtype=torch.float32)
    yield (x[0], dw, dwb, lnw, lnb, eps, lw, lb, on_x), "input must be 4-D"
    yield (x.half(), dw, dwb, lnw, lnb, eps, lw, lb, on_x), "input dtype must be one of float32, float64; got float16"
    yield (x, dw, dwb, lnw, lnb, eps, lw, lb, False), (r"dw_weight must have shape \[C, 1, K, 1\] \(a kernel along H, "
                                                       r"on_x=False\); got \[8, 1, 1, 3\]")
    yield (x, dw.transpose(2, 3), dwb, lnw, lnb, eps, lw, lb, True), (
        r"dw_weight must have shape \[C, 1, 1, K\] \(a kernel along W, on_x=True\); got \[8, 1, 3, 1\]")
    yield (x, dw[:4], dwb, lnw, lnb, eps, lw, lb, on_x), (r"dw_weight must have shape \[8, 1, 1, 3\]; "
                                                          r"got \[4, 1, 1, 3\]")
    yield (x, dw[..., :2], dwb, lnw, lnb, eps, lw, lb, on_x), "kernel length must be odd"
    yield (x, dw, dwb[:3], lnw, lnb, eps, lw, lb, on_x), r"dw_bias must have shape \[8\]; got \[3\]"
    yield (x, dw, dwb, lnw.double(), lnb, eps, lw, lb, on_x), "ln_weight dtype must equal input dtype float32"
    yield (x, dw, dwb, lnw, lnb, eps, lw[:, :4], lb, on_x), r"lin_weight must have shape \[6, 8\]; got \[6, 4\]"
    yield (x, dw, dwb, lnw, lnb, eps, lw[0], lb, on_x), "lin_weight must be 2-D"
    yield (x, dw, dwb, lnw, lnb, eps, lw, lb[:2], on_x), r"lin_bias must have shape \[6\]; got \[2\]"
    yield (x, dw, dwb, lnw, lnb, -1.0, lw, lb, on_x), "eps must be >= 0; got -1"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[1][:30])
def test_bad_input_is_named_alike_by_kernel_and_fake_kernel(case):
    args, match = case
    with pytest.raises(ValueError, match=match):
        torch.ops.ops_dscn.strip_offsets(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=match):
            torch.ops.ops_dscn.strip_offsets(*fake)


def _grads(fn, args, grad_output):
    """The gradients of every tensor argument of fn(*args) (fresh leaves) for the given output gradient."""
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    return torch.autograd.grad(fn(*leaves), tensors, grad_output)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("on_x", [True, False], ids=["x", "y"])
@pytest.mark.parametrize("n,c,h,w,k,gk", CASES)
def test_gradients_match_float64_reference(n, c, h, w, k, gk, on_x, bias):
    """All seven gradients (input, conv weight and bias, LayerNorm weight and bias, Linear weight and bias)."""
    args = make(n, c, h, w, k, gk, on_x, bias=bias)
    g = torch.randn(n, h, w, gk, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _grads(reference64, args, g)
    got64 = _grads(torch.ops.ops_dscn.strip_offsets, args, g)
    a32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
    got32 = _grads(torch.ops.ops_dscn.strip_offsets, a32, g.float())
    layers32 = _grads(strip_offsets_reference, a32, g.float())
    assert len(got64) == len(ref) == (7 if bias else 5)
    for r, k64, k32, l32 in zip(ref, got64, got32, layers32):
        assert k64.shape == r.shape and k64.dtype == torch.float64
        torch.testing.assert_close(k64, r, atol=1e-10, rtol=1e-10)
        scale = r.abs().max().item() + 1
        torch.testing.assert_close(k32.double(), r, atol=2e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(k32, l32, atol=2e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("on_x", [True, False], ids=["x", "y"])
def test_gradcheck(on_x):
    args = make(2, 20, 5, 6, 5, 8, on_x)
    leaves = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    assert torch.autograd.gradcheck(torch.ops.ops_dscn.strip_offsets, leaves)


@pytest.mark.parametrize("on_x", [True, False], ids=["x", "y"])
def test_backward_is_repeatable_at_every_thread_count(on_x):
    """1104 pixels: several blocks per thread; the per-thread parameter gradients are summed in thread order, so a
    fixed thread count gives the same bits on every call (another thread count rounds differently)."""
    args = make(2, 12, 24, 23, 5, 9, on_x)
    g = torch.randn(2, 24, 23, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = _grads(reference64, args, g)
    a32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for r, k in zip(ref, _grads(torch.ops.ops_dscn.strip_offsets, args, g)):
                torch.testing.assert_close(k, r, atol=1e-10, rtol=1e-10)
            first = _grads(torch.ops.ops_dscn.strip_offsets, a32, g.float())
            again = _grads(torch.ops.ops_dscn.strip_offsets, a32, g.float())
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(old)


def test_backward_opcheck_and_bad_grad_output():
    for on_x in (True, False):
        x, dw, dwb, lnw, lnb, eps, lw, lb, _ = make(2, 8, 5, 6, 3, 6, on_x, dtype=torch.float32)
        g = torch.randn(2, 5, 6, 6)
        torch.library.opcheck(torch.ops.ops_dscn._strip_offsets_backward.default,
                              (g, x, dw, dwb, lnw, lnb, eps, lw, on_x), test_utils=("test_schema", "test_faketensor"))
        bad = (g[:, :, :, :4], x, dw, dwb, lnw, lnb, eps, lw, on_x)
        match = r"grad_output must have shape \[2, 5, 6, 6\]; got \[2, 5, 6, 4\]"
        with pytest.raises(ValueError, match=match):
            torch.ops.ops_dscn._strip_offsets_backward(*bad)
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bad]
            with pytest.raises(ValueError, match=match):
                torch.ops.ops_dscn._strip_offsets_backward(*fake)


def test_backend_choice_under_gradients():
    args = make(1, 8, 4, 4, 3, 6, True, dtype=torch.float32)
    args[6].requires_grad_()
    calls = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    grads = {}
    for backend in ("auto", "cpp", "pytorch"):
        calls.clear()
        with Spy():
            (grads[backend],) = torch.autograd.grad(strip_offsets(*args, backend=backend).sum(), args[6])
        fused = torch.ops.ops_dscn._strip_offsets_backward.default in calls
        assert fused == (backend != "pytorch"), backend
    torch.testing.assert_close(grads["auto"], grads["pytorch"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["cpp"], grads["auto"], atol=0, rtol=0)


@pytest.mark.parametrize("cls", [DSCNX, DSCNY])
def test_modules_use_the_kernel_in_float32_inference_and_training_and_agree(cls):
    torch.manual_seed(0)
    layer = cls(32, 11, 11, pad=5, group=4).eval()
    with torch.no_grad():
        layer.offset.weight.normal_(0, 0.3)  # non-zero offsets: the branch matters
    x = torch.randn(2, 32, 9, 10).contiguous(memory_format=torch.channels_last)
    inp = torch.randn(2, 9, 10, 32)
    calls = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func is torch.ops.ops_dscn.strip_offsets.default)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Spy():
        fused = layer(inp, x)
    assert sum(calls) == 1
    calls.clear()
    layer.fused_offsets = False
    with torch.no_grad(), Spy():
        layers = layer(inp, x)
    assert sum(calls) == 0
    torch.testing.assert_close(fused, layers, atol=1e-5, rtol=1e-5)

    # Training: the same gradients from the kernel's backward as from the layers'.
    def grads(fused_offsets):
        layer.fused_offsets = fused_offsets
        layer.zero_grad(set_to_none=True)
        xg = x.detach().clone().requires_grad_()
        layer(inp, xg).square().sum().backward()
        return [xg.grad] + [p.grad for p in layer.parameters()]

    calls.clear()
    with Spy():
        fused_grads = grads(True)
    assert sum(calls) == 1
    for a, b in zip(fused_grads, grads(False)):  # float32 sums of up to 180 terms of size ~1e3: relative to the max
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)
    layer.fused_offsets = True
    calls.clear()
    with Spy():
        layer.double()(inp.double(), x.double())  # float64 keeps the layers
    assert sum(calls) == 0


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_simd_path(isa, tmp_path):
    """The kernel's baseline, AVX2 and AVX-512 builds against float64 (channel counts with vector tails)."""
    script_text = (
        "import torch\n"
        "from test_strip_offsets import make, reference64\n"
        "for c, on_x in ((5, True), (32, False), (40, True)):\n"
        "    args = make(2, c, 5, 6, 5, 7, on_x)\n"
        "    ref = reference64(*args)\n"
        "    with torch.no_grad():\n"
        "        torch.testing.assert_close(torch.ops.ops_dscn.strip_offsets(*args), ref, atol=1e-11, rtol=1e-11)\n"
        "        a32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]\n"
        "        y = torch.ops.ops_dscn.strip_offsets(*a32)\n"
        "        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)\n"
        "    g = torch.randn(2, 5, 6, 7, dtype=torch.float64)\n"
        "    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]\n"
        "    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]\n"
        "    ref = torch.autograd.grad(reference64(*leaves), tensors, g)\n"
        "    got = torch.autograd.grad(torch.ops.ops_dscn.strip_offsets(*leaves), tensors, g)\n"
        "    for r, k in zip(ref, got):\n"
        "        torch.testing.assert_close(k, r, atol=1e-10, rtol=1e-10)\n"
        "print('ok')\n"
    )
    run_under_isa(isa, script_text, tmp_path)
