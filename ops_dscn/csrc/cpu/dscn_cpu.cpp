// CPU kernels of ops_dscn::dscn and ops_dscn::_dscn_backward.
//
// Layout is channels-last, so for one (pixel, group, tap) the sampling position and both interpolation weights are
// shared by the group's channels, which are contiguous: positions are resolved first, for a run of pixels at once
// (one SIMD pass over their offsets), then each output is a straight vector loop over channels.
//
// Work is split so that no two threads ever write the same input-gradient element:
//   x-strip: one task per output row (n, h_out); its taps stay inside input row h_out * stride_h - pad_h.
//   y-strip: one task per block of output columns (n, w_out0..w_out1); its taps stay inside those input columns.
// Hence the backward pass needs no atomics and is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <new>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "../common/dscn_params.h"
#include "../common/dscn_sampling.h"
#include "cpu_simd.h"

#if DSCN_X86_DISPATCH
#include <immintrin.h>
#endif

namespace ops_dscn {
namespace {

template <typename scalar_t>
constexpr bool kVectorised = DSCN_HAS_VEC && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>);

// The tap table is filled with vectors of at most 32 bytes (GCC 12's code for 64-byte masks and conversions was
// measured slower); the channel loops use the full width.
template <int Bytes>
constexpr int kFillBytes = Bytes < 32 ? Bytes : 32;

#ifndef DSCN_TABLE_ENTRIES
#define DSCN_TABLE_ENTRIES 512
#endif

// Largest input row (bytes) the lerp form copies per thread (see forward_task_body).
constexpr int64_t kLerpRowMaxBytes = int64_t(4) << 20;

// Pixels resolved per pass along an x-strip row (bounds the table to a few KB, which stays in L1).
constexpr int64_t kRun = 32;
// ... but at most this many table entries (pixels * G * K'), so that the table (~40 bytes an entry) stays in L1
// for wide strips too (DSAN-S stage 1 has G * K' = 60).
constexpr int64_t kTableEntries = DSCN_TABLE_ENTRIES;

// x-strips of 20-channel groups whose row has at most this many table entries go a row at a time
// (forward_lerp20_rows): DSAN-S stage 3 at 224 has 14 * 112.
constexpr int64_t kLerp20RowEntries = 4096;

inline int64_t x_run(const DSCNParams& p) {
  return std::max<int64_t>(1, std::min<int64_t>(kRun, kTableEntries / (p.group * p.geom.taps)));
}
// Output columns per task of a y-strip. A run reads the rows its taps reach, `reach` of them, across all of the
// task's columns; that working set is kept to a budget tied to the L1 data cache, so that it stays there beside the
// tap table and the output. Measured at batch 32 over the DSAN-T/S shapes:
//   - 32 KB L1 (AMD Zen 4): 10 KB picks the best or nearly the best of 1-8 columns (1 for C = 320, or for K = 13 at
//     C = 128; 7 for C = 32) and is up to 1.25x faster than a fixed 8;
//   - 48 KB L1 (Intel Xeon with AVX-512): 40 KB (mostly 8 columns; 6 for K = 13 at C = 128, 4 for C = 320) beat
//     10 KB by 1.15-1.35x on the DSAN-S stage 1-2 and DSAN-T stage 2 shapes, forward and backward.
// A task holds at most a quarter of a thread's share of the columns, so that small batches still split evenly over
// the threads (at batch 1, 7 tasks of 8 columns on 2 threads were slower than 2-column tasks).
constexpr int64_t kMaxColumns = 8;
inline int64_t column_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL1_DCACHE_SIZE  // glibc; elsewhere (and where it answers 0 or -1) the 32 KB budget
    const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
#else
    const long l1 = 0;
#endif
    return l1 >= 48 * 1024 ? int64_t(40960) : int64_t(10240);
  }();
  return bytes;
}
inline int64_t y_columns(const DSCNParams& p, int64_t elem_bytes) {
  const int64_t reach = (p.geom.kernel - 1) * p.geom.dilation + 1;
  const int64_t by_cache =
      std::clamp<int64_t>(column_bytes() / std::max<int64_t>(1, reach * p.C * elem_bytes), 1, kMaxColumns);
  const int64_t by_balance = std::max<int64_t>(1, p.N * p.Wo / (4 * std::max<int64_t>(1, at::get_num_threads())));
  return std::min(by_cache, by_balance);
}

#if DSCN_X86_DISPATCH
// The AVX-512 fills below resolve 16 entries a step; the last, partial step runs with a lane mask (masked loads do
// not fault past the offsets' end), so a run's tail does not fall back to the scalar loop, whose division by G * K'
// per entry (to find the entry's pixel) cost as much as the vector steps of the whole run: a run of 11 pixels of
// DSAN-T stage 2 (484 entries) left 4 of them to it, a y-strip run of 3 columns (132 entries) 4 of 132. Both return n.
// (Templates rather than lambdas: a lambda does not inherit the function's target attribute.)
//
// GCC 12 warns that the `_mm512_undefined_*` placeholders inside its own conversion intrinsics "may be used
// uninitialized" once they are inlined through these templates (GCC bug 105593, fixed in GCC 13): silenced here only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// Loads 16 floats at p + i; with kTail only the lanes of `mask` (the others read as 0).
template <bool kTail>
DSCN_TARGET_AVX512 DSCN_INLINE __m512 fill_load(const float* p, int64_t i, __mmask16 mask) {
  if constexpr (kTail) return _mm512_maskz_loadu_ps(mask, p + i);
  return _mm512_loadu_ps(p + i);
}
template <bool kTail>
DSCN_TARGET_AVX512 DSCN_INLINE void fill_store(float* p, int64_t i, __mmask16 mask, __m512 v) {
  if constexpr (kTail) {
    _mm512_mask_storeu_ps(p + i, mask, v);
  } else {
    _mm512_storeu_ps(p + i, v);
  }
}
template <bool kTail>
DSCN_TARGET_AVX512 DSCN_INLINE void fill_store(int32_t* p, int64_t i, __mmask16 mask, __m512i v) {
  if constexpr (kTail) {
    _mm512_mask_storeu_epi32(p + i, mask, v);
  } else {
    _mm512_storeu_si512(p + i, v);
  }
}

// The fills' shared inputs: loc = ((rel + base) - cs) + (tap_pos + off) * scale for entries i..i+15.
struct FillArgs {
  const float* rel;
  const float* tap_pos;
  const float* off;
  float base, cs, scale, len_f;
  int32_t byte_step;
};
template <bool kTail>
DSCN_TARGET_AVX512 DSCN_INLINE __m512 fill_loc(const FillArgs& a, int64_t i, __mmask16 mask) {
  const __m512 origin = _mm512_sub_ps(_mm512_add_ps(fill_load<kTail>(a.rel, i, mask), _mm512_set1_ps(a.base)),
                                      _mm512_set1_ps(a.cs));
  const __m512 t = _mm512_add_ps(fill_load<kTail>(a.tap_pos, i, mask), fill_load<kTail>(a.off, i, mask));
  return _mm512_fmadd_ps(t, _mm512_set1_ps(a.scale), origin);
}

// One step of TapTable::fill's float pair form with AVX-512 mask registers. GCC 12 turns the generic vector code's
// 64-byte compares and selects into scalar code, so the generic loop is capped at 32 bytes (kFillBytes) and this
// routine does the wide fill instead. The arithmetic is the generic loop's, operation for operation (origin + t *
// scale is one FMA there too, as GCC contracts it on FMA targets).
template <bool kTail>
DSCN_TARGET_AVX512 DSCN_INLINE void fill_pair_step(const FillArgs& a, int32_t* __restrict__ i0, float* __restrict__ w0,
                                                   float* __restrict__ w1, int32_t last, int64_t i, __mmask16 mask) {
  const __m512 vm1 = _mm512_set1_ps(-1.0f), vone = _mm512_set1_ps(1.0f), vzero = _mm512_setzero_ps();
  const __m512i ione = _mm512_set1_epi32(1);
  const __m512 loc = fill_loc<kTail>(a, i, mask);
  // Ordered compares: false for NaN, so NaN counts as outside.
  const __mmask16 inside =
      _mm512_cmp_ps_mask(loc, vm1, _CMP_GT_OQ) & _mm512_cmp_ps_mask(loc, _mm512_set1_ps(a.len_f), _CMP_LT_OQ);
  const __m512 safe = _mm512_maskz_mov_ps(inside, loc);
  const __mmask16 below = _mm512_cmp_ps_mask(safe, vzero, _CMP_LT_OQ);  // floor = -1
  const __m512i lo = _mm512_mask_sub_epi32(_mm512_cvttps_epi32(safe), below, _mm512_cvttps_epi32(safe), ione);
  const __m512 l = _mm512_sub_ps(safe, _mm512_cvtepi32_ps(lo));
  const __mmask16 top = _mm512_cmpgt_epi32_mask(lo, _mm512_set1_epi32(last - 1));  // floor = len - 1
  const __m512 lw = _mm512_maskz_mov_ps(inside, l);
  const __m512 hw = _mm512_maskz_mov_ps(inside, _mm512_sub_ps(vone, l));
  const __mmask16 not_top = static_cast<__mmask16>(~top), not_below = static_cast<__mmask16>(~below);
  fill_store<kTail>(w0, i, mask, _mm512_mask_mov_ps(_mm512_maskz_mov_ps(not_top, hw), below, lw));
  fill_store<kTail>(w1, i, mask, _mm512_maskz_mov_ps(not_below, _mm512_mask_mov_ps(lw, top, hw)));
  const __m512i pair = _mm512_maskz_mov_epi32(not_below, _mm512_mask_sub_epi32(lo, top, lo, ione));
  fill_store<kTail>(i0, i, mask, _mm512_mullo_epi32(pair, _mm512_set1_epi32(a.byte_step)));
}

// One step of TapTable::fill_lerp with AVX-512.
template <bool kTail>
DSCN_TARGET_AVX512 DSCN_INLINE void fill_lerp_step(const FillArgs& a, int32_t* __restrict__ i0, float* __restrict__ w1,
                                                   int64_t i, __mmask16 mask) {
  const __m512 vm1 = _mm512_set1_ps(-1.0f);
  const __m512 loc = fill_loc<kTail>(a, i, mask);
  // Ordered compares: false for NaN, so NaN counts as outside; outside taps become -1 (q = 0, l = 0).
  const __mmask16 inside =
      _mm512_cmp_ps_mask(loc, vm1, _CMP_GT_OQ) & _mm512_cmp_ps_mask(loc, _mm512_set1_ps(a.len_f), _CMP_LT_OQ);
  const __m512 safe = _mm512_mask_mov_ps(vm1, inside, loc);
  const __m512 fl = _mm512_roundscale_ps(safe, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  fill_store<kTail>(w1, i, mask, _mm512_sub_ps(safe, fl));
  fill_store<kTail>(i0, i, mask,
                    _mm512_mullo_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fl), _mm512_set1_epi32(1)),
                                       _mm512_set1_epi32(a.byte_step)));
}

// The fills' drivers: whole steps of 16, then one masked step. Deliberately not inlined: they are called once per
// run of pixels from code that may be compiled for the baseline ISA.
DSCN_TARGET_AVX512 __attribute__((noinline)) int64_t fill_pair_avx512(const FillArgs& a, int32_t* __restrict__ i0,
                                                                      float* __restrict__ w0, float* __restrict__ w1,
                                                                      int64_t n, int32_t last) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) fill_pair_step<false>(a, i0, w0, w1, last, i, 0xFFFF);
  if (i < n) fill_pair_step<true>(a, i0, w0, w1, last, i, static_cast<__mmask16>((1u << (n - i)) - 1u));
  return n;
}
DSCN_TARGET_AVX512 __attribute__((noinline)) int64_t fill_lerp_avx512(const FillArgs& a, int32_t* __restrict__ i0,
                                                                      float* __restrict__ w1, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) fill_lerp_step<false>(a, i0, w1, i, 0xFFFF);
  if (i < n) fill_lerp_step<true>(a, i0, w1, i, static_cast<__mmask16>((1u << (n - i)) - 1u));
  return n;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// Allocator of 64-byte aligned arrays: the table's rows are filled with 64-byte stores, which cost two (and stall the
