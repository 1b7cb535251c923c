// Register-blocked matrix product for the narrow products inside the fused CPU kernels: out (m, n) = a (m, k) @
// b (k, n) [+ bias], with n at most four vectors wide (strip_offsets_cpu.cpp: the offset Linear's forward, and its
// input gradient in the backward), or panel by panel for wider n (conv_mlp_cpu.cpp: the MLP's 1x1 convs;
// pointwise_cpu.cpp: 1x1 convs whose weight was packed before, by ops_dscn::pack_weight). gemm_tn_accumulate() adds
// a^T b to an output, for the weight gradients of the fused MLP's and offset branch's backward.
//
// Why not ATen's BLAS: a DSCN layer's offset Linear maps C = 32-64 channels to G * K' = 11-60 offsets, and a fused
// task multiplies blocks of 256 pixels. MKL took 18 us for a (256, 32) @ (32, 11) block on an AMD EPYC (Zen 4) core,
// 10 GFLOPS, which was 45 % of DSAN-T stage 1's offset branch; its packing and blocking are built for larger n. Here
// P rows times NJ vectors of columns stay in registers for the whole depth k: each step loads NJ vectors of b,
// broadcasts one element of each of the P rows of a, and does P * NJ FMAs.
//
// Sum order: bias first, then k = 0, 1, ... for every output element, independent of m, P and the ISA's width (each
// lane is a separate sum), so the results do not depend on how the rows are blocked.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

namespace ops_dscn {

// Row stride of a PaddedMatrix of n columns: n rounded up to whole 64-byte vectors. Three vectors are run as four:
// GCC's code for NJ = 3 was measured slower than MKL (DSAN-T stages 2 and 4, 44 and 40 columns), and NJ = 4 with a
// zero vector 1.1-1.3x faster than MKL.
template <typename scalar_t>
constexpr int64_t padded_ld(int64_t n) {
  constexpr int64_t kLane = 64 / static_cast<int64_t>(sizeof(scalar_t));
  const int64_t ld = (n + kLane - 1) / kLane * kLane;
  return ld == 3 * kLane ? 4 * kLane : ld;
}

// Writes the (k, ld) zero-padded layout of a PaddedMatrix of n columns to dst (k * padded_ld(n) values) from a
// row-major matrix m: kn = false, m is (n, k), the weight of a Linear layer (or 1x1 conv) as PyTorch stores it (the
// product is then x @ m^T); kn = true, m is (k, n) with row stride ldm (a column slice of a wider matrix).
template <typename scalar_t>
void pack_padded(scalar_t* dst, const scalar_t* m, int64_t n, int64_t k, bool kn, int64_t ldm) {
  const int64_t ld = padded_ld<scalar_t>(n);
  std::fill(dst, dst + k * ld, scalar_t(0));
  if (kn) {
    for (int64_t i = 0; i < k; ++i) std::copy_n(m + i * ldm, n, dst + i * ld);
    return;
  }
  // Transposed in tiles of kTile rows of dst, so that each of m's n rows is read a cache line at a time. Read column
  // by column instead, an (n, k) weight whose rows are 4 KB apart (k = 1024: DSAN-T's stage-4 fc2) hit one L1 set n
  // times per row of dst, and packing the stage-4 MLP's weights took 3x the MLP's own time at batch 1.
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < k; i0 += kTile) {
    const int64_t i1 = std::min(k, i0 + kTile);
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* src = m + j * k;
      for (int64_t i = i0; i < i1; ++i) dst[i * ld + j] = src[i];
    }
  }
}

// `b` (k, n) padded with zero columns to `ld` = padded_ld(n), and `bias` (n,) padded likewise (zeros without a
// bias): the layout small_gemm() reads, so that its loads never need a tail. The matrix is either owned (packed from
// a weight here) or a view of memory packed before (see PanelMatrix::view).
template <typename scalar_t>
struct PaddedMatrix {
  int64_t k = 0, n = 0, ld = 0;
  std::vector<scalar_t> b, bias;
  const scalar_t* external = nullptr;  // the (k, ld) values of a view, else nullptr (they are in b)

