"""Tests of the DSCN operator: compiled CPU op, pure-PyTorch op and (when a GPU exists) the CUDA op, against an
independent float64 reference written from the definition."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from dscn_reference import dscn_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ops_dscn
from ops_dscn import dscn
from ops_dscn import functional as F_dscn
from ops_dscn.functions import DSCNFunction
from ops_dscn.modules import DSCNX, DSCNY

HAS_EXT = ops_dscn.extension_available()
HAS_CUDA = torch.cuda.is_available() and HAS_EXT
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"compiled op not built: {ops_dscn.extension_error()}")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (or the op was built without CUDA)")
BACKENDS = (["cpp"] if HAS_EXT else []) + ["pytorch"]


def _inputs(n, h, w, c, taps, group, axis, kernel, stride, pad, dilation, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, c, generator=g, dtype=dtype)
    if axis == "x":
        ho, wo = h, (w + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    else:
        ho, wo = (h + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1, w
    off = torch.randn(n, ho, wo, group * taps, generator=g, dtype=dtype) * scale
    return x, off


def _check_against_reference(backend, n, h, w, gc, group, kernel, stride, pad, dilation, scale, remove_center, axis,
                             seed=0, atol=1e-9):
    taps = kernel - int(remove_center)
    x, off = _inputs(n, h, w, gc * group, taps, group, axis, kernel, stride, pad, dilation, seed=seed)
    x.requires_grad_(True)
    off.requires_grad_(True)
    kw = dict(kernel_size=kernel, stride=stride, pad=pad, dilation=dilation, group=group, offset_scale=scale,
              remove_center=remove_center, axis=axis)
    out = dscn(x, off, backend=backend, **kw)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    if out.numel():
        gx, goff = torch.autograd.grad(out, (x, off), grad_out)
    else:
        gx, goff = torch.zeros_like(x), torch.zeros_like(off)
    ref_out, ref_gx, ref_goff = dscn_reference(x.detach().numpy(), off.detach().numpy(), kernel, stride, pad,
                                               dilation, group, scale, remove_center, axis, grad_out.numpy())
    np.testing.assert_allclose(out.detach().numpy(), ref_out, atol=atol, rtol=1e-9)
    np.testing.assert_allclose(gx.numpy(), ref_gx, atol=atol, rtol=1e-9)
    np.testing.assert_allclose(goff.numpy(), ref_goff, atol=atol, rtol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Against the float64 reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize(
    "n,h,w,gc,group,kernel,stride,pad,dilation,scale,remove_center",
    [
        (2, 5, 9, 4, 2, 3, 1, 1, 1, 1.0, False),
        (1, 7, 6, 3, 3, 5, 2, 3, 2, 0.5, True),
        (3, 4, 11, 20, 1, 11, 1, 5, 1, 1.0, False),  # DSAN-T stage-3 group size
        (2, 1, 8, 10, 2, 7, 3, 7, 3, 1.7, False),  # H = 1, pad = K
        (1, 9, 1, 5, 1, 1, 1, 0, 1, 2.0, False),  # W = 1, K = 1
    ],
)
def test_matches_reference(backend, axis, n, h, w, gc, group, kernel, stride, pad, dilation, scale, remove_center):
    if axis == "y":
        h, w = w, h
    _check_against_reference(backend, n, h, w, gc, group, kernel, stride, pad, dilation, scale, remove_center, axis)


@st.composite
def _cases(draw):
    kernel = draw(st.sampled_from([1, 3, 5, 7, 11, 13, 15, 19]))
    axis = draw(st.sampled_from(["x", "y"]))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 3))
    pad = draw(st.integers(0, kernel))
    gc = draw(st.sampled_from([1, 10, 20, 40, 64, 257]))
    group = draw(st.integers(1, 3))
    n = draw(st.sampled_from([0, 1, 2, 33, 300]))
    remove_center = draw(st.booleans()) and kernel % 2 == 1 and kernel > 1
    scale = draw(st.sampled_from([1.0, 0.5, 1.7]))
    span = dilation * (kernel - 1) + 1
    along_min = max(1, span - 2 * pad)  # the output must not be empty
    along = draw(st.integers(along_min, along_min + 6))
    across = draw(st.sampled_from([1, 2, 3, 5]))
    # keep the python reference affordable: its cost is batch * pixels * group * taps
    out_along = (along + 2 * pad - span) // stride + 1
    budget = 4000
    while max(n, 1) * across * out_along * group * kernel > budget and across > 1:
        across -= 1
    if max(n, 1) * across * out_along * group * kernel > budget:
        n = min(n, 2)
    h, w = (across, along) if axis == "x" else (along, across)
    return dict(n=n, h=h, w=w, gc=gc, group=group, kernel=kernel, stride=stride, pad=pad, dilation=dilation,
                scale=scale, remove_center=remove_center, axis=axis)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases(), seed=st.integers(0, 2**16))
def test_property_matches_reference(backend, case, seed):
    _check_against_reference(backend, seed=seed, **case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ["x", "y"])
def test_gradcheck(backend, axis):
    x, off = _inputs(2, 4, 5, 6, 3, 2, axis, 3, 1, 1, 1, seed=3)
    x.requires_grad_(True)
    off.requires_grad_(True)

    def fn(a, b):
        return dscn(a, b, 3, pad=1, group=2, offset_scale=0.8, axis=axis, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, off), fast_mode=True)
    assert torch.autograd.gradcheck(fn, (x, off), fast_mode=False)


# ----------------------------------------------------------------------------------------------------------------
# Semantics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ["x", "y"])
def test_zero_offsets_are_a_box_filter(backend, axis):
    n, h, w, c, k, group = 2, 9, 12, 8, 5, 2
    x = torch.randn(n, h, w, c, dtype=torch.float64)
    off = torch.zeros(n, h, w, group * k, dtype=torch.float64)
    out = dscn(x, off, k, pad=k // 2, group=group, axis=axis, backend=backend)
    weight = torch.ones(c, 1, 1, k, dtype=torch.float64) if axis == "x" else torch.ones(c, 1, k, 1, dtype=torch.float64)
    padding = (0, k // 2) if axis == "x" else (k // 2, 0)
    box = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), weight, padding=padding, groups=c).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, box, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [-3, -1, 1, 2])
def test_integer_offsets_are_exact_shifts(backend, shift):
    x = torch.randn(2, 4, 10, 6)
    off = torch.full((2, 4, 10, 2), float(shift))
    out = dscn(x, off, 1, group=2, axis="x", backend=backend)
    expected = torch.zeros_like(x)
    src = slice(max(shift, 0), 10 + min(shift, 0))
    dst = slice(max(-shift, 0), 10 - max(shift, 0))
    expected[:, :, dst] = x[:, :, src]
    assert torch.equal(out, expected)  # exact: weights are exactly 1 and 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 3e9])
def test_non_finite_and_huge_offsets_contribute_zero(backend, bad):
    n, h, w, c, k = 1, 3, 8, 4, 3
    x = torch.randn(n, h, w, c, dtype=torch.float64, requires_grad=True)
    off = torch.randn(n, h, w, k, dtype=torch.float64) * 0.3
    off[:, :, :, 1] = bad  # the middle tap is broken everywhere
    off.requires_grad_(True)
    out = dscn(x, off, k, pad=1, axis="x", backend=backend)
    # the same with the middle tap removed
    kept = off.detach()[..., [0, 2]]
    ref = dscn_reference(x.detach().numpy(), np.stack([kept[..., 0], np.zeros_like(kept[..., 0]), kept[..., 1]], -1),
                         k, 1, 1, 1, 1, 1.0, False, "x")
    middle = dscn_reference(x.detach().numpy(), np.zeros((n, h, w, 1)), 1, 1, 0, 1, 1, 1.0, False, "x")
    torch.testing.assert_close(out.detach(), torch.from_numpy(ref - middle), atol=1e-12, rtol=0)
    gx, goff = torch.autograd.grad(out.sum(), (x, off))
    assert torch.isfinite(gx).all() and torch.isfinite(goff).all()
    assert (goff[..., 1] == 0).all()


def test_backends_agree_in_float32():
    if not HAS_EXT:
        pytest.skip("compiled op not built")
    x = torch.randn(4, 14, 14, 160)
    off = torch.randn(4, 14, 14, 8 * 7) * 3
    a = dscn(x, off, 7, pad=3, group=8, axis="y", backend="cpp")
    b = dscn(x, off, 7, pad=3, group=8, axis="y", backend="pytorch")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_every_cpu_simd_path(isa, tmp_path):
    """The CPU kernel has a baseline, an AVX2 and an AVX-512 build; each is checked against the float64 twin."""
    script = tmp_path / "check.py"
    script.write_text(
        "import torch, ops_dscn\n"
        "torch.manual_seed(0)\n"
        "for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):\n"
        "    for gc, k, g, axis in ((32, 11, 1, 'x'), (20, 7, 8, 'y'), (3, 5, 2, 'x'), (40, 3, 2, 'y')):\n"
        "        x = torch.randn(3, 9, 10, g * gc, dtype=dtype, requires_grad=True)\n"
        "        off = (torch.randn(3, 9, 10, g * k, dtype=dtype) * 4).requires_grad_()\n"
        "        outs = []\n"
        "        for b in ('cpp', 'pytorch'):\n"
        "            y = ops_dscn.dscn(x, off, k, pad=k // 2, group=g, axis=axis, backend=b)\n"
        "            outs.append((y,) + torch.autograd.grad((y * y).sum(), (x, off)))\n"
        "        for a, r in zip(*outs):\n"
        "            torch.testing.assert_close(a, r, atol=tol * 10, rtol=tol)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, DSCN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if "not supported by this CPU" in res.stderr:
        pytest.skip(f"this CPU lacks {isa}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok"


# ----------------------------------------------------------------------------------------------------------------
# The original op's defects, shown absent


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_300_works(backend):
    """The original asserted batch % min(batch, im2col_step=256) == 0, so 300 failed."""
    x, off = _inputs(300, 3, 4, 4, 3, 1, "x", 3, 1, 1, 1, seed=5)
    out = DSCNFunction.apply(x, off, 1, 3, 1, 1, 0, 1, 1, 1, 1, 4, 1.0, 256, False, True) if backend == "cpp" else \
        dscn(x, off, 3, pad=1, backend="pytorch")
    assert out.shape == (300, 3, 4, 4)
    for b in (0, 257, 299):  # images are independent: check a few against the reference
        ref = dscn_reference(x[b : b + 1].numpy(), off[b : b + 1].numpy(), 3, 1, 1, 1, 1, 1.0, False, "x")
        np.testing.assert_allclose(out[b : b + 1].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_gradient_keeps_channel_zero_of_each_group(backend):
    """The original dropped channel 0 of each group from grad_offset when group_channels was not a power of two
    and below 64 (DSAN-T stage 3 has 20). Only channel 0 of each group carries gradient here."""
    n, h, w, group, gc, k = 2, 3, 7, 8, 20, 7
    x = torch.randn(n, h, w, group * gc, dtype=torch.float64)
    off = (torch.rand(n, h, w, group * k, dtype=torch.float64) - 0.5).requires_grad_(True)
    out = dscn(x, off, k, pad=3, group=group, axis="x", backend=backend)
    mask = torch.zeros(group * gc, dtype=torch.float64)
    mask[::gc] = 1.0  # channel 0 of every group
    (goff,) = torch.autograd.grad(out, off, torch.ones_like(out) * mask)
    _, _, ref = dscn_reference(x.numpy(), off.detach().numpy(), k, 1, 3, 1, group, 1.0, False, "x",
                               (torch.ones_like(out) * mask).numpy())
    np.testing.assert_allclose(goff.numpy(), ref, atol=1e-12)
    assert goff.abs().sum() > 0


@needs_ext
def test_cpu_kernel_is_real():
    """The original's CPU path was a stub that raised."""
    x = torch.randn(1, 2, 5, 4)
    out = torch.ops.ops_dscn.dscn(x, torch.zeros(1, 2, 5, 3), 1, 3, 1, 1, 0, 1, 1, 1, 1, 4, 1.0, False, True)
    torch.testing.assert_close(out[0, 0, 2], x[0, 0, 1:4].sum(0))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_on_cpu(dtype):
    """bfloat16 was not compiled at all in the original; here it runs (with float accumulation) on CPU too."""
    x = torch.randn(2, 6, 9, 16)
    off = torch.randn(2, 6, 9, 2 * 5)
    ref = dscn(x.to(dtype).float(), off.to(dtype).float(), 5, pad=2, group=2, backend="cpp")
    xr, offr = x.to(dtype).requires_grad_(), off.to(dtype).requires_grad_()
    out = dscn(xr, offr, 5, pad=2, group=2, backend="cpp")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=2e-2)
    gx, goff = torch.autograd.grad(out.float().sum(), (xr, offr))
    assert gx.dtype == dtype and torch.isfinite(gx.float()).all() and torch.isfinite(goff.float()).all()


