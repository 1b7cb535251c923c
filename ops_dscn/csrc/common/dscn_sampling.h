// Sampling arithmetic of DSCN (deformable strip convolution), shared by the CPU and CUDA kernels. The CUDA kernels and
// the CPU kernel's scalar path (half, bfloat16, and the tails of its SIMD loops) call these functions; the CPU's
// float/double SIMD path (cpu/dscn_cpu.cpp, TapTable::fill) repeats resolve_tap() lane by lane with the same
// formulas. Same formulas are not same bits: nvcc may contract a * b + c into an FMA and the GPU sums in another
// order, so CPU and GPU float32 results can differ in the last bits; the CUDA tests therefore check the GPU against
// the float64 reference with stated tolerances rather than relying on the CPU tests.
//
// Canonical view used by both backends: every strip is processed as a 1-D problem along its "axis" (W for the
// x-strip, H for the y-strip). A sample position `loc` along the axis is
//
//     loc = (o * stride - pad + c) - c * s + (k * dilation + off) * s,      c = dilation * (K - 1) / 2
//
// (the grouping of terms follows the original operator so that float results agree bit for bit in the common
// case). A tap contributes only when -1 < loc < len; the comparison is written so that NaN fails it, and it is
// done in floating point BEFORE any conversion to an integer, so NaN, +-Inf and huge offsets never produce an
// index. Inside the window the value is (1 - l) * x[i0] + l * x[i0 + 1] with i0 = floor(loc), l = loc - i0,
// where a neighbour outside [0, len) reads as zero.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DSCN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DSCN_HOST_DEVICE inline
#endif

namespace ops_dscn {

// Integer geometry of one strip, in the canonical (axis) frame. All sizes are 64-bit so that index arithmetic on
// large batches never overflows.
struct StripGeometry {
  int64_t axis_len;      // input length along the sampling axis
  int64_t kernel;        // K, taps along the axis
  int64_t stride;        // stride along the axis
  int64_t pad;           // zero padding along the axis
  int64_t dilation;      // dilation along the axis
  int64_t taps;          // K' = K - remove_center, offsets per group
  int64_t center;        // index of the tap skipped by remove_center, or -1
};

// One tap, resolved: its two neighbours, whether each is read, and their weights. An unused neighbour has weight
// zero and index 0, so an index is always inside the input even when its flag is false.
template <typename acc_t>
struct LinearTap {
  int64_t i0;  // lower neighbour, floor(loc)
  int64_t i1;  // upper neighbour, floor(loc) + 1
  bool use0;   // the tap is inside the window and the lower neighbour inside the input
  bool use1;   // the tap is inside the window and the upper neighbour inside the input
  acc_t w0;    // 1 - l
  acc_t w1;    // l
};

// Kernel tap index (0..K-1) of the j-th offset (0..K'-1): remove_center skips the centre tap.
DSCN_HOST_DEVICE int64_t tap_index(int64_t j, int64_t center) {
  return (center >= 0 && j >= center) ? j + 1 : j;
}

// Position of the kernel centre's reference point for output index `o`, with the offset scale applied:
// (o * stride - pad + c) - c * s. Shared by all taps of the pixel.
template <typename acc_t>
DSCN_HOST_DEVICE acc_t strip_origin(const StripGeometry& g, int64_t o, acc_t scale) {
  const int64_t c = (g.dilation * (g.kernel - 1)) / 2;
  return static_cast<acc_t>(o * g.stride - g.pad + c) - static_cast<acc_t>(c) * scale;
}

// Sample position of a tap: origin + (k * dilation + off) * s, with `tap_pos` = k * dilation.
template <typename acc_t>
DSCN_HOST_DEVICE acc_t tap_location(acc_t origin, acc_t tap_pos, acc_t off, acc_t scale) {
  return origin + (tap_pos + off) * scale;
}

// Resolves a location into neighbours and weights. Never converts a non-finite value to an integer. Selects only,
// no branches: the CPU kernel's SIMD path (cpu/dscn_cpu.cpp, TapTable::fill) mirrors it lane by lane.
template <typename acc_t>
DSCN_HOST_DEVICE LinearTap<acc_t> resolve_tap(acc_t loc, int64_t len) {
  // A positive test, so that NaN (all comparisons false) counts as outside.
  // Non-short-circuit '&' keeps the function free of control flow.
  const bool inside = (loc > acc_t(-1)) & (loc < static_cast<acc_t>(len));
  const acc_t safe = inside ? loc : acc_t(0);  // outside taps never reach the integer conversion
  // floor() for values in (-1, len): truncation, minus one below zero. Exact; the CPU kernel's SIMD path computes
  // it the same way.
  const int64_t lo = static_cast<int64_t>(safe) - (safe < acc_t(0) ? 1 : 0);
  const acc_t l = safe - static_cast<acc_t>(lo);
  LinearTap<acc_t> t;
  t.use0 = inside & (lo >= 0);
  t.use1 = inside & (lo + 1 <= len - 1);
  t.i0 = t.use0 ? lo : 0;
  t.i1 = t.use1 ? lo + 1 : 0;
  t.w0 = t.use0 ? acc_t(1) - l : acc_t(0);
  t.w1 = t.use1 ? l : acc_t(0);
  return t;
}

}  // namespace ops_dscn