// fill) where they cross a cache line.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}  // NOLINT(google-explicit-constructor): allocator rebinding
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};

// Tap table of a run of R pixels that are consecutive in the output / offset tensors: for each of their
// R * G * K' offsets, both neighbours' element offsets from the start of the pixel's input line, their weights,
// and whether each is read. A neighbour that is not read (tap outside the window, or neighbour outside the input)
// gets index 0 and weight 0, so the channel loops need no branches and never touch memory outside the input.
template <typename scalar_t>
struct TapTable {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t gk;                        // G * K', offsets per pixel
  template <typename T>
  using vec = std::vector<T, AlignedAllocator<T>>;
  vec<acc_t> tap_pos;                // (max_run * gk) k * dilation of each offset's kernel tap
  vec<acc_t> rel;                    // (max_run * gk) r * step * stride: the pixel's integer position in its run
  // Neighbour indices along the axis fit in 32 bits (make_params checks the axis length), so float tables use
  // 32-bit lanes like the float vectors; double tables use 64-bit lanes like the double vectors.
  using idx_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  std::vector<int64_t> group_base;   // (max_run * gk) first channel of the offset's group
  vec<idx_t> i0, i1;                 // neighbours' positions along the axis (0 if not read)
  vec<acc_t> w0, w1;                 // interpolation weights (0 if not read)
  vec<acc_t> m0, m1;                 // 1 if the neighbour is read, else 0 (for d value / d loc; backward only)
  vec<acc_t> line_store;             // lerp_line()'s storage

  // A buffer of `elems` elements, kept for the table's life (float only: scalar_t = acc_t).
  scalar_t* lerp_line(int64_t elems) {
    static_assert(std::is_same_v<scalar_t, acc_t>);
    if (static_cast<int64_t>(line_store.size()) < elems) line_store.assign(elems, acc_t(0));
    return line_store.data();
  }

  // `step` is 1 for runs along an x-strip row and 0 across a y-strip (see fill()).
  TapTable(const DSCNParams& p, int64_t max_run, int64_t step) : gk(p.group * p.geom.taps) {
    const int64_t n = max_run * gk;
    group_base.resize(n);
    i0.resize(n);
    i1.resize(n);
    for (auto* v : {&tap_pos, &rel, &w0, &w1, &m0, &m1}) v->resize(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = i % gk;
      tap_pos[i] = static_cast<acc_t>(tap_index(j % p.geom.taps, p.geom.center) * p.geom.dilation);
      group_base[i] = (j / p.geom.taps) * p.group_channels;
      rel[i] = static_cast<acc_t>((i / gk) * step * p.geom.stride);
    }
  }

  // Resolves the R pixels whose positions along the axis are o_axis0 + r * step (the step given to the
  // constructor), with offsets `off` (R * gk values).
  //
  // kGrad (backward, and the forward on a line of one pixel): both neighbours' indices, weights and read masks.
  // Otherwise (forward, axis_len >= 2) a pair form that needs no i1 and no masks: i0 is the first of two adjacent
  // elements p, p + 1 both inside the line and w0 / w1 their weights. Inside taps with both neighbours in the line
  // are unchanged (p = floor(loc)); at the ends the one real neighbour is moved into the pair (floor = -1: p = 0 with
  // weight l; floor = len - 1: p = len - 2 and p + 1 gets 1 - l) and the other element of the pair gets weight 0.
  // That saves the forward a table load and an index computation per tap and the fill two stores per entry. The
  // pair form stores byte offsets, i0 * byte_step (the input's step along the axis in bytes), rather than indices:
  // the channel loops then address the input with the table entry as it is, without a multiply or an address
  // computation per tap (the caller checks that the offsets fit idx_t). The general form stores indices.
  template <int FullBytes, bool kGrad>
  DSCN_INLINE void fill(const StripGeometry& g, int64_t o_axis0, int64_t step, int64_t R,
                        const scalar_t* __restrict__ off, acc_t scale, int64_t byte_step = 1) {
    const int64_t n = R * gk;
    const int64_t c = (g.dilation * (g.kernel - 1)) / 2;
    int64_t i = 0;
#if DSCN_HAS_VEC
    if constexpr (kVectorised<scalar_t>) {
      // resolve_tap() lane by lane, with integer lanes as wide as the float lanes.
      using V = Vec<scalar_t, kFillBytes<FullBytes>>;
      using vf = typename V::type;
      using vi = typename V::itype;
      using ilane = std::remove_reference_t<decltype(vi{}[0])>;
      constexpr int64_t L = V::size;
      const scalar_t len_f = static_cast<scalar_t>(g.axis_len);
      const ilane last = static_cast<ilane>(g.axis_len - 1);
      // strip_origin() of pixel r is float(o0 * stride - pad + c + rel) - c * s. The integer sum is split in two
      // exactly representable parts (positions < 2^24 for float), so the result is bit-identical to strip_origin.
      const scalar_t base = static_cast<scalar_t>(o_axis0 * g.stride - g.pad + c);
      const scalar_t cs = static_cast<scalar_t>(c) * scale;
      const vf zero = {};
      const vf one = zero + scalar_t(1);
      const vi izero = {};
#if DSCN_X86_DISPATCH
      if constexpr (FullBytes == 64 && std::is_same_v<scalar_t, float> && !kGrad) {
        const FillArgs args{rel.data(), tap_pos.data(), off, base, cs, scale, len_f, static_cast<int32_t>(byte_step)};
        i = fill_pair_avx512(args, i0.data(), w0.data(), w1.data(), n, last);
      }
#endif
      for (; i + L <= n; i += L) {
        const vf origin = (V::load(rel.data() + i) + base) - cs;
        const vf loc = origin + (V::load(tap_pos.data() + i) + V::load(off + i)) * scale;
        const vi inside = (loc > scalar_t(-1)) & (loc < len_f);  // false for NaN
        const vf safe = inside ? loc : zero;                    // outside taps never reach the conversion
        const vi lo = __builtin_convertvector(safe, vi) + (safe < scalar_t(0));  // floor(); true is -1
        const vf l = safe - __builtin_convertvector(lo, vf);
        // Indices only (no element offsets): the channel loops scale them, once per tap.
        static_assert(sizeof(ilane) == sizeof(idx_t));
        if constexpr (kGrad) {
          const vi use0 = inside & (lo >= 0);
          const vi use1 = inside & (lo + 1 <= last);
          V::store(w0.data() + i, use0 ? one - l : zero);
          V::store(w1.data() + i, use1 ? l : zero);
          V::store(m0.data() + i, use0 ? one : zero);
          V::store(m1.data() + i, use1 ? one : zero);
          const vi lo0 = use0 ? lo : izero;
          const vi lo1 = use1 ? lo + 1 : izero;
          std::memcpy(i0.data() + i, &lo0, sizeof(lo0));
          std::memcpy(i1.data() + i, &lo1, sizeof(lo1));
        } else {
          const vi below = lo < 0;         // floor = -1: the pair (0, 1) with x[0] as the upper neighbour
          const vi top = lo + 1 > last;    // floor = len - 1: the pair (len - 2, len - 1)
          const vf lw = inside ? l : zero;
          const vf hw = inside ? one - l : zero;
          V::store(w0.data() + i, below ? lw : (top ? zero : hw));
          V::store(w1.data() + i, below ? zero : (top ? hw : lw));
          const vi pair = (below ? izero : (top ? lo - 1 : lo)) * static_cast<ilane>(byte_step);
          std::memcpy(i0.data() + i, &pair, sizeof(pair));
        }
      }
    }
#endif
    // The entries left to scalar code: entry i belongs to pixel r = i / gk, tracked rather than divided for.
    for (int64_t r = i / gk, j = i % gk; i < n; ++i) {
      const acc_t origin = strip_origin<acc_t>(g, o_axis0 + r * step, scale);
      const acc_t loc = tap_location<acc_t>(origin, tap_pos[i], static_cast<acc_t>(off[i]), scale);
      const LinearTap<acc_t> t = resolve_tap<acc_t>(loc, g.axis_len);
      if constexpr (kGrad) {
        i0[i] = static_cast<idx_t>(t.i0);
        i1[i] = static_cast<idx_t>(t.i1);
        w0[i] = t.w0;
        w1[i] = t.w1;
        m0[i] = t.use0 ? acc_t(1) : acc_t(0);
        m1[i] = t.use1 ? acc_t(1) : acc_t(0);
      } else if (t.use0) {  // floor in [0, len - 2], or len - 1 (then the pair ends at it)
        const bool top = !t.use1;
        i0[i] = static_cast<idx_t>((top ? t.i0 - 1 : t.i0) * byte_step);
        w0[i] = top ? acc_t(0) : t.w0;
        w1[i] = top ? t.w0 : t.w1;
      } else {  // floor = -1 (x[0] is the upper neighbour), or outside: w1 = 0 and weight 0 throughout
        i0[i] = 0;
        w0[i] = t.w1;
        w1[i] = 0;
      }
      if (++j == gk) j = 0, ++r;
    }
  }

  // Lerp form (forward of an x-strip on float, see lerp_line()): for each entry, the byte offset q * byte_step of
  // q = floor(loc) + 1 in the padded line, in i0, and l = loc - floor(loc), in w1; outside taps get q = 0, l = 0.
  // floor and l are resolve_tap()'s values.
  DSCN_INLINE void fill_lerp(const StripGeometry& g, int64_t o_axis0, int64_t R, const scalar_t* __restrict__ off,
                             acc_t scale, int64_t byte_step) {
    const int64_t n = R * gk;
    int64_t i = 0;
#if DSCN_X86_DISPATCH
    if constexpr (std::is_same_v<scalar_t, float>) {
      const int64_t c = (g.dilation * (g.kernel - 1)) / 2;
      const FillArgs args{rel.data(), tap_pos.data(), off, static_cast<float>(o_axis0 * g.stride - g.pad + c),
                          static_cast<float>(c) * scale, scale, static_cast<float>(g.axis_len),
                          static_cast<int32_t>(byte_step)};
      i = fill_lerp_avx512(args, i0.data(), w1.data(), n);
    }
#endif
    for (int64_t r = i / gk, j = i % gk; i < n; ++i) {
      const acc_t origin = strip_origin<acc_t>(g, o_axis0 + r, scale);
      const acc_t loc = tap_location<acc_t>(origin, tap_pos[i], static_cast<acc_t>(off[i]), scale);
      const bool inside = (loc > acc_t(-1)) & (loc < static_cast<acc_t>(g.axis_len));
      const acc_t safe = inside ? loc : acc_t(0);  // outside taps never reach the conversion
      const int64_t lo = inside ? static_cast<int64_t>(safe) - (safe < acc_t(0) ? 1 : 0) : -1;
      i0[i] = static_cast<idx_t>((lo + 1) * byte_step);
      w1[i] = inside ? safe - static_cast<acc_t>(lo) : acc_t(0);
      if (++j == gk) j = 0, ++r;
    }
  }
};

// p + bytes, for table entries that hold byte offsets.
template <typename scalar_t, typename idx_t>
DSCN_INLINE const scalar_t* byte_offset(const scalar_t* p, idx_t bytes) {
  return reinterpret_cast<const scalar_t*>(reinterpret_cast<const char*>(p) + static_cast<int64_t>(bytes));
}

