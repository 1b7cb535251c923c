"""Tests of ops_dscn.pointwise_conv, a 1x1 conv with its elementwise epilogue fused for CPU, against float64."""
import math
import os

import _use_installed  # noqa: F401  (first: the installed ops_dscn, not the source tree)
import pytest
import torch
from isa_check import ISAS, run_under_isa
from torch._subclasses.fake_tensor import FakeTensorMode

import ops_dscn
from ops_dscn import pointwise_conv, pointwise_conv_reference

HAS_KERNEL = ops_dscn.pointwise_conv_available(torch.empty(0))
pytestmark = pytest.mark.skipif(not HAS_KERNEL and os.environ.get("DSAN_REQUIRE_CPP") != "1",
                                reason=f"compiled op not built: {ops_dscn.extension_error()}")
CL = torch.channels_last
# Which epilogue operands a call has: (bias, gelu, gate, residual, residual_scale). DSAN's three uses come first.
EPILOGUES = [(True, True, False, False, False), (True, False, True, False, False), (True, False, False, True, True),
             (True, False, False, True, False), (False, False, False, False, False), (True, True, True, True, True),
             (False, True, False, True, False)]


def reference64(x, weight, bias, gelu, gate, residual, residual_scale):
    """The epilogue written out independently, in float64: per-pixel sums over channels, GELU from erf."""
    x, w = x.double(), weight.double().reshape(weight.shape[0], -1)
    y = torch.einsum("nchw,oc->nohw", x, w)
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    if gelu:
        y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
    if gate is not None:
        y = y * gate.double()
    if residual is not None:
        scale = 1.0 if residual_scale is None else residual_scale.double().reshape(1, -1, 1, 1)
        y = y + residual.double() * scale
    return y


def make(n, c, co, h, w, epilogue, dtype=torch.float64, seed=0, weight_4d=True, nchw=False):
    """Arguments (x, weight, bias, gelu, gate, residual, residual_scale) of one call."""
    has_bias, gelu, has_gate, has_res, has_scale = epilogue
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, cl=False):
        v = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        return v.contiguous(memory_format=CL) if cl and not nchw else v

    x = t(n, c, h, w, cl=True)
    weight = t(co, c, 1, 1) / math.sqrt(c) if weight_4d else t(co, c) / math.sqrt(c)
    return (x, weight, t(co) if has_bias else None, gelu, t(n, co, h, w, cl=True) if has_gate else None,
            t(n, co, h, w, cl=True) if has_res else None, t(co, 1, 1) if has_scale else None)


# (n, c, co, h, w): DSAN-T's shapes at small sizes, channel counts with vector tails, several row blocks per thread
# (64 rows a block at least), one pixel.
SHAPES = [(2, 32, 32, 5, 6), (1, 17, 9, 3, 7), (2, 8, 40, 12, 13), (3, 5, 3, 1, 1), (1, 64, 64, 14, 14)]


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, epilogue):
    args = make(*shape, epilogue)
    expected = reference64(*args)
    with torch.no_grad():
        got = torch.ops.ops_dscn.pointwise_conv(*args)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        assert got.is_contiguous(memory_format=CL)
        a32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        got32 = torch.ops.ops_dscn.pointwise_conv(*a32)
        torch.testing.assert_close(got32.double(), expected, atol=2e-5, rtol=2e-5)
        # the one-by-one reference (what runs where the kernel does not) agrees as well
        torch.testing.assert_close(pointwise_conv_reference(*a32), got32, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_nchw_memory_2d_weight_and_any_thread_count(threads):
    epilogue = (True, True, True, True, True)
    args = make(2, 24, 16, 11, 9, epilogue, dtype=torch.float32, weight_4d=False, nchw=True)
    assert not args[0].is_contiguous(memory_format=CL)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = pointwise_conv(*args, backend="cpp")
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got.double(), reference64(*args), atol=2e-5, rtol=2e-5)