# ----------------------------------------------------------------------------------------------------------------
# Inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    x = torch.randn(2, 12, 7, 6, dtype=torch.float64).transpose(1, 2)  # (2, 7, 12, 6), not contiguous
    off = torch.randn(2, 12, 7, 9, dtype=torch.float64).transpose(1, 2)[..., ::3]  # (2, 7, 12, 3)
    assert not x.is_contiguous() and not off.is_contiguous()
    out = dscn(x, off, 3, pad=1, axis="x", backend=backend)
    torch.testing.assert_close(out, dscn(x.contiguous(), off.contiguous(), 3, pad=1, axis="x", backend=backend))
    ref = dscn_reference(x.numpy(), off.numpy(), 3, 1, 1, 1, 1, 1.0, False, "x")
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 4, 5, 8, requires_grad=True)
    off = torch.randn(0, 4, 5, 6, requires_grad=True)
    out = dscn(x, off, 3, pad=1, group=2, backend=backend)
    assert out.shape == (0, 4, 5, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape and off.grad.shape == off.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_shape,off_shape,kwargs,match",
    [
        ((4, 5, 8), (4, 5, 3), {}, r"input must be 4-D .* got 3-D"),
        ((1, 4, 5, 8), (4, 5, 3), {}, r"offset must be 4-D .* got 3-D"),
        ((1, 4, 5, 9), (1, 4, 5, 6), {"group": 2}, r"divisible by group; got C = 9, group = 2"),
        ((1, 4, 5, 8), (1, 4, 5, 4), {"group": 2}, r"offset must have shape .* = \(1, 4, 5, 6\); got \(1, 4, 5, 4\)"),
        ((1, 4, 5, 8), (1, 4, 5, 3), {"pad": 0, "dilation": 3}, r"empty output: input \(H, W\) = \(4, 5\)"),
        ((1, 4, 5, 8), (1, 4, 5, 2), {"remove_center": True, "kernel_size": 2},
         r"remove_center needs an odd kernel size; got 2"),
        ((1, 4, 5, 8), (1, 4, 5, 3), {"stride": 0}, r"stride_w must be >= 1; got 0"),
        ((1, 4, 5, 8), (1, 4, 5, 3), {"axis": "z"}, r"axis must be 'x' or 'y'; got 'z'"),
    ],
)
def test_bad_input_is_named(backend, x_shape, off_shape, kwargs, match):
    kw = dict(kernel_size=3, pad=1)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dscn(torch.randn(*x_shape), torch.randn(*off_shape), backend=backend, **kw)


