"""Tests of ops_dscn.conv_mlp, DSAN's MLP fused on CPU (forward and backward), against an independent float64
reference and with gradcheck."""
import os

import _use_installed  # noqa: F401  (first: the installed ops_dscn, not the source tree)
import pytest
import torch
import torch.nn.functional as F
from isa_check import ISAS, run_under_isa
from torch._subclasses.fake_tensor import FakeTensorMode

import ops_dscn
from ops_dscn import conv_mlp, conv_mlp_reference

HAS_KERNEL = ops_dscn.conv_mlp_available(torch.empty(0))
needs_kernel = pytest.mark.skipif(not HAS_KERNEL and os.environ.get("DSAN_REQUIRE_CPP") != "1",
                                  reason=f"compiled op not built: {ops_dscn.extension_error()}")
pytestmark = needs_kernel


def reference64(x, w1, b1, wd, bd, w2, b2, res=None):
    """The MLP written out independently of the op's Python reference: float64, explicit zero padding and erf."""
    d = [t.double() if t is not None else None for t in (x, w1, b1, wd, bd, w2, b2, res)]
    x, w1, b1, wd, bd, w2, b2, res = d
    h = torch.einsum("nchw,oc->nohw", x, w1[:, :, 0, 0])
    if b1 is not None:
        h = h + b1.view(1, -1, 1, 1)
    hp = F.pad(h, (1, 1, 1, 1))
    H, W = h.shape[2:]
    a = sum(hp[:, :, dy:dy + H, dx:dx + W] * wd[:, 0, dy, dx].view(1, -1, 1, 1) for dy in range(3) for dx in range(3))
    if bd is not None:
        a = a + bd.view(1, -1, 1, 1)
    a = 0.5 * a * (1 + torch.erf(a / 2 ** 0.5))
    y = torch.einsum("nchw,oc->nohw", a, w2[:, :, 0, 0])
    if b2 is not None:
        y = y + b2.view(1, -1, 1, 1)
    return y if res is None else y + res