// Calls tap(s, j) for the taps j = 0..taps-1 in order, s = j % S through whole rounds of S taps and 0 for the taps
// left over: the accumulator set s that takes each tap. The channel loops' sums follow this order, so any loop that
// must give their results bit for bit takes its taps through this too.
template <int S, typename Fn>
DSCN_INLINE void for_each_tap(int64_t taps, Fn& tap) {
  int64_t j = 0;
  for (; j + S <= taps; j += S) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) tap(s, j + s);
  }
  for (; j < taps; ++j) tap(0, j);
}

// Table forms of the channel loops (see weighted_sum_groups).
constexpr int kGeneralForm = 0, kPairForm = 1, kLerpForm = 2;

// NV vectors of out[c] = sum_j w0[j] * x[i0[j] * step + c] + w1[j] * x[i1[j] * step + c] for each of M groups, in
// one tap loop: group m reads x + m * gc, writes out + m * gc, and its `taps` table entries start at m * taps (with
// ts >= 0 at m * ts, with xs >= 0 it reads x + m * xs: M pixels of one group, see forward_task_body).
// Form kGeneralForm: i0, i1 are indices along the axis. kPairForm (TapTable::fill): i0[j] is a byte offset and the
// upper neighbour is step elements after the lower one. kLerpForm (TapTable::fill_lerp): x is a padded line and
// x + step its differences; the sample is x[q] + w1[j] * (x + step)[q] with q at byte offset i0[j] (w0 is not read).
// Without a tail (TB == 0), vector v starts at channel v * L, except the last, which starts at `last` (it may
// overlap the one before: lanes that compute the same channel do the same operations in the same order, so they
// store the same value). With TB > 0 the group is NV whole vectors and one narrower vector of TB bytes after them.
//
// The lower and the upper neighbour accumulate separately, and for two or three vectors the taps alternate between
// two accumulator sets, so that each accumulator's chain of dependent FMAs is half as long. Groups of one vector
// (and a tail) take one set: they run M = 4 to a loop (below), which gives enough independent chains, and a second
// set's registers cost more than they saved (AMD Zen 5, batch 32, same process: the 16-channel y-strips of DSAN-T
// stage 2 and DSAN-S stages 1-2 0.87-0.89x the time with one set, x-strips unchanged; for 32 channels, two vectors,
// one set was 1.03x slower). The set count depends on the group's width only, never on M.
// Several groups per loop (M > 1) are used where a group is one or two vectors (16 or 20 channels on AVX-512:
// DSAN-T stages 2-3, DSAN-S stages 1-3): one such group per loop was measured at about 4 cycles a tap, against the
// 2-2.5 its loads and FMAs need, as each group's short loop and final reduction ended a dependency window that the
// next group could not overlap. The sum order of a group does not depend on M, so neither do the results.
#if DSCN_HAS_VEC  // Vec exists only with GCC / clang vector extensions; every caller is guarded too
template <int Form, int M, int NV, typename V, int TB = 0, typename scalar_t, typename acc_t, typename idx_t>
DSCN_INLINE void weighted_sum_groups(const scalar_t* __restrict__ x, const idx_t* i0, const idx_t* i1,
                                     const acc_t* w0, const acc_t* w1, int64_t taps, scalar_t* __restrict__ out,
                                     int64_t step, int64_t gc, int64_t last, int64_t ts = -1, int64_t xs = -1) {
  using v_t = typename V::type;
  using T = Vec<scalar_t, TB == 0 ? 16 : TB>;  // the tail vector (unused when TB == 0)
  using t_t = typename T::type;
  constexpr int64_t L = V::size;
  constexpr bool kPair = Form != kGeneralForm, kLerp = Form == kLerpForm;
  constexpr int NT = TB > 0 ? 1 : 0;
  constexpr int S = NV == 1 || NV + NT >= 4 ? 1 : 2;  // accumulator sets (tap phases)
  // With a tail, the NV vectors are whole and the tail follows them; without, the last vector starts at `last`.
  const auto at = [&](int v) DSCN_LAMBDA_INLINE { return TB == 0 && v == NV - 1 ? last : v * L; };
  v_t a[S][M][NV], b[S][M][NV];
  t_t ta[S][M], tb[S][M];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[s][m][v] = b[s][m][v] = v_t{};
      ta[s][m] = tb[s][m] = t_t{};
    }
  }
  // Pair form: both neighbours are addressed as base + table entry (+ a constant), the upper one from a second base
  // pointer, so that neither needs an address computation.
  const scalar_t* const x_up = x + step;
  const int64_t t_stride = ts < 0 ? taps : ts, x_stride = xs < 0 ? gc : xs;
  const auto tap = [&](int s, int64_t j) DSCN_LAMBDA_INLINE {
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const int64_t e = m * t_stride + j;
      const scalar_t* pa = kPair ? byte_offset(x + m * x_stride, i0[e])
                                 : x + m * x_stride + static_cast<int64_t>(i0[e]) * step;
      const scalar_t* pb = kPair ? byte_offset(x_up + m * x_stride, i0[e])
                                 : x + m * x_stride + static_cast<int64_t>(i1[e]) * step;
      // The weights are broadcast once, and the tail takes the low lanes of the same registers: written as scalar
      // times tail vector, the compiler broadcast each weight a second time from memory, and a group of 20 channels
      // (a full vector and a tail) then spent 7 loads a tap, not 5 (DSAN-T/S stage 3).
      const v_t wa = V::broadcast(kLerp ? scalar_t(1) : w0[e]), wb = V::broadcast(w1[e]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if constexpr (kLerp) {
          a[s][m][v] += V::load(pa + at(v));
        } else {
          a[s][m][v] += wa * V::load(pa + at(v));
        }
        b[s][m][v] += wb * V::load(pb + at(v));
      }
      if constexpr (TB > 0) {
        static_assert(TB <= static_cast<int>(sizeof(v_t)), "the tail is narrower than a vector");
        [[maybe_unused]] const t_t wat = T::load(reinterpret_cast<const scalar_t*>(&wa));
        const t_t wbt = T::load(reinterpret_cast<const scalar_t*>(&wb));
        if constexpr (kLerp) {
          ta[s][m] += T::load(pa + NV * L);
        } else {
          ta[s][m] += wat * T::load(pa + NV * L);
        }
        tb[s][m] += wbt * T::load(pb + NV * L);
      }
    }
  };
  for_each_tap<S>(taps, tap);
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      v_t sum = a[0][m][v] + b[0][m][v];
#pragma GCC unroll 8
      for (int s = 1; s < S; ++s) sum += a[s][m][v] + b[s][m][v];
      V::store(out + m * gc + at(v), sum);
    }
    if constexpr (TB > 0) {
      t_t sum = ta[0][m] + tb[0][m];
#pragma GCC unroll 8
      for (int s = 1; s < S; ++s) sum += ta[s][m] + tb[s][m];
      T::store(out + m * gc + NV * L, sum);
    }
  }
}
#endif  // DSCN_HAS_VEC

#if DSCN_X86_DISPATCH
// __builtin_shufflevector (clang, GCC 12+) picks vector halves and blends in registers; GCC 11 lacks it and takes
// the fallbacks below (the same values, through memory).
#if defined(__clang__) || __GNUC__ >= 12
#define DSCN_HAS_SHUFFLEVECTOR 1
#else
#define DSCN_HAS_SHUFFLEVECTOR 0
#endif

// Floats per (pixel, group) block of the lerp form's line for 20-channel groups (see forward_task_body): xp[0:16],
// then dp[0:16], then xp[16:20], dp[16:20] and 8 floats of padding: three whole cache lines.
constexpr int64_t kBlock20 = 48;

// weighted_sum_groups' lerp form for M groups of 20 channels in the blocked line: group m's block starts at
// x + m * kBlock20 (at the byte offset i0[e] for each tap) and its output at out + m * 20. Per tap and group: two
// 64-byte loads and one 32-byte load, none crossing a cache line, where the plain line (groups 80 bytes apart)
// needed four loads, three in four of its 64-byte ones crossing a line. The two tails share one vector: lanes 0-3
// accumulate xp (times 1) and lanes 4-7 l * dp, exactly the two tail accumulators of weighted_sum_groups (an FMA by
// 1 is the add), and they are summed in the same order at the end, so the results are bit-identical.
template <int M, int KT = 0>
DSCN_INLINE void lerp20_groups(const float* __restrict__ x, const int32_t* i0, const float* w1, int64_t taps_,
                               float* __restrict__ out) {
  const int64_t taps = KT > 0 ? KT : taps_;
  using V = Vec<float, 64>;
  using E = Vec<float, 32>;
  using Q = Vec<float, 16>;
  using v_t = V::type;
  using e_t = E::type;
  using q_t = Q::type;
  // One accumulator set, as weighted_sum_groups uses for a vector and a tail. (Two sets, as before, needed 24
  // accumulators for M = 4 and spilled one to the stack; one set: 0.91x the time of DSAN-S stage 3's x-strip.)
  constexpr int S = 1;
  v_t a[S][M], b[S][M];
  e_t t[S][M];
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      a[s][m] = b[s][m] = v_t{};
      t[s][m] = e_t{};
    }
  }
  const e_t one = E::broadcast(1.0f);
  [[maybe_unused]] const E::itype upper = {0, 0, 0, 0, -1, -1, -1, -1};
  const auto tap = [&](int s, int64_t j) DSCN_LAMBDA_INLINE {
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      const int64_t e = m * taps + j;
      const float* pa = byte_offset(x + m * kBlock20, i0[e]);
      const v_t wb = V::broadcast(w1[e]);
      a[s][m] += V::load(pa);
      b[s][m] += wb * V::load(pa + 16);
#if DSCN_HAS_SHUFFLEVECTOR
      const e_t wb8 = __builtin_shufflevector(wb, wb, 0, 1, 2, 3, 4, 5, 6, 7);
      const e_t wt = __builtin_shufflevector(one, wb8, 0, 1, 2, 3, 12, 13, 14, 15);  // 1, 1, 1, 1, l, l, l, l
#else
      const e_t wt = upper ? E::load(reinterpret_cast<const float*>(&wb)) : one;
#endif
      t[s][m] += wt * E::load(pa + 32);
    }
  };
  for_each_tap<S>(taps, tap);
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    const auto halves = [](const e_t& v) DSCN_LAMBDA_INLINE {  // xp tail + l * dp tail
#if DSCN_HAS_SHUFFLEVECTOR
      return q_t(__builtin_shufflevector(v, v, 0, 1, 2, 3)) + q_t(__builtin_shufflevector(v, v, 4, 5, 6, 7));
#else
      return Q::load(reinterpret_cast<const float*>(&v)) + Q::load(reinterpret_cast<const float*>(&v) + 4);
#endif
    };
    v_t sum = a[0][m] + b[0][m];
    q_t tail = halves(t[0][m]);