def test_mixed_dtype_and_device_are_named():
    x = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=r"same dtype; got input torch.float32 and offset torch.float64"):
        dscn(x, torch.randn(1, 4, 5, 3, dtype=torch.float64), 3, pad=1)
    with pytest.raises(ValueError, match=r"same device; got input on cpu and offset on meta"):
        dscn(x, torch.randn(1, 4, 5, 3, device="meta"), 3, pad=1)
    with pytest.raises(ValueError, match=r"backend must be one of .*; got 'cuda'"):
        dscn(x, torch.randn(1, 4, 5, 3), 3, pad=1, backend="cuda")


@needs_ext
def test_direct_op_call_errors_name_the_argument():
    """The C++ entry points check their arguments themselves (for callers that skip the Python wrapper)."""
    x = torch.randn(1, 4, 5, 8)
    with pytest.raises(RuntimeError, match=r"offset must have shape \(N, H_out, W_out, group \* K'\) = \(1, 4, 5, 6\)"):
        torch.ops.ops_dscn.dscn(x, torch.randn(1, 4, 5, 5), 1, 3, 1, 1, 0, 1, 1, 1, 2, 4, 1.0, False, True)
    with pytest.raises(RuntimeError, match=r"x-strip \(on_x=True\) needs kernel_h == 1; got kernel_h = 3"):
        torch.ops.ops_dscn.dscn(x, torch.randn(1, 4, 5, 6), 3, 3, 1, 1, 0, 1, 1, 1, 2, 4, 1.0, False, True)
    with pytest.raises(RuntimeError, match=r"input channels must equal group \* group_channels = 2 \* 3 = 6; got 8"):
        torch.ops.ops_dscn.dscn(x, torch.randn(1, 4, 5, 6), 1, 3, 1, 1, 0, 1, 1, 1, 2, 3, 1.0, False, True)