def test_empty_batch():
    args = make(0, 8, 4, 3, 3, (True, True, True, True, True))
    assert torch.ops.ops_dscn.pointwise_conv(*args).shape == (0, 4, 3, 3)


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=str)
def test_gradients_match_float64_reference_and_gradcheck(epilogue):
    args = make(2, 6, 5, 3, 4, epilogue)
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    g = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    expected = torch.autograd.grad(reference64(*leaves), tensors, g)
    got = torch.autograd.grad(torch.ops.ops_dscn.pointwise_conv(*leaves), tensors, g)
    for e, k in zip(expected, got):
        torch.testing.assert_close(k, e, atol=1e-10, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.ops_dscn.pointwise_conv(*a), tuple(leaves))


def test_only_the_gradients_asked_for():
    x, weight, bias, _, gate, residual, scale = make(1, 4, 4, 2, 3, (True, True, True, True, True))
    weight.requires_grad_()
    residual.requires_grad_()
    y = torch.ops.ops_dscn.pointwise_conv(x, weight, bias, True, gate, residual, scale)
    g_w, g_r = torch.autograd.grad(y.sum(), (weight, residual))
    assert g_w.shape == weight.shape and torch.equal(g_r, scale.expand(1, 4, 2, 3).contiguous())


def test_opcheck():
    for epilogue in EPILOGUES[:3] + EPILOGUES[-2:]:
        args = make(2, 8, 6, 3, 4, epilogue, dtype=torch.float32)
        torch.library.opcheck(torch.ops.ops_dscn.pointwise_conv.default, args)