#pragma GCC unroll 4
    for (int s = 1; s < S; ++s) {
      sum += a[s][m] + b[s][m];
      tail += halves(t[s][m]);
    }
    V::store(out + m * 20, sum);
    Q::store(out + m * 20 + 16, tail);
  }
}
// Writes the blocked line of G groups of 20 channels of one input row xr (W pixels, C channels a pixel, the first
// group at xr) for lerp20_groups, padded pixel q at line + q * blocks * kBlock20: for q = 0..W and each of the G
// groups, xp[q] = x[q - 1] and dp[q] = x[q] - x[q - 1] with x[-1] = x[W] = 0, the plain line's values (dp[W] is
// 0 - x[W - 1]: +0 for x = 0, as there). The ends are hoisted out of the loop over q, and the two 4-float tails go
// out as one 32-byte store: the first version (edge tests per group, two 16-byte tail stores, each pixel loaded
// twice) was about a fifth of the DSAN-T/S stage 3 x-strips' time on AMD Zen 5 at batch 32.
DSCN_INLINE void build_lerp20_line(const float* __restrict__ xr, int64_t W, int64_t G, int64_t C,
                                   float* __restrict__ line, int64_t blocks) {
  using V = Vec<float, 64>;
  using E = Vec<float, 32>;
  using Q = Vec<float, 16>;
  using v_t = V::type;
  using q_t = Q::type;
  const auto put = [](float* blk, const v_t& xp, const v_t& dp, const q_t& xpt, const q_t& dpt) DSCN_LAMBDA_INLINE {
    V::store(blk, xp);
    V::store(blk + 16, dp);
#if DSCN_HAS_SHUFFLEVECTOR
    E::store(blk + 32, __builtin_shufflevector(xpt, dpt, 0, 1, 2, 3, 4, 5, 6, 7));
#else
    Q::store(blk + 32, xpt);
    Q::store(blk + 36, dpt);
#endif
  };
  const int64_t pixel = blocks * kBlock20;
  const v_t zero = {};
  const q_t zero4 = {};
  for (int64_t g = 0; g < G; ++g) {  // q = 0: xp = 0, dp = x[0]
    put(line + g * kBlock20, zero, V::load(xr + g * 20), zero4, Q::load(xr + g * 20 + 16));
  }
  for (int64_t q = 1; q < W; ++q) {
    const float* prev = xr + (q - 1) * C;
    float* blk = line + q * pixel;
    for (int64_t g = 0; g < G; ++g, prev += 20, blk += kBlock20) {
      const v_t pv = V::load(prev);
      const q_t pt = Q::load(prev + 16);
      put(blk, pv, V::load(prev + C) - pv, pt, Q::load(prev + C + 16) - pt);
    }
  }
  const float* last = xr + (W - 1) * C;
  for (int64_t g = 0; g < G; ++g) {  // q = W: xp = x[W - 1], dp = 0 - x[W - 1]
    const v_t pv = V::load(last + g * 20);
    const q_t pt = Q::load(last + g * 20 + 16);
    put(line + W * pixel + g * kBlock20, pv, zero - pv, pt, zero4 - pt);
  }
}
#endif

// out[c] = sum_j w0[j] * x[i0[j] * step + c] + w1[j] * x[i1[j] * step + c], c in [0, n), over the `taps` entries of
// one group; x points at the group's first channel on the input line, step is the input stride along the axis.
// Form: the table's form, as for weighted_sum_groups.
template <int Bytes, int Form, typename scalar_t, typename acc_t, typename idx_t>
DSCN_INLINE void weighted_sum(const scalar_t* __restrict__ x, const idx_t* i0, const idx_t* i1, const acc_t* w0,
                              const acc_t* w1, int64_t taps, scalar_t* __restrict__ out, int64_t n, int64_t step) {
  int64_t c0 = 0;
#if DSCN_HAS_VEC
  if constexpr (kVectorised<scalar_t>) {
    using V = Vec<scalar_t, Bytes>;
    constexpr int64_t L = V::size;
    // Up to four vectors of channels per pass, so the tap table is read once per pass. A group that is not a whole
    // number of vectors ends with a vector overlapping the one before, in the same pass (20 channels = vectors at 0
    // and 4: DSAN-T/S stage 3 on AVX-512), rather than in a pass of narrower vectors that reads the table again.
    for (; c0 + 4 * L <= n; c0 += 4 * L)
      weighted_sum_groups<Form, 1, 4, V>(x + c0, i0, i1, w0, w1, taps, out + c0, step, 0, 3 * L);
    const int64_t rest = n - c0;
    if (rest >= L) {
      const auto blk = [&](auto nv) DSCN_LAMBDA_INLINE {
        weighted_sum_groups<Form, 1, decltype(nv)::value, V>(x + c0, i0, i1, w0, w1, taps, out + c0, step, 0,
                                                              rest - L);
      };
      if (rest == L) {
        blk(std::integral_constant<int, 1>{});
      } else if (rest <= 2 * L) {
        blk(std::integral_constant<int, 2>{});
      } else if (rest <= 3 * L) {
        blk(std::integral_constant<int, 3>{});
      } else {
        blk(std::integral_constant<int, 4>{});
      }
      c0 = n;
    }
    // Less than one vector left (groups narrower than a vector, or after whole passes of four): narrower vectors.
    const auto narrow_step = [&](auto bytes) DSCN_LAMBDA_INLINE {
      using H = Vec<scalar_t, decltype(bytes)::value>;
      for (; c0 + H::size <= n; c0 += H::size) {
        weighted_sum_groups<Form, 1, 1, H>(x + c0, i0, i1, w0, w1, taps, out + c0, step, 0, 0);
      }
    };
    if constexpr (Bytes > 32) narrow_step(std::integral_constant<int, 32>{});
    if constexpr (Bytes > 16) narrow_step(std::integral_constant<int, 16>{});
  }
#endif
  for (; c0 < n; ++c0) {
    acc_t acc = 0;
    for (int64_t j = 0; j < taps; ++j) {
      const scalar_t* a = Form != kGeneralForm ? byte_offset(x, i0[j]) : x + static_cast<int64_t>(i0[j]) * step;
      const scalar_t* b = Form != kGeneralForm ? a + step : x + static_cast<int64_t>(i1[j]) * step;
      const acc_t wa = Form == kLerpForm ? acc_t(1) : w0[j];
      acc += wa * static_cast<acc_t>(a[c0]) + w1[j] * static_cast<acc_t>(b[c0]);
    }
    out[c0] = static_cast<scalar_t>(acc);
  }
}

// Backward of one tap: scatters w0 * g and w1 * g into the neighbours' input gradients (an unread neighbour has
// weight 0) when kInput, and returns sum_c g[c] * (m1 * b[c] - m0 * a[c]) = d out / d loc, reduced over the group's
// channels, when kOffset (else 0). Gradients that autograd does not need are not computed.
template <int Bytes, bool kInput, bool kOffset, typename scalar_t, typename acc_t>
DSCN_INLINE acc_t tap_backward(const scalar_t* __restrict__ g, const scalar_t* a, const scalar_t* b, acc_t* ga,
                               acc_t* gb, acc_t wa, acc_t wb, acc_t ma, acc_t mb, int64_t n) {
  // ga and gb may be the same element (both neighbours unread), so they are not __restrict__.
  acc_t da = 0, db = 0, red = 0;
  int64_t c0 = 0;
#if DSCN_HAS_VEC
  if constexpr (kVectorised<scalar_t>) {
    // Whole vectors of the ISA's width, then at most one vector of each narrower width (a 20-channel group on
    // AVX-512: 16 + 4), each width with its own tree reduction (see hsum) of m1 * b - m0 * a.
    const auto pass = [&](auto bytes, bool once) DSCN_LAMBDA_INLINE {
      using V = Vec<scalar_t, decltype(bytes)::value>;
      using v_t = typename V::type;
      constexpr int64_t L = V::size;
      v_t pa = {}, pb = {};
      const int64_t c_begin = c0, c_end = once ? std::min(n, c0 + L) : n;
      for (; c0 + L <= c_end; c0 += L) {
        const v_t gv = V::load(g + c0);
        if constexpr (kOffset) {
          pa += gv * V::load(a + c0);
          pb += gv * V::load(b + c0);
        }
        if constexpr (kInput) {
          V::store(ga + c0, V::load(ga + c0) + wa * gv);
          V::store(gb + c0, V::load(gb + c0) + wb * gv);
        }
      }
      if constexpr (kOffset) {
        if (c0 > c_begin) red += hsum<scalar_t, decltype(bytes)::value>(mb * pb - ma * pa);
      }
    };
    pass(std::integral_constant<int, Bytes>{}, false);
    if constexpr (Bytes > 32) pass(std::integral_constant<int, 32>{}, true);
    if constexpr (Bytes > 16) pass(std::integral_constant<int, 16>{}, true);
  }
#endif
  for (; c0 < n; ++c0) {
    const acc_t gv = static_cast<acc_t>(g[c0]);
    if constexpr (kOffset) {
      da += gv * static_cast<acc_t>(a[c0]);
      db += gv * static_cast<acc_t>(b[c0]);
    }
    if constexpr (kInput) {
      ga[c0] += wa * gv;
      gb[c0] += wb * gv;
    }
  }
  return red + (mb * db - ma * da);
}

#if DSCN_HAS_VEC
// tap_backward over all `taps` entries of one group whose gc channels are NV whole vectors plus, when TB > 0, one
// narrower vector of TB bytes (20 floats on AVX-512: 16 + 4): the group's output gradient is loaded once into
// registers for all its taps, and the per-tap index arithmetic, width checks and branches of the general path are
// gone (they cost more than the arithmetic for DSAN's 16-, 20- and 32-channel groups). Same operations in the same
// order as tap_backward, so the same results. x, gin point at the group's first channel on the input line; goff
// receives the group's `taps` offset gradients (times scale).
template <int NV, int TB, bool kInput, bool kOffset, typename V, typename scalar_t, typename acc_t, typename idx_t>
DSCN_INLINE void group_backward(const scalar_t* __restrict__ g, const scalar_t* x, acc_t* gin, const idx_t* i0,
                                const idx_t* i1, const acc_t* w0, const acc_t* w1, const acc_t* m0, const acc_t* m1,
                                int64_t taps, int64_t step, scalar_t* goff, acc_t scale) {
  using v_t = typename V::type;
  using T = Vec<scalar_t, TB == 0 ? 16 : TB>;  // the tail vector (unused when TB == 0)
  using t_t = typename T::type;
  constexpr int64_t L = V::size, TL = NV * L;
  v_t gv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) gv[v] = V::load(g + v * L);
  t_t gt = {};
  if constexpr (TB > 0) gt = T::load(g + TL);
  for (int64_t j = 0; j < taps; ++j) {
    const int64_t e0 = static_cast<int64_t>(i0[j]) * step, e1 = static_cast<int64_t>(i1[j]) * step;
    v_t pa = {}, pb = {};
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if constexpr (kOffset) {
        pa += gv[v] * V::load(x + e0 + v * L);
        pb += gv[v] * V::load(x + e1 + v * L);
      }
      if constexpr (kInput) {
        // Lower neighbour first: when both are unread they are the same element (index 0, weight 0).
        V::store(gin + e0 + v * L, V::load(gin + e0 + v * L) + w0[j] * gv[v]);
        V::store(gin + e1 + v * L, V::load(gin + e1 + v * L) + w1[j] * gv[v]);
      }
    }
    if constexpr (kInput && TB > 0) {
      T::store(gin + e0 + TL, T::load(gin + e0 + TL) + w0[j] * gt);
      T::store(gin + e1 + TL, T::load(gin + e1 + TL) + w1[j] * gt);
    }
    if constexpr (kOffset) {
      acc_t red = hsum<scalar_t, static_cast<int>(sizeof(v_t))>(m1[j] * pb - m0[j] * pa);
      if constexpr (TB > 0) {
        const t_t ta = gt * T::load(x + e0 + TL), tb = gt * T::load(x + e1 + TL);
        red += hsum<scalar_t, TB>(m1[j] * tb - m0[j] * ta);
      }
      goff[j] = static_cast<scalar_t>(scale * red);
    }
  }
}
#endif

// Strides of the canonical frame for channels-last tensors, in elements (input) or pixels (output / offset).
struct Frame {
  int64_t in_axis;    // input step along the sampling axis
  int64_t in_orth;    // input step along the other axis
  int64_t in_batch;   // input step between images
  int64_t out_ax;     // output pixel step along the sampling axis
  int64_t out_orth;   // output pixel step along the other axis
  int64_t out_batch;  // output pixels per image
  int64_t n_ax;       // output length along the sampling axis
  int64_t n_orth;     // output length along the other axis
};