# ----------------------------------------------------------------------------------------------------------------
# API, modules and PyTorch integration


@pytest.mark.parametrize("on_x", [True, False])
def test_original_function_api(on_x):
    x = torch.randn(3, 6, 7, 8, dtype=torch.float64)
    if on_x:
        off = torch.randn(3, 6, 7, 2 * 4, dtype=torch.float64)
        args = (1, 5, 1, 1, 0, 2, 1, 1, 2, 4, 1.0, 64, 1, True)  # remove_center as int, as the original passes it
    else:
        off = torch.randn(3, 6, 7, 2 * 4, dtype=torch.float64)
        args = (5, 1, 1, 1, 2, 0, 1, 1, 2, 4, 1.0, 64, 1, False)
    out = DSCNFunction.apply(x, off, *args)
    ref = dscn_reference(x.numpy(), off.numpy(), 5, 1, 2, 1, 2, 1.0, True, "x" if on_x else "y")
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)
    with pytest.raises(ValueError, match="im2col_step must be a positive int; got 0"):
        DSCNFunction.apply(x, off, *args[:11], 0, *args[12:])


def test_module_parameter_names_match_the_original():
    mx = DSCNX(64, kernel_size=11, dw_kernel_size=11, pad=5, group=4)
    my = DSCNY(64, kernel_size=7, dw_kernel_size=5, pad=3, group=8)
    assert {k: tuple(v.shape) for k, v in mx.state_dict().items()} == {
        "dw_conv.0.weight": (64, 1, 1, 11), "dw_conv.0.bias": (64,),
        "dw_conv.1.1.weight": (64,), "dw_conv.1.1.bias": (64,),
        "offset.weight": (44, 64), "offset.bias": (44,),
        "input_proj.weight": (64, 64), "input_proj.bias": (64,),
    }
    assert {k: tuple(v.shape) for k, v in my.state_dict().items()} == {
        "dw_conv.0.weight": (64, 1, 5, 1), "dw_conv.0.bias": (64,),
        "dw_conv.1.1.weight": (64,), "dw_conv.1.1.bias": (64,),
        "offset.weight": (56, 64), "offset.bias": (56,),
    }
    assert (mx.offset.weight == 0).all() and (my.offset.bias == 0).all()