def make(n, c, h, w, ratio=4, c_out=None, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ch, c_out = c * ratio, c_out or c

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = r(n, c, h, w).contiguous(memory_format=torch.channels_last)
    args = [x, r(ch, c, 1, 1, scale=c ** -0.5), r(ch) if bias else None, r(ch, 1, 3, 3, scale=1 / 3),
            r(ch) if bias else None, r(c_out, ch, 1, 1, scale=ch ** -0.5), r(c_out) if bias else None]
    return args, r(n, c_out, h, w)


# Geometries: DSAN stage shapes, sizes that leave vector tails (C * ratio not a multiple of 16), a single row or
# column, and images whose rows need several ring steps (W * hidden wide enough that a step holds few rows). From
# 1024 pixels float32 runs its products by cpu_small_gemm.h: the last two cases (8 and 2 panels, widths 36 and 20
# that end in part vectors). The depthwise row loops take 4 channel vectors at a time, then single vectors, then
# scalars: hidden widths 80 (one group and one vector, on a single column) and 640 (two groups and two vectors).
CASES = [
    (2, 32, 14, 15, 8, None), (1, 64, 7, 7, 8, None), (3, 5, 7, 9, 3, None), (2, 16, 1, 1, 2, None),
    (1, 8, 3, 2, 4, 6), (2, 12, 1, 9, 4, None), (1, 4, 9, 1, 4, None), (2, 160, 5, 6, 4, None),
    (1, 16, 3, 1, 5, None), (1, 64, 23, 64, 8, 32), (2, 12, 20, 30, 3, 20),
]


@pytest.mark.parametrize("n,c,h,w,ratio,c_out", CASES)
@pytest.mark.parametrize("residual", [False, True])
def test_matches_float64_reference(n, c, h, w, ratio, c_out, residual):
    args, res = make(n, c, h, w, ratio, c_out, dtype=torch.float64)
    res = res if residual else None
    ref = reference64(*args, res)
    with torch.no_grad():
        y64 = torch.ops.ops_dscn.conv_mlp(*args, res)
        y32 = torch.ops.ops_dscn.conv_mlp(*[a.float() for a in args], None if res is None else res.float())
        unfused32 = conv_mlp_reference(*[a.float() for a in args], None if res is None else res.float())
    assert y64.is_contiguous(memory_format=torch.channels_last) and y64.shape == ref.shape
    torch.testing.assert_close(y64, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y32.double(), ref, atol=2e-5, rtol=1e-5)
    # "Numerically equal to the unfused MLP": as close to it as float32 rounding allows.
    torch.testing.assert_close(y32, unfused32, atol=2e-5, rtol=1e-5)


def test_without_biases_and_from_nchw_memory():
    args, res = make(2, 8, 6, 5, 4, bias=False, dtype=torch.float64)
    args[0] = args[0].contiguous()  # plain NCHW memory: the op makes its own channels_last copy
    with torch.no_grad():
        y = torch.ops.ops_dscn.conv_mlp(*args, res.contiguous())
    torch.testing.assert_close(y, reference64(*args, res), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_bands_and_thread_counts_give_the_same_result(threads):
    """With fewer images than threads each image is cut into bands of rows that recompute their halo rows."""
    args, res = make(1, 16, 13, 11, 4, dtype=torch.float64)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            y = torch.ops.ops_dscn.conv_mlp(*args, res)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y, reference64(*args, res), atol=1e-12, rtol=1e-12)


def test_float32_gelu_is_accurate_over_its_whole_range():
    """With identity 1x1 convs and a centre-only depthwise kernel the op is GELU itself: the float erf approximation
    is compared with float64 GELU from -12 to 12 (the tails, where erf saturates, included)."""
    c = 64
    v = torch.linspace(-12, 12, 4096, dtype=torch.float64)
    x = v.view(1, 1, 64, 64).expand(1, c, 64, 64).float().contiguous(memory_format=torch.channels_last)
    eye = torch.eye(c).view(c, c, 1, 1)
    wd = torch.zeros(c, 1, 3, 3)
    wd[:, 0, 1, 1] = 1
    with torch.no_grad():
        y = torch.ops.ops_dscn.conv_mlp(x, eye, None, wd, None, eye, None)
    expected = F.gelu(x.double())
    # ATen's own float32 GELU is within 4.5e-7 of float64 here; the rational erf within 8e-7 (its largest errors are
    # in the negative tail, where GELU itself is below 1e-3 in magnitude).
    torch.testing.assert_close(y.double(), expected, atol=1e-6, rtol=2e-7)
    positive = x > 0.01
    assert ((y.double() - expected).abs() / expected.abs())[positive].max() < 3e-7


def test_opcheck():
    args, res = make(2, 8, 5, 6, 4)
    torch.library.opcheck(torch.ops.ops_dscn.conv_mlp.default, (*args, res),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.ops_dscn.conv_mlp.default, tuple(args),
                          test_utils=("test_schema", "test_faketensor"))


def _bad_cases():
    args, res = make(2, 8, 5, 6, 4)
    x, w1, b1, wd, bd, w2, b2 = args
    yield (x[0], w1, b1, wd, bd, w2, b2, None), "input must be 4-D"
    yield (x.half(), w1, b1, wd, bd, w2, b2, None), "input dtype must be one of float32, float64; got float16"
    yield (x, w1[:, :4], b1, wd, bd, w2, b2, None), r"fc1_weight must have shape \[32, 8, 1, 1\]; got \[32, 4, 1, 1\]"
    yield (x, w1, b1, wd[:, :, :2], bd, w2, b2, None), r"dw_weight must have shape \[32, 1, 3, 3\]"
    yield (x, w1, b1, wd, bd, w2[:, :16], b2, None), r"fc2_weight must have shape \[8, 32, 1, 1\]"
    yield (x, w1, b1[:3], wd, bd, w2, b2, None), r"fc1_bias must have shape \(32,\); got \[3\]"
    yield (x, w1, b1, wd, bd, w2, b2[None], None), r"fc2_bias must have shape \(8,\); got \[1, 8\]"
    yield (x, w1.double(), b1, wd, bd, w2, b2, None), "fc1_weight dtype must equal input dtype float32; got float64"
    yield (x, w1, b1, wd, bd.double(), w2, b2, None), "dw_bias dtype must equal input dtype float32; got float64"
    yield (x, w1, b1, wd, bd, w2, b2, res[:, :, :2]), r"residual must have shape \[2, 8, 5, 6\]; got \[2, 8, 2, 6\]"
    yield (x, w1, b1, wd, bd, w2, b2, res.double()), "residual dtype must equal input dtype float32; got float64"


def _bad_packed_cases():
    # (build, match): build(args, res, p1, p2) gives the op's arguments. Packing needs the compiled op, so the test
    # packs; doing it here would fail the module's collection instead of letting the skip marker apply.
    yield lambda args, res, p1, p2: (*args, res, p1, None), \
        "fc1_packed and fc2_packed must be given together; got only fc1_packed"
    yield lambda args, res, p1, p2: (*args, res, None, p2), \
        "fc1_packed and fc2_packed must be given together; got only fc2_packed"
    yield lambda args, res, p1, p2: (*args, res, p2, p1), \
        r"fc1_packed must have shape \(256,\), the packed form of a \(32, 8\) weight " \
        r"\(ops_dscn.pack_weight\); got \[512\]"
    yield lambda args, res, p1, p2: (*args, res, p1, p2[:-16]), \
        r"fc2_packed must have shape \(512,\), the packed form of a \(8, 32\) weight " \
        r"\(ops_dscn.pack_weight\); got \[496\]"
    yield lambda args, res, p1, p2: (*args, res, p1.double(), p2), "fc1_packed dtype must be float32; got float64"
    yield lambda args, res, p1, p2: (*[a.double() for a in args], res.double(), p1, p2), \
        r"fc1_packed \(packed weights\) needs a float32 input; got float64"


def _assert_named_alike(args, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.ops_dscn.conv_mlp(*args)
    with FakeTensorMode() as mode:
        fake = [None if a is None else mode.from_tensor(a) for a in args]
        with pytest.raises(ValueError, match=match):
            torch.ops.ops_dscn.conv_mlp(*fake)


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[1][:30])
def test_bad_input_is_named_alike_by_kernel_and_fake_kernel(case):
    args, match = case
    _assert_named_alike(args, match)


@pytest.mark.parametrize("case", list(_bad_packed_cases()), ids=lambda c: c[1][:30])
def test_bad_packed_input_is_named_alike_by_kernel_and_fake_kernel(case):
    build, match = case
    args, res = make(2, 8, 5, 6, 4)
    _assert_named_alike(build(args, res, ops_dscn.pack_weight(args[1]), ops_dscn.pack_weight(args[5])), match)


def grads64(args, res, grad):
    """Gradients of `reference64` (float64 autograd of the independent reference) w.r.t. the non-None args and res."""
    leaves = [None if a is None else a.detach().double().requires_grad_() for a in (*args, res)]
    y = reference64(*leaves)
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad(y, present, grad.double())


def kernel_grads(args, res, grad):
    """Gradients through the fused op (autograd formula registered from Python, C++ backward kernel)."""
    leaves = [None if a is None else a.detach().requires_grad_() for a in (*args, res)]
    y = conv_mlp(*leaves, backend="cpp")
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad(y, present, grad)


# Backward geometries: DSAN-like shapes, vector tails, one row / column, several steps per image and, with more
# threads than images, images cut into bands; (n, c, h, w, ratio, c_out). The two of 1024 pixels or more take the
# products by cpu_small_gemm.h in float32 (widths of whole vectors, and of 12, 20 and 36 that end in part vectors).
# The weight gradients go through its a^T b product where the width is whole vectors: the last case has widths of
# 48 (panels of 32 + 16) and 96 (64 + 32), 16 output rows (blocks of 6, 2 and 2) and several depth blocks. Hidden
# width 80 on a single column: the depthwise loops' groups of vectors (4 for the conv, 2 for its weight gradient)
# and a single vector after them.
GRAD_CASES = [
    (2, 16, 9, 10, 4, None), (3, 5, 7, 9, 3, None), (1, 8, 3, 2, 4, 6), (2, 12, 1, 9, 4, None),
    (1, 4, 9, 1, 4, None), (2, 16, 5, 1, 5, None), (1, 64, 23, 64, 8, 32), (2, 32, 12, 12, 8, None),
    (5, 8, 2, 3, 2, None), (2, 12, 20, 30, 3, 20), (2, 48, 16, 40, 2, 16),
]


@pytest.mark.parametrize("n,c,h,w,ratio,c_out", GRAD_CASES)
@pytest.mark.parametrize("residual", [False, True])
def test_backward_matches_float64_reference(n, c, h, w, ratio, c_out, residual):
    args, res = make(n, c, h, w, ratio, c_out, dtype=torch.float64, seed=1)
    res = res.contiguous(memory_format=torch.channels_last) if residual else None
    grad = make(n, c_out or c, h, w, 1, dtype=torch.float64, seed=2)[0][0]
    expected = grads64(args, res, grad)
    got64 = kernel_grads(args, res, grad)
    got32 = kernel_grads([None if a is None else a.float() for a in args], None if res is None else res.float(),
                         grad.float())
    assert len(got64) == len(expected) == (8 if residual else 7)
    assert got64[0].is_contiguous(memory_format=torch.channels_last)
    for g64, g32, e in zip(got64, got32, expected):
        assert g64.shape == e.shape and g32.dtype == torch.float32
        torch.testing.assert_close(g64, e, atol=1e-11, rtol=1e-11)
        scale = e.abs().max().item()
        torch.testing.assert_close(g32.double(), e, atol=2e-6 * scale, rtol=1e-5)


def test_gradcheck():
    for (n, c, h, w, ratio), bias in (((2, 4, 5, 6, 2), True), ((1, 3, 4, 3, 3), False)):
        args, res = make(n, c, h, w, ratio, bias=bias, dtype=torch.float64, seed=3)
        leaves = [None if a is None else a.requires_grad_() for a in (*args, res)]
        assert torch.autograd.gradcheck(lambda *t: conv_mlp(*t, backend="cpp"), leaves)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_backward_bands_and_thread_counts(threads):
    """Bands (fewer images than threads) and per-thread weight-gradient buffers give the float64 reference."""
    args, res = make(2, 16, 13, 11, 4, dtype=torch.float64, seed=4)
    grad = make(2, 16, 13, 11, 1, dtype=torch.float64, seed=5)[0][0]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel_grads(args, None, grad)
    finally:
        torch.set_num_threads(old)
    for g, e in zip(got, grads64(args, None, grad)):
        torch.testing.assert_close(g, e, atol=1e-11, rtol=1e-11)


def test_backward_keeps_only_the_input():
    """Autograd saves the input and the weights, no hidden tensor (what the fused backward is for); the unfused
    reference saves three."""
    args, _ = make(2, 8, 6, 6, 8)
    hidden_shape = (2, 64, 6, 6)

    def saved_shapes(fn):
        leaves = [a.detach().requires_grad_() for a in args]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            fn(*leaves)
        return saved

    fused = saved_shapes(lambda *t: conv_mlp(*t, backend="cpp"))
    assert (2, 8, 6, 6) in fused and hidden_shape not in fused
    assert saved_shapes(conv_mlp_reference).count(hidden_shape) >= 3


def test_backward_bad_grad_output_is_named():
    args, res = make(2, 8, 5, 6, 4)
    g = res
    for bad, match in ((g[:, :, :2], r"grad_output must have shape \[2, 8, 5, 6\]; got \[2, 8, 2, 6\]"),
                       (g.double(), "grad_output dtype must equal input dtype float32; got float64")):
        with pytest.raises(ValueError, match=match):
            torch.ops.ops_dscn._conv_mlp_backward(bad, *args[:6])
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(t) if t is not None else None for t in (bad, *args[:6])]
            with pytest.raises(ValueError, match=match):
                torch.ops.ops_dscn._conv_mlp_backward(*fake)