def test_compiles():
    args = make(1, 16, 8, 5, 5, (True, True, True, True, True), dtype=torch.float32)
    fn = torch.compile(lambda *a: pointwise_conv(*a) * 2, fullgraph=True, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(fn(*args), pointwise_conv_reference(*args) * 2, atol=1e-5, rtol=1e-5)


def packed_size_reference(c_out, c_in):
    """pack_weight's length written out: 64-column panels, widths padded to 16 floats, 48 padded to 64."""
    total = 0
    for c in range(0, c_out, 64):
        width = min(64, c_out - c)
        padded = {16: 16, 32: 32, 48: 64, 64: 64}[(width + 15) // 16 * 16]
        total += c_in * padded
    return total


@pytest.mark.parametrize("c_out,c_in", [(1, 1), (16, 3), (17, 5), (40, 32), (48, 7), (64, 9), (65, 2), (130, 4),
                                        (256, 160)])
def test_pack_weight_layout(c_out, c_in):
    gen = torch.Generator().manual_seed(c_out * 1000 + c_in)
    w = torch.randn(c_out, c_in, 1, 1, generator=gen)
    packed = ops_dscn.pack_weight(w)
    assert packed.shape == (packed_size_reference(c_out, c_in),) and packed.dtype == torch.float32
    # panel p holds columns [64p, 64p + width) of w^T, (c_in, padded) row-major, zeros in the padding
    wt, off = w.reshape(c_out, c_in).t(), 0
    for c in range(0, c_out, 64):
        width = min(64, c_out - c)
        padded = packed_size_reference(width, 1)
        panel = packed[off:off + c_in * padded].reshape(c_in, padded)
        assert torch.equal(panel[:, :width], wt[:, c:c + width])
        assert not panel[:, width:].any()
        off += c_in * padded
    assert torch.equal(ops_dscn.pack_weight(w.reshape(c_out, c_in)), packed)  # (C_out, C) alike
    with FakeTensorMode() as mode:
        assert torch.ops.ops_dscn.pack_weight(mode.from_tensor(w)).shape == packed.shape


# (n, c, co, h, w): one row block with its panels split between the threads (49 pixels: DSAN-T stage 4 at batch 1),
# several blocks, output widths with narrow last panels.
PACKED_SHAPES = [(1, 32, 256, 7, 7), (2, 24, 100, 9, 10), (1, 8, 20, 3, 3), (1, 16, 72, 40, 40), (1, 5, 130, 1, 1)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("epilogue", [EPILOGUES[0], EPILOGUES[2], EPILOGUES[5]], ids=str)
@pytest.mark.parametrize("shape", PACKED_SHAPES, ids=str)
def test_packed_weight_matches_float64_reference(shape, epilogue, threads):
    args = make(*shape, epilogue, dtype=torch.float32)
    packed = ops_dscn.pack_weight(args[1])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = pointwise_conv(*args, backend="cpp", packed=packed)
            plain = torch.ops.ops_dscn.pointwise_conv(*args)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got.double(), reference64(*args), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, plain, atol=2e-5, rtol=2e-5)
    assert got.is_contiguous(memory_format=CL)


def test_packed_weight_gradients_and_compile():
    args = make(2, 8, 6, 3, 4, EPILOGUES[5], dtype=torch.float32)
    packed = ops_dscn.pack_weight(args[1])
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    g = torch.randn(2, 6, 3, 4)
    expected = torch.autograd.grad(torch.ops.ops_dscn.pointwise_conv(*leaves), tensors, g)
    got = torch.autograd.grad(torch.ops.ops_dscn.pointwise_conv(*leaves, packed), tensors, g)
    for e, k in zip(expected, got):
        torch.testing.assert_close(k, e, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.ops_dscn.pointwise_conv.default, (*args, packed))
    torch.library.opcheck(torch.ops.ops_dscn.pack_weight.default, (args[1],))
    fn = torch.compile(lambda x, w: pointwise_conv(x, w, *args[2:], packed=ops_dscn.pack_weight(w)), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(args[0], args[1]), pointwise_conv_reference(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight,match", [
    (torch.zeros(4, 3, 2, 1), r"weight must have shape \(C_out, C, 1, 1\) or \(C_out, C\); got \[4, 3, 2, 1\]"),
    (torch.zeros(4, 3, dtype=torch.float64), "weight dtype must be float32; got float64")])
def test_bad_pack_weight_input(weight, match):
    with pytest.raises(ValueError, match="pack_weight: " + match):
        ops_dscn.pack_weight(weight)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="pack_weight: " + match):
        torch.ops.ops_dscn.pack_weight(mode.from_tensor(weight))


def _bad_cases():
    x, w, b, _, gate, res, scale = make(2, 8, 6, 3, 4, (True, False, True, True, True), dtype=torch.float32)
    yield (x[0], w, b, False, None, None, None), r"input must be 4-D \(N, C, H, W\); got 3-D"
    yield (x.half(), w.half(), None, False, None, None, None), "input dtype must be one of float32, float64; got " \
        "float16"
    yield (x, w[..., :1, :].expand(6, 8, 2, 1), b, False, None, None, None), \
        r"weight must have shape \(C_out, C, 1, 1\) or \(C_out, C\); got \[6, 8, 2, 1\]"
    yield (x, w[:, :5], b, False, None, None, None), r"weight must have C = 8 input channels \(the input's\); got 5"
    yield (x, w.double(), b, False, None, None, None), "weight dtype must equal input dtype float32; got float64"
    yield (x, w, b[:4], False, None, None, None), r"bias must have shape \(6,\); got \[4\]"
    yield (x, w, b.double(), False, None, None, None), "bias dtype must equal input dtype float32; got float64"
    yield (x, w, b, False, gate[:, :5], None, None), \
        r"gate must have the output's shape \[2, 6, 3, 4\]; got \[2, 5, 3, 4\]"
    yield (x, w, b, False, gate.double(), None, None), "gate dtype must equal input dtype float32; got float64"
    yield (x, w, b, False, None, res[:1], None), \
        r"residual must have the output's shape \[2, 6, 3, 4\]; got \[1, 6, 3, 4\]"
    yield (x, w, b, False, None, None, scale), "residual_scale needs a residual; got none"
    yield (x, w, b, False, None, res, scale[:3]), \
        r"residual_scale must have shape \(6,\) or \(6, 1, 1\); got \[3, 1, 1\]"
    yield (x, w, b, False, None, res, scale.double()), "residual_scale dtype must equal input dtype float32"


def _bad_packed_cases():
    # (build, match): build(x, w, b, p) gives the op's arguments. Packing needs the compiled op, so the test packs;
    # doing it here would fail the module's collection instead of letting the skip marker apply.
    yield lambda x, w, b, p: (x, w, b, True, None, None, None, p[:-1]), \
        r"packed must have shape \(128,\), the packed form of a \(6, 8\) weight \(ops_dscn.pack_weight\); got \[127\]"
    yield lambda x, w, b, p: (x, w, b, True, None, None, None, p.double()), "packed dtype must be float32; got float64"
    yield lambda x, w, b, p: (x, w, b, True, None, None, None, torch.stack([p, p], 1)[:, 0]), \
        "packed must be contiguous; got strides"
    yield lambda x, w, b, p: (x.double(), w.double(), b.double(), True, None, None, None, p), \
        r"packed \(packed weights\) needs a float32 input; got float64"


def _assert_named_alike(args, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.ops_dscn.pointwise_conv(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=match):
            torch.ops.ops_dscn.pointwise_conv(*fake)


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[1][:40])
def test_bad_input_is_named_alike_by_kernel_and_fake_kernel(case):
    args, match = case
    _assert_named_alike(args, match)


@pytest.mark.parametrize("case", list(_bad_packed_cases()), ids=lambda c: c[1][:40])
def test_bad_packed_input_is_named_alike_by_kernel_and_fake_kernel(case):
    build, match = case
    x, w, b, _, _, _, _ = make(2, 8, 6, 3, 4, EPILOGUES[0], dtype=torch.float32)
    _assert_named_alike(build(x, w, b, ops_dscn.pack_weight(w)), match)


def test_backend_choice():
    args = make(1, 4, 4, 2, 2, (True, True, False, False, False), dtype=torch.float16)
    with pytest.raises(RuntimeError, match="backend='cpp' needs the compiled kernel and a CPU float32/float64 input; "
                                           "got a float16 tensor on cpu"):
        pointwise_conv(*args, backend="cpp")
    with pytest.raises(ValueError, match="backend must be one of"):
        pointwise_conv(*args, backend="cuda")
    assert pointwise_conv(*args).dtype == torch.float16  # 'auto' falls back to the reference


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_simd_path(isa, tmp_path):
    """The kernel's baseline, AVX2 and AVX-512 builds against float64 (channel counts with vector tails)."""
    script_text = (
        "import torch\n"
        "from test_pointwise import EPILOGUES, make, reference64\n"
        "for co in (5, 32, 40):\n"
        "    for epilogue in EPILOGUES:\n"
        "        args = make(2, 7, co, 5, 6, epilogue)\n"
        "        ref = reference64(*args)\n"
        "        with torch.no_grad():\n"
        "            y = torch.ops.ops_dscn.pointwise_conv(*args)\n"
        "            torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)\n"
        "            a32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]\n"
        "            y = torch.ops.ops_dscn.pointwise_conv(*a32)\n"
        "            torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)\n"
        "# packed weights: panels split between threads (one row block, 2-3 panels), or not (several blocks)\n"
        "torch.set_num_threads(2)\n"
        "for n, co, h in ((1, 130, 5), (2, 40, 9), (1, 200, 2)):\n"
        "    args = make(n, 7, co, h, 6, EPILOGUES[5], dtype=torch.float32)\n"
        "    with torch.no_grad():\n"
        "        y = torch.ops.ops_dscn.pointwise_conv(*args, torch.ops.ops_dscn.pack_weight(args[1]))\n"
        "    torch.testing.assert_close(y.double(), reference64(*args), atol=2e-5, rtol=2e-5)\n"
        "print('ok')\n"
    )
    run_under_isa(isa, script_text, tmp_path)


def test_a_tensor_on_another_device_is_named():
    """A meta tensor among CPU ones sends the call to the fake kernel, which used to return uninitialized memory."""
    x = torch.randn(1, 4, 3, 3)
    w, b = torch.randn(5, 4), torch.randn(5)
    out = (1, 5, 3, 3)
    for kwargs, name in (({"weight": w.to("meta")}, "weight"), ({"bias": b.to("meta")}, "bias"),
                         ({"gate": torch.randn(out, device="meta")}, "gate"),
                         ({"residual": torch.randn(out, device="meta")}, "residual")):
        args = {"weight": w, "bias": b, **kwargs}
        with pytest.raises(ValueError, match=f"pointwise_conv: {name} must be on the input's device cpu; got meta"):
            pointwise_conv(x, backend="cpp", **args)