Frame make_frame(const DSCNParams& p) {
  Frame f;
  f.in_batch = p.H * p.W * p.C;
  f.out_batch = p.Ho * p.Wo;
  f.in_axis = p.on_x ? p.C : p.W * p.C;
  f.in_orth = p.on_x ? p.W * p.C : p.C;
  f.out_ax = p.on_x ? 1 : p.Wo;
  f.out_orth = p.on_x ? p.Wo : 1;
  f.n_ax = p.on_x ? p.Wo : p.Ho;
  f.n_orth = p.on_x ? p.Ho : p.Wo;
  return f;
}

// Calls run(o_axis0, step, oo0, R) for every run of R pixels that are consecutive in the output of task
// (n, orth positions o0..o1): along the axis for an x-strip (pixel r at o_axis0 + r, line oo0), across it for a
// y-strip (pixel r at o_axis0, line oo0 + r). x_len: the x-strip's run length, at most x_run(p) (the table's size).
template <typename Fn>
DSCN_INLINE void for_each_run(const DSCNParams& p, const Frame& f, int64_t o0, int64_t o1, Fn run,
                              int64_t x_len = 0) {
  if (p.on_x) {
    const int64_t run_len = x_len > 0 ? std::min(x_len, x_run(p)) : x_run(p);
    for (int64_t oo = o0; oo < o1; ++oo) {
      for (int64_t oa = 0; oa < f.n_ax; oa += run_len) run(oa, int64_t(1), oo, std::min(run_len, f.n_ax - oa));
    }
  } else {
    for (int64_t oa = 0; oa < f.n_ax; ++oa) run(oa, int64_t(0), o0, o1 - o0);
  }
}

// Runs fn(table, n, o0, o1) over all (image, block of orth positions) tasks, with one tap table per thread (of
// x_pixels pixels for an x-strip, if more than x_run(p)). Each
// orth position maps to one input line (row for x, column for y), distinct for distinct positions, so tasks own
// disjoint input lines.
template <typename scalar_t, typename Fn>
void for_each_task(const DSCNParams& p, const Frame& f, Fn fn, int64_t x_pixels = 0) {
  const int64_t columns = y_columns(p, sizeof(scalar_t));
  const int64_t block = p.on_x ? 1 : std::min(columns, f.n_orth);
  const int64_t blocks_per_image = (f.n_orth + block - 1) / block;
  const int64_t tasks = p.N * blocks_per_image;
  const int64_t work_per_task = std::max<int64_t>(1, block * f.n_ax * p.C * p.geom.taps);
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_task);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    TapTable<scalar_t> table(p, p.on_x ? std::max(x_pixels, x_run(p)) : columns, p.on_x ? 1 : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks_per_image;
      const int64_t o0 = (t % blocks_per_image) * block;
      fn(table, n, o0, std::min(o0 + block, f.n_orth));
    }
  });
}

#ifndef DSCN_Y_OFFSET_AHEAD
#define DSCN_Y_OFFSET_AHEAD 4
#endif
constexpr int64_t kYOffsetAhead = DSCN_Y_OFFSET_AHEAD;
#ifndef DSCN_Y_INPUT_AHEAD
#define DSCN_Y_INPUT_AHEAD 6
#endif
constexpr int64_t kYInputAhead = DSCN_Y_INPUT_AHEAD;

// Software prefetch (for reading) of the cache lines of [p, p + bytes).
DSCN_INLINE void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
}

#if DSCN_X86_DISPATCH
// x-strips of 20-channel groups (DSAN-T/S stage 3) a whole output row at a time, where the row's table fits the
// thread's TapTable: the table is filled once for the row, then for each four groups the blocked line of just those
// groups is built ((W + 1) * 768 bytes: 11.5 KB for W = 14) and every pixel of the row is summed from it while it is
// in L1. The run-by-run path below builds the line of all G groups first (46 KB for DSAN-S stage 3, as much as an L1
// data cache), so most of its tap loads and its stores went to L2. The sums are lerp20_groups' in both paths, so the
// results are the same bit for bit.
template <typename Tab>
DSCN_INLINE void forward_lerp20_rows(const DSCNParams& p, const Frame& f, Tab& tab, const float* input,
                                     const float* offset, float* output, int64_t n, int64_t o0, int64_t o1) {
  const int64_t G = p.group, C = p.C, KK = p.geom.taps, GK = G * KK, R = f.n_ax;
  constexpr int64_t kBlocks = 4;  // blocks per padded pixel of the line: one tap loop's groups
  float* line = tab.lerp_line((p.W + 1) * kBlocks * kBlock20);
  const int64_t line_bytes = f.in_orth * static_cast<int64_t>(sizeof(float));
  const int64_t off_bytes = R * GK * static_cast<int64_t>(sizeof(float));
  const int64_t quads = (G + kBlocks - 1) / kBlocks;
  const int64_t in_share = ((line_bytes + quads - 1) / quads + 63) & ~int64_t(63);
  const int64_t off_share = ((off_bytes + quads - 1) / quads + 63) & ~int64_t(63);
  for (int64_t oo = o0; oo < o1; ++oo) {
    const int64_t pix0 = n * f.out_batch + oo * f.out_orth;
    float* out_row = output + pix0 * C;
    // The next task's row (the next row, or the next image's first) and its offsets are prefetched a share per
    // group of four, as the run-by-run path does a share per pixel.
    const bool last_row = oo + 1 >= f.n_orth;
    const int64_t next_n = last_row ? n + 1 : n;
    const int64_t next_line = (last_row ? 0 : oo + 1) * p.orth_stride - p.orth_pad;
    const char* next_in = next_n < p.N && next_line >= 0 && next_line < p.orth_len
                              ? reinterpret_cast<const char*>(input + next_n * f.in_batch + next_line * f.in_orth)
                              : nullptr;
    const char* next_off = next_n < p.N ? reinterpret_cast<const char*>(offset + (pix0 + f.out_orth) * GK) : nullptr;
    const int64_t row = oo * p.orth_stride - p.orth_pad;
    if (row < 0 || row >= p.orth_len) {  // the strip's line lies in the padding
      std::fill(out_row, out_row + R * C, 0.0f);
      continue;
    }
    tab.fill_lerp(p.geom, 0, R, offset + pix0 * GK, static_cast<float>(p.offset_scale),
                  kBlocks * kBlock20 * static_cast<int64_t>(sizeof(float)));
    const float* xr = input + n * f.in_batch + row * f.in_orth;
    for (int64_t g0 = 0; g0 < G;) {
      const int64_t q = g0 / kBlocks;
      if (next_in != nullptr && q * in_share < line_bytes) {
        prefetch_range(next_in + q * in_share, std::min(in_share, line_bytes - q * in_share));
      }
      if (next_off != nullptr && q * off_share < off_bytes) {
        prefetch_range(next_off + q * off_share, std::min(off_share, off_bytes - q * off_share));
      }
      const auto groups = [&](auto m) DSCN_LAMBDA_INLINE {
        constexpr int M = decltype(m)::value;
        build_lerp20_line(xr + g0 * 20, p.W, M, C, line, kBlocks);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t t0 = r * GK + g0 * KK;
          if (KK == 7) {  // DSAN's stage 3 kernel: the groups' table entries at fixed displacements
            lerp20_groups<M, 7>(line, tab.i0.data() + t0, tab.w1.data() + t0, KK, out_row + r * C + g0 * 20);
          } else {
            lerp20_groups<M>(line, tab.i0.data() + t0, tab.w1.data() + t0, KK, out_row + r * C + g0 * 20);
          }
        }
        g0 += M;
      };
      if (g0 + 4 <= G) {
        groups(std::integral_constant<int, 4>{});
      } else if (g0 + 2 <= G) {
        groups(std::integral_constant<int, 2>{});
      } else {
        groups(std::integral_constant<int, 1>{});
      }
    }
  }
}
#endif

