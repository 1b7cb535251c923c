"""The CUDA kernels' code, run on the CPU.

No GPU has been available to run ``csrc/cuda/dscn_cuda.cu``; nvcc only compile-checks it. This module compiles that
file's kernels *and* its host wrappers as plain C++, with stand-ins for the few CUDA pieces they use: a launch runs
every block and thread of the grid one after another, in a shuffled order (CUDA promises none), ``gpuAtomicAdd`` is
a plain add, and the stream / device guard / launch check do nothing. The grid can be capped far below the real
2^20 blocks, so that the kernels' grid-stride loops run more than once. The results are then checked against the
independent float64 reference, in every dtype the CUDA kernels dispatch.

What this shows: the kernels' index arithmetic, geometry, gradients, dtype handling and output masks are right, and
(``test_kernels_read_and_write_only_inside_their_tensors``, under AddressSanitizer) that they touch no memory outside
their tensors. What it cannot show: data races, FMA contraction and summation order on the device, launch limits.
``ops_dscn/selfcheck_cuda.sh`` on a GPU machine checks those.

The source is edited in memory only where CUDA syntax has no C++ spelling (the ``<<<...>>>`` launches, the CUDA
headers, the device check, the registration); each edit asserts how many places it changed, so a change to the
CUDA file that the stand-ins do not cover fails here instead of silently testing less.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import _use_installed  # noqa: F401  (first: the installed ops_dscn, not the source tree)
import numpy as np
import pytest
import torch
from dscn_reference import dscn_reference, orth_stride_case

import ops_dscn

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_SOURCE = CSRC / "cuda" / "dscn_cuda.cu"

pytestmark = [
    pytest.mark.slow,  # one C++ build of about a minute
    pytest.mark.skipif(not CUDA_SOURCE.exists(), reason="needs the ops_dscn source tree (csrc/)"),
]

# The stand-ins for CUDA's built-in variables, qualifiers and runtime, ahead of the kernels' source.
_PRELUDE = r"""
#include <ATen/ATen.h>
#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#ifndef DSCN_EMU_MAX_BLOCKS
#define DSCN_EMU_MAX_BLOCKS (int64_t(1) << 20)
#endif

struct EmuDim3 {
  unsigned int x = 1, y = 1, z = 1;
};
static EmuDim3 blockIdx, threadIdx, blockDim, gridDim;

template <typename T>
inline T gpuAtomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
namespace at::cuda {
inline int getCurrentCUDAStream() { return 0; }
}  // namespace at::cuda