  PaddedMatrix() = default;
  // From a row-major matrix `m` and an (n,) bias or nullptr (see pack_padded for kn and ldm; ldm 0: n).
  PaddedMatrix(const scalar_t* m, const scalar_t* bias_or_null, int64_t n_, int64_t k_, bool kn = false,
               int64_t ldm = 0)
      : k(k_), n(n_), ld(padded_ld<scalar_t>(n_)) {
    b.resize(k * ld);
    pack_padded(b.data(), m, n, k, kn, ldm == 0 ? n : ldm);
    bias.assign(ld, scalar_t(0));
    if (bias_or_null != nullptr) std::copy_n(bias_or_null, n, bias.begin());
  }
  // A view of k * padded_ld(n) values laid out by pack_padded, without a bias. `packed` must outlive the view.
  static PaddedMatrix view(const scalar_t* packed, int64_t n_, int64_t k_) {
    PaddedMatrix w;
    w.k = k_, w.n = n_, w.ld = padded_ld<scalar_t>(n_);
    w.external = packed;
    w.bias.assign(w.ld, scalar_t(0));
    return w;
  }
  const scalar_t* values() const { return external != nullptr ? external : b.data(); }
};

// A wider matrix as panels of 64 columns (four 64-byte vectors of float), each a PaddedMatrix: for the 1x1 convs of
// the fused MLP (conv_mlp_cpu.cpp) and of pointwise_conv, whose products small_gemm() runs panel by panel.
template <typename scalar_t>
struct PanelMatrix {
  static constexpr int64_t kPanel = 4 * 64 / static_cast<int64_t>(sizeof(scalar_t));
  std::vector<PaddedMatrix<scalar_t>> panels;

  PanelMatrix() = default;
  // From a row-major matrix m and an (n,) bias or nullptr: kn = false, m is the (n, k) weight of a Linear layer (or
  // 1x1 conv), for x @ m^T + bias; kn = true, m is (k, n), for x @ m + bias.
  PanelMatrix(const scalar_t* m, const scalar_t* bias, int64_t n, int64_t k, bool kn = false) {
    for (int64_t c = 0; c < n; c += kPanel) {
      panels.emplace_back(kn ? m + c : m + c * k, bias != nullptr ? bias + c : nullptr, std::min(kPanel, n - c), k,
                          kn, n);
    }
  }

  // Values in the packed form of an (n, k) weight (ops_dscn::pack_weight): its panels' layouts one after the other.
  static int64_t packed_size(int64_t n, int64_t k) {
    int64_t size = 0;
    for (int64_t c = 0; c < n; c += kPanel) size += k * padded_ld<scalar_t>(std::min(kPanel, n - c));
    return size;
  }
  // Writes the packed form of the (n, k) row-major weight m to dst (packed_size(n, k) values).
  static void pack(scalar_t* dst, const scalar_t* m, int64_t n, int64_t k) {
    for (int64_t c = 0; c < n; c += kPanel) {
      const int64_t w = std::min(kPanel, n - c);
      pack_padded(dst, m + c * k, w, k, /*kn=*/false, w);
      dst += k * padded_ld<scalar_t>(w);
    }
  }
  // A view of a packed (n, k) weight, for x @ m^T without a bias. `packed` must outlive the view.
  static PanelMatrix view(const scalar_t* packed, int64_t n, int64_t k) {
    PanelMatrix w;
    for (int64_t c = 0; c < n; c += kPanel) {
      const int64_t width = std::min(kPanel, n - c);
      w.panels.push_back(PaddedMatrix<scalar_t>::view(packed, width, k));
      packed += k * padded_ld<scalar_t>(width);
    }
    return w;
  }
};