// An x-strip reads its input line at data-dependent positions, which the hardware prefetchers do not follow; at
// batch 32 (17 MB a call for DSAN-T stage 2, far more than L2) the forward waited for them. So each output pixel of
// a row prefetches a slice of the next row's line: 1.2-1.45x faster at batch 32 on the DSAN-T/S x-strips. (The
// y-strip's taps walk down the same few columns, which the hardware follows; prefetching there showed no gain.)
template <int Bytes, typename scalar_t>
DSCN_INLINE void forward_task_body(const DSCNParams& p, const Frame& f, TapTable<scalar_t>& tab, const scalar_t* input,
                                   const scalar_t* offset, scalar_t* output, int64_t n, int64_t o0, int64_t o1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = p.group, gc = p.group_channels, C = p.C, KK = p.geom.taps, GK = G * KK;
  const acc_t scale = static_cast<acc_t>(p.offset_scale);
  // The pair form needs two elements on the line, and its byte offsets (up to (len - 1) * step * element size) must
  // fit the table's index type; otherwise (a line of one pixel, or a float input with 2 GB along a y-strip's column)
  // the general table.
  using idx_t = typename TapTable<scalar_t>::idx_t;
  constexpr int64_t kIdxMax = std::numeric_limits<idx_t>::max();
  const bool pair = p.geom.axis_len >= 2 &&
                    (p.geom.axis_len - 1) * f.in_axis * static_cast<int64_t>(sizeof(scalar_t)) <= kIdxMax;
  // The lerp form, for x-strips on float with AVX-512: each input row is copied once into a line padded with a zero
  // pixel in front, xp[q] = x[q - 1], beside its differences dp[q] = xp[q + 1] - xp[q] (q = 0..W, x[-1] = x[W] = 0),
  // and a tap at loc is xp[q] + l * dp[q] with q = floor(loc) + 1 and l = loc - floor(loc): one table entry, one
  // weight and two loads a tap, no edge cases (x[-1] and x[W] read as the padding's zeros; outside taps read q = 0
  // with l = 0), where the pair form needs two weights. Measured at batch 32 on a 2-core Intel Xeon: DSAN-S
  // stage 1's x-strip 1.1x faster (3.34x the depthwise conv's time -> 2.91-3.03x), DSAN-T stage 2's 1.08x. Rounding
  // differs from the pair form's (1 - l) * x0 + l * x1 in the last bits.
  constexpr bool kLerpISA = Bytes == 64 && std::is_same_v<scalar_t, float> && DSCN_X86_DISPATCH;
  const int64_t lerp_step = (((p.W + 2) * C + 15) / 16) * 16;  // dp - xp, in elements (keeps dp 64-byte aligned)
  // Groups of 20 channels (DSAN-T/S stage 3) take a blocked line instead: per padded pixel q and group, one block of
  // kBlock20 floats holding that group's xp[q] and dp[q] (see lerp20_groups), four groups per tap loop. Measured on
  // a 2-core AMD Zen 4 at batch 32, against the plain line in the same process: DSAN-T stage 3's x-strip 1.12-1.16x
  // faster, DSAN-S stage 3's 1.08-1.10x; the results are bit-identical.
  [[maybe_unused]] bool lerp20 = false;
  int64_t lerp_pixel = C;  // elements per padded pixel of the line
#if DSCN_X86_DISPATCH
  if constexpr (kLerpISA) {
    lerp20 = gc == 20;
    if (lerp20) lerp_pixel = G * kBlock20;
  }
#endif
  // Each thread copies the row (twice its size with the differences), so rows beyond kLerpRowMaxBytes (a few
  // hundred times any DSAN row at detection sizes) take the pair form: a 2 GiB row took 17 s and 8.9 GiB in the lerp
  // form, 3 s and 4.9 GiB in the pair form (one thread).
  const int64_t row_bytes = p.W * lerp_pixel * static_cast<int64_t>(sizeof(scalar_t));
  const int form = kLerpISA && p.on_x && row_bytes <= std::min<int64_t>(kIdxMax, kLerpRowMaxBytes)
                       ? kLerpForm
                       : (pair ? kPairForm : kGeneralForm);
#if DSCN_X86_DISPATCH
  if constexpr (kLerpISA) {
    if (form == kLerpForm && lerp20 && f.n_ax * GK <= static_cast<int64_t>(tab.i0.size())) {
      forward_lerp20_rows(p, f, tab, input, offset, output, n, o0, o1);
      return;
    }
  }
#endif
  scalar_t* lerp_x = nullptr;
  if constexpr (kLerpISA) {
    if (form == kLerpForm) lerp_x = tab.lerp_line(lerp20 ? (p.W + 1) * lerp_pixel : 2 * lerp_step);
  }
  // Calls fn(std::integral_constant<int, form>{}), so that the channel loops are compiled for each form in use.
  const auto with_form = [&](auto fn) DSCN_LAMBDA_INLINE {
    if constexpr (kLerpISA) {
      if (form == kLerpForm) return fn(std::integral_constant<int, kLerpForm>{});
    }
    if (form == kPairForm) return fn(std::integral_constant<int, kPairForm>{});
    return fn(std::integral_constant<int, kGeneralForm>{});
  };
  // x-strip prefetch: each output pixel of a row prefetches one slice (whole cache lines) of the next row's line.
  const int64_t line_bytes = f.in_orth * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t slice = ((line_bytes + f.n_ax - 1) / f.n_ax + 63) & ~int64_t(63);
  const int64_t total_px = p.N * f.out_batch;
  // The blocked 20-channel line is 2.4x the row's bytes (DSAN-S stage 3: 46 KB, about an L1 data cache), so its runs
  // are shorter, to keep their tap table small beside it: at most kLerp20Entries entries rather than kTableEntries
  // (AMD Zen 5, batch 32, same process: DSAN-S stage 3 x-strip 0.95x the time, DSAN-T stage 3 0.96x; 128 entries
  // gained nothing more; for the other x-strips, 256 was 1.0-1.06x slower than 512).
  constexpr int64_t kLerp20Entries = 256;
  const int64_t x_len = form == kLerpForm && lerp20 ? std::max<int64_t>(1, kLerp20Entries / GK) : 0;
  for_each_run(p, f, o0, o1, [&](int64_t oa0, int64_t step, int64_t oo0, int64_t R) DSCN_LAMBDA_INLINE {
    const int64_t pix0 = n * f.out_batch + oa0 * f.out_ax + oo0 * f.out_orth;
    if (form == kLerpForm) {
      if constexpr (kLerpISA) {
      const int64_t line = oo0 * p.orth_stride - p.orth_pad;
      if (oa0 == 0 && line >= 0 && line < p.orth_len) {  // first run of the row: its padded line and differences
        // One pass over the row writes both: dp[i] = xp[i + C] - xp[i] is taken from the row itself (the same
        // values as reading them back from xp, which a second pass did: 4-5 % of DSAN-T stage 1's x-strip).
        const scalar_t* __restrict__ xr = input + n * f.in_batch + line * f.in_orth;
#if DSCN_X86_DISPATCH
        if (lerp20) {  // the blocked line, with the same values: xp[q] = x[q - 1], dp[q] = x[q] - x[q - 1]
          build_lerp20_line(xr, p.W, G, C, lerp_x, G);
        } else
#endif
        {
          scalar_t* __restrict__ xp = lerp_x;
          scalar_t* __restrict__ dp = lerp_x + lerp_step;
          const int64_t row = p.W * C;  // >= C: make_params rejects an empty image
          std::fill(xp, xp + C, scalar_t(0));
          std::fill(xp + row + C, xp + row + 2 * C, scalar_t(0));
          for (int64_t i = 0; i < C; ++i) {
            xp[C + i] = xr[i];
            dp[i] = xr[i];
          }
          for (int64_t i = C; i < row; ++i) {
            xp[C + i] = xr[i];
            dp[i] = xr[i] - xr[i - C];
          }
          for (int64_t i = row; i < row + C; ++i) dp[i] = scalar_t(0) - xr[i - C];  // 0 - x, as before: +0 for x = 0
        }
      }
      tab.fill_lerp(p.geom, oa0, R, offset + pix0 * GK, scale, lerp_pixel * static_cast<int64_t>(sizeof(scalar_t)));
      }
    } else if (form == kPairForm) {
      tab.template fill<Bytes, false>(p.geom, oa0, step, R, offset + pix0 * GK, scale,
                                      f.in_axis * static_cast<int64_t>(sizeof(scalar_t)));
    } else {
      tab.template fill<Bytes, true>(p.geom, oa0, step, R, offset + pix0 * GK, scale);
    }
    // x-strip: the next run's offsets follow this run's in memory; each pixel prefetches a share of them, so that
    // the next fill finds them in cache (at batch 32 the fill was measured waiting on them: a third of the op's time
    // for DSAN-S stage 1, whose 60 offsets a pixel are nearly as many bytes as its 64 channels).
    const int64_t next_px = std::min(R, total_px - (pix0 + R));
    const int64_t off_share = ((next_px * GK * static_cast<int64_t>(sizeof(scalar_t)) + R - 1) / R + 63) & ~int64_t(63);
    const char* off_next = reinterpret_cast<const char*>(offset + (pix0 + R) * GK);
    const int64_t off_next_bytes = next_px * GK * static_cast<int64_t>(sizeof(scalar_t));
    // y-strip: a run's offsets are one short piece of each output row (R columns), a row apart in memory, which the
    // hardware prefetchers did not bring in: the fill waited on them (Zen 4, batch 32, DSAN-S stage 1 y: most of the
    // fill's samples on that load). So each run prefetches those of the run kYOffsetAhead rows further down.
    if (step == 0 && oa0 + kYOffsetAhead < f.n_ax) {
      prefetch_range(offset + (pix0 + kYOffsetAhead * f.out_ax) * GK, R * GK * static_cast<int64_t>(sizeof(scalar_t)));
    }
    // y-strip: a run's last tap reaches (kernel - 1) * dilation rows below its first output row, so the row that
    // the run kYInputAhead rows further down first needs is prefetched now, over this run's R columns. (Measured on
    // Zen 4 at batch 32, same process: DSAN-S stage 1 y 0.62x, stage 2 y 0.82x the time with both prefetches; 4, 10
    // and 16 rows ahead for the input were equal or worse than 6.)
    if (kYInputAhead > 0 && step == 0 && p.orth_stride == 1) {
      const int64_t row =
          (oa0 + kYInputAhead) * p.geom.stride - p.geom.pad + (p.geom.kernel - 1) * p.geom.dilation;
      const int64_t c0 = std::max<int64_t>(0, oo0 - p.orth_pad);
      const int64_t c1 = std::min<int64_t>(p.orth_len, oo0 + R - p.orth_pad);
      if (row >= 0 && row < p.geom.axis_len && c1 > c0) {
        prefetch_range(input + n * f.in_batch + row * f.in_axis + c0 * f.in_orth,
                       (c1 - c0) * C * static_cast<int64_t>(sizeof(scalar_t)));
      }
    }
    bool done = false;  // this pixel was computed with the one before it
    for (int64_t r = 0; r < R; ++r) {
      scalar_t* out_px = output + (pix0 + r) * C;
      const int64_t oo = oo0 + r * (1 - step);
      const int64_t line = oo * p.orth_stride - p.orth_pad;
      if (step == 1 && r * off_share < off_next_bytes) {
        prefetch_range(off_next + r * off_share, std::min(off_share, off_next_bytes - r * off_share));
      }
      if (step == 1) {  // x-strip: a slice of the next output row's line (or of the next image's first line)
        const bool last_row = oo + 1 >= f.n_orth;
        const int64_t next_n = last_row ? n + 1 : n;
        const int64_t next_line = (last_row ? 0 : oo + 1) * p.orth_stride - p.orth_pad;
        const int64_t lo = (oa0 + r) * slice;
        if (next_n < p.N && next_line >= 0 && next_line < p.orth_len && lo < line_bytes) {
          prefetch_range(reinterpret_cast<const char*>(input + next_n * f.in_batch + next_line * f.in_orth) + lo,
                         std::min(slice, line_bytes - lo));
        }
      }
      if (line < 0 || line >= p.orth_len) {  // the strip's line lies in the padding
        std::fill(out_px, out_px + C, scalar_t(0));
        continue;
      }
      // The lerp form reads the row's padded line (lerp_x) and its differences (lerp_step elements on).
      const scalar_t* x = form == kLerpForm ? lerp_x : input + n * f.in_batch + line * f.in_orth;
      const int64_t x_step = form == kLerpForm ? lerp_step : f.in_axis;
      if (std::exchange(done, false)) continue;
      int64_t grp = 0;
#if DSCN_HAS_VEC
      if constexpr (kVectorised<scalar_t>) {
        using V = Vec<scalar_t, Bytes>;
        constexpr int64_t L = V::size;
        // One group of two vectors (G = 1, 17-32 floats on AVX-512: DSAN-T stage 1) has no second group to share its
        // tap loop, so an x-strip takes two pixels a loop instead: they read the same line (x) and their table
        // entries are GK apart. The sums are those of one pixel a loop, operation for operation.
        if (G == 1 && step == 1 && r + 1 < R && gc > L && gc <= 2 * L && !lerp20) {  // lerp20: a blocked line
          with_form([&](auto fm) DSCN_LAMBDA_INLINE {
            const int64_t t0 = r * GK;
            weighted_sum_groups<decltype(fm)::value, 2, 2, V>(x, tab.i0.data() + t0, tab.i1.data() + t0,
                                                              tab.w0.data() + t0, tab.w1.data() + t0, KK, out_px,
                                                              x_step, C, gc - L, GK, 0);
          });
          done = true;
          continue;
        }
        // Groups of one vector four (two, one) at a time; of two vectors (the second may overlap) two at a time.
        const auto groups = [&](auto m, auto nv, auto bytes, auto tail) DSCN_LAMBDA_INLINE {
          constexpr int M = decltype(m)::value, NV = decltype(nv)::value, TB = decltype(tail)::value;
          using W = Vec<scalar_t, decltype(bytes)::value>;
          for (; grp + M <= G; grp += M) {
            const int64_t t0 = r * GK + grp * KK;
            const scalar_t* xg = x + grp * gc;
            with_form([&](auto fm) DSCN_LAMBDA_INLINE {
              weighted_sum_groups<decltype(fm)::value, M, NV, W, TB>(xg, tab.i0.data() + t0, tab.i1.data() + t0,
                                                                     tab.w0.data() + t0, tab.w1.data() + t0, KK,
                                                                     out_px + grp * gc, x_step, gc, gc - W::size);
            });
          }
        };
        using one = std::integral_constant<int, 1>;
        using two = std::integral_constant<int, 2>;
        using full = std::integral_constant<int, Bytes>;
        using none = std::integral_constant<int, 0>;  // no tail vector
#if DSCN_X86_DISPATCH
        if constexpr (kLerpISA) {
          if (form == kLerpForm && lerp20) {  // the blocked line, four (two, one) groups per tap loop
            while (grp < G) {
              const int64_t t0 = r * GK + grp * KK;
              const auto run = [&](auto m) DSCN_LAMBDA_INLINE {
                lerp20_groups<decltype(m)::value>(x + grp * kBlock20, tab.i0.data() + t0, tab.w1.data() + t0, KK,
                                                  out_px + grp * gc);
                grp += decltype(m)::value;
              };
              if (grp + 4 <= G) {
                run(std::integral_constant<int, 4>{});
              } else if (grp + 2 <= G) {
                run(two{});
              } else {
                run(one{});
              }
            }
          }
        }
#endif
        if (gc == L) {
          groups(std::integral_constant<int, 4>{}, one{}, full{}, none{});
          groups(two{}, one{}, full{}, none{});
          groups(one{}, one{}, full{}, none{});
        } else if (Bytes > 16 && (gc / L == 1 || gc / L == 2) &&
                   (gc % L) * static_cast<int64_t>(sizeof(scalar_t)) == 16) {
          // One or two whole vectors and a 16-byte tail: 20 floats (DSAN-T/S stage 3) on AVX-512 (16 + 4) and AVX2
          // (8 + 8 + 4). On AVX-512 that is two loads per neighbour instead of three 32-byte ones, and two FMAs
          // instead of three: 1.05-1.15x faster than the three-vector form below on an Intel Xeon at batch 1 and
          // 32; on AVX2 1.0-1.08x faster than the general loop.
          using t16 = std::integral_constant<int, 16>;
          if (gc / L == 1) {
            groups(two{}, one{}, full{}, t16{});
            groups(one{}, one{}, full{}, t16{});
          } else {
            groups(two{}, two{}, full{}, t16{});
            groups(one{}, two{}, full{}, t16{});
          }
        } else if (Bytes == 64 && gc > L && 2 * gc <= 3 * L) {
          // Other 17-24 floats as three 32-byte vectors. Groups then start off the 64-byte lines, where most 64-byte
          // loads span two cache lines and cost two loads; at most one 32-byte load in four does. For 20 floats
          // (above now) this was 1.1-1.2x faster than two overlapping 64-byte vectors at batch 32 on AMD Zen 4
          // (where a 64-byte load takes two load slots in any case); two groups per loop beat one.
          groups(two{}, std::integral_constant<int, 3>{}, std::integral_constant<int, 32>{}, none{});
          groups(one{}, std::integral_constant<int, 3>{}, std::integral_constant<int, 32>{}, none{});
        } else if (gc > L && gc <= 2 * L) {
          groups(two{}, two{}, full{}, none{});
          groups(one{}, two{}, full{}, none{});
        }
      }
#endif
      for (; grp < G; ++grp) {
        const int64_t t0 = r * GK + grp * KK;
        with_form([&](auto fm) DSCN_LAMBDA_INLINE {
          weighted_sum<Bytes, decltype(fm)::value>(x + grp * gc, tab.i0.data() + t0, tab.i1.data() + t0,
                                                   tab.w0.data() + t0, tab.w1.data() + t0, KK, out_px + grp * gc, gc,
                                                   x_step);
        });
      }
    }
  }, x_len);
}