@pytest.mark.parametrize("cls", [DSCNX, DSCNY])
def test_module_backends_agree(cls):
    torch.manual_seed(0)
    m = cls(32, kernel_size=7, pad=3, group=4).double()
    torch.nn.init.normal_(m.offset.weight, std=0.5)  # non-trivial offsets
    x = torch.randn(2, 9, 10, 32, dtype=torch.float64)
    src = torch.randn(2, 32, 9, 10, dtype=torch.float64)
    outs = {}
    for b in BACKENDS:
        m.backend = b
        outs[b] = m(x, src)
    assert outs["pytorch"].shape == (2, 9, 10, 32)
    for b in outs:
        torch.testing.assert_close(outs[b], outs["pytorch"], atol=1e-10, rtol=1e-10)


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="channels must be divisible by group; got channels = 30, group = 4"):
        DSCNX(30, group=4)
    with pytest.raises(ValueError, match="remove_center needs an odd kernel_size; got 4"):
        DSCNY(32, kernel_size=4, remove_center=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        DSCNX(32, backend="triton")
    with pytest.raises(ValueError, match="norm_layer must be 'LN' or 'BN'; got 'GN'"):
        DSCNX(32, norm_layer="GN")


def test_auto_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(F_dscn, "_EXT_ERROR", "ImportError: simulated")
    monkeypatch.setattr(F_dscn, "_warned_fallback", False)
    x, off = torch.randn(1, 3, 4, 4), torch.zeros(1, 3, 4, 3)
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch implementation"):
        dscn(x, off, 3, pad=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dscn(x, off, 3, pad=1)  # only once
    with pytest.raises(RuntimeError, match="backend='cpp' was requested but the compiled DSCN operator is not"):
        dscn(x, off, 3, pad=1, backend="cpp")
    assert F_dscn.available_backends() == ["pytorch"]


@needs_ext
@pytest.mark.parametrize("on_x", [True, False])
def test_opcheck(on_x):
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64, requires_grad=True)
    off = torch.randn(2, 5, 6, 2 * 3, dtype=torch.float64, requires_grad=True)
    geometry = (1, 3, 1, 1, 0, 1, 1, 1) if on_x else (3, 1, 1, 1, 1, 0, 1, 1)
    torch.library.opcheck(torch.ops.ops_dscn.dscn.default, (x, off, *geometry, 2, 4, 1.0, False, on_x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    m = DSCNX(16, kernel_size=5, pad=2, group=2, backend=backend)
    torch.nn.init.normal_(m.offset.weight, std=0.5)
    x, src = torch.randn(2, 6, 7, 16), torch.randn(2, 16, 6, 7)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, src), m(x, src))
    explained = torch._dynamo.explain(m)(x, src)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@needs_ext
def test_torch_compile_inductor_with_backward():
    torch._dynamo.reset()
    m = DSCNY(16, kernel_size=5, pad=2, group=2, backend="cpp")
    torch.nn.init.normal_(m.offset.weight, std=0.5)
    x, src = torch.randn(2, 6, 7, 16), torch.randn(2, 16, 6, 7)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x, src)
    torch.testing.assert_close(out, m(x, src), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert m.offset.weight.grad is not None and torch.isfinite(m.offset.weight.grad).all()


@needs_ext
def test_torch_export():
    m = DSCNX(16, kernel_size=5, pad=2, group=2, backend="cpp").eval()
    x, src = torch.randn(2, 6, 7, 16), torch.randn(2, 16, 6, 7)
    ep = torch.export.export(m, (x, src))
    assert any(n.target is torch.ops.ops_dscn.dscn.default for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x, src), m(x, src))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_cpu(backend):
    m = DSCNX(16, kernel_size=5, pad=2, group=2, backend=backend)
    torch.nn.init.normal_(m.offset.weight, std=0.3)
    x, src = torch.randn(2, 6, 7, 16), torch.randn(2, 16, 6, 7)
    ref = m(x, src)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, src)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@needs_cuda