#if DSCN_HAS_VEC
// The register-blocked inner loop of both products: acc[p][j] += sum over depth i in [i0, i1) of
// a[p * a_row + i * a_depth] times the j-th vector of b's row i (row stride ldb). Each step loads NJ vectors of b
// and broadcasts one element of a per row.
template <int PP, int NJ, typename VT, typename scalar_t>
DSCN_INLINE void fma_rows(typename VT::type (&acc)[PP][NJ], const scalar_t* a, int64_t a_row, int64_t a_depth,
                          const scalar_t* b, int64_t ldb, int64_t i0, int64_t i1) {
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
  for (int64_t i = i0; i < i1; ++i) {
    V bv[NJ];
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) bv[j] = VT::load(b + i * ldb + j * L);
#pragma GCC unroll 16
    for (int p = 0; p < PP; ++p) {
      const V s = VT::broadcast(a[p * a_row + i * a_depth]);
#pragma GCC unroll 8
      for (int j = 0; j < NJ; ++j) acc[p][j] += s * bv[j];
    }
  }
}

// Rows [0, rows) of the product, P at a time, then one at a time; NJ vectors of columns.
template <int NJ, int P, typename VT, typename scalar_t>
DSCN_INLINE void small_gemm_block(const scalar_t* a, int64_t lda, const PaddedMatrix<scalar_t>& w, scalar_t* out,
                                  int64_t ldo, int64_t rows) {
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
  const int64_t k = w.k, ldb = w.ld, n = w.n;
  const scalar_t* b = w.values();
  V bias[NJ];
#pragma GCC unroll 8
  for (int j = 0; j < NJ; ++j) bias[j] = VT::load(w.bias.data() + j * L);
  // Stores row r's NJ vectors. The columns past n (the padding) are not stored: where the rows are packed in `out`
  // (ldo == n) and a vector's overhang ends within the rows after r, it is stored whole, running into those rows'
  // first columns, which their own stores then overwrite (rows are stored in order); otherwise it goes through a
  // buffer.
  const bool packed = ldo == n;
  const auto store_row = [&](scalar_t* o, const V* acc, int64_t r) DSCN_LAMBDA_INLINE {
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) {
      const int64_t c0 = j * L;
      if (c0 >= n) continue;
      if (c0 + L <= n || (packed && r * n + c0 + L <= rows * n)) {
        VT::store(o + c0, acc[j]);
      } else {
        scalar_t buf[L];
        VT::store(buf, acc[j]);
        std::memcpy(o + c0, buf, static_cast<size_t>(n - c0) * sizeof(scalar_t));
      }
    }
  };
  const auto run = [&](auto p_const, int64_t r0) DSCN_LAMBDA_INLINE {
    constexpr int PP = decltype(p_const)::value;
    V acc[PP][NJ];
#pragma GCC unroll 8
    for (int p = 0; p < PP; ++p) {
#pragma GCC unroll 8
      for (int j = 0; j < NJ; ++j) acc[p][j] = bias[j];
    }
    fma_rows<PP, NJ, VT>(acc, a + r0 * lda, lda, 1, b, ldb, 0, k);
#pragma GCC unroll 8
    for (int p = 0; p < PP; ++p) store_row(out + (r0 + p) * ldo, acc[p], r0 + p);
  };
  int64_t r = 0;
  for (; r + P <= rows; r += P) run(std::integral_constant<int, P>{}, r);
  for (; r < rows; ++r) run(std::integral_constant<int, 1>{}, r);
}

#if DSCN_X86_DISPATCH
// The AVX-512 float blocks as functions of their own. Inlined into a large fused kernel (the MLP's), GCC 12
// allocated the P * NJ accumulators among that kernel's values: with P = 8, NJ = 2 (DSAN-T stage 1's fc2) half of the
// 16 accumulators and most of the 8 row pointers lived on the stack, a load and a store around every other FMA.
template <int NJ, int P>
DSCN_TARGET_AVX512 __attribute__((noinline)) void small_gemm_block_avx512(const float* a, int64_t lda,
                                                                          const PaddedMatrix<float>& w, float* out,
                                                                          int64_t ldo, int64_t rows) {
  small_gemm_block<NJ, P, Vec<float, 64>>(a, lda, w, out, ldo, rows);
}
#endif