// grad_input is in the accumulation type (float for half/bfloat16) and zero-initialised by the caller. Either
// gradient may be null: it is then not computed (autograd did not ask for it).
template <int Bytes, typename scalar_t>
DSCN_INLINE void backward_task_body(const DSCNParams& p, const Frame& f, TapTable<scalar_t>& tab,
                                    const scalar_t* grad_out, const scalar_t* input, const scalar_t* offset,
                                    at::opmath_type<scalar_t>* grad_input, scalar_t* grad_offset, int64_t n,
                                    int64_t o0, int64_t o1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = p.group, gc = p.group_channels, C = p.C, KK = p.geom.taps, GK = G * KK;
  const acc_t scale = static_cast<acc_t>(p.offset_scale);
  const bool want_in = grad_input != nullptr, want_off = grad_offset != nullptr;
  for_each_run(p, f, o0, o1, [&](int64_t oa0, int64_t step, int64_t oo0, int64_t R) DSCN_LAMBDA_INLINE {
    const int64_t pix0 = n * f.out_batch + oa0 * f.out_ax + oo0 * f.out_orth;
    tab.template fill<Bytes, true>(p.geom, oa0, step, R, offset + pix0 * GK, scale);
    for (int64_t r = 0; r < R; ++r) {
      scalar_t* goff_px = want_off ? grad_offset + (pix0 + r) * GK : nullptr;
      const int64_t oo = oo0 + r * (1 - step);
      const int64_t line = oo * p.orth_stride - p.orth_pad;
      if (line < 0 || line >= p.orth_len) {
        if (want_off) std::fill(goff_px, goff_px + GK, scalar_t(0));
        continue;
      }
      const int64_t line_off = n * f.in_batch + line * f.in_orth;
      const scalar_t* x = input + line_off;
      acc_t* gin = want_in ? grad_input + line_off : nullptr;
      const scalar_t* g_px = grad_out + (pix0 + r) * C;
#if DSCN_HAS_VEC
      if constexpr (kVectorised<scalar_t>) {
        using V = Vec<scalar_t, Bytes>;
        constexpr int64_t L = V::size;
        // Groups of one or two whole vectors, plus at most one narrower vector: group_backward.
        const int64_t nv = gc / L, tail_bytes = (gc - nv * L) * static_cast<int64_t>(sizeof(scalar_t));
        const bool tail_ok = tail_bytes == 0 || ((tail_bytes == 16 || tail_bytes == 32) && tail_bytes < Bytes);
        if ((nv == 1 || nv == 2) && tail_ok) {
          const auto groups = [&](auto nvc, auto tb, auto in, auto off) DSCN_LAMBDA_INLINE {
            for (int64_t grp = 0; grp < G; ++grp) {
              const int64_t t0 = r * GK + grp * KK;
              group_backward<decltype(nvc)::value, decltype(tb)::value, decltype(in)::value, decltype(off)::value, V>(
                  g_px + grp * gc, x + grp * gc, want_in ? gin + grp * gc : nullptr, tab.i0.data() + t0,
                  tab.i1.data() + t0, tab.w0.data() + t0, tab.w1.data() + t0, tab.m0.data() + t0,
                  tab.m1.data() + t0, KK, f.in_axis, want_off ? goff_px + grp * KK : nullptr, scale);
            }
          };
          const auto by_mask = [&](auto nvc, auto tb) DSCN_LAMBDA_INLINE {
            using yes = std::true_type;
            using no = std::false_type;
            if (want_in && want_off) {
              groups(nvc, tb, yes{}, yes{});
            } else if (want_in) {
              groups(nvc, tb, yes{}, no{});
            } else {
              groups(nvc, tb, no{}, yes{});
            }
          };
          const auto by_tail = [&](auto nvc) DSCN_LAMBDA_INLINE {
            if (tail_bytes == 0) {
              by_mask(nvc, std::integral_constant<int, 0>{});
            } else if constexpr (Bytes > 16) {
              if (tail_bytes == 16) {
                by_mask(nvc, std::integral_constant<int, 16>{});
              } else if constexpr (Bytes > 32) {
                by_mask(nvc, std::integral_constant<int, 32>{});
              }
            }
          };
          if (nv == 1) {
            by_tail(std::integral_constant<int, 1>{});
          } else {
            by_tail(std::integral_constant<int, 2>{});
          }
          continue;
        }
      }
#endif
      for (int64_t i = 0; i < GK; ++i) {
        const int64_t t = r * GK + i;
        const int64_t e0 = static_cast<int64_t>(tab.i0[t]) * f.in_axis + tab.group_base[t];
        const int64_t e1 = static_cast<int64_t>(tab.i1[t]) * f.in_axis + tab.group_base[t];
        const scalar_t* g = g_px + tab.group_base[t];
        const scalar_t* a = x + e0;
        const scalar_t* b = x + e1;
        if (want_in && want_off) {
          goff_px[i] = static_cast<scalar_t>(
              scale * tap_backward<Bytes, true, true>(g, a, b, gin + e0, gin + e1, tab.w0[t], tab.w1[t], tab.m0[t],
                                                      tab.m1[t], gc));
        } else if (want_in) {
          tap_backward<Bytes, true, false>(g, a, b, gin + e0, gin + e1, tab.w0[t], tab.w1[t], tab.m0[t], tab.m1[t],
                                           gc);
        } else {
          goff_px[i] = static_cast<scalar_t>(
              scale * tap_backward<Bytes, false, true>(g, a, b, static_cast<acc_t*>(nullptr),
                                                       static_cast<acc_t*>(nullptr), tab.w0[t], tab.w1[t],
                                                       tab.m0[t], tab.m1[t], gc));
        }
      }
    }
  });
}


// ---- Select path: the outputs the fast forms get wrong ----
//
// The forms above read an unused neighbour and multiply it by a weight of 0 (the general and pair forms), and the lerp
// form samples x[q - 1] + l * (x[q] - x[q - 1]). Both are exact for finite inputs whose neighbour differences do not
// overflow, and wrong otherwise: an Inf or NaN in the input (or in grad_output) reached every tap for which it was an
// unused neighbour (0 * Inf = NaN), where the CUDA kernel and the spec have an unused neighbour contribute nothing,
// and two huge neighbours of opposite sign gave Inf where the sample is finite. Each of those errors leaves a NaN or
// an Inf in what the task wrote, and a finite input never does, so each task checks its own outputs while they are
// still in cache, and recomputes its lines on a non-finite one with the CUDA kernels' arithmetic (the shared
// resolve_tap, each neighbour read only when it is used). That costs one cached pass over the outputs; a task whose
// output is rightly non-finite (an Inf the taps read) is computed twice.

// True when the `count` values at `v` are finite. For float and double on the bits: an exponent of all ones (Inf,
// NaN) plus one carries into the sign bit, and the OR of those sums is one AND, ADD and OR a lane, with no early
// exit, so the loop vectorises at the task's ISA width (a float comparison loop cost twice as much).
template <typename T>
DSCN_INLINE bool all_finite(const T* v, int64_t count) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    using bits_t = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    using alias_t __attribute__((may_alias)) = bits_t;
    constexpr int kMant = sizeof(T) == 4 ? 23 : 52;
    constexpr bits_t kExp = sizeof(T) == 4 ? bits_t(0xFF) << kMant : bits_t(0x7FF) << kMant;
    constexpr bits_t kOne = bits_t(1) << kMant;
    const alias_t* u = reinterpret_cast<const alias_t*>(v);
    bits_t acc = 0;
    for (int64_t i = 0; i < count; ++i) acc |= (u[i] & kExp) + kOne;
    return (acc >> (8 * sizeof(T) - 1)) == 0;
  } else {
    using acc_t = at::opmath_type<T>;
    const acc_t lim = std::numeric_limits<acc_t>::max();
    int bad = 0;
    for (int64_t i = 0; i < count; ++i) {
      const acc_t a = static_cast<acc_t>(v[i]);
      bad |= !((a <= lim) & (a >= -lim));  // NaN fails both
    }
    return bad == 0;
  }
}

// Whether the per-pixel values (`per_pixel` of them) of output lines o0..o1 of image n are all finite.
template <typename T>
DSCN_INLINE bool output_lines_finite(const DSCNParams& p, const Frame& f, const T* data, int64_t n, int64_t o0,
                                     int64_t o1, int64_t per_pixel) {
  for (int64_t oo = o0; oo < o1; ++oo) {
    const int64_t pix0 = n * f.out_batch + oo * f.out_orth;
    if (f.out_ax == 1) {  // x-strip: the line is contiguous
      if (!all_finite(data + pix0 * per_pixel, f.n_ax * per_pixel)) return false;
      continue;
    }
    for (int64_t oa = 0; oa < f.n_ax; ++oa) {
      if (!all_finite(data + (pix0 + oa * f.out_ax) * per_pixel, per_pixel)) return false;
    }
  }
  return true;
}

// Element offset of the input line read by output line `oo` of image n, or -1 for a line in the padding.
DSCN_INLINE int64_t input_line_base(const DSCNParams& p, const Frame& f, int64_t n, int64_t oo) {
  const int64_t line = oo * p.orth_stride - p.orth_pad;
  return line >= 0 && line < p.orth_len ? n * f.in_batch + line * f.in_orth : int64_t(-1);
}