@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("n,h,w,gc,group,kernel,pad", [(2, 9, 11, 20, 8, 7, 3), (300, 3, 4, 4, 1, 3, 1),
                                                       (1, 14, 14, 32, 1, 11, 5), (3, 5, 6, 257, 2, 5, 2)])
def test_cuda_matches_cpu_float64(axis, n, h, w, gc, group, kernel, pad):
    x, off = _inputs(n, h, w, gc * group, kernel, group, axis, kernel, 1, pad, 1, seed=7, scale=3.0)
    outs = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_(True)
        od = off.to(dev).requires_grad_(True)
        y = dscn(xd, od, kernel, pad=pad, group=group, axis=axis, backend="cpp")
        g = torch.autograd.grad((y * y).sum(), (xd, od))
        outs.append([t.cpu() for t in (y, *g)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@needs_cuda
def test_cuda_gradcheck():
    x, off = _inputs(2, 4, 5, 6, 3, 2, "x", 3, 1, 1, 1, seed=3)
    x, off = x.cuda().requires_grad_(), off.cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: dscn(a, b, 3, pad=1, group=2), (x, off), fast_mode=True)


@needs_cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_cuda_precisions(dtype, atol):
    x, off = _inputs(4, 14, 14, 160, 7, 8, "y", 7, 1, 3, 1, seed=9, dtype=torch.float32)
    ref = dscn(x.to(dtype).float(), off.to(dtype).float(), 7, pad=3, group=8, axis="y", backend="cpp")
    out = dscn(x.to(dtype).cuda(), off.to(dtype).cuda(), 7, pad=3, group=8, axis="y", backend="cpp")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=atol)


@needs_cuda
def test_cuda_autocast_and_nonfinite():
    m = DSCNX(32, kernel_size=7, pad=3, group=4).cuda()
    x, src = torch.randn(2, 8, 9, 32, device="cuda"), torch.randn(2, 32, 8, 9, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = m(x, src)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    off = torch.full((1, 2, 5, 3), float("nan"), device="cuda")
    out = dscn(torch.randn(1, 2, 5, 4, device="cuda"), off, 3, pad=1)
    assert (out == 0).all()


@needs_ext
@pytest.mark.parametrize("axis", ["x", "y"])
def test_cpu_kernel_is_deterministic_across_thread_counts(axis):
    """The CPU work split gives every thread its own input lines: no atomics, bit-identical for any thread count."""
    x = torch.randn(3, 17, 19, 40, requires_grad=True)
    off = (torch.randn(3, 17, 19, 4 * 7) * 3).requires_grad_(True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = dscn(x, off, 7, pad=3, group=4, axis=axis, backend="cpp")
            results.append((y, *torch.autograd.grad((y * y).sum(), (x, off))))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