namespace emu {
// Runs every (block, thread) of the grid, blocks and threads each in a shuffled order.
template <typename Body>
void launch(int64_t grid, int64_t block, int64_t shared_bytes, int stream, Body&& body) {
  TORCH_CHECK(grid >= 1 && grid < (int64_t(1) << 31), "emulated launch: grid.x out of range: ", grid);
  TORCH_CHECK(block >= 1 && block <= 1024, "emulated launch: block.x out of range: ", block);
  TORCH_CHECK(shared_bytes == 0 && stream == 0, "emulated launch: unexpected shared memory or stream");
  static std::mt19937_64 rng(12345);
  std::vector<int64_t> blocks(grid), threads(block);
  std::iota(blocks.begin(), blocks.end(), int64_t(0));
  std::iota(threads.begin(), threads.end(), int64_t(0));
  std::shuffle(blocks.begin(), blocks.end(), rng);
  gridDim.x = static_cast<unsigned int>(grid);
  blockDim.x = static_cast<unsigned int>(block);
  for (const int64_t b : blocks) {
    std::shuffle(threads.begin(), threads.end(), rng);
    for (const int64_t t : threads) {
      blockIdx.x = static_cast<unsigned int>(b);
      threadIdx.x = static_cast<unsigned int>(t);
      body();
    }
  }
}
}  // namespace emu
"""

# The registration, under a namespace of its own so that it never meets the real ops_dscn::dscn.
_EPILOGUE = r"""
#define DSCN_EMU_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
DSCN_EMU_LIBRARY(dscn_cuda_emu, m) {
  m.def("dscn", &ops_dscn::dscn_forward_cuda);
  m.def("_dscn_backward", &ops_dscn::dscn_backward_cuda);
}
"""


def _edit(text: str, pattern: str, repl: str, count: int, flags: int = 0) -> str:
    new, n = re.subn(pattern, repl, text, flags=flags)
    assert n == count, f"{CUDA_SOURCE.name}: expected {count} match(es) of {pattern!r}, found {n}: update this test"
    return new


def emulated_source() -> str:
    """dscn_cuda.cu as C++ for the host, with the stand-ins above (see the module docstring)."""
    src = CUDA_SOURCE.read_text()
    src = _edit(src, r"^#include <(ATen/cuda|c10/cuda)/[^>]+>\n", "", 4, re.M)
    src = _edit(src, r'#include "\.\./common/', '#include "common/', 2)
    src = _edit(src, r"\.is_cuda\(\)", ".is_cpu()", 2)
    src = _edit(src, r"int64_t\(1\) << 20", "DSCN_EMU_MAX_BLOCKS", 1)
    src = _edit(src, r"(\w+<scalar_t>)<<<(.*?)>>>\((.*?)\);", r"emu::launch(\2, [&] { \1(\3); });", 3, re.S)
    src = _edit(src, r"TORCH_LIBRARY_IMPL\(ops_dscn, CUDA, m\) \{.*?\n\}\n", "", 1, re.S)
    return _PRELUDE + src + _EPILOGUE


def _compile(out_dir: Path, flags: list[str]) -> Path:
    """Builds the emulated source into out_dir/dscn_cuda_emu.so with the C++ compiler, against this torch."""
    from torch.utils.cpp_extension import include_paths, library_paths

    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "dscn_cuda_emu.cpp"
    source.write_text(emulated_source())
    lib = out_dir / "dscn_cuda_emu.so"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [os.environ.get("CXX", "c++"), "-shared", "-fPIC", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *flags, *(f"-I{p}" for p in [*include_paths(), str(CSRC)]), str(source), "-o", str(lib),
           *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    return lib


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """torch.ops.dscn_cuda_emu: the CUDA kernels and wrappers, run on the CPU (real grid cap)."""
    lib = _compile(tmp_path_factory.mktemp("dscn_cuda_emu"), ["-O1"])
    torch.ops.load_library(str(lib))
    return torch.ops.dscn_cuda_emu


def _args(kernel, stride, pad, dilation, group, gc, scale, remove_center, axis):
    if axis == "x":
        geo = (1, kernel, 1, stride, 0, pad, 1, dilation)
    else:
        geo = (kernel, 1, stride, 1, pad, 0, dilation, 1)
    return (*geo, group, gc, float(scale), bool(remove_center), axis == "x")


def _case(n, h, w, gc, group, kernel, stride, pad, dilation, scale, remove_center, axis, seed=0):
    g = torch.Generator().manual_seed(seed)
    taps = kernel - int(remove_center)
    x = torch.randn(n, h, w, group * gc, generator=g, dtype=torch.float64)
    if axis == "x":
        ho, wo = h, (w + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    else:
        ho, wo = (h + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1, w
    off = torch.randn(n, ho, wo, group * taps, generator=g, dtype=torch.float64) * 2.0
    grad_out = torch.randn(n, ho, wo, group * gc, generator=g, dtype=torch.float64)
    return x, off, grad_out


CASES = [
    # n, h, w, gc, group, kernel, stride, pad, dilation, scale, remove_center
    (2, 5, 9, 4, 2, 3, 1, 1, 1, 1.0, False),
    (1, 7, 6, 3, 3, 5, 2, 3, 2, 0.5, True),
    (3, 4, 11, 20, 1, 11, 1, 5, 1, 1.0, False),  # DSAN-T stage-3 group size
    (2, 3, 14, 20, 8, 7, 1, 3, 1, 1.0, False),  # DSAN-T stage 3
    (2, 3, 13, 20, 7, 5, 2, 4, 2, 0.7, True),
    (2, 1, 8, 10, 2, 7, 3, 7, 3, 1.7, False),  # H = 1, pad = K
    (1, 9, 1, 5, 1, 1, 1, 0, 1, 2.0, False),  # W = 1, K = 1
]


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_cuda_kernels_match_the_reference_in_float64(emu, axis, case):
    n, h, w, gc, group, kernel, stride, pad, dilation, scale, remove_center = case
    if axis == "y":
        h, w = w, h
    x, off, grad_out = _case(n, h, w, gc, group, kernel, stride, pad, dilation, scale, remove_center, axis)
    args = _args(kernel, stride, pad, dilation, group, gc, scale, remove_center, axis)
    out = emu.dscn(x, off, *args)
    gx, goff = emu._dscn_backward(grad_out, x, off, *args, [True, True])
    ref, ref_gx, ref_goff = dscn_reference(x.numpy(), off.numpy(), kernel, stride, pad, dilation, group, scale,
                                           remove_center, axis, grad_out.numpy())
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gx.numpy(), ref_gx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(goff.numpy(), ref_goff, rtol=1e-10, atol=1e-10)
    assert out.is_contiguous() and gx.is_contiguous() and goff.is_contiguous()  # as the fake kernels declare


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_cuda_kernels_in_reduced_precision(emu, dtype, tol, axis):
    """float32, half and bfloat16, as autocast sends them: against the float64 reference of the rounded inputs
    (the input gradient is accumulated in float32 and rounded once)."""
    x, off, grad_out = _case(2, 6, 12, 8, 4, 7, 1, 3, 1, 1.0, False, axis, seed=3)
    x, off, grad_out = (t.to(dtype) for t in (x, off, grad_out))
    args = _args(7, 1, 3, 1, 4, 8, 1.0, False, axis)
    out = emu.dscn(x, off, *args)
    gx, goff = emu._dscn_backward(grad_out, x, off, *args, [True, True])
    assert (out.dtype, gx.dtype, goff.dtype) == (dtype, dtype, dtype)
    # Offsets near an integer position change neighbour under rounding; compare away from them.
    ref, ref_gx, ref_goff = dscn_reference(x.double().numpy(), off.double().numpy(), 7, 1, 3, 1, 4, 1.0, False, axis,
                                           grad_out.double().numpy())
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(out.double().numpy(), ref, atol=tol * scale, rtol=tol)
    np.testing.assert_allclose(gx.double().numpy(), ref_gx, atol=tol * scale, rtol=tol)
    np.testing.assert_allclose(goff.double().numpy(), ref_goff, atol=tol * 4 * float(np.abs(ref_goff).max()),
                               rtol=tol)


@pytest.mark.parametrize("on_x", [True, False], ids=["x", "y"])
@pytest.mark.parametrize("orth_stride, orth_pad, across", [(2, 1, 7), (1, 2, 4), (3, 0, 8)])
def test_cuda_kernels_stride_and_padding_across_the_strip(emu, on_x, orth_stride, orth_pad, across):
    """Stride and padding across the strip (an x-strip's stride_h / pad_h), against the pure-PyTorch twin in float64
    (test_dscn.py checks the twin against the reference for the same geometry)."""
    x, off, grad_out, args = orth_stride_case(on_x, orth_stride, orth_pad, across)
    out = emu.dscn(x, off, *args)
    gx, goff = emu._dscn_backward(grad_out, x, off, *args, [True, True])
    xs, offs = x.clone().requires_grad_(), off.clone().requires_grad_()
    twin = ops_dscn.dscn_strip(xs, offs, *args, backend="pytorch")
    twin_gx, twin_goff = torch.autograd.grad(twin, (xs, offs), grad_out)
    torch.testing.assert_close(out, twin.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, twin_gx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(goff, twin_goff, rtol=1e-10, atol=1e-10)


def test_cuda_backward_output_mask_and_empty_tensors(emu):
    x, off, grad_out = _case(2, 4, 9, 4, 2, 3, 1, 1, 1, 1.0, False, "x", seed=7)
    args = _args(3, 1, 1, 1, 2, 4, 1.0, False, "x")
    gx, goff = emu._dscn_backward(grad_out, x, off, *args, [True, True])
    only_x = emu._dscn_backward(grad_out, x, off, *args, [True, False])
    only_off = emu._dscn_backward(grad_out, x, off, *args, [False, True])
    neither = emu._dscn_backward(grad_out, x, off, *args, [False, False])
    # The input gradient is summed with atomics, in another order on every launch (here as on a GPU); the offset
    # gradient is written by one thread per element, so it is the same bits.
    torch.testing.assert_close(only_x[0], gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(only_off[1], goff, rtol=0, atol=0)
    assert only_x[1].numel() == 0 and only_off[0].numel() == 0
    assert neither[0].numel() == 0 and neither[1].numel() == 0
    # An empty batch: nothing launched, shapes kept.
    empty = emu.dscn(x[:0], off[:0], *args)
    assert empty.shape == (0, 4, 9, 8)
    e_gx, e_goff = emu._dscn_backward(grad_out[:0], x[:0], off[:0], *args, [True, True])
    assert e_gx.shape == x[:0].shape and e_goff.shape == off[:0].shape


def test_cuda_kernels_take_non_contiguous_inputs(emu):
    x, off, grad_out = _case(2, 5, 8, 3, 2, 5, 1, 2, 1, 1.0, False, "y", seed=11)
    args = _args(5, 1, 2, 1, 2, 3, 1.0, False, "y")
    expected = (emu.dscn(x, off, *args), *emu._dscn_backward(grad_out, x, off, *args, [True, True]))
    # The same values in transposed memory (as a permuted NCHW tensor would be).
    xt, offt, gt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x, off, grad_out))
    assert not xt.is_contiguous()
    got = (emu.dscn(xt, offt, *args), *emu._dscn_backward(gt, xt, offt, *args, [True, True]))
    for a, b in zip(got, expected):  # the input gradient's atomics sum in another order
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30, -3e9])
def test_cuda_kernels_ignore_non_finite_and_huge_offsets(emu, bad):
    """A tap at a NaN / Inf / huge position contributes 0 and gets a 0 gradient; no index is formed from it."""
    x, off, grad_out = _case(1, 3, 10, 4, 2, 5, 1, 2, 1, 1.0, False, "x", seed=13)
    off[0, 1, 4, 2] = bad
    args = _args(5, 1, 2, 1, 2, 4, 1.0, False, "x")
    out = emu.dscn(x, off, *args)
    gx, goff = emu._dscn_backward(grad_out, x, off, *args, [True, True])
    clean = off.clone()
    clean[0, 1, 4, 2] = 1e6  # far outside the window: contributes nothing
    torch.testing.assert_close(out, emu.dscn(x, clean, *args), rtol=0, atol=0)
    ref_gx, ref_goff = emu._dscn_backward(grad_out, x, clean, *args, [True, True])
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)  # atomics: another summation order
    torch.testing.assert_close(goff, ref_goff, rtol=0, atol=0)
    assert goff[0, 1, 4, 2] == 0 and torch.isfinite(gx).all()


def test_cuda_wrappers_reject_bad_arguments_by_name(emu):
    x, off, grad_out = _case(1, 3, 10, 4, 2, 5, 1, 2, 1, 1.0, False, "x")
    args = _args(5, 1, 2, 1, 2, 4, 1.0, False, "x")
    with pytest.raises(ValueError, match="grad_output"):
        emu._dscn_backward(grad_out[:, :2], x, off, *args, [True, True])
    with pytest.raises(ValueError, match="offset"):
        emu.dscn(x, off[..., :-1], *args)


_SUBPROCESS_CHECK = r"""
import sys, torch
sys.path[:0] = {paths!r}
torch.ops.load_library({lib!r})
from test_cuda_emulated import CASES, _args, _case
from dscn_reference import dscn_reference
import numpy as np
op = torch.ops.dscn_cuda_emu
cases = 0
for case in CASES:
    for axis in ("x", "y"):
        n, h, w, gc, group, kernel, stride, pad, dilation, scale, rc = case
        if axis == "y":
            h, w = w, h
        for dtype in (torch.float64, torch.float32, torch.float16):
            x, off, go = (t.to(dtype) for t in _case(n, h, w, gc, group, kernel, stride, pad, dilation, scale, rc,
                                                     axis))
            args = _args(kernel, stride, pad, dilation, group, gc, scale, rc, axis)
            out = op.dscn(x, off, *args)
            gx, goff = op._dscn_backward(go, x, off, *args, [True, True])
            if dtype == torch.float64:
                ref = dscn_reference(x.numpy(), off.numpy(), kernel, stride, pad, dilation, group, scale, rc, axis,
                                     go.numpy())
                for a, b in zip((out, gx, goff), ref):
                    np.testing.assert_allclose(a.numpy(), b, rtol=1e-10, atol=1e-10)
            cases += 1
print("checked", cases)
"""


def _asan_runtime() -> str | None:
    try:
        path = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libasan.so"], capture_output=True,
                              text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def test_grid_stride_loops_and_memory_bounds(tmp_path):
    """A second build, run in a child process, caps the grid at 3 blocks of 256 threads, so that every thread runs
    its grid-stride loop many times. Where the compiler has AddressSanitizer the build is instrumented too: every
    read and write of every case, in three dtypes, must stay inside its tensor (ASan puts a red zone around each
    allocation torch makes), or the child stops with ASan's report."""
    asan = _asan_runtime()
    flags = ["-O1", "-DDSCN_EMU_MAX_BLOCKS=3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if asan:
        flags += ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
        env.update(LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=66")
    lib = _compile(tmp_path, flags)
    script = _SUBPROCESS_CHECK.format(paths=[str(Path(__file__).parent)], lib=str(lib))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"checked {len(CASES) * 2 * 3}" in proc.stdout