def test_backends():
    args, _ = make(1, 8, 4, 4, 4)
    leaves = [a.requires_grad_() for a in args]
    # 'cpp' and 'auto' run the kernel with gradients needed; 'pytorch' the reference; all agree.
    g = {}
    for backend in ("cpp", "auto", "pytorch"):
        y = conv_mlp(*leaves, backend=backend)
        g[backend] = torch.autograd.grad(y.square().sum(), leaves)
    for a, b, c in zip(g["cpp"], g["auto"], g["pytorch"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="backend must be one of"):
        conv_mlp(*args, backend="cuda")


def test_opcheck_with_autograd():
    args, res = make(2, 8, 5, 6, 4, dtype=torch.float64)
    leaves = [a.requires_grad_() for a in args]
    torch.library.opcheck(torch.ops.ops_dscn.conv_mlp.default, (*leaves, res.requires_grad_()))
    torch.library.opcheck(torch.ops.ops_dscn.conv_mlp.default, tuple(leaves))
    g = make(2, 8, 5, 6, 1, dtype=torch.float64)[0][0]
    torch.library.opcheck(torch.ops.ops_dscn._conv_mlp_backward.default, (g, *args[:6]),
                          test_utils=("test_schema", "test_faketensor"))


def test_auto_uses_the_kernel_only_where_it_applies():
    args, _ = make(1, 8, 4, 4, 4)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            seen.append(func)
            return func(*a, **(kw or {}))

    with torch.no_grad(), Spy():
        conv_mlp(*args)
        conv_mlp(*[a.bfloat16() for a in args])  # no bfloat16 kernel: the reference runs
    kernel_calls = [f for f in seen if f is torch.ops.ops_dscn.conv_mlp.default]
    assert len(kernel_calls) == 1
    assert torch.ops.aten.convolution.default in seen


# Weights packed before (ops_dscn.pack_weight) are read at any size: below and above 1024 pixels, hidden widths with
# narrow last panels (36, 100), one pixel, an output width of one part vector (20).
PACKED_CASES = [(1, 64, 7, 7, 4, None), (2, 12, 5, 6, 3, 20), (1, 25, 1, 1, 4, None), (1, 32, 40, 30, 8, None),
                (2, 9, 4, 3, 4, 5)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,c,h,w,ratio,c_out", PACKED_CASES)
def test_packed_weights_match_float64_reference(n, c, h, w, ratio, c_out, threads):
    args, res = make(n, c, h, w, ratio, c_out)
    p1, p2 = ops_dscn.pack_weight(args[1]), ops_dscn.pack_weight(args[5])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            y = conv_mlp(*args, res, backend="cpp", fc1_packed=p1, fc2_packed=p2)
            plain = torch.ops.ops_dscn.conv_mlp(*args, res)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y.double(), reference64(*[a.double() for a in args], res.double()), atol=2e-5,
                               rtol=1e-5)
    torch.testing.assert_close(y, plain, atol=2e-5, rtol=1e-5)


def test_packed_weights_gradients_opcheck_and_compile():
    args, res = make(1, 8, 5, 4, 4)
    p1, p2 = ops_dscn.pack_weight(args[1]), ops_dscn.pack_weight(args[5])
    leaves = [a.detach().requires_grad_() for a in args]
    g = torch.randn(1, 8, 5, 4)
    expected = torch.autograd.grad(torch.ops.ops_dscn.conv_mlp(*leaves, res), leaves, g)
    got = torch.autograd.grad(torch.ops.ops_dscn.conv_mlp(*leaves, res, p1, p2), leaves, g)
    for e, k in zip(expected, got):
        torch.testing.assert_close(k, e, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.ops_dscn.conv_mlp.default, (*args, res, p1, p2))
    fn = torch.compile(lambda *a: conv_mlp(*a, res, fc1_packed=p1, fc2_packed=p2), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(*args), conv_mlp_reference(*args, res), atol=2e-5, rtol=1e-5)


def test_torch_compile_fullgraph():
    args, res = make(2, 8, 6, 6, 4)

    def f(*a):
        return conv_mlp(*a)

    with torch.no_grad():
        eager = f(*args, res)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args, res)
    torch.testing.assert_close(compiled, eager)
    # Training through the compiled graph: the registered autograd formula and the backward's fake kernel.
    leaves = [a.detach().requires_grad_() for a in args]
    g_eager = torch.autograd.grad(f(*leaves, res).square().sum(), leaves)
    g_comp = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves, res).square().sum(),
                                 leaves)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_simd_path(isa, tmp_path):
    """The kernel's baseline, AVX2 and AVX-512 builds are each checked against float64 (vector tails included)."""
    script_text = (
        "import torch, ops_dscn, torch.nn.functional as F\n"
        "torch.manual_seed(0)\n"
        "for c, r in ((8, 4), (5, 3), (32, 8)):\n"
        "    x = torch.randn(2, c, 6, 7, dtype=torch.float64)\n"
        "    def rnd(*s, scale=1.0):\n"
        "        return torch.randn(*s, dtype=torch.float64) * scale\n"
        "    a = [x, rnd(c * r, c, 1, 1, scale=c ** -0.5), rnd(c * r), rnd(c * r, 1, 3, 3, scale=1 / 3), rnd(c * r),\n"
        "         rnd(c, c * r, 1, 1, scale=(c * r) ** -0.5), rnd(c)]\n"
        "    with torch.no_grad():\n"
        "        ref = ops_dscn.conv_mlp_reference(*a)\n"
        "        torch.testing.assert_close(torch.ops.ops_dscn.conv_mlp(*a), ref, atol=1e-11, rtol=1e-11)\n"
        "        y = torch.ops.ops_dscn.conv_mlp(*[t.float() for t in a])\n"
        "        torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=1e-5)\n"
        "        a32 = [t.float() for t in a]\n"
        "        p1, p2 = ops_dscn.pack_weight(a32[1]), ops_dscn.pack_weight(a32[5])\n"
        "        y = torch.ops.ops_dscn.conv_mlp(*a32, None, p1, p2)\n"
        "        torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=1e-5)\n"
        "    g = torch.randn(ref.shape, dtype=torch.float64)\n"
        "    for dt, tol in ((torch.float64, 1e-11), (torch.float32, 1e-5)):\n"
        "        leaves = [t.to(dt).requires_grad_() for t in a]\n"
        "        got = torch.autograd.grad(ops_dscn.conv_mlp(*leaves, backend='cpp'), leaves, g.to(dt))\n"
        "        leaves = [t.detach().requires_grad_() for t in a]\n"
        "        exp = torch.autograd.grad(ops_dscn.conv_mlp_reference(*leaves), leaves, g)\n"
        "        for u, v in zip(got, exp):\n"
        "            torch.testing.assert_close(u.double(), v, atol=tol * v.abs().max().item(), rtol=tol)\n"
        "print('ok')\n"
    )
    run_under_isa(isa, script_text, tmp_path)