// out (rows, NJ vectors), row stride ldo, += a^T b over depth [0, depth): a (depth, rows) with row stride lda, b
// (depth, NJ vectors) with row stride ldb. P output rows at a time (then 2, then 1), their NJ vectors in registers
// for a block of kDepthBlock depth rows: each step loads NJ vectors of b and broadcasts P consecutive elements of a
// row of a. The depth blocks keep b's block in L1 while all the output rows pass over it.
template <int NJ, int P, typename VT, typename scalar_t>
DSCN_INLINE void gemm_tn_block(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, scalar_t* out,
                               int64_t ldo, int64_t rows, int64_t depth) {
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
  constexpr int64_t kDepthBlock = 8192 / (NJ * L);  // 32 KB of b (float)
  const auto run = [&](auto p_const, int64_t r0, int64_t i0, int64_t i1) DSCN_LAMBDA_INLINE {
    constexpr int PP = decltype(p_const)::value;
    V acc[PP][NJ];
#pragma GCC unroll 16
    for (int p = 0; p < PP; ++p) {
#pragma GCC unroll 8
      for (int j = 0; j < NJ; ++j) acc[p][j] = VT::load(out + (r0 + p) * ldo + j * L);
    }
    fma_rows<PP, NJ, VT>(acc, a + r0, 1, lda, b, ldb, i0, i1);
#pragma GCC unroll 16
    for (int p = 0; p < PP; ++p) {
#pragma GCC unroll 8
      for (int j = 0; j < NJ; ++j) VT::store(out + (r0 + p) * ldo + j * L, acc[p][j]);
    }
  };
  for (int64_t i0 = 0; i0 < depth; i0 += kDepthBlock) {
    const int64_t i1 = std::min(depth, i0 + kDepthBlock);
    int64_t r = 0;
    for (; r + P <= rows; r += P) run(std::integral_constant<int, P>{}, r, i0, i1);
    for (; r + 2 <= rows; r += 2) run(std::integral_constant<int, 2>{}, r, i0, i1);
    for (; r < rows; ++r) run(std::integral_constant<int, 1>{}, r, i0, i1);
  }
}

#if DSCN_X86_DISPATCH
template <int NJ, int P>
DSCN_TARGET_AVX512 __attribute__((noinline)) void gemm_tn_block_avx512(const float* a, int64_t lda, const float* b,
                                                                       int64_t ldb, float* out, int64_t ldo,
                                                                       int64_t rows, int64_t depth) {
  gemm_tn_block<NJ, P, Vec<float, 64>>(a, lda, b, ldb, out, ldo, rows, depth);
}
#endif
#endif

// out (m, n), row stride ldo, += a^T b: a (depth, m) with row stride lda, b (depth, n) with row stride ldb - the
// weight gradient of a Linear layer (1x1 conv) from a block of pixel rows, accumulated as each block comes. For
// float on AVX-512 with n a multiple of 16 (columns in panels of 64, then 32, then 16); returns false (and
// computes nothing) otherwise, and the caller uses BLAS. MKL runs these products with AVX2 kernels on AMD CPUs:
// 110-125 GFLOPS on Zen 5 (2 threads) for DSAN-T stage 1's, half of what the AVX-512 FMAs here reach. Sum order:
// the previous value of out, then depth 0, 1, ... (each lane a separate sum).
template <int Bytes, typename scalar_t>
DSCN_INLINE bool gemm_tn_accumulate(const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb, scalar_t* out,
                                    int64_t ldo, int64_t m, int64_t n, int64_t depth) {
#if DSCN_HAS_VEC && DSCN_X86_DISPATCH
  if constexpr (Bytes == 64 && std::is_same_v<scalar_t, float>) {
    constexpr int64_t L = 16;
    if (n % L != 0) return false;
    int64_t c = 0;
    // 24 accumulators (P * NJ) of the 32 vector registers, leaving the NJ vectors of b and the broadcast.
    for (; c + 4 * L <= n; c += 4 * L) gemm_tn_block_avx512<4, 6>(a, lda, b + c, ldb, out + c, ldo, m, depth);
    if (c + 2 * L <= n) {
      gemm_tn_block_avx512<2, 12>(a, lda, b + c, ldb, out + c, ldo, m, depth);
      c += 2 * L;
    }
    if (c < n) gemm_tn_block_avx512<1, 16>(a, lda, b + c, ldb, out + c, ldo, m, depth);
    return true;
  }
#endif
  (void)a, (void)lda, (void)b, (void)ldb, (void)out, (void)ldo, (void)m, (void)n, (void)depth;
  return false;
}

