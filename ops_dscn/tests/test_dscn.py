"""Tests of the DSCN operator: compiled CPU op, pure-PyTorch op and (when a GPU exists) the CUDA op, against an
independent float64 reference written from the definition."""

import itertools
import os
import re
import warnings

import _use_installed  # noqa: F401  (first: the installed ops_dscn, not the source tree)
import numpy as np
import pytest
import torch
from dscn_reference import dscn_reference, orth_stride_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from isa_check import ISAS, run_under_isa

import ops_dscn
from ops_dscn import dscn
from ops_dscn import functional as F_dscn
from ops_dscn.functions import DSCNFunction
from ops_dscn.modules import DSCNX, DSCNY

HAS_EXT = ops_dscn.extension_available()
HAS_CUDA = torch.cuda.is_available() and HAS_EXT
# DSAN_REQUIRE_CPP=1 (run_tests.sh, hence CI) makes a missing extension fail these tests instead of skipping them.
needs_ext = pytest.mark.skipif(not HAS_EXT and os.environ.get("DSAN_REQUIRE_CPP") != "1",
                               reason=f"compiled op not built: {ops_dscn.extension_error()}")
# DSCN_REQUIRE_CUDA=1 (ops_dscn/selfcheck_cuda.sh sets it) turns the CUDA tests from skipped into run-and-fail, so a
# GPU machine cannot pass the self-check by skipping them.
needs_cuda = pytest.mark.skipif(not HAS_CUDA and os.environ.get("DSCN_REQUIRE_CUDA") != "1",
                                reason="no CUDA device (or the op was built without CUDA)")
BACKENDS = (["cpp"] if HAS_EXT or os.environ.get("DSAN_REQUIRE_CPP") == "1" else []) + ["pytorch"]