// Whether the input line at `base` (axis_len pixels of C values, in_axis apart) is all finite.
template <typename T>
DSCN_INLINE bool input_line_finite(const DSCNParams& p, const Frame& f, const T* data, int64_t base) {
  if (f.in_axis == p.C) return all_finite(data + base, p.geom.axis_len * p.C);  // contiguous
  for (int64_t i = 0; i < p.geom.axis_len; ++i) {
    if (!all_finite(data + base + i * f.in_axis, p.C)) return false;
  }
  return true;
}

// Output line `oo` of image n with the CUDA kernels' arithmetic.
template <typename scalar_t>
void forward_select_line(const DSCNParams& p, const Frame& f, const scalar_t* input, const scalar_t* offset,
                         scalar_t* output, int64_t n, int64_t oo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = p.group, gc = p.group_channels, C = p.C, KK = p.geom.taps;
  const acc_t scale = static_cast<acc_t>(p.offset_scale);
  const int64_t base = input_line_base(p, f, n, oo);
  std::vector<acc_t> acc(gc);
  for (int64_t oa = 0; oa < f.n_ax; ++oa) {
    const int64_t pix = n * f.out_batch + oa * f.out_ax + oo * f.out_orth;
    scalar_t* out = output + pix * C;
    if (base < 0) {
      std::fill(out, out + C, scalar_t(0));
      continue;
    }
    const acc_t origin = strip_origin<acc_t>(p.geom, oa, scale);
    for (int64_t grp = 0; grp < G; ++grp) {
      const scalar_t* x = input + base + grp * gc;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < KK; ++j) {
        const acc_t tap_pos = static_cast<acc_t>(tap_index(j, p.geom.center) * p.geom.dilation);
        const LinearTap<acc_t> t = resolve_tap<acc_t>(
            tap_location<acc_t>(origin, tap_pos, static_cast<acc_t>(offset[pix * G * KK + grp * KK + j]), scale),
            p.geom.axis_len);
        for (int64_t c = 0; c < gc; ++c) {
          if (t.use0) acc[c] += t.w0 * static_cast<acc_t>(x[t.i0 * f.in_axis + c]);
          if (t.use1) acc[c] += t.w1 * static_cast<acc_t>(x[t.i1 * f.in_axis + c]);
        }
      }
      for (int64_t c = 0; c < gc; ++c) out[grp * gc + c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

// Backward of output line `oo` of image n with the CUDA kernels' arithmetic; its input line's gradient must be zero.
template <typename scalar_t>
void backward_select_line(const DSCNParams& p, const Frame& f, const scalar_t* grad_out, const scalar_t* input,
                          const scalar_t* offset, at::opmath_type<scalar_t>* grad_input, scalar_t* grad_offset,
                          int64_t n, int64_t oo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = p.group, gc = p.group_channels, C = p.C, KK = p.geom.taps;
  const acc_t scale = static_cast<acc_t>(p.offset_scale);
  const int64_t base = input_line_base(p, f, n, oo);
  for (int64_t oa = 0; oa < f.n_ax; ++oa) {
    const int64_t pix = n * f.out_batch + oa * f.out_ax + oo * f.out_orth;
    scalar_t* goff = grad_offset != nullptr ? grad_offset + pix * G * KK : nullptr;
    if (base < 0) {
      if (goff != nullptr) std::fill(goff, goff + G * KK, scalar_t(0));
      continue;
    }
    const acc_t origin = strip_origin<acc_t>(p.geom, oa, scale);
    for (int64_t grp = 0; grp < G; ++grp) {
      const scalar_t* x = input + base + grp * gc;
      const scalar_t* g = grad_out + pix * C + grp * gc;
      for (int64_t j = 0; j < KK; ++j) {
        const acc_t tap_pos = static_cast<acc_t>(tap_index(j, p.geom.center) * p.geom.dilation);
        const LinearTap<acc_t> t = resolve_tap<acc_t>(
            tap_location<acc_t>(origin, tap_pos, static_cast<acc_t>(offset[pix * G * KK + grp * KK + j]), scale),
            p.geom.axis_len);
        if (grad_input != nullptr) {
          acc_t* gx = grad_input + base + grp * gc;
          for (int64_t c = 0; c < gc; ++c) {
            const acc_t gv = static_cast<acc_t>(g[c]);
            if (t.use0) gx[t.i0 * f.in_axis + c] += t.w0 * gv;
            if (t.use1) gx[t.i1 * f.in_axis + c] += t.w1 * gv;
          }
        }
        if (goff != nullptr) {
          // d sample / d loc = x[i1] - x[i0], each term only where that neighbour is read, and 0 for a tap outside
          // the window whatever grad_output holds (as the CUDA kernel).
          acc_t dot = 0;
          for (int64_t c = 0; c < gc && (t.use0 || t.use1); ++c) {
            acc_t d = 0;
            if (t.use1) d += static_cast<acc_t>(x[t.i1 * f.in_axis + c]);
            if (t.use0) d -= static_cast<acc_t>(x[t.i0 * f.in_axis + c]);
            dot += static_cast<acc_t>(g[c]) * d;
          }
          goff[grp * KK + j] = static_cast<scalar_t>(scale * dot);
        }
      }
    }
  }
}

// A task of the fast forms, then the check of what it wrote and, on a non-finite value, its lines again with the
// select path (compiled per ISA with the task, so that the check runs at the vector width of the kernels).
template <int Bytes, typename scalar_t>
DSCN_INLINE void checked_forward_task_body(const DSCNParams& p, const Frame& f, TapTable<scalar_t>& tab,
                                           const scalar_t* input, const scalar_t* offset, scalar_t* output, int64_t n,
                                           int64_t o0, int64_t o1) {
  forward_task_body<Bytes, scalar_t>(p, f, tab, input, offset, output, n, o0, o1);
  if (!output_lines_finite(p, f, output, n, o0, o1, p.C)) {
    for (int64_t oo = o0; oo < o1; ++oo) forward_select_line(p, f, input, offset, output, n, oo);
  }
}

template <int Bytes, typename scalar_t>
DSCN_INLINE void checked_backward_task_body(const DSCNParams& p, const Frame& f, TapTable<scalar_t>& tab,
                                            const scalar_t* grad_out, const scalar_t* input, const scalar_t* offset,
                                            at::opmath_type<scalar_t>* grad_input, scalar_t* grad_offset, int64_t n,
                                            int64_t o0, int64_t o1) {
  backward_task_body<Bytes, scalar_t>(p, f, tab, grad_out, input, offset, grad_input, grad_offset, n, o0, o1);
  bool ok = grad_offset == nullptr || output_lines_finite(p, f, grad_offset, n, o0, o1, p.group * p.geom.taps);
  // The task's input lines, which no other task writes (distinct output lines read distinct input lines).
  for (int64_t oo = o0; oo < o1 && ok && grad_input != nullptr; ++oo) {
    const int64_t base = input_line_base(p, f, n, oo);
    ok = base < 0 || input_line_finite(p, f, grad_input, base);
  }
  if (ok) return;
  for (int64_t oo = o0; oo < o1; ++oo) {
    const int64_t base = input_line_base(p, f, n, oo);
    if (grad_input != nullptr && base >= 0) {
      for (int64_t i = 0; i < p.geom.axis_len; ++i) {
        std::fill(grad_input + base + i * f.in_axis, grad_input + base + i * f.in_axis + p.C, 0);
      }
    }
    backward_select_line(p, f, grad_out, input, offset, grad_input, grad_offset, n, oo);
  }
}

DSCN_DEFINE_ISA_DISPATCH(checked_forward_task)
DSCN_DEFINE_ISA_DISPATCH(checked_backward_task)

template <typename scalar_t>
void forward_impl(const DSCNParams& p, const scalar_t* input, const scalar_t* offset, scalar_t* output) {
  const Frame f = make_frame(p);
  // Tables that hold a whole row for the x-strips of 20-channel groups (see forward_lerp20_rows).
  const bool rows = std::is_same_v<scalar_t, float> && p.on_x && p.group_channels == 20 &&
                    f.n_ax * p.group * p.geom.taps <= kLerp20RowEntries;
  for_each_task<scalar_t>(
      p, f,
      [&](TapTable<scalar_t>& tab, int64_t n, int64_t o0, int64_t o1) {
        checked_forward_task<scalar_t>(p, f, tab, input, offset, output, n, o0, o1);
      },
      rows ? f.n_ax : 0);
}

template <typename scalar_t>
void backward_impl(const DSCNParams& p, const scalar_t* grad_out, const scalar_t* input, const scalar_t* offset,
                   at::opmath_type<scalar_t>* grad_input, scalar_t* grad_offset) {
  const Frame f = make_frame(p);
  for_each_task<scalar_t>(p, f, [&](TapTable<scalar_t>& tab, int64_t n, int64_t o0, int64_t o1) {
    checked_backward_task<scalar_t>(p, f, tab, grad_out, input, offset, grad_input, grad_offset, n, o0, o1);
  });
}

at::Tensor dscn_forward_cpu(const at::Tensor& input_, const at::Tensor& offset_, int64_t kernel_h, int64_t kernel_w,
                            int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                            int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
                            bool remove_center, bool on_x) {
  const DSCNParams p = make_params(input_, offset_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                   dilation_w, group, group_channels, offset_scale, remove_center, on_x);
  TORCH_CHECK(input_.device().is_cpu(), "dscn: input must be a CPU tensor for the CPU kernel; got ",
              input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  at::Tensor output = at::empty({p.N, p.Ho, p.Wo, p.C}, input.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dscn_forward_cpu", [&] {
    forward_impl<scalar_t>(p, input.const_data_ptr<scalar_t>(), offset.const_data_ptr<scalar_t>(),
                           output.mutable_data_ptr<scalar_t>());
  });
  return output;
}

// Returns (grad_input, grad_offset); a gradient whose output_mask entry is false is not computed and comes back as
// an empty tensor. Both are contiguous, as the fake kernel declares.
std::tuple<at::Tensor, at::Tensor> dscn_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& input_,
                                                     const at::Tensor& offset_, int64_t kernel_h, int64_t kernel_w,
                                                     int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                                     int64_t dilation_h, int64_t dilation_w, int64_t group,
                                                     int64_t group_channels, double offset_scale, bool remove_center,
                                                     bool on_x, std::array<bool, 2> output_mask) {
  const DSCNParams p = make_params(input_, offset_, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                   dilation_w, group, group_channels, offset_scale, remove_center, on_x);
  check_grad_output(grad_output_, input_, p);
  TORCH_CHECK(input_.device().is_cpu(), "dscn: input must be a CPU tensor for the CPU kernel; got ",
              input_.device());
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor grad_input = output_mask[0] ? at::zeros(input.sizes(), input.options().dtype(acc_type))
                                         : at::empty({0}, input.options());
  // Every element of grad_offset is written by the kernel (an empty output implies an empty offset).
  at::Tensor grad_offset = at::empty(output_mask[1] ? offset.sizes() : at::IntArrayRef({0}), offset.options());
  if (grad_output.numel() > 0 && (output_mask[0] || output_mask[1])) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dscn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_impl<scalar_t>(p, grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                              offset.const_data_ptr<scalar_t>(),
                              output_mask[0] ? grad_input.mutable_data_ptr<acc_t>() : nullptr,
                              output_mask[1] ? grad_offset.mutable_data_ptr<scalar_t>() : nullptr);
    });
  }
  return {output_mask[0] ? grad_input.to(input.scalar_type()) : grad_input, grad_offset};
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, CPU, m) {
  m.impl("dscn", &dscn_forward_cpu);
  m.impl("_dscn_backward", &dscn_backward_cpu);
}

}  // namespace ops_dscn