// out (rows, w.n), row stride ldo, = a (rows, w.k), row stride lda, @ w.b + w.bias. Returns false (and computes
// nothing) where w's padded width is more than four vectors of `Bytes` (on AVX-512 more than 64 floats) or there
// are no vectors; the caller then uses BLAS.
template <int Bytes, typename scalar_t>
DSCN_INLINE bool small_gemm(const scalar_t* a, int64_t lda, const PaddedMatrix<scalar_t>& w, scalar_t* out,
                            int64_t ldo, int64_t rows) {
#if DSCN_HAS_VEC
  using VT = Vec<scalar_t, Bytes>;
  constexpr int64_t L = VT::size;
  // Accumulators: P rows * NJ vectors, within the ISA's 32 (AVX-512) or 16 vector registers, leaving room for the
  // NJ vectors of b and the broadcast.
  constexpr int kRegs = Bytes == 64 ? 32 : 16;
  const auto pick = [&](auto nj) DSCN_LAMBDA_INLINE {
    constexpr int NJ = decltype(nj)::value;
    constexpr int P = std::min(8, std::max(1, (kRegs - NJ - 2) / NJ));
#if DSCN_X86_DISPATCH
    if constexpr (Bytes == 64 && std::is_same_v<scalar_t, float>) {
      small_gemm_block_avx512<NJ, P>(a, lda, w, out, ldo, rows);
      return true;
    }
#endif
    small_gemm_block<NJ, P, VT>(a, lda, w, out, ldo, rows);
    return true;
  };
  switch (w.ld / L) {  // 1, 2 or 4 vectors of 64 bytes (see PaddedMatrix), or more narrower ones
    case 1:
      return pick(std::integral_constant<int, 1>{});
    case 2:
      return pick(std::integral_constant<int, 2>{});
    case 4:
      return pick(std::integral_constant<int, 4>{});
    default:
      return false;
  }
#else
  (void)a, (void)lda, (void)w, (void)out, (void)ldo, (void)rows;
  return false;
#endif
}

// out (rows, n), row stride ldo, = a (rows, k), row stride lda, @ w (+ its bias), panel by panel: the panels
// [p0, p1) (p1 < 0: to the last), which write the columns from p0 * kPanel on. Returns false (and computes nothing)
// where small_gemm() does not take the panels (no panels: not float, or too few pixels for the caller to make them;
// or a 64-column panel wider than four vectors of `Bytes`, i.e. below AVX-512).
template <int Bytes, typename scalar_t>
DSCN_INLINE bool panel_gemm(const scalar_t* a, int64_t lda, const PanelMatrix<scalar_t>& w, scalar_t* out,
                            int64_t ldo, int64_t rows, int64_t p0 = 0, int64_t p1 = -1) {
  const int64_t np = static_cast<int64_t>(w.panels.size());
  if (np == 0) return false;
  p1 = p1 < 0 ? np : std::min(p1, np);
  if (p0 >= p1) return true;
  // Only the last panel may be narrower than the first of the range: where small_gemm() takes that, it takes the rest.
  if (!small_gemm<Bytes>(a, lda, w.panels[p0], out + p0 * PanelMatrix<scalar_t>::kPanel, ldo, rows)) return false;
  for (int64_t p = p0 + 1; p < p1; ++p) {
    small_gemm<Bytes>(a, lda, w.panels[p], out + p * PanelMatrix<scalar_t>::kPanel, ldo, rows);
  }
  return true;
}

}  // namespace ops_dscn