def _inputs(n, h, w, c, taps, group, axis, kernel, stride, pad, dilation, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, c, generator=g, dtype=dtype)
    if axis == "x":
        ho, wo = h, (w + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    else:
        ho, wo = (h + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1, w
    off = torch.randn(n, ho, wo, group * taps, generator=g, dtype=dtype) * scale
    return x, off


def _sample_locations(off, kernel, stride, pad, dilation, scale, remove_center, axis):
    """Sampling positions (float64) of every offset, from the definition in ops_dscn.dscn's docstring."""
    taps = torch.tensor([k for k in range(kernel) if not (remove_center and k == kernel // 2)], dtype=torch.float64)
    n, ho, wo, gk = off.shape
    o = torch.arange(wo if axis == "x" else ho, dtype=torch.float64)
    o = o.view(1, 1, -1, 1) if axis == "x" else o.view(1, -1, 1, 1)
    c = dilation * (kernel - 1) // 2
    k = taps.repeat(gk // len(taps)).view(1, 1, 1, gk)
    return o * stride - pad + c + scale * (k * dilation - c + off.double())


def _away_from_integers(off, *geometry, margin=1e-3):
    """Nudges offsets whose sampling position lies within `margin` of an integer, where the offset gradient jumps
    (x[i + 1] - x[i] changes neighbours), so that float32 rounding of the position cannot flip a comparison with the
    float64 reference. The nudge (1/8) is exact in every dtype for these magnitudes."""
    off = off.clone()
    for _ in range(16):
        loc = _sample_locations(off, *geometry)
        bad = (loc - loc.round()).abs() < margin
        if not bad.any():
            return off
        off[bad] += 0.125
    raise AssertionError("could not move the offsets away from integer positions")


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
        (2, 3, 14, 20, 8, 7, 1, 3, 1, 1.0, False),  # DSAN-T stage 3 (x-strip on AVX-512: the blocked lerp line)
        (2, 3, 13, 20, 7, 5, 2, 4, 2, 0.7, True),  # 7 groups of 20 (4 + 2 + 1 a tap loop), stride, dilation
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "n,h,w,gc,group,kernel,stride,pad,dilation,scale,remove_center",
    [
        (2, 5, 9, 4, 2, 3, 1, 1, 1, 1.0, False),
        (2, 3, 14, 20, 8, 7, 1, 3, 1, 1.0, False),  # the x-strip's blocked lerp line on AVX-512
        (1, 7, 6, 3, 3, 5, 2, 3, 2, 0.5, True),
    ],
)
def test_non_finite_inputs_reach_only_the_taps_that_read_them(backend, axis, bad, dtype, n, h, w, gc, group, kernel,
                                                              stride, pad, dilation, scale, remove_center):
    # The spec: a neighbour outside the input contributes nothing. The fast CPU forms weighted unused neighbours by 0,
    # so an Inf at the line's first element turned every tap left of the line into NaN (CUDA selects: 0).
    if axis == "y":
        h, w = w, h
    taps = kernel - int(remove_center)
    x, off = _inputs(n, h, w, gc * group, taps, group, axis, kernel, stride, pad, dilation, seed=3, dtype=dtype)
    geometry = (kernel, stride, pad, dilation, scale, remove_center, axis)
    off = _away_from_integers(off, *geometry)
    first = (slice(None), slice(None), 0) if axis == "x" else (slice(None), 0)
    x[first] = bad  # the first element of every line along the axis, all channels
    x[0, h // 2, w // 2, 1] = bad
    outside = (slice(None), slice(None), slice(0, 2)) if axis == "x" else (slice(None), slice(0, 2))
    off[outside] = -50.0  # every tap of the first two output positions falls left of the line
    x.requires_grad_(True)
    off.requires_grad_(True)
    kw = dict(kernel_size=kernel, stride=stride, pad=pad, dilation=dilation, group=group, offset_scale=scale,
              remove_center=remove_center, axis=axis)
    out = dscn(x, off, backend=backend, **kw)
    assert (out[outside] == 0).all()
    grad_out = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    grad_out[0, 0, 0, 0] = bad
    gx, goff = torch.autograd.grad(out, (x, off), grad_out)
    ref = dscn_reference(x.detach().numpy(), off.detach().numpy(), kernel, stride, pad, dilation, group, scale,
                         remove_center, axis, grad_out.numpy())
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    with np.errstate(invalid="ignore"):
        for got, want in zip((out, gx, goff), ref):
            np.testing.assert_allclose(got.detach().double().numpy(), want, equal_nan=True, **tol)
    assert torch.isfinite(out).any() and torch.isfinite(goff).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on_x", [True, False])
def test_lines_in_the_padding_across_the_axis_ignore_non_finite_gradients(backend, on_x):
    """An output line that lies in the padding across the axis reads nothing: its offsets' gradient is 0 even where
    grad_output holds Inf or NaN (the twin kept 0 * Inf there)."""
    x = torch.randn(1, 4, 4, 2, dtype=torch.float64, requires_grad=True)
    off = torch.full((1, 6, 4, 3) if on_x else (1, 4, 6, 3), 0.25, dtype=torch.float64, requires_grad=True)
    geometry = (1, 3, 1, 1, 1, 1, 1, 1) if on_x else (3, 1, 1, 1, 1, 1, 1, 1)  # pad 1 along and across the axis
    out = ops_dscn.dscn_strip(x, off, *geometry, 1, 2, 1.0, False, on_x, backend)
    g = torch.randn(out.shape, dtype=torch.float64)
    padded = (0, 0) if on_x else (slice(None), 0)  # the first line across the axis is padding
    g[(0, *padded)] = float("inf")
    g[(0, 2, 1, 1)] = float("nan") if on_x else g[(0, 2, 1, 1)]
    gx, goff = torch.autograd.grad(out, (x, off), g)
    line = goff[0, 0] if on_x else goff[0, :, 0]
    assert (out[0, 0] if on_x else out[0, :, 0]).eq(0).all() and line.eq(0).all()
    assert torch.isfinite(goff[0, 1:] if on_x else goff[0, :, 1:]).sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ["x", "y"])
def test_huge_finite_inputs_interpolate_without_overflow(backend, axis):
    # Neighbours of +-3e38 (float32's largest is 3.4e38): the lerp form's x0 + l * (x1 - x0) overflowed to +-Inf
    # where (1 - l) * x0 + l * x1 is finite.
    n, h, w, c = 2, 6, 9, 20
    x, off = _inputs(n, h, w, c, 1, 1, axis, 1, 1, 0, 1, seed=5, dtype=torch.float32)
    along = torch.arange(w if axis == "x" else h)
    sign = torch.where(along % 2 == 0, 1.0, -1.0)
    x = 3e38 * (sign.view(1, 1, -1, 1) if axis == "x" else sign.view(1, -1, 1, 1)).expand_as(x).contiguous()
    off = _away_from_integers(off, 1, 1, 0, 1, 1.0, False, axis)
    out = dscn(x, off, 1, axis=axis, backend=backend)
    ref = dscn_reference(x.double().numpy(), off.double().numpy(), 1, axis=axis)
    assert np.isfinite(ref).all() and torch.isfinite(out).all()
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e33)


@pytest.mark.parametrize("gc,group", [(32, 2), (20, 4)])
def test_rows_past_the_lerp_copy_limit(gc, group):
    """x-strip rows of more than 4 MiB leave the lerp form, whose per-thread row copy cost 2x the row in memory and
    was slower there; the pair form gives the same results (float64 twin as reference)."""
    c = gc * group
    w = (4 << 20) // (4 * c) + 3  # just past the limit
    x, off = _inputs(1, 2, w, c, 5, group, "x", 5, 1, 2, 1, seed=7, dtype=torch.float32)
    off = (off * 4).round() / 4  # positions exact in float32 at these lengths (else rounded, in every backend)
    out = dscn(x, off, 5, pad=2, group=group, axis="x", backend=BACKENDS[0])
    ref = dscn(x.double(), off.double(), 5, pad=2, group=group, axis="x", backend="pytorch")
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@needs_ext
def test_backends_agree_in_float32():
    x = torch.randn(4, 14, 14, 160)
    off = torch.randn(4, 14, 14, 8 * 7) * 3
    a = dscn(x, off, 7, pad=3, group=8, axis="y", backend="cpp")
    b = dscn(x, off, 7, pad=3, group=8, axis="y", backend="pytorch")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_simd_path(isa, tmp_path):
    """The CPU kernel has a baseline, an AVX2 and an AVX-512 build; each is checked against the float64 twin."""
    script_text = (
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
    run_under_isa(isa, script_text, tmp_path)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_simd_path_group_widths_and_line_ends(isa, tmp_path):
    """The forward's fast paths, in every SIMD build, against the float64 reference.

    Group widths of one vector, two vectors, one and a fraction (the overlapping last vector), one or two vectors
    and a 16-byte tail (12 and 20 floats on AVX2, 20 floats and 10 doubles on AVX-512), and narrower than a vector,
    on 4-, 8- and 16-lane builds; group counts that batch 4 + 2 + 1 groups per tap loop; lines of 1, 2, 3
    and 7 pixels with offsets that put taps just below 0, just below the line end and outside (the pair-form
    table's special cases)."""
    script_text = (
        "import numpy as np, torch, ops_dscn\n"
        "from dscn_reference import dscn_reference\n"
        "torch.manual_seed(0)\n"
        "for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):\n"
        "    for gc, g in ((4, 7), (8, 7), (10, 3), (12, 3), (16, 7), (20, 3), (24, 2), (32, 1), (40, 3)):\n"
        "        for length, axis in ((1, 'x'), (2, 'y'), (3, 'x'), (7, 'y')):\n"
        "            k = 3\n"
        "            hw = (2, length) if axis == 'x' else (length, 2)\n"
        "            x = torch.randn(2, *hw, g * gc, dtype=dtype)\n"
        "            off = (torch.rand(2, *hw, g * k, dtype=dtype) * 2 - 1) * (length + 2)\n"
        "            off[..., 0] = -0.5 - torch.arange(hw[0] * hw[1], dtype=dtype).view(hw) % 3  # floor -1 region\n"
        "            y = ops_dscn.dscn(x, off, k, pad=1, group=g, axis=axis, backend='cpp')\n"
        "            ref = dscn_reference(x.double().numpy(), off.double().numpy(), k, 1, 1, 1, g, 1.0, False, axis)\n"
        "            torch.testing.assert_close(y.double(), torch.from_numpy(ref), atol=tol * 10, rtol=tol,\n"
        "                                       msg=lambda m: f'{dtype} gc={gc} g={g} len={length} {axis}: {m}')\n"
        "print('ok')\n"
    )
    run_under_isa(isa, script_text, tmp_path)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_simd_path_backward_group_widths(isa, tmp_path):
    """The backward's per-group fast path (groups of one or two whole vectors) and its general path, in every SIMD
    build, for each gradient alone and both together, against autograd through the float64 pure-PyTorch twin.

    gc = 4, 8, 16, 32 are one and two vectors of float and double on the 16-, 32- and 64-byte builds; 20 and 3
    take the general path (a whole vector plus narrower ones, and scalars only)."""
    script_text = (
        "import torch, ops_dscn\n"
        "torch.manual_seed(0)\n"
        "for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):\n"
        "    for gc in (4, 8, 16, 32, 20, 3):\n"
        "        for axis in ('x', 'y'):\n"
        "            for need in ((True, True), (True, False), (False, True)):\n"
        "                g, k = 3, 5\n"
        "                x = torch.randn(2, 6, 7, g * gc, dtype=dtype)\n"
        "                off = torch.randn(2, 6, 7, g * k, dtype=dtype) * 3\n"
        "                go = torch.randn(2, 6, 7, g * gc, dtype=dtype)\n"
        "                grads = []\n"
        "                for b, t in (('cpp', dtype), ('pytorch', torch.float64)):\n"
        "                    xi = x.to(t).requires_grad_(need[0])\n"
        "                    oi = off.to(t).requires_grad_(need[1])\n"
        "                    y = ops_dscn.dscn(xi, oi, k, pad=k // 2, group=g, axis=axis, backend=b)\n"
        "                    wrt = [v for v, n in zip((xi, oi), need) if n]\n"
        "                    grads.append(torch.autograd.grad(y, wrt, go.to(t)))\n"
        "                for a, r in zip(*grads):\n"
        "                    torch.testing.assert_close(a.double(), r, atol=tol * 10, rtol=tol,\n"
        "                                               msg=lambda m: f'{dtype} gc={gc} {axis} {need}: {m}')\n"
        "print('ok')\n"
    )
    run_under_isa(isa, script_text, tmp_path)


@needs_ext
@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("gc, group", [(16, 4), (32, 1), (20, 3), (3, 2)])
def test_taps_exactly_at_the_line_ends(axis, gc, group):
    """Sampling positions exactly at -1, 0, len - 1 and len (the window's edges, where a neighbour or the whole tap
    drops out), just inside them, and far outside, in float32 against the float64 reference. The forward's tables
    (pair form; lerp form on the x-strips of AVX-512 builds) treat each of these cases apart."""
    length, k = 9, 3
    hw = (4, length) if axis == "x" else (length, 4)
    x = torch.randn(2, *hw, group * gc)
    # Position of tap j at output o is o - 1 + j + off (pad 1, K 3): choose off so that it is `target`.
    targets = torch.tensor([-1.0, -0.75, 0.0, 0.5, length - 1.0, length - 0.5, float(length), length + 0.25, -30.0])
    o = torch.arange(length, dtype=torch.float32)
    pos = targets[(torch.arange(length * group * k) % len(targets))].view(length, group, k)
    off = pos - (o.view(-1, 1, 1) - 1 + torch.arange(k, dtype=torch.float32).view(1, 1, -1))
    off = off.reshape(length, group * k)
    off = off.view(1, 1, length, -1).expand(2, 4, -1, -1) if axis == "x" else \
        off.view(1, length, 1, -1).expand(2, -1, 4, -1)
    off = off.contiguous()
    y = dscn(x, off, k, pad=1, group=group, axis=axis, backend="cpp")
    ref = dscn_reference(x.double().numpy(), off.double().numpy(), k, 1, 1, 1, group, 1.0, False, axis)
    torch.testing.assert_close(y.double(), torch.from_numpy(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on_x", [True, False], ids=["x", "y"])
@pytest.mark.parametrize("orth_stride, orth_pad, across", [(2, 1, 7), (1, 2, 4), (3, 0, 8), (2, 3, 5)])
def test_orth_stride_and_padding_against_the_reference(backend, on_x, orth_stride, orth_pad, across):
    """Stride and zero padding across the strip (an x-strip's stride_h / pad_h), forward and both gradients, against
    the float64 reference applied to the lines the strip reads: line i of the output reads input line
    i * stride - pad, and a line in the padding is all zeros."""
    x, off, grad_out, args = orth_stride_case(on_x, orth_stride, orth_pad, across)
    k, stride, pad, group = 5, 2, 2, args[8]
    n_lines = off.shape[1 if on_x else 2]
    xs, offs = x.clone().requires_grad_(), off.clone().requires_grad_()
    out = ops_dscn.dscn_strip(xs, offs, *args, backend=backend)
    gx, goff = torch.autograd.grad(out, (xs, offs), grad_out)
    # The reference input: the lines read, in output order (zeros for the padding), as an input of its own.
    lines = torch.arange(n_lines) * orth_stride - orth_pad
    inside = (lines >= 0) & (lines < across)
    picked = x.index_select(1 if on_x else 2, lines.clamp(0, across - 1))
    mask = inside.view(1, -1, 1, 1) if on_x else inside.view(1, 1, -1, 1)
    picked = picked * mask
    ref, ref_gx_lines, ref_goff = dscn_reference(picked.numpy(), off.numpy(), k, stride, pad, 1, group, 1.0, False,
                                                 "x" if on_x else "y", grad_out=grad_out.numpy())
    ref_gx = torch.zeros_like(x)
    ref_gx_lines = torch.from_numpy(ref_gx_lines) * mask
    ref_gx.index_add_(1 if on_x else 2, lines.clamp(0, across - 1), ref_gx_lines)
    torch.testing.assert_close(out, torch.from_numpy(ref), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(goff, torch.from_numpy(ref_goff), rtol=1e-10, atol=1e-10)
    assert not inside.all() or orth_pad == 0  # the cases with padding do read padding lines


@needs_ext
@pytest.mark.parametrize("on_x", [True, False], ids=["x", "y"])
@pytest.mark.parametrize("gc, group", [(16, 4), (20, 7), (32, 1), (3, 2)])
@pytest.mark.parametrize("n, across", [(1, 13), (3, 40)])
def test_float32_lines_with_orth_stride_and_padding(on_x, gc, group, n, across):
    """The float32 forward (an x-strip's padded lerp line on AVX-512, a y-strip's pair-form table over a task's
    columns) against the float64 one, with a stride and zero padding across the strip: lines in the padding give
    zeros, and a y-strip image's last task may hold fewer columns than the others (13 and 40 columns)."""
    k, length = 5, 11
    h, w = (across, length) if on_x else (length, across)
    geometry = (1, k, 2, 1, 1, 2, 1, 1) if on_x else (k, 1, 1, 2, 2, 1, 1, 1)
    ho = (h + 2 * geometry[4] - geometry[6] * (geometry[0] - 1) - 1) // geometry[2] + 1
    wo = (w + 2 * geometry[5] - geometry[7] * (geometry[1] - 1) - 1) // geometry[3] + 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, h, w, group * gc, generator=g, dtype=torch.float64)
    off = torch.randn(n, ho, wo, group * k, generator=g, dtype=torch.float64) * 3
    args = (*geometry, group, gc, 0.9, False, on_x)
    out = torch.ops.ops_dscn.dscn(x.float(), off.float(), *args)
    ref = torch.ops.ops_dscn.dscn(x.float().double(), off.float().double(), *args)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    orth_pad_lines = out[:, 0] if on_x else out[:, :, 0]
    assert ref.abs().sum() > 0 and torch.equal(orth_pad_lines, torch.zeros_like(orth_pad_lines))


@needs_ext
@pytest.mark.parametrize("n, w, group, k", [(3, 14, 16, 7), (2, 14, 6, 7), (2, 9, 3, 5), (1, 40, 16, 7)])
def test_float32_x_strips_of_20_channel_groups(n, w, group, k):
    """x-strips of 20-channel groups (DSAN-T/S stage 3): on AVX-512 a row whose tap table fits goes a row at a time
    (16 groups of K = 7 as in DSAN-S, 6 = 4 + 2 groups, K = 5), a longer one (40 pixels of 16 groups of 7 taps) run
    by run. Either way the float32 forward matches the float64 one, offsets reaching past both ends and non-finite
    ones included."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 3, w, group * 20, generator=g, dtype=torch.float64)
    off = torch.randn(n, 3, w, group * k, generator=g, dtype=torch.float64) * 4
    off[0, 0, 0, 0], off[-1, -1, -1, -1] = -2.0 * w, 2.0 * w  # far outside the row
    off[0, 1, 2, :3], off[-1, 0, 1, k] = float("nan"), float("inf")  # non-finite taps contribute nothing
    args = (1, k, 1, 1, 0, k // 2, 1, 1, group, 20, 1.0, False, True)
    out = torch.ops.ops_dscn.dscn(x.float(), off.float(), *args)
    ref = torch.ops.ops_dscn.dscn(x.float().double(), off.float().double(), *args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("gc, groups", [(16, 7), (20, 7), (8, 6)])
def test_groups_batched_in_one_loop_give_the_per_group_result(gc, groups):
    """Several groups share one tap loop in the CPU forward; each must come out bit for bit as when run alone."""
    x = torch.randn(2, 6, 9, groups * gc)
    off = torch.randn(2, 6, 9, groups * 5) * 3
    together = dscn(x, off, 5, pad=2, group=groups, axis="x", backend="cpp")
    for g in range(groups):
        alone = dscn(x[..., g * gc:(g + 1) * gc].contiguous(), off[..., g * 5:(g + 1) * 5].contiguous(), 5, pad=2,
                     group=1, axis="x", backend="cpp")
        assert torch.equal(together[..., g * gc:(g + 1) * gc], alone), g


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


# Tolerances of the reduced-precision kernels against float64 on the same (rounded) inputs: the output is rounded
# once to the dtype (eps 2^-8 for bfloat16, 2^-11 for float16, relative to sums of up to K taps), accumulation is in
# float. Gradients are rounded once as well; the offset gradient is a dot over the group's channels.
_REDUCED_TOL = {torch.bfloat16: dict(atol=6e-2, rtol=1.6e-2), torch.float16: dict(atol=1e-2, rtol=2e-3)}


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_on_cpu(dtype):
    """bfloat16 was not compiled at all in the original; here it runs (with float accumulation) on CPU too, forward
    and backward within the stated tolerance of the float64 reference on the same rounded inputs."""
    x = torch.randn(2, 6, 9, 16).to(dtype)
    off = _away_from_integers((torch.randn(2, 6, 9, 2 * 5) * 2).to(dtype).double(), 5, 1, 2, 1, 1.0, False, "x")
    off = off.to(dtype)
    grad_out = torch.randn(2, 6, 9, 16).to(dtype)
    xr, offr = x.clone().requires_grad_(), off.clone().requires_grad_()
    out = dscn(xr, offr, 5, pad=2, group=2, backend="cpp")
    assert out.dtype == dtype
    gx, goff = torch.autograd.grad(out, (xr, offr), grad_out)
    assert gx.dtype == dtype and goff.dtype == dtype
    ref_out, ref_gx, ref_goff = dscn_reference(x.double().numpy(), off.double().numpy(), 5, 1, 2, 1, 2, 1.0, False,
                                               "x", grad_out.double().numpy())
    tol = _REDUCED_TOL[dtype]
    for got, ref in ((out, ref_out), (gx, ref_gx), (goff, ref_goff)):
        torch.testing.assert_close(got.double(), torch.from_numpy(ref), **tol)


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
@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("hw", [(0, 5), (4, 0), (0, 0)])
def test_empty_image_is_rejected(backend, axis, hw):
    """An image with no pixels is refused with a named error even where the padding would give outputs (a 0-wide
    x-strip padded by 2 has 2 outputs per row): as torch's convolutions do, only the batch may be empty."""
    h, w = hw
    x = torch.randn(2, h, w, 32, requires_grad=True)
    off = torch.randn(2, max(h, 1) + 2, max(w, 1) + 2, 3)
    with pytest.raises(ValueError, match=rf"input must have H >= 1 and W >= 1 \(only N may be 0\); got shape "
                                         rf"\[2, {h}, {w}, 32\]"):
        dscn(x, off, 3, pad=2, group=1, axis=axis, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_shape,off_shape,kwargs,match",
    [
        ((4, 5, 8), (4, 5, 3), {}, r"input must be 4-D .* got 3-D"),
        ((1, 4, 5, 8), (4, 5, 3), {}, r"offset must be 4-D .* got 3-D"),
        ((1, 4, 5, 9), (1, 4, 5, 6), {"group": 2}, r"divisible by group; got C = 9, group = 2"),
        ((1, 4, 5, 8), (1, 4, 5, 4), {"group": 2}, r"offset must have shape .* = \(1, 4, 5, 6\); got \[1, 4, 5, 4\]"),
        ((1, 4, 5, 8), (1, 4, 5, 3), {"pad": 0, "dilation": 3}, r"at least 1x1; got \(H_out, W_out\) = \(4, -1\)"),
        ((1, 4, 5, 8), (1, 4, 5, 2), {"remove_center": True, "kernel_size": 2},
         r"remove_center needs an odd kernel size; got 2"),
        ((1, 4, 5, 8), (1, 4, 5, 3), {"stride": 0}, r"stride_w must be >= 1; got 0"),
        ((1, 4, 5, 8), (1, 4, 5, 3), {"axis": "z"}, r"axis must be 'x' or 'y'; got 'z'"),
        ((1, 4, 5, 0), (1, 4, 5, 3), {}, r"input must have at least one channel \(N, H, W, C\); got shape "
                                         r"\[1, 4, 5, 0\]"),
    ],
)
def test_bad_input_is_named(backend, x_shape, off_shape, kwargs, match):
    kw = dict(kernel_size=3, pad=1)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dscn(torch.randn(*x_shape), torch.randn(*off_shape), backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_are_taken_by_every_backend(backend):
    """The compiled op's int64 / double arguments take numpy scalars; the twin's checks take them alike."""
    x, off = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 6)
    expected = dscn(x, off, 3, pad=1, group=2, offset_scale=0.5, backend=backend)
    got = dscn(x, off, np.int64(3), pad=np.int64(1), group=np.int64(2), offset_scale=np.float32(0.5),
               backend=backend)
    torch.testing.assert_close(got, expected)


def test_module_names_an_offset_source_of_the_wrong_width():
    m = DSCNX(16, group=4)
    with pytest.raises(ValueError, match=r"DSCNX: off_x must be \(N, C, H, W\) with C = 16; got shape \[1, 8, 5, 6\]"):
        m(torch.randn(1, 5, 6, 16), torch.randn(1, 8, 5, 6))


def test_mixed_dtype_and_device_are_named():
    x = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=r"offset dtype must equal input dtype float32; got float64"):
        dscn(x, torch.randn(1, 4, 5, 3, dtype=torch.float64), 3, pad=1)
    with pytest.raises(ValueError, match=r"same device; got input on cpu and offset on meta"):
        dscn(x, torch.randn(1, 4, 5, 3, device="meta"), 3, pad=1)
    with pytest.raises(ValueError, match=r"backend must be one of .*; got 'cuda'"):
        dscn(x, torch.randn(1, 4, 5, 3), 3, pad=1, backend="cuda")


# (input shape, offset shape, dtype, geometry after the tensors, expected message). The geometry is ops_dscn::dscn's:
# kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels, offset_scale,
# remove_center, on_x.
_REJECTED = [
    ((1, 4, 4, 8), (1, 4, 0, 5), torch.float32, (1, 5, 1, 2, 0, 0, 1, 1, 1, 8, 1.0, False, True),
     r"at least 1x1; got \(H_out, W_out\) = \(4, 0\) from input \(H, W\) = \(4, 4\) with kernel \(1, 5\), stride "
     r"\(1, 2\)"),  # C++ used to truncate (4 - 5) / 2 to 0 and give W_out = 1
    ((1, 4, 4, 8), (1, 4, 4, 5), torch.float32, (1, 5, 1, 2, 0, 0, 1, 1, 1, 8, 1.0, False, True),
     r"at least 1x1; got \(H_out, W_out\) = \(4, 0\)"),
    ((1, 3, 5, 8), (1, 3, 5, 3), torch.float32, (1, 3, 1, 1, 0, 1, 1, 1, 1, 8, 1.0, False, True), None),  # valid
    ((1, 3, 0, 8), (1, 3, 2, 3), torch.float32, (1, 3, 1, 1, 0, 2, 1, 1, 1, 8, 1.0, False, True),
     r"input must have H >= 1 and W >= 1 \(only N may be 0\); got shape \[1, 3, 0, 8\]"),  # used to crash the CPU op
    ((1, 0, 5, 8), (1, 2, 5, 3), torch.float32, (3, 1, 1, 1, 2, 0, 1, 1, 1, 8, 1.0, False, False),
     r"input must have H >= 1 and W >= 1 \(only N may be 0\); got shape \[1, 0, 5, 8\]"),
    ((1, 3, 5, 8), (1, 3, 5, 3), torch.float8_e4m3fn, (1, 3, 1, 1, 0, 1, 1, 1, 1, 8, 1.0, False, True),
     r"input dtype must be one of float64, float32, float16, bfloat16; got float8_e4m3fn"),
    ((1, 3, 5, 8), (1, 3, 5, 3), torch.int64, (1, 3, 1, 1, 0, 1, 1, 1, 1, 8, 1.0, False, True),
     r"input dtype must be one of .*; got int64"),
    ((1, 3, 5, 8), (1, 3, 5, 3), torch.float32, (3, 3, 1, 1, 0, 1, 1, 1, 1, 8, 1.0, False, True),
     r"x-strip \(on_x=True\) needs kernel_h == 1; got 3"),
    ((1, 3, 5, 8), (1, 3, 5, 3), torch.float32, (1, 3, 1, 1, 0, 1, 1, 1, 2, 3, 1.0, False, True),
     r"input channels must equal group \* group_channels = 2 \* 3 = 6; got 8"),
    ((1, 3, 5, 8), (1, 3, 5, 5), torch.float32, (1, 3, 1, 1, 0, 1, 1, 1, 2, 4, 1.0, False, True),
     r"offset must have shape \(N, H_out, W_out, group \* K'\) = \(1, 3, 5, 6\); got \[1, 3, 5, 5\]"),
    ((1, 3, 5, 8), (1, 3, 5, 3), torch.float32, (1, 3, 1, 0, 0, 1, 1, 1, 1, 8, 1.0, False, True),
     r"stride_w must be >= 1; got 0"),
    ((1, 3, 5, 8), (1, 3, 5, 3), torch.float32, (1, 3, 1, 1, 0, -1, 1, 1, 1, 8, 1.0, False, True),
     r"pad_w must be >= 0; got -1"),
    ((1, 3, 5, 8), (1, 3, 5, 3), torch.float32, (1, 3, 1, 1, 0, 1, 1, 1, 1, 8, float("inf"), False, True),
     r"offset_scale must be finite; got inf"),
    ((1, 3, 5, 8), (1, 3, 5, 0), torch.float32, (1, 1, 1, 1, 0, 0, 1, 1, 1, 8, 1.0, True, True),
     r"remove_center needs a kernel size >= 3; got 1"),
    ((1, 3, 5, 8), (1, 3, 5, 2), torch.float32, (1, 2, 1, 1, 0, 1, 1, 1, 1, 8, 1.0, True, True),
     r"remove_center needs an odd kernel size; got 2"),
    ((3, 5, 8), (1, 3, 5, 3), torch.float32, (1, 3, 1, 1, 0, 1, 1, 1, 1, 8, 1.0, False, True),
     r"input must be 4-D \(N, H, W, C\) channels-last; got 3-D with shape \[3, 5, 8\]"),
    # Geometry arguments are bounded by 2^31: their products used to wrap around in int64 and pass the checks (a
    # crash, or an output from a geometry that makes no sense).
    ((1, 3, 4, 4), (1, 3, 4, 4), torch.float32, (1, 4, 1, 1, 0, 1, 1, 1, 2**62 + 1, 4, 1.0, False, True),
     r"group must be < 2\^31; got 4611686018427387905"),
    ((1, 2, 8, 4), (1, 2, 6, 2), torch.float32, (1, 1, 1, 1, 0, 2**63 - 1, 1, 1, 2, 2, 1.0, False, True),
     r"pad_w must be < 2\^31; got 9223372036854775807"),
    ((1, 2, 8, 4), (1, 2, 8, 10), torch.float32, (1, 5, 1, 1, 0, 0, 1, 2**62, 2, 2, 1.0, False, True),
     r"dilation_w must be < 2\^31; got 4611686018427387904"),
    ((1, 2, 8, 4), (1, 2, 8, 10), torch.float32, (1, 2**31, 1, 1, 0, 0, 1, 1, 2, 2, 1.0, False, True),
     r"kernel_w must be < 2\^31; got 2147483648"),
    # Sample positions are float32 below float64: past 2^24 they were rounded to other pixels, silently. A huge
    # padding with a huge stride reaches the limit with small tensors.
    ((1, 2, 8, 4), (1, 2, 3, 1), torch.float32, (1, 1, 1, 2**24, 0, 2**24, 1, 1, 1, 4, 1.0, False, True),
     r"sampled axis plus its padding must be at most 2\^24 = 16777216 for float32 .*; got 33554440"),
    ((1, 8, 2, 4), (1, 3, 2, 1), torch.bfloat16, (1, 1, 2**24, 1, 2**24, 0, 1, 1, 1, 4, 1.0, False, False),
     r"at most 2\^24 = 16777216 for bfloat16"),
    ((1, 2, 8, 4), (1, 2, 3, 1), torch.float64, (1, 1, 1, 2**24, 0, 2**24, 1, 1, 1, 4, 1.0, False, True), None),
    ((1, 2, 8, 4), (1, 2, 2, 1), torch.float32, (1, 1, 1, 2**23, 0, 2**23 - 4, 1, 1, 1, 4, 1.0, False, True), None),
]


def _rejection(fn, *args):
    try:
        fn(*args)
    except (ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc).split("\n")[0]
    return None


@needs_ext
@pytest.mark.parametrize("x_shape,off_shape,dtype,geometry,match", _REJECTED)
def test_compiled_twin_and_fake_kernel_reject_alike(x_shape, off_shape, dtype, geometry, match):
    """The C++ checks define a valid call; the pure-PyTorch op and the fake kernel (torch.compile) reject exactly the
    same calls with the same message, and agree on the output shape of the valid ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.zeros(x_shape).to(dtype)
    off = torch.zeros(off_shape).to(dtype)
    cpp = _rejection(torch.ops.ops_dscn.dscn, x, off, *geometry)
    twin = _rejection(ops_dscn.dscn_strip, x, off, *geometry, "pytorch")
    with FakeTensorMode() as mode:
        fake = _rejection(torch.ops.ops_dscn.dscn, mode.from_tensor(x), mode.from_tensor(off), *geometry)
    assert cpp == twin == fake
    if match is None:
        assert cpp is None
        real = torch.ops.ops_dscn.dscn(x, off, *geometry)
        with FakeTensorMode() as mode:
            out = torch.ops.ops_dscn.dscn(mode.from_tensor(x), mode.from_tensor(off), *geometry)
        assert out.shape == real.shape and out.stride() == real.stride()
    else:
        assert cpp is not None and cpp[0] == "ValueError"
        assert re.search(match, cpp[1]), cpp[1]


@needs_ext
@pytest.mark.parametrize("on_x", [True, False])
def test_output_length_agrees_with_fake_kernel_on_a_grid(on_x):
    """strip_out_len (C++) and the fake kernel's shape agree for every small geometry, the rejected ones included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for length, kernel, stride, pad, dilation in itertools.product(range(1, 7), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2),
                                                                   (1, 2)):
        w_out = (length + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        x = torch.zeros(1, 2, length, 4) if on_x else torch.zeros(1, length, 2, 4)
        off = torch.zeros((1, 2, max(w_out, 0), kernel) if on_x else (1, max(w_out, 0), 2, kernel))
        geometry = (1, kernel, 1, stride, 0, pad, 1, dilation) if on_x else (kernel, 1, stride, 1, pad, 0, dilation, 1)
        args = (*geometry, 1, 4, 1.0, False, on_x)
        cpp = _rejection(torch.ops.ops_dscn.dscn, x, off, *args)
        with FakeTensorMode() as mode:
            fake = _rejection(torch.ops.ops_dscn.dscn, mode.from_tensor(x), mode.from_tensor(off), *args)
        assert cpp == fake, (length, kernel, stride, pad, dilation)
        assert (cpp is None) == (w_out >= 1), (length, kernel, stride, pad, dilation, cpp)


# ----------------------------------------------------------------------------------------------------------------
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


def test_original_module_paths_and_helpers():
    """Code written against the original package imports from its module paths (ops_dscn/modules/dscn.py,
    ops_dscn/functions/dscn_func.py) and uses its layout helpers."""
    import torch.nn.functional as F
    from torch import nn

    from ops_dscn.functions.dscn_func import DSCNFunction as OriginalFunction
    from ops_dscn.modules import dscn as original

    assert OriginalFunction is DSCNFunction and original.DSCNX is DSCNX and original.DSCNY is DSCNY
    x = torch.randn(2, 8, 5, 6)  # NCHW
    bn = original.build_norm_layer(8, "BN", "channels_first", "channels_last").train()
    assert [type(m) for m in bn] == [nn.BatchNorm2d, original.to_channels_last]
    torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, training=True).permute(0, 2, 3, 1))
    ln = original.build_norm_layer(8, "LN", "channels_first", "channels_first", eps=1e-6)
    assert [type(m) for m in ln] == [original.to_channels_last, nn.LayerNorm, original.to_channels_first]
    torch.testing.assert_close(ln(x), F.layer_norm(x.permute(0, 2, 3, 1), (8,), eps=1e-6).permute(0, 3, 1, 2))
    assert len(original.build_norm_layer(8, "LN")) == 1  # channels_last in and out: the LayerNorm alone
    assert original.build_act_layer("SiLU").inplace and isinstance(original.build_act_layer("GELU"), nn.GELU)
    with pytest.raises(ValueError, match="norm_layer must be 'BN' or 'LN'; got 'GN'"):
        original.build_norm_layer(8, "GN")
    with pytest.raises(ValueError, match="in_format must be one of"):
        original.build_norm_layer(8, "BN", "nchw")
    with pytest.raises(ValueError, match="act_layer must be one of"):
        original.build_act_layer("Tanh")


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


@needs_ext
@pytest.mark.parametrize("cls", [DSCNX, DSCNY])
def test_module_backends_agree(cls):
    """The compiled op and the pure-PyTorch twin, inside the module, forward and backward (skipped, not compared with
    itself, when the extension is missing)."""
    torch.manual_seed(0)
    m = cls(32, kernel_size=7, pad=3, group=4).double()
    torch.nn.init.normal_(m.offset.weight, std=0.5)  # non-trivial offsets
    x = torch.randn(2, 9, 10, 32, dtype=torch.float64, requires_grad=True)
    src = torch.randn(2, 32, 9, 10, dtype=torch.float64)
    results = {}
    for b in ("cpp", "pytorch"):
        m.backend = b
        out = m(x, src)
        grads = torch.autograd.grad((out * out).sum(), (x, m.offset.weight))
        results[b] = (out, *grads)
    assert results["cpp"][0].shape == (2, 9, 10, 32)
    assert results["cpp"][0].abs().sum() > 0 and results["cpp"][2].abs().sum() > 0
    for a, b in zip(results["cpp"], results["pytorch"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cls", [DSCNX, DSCNY])
@pytest.mark.parametrize("norm_layer, act", [("LN", "GELU"), ("LN", "ReLU"), ("LN", "SiLU"), ("BN", "GELU"),
                                             ("LN", "tanh-GELU")])
def test_module_offset_branch_options(cls, norm_layer, act):
    """Every act_layer / norm_layer of the offset branch, in float32 where the fused branch kernel may take over:
    the module's offsets equal its layers run one by one (the kernel only computes LayerNorm + exact GELU, so any
    other choice must fall back to the layers, whatever the backend)."""
    torch.manual_seed(1)
    m = cls(16, kernel_size=5, pad=2, group=2, norm_layer=norm_layer, act_layer="GELU" if "GELU" in act else act)
    if act == "tanh-GELU":
        m.dw_conv[2] = torch.nn.GELU(approximate="tanh")
    torch.nn.init.normal_(m.offset.weight, std=0.5)
    m.eval()
    src = torch.randn(2, 16, 7, 8)
    expected = m.offset(m.dw_conv(src))
    for backend in BACKENDS:
        m.backend = backend
        torch.testing.assert_close(m._offsets(src), expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().sum() > 0


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="channels must be divisible by group; got channels = 30, group = 4"):
        DSCNX(30, group=4)
    with pytest.raises(ValueError, match="remove_center needs an odd kernel size; got 4"):
        DSCNY(32, kernel_size=4, remove_center=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        DSCNX(32, backend="triton")
    with pytest.raises(ValueError, match="norm_layer must be 'LN' or 'BN'; got 'GN'"):
        DSCNX(32, norm_layer="GN")
    # Offsets are predicted at every input pixel: a strip that changes the size could never run (it used to fail at
    # the first forward, naming an offset tensor the caller never passes).
    for kwargs in ({"stride": 2}, {"dilation": 2}, {"kernel_size": 5, "pad": 1},
                   {"kernel_size": 4, "pad": 2, "dw_kernel_size": 3}):
        with pytest.raises(ValueError, match=r"DSCNX: the strip must keep the input's size .* got stride="):
            DSCNX(16, **kwargs)
    assert DSCNY(16, kernel_size=5, pad=4, dilation=2)(torch.randn(1, 6, 5, 16), torch.randn(1, 16, 6, 5)).shape \
        == (1, 6, 5, 16)
    for bad in (4, 0, 2.0):
        with pytest.raises(ValueError, match=f"dw_kernel_size must be a positive odd int .*; got {bad!r}"):
            DSCNX(16, dw_kernel_size=bad)


def test_auto_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(F_dscn, "_EXT_ERROR", "ImportError: simulated")
    monkeypatch.setattr(F_dscn, "_KERNEL_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(F_dscn, "_warned_fallback", set())
    x, off = torch.randn(1, 3, 4, 4), torch.zeros(1, 3, 4, 3)
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch implementation"):
        dscn(x, off, 3, pad=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dscn(x, off, 3, pad=1)  # only once
    with pytest.raises(RuntimeError, match="backend='cpp' was requested for a cpu tensor but the compiled DSCN"):
        dscn(x, off, 3, pad=1, backend="cpp")
    assert F_dscn.available_backends() == ["pytorch"]


@needs_ext
def test_compiled_device_types_are_read_from_the_dispatcher():
    dump = torch._C._dispatch_dump("ops_dscn::dscn")
    assert "cpu" in ops_dscn.compiled_device_types()
    assert ("cuda" in ops_dscn.compiled_device_types()) == bool(re.search(r"^CUDA: registered", dump, re.M))
    assert ops_dscn.resolve_backend("auto", "cpu") == "cpp"
    assert ops_dscn.available_backends("cpu") == ["cpp", "pytorch"]


@needs_ext
def test_auto_resolves_per_device_on_a_build_without_that_kernel(monkeypatch):
    """A build made on a machine without a GPU has no CUDA kernel: 'auto' must then pick the twin for CUDA tensors
    (with one warning saying how to rebuild) while keeping the compiled op for CPU tensors; 'cpp' is a clear error."""
    monkeypatch.setattr(F_dscn, "_KERNEL_DEVICE_TYPES", frozenset({"cpu", "meta"}))
    monkeypatch.setattr(F_dscn, "_warned_fallback", set())
    assert ops_dscn.resolve_backend("auto", "cpu") == "cpp"
    assert ops_dscn.resolve_backend("auto", torch.device("cpu")) == "cpp"
    with pytest.warns(RuntimeWarning, match=r"built without a CUDA kernel \(it has kernels for: cpu\).*FORCE_CUDA=1"):
        assert ops_dscn.resolve_backend("auto", "cuda:1") == "pytorch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops_dscn.resolve_backend("auto", "cuda") == "pytorch"  # warned once per device type
    with pytest.raises(RuntimeError, match=r"backend='cpp' was requested for a cuda tensor but ops_dscn was built "
                                           r"without a CUDA kernel"):
        ops_dscn.resolve_backend("cpp", "cuda")
    assert ops_dscn.available_backends("cuda") == ["pytorch"]


@needs_ext
def test_auto_on_real_tensors_without_a_kernel_for_their_device(monkeypatch):
    """End to end with tensors: no compiled kernel for their device type -> the twin runs, and gives the result."""
    monkeypatch.setattr(F_dscn, "_KERNEL_DEVICE_TYPES", frozenset({"cuda"}))
    monkeypatch.setattr(F_dscn, "_warned_fallback", set())
    x, off = _inputs(1, 3, 6, 4, 3, 1, "x", 3, 1, 1, 1, seed=2)
    calls = []
    monkeypatch.setattr(F_dscn, "dscn_pytorch", lambda *a: calls.append(1) or ops_dscn.dscn_pytorch(*a))
    with pytest.warns(RuntimeWarning, match="built without a CPU kernel"):
        out = dscn(x, off, 3, pad=1)
    assert calls == [1]
    np.testing.assert_allclose(out.numpy(), dscn_reference(x.numpy(), off.numpy(), 3, 1, 1, 1, 1, 1.0, False, "x"),
                               atol=1e-12)
    with pytest.raises(RuntimeError, match="for a cpu tensor but ops_dscn was built without a CPU kernel"):
        dscn(x, off, 3, pad=1, backend="cpp")


class _RecordBackward(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.ops_dscn._dscn_backward.default:
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@needs_ext
@pytest.mark.parametrize("wrt", ["input", "offset", "both"])
def test_backward_computes_only_the_gradients_asked_for(wrt):
    """A frozen backbone, or an input that needs no gradient: the kernel is told, and skips that gradient."""
    x, off = _inputs(2, 5, 7, 8, 3, 2, "y", 3, 1, 1, 1, seed=4)
    x.requires_grad_(wrt in ("input", "both"))
    off.requires_grad_(wrt in ("offset", "both"))
    out = dscn(x, off, 3, pad=1, group=2, axis="y", backend="cpp")
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    wanted = [t for t in (x, off) if t.requires_grad]
    with _RecordBackward() as rec:
        grads = torch.autograd.grad(out, wanted, grad_out)
    assert rec.masks == [[x.requires_grad, off.requires_grad]]
    _, ref_gx, ref_goff = dscn_reference(x.detach().numpy(), off.detach().numpy(), 3, 1, 1, 1, 2, 1.0, False, "y",
                                         grad_out.numpy())
    refs = [r for r, t in ((ref_gx, x), (ref_goff, off)) if t.requires_grad]
    for g, r in zip(grads, refs):
        np.testing.assert_allclose(g.numpy(), r, atol=1e-10)
    # The op itself: an unrequested gradient comes back empty.
    geometry = (3, 1, 1, 1, 1, 0, 1, 1, 2, 4, 1.0, False, False)
    gi, go = torch.ops.ops_dscn._dscn_backward(grad_out, x.detach(), off.detach(), *geometry, [False, True])
    assert gi.numel() == 0 and go.shape == off.shape
    gi, go = torch.ops.ops_dscn._dscn_backward(grad_out, x.detach(), off.detach(), *geometry, [True, False])
    assert gi.shape == x.shape and go.numel() == 0


@needs_ext
def test_fake_backward_declares_the_kernels_strides():
    """The kernels return contiguous gradients; the fake kernel must say so for permuted (non-contiguous) inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 8, 6, 5, dtype=torch.float64).permute(0, 2, 3, 1)  # (2, 6, 5, 8), channels not innermost
    off = torch.randn(2, 3, 6, 5, dtype=torch.float64).permute(0, 2, 3, 1)  # (2, 6, 5, 3)
    grad_out = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    args = (1, 3, 1, 1, 0, 1, 1, 1, 1, 8, 1.0, False, True, [True, True])
    real = torch.ops.ops_dscn._dscn_backward(grad_out, x, off, *args)
    with FakeTensorMode() as mode:
        fake = torch.ops.ops_dscn._dscn_backward(mode.from_tensor(grad_out), mode.from_tensor(x),
                                                 mode.from_tensor(off), *args)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


@needs_ext
@pytest.mark.parametrize("on_x", [True, False])
def test_opcheck_non_contiguous(on_x):
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64).permute(0, 2, 3, 1).requires_grad_()  # (2, 5, 6, 8)
    off = torch.randn(2, 6, 5, 6, dtype=torch.float64).permute(0, 2, 3, 1).requires_grad_()
    assert not x.is_contiguous() and not off.is_contiguous()
    geometry = (1, 3, 1, 1, 0, 1, 1, 1) if on_x else (3, 1, 1, 1, 1, 0, 1, 1)
    torch.library.opcheck(torch.ops.ops_dscn.dscn.default, (x, off, *geometry, 2, 4, 1.0, False, on_x))


@needs_ext
def test_autocast_kernel_serves_direct_op_calls():
    """Under autocast a direct torch.ops call with mixed dtypes runs in the wider one (the C++ Autocast kernel), and
    gradients flow back through the cast."""
    x = torch.randn(2, 4, 6, 8, requires_grad=True)
    off = (torch.randn(2, 4, 6, 2 * 3) * 2).to(torch.bfloat16).requires_grad_()
    args = (1, 3, 1, 1, 0, 1, 1, 1, 2, 4, 1.0, False, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.ops_dscn.dscn(x, off, *args)
    assert out.dtype == torch.float32
    ref = torch.ops.ops_dscn.dscn(x.detach(), off.detach().float(), *args)
    torch.testing.assert_close(out.detach(), ref, atol=0, rtol=0)
    gx, goff = torch.autograd.grad(out.sum(), (x, off))
    assert gx.dtype == torch.float32 and goff.dtype == torch.bfloat16 and goff.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # same dtypes: untouched
        assert torch.ops.ops_dscn.dscn(x.bfloat16(), off, *args).dtype == torch.bfloat16


@needs_ext
def test_cpu_backward_allowed_under_deterministic_algorithms():
    """The CPU backward has no atomics, so torch.use_deterministic_algorithms(True) must not refuse it."""
    x, off = _inputs(1, 3, 6, 8, 3, 2, "x", 3, 1, 1, 1, seed=6)
    x.requires_grad_(True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = dscn(x, off, 3, pad=1, group=2, backend="cpp")
        (gx,) = torch.autograd.grad(out.sum(), x)
    finally:
        torch.use_deterministic_algorithms(before)
    assert gx.abs().sum() > 0


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
    """Inductor-compiled forward and backward give eager's outputs and gradients (float32, stated tolerance)."""
    torch._dynamo.reset()
    m = DSCNY(16, kernel_size=5, pad=2, group=2, backend="cpp")
    torch.nn.init.normal_(m.offset.weight, std=0.5)
    x, src = torch.randn(2, 6, 7, 16, requires_grad=True), torch.randn(2, 16, 6, 7)
    params = [x, m.offset.weight, m.dw_conv[0].weight]
    out = m(x, src)
    eager = torch.autograd.grad((out * out).sum(), params)
    compiled = torch.compile(m, fullgraph=True)
    out_c = compiled(x, src)
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((out_c * out_c).sum(), params)
    for g, e in zip(grads, eager):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


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


class _PointwiseCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, per call of ops_dscn::pointwise_conv under this mode, whether it got a packed weight."""

    def __init__(self):
        super().__init__()
        self.packed = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.ops_dscn.pointwise_conv.default:
            self.packed.append(kwargs.get("packed", args[7] if len(args) > 7 else None) is not None)
        return func(*args, **kwargs)


needs_pack = pytest.mark.skipif(not (ops_dscn.pack_weight_available(torch.empty(0))
                                     and ops_dscn.pointwise_conv_available(torch.empty(0))),
                                reason="ops_dscn built without pack_weight / pointwise_conv")


def _packed_dscnx():
    torch.manual_seed(0)
    m = DSCNX(32, kernel_size=7, pad=3, group=4, backend="cpp").eval()
    torch.nn.init.normal_(m.offset.weight, std=0.5)
    torch.nn.init.normal_(m.input_proj.bias)
    x = torch.randn(2, 9, 10, 32).contiguous()
    src = torch.randn(2, 32, 9, 10).contiguous(memory_format=torch.channels_last)
    return m, x, src


def _forward64(m, x, src):
    """The module's output in float64 on a copy whose projection is the plain ``nn.Linear`` (no packed weight)."""
    m64 = DSCNX(32, kernel_size=7, pad=3, group=4, backend="pytorch").double().eval()
    m64.load_state_dict(m.state_dict())
    with torch.no_grad():
        return m64(x.double(), src.double())


@needs_pack
def test_dscnx_packed_projection_matches_float64_and_follows_the_weight():
    """`DSCNX.pack_weights`: not in the state_dict; in float32 inference the projection runs as pointwise_conv on the
    packed weight, gives the float64 Linear's output, and is packed again when the weight changes in place."""
    m, x, src = _packed_dscnx()
    keys = set(m.state_dict())
    with torch.no_grad(), _PointwiseCalls() as calls:
        plain = m(x, src)
    assert calls.packed == [] and m.input_proj_packed is None  # nothing packed yet: the nn.Linear runs
    m.pack_weights()
    assert set(m.state_dict()) == keys and m.input_proj_packed is not None
    with torch.no_grad(), _PointwiseCalls() as calls:
        out = m(x, src)
    assert calls.packed == [True]
    assert out.shape == (2, 9, 10, 32) and out.is_contiguous()
    torch.testing.assert_close(out.double(), _forward64(m, x, src), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, plain, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        m.input_proj.weight.mul_(-1.5)  # the version counter moves: the next call packs again
        changed = m(x, src)
    assert (changed - out).abs().max() > 0.1
    torch.testing.assert_close(changed.double(), _forward64(m, x, src), atol=2e-5, rtol=2e-5)
    # A change through .data moves no version counter: it counts from the next train() / eval().
    m.input_proj.weight.data.mul_(2)
    m.eval()
    with torch.no_grad(), _PointwiseCalls() as calls:
        doubled = m(x, src)
    assert calls.packed == [True]
    torch.testing.assert_close(doubled.double(), _forward64(m, x, src), atol=2e-5, rtol=2e-5)


@needs_pack
def test_dscnx_packed_projection_steps_aside_for_gradients_backend_and_dtype():
    """With gradients, the 'pytorch' backend or float64 the nn.Linear runs (same outputs and gradients)."""
    m, x, src = _packed_dscnx()
    m.pack_weights()
    xg = x.clone().requires_grad_(True)
    with _PointwiseCalls() as calls:
        out = m(xg, src)
        (out * out).sum().backward()
    assert calls.packed == [] and m.input_proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach().double(), _forward64(m, x, src), atol=2e-5, rtol=2e-5)
    m.backend = "pytorch"
    with torch.no_grad(), _PointwiseCalls() as calls:
        m(x, src)
    assert calls.packed == []
    m.backend = "cpp"
    m.double()  # the buffer follows the module's dtype; float64 keeps the Linear
    with torch.no_grad(), _PointwiseCalls() as calls:
        out64 = m(x.double(), src.double())
    assert calls.packed == []
    torch.testing.assert_close(out64, _forward64(m, x, src), atol=1e-12, rtol=1e-12)


@needs_pack
def test_dscnx_packed_projection_compiles_and_exports():
    m, x, src = _packed_dscnx()
    m.pack_weights()
    torch._dynamo.reset()
    with torch.no_grad():
        expected = m(x, src)
        compiled = torch.compile(m, fullgraph=True)
        torch.testing.assert_close(compiled(x, src), expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    with torch.no_grad():
        ep = torch.export.export(m, (x, src))
    assert any(n.target is torch.ops.ops_dscn.pointwise_conv.default for n in ep.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, src), expected, atol=1e-5, rtol=1e-5)


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


# Tolerances of the CUDA kernels against the float64 reference on the same (rounded) inputs. float32: position and
# sums in float32; float16 / bfloat16: float accumulation, one rounding of each result (eps 2^-11 / 2^-8).
_CUDA_TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-4, rtol=2e-4),
             torch.float16: dict(atol=1e-2, rtol=2e-3), torch.bfloat16: dict(atol=6e-2, rtol=1.6e-2)}
_CUDA_CASES = [  # (n, along, across, gc, group, kernel, stride, pad, dilation, offset_scale, remove_center)
    (2, 11, 9, 20, 8, 7, 1, 3, 1, 1.0, False),  # DSAN-T stage 3
    (3, 13, 5, 16, 2, 5, 2, 4, 2, 0.7, True),  # stride, dilation, offset_scale < 1, remove_center
    (1, 17, 4, 3, 4, 11, 3, 5, 1, 1.5, False),  # odd group size, offset_scale > 1
    (33, 6, 3, 64, 1, 3, 1, 1, 3, 1.0, False),  # many images, wide group
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("case", _CUDA_CASES)
def test_cuda_forward_backward_match_float64_reference(dtype, axis, case):
    n, along, across, gc, group, kernel, stride, pad, dilation, scale, remove_center = case
    h, w = (across, along) if axis == "x" else (along, across)
    taps = kernel - int(remove_center)
    x, off = _inputs(n, h, w, gc * group, taps, group, axis, kernel, stride, pad, dilation, seed=11, scale=2.5)
    x, off = x.to(dtype), off.to(dtype)
    off = _away_from_integers(off.double(), kernel, stride, pad, dilation, scale, remove_center, axis).to(dtype)
    xd, od = x.cuda().requires_grad_(), off.cuda().requires_grad_()
    out = dscn(xd, od, kernel, stride=stride, pad=pad, dilation=dilation, group=group, offset_scale=scale,
               remove_center=remove_center, axis=axis, backend="cpp")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(12)).to(dtype)
    gx, goff = torch.autograd.grad(out, (xd, od), grad_out.cuda())
    assert out.dtype == gx.dtype == goff.dtype == dtype and out.device.type == "cuda"
    refs = dscn_reference(x.double().numpy(), off.double().numpy(), kernel, stride, pad, dilation, group, scale,
                          remove_center, axis, grad_out.double().numpy())
    for got, ref in zip((out, gx, goff), refs):
        torch.testing.assert_close(got.cpu().double(), torch.from_numpy(ref), **_CUDA_TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("axis", ["x", "y"])
def test_cuda_gradcheck(axis):
    x, off = _inputs(2, 5, 6, 6, 3, 2, axis, 3, 1, 1, 1, seed=3)
    x, off = x.cuda().requires_grad_(), off.cuda().requires_grad_()

    def fn(a, b):
        return dscn(a, b, 3, pad=1, group=2, offset_scale=0.8, axis=axis, backend="cpp")

    assert torch.autograd.gradcheck(fn, (x, off), fast_mode=True, nondet_tol=1e-12)
    assert torch.autograd.gradcheck(fn, (x, off), fast_mode=False, nondet_tol=1e-12)


@needs_cuda
@pytest.mark.parametrize("axis", ["x", "y"])
def test_cuda_non_contiguous_inputs(axis):
    x = torch.randn(2, 8, 12, 7, dtype=torch.float64).permute(0, 2, 3, 1)  # (2, 12, 7, 8)
    off = (torch.randn(2, 9, 12, 7, dtype=torch.float64) * 2).permute(0, 2, 3, 1)[..., ::3]  # (2, 12, 7, 3)
    xd, od = x.cuda().requires_grad_(), off.cuda().requires_grad_()
    assert not xd.is_contiguous() and not od.is_contiguous()
    out = dscn(xd, od, 3, pad=1, axis=axis, backend="cpp")
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    gx, goff = torch.autograd.grad(out, (xd, od), grad_out.cuda())
    refs = dscn_reference(x.numpy(), off.numpy(), 3, 1, 1, 1, 1, 1.0, False, axis, grad_out.numpy())
    for got, ref in zip((out, gx, goff), refs):
        np.testing.assert_allclose(got.detach().cpu().numpy(), ref, atol=1e-10)


@needs_cuda
def test_cuda_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU only")
    x, off = _inputs(2, 6, 9, 16, 5, 2, "x", 5, 1, 2, 1, seed=8)
    results = []
    for dev in ("cuda:0", "cuda:1"):
        xd, od = x.to(dev).requires_grad_(), off.to(dev).requires_grad_()
        with torch.cuda.device(0):  # the kernel must follow the tensors, not the current device
            out = dscn(xd, od, 5, pad=2, group=2, backend="cpp")
            grads = torch.autograd.grad((out * out).sum(), (xd, od))
        assert out.device == torch.device(dev) and all(g.device == torch.device(dev) for g in grads)
        results.append([t.cpu() for t in (out, *grads)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@needs_cuda
def test_cuda_backward_reports_nondeterminism():
    """The input gradient is scattered with atomics: torch.use_deterministic_algorithms(True) must refuse it, and
    allow the offset gradient alone (one writer per element)."""
    x, off = _inputs(1, 4, 6, 8, 3, 2, "x", 3, 1, 1, 1, seed=6)
    x, off = x.cuda(), off.cuda()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        xr = x.clone().requires_grad_()
        out = dscn(xr, off, 3, pad=1, group=2, backend="cpp")
        with pytest.raises(RuntimeError, match="dscn_backward_cuda"):
            torch.autograd.grad(out.sum(), xr)
        orr = off.clone().requires_grad_()
        out = dscn(x, orr, 3, pad=1, group=2, backend="cpp")
        (goff,) = torch.autograd.grad(out.sum(), orr)
        assert torch.isfinite(goff).all()
    finally:
        torch.use_deterministic_algorithms(before)


@needs_cuda
def test_cuda_auto_backend_and_direct_autocast():
    assert ops_dscn.resolve_backend("auto", "cuda") == "cpp"
    x = torch.randn(2, 4, 6, 8, device="cuda")
    off = torch.randn(2, 4, 6, 6, device="cuda").half()
    args = (1, 3, 1, 1, 0, 1, 1, 1, 2, 4, 1.0, False, True)
    with torch.autocast("cuda", dtype=torch.float16):
        out = torch.ops.ops_dscn.dscn(x, off, *args)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ops.ops_dscn.dscn(x, off.float(), *args), atol=0, rtol=0)


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


@needs_ext
def test_dscnx_projection_as_conv_in_training_matches_the_linear(monkeypatch):
    """From `conv_projection_min_channels` channels, a CPU float32 DSCNX with gradients runs its projection as a 1x1
    convolution on the channels_last view: the output and every gradient are the nn.Linear's (float64 reference)."""
    torch.manual_seed(0)
    m = DSCNX(64, kernel_size=7, pad=3, group=4, backend="cpp").train()
    torch.nn.init.normal_(m.input_proj.bias)
    x = torch.randn(2, 9, 10, 64)
    src = torch.randn(2, 64, 9, 10).contiguous(memory_format=torch.channels_last)
    assert m._projection_as_conv(x) and not m._projection_as_conv(x.double())
    assert not m._projection_as_conv(x.permute(0, 2, 1, 3))  # not a dense NHWC tensor: the Linear
    with torch.no_grad():
        assert not m._projection_as_conv(x)

    convs = []
    real_conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: convs.append(a[1].shape) or real_conv2d(*a, **k))

    def run(module, dtype):
        xg = x.to(dtype, copy=True).requires_grad_(True)
        out = module(xg, src.to(dtype))
        (out * out.detach().cos()).sum().backward()
        return out.detach(), xg.grad, {n: p.grad.clone() for n, p in module.named_parameters()}

    out, gx, grads = run(m, torch.float32)
    assert (64, 64, 1, 1) in convs
    m64 = DSCNX(64, kernel_size=7, pad=3, group=4, backend="pytorch").double().train()
    m64.load_state_dict(m.state_dict())
    out64, gx64, grads64 = run(m64, torch.float64)
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx.double(), gx64, atol=1e-4, rtol=1e-4)
    for name, g in grads.items():
        torch.testing.assert_close(g.double(), grads64[name], atol=2e-4, rtol=2e-4, msg=name)
    assert grads["input_proj.weight"].abs().sum() > 0

    convs.clear()
    m.conv_projection_min_channels = 65  # below the threshold: the Linear
    m.zero_grad()
    out_lin, gx_lin, _ = run(m, torch.float32)
    assert (64, 64, 1, 1) not in convs
    torch.testing.assert_close(out_lin, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_lin, gx, atol=1e-5, rtol=1e-5)


def test_twin_compiles_with_dynamic_shapes_and_offset_scale():
    """fullgraph + dynamic=True makes offset_scale a SymFloat: the argument checks must trace (math.isfinite did
    not)."""
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, s: dscn(a, b, 3, pad=1, group=4, offset_scale=s, backend="pytorch"),
                       fullgraph=True, dynamic=True, backend="eager")
    x, off = torch.randn(1, 5, 6, 8), torch.randn(1, 5, 6, 12)
    for scale in (0.5, 2.0):
        torch.testing.assert_close(fn(x, off, scale), dscn(x, off, 3, pad=1, group=4, offset_scale=scale,
                                                           backend="pytorch"))
    torch._dynamo.reset()


@needs_ext
def test_meta_tensors_take_the_compiled_ops_shapes():
    """Meta tensors run the fake kernel: backend='cpp' and 'auto' give the output's shape (no rebuild advice, no
    fallback warning)."""
    x, off = torch.empty(2, 5, 6, 8, device="meta"), torch.empty(2, 5, 3, 12, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for backend in ("cpp", "auto"):
            out = dscn(x, off, 3, stride=2, pad=1, group=4, backend=backend)
            assert out.device.type == "meta" and out.shape == (2, 5, 3, 8)
