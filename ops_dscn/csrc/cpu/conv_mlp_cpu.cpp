// CPU kernels of ops_dscn::conv_mlp and ops_dscn::_conv_mlp_backward: DSAN's convolutional MLP, fc1 (1x1 conv) ->
// depthwise 3x3 conv -> exact GELU -> fc2 (1x1 conv), optionally plus a residual, in one pass over the image, and
// its gradients in another (see "Backward" below).
//
// Why: the hidden tensor is mlp_ratio (4-8) times wider than the input. Run as four separate operators, each of
// them streams it through memory (fc1 writes it, the depthwise conv reads and writes it, GELU reads and writes it,
// fc2 reads it): at batch 32 that is ~0.6 GB per DSAN-T stage-1 block, and those passes, not the arithmetic, took
// most of the MLP's time. Here each task walks down the rows of one image (or one band of rows) a few rows at a
// time: fc1 fills a small ring of hidden rows (the step's rows plus a one-row halo above and below), the depthwise
// conv and GELU turn them into activations, and fc2 writes the step's output rows. The hidden rows stay in L2.
//
// Layout: input, residual and output are NCHW tensors in channels_last memory (NHWC), so the rows of one step are
// one contiguous (rows * W, C) matrix and the two 1x1 convs are plain matrix products, done by ATen's BLAS (at::mm)
// on views of the task's buffers, or in float32 on AVX-512 by cpu_small_gemm.h's kernel (from 1024 pixels a call, or
// at any size with the weights packed before: fc1_packed / fc2_packed). The depthwise conv and GELU are vector loops
// over channels.
//
// Numerics: the same operations as the unfused module in the same precision; only the summation order (BLAS
// blocking, the 9 taps) and the float erf differ, so results agree with it to float rounding (tests compare both
// with a float64 reference). float64 uses std::erf.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/dscn_params.h"
#include "cpu_gelu.h"
#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "cpu_small_gemm.h"
#include "cpu_weights.h"

namespace ops_dscn {
namespace {

// Hidden rows kept per step are sized so that the ring (step + 2 halo rows) plus the step's activations take about
// this many bytes, which stays in a core's L2 (1-2 MB on current x86 server cores).
constexpr int64_t kStepBytes = 1 << 20;
// Least depth (pixels) of the backward's weight-gradient matrix products (see GradStage).
constexpr int64_t kGradDepth = 512;
// Least pixels (N * H * W) for which the forward runs its products by cpu_small_gemm.h (see make_weights).
constexpr int64_t kPanelMinPixels = 1024;
// Channel chunks (vectors) the depthwise row loops take at a time along a row: dw_row (the conv) and
// dw_weight_grad_row (its weight gradient). See dw_row for why; the fastest of those tried (1, 2 or 4 for the conv, 1,
// 2 or 3 for the weight gradient; DSAN-T stages 1-2, batch 16, 2 threads, AVX-512 and AVX2; 4 / 3 as fast as 4 / 2).
constexpr int kDwChunks = 4;
constexpr int kDwGradChunks = 2;

// An uninitialised array of n elements, for buffers whose elements are all written before they are read (checked by
// running the tests with these buffers filled with NaN).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::make_unique_for_overwrite<T[]>(static_cast<size_t>(n));
}

struct MlpDims {
  int64_t N, H, W, C, Ch, Co;
};

// Weights as the kernel reads them; the 1x1 weights are (C_out, C_in) matrices used transposed by at::mm.
template <typename scalar_t>
struct MlpWeights {
  at::Tensor w1t;               // (C, Ch) view of fc1's weight
  const scalar_t* b1;           // (Ch,) or nullptr
  std::vector<scalar_t> wdw;    // (9, Ch): tap-major, so a tap's weights are contiguous over channels
  std::vector<scalar_t> bdw;    // (Ch,) zeros when there is no bias
  at::Tensor w2t;               // (Ch, Co) view of fc2's weight
  std::vector<scalar_t> b2;     // (Co,) zeros when there is no bias
  // float: the forward's two products by cpu_small_gemm.h, 1.15-1.3x MKL's speed on the DSAN-T MLP shapes (one
  // AMD EPYC Zen 4 core, AVX-512), partly as it does not repack the weight for every step's product as MKL does.
  PanelMatrix<scalar_t> w1p, w2p;
  // float, backward: fc1 with its bias (the recomputed hidden rows), and the input gradients' products g @ W2 and
  // dh @ W1, by the same kernel.
  PanelMatrix<scalar_t> w1pb, w2g, w1g;
};

#if DSCN_HAS_VEC
// dw_row's vector loop for the G channel chunks [c0, c0 + G * L): their taps stay in registers (or the stack) while
// the loop walks along the row, and each column's G chunks are computed together.
template <int Bytes, bool Gelu, int G, typename scalar_t>
DSCN_INLINE void dw_row_chunks(const scalar_t* const (&rows)[3], const scalar_t* wdw, const scalar_t* bdw,
                               scalar_t* out, int64_t W, int64_t Ch, const scalar_t* b1, int64_t c0) {
  using VT = Vec<scalar_t, Bytes>;
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
  V k[9][G];
  for (int t = 0; t < 9; ++t) {
    for (int j = 0; j < G; ++j) k[t][j] = VT::load(wdw + t * Ch + c0 + j * L);
  }
  // Initial values: the conv's bias plus b1 times the taps that read inside the image, per column case.
  V b_mid[G], b_first[G], b_last[G], b_only[G];
  for (int j = 0; j < G; ++j) {
    V side[3] = {};  // b1 * the sum of the column's taps (dx = 0, 1, 2) over the rows inside the image
    if (b1 != nullptr) {
      const V bias = VT::load(b1 + c0 + j * L);
      for (int dy = 0; dy < 3; ++dy) {
        if (rows[dy] == nullptr) continue;
        for (int dx = 0; dx < 3; ++dx) side[dx] += k[dy * 3 + dx][j] * bias;
      }
    }
    const V b = VT::load(bdw + c0 + j * L);
    b_mid[j] = b + (side[0] + side[1] + side[2]);
    b_first[j] = b + (side[1] + side[2]);
    b_last[j] = b + (side[0] + side[1]);
    b_only[j] = b + side[1];
  }
  for (int64_t w = 0; w < W; ++w) {
    const bool left = w > 0, right = w + 1 < W;
    V acc[G];
    for (int j = 0; j < G; ++j) acc[j] = left ? (right ? b_mid[j] : b_last[j]) : (right ? b_first[j] : b_only[j]);
    for (int dy = 0; dy < 3; ++dy) {
      const scalar_t* r = rows[dy];
      if (r == nullptr) continue;
      r += w * Ch + c0;
      for (int j = 0; j < G; ++j) {
        if (left) acc[j] += VT::load(r - Ch + j * L) * k[dy * 3][j];
        acc[j] += VT::load(r + j * L) * k[dy * 3 + 1][j];
        if (right) acc[j] += VT::load(r + Ch + j * L) * k[dy * 3 + 2][j];
      }
    }
    for (int j = 0; j < G; ++j) {
      if constexpr (Gelu) acc[j] = gelu_vec<scalar_t, Bytes>(acc[j]);
      VT::store(out + w * Ch + c0 + j * L, acc[j]);
    }
  }
}
#endif

// Output row r, columns [0, W), of the depthwise 3x3 conv: bias + sum of the 3x3 taps `wdw` ((9, Ch), tap-major)
// over the rows up / mid / down, each (W, Ch); nullptr for a row outside the image, which the conv's zero padding
// makes 0. With Gelu, the exact GELU of that (the forward's activations); without, the conv alone (the backward's
// pre-activations, and with the flipped taps its input gradient).
//
// b1, when not null, is a per-channel value added to every hidden element the taps read: fc1's bias, which the
// forward's fc1 leaves out, as adding it in the matrix product (addmm) is one more pass over the hidden rows (6-7 %
// of the fused MLP at DSAN-T stages 1-2, batch 32). The vector loop adds it as b1 * the sum of the taps inside the
// image, per column case, in the accumulator's initial value: equal to the per-element sum up to float rounding.
//
// The vector loop takes kDwChunks channel chunks at a time along the row. Walking the row one chunk at a time, as it
// did, strides Ch elements from column to column, at DSAN's power-of-two hidden widths 1-4 KiB, so that a column's
// loads share their 4 KiB offset with the stores of the columns just before it (a false store-to-load dependency
// until those retire) and their few cache sets with each other: a standalone loop over one stage-1 row (56 x 256)
// took 2x the time of the grouped one, at 28 x 512 3.5x. In the kernel: the stage-1 / stage-2 backward 37.1 -> 33.8 /
// 36.5 -> 28.1 ms, the forwards 12.8 -> 11.7 / 11.3 -> 10.0 ms (DSAN-T, batch 16, 2 threads, AVX-512).
template <int Bytes, bool Gelu, typename scalar_t>
DSCN_INLINE void dw_row(const scalar_t* up, const scalar_t* mid, const scalar_t* down, const scalar_t* wdw,
                        const scalar_t* bdw, scalar_t* out, int64_t W, int64_t Ch, const scalar_t* b1 = nullptr) {
  const scalar_t* const rows[3] = {up, mid, down};
  int64_t c0 = 0;
#if DSCN_HAS_VEC
  constexpr int64_t L = Vec<scalar_t, Bytes>::size;
  constexpr int G = kDwChunks;
  for (; c0 + G * L <= Ch; c0 += G * L) dw_row_chunks<Bytes, Gelu, G>(rows, wdw, bdw, out, W, Ch, b1, c0);
  for (; c0 + L <= Ch; c0 += L) dw_row_chunks<Bytes, Gelu, 1>(rows, wdw, bdw, out, W, Ch, b1, c0);
#endif
  // Scalar tap sums for the channels the vectors do not cover.
  for (int64_t c = c0; c < Ch; ++c) {
    const scalar_t bias = b1 != nullptr ? b1[c] : scalar_t(0);
    for (int64_t w = 0; w < W; ++w) {
      scalar_t acc = bdw[c];
      for (int dy = 0; dy < 3; ++dy) {
        if (rows[dy] == nullptr) continue;
        for (int dx = 0; dx < 3; ++dx) {
          const int64_t ww = w + dx - 1;
          if (ww < 0 || ww >= W) continue;
          acc += (rows[dy][ww * Ch + c] + bias) * wdw[(dy * 3 + dx) * Ch + c];
        }
      }
      out[w * Ch + c] = Gelu ? gelu_scalar(acc) : acc;
    }
  }
}

// fc1 of the rows [lo, hi) into `out` ((hi - lo) * W, Ch): (rows * W, C) @ (C, Ch), + b1 when with_bias. Rows are
// global, image n's row r being n * H + r: NHWC memory holds the rows of consecutive images one after the other.
template <typename scalar_t>
DSCN_INLINE void fc1_rows(const MlpDims& d, const MlpWeights<scalar_t>& wt, const scalar_t* x, int64_t lo, int64_t hi,
                          scalar_t* out, const at::TensorOptions& opts, bool with_bias = true) {
  if (hi <= lo) return;
  const int64_t m = (hi - lo) * d.W;
  const at::Tensor a = at::from_blob(const_cast<scalar_t*>(x) + lo * d.W * d.C, {m, d.C}, opts);
  at::Tensor h = at::from_blob(out, {m, d.Ch}, opts);
  if (with_bias && wt.b1 != nullptr) {
    at::addmm_out(h, at::from_blob(const_cast<scalar_t*>(wt.b1), {d.Ch}, opts), a, wt.w1t);
  } else {
    at::mm_out(h, a, wt.w1t);
  }
}

// The rows [s0 - halo, s1 + halo) a step of global rows [s0, s1) needs around it, cut at the image edges (the conv's
// zero padding): as many halo rows before s0 as image s0 has, after s1 as image s1 - 1 has.
DSCN_INLINE std::pair<int64_t, int64_t> with_halo(const MlpDims& d, int64_t s0, int64_t s1, int64_t halo) {
  const int64_t first = (s0 / d.H) * d.H, end = ((s1 - 1) / d.H + 1) * d.H;
  return {std::max(s0 - halo, first), std::min(s1 + halo, end)};
}

// The hidden rows of a window that slides down the image (global rows, image n's row r being n * H + r), in a ring
// of `slots` rows: row q lives in slot q % slots, so the rows the next window keeps stay where they are. (Slid
// through a plain buffer, the backward's windows copied their kept halo rows on every step: h's 4 and dp's 2 for
// every 3 new rows at DSAN-T's stages 1-2.) A window holds at most `slots` rows, so a new row never lands on a kept
// one.
template <typename scalar_t>
struct RowRing {
  scalar_t* buf;
  int64_t slots, row_size, lo = 0, hi = 0;

  scalar_t* at(int64_t q) const { return buf + (q % slots) * row_size; }
  // The rows above and below global row q (nullptr at the image's top / bottom edge: the conv's zero padding).
  std::pair<const scalar_t*, const scalar_t*> around(const MlpDims& d, int64_t q) const {
    const int64_t r = q % d.H;
    return {r > 0 ? at(q - 1) : nullptr, r + 1 < d.H ? at(q + 1) : nullptr};
  }
  // Moves the window to [need_lo, need_hi); returns the end of the rows it keeps (need_lo when none), whose values
  // stay valid; the caller computes the rows from there to need_hi.
  int64_t slide(int64_t need_lo, int64_t need_hi) {
    const int64_t have = hi > lo && need_lo >= lo && need_lo < hi ? std::min(hi, need_hi) : need_lo;
    lo = need_lo;
    hi = need_hi;
    return have;
  }
  // fn(first, count, out) for the rows [a, b) in runs of consecutive slots (two where the ring wraps), out pointing
  // at row `first`'s slot.
  template <typename F>
  void runs(int64_t a, int64_t b, F&& fn) const {
    while (a < b) {
      const int64_t n = std::min(b - a, slots - a % slots);
      fn(a, n, at(a));
      a += n;
    }
  }
};

// One task: the output rows [r0, r1) (global rows, within one image), in steps of `step` rows.
template <int Bytes, typename scalar_t>
DSCN_INLINE void mlp_task_body(const MlpDims& d, const MlpWeights<scalar_t>& wt, const scalar_t* x,
                               const scalar_t* residual, scalar_t* y, int64_t r0, int64_t r1, int64_t step,
                               const at::TensorOptions& opts) {
  const int64_t hid_row = d.W * d.Ch;  // elements of one hidden row
  // Not zeroed: every element is written before it is read (zeroing them was ~7 % of the main thread's time in a
  // compiled batch-1 forward: a 1 MB ring a task at stage 1).
  const std::unique_ptr<scalar_t[]> ring_buf = scratch<scalar_t>((step + 2) * hid_row);
  const std::unique_ptr<scalar_t[]> act = scratch<scalar_t>(step * hid_row);
  RowRing<scalar_t> ring{ring_buf.get(), step + 2, hid_row};  // the step's hidden rows and one more on each side
  for (int64_t s0 = r0; s0 < r1; s0 += step) {
    const int64_t s1 = std::min(s0 + step, r1);
    const auto [need_lo, need_hi] = with_halo(d, s0, s1, 1);
    // The halo rows the previous step computed stay in the ring; fc1 computes the others. The ring holds fc1 without
    // its bias, which dw_row adds (the backward's rows keep it: its depthwise weight gradient reads them).
    ring.runs(ring.slide(need_lo, need_hi), need_hi, [&](int64_t first, int64_t n, scalar_t* h) DSCN_LAMBDA_INLINE {
      if (!panel_gemm<Bytes>(x + first * d.W * d.C, d.C, wt.w1p, h, d.Ch, n * d.W)) {
        fc1_rows(d, wt, x, first, first + n, h, opts, /*with_bias=*/false);
      }
    });
    for (int64_t r = s0; r < s1; ++r) {
      const auto [up, down] = ring.around(d, r);
      dw_row<Bytes, true>(up, ring.at(r), down, wt.wdw.data(), wt.bdw.data(), act.get() + (r - s0) * hid_row, d.W,
                          d.Ch, wt.b1);
    }
    // fc2: (rows * W, Ch) @ (Ch, Co), then + b2 (+ residual) in the same, cache-hot, output rows.
    const int64_t m = (s1 - s0) * d.W;
    const int64_t first = s0 * d.W * d.Co;
    if (!panel_gemm<Bytes>(act.get(), d.Ch, wt.w2p, y + first, d.Co, m)) {
      at::Tensor out = at::from_blob(y + first, {m, d.Co}, opts);
      at::mm_out(out, at::from_blob(act.get(), {m, d.Ch}, opts), wt.w2t);
    }
    scalar_t* o = y + first;
    const scalar_t* res = residual != nullptr ? residual + first : nullptr;
    const scalar_t* b2 = wt.b2.data();
    for (int64_t i = 0; i < m; ++i) {
      scalar_t* orow = o + i * d.Co;
      if (res != nullptr) {
        const scalar_t* rrow = res + i * d.Co;
        for (int64_t c = 0; c < d.Co; ++c) orow[c] += b2[c] + rrow[c];
      } else {
        for (int64_t c = 0; c < d.Co; ++c) orow[c] += b2[c];
      }
    }
  }
}

DSCN_DEFINE_ISA_DISPATCH(mlp_task)

// How the images are cut into tasks, each a range of global rows walked `step` rows at a time, where a step keeps
// about `rows_per_step * step + fixed_rows` hidden rows. Each image is one task or, with fewer images than threads,
// `bands` bands of rows (each band recomputes the halo rows at its ends).
struct TaskSplit {
  int64_t tasks, bands, band_h, step;
  // The global rows [r0, r1) of task t: band t % bands of image t / bands (empty for a band past the image's end).
  std::pair<int64_t, int64_t> rows(const MlpDims& d, int64_t t) const {
    const int64_t n = t / bands, r0 = (t % bands) * band_h;
    return {n * d.H + std::min(r0, d.H), n * d.H + std::min(r0 + band_h, d.H)};
  }
};

TaskSplit split_tasks(const MlpDims& d, int64_t elem_bytes, int64_t rows_per_step, int64_t fixed_rows) {
  const int64_t row_bytes = d.W * d.Ch * elem_bytes;
  const int64_t step_cap = std::max<int64_t>(1, (kStepBytes / row_bytes - fixed_rows) / rows_per_step);
  const int64_t threads = at::get_num_threads();
  const int64_t bands = d.N >= threads ? 1 : std::min<int64_t>(d.H, (threads + d.N - 1) / d.N);
  const int64_t band_h = (d.H + bands - 1) / bands;
  return {d.N * bands, bands, band_h, std::min(step_cap, band_h)};
}

// ---------------------------------------------------------------------------------------------------------------
// Backward. Autograd keeps only the MLP's input (not the three wide hidden tensors the unfused layers keep), and the
// backward recomputes the hidden rows a few at a time, as the forward computes them, so that no hidden tensor is
// ever written to memory. With h = fc1(x), p = dwconv(h), a = gelu(p), y = fc2(a) and g = dL/dy, per image row:
//   da = g @ W2, dp = da * gelu'(p), dh = dwconv with the flipped taps (dp), dx = dh @ W1,
//   dW2 += g^T a, dWdw += sum of dp times the shifted h, dW1 += dh^T x (the biases: the sums of g, dp and dh).
// dh of row r needs dp of rows r - 1..r + 1, and those need h of rows r - 2..r + 2: each step of rows [s0, s1)
// slides windows of h ([s0 - 2, s1 + 2)), dp ([s0 - 1, s1 + 1)) and a ([s0, s1 + 1)) down the image, so every row
// of each is computed once per task. A thread accumulates its weight gradients in its own buffer; the buffers are
// summed at the end in thread order (deterministic for a given thread count).

// grad (in place) becomes grad * gelu'(pre) over `count` elements; `act`, when not nullptr, receives gelu(pre).
template <int Bytes, typename scalar_t>
DSCN_INLINE void gelu_backward_row(const scalar_t* pre, scalar_t* grad, scalar_t* act, int64_t count) {
  int64_t i = 0;
#if DSCN_HAS_VEC
  using VT = Vec<scalar_t, Bytes>;
  using V = typename VT::type;
  for (; i + VT::size <= count; i += VT::size) {
    V a, dg;
    gelu_and_grad_vec<scalar_t, Bytes>(VT::load(pre + i), a, dg);
    VT::store(grad + i, VT::load(grad + i) * dg);
    if (act != nullptr) VT::store(act + i, a);
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (i < count) {  // the tail through the vector code: rows split across threads differently give the same bits
      float dg[VT::size];
      gelu_and_grad_partial<Bytes>(pre + i, count - i, act != nullptr ? act + i : nullptr, dg);
      for (int64_t j = 0; i < count; ++i, ++j) grad[i] *= dg[j];
    }
  }
#endif
  for (; i < count; ++i) {
    scalar_t a, dg;
    gelu_and_grad_scalar<scalar_t>(pre[i], a, dg);
    grad[i] *= dg;
    if (act != nullptr) act[i] = a;
  }
}

#if DSCN_HAS_VEC
// dw_weight_grad_row's vector loop for the G channel chunks [c0, c0 + G * L): their 9 tap sums and bias sum stay in
// registers along the row.
template <int Bytes, int G, typename scalar_t>
DSCN_INLINE void dw_weight_grad_chunks(const scalar_t* const (&rows)[3], const scalar_t* dp, scalar_t* gw,
                                       scalar_t* gb, int64_t W, int64_t Ch, int64_t c0) {
  using VT = Vec<scalar_t, Bytes>;
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
  V acc[9][G] = {}, accb[G] = {};
  for (int64_t w = 0; w < W; ++w) {
    V g[G];
    for (int j = 0; j < G; ++j) {
      g[j] = VT::load(dp + w * Ch + c0 + j * L);
      accb[j] += g[j];
    }
    const bool left = w > 0, right = w + 1 < W;
    for (int dy = 0; dy < 3; ++dy) {
      const scalar_t* r = rows[dy];
      if (r == nullptr) continue;
      r += w * Ch + c0;
      for (int j = 0; j < G; ++j) {
        if (left) acc[dy * 3][j] += VT::load(r - Ch + j * L) * g[j];
        acc[dy * 3 + 1][j] += VT::load(r + j * L) * g[j];
        if (right) acc[dy * 3 + 2][j] += VT::load(r + Ch + j * L) * g[j];
      }
    }
  }
  for (int j = 0; j < G; ++j) {
    const int64_t c = c0 + j * L;
    for (int t = 0; t < 9; ++t) VT::store(gw + t * Ch + c, VT::load(gw + t * Ch + c) + acc[t][j]);
    VT::store(gb + c, VT::load(gb + c) + accb[j]);
  }
}
#endif

// Weight gradient of the depthwise conv from one output row: gw[t * Ch + c] += sum over w of dp[w, c] times the
// input at tap t = dy * 3 + dx (rows up / mid / down as in dw_row, columns w + dx - 1), and gb[c] += sum of dp[w, c].
// Channel chunks go kDwGradChunks at a time, for the reason given at dw_row.
template <int Bytes, typename scalar_t>
DSCN_INLINE void dw_weight_grad_row(const scalar_t* up, const scalar_t* mid, const scalar_t* down, const scalar_t* dp,
                                    scalar_t* gw, scalar_t* gb, int64_t W, int64_t Ch) {
  const scalar_t* const rows[3] = {up, mid, down};
  int64_t c0 = 0;
#if DSCN_HAS_VEC
  constexpr int64_t L = Vec<scalar_t, Bytes>::size;
  constexpr int G = kDwGradChunks;
  for (; c0 + G * L <= Ch; c0 += G * L) dw_weight_grad_chunks<Bytes, G>(rows, dp, gw, gb, W, Ch, c0);
  for (; c0 + L <= Ch; c0 += L) dw_weight_grad_chunks<Bytes, 1>(rows, dp, gw, gb, W, Ch, c0);
#endif
  for (int64_t c = c0; c < Ch; ++c) {
    for (int64_t w = 0; w < W; ++w) {
      const scalar_t g = dp[w * Ch + c];
      gb[c] += g;
      for (int dy = 0; dy < 3; ++dy) {
        if (rows[dy] == nullptr) continue;
        for (int dx = 0; dx < 3; ++dx) {
          const int64_t ww = w + dx - 1;
          if (ww >= 0 && ww < W) gw[(dy * 3 + dx) * Ch + c] += rows[dy][ww * Ch + c] * g;
        }
      }
    }
  }
}

// One thread's weight gradients, all in one zeroed buffer: dW1 (Ch, C), db1 (Ch), dWdw (9, Ch) tap-major, dbdw (Ch),
// dW2 (Co, Ch).
template <typename scalar_t>
struct MlpGrads {
  scalar_t *w1, *b1, *wdw, *bdw, *w2;
  static int64_t size(const MlpDims& d) { return d.Ch * d.C + d.Ch + 9 * d.Ch + d.Ch + d.Co * d.Ch; }
  explicit MlpGrads(scalar_t* p, const MlpDims& d)
      : w1(p), b1(w1 + d.Ch * d.C), wdw(b1 + d.Ch), bdw(wdw + 9 * d.Ch), w2(bdw + d.Ch) {}
};

// The weight-gradient products dW1 += dh^T x and dW2 += g^T a are deferred until a thread has `cap` consecutive image
// rows (global index n * H + r) of dh and a staged: one image's rows give those matrix products a depth of only
// H * W (49 at DSAN's last stage), too shallow for the BLAS to beat the memory traffic of the (hidden, C)
// accumulators. The staged rows of x and g are those of the inputs themselves (a thread's tasks are consecutive).
template <typename scalar_t>
struct GradStage {
  std::vector<scalar_t> dh, act;  // (cap * W, Ch) each
  int64_t cap, row0 = 0, count = 0;
};

// Adds the staged rows' products to the thread's weight gradients and empties the stage.
template <int Bytes, typename scalar_t>
DSCN_INLINE void flush_stage(const MlpDims& d, GradStage<scalar_t>& st, const scalar_t* x, const scalar_t* g,
                             const MlpGrads<scalar_t>& gr, const at::TensorOptions& opts) {
  if (st.count == 0) return;
  const int64_t m = st.count * d.W;
  auto mat = [&](const scalar_t* p, int64_t rows, int64_t cols) {
    return at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, opts);
  };
  const at::Tensor dhm = mat(st.dh.data(), m, d.Ch);
  const scalar_t* xs = x + st.row0 * d.W * d.C;
  const scalar_t* gs = g + st.row0 * d.W * d.Co;
  if (!gemm_tn_accumulate<Bytes>(st.dh.data(), d.Ch, xs, d.C, gr.w1, d.C, d.Ch, d.C, m)) {
    mat(gr.w1, d.Ch, d.C).addmm_(dhm.t(), mat(xs, m, d.C));
  }
  if (!gemm_tn_accumulate<Bytes>(gs, d.Co, st.act.data(), d.Ch, gr.w2, d.Ch, d.Co, d.Ch, m)) {
    mat(gr.w2, d.Co, d.Ch).addmm_(mat(gs, m, d.Co).t(), mat(st.act.data(), m, d.Ch));
  }
  mat(gr.b1, 1, d.Ch).add_(dhm.sum(0, /*keepdim=*/true));
  st.count = 0;
}

// One backward task: the input gradient of the global rows [r0, r1) (written to gx) and those rows' share of the
// weight gradients (added to gr, directly or through the stage), in steps of `step` rows. g is the output gradient
// (N, H, W, Co).
template <int Bytes, typename scalar_t>
DSCN_INLINE void mlp_backward_rows(const MlpDims& d, const MlpWeights<scalar_t>& wt, const scalar_t* wflip,
                                   const scalar_t* x, const scalar_t* g, scalar_t* gx, const MlpGrads<scalar_t>& gr,
                                   GradStage<scalar_t>& st, int64_t r0, int64_t r1, int64_t step,
                                   const at::TensorOptions& opts) {
  const int64_t hid_row = d.W * d.Ch;
  auto mat = [&](const scalar_t* p, int64_t rows, int64_t cols) DSCN_LAMBDA_INLINE {
    return at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, opts);
  };
  // Not zeroed (see mlp_task_body). h's window is the step's rows and 2 more on each side, dp's 1 more.
  const std::unique_ptr<scalar_t[]> h_buf = scratch<scalar_t>((step + 4) * hid_row);
  const std::unique_ptr<scalar_t[]> dp_buf = scratch<scalar_t>((step + 2) * hid_row);
  RowRing<scalar_t> h{h_buf.get(), step + 4, hid_row}, dp{dp_buf.get(), step + 2, hid_row};
  // a = gelu(p) of the step's rows goes straight into the weight-gradient stage; only that of the row below the step
  // (computed with its dp, used as the next step's first row) waits here. Copying each step's activations into the
  // stage took 2 % of the stage-1 backward (DSAN-T, batch 16, 2 threads: 38.8 -> 37.9 ms).
  const std::unique_ptr<scalar_t[]> act_next = scratch<scalar_t>(hid_row);
  const std::unique_ptr<scalar_t[]> pre = scratch<scalar_t>(hid_row);
  const std::vector<scalar_t> zeros(d.Ch, scalar_t(0));
  const at::Tensor w1 = wt.w1t.t(), w2 = wt.w2t.t();  // (Ch, C), (Co, Ch)
  for (int64_t s0 = r0; s0 < r1; s0 += step) {
    const int64_t s1 = std::min(s0 + step, r1);
    const auto [hn_lo, hn_hi] = with_halo(d, s0, s1, 2);
    const auto [pn_lo, pn_hi] = with_halo(d, s0, s1, 1);
    h.runs(h.slide(hn_lo, hn_hi), hn_hi, [&](int64_t first, int64_t n, scalar_t* out) DSCN_LAMBDA_INLINE {
      if (!panel_gemm<Bytes>(x + first * d.W * d.C, d.C, wt.w1pb, out, d.Ch, n * d.W)) {
        fc1_rows(d, wt, x, first, first + n, out, opts);
      }
    });
    const int64_t p_have = dp.slide(pn_lo, pn_hi);
    // The step's rows join the stage (flushed first if they do not follow its rows or do not fit).
    if (st.count > 0 && (st.row0 + st.count != s0 || st.count + (s1 - s0) > st.cap)) {
      flush_stage<Bytes>(d, st, x, g, gr, opts);
    }
    if (st.count == 0) st.row0 = s0;
    scalar_t* const stage_act = st.act.data() + st.count * hid_row;  // a of rows [s0, s1)
    // dp kept row s0 exactly when the previous step computed it (as the row below that step), and with it its a.
    if (p_have > s0) std::memcpy(stage_act, act_next.get(), hid_row * sizeof(scalar_t));
    if (p_have < pn_hi) {
      // da = g @ W2 for the missing rows, then dp = da * gelu'(p) in place (and a = gelu(p) for rows >= s0).
      dp.runs(p_have, pn_hi, [&](int64_t first, int64_t n, scalar_t* out) DSCN_LAMBDA_INLINE {
        if (!panel_gemm<Bytes>(g + first * d.W * d.Co, d.Co, wt.w2g, out, d.Ch, n * d.W)) {
          at::Tensor da = mat(out, n * d.W, d.Ch);
          at::mm_out(da, mat(g + first * d.W * d.Co, n * d.W, d.Co), w2);
        }
      });
      for (int64_t q = p_have; q < pn_hi; ++q) {
        const auto [up, down] = h.around(d, q);
        dw_row<Bytes, false>(up, h.at(q), down, wt.wdw.data(), wt.bdw.data(), pre.get(), d.W, d.Ch);
        scalar_t* const a = q < s0 ? nullptr : q < s1 ? stage_act + (q - s0) * hid_row : act_next.get();
        gelu_backward_row<Bytes>(pre.get(), dp.at(q), a, hid_row);
      }
    }
    scalar_t* dh = st.dh.data() + st.count * hid_row;
    st.count += s1 - s0;
    for (int64_t q = s0; q < s1; ++q) {
      const scalar_t* pm = dp.at(q);
      const auto [h_up, h_down] = h.around(d, q);
      const auto [p_up, p_down] = dp.around(d, q);
      dw_weight_grad_row<Bytes>(h_up, h.at(q), h_down, pm, gr.wdw, gr.bdw, d.W, d.Ch);
      dw_row<Bytes, false>(p_up, pm, p_down, wflip, zeros.data(), dh + (q - s0) * hid_row, d.W, d.Ch);
    }
    const int64_t m = (s1 - s0) * d.W;
    if (!panel_gemm<Bytes>(dh, d.Ch, wt.w1g, gx + s0 * d.W * d.C, d.C, m)) {
      at::Tensor gxm = mat(gx + s0 * d.W * d.C, m, d.C);
      at::mm_out(gxm, mat(dh, m, d.Ch), w1);
    }
  }
}

// A thread's share of the backward: tasks [begin, end) of the split `sp`.
template <int Bytes, typename scalar_t>
DSCN_INLINE void mlp_backward_chunk_body(const MlpDims& d, const MlpWeights<scalar_t>& wt, const scalar_t* wflip,
                                         const scalar_t* x, const scalar_t* g, scalar_t* gx,
                                         const MlpGrads<scalar_t>& gr, const TaskSplit& sp, int64_t begin, int64_t end,
                                         const at::TensorOptions& opts) {
  GradStage<scalar_t> st;
  st.cap = std::max(sp.step, (kGradDepth + d.W - 1) / d.W);
  st.dh.resize(st.cap * d.W * d.Ch);
  st.act.resize(st.cap * d.W * d.Ch);
  for (int64_t t = begin; t < end; ++t) {
    const auto [r0, r1] = sp.rows(d, t);
    if (r0 < r1) mlp_backward_rows<Bytes>(d, wt, wflip, x, g, gx, gr, st, r0, r1, sp.step, opts);
  }
  flush_stage<Bytes>(d, st, x, g, gr, opts);
}

DSCN_DEFINE_ISA_DISPATCH(mlp_backward_chunk)

// Checks a 1-D bias of `expected` elements (the message names the argument, the expected and the actual shape).
void check_bias(const std::optional<at::Tensor>& bias, const char* name, int64_t expected, const at::Tensor& input) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == expected, "conv_mlp: ", name, " must have shape (",
                    expected, ",); got ", bias->sizes());
  TORCH_CHECK_VALUE(bias->scalar_type() == input.scalar_type(), "conv_mlp: ", name, " dtype must equal input dtype ",
                    dtype_name(input.scalar_type()), "; got ", dtype_name(bias->scalar_type()));
  TORCH_CHECK_VALUE(bias->device() == input.device(), "conv_mlp: ", name, " must be on the input's device ",
                    input.device(), "; got ", bias->device());
}

void check_weight(const at::Tensor& weight, const char* name, const std::vector<int64_t>& expected,
                  const at::Tensor& input) {
  TORCH_CHECK_VALUE(weight.sizes() == at::IntArrayRef(expected), "conv_mlp: ", name, " must have shape ",
                    at::IntArrayRef(expected), "; got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == input.scalar_type(), "conv_mlp: ", name,
                    " dtype must equal input dtype ", dtype_name(input.scalar_type()), "; got ",
                    dtype_name(weight.scalar_type()));
  TORCH_CHECK_VALUE(weight.device() == input.device(), "conv_mlp: ", name, " must be on the input's device ",
                    input.device(), "; got ", weight.device());
}

// Checks the arguments of a conv_mlp call (the forward's; the backward's grad_output is checked as a residual would
// be, under its own name) and returns the sizes. The Python wrapper (ops_dscn/conv_mlp.py) and the fake kernels run
// the same checks with the same messages.
MlpDims check_mlp_args(const at::Tensor& input, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                       const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                       const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                       const std::optional<at::Tensor>& residual, const char* residual_name) {
  TORCH_CHECK_VALUE(input.dim() == 4, "conv_mlp: input must be 4-D (N, C, H, W); got ", input.dim(),
                    "-D with shape ", input.sizes());
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                    "conv_mlp: input dtype must be one of float32, float64; got ", dtype_name(input.scalar_type()));
  TORCH_CHECK_VALUE(fc1_weight.dim() == 4, "conv_mlp: fc1_weight must be 4-D (hidden, C, 1, 1); got shape ",
                    fc1_weight.sizes());
  TORCH_CHECK_VALUE(fc2_weight.dim() == 4, "conv_mlp: fc2_weight must be 4-D (C_out, hidden, 1, 1); got shape ",
                    fc2_weight.sizes());
  const MlpDims d{input.size(0), input.size(2), input.size(3), input.size(1), fc1_weight.size(0), fc2_weight.size(0)};
  check_weight(fc1_weight, "fc1_weight", {d.Ch, d.C, 1, 1}, input);
  check_weight(dw_weight, "dw_weight", {d.Ch, 1, 3, 3}, input);
  check_weight(fc2_weight, "fc2_weight", {d.Co, d.Ch, 1, 1}, input);
  check_bias(fc1_bias, "fc1_bias", d.Ch, input);
  check_bias(dw_bias, "dw_bias", d.Ch, input);
  check_bias(fc2_bias, "fc2_bias", d.Co, input);
  if (residual.has_value()) {
    const std::vector<int64_t> expected{d.N, d.Co, d.H, d.W};
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef(expected), "conv_mlp: ", residual_name,
                      " must have shape ", at::IntArrayRef(expected), "; got ", residual->sizes());
    TORCH_CHECK_VALUE(residual->scalar_type() == input.scalar_type(), "conv_mlp: ", residual_name,
                      " dtype must equal input dtype ", dtype_name(input.scalar_type()), "; got ",
                      dtype_name(residual->scalar_type()));
    TORCH_CHECK_VALUE(residual->device() == input.device(), "conv_mlp: ", residual_name,
                      " must be on the input's device ", input.device(), "; got ", residual->device());
  }
  TORCH_CHECK(input.device().is_cpu(), "conv_mlp: input must be a CPU tensor for the CPU kernel; got ",
              input.device());
  return d;
}

// The weights as the kernels read them (plain copies / views: no autograd history).
template <typename scalar_t>
MlpWeights<scalar_t> make_weights(const MlpDims& d, const at::Tensor& fc1_weight, const at::Tensor& b1,
                                  const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                                  const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                                  bool backward = false, const std::optional<at::Tensor>& fc1_packed = std::nullopt,
                                  const std::optional<at::Tensor>& fc2_packed = std::nullopt) {
  MlpWeights<scalar_t> wt;
  wt.w1t = fc1_weight.detach().reshape({d.Ch, d.C}).contiguous().t();
  wt.w2t = fc2_weight.detach().reshape({d.Co, d.Ch}).contiguous().t();
  wt.b1 = b1.defined() ? b1.const_data_ptr<scalar_t>() : nullptr;
  tap_major(dw_weight, d.Ch, 9, wt.wdw);
  values_or_zeros(dw_bias, d.Ch, wt.bdw);
  values_or_zeros(fc2_bias, d.Co, wt.b2);
  if constexpr (std::is_same_v<scalar_t, float>) {
    // Weights packed before (ops_dscn::pack_weight; the forward only) are read as they are, at any size.
    if (fc1_packed.has_value() && fc2_packed.has_value()) {
      wt.w1p = PanelMatrix<scalar_t>::view(fc1_packed->const_data_ptr<scalar_t>(), d.Ch, d.C);
      wt.w2p = PanelMatrix<scalar_t>::view(fc2_packed->const_data_ptr<scalar_t>(), d.Co, d.Ch);
      return wt;
    }
    // Otherwise the panels are a copy of both weights, made on one thread: only worth it for enough pixels (at batch
    // 1, 7x7 and 14x14 maps ran 0.6-0.8x as fast with them as with MKL; with the weights packed before, 1.25-1.3x).
    if (d.N * d.H * d.W < kPanelMinPixels) return wt;
    const scalar_t* w1 = wt.w1t.template const_data_ptr<scalar_t>();  // (Ch, C)
    const scalar_t* w2 = wt.w2t.template const_data_ptr<scalar_t>();  // (Co, Ch)
    if (backward) {
      wt.w1pb = PanelMatrix<scalar_t>(w1, wt.b1, d.Ch, d.C);
      wt.w2g = PanelMatrix<scalar_t>(w2, nullptr, d.Ch, d.Co, /*kn=*/true);
      wt.w1g = PanelMatrix<scalar_t>(w1, nullptr, d.C, d.Ch, /*kn=*/true);
    } else {
      wt.w1p = PanelMatrix<scalar_t>(w1, nullptr, d.Ch, d.C);
      wt.w2p = PanelMatrix<scalar_t>(w2, nullptr, d.Co, d.Ch);
    }
  }
  return wt;
}

// Returns (N, Co, H, W) in channels_last memory.
at::Tensor conv_mlp_cpu(const at::Tensor& input_, const at::Tensor& fc1_weight,
                        const std::optional<at::Tensor>& fc1_bias, const at::Tensor& dw_weight,
                        const std::optional<at::Tensor>& dw_bias,
                        const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                        const std::optional<at::Tensor>& residual_, const std::optional<at::Tensor>& fc1_packed,
                        const std::optional<at::Tensor>& fc2_packed) {
  const MlpDims d = check_mlp_args(input_, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, residual_,
                                   "residual");
  TORCH_CHECK_VALUE(fc1_packed.has_value() == fc2_packed.has_value(),
                    "conv_mlp: fc1_packed and fc2_packed must be given together; got only ",
                    fc1_packed.has_value() ? "fc1_packed" : "fc2_packed");
  if (fc1_packed.has_value()) {
    check_packed(*fc1_packed, "conv_mlp", "fc1_packed", d.Ch, d.C, input_);
    check_packed(*fc2_packed, "conv_mlp", "fc2_packed", d.Co, d.Ch, input_);
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor input = input_.contiguous(cl);
  at::Tensor output = at::empty({d.N, d.Co, d.H, d.W}, input.options().memory_format(cl));
  if (output.numel() == 0) return output;
  const at::Tensor residual = residual_.has_value() ? residual_->contiguous(cl) : at::Tensor();
  // Plain (no autograd history) views, so the BLAS calls from the worker threads see ordinary tensors.
  const at::TensorOptions opts = input.options().requires_grad(false);
  const at::Tensor b1 = fc1_bias.has_value() ? fc1_bias->detach().contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_mlp_cpu", [&] {
    const MlpWeights<scalar_t> wt = make_weights<scalar_t>(d, fc1_weight, b1, dw_weight, dw_bias, fc2_weight,
                                                           fc2_bias, false, fc1_packed, fc2_packed);
    // Rows per step: the ring (step + 2 rows) and the activations (step rows) in about kStepBytes.
    const TaskSplit sp = split_tasks(d, sizeof(scalar_t), 2, 2);
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* res = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, sp.tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const auto [r0, r1] = sp.rows(d, t);
        if (r0 < r1) mlp_task<scalar_t>(d, wt, x, res, y, r0, r1, sp.step, opts);
      }
    });
  });
  return output;
}

// Gradients of conv_mlp without its residual (whose gradient is grad_output itself): returns (grad_input,
// grad_fc1_weight, grad_fc1_bias, grad_dw_weight, grad_dw_bias, grad_fc2_weight, grad_fc2_bias), the inputs' shapes
// (the bias gradients always (Ch,) / (Co,), also for a call without biases), grad_input in channels_last memory.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_mlp_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
    const at::Tensor& fc2_weight) {
  const MlpDims d = check_mlp_args(input_, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, std::nullopt,
                                   grad_output_, "grad_output");
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor input = input_.contiguous(cl);
  const at::Tensor grad = grad_output_.contiguous(cl);
  const at::TensorOptions opts = input.options().requires_grad(false);
  // Every row of every image is written by one task.
  at::Tensor grad_input = at::empty({d.N, d.C, d.H, d.W}, input.options().memory_format(cl));
  // Rows per step and the task split come first: they size the slots of weight gradients.
  const TaskSplit sp = split_tasks(d, input.scalar_type() == at::kDouble ? 8 : 4, 3, 7);
  const int64_t slots = parallel_slots_for(sp.tasks);
  // One zeroed buffer of weight gradients per slot of tasks (summed below in slot order): see MlpGrads and
  // cpu_parallel.h.
  at::Tensor partial = at::zeros({slots, MlpGrads<float>::size(d)}, opts);
  if (d.N * d.H * d.W > 0) {
    const at::Tensor b1 = fc1_bias.has_value() ? fc1_bias->detach().contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_mlp_backward_cpu", [&] {
      const MlpWeights<scalar_t> wt = make_weights<scalar_t>(d, fc1_weight, b1, dw_weight, dw_bias, fc2_weight,
                                                             std::nullopt, /*backward=*/true);
      // The depthwise conv's input gradient is the conv of the output gradient with the taps flipped (t -> 8 - t).
      std::vector<scalar_t> wflip(9 * d.Ch);
      for (int t = 0; t < 9; ++t) std::copy_n(wt.wdw.data() + (8 - t) * d.Ch, d.Ch, wflip.data() + t * d.Ch);
      // Hidden rows per step: h (step + 4), dp (step + 2), a (step + 1) and one row of p (dh and the staged a are
      // written once and read by the matrix products).
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      scalar_t* gx = grad_input.mutable_data_ptr<scalar_t>();
      scalar_t* part = partial.mutable_data_ptr<scalar_t>();
      const int64_t part_size = partial.size(1);
      parallel_over_slots(sp.tasks, slots, [&](int64_t slot, int64_t begin, int64_t end) {
        const MlpGrads<scalar_t> gr(part + slot * part_size, d);
        mlp_backward_chunk<scalar_t>(d, wt, wflip.data(), x, g, gx, gr, sp, begin, end, opts);
      });
    });
  }
  const at::Tensor total = partial.sum(0);
  int64_t at_ = 0;
  auto take = [&](std::vector<int64_t> shape) {
    int64_t count = 1;
    for (int64_t s : shape) count *= s;
    at::Tensor t = total.narrow(0, at_, count);
    at_ += count;
    return t.view(shape).clone();  // separate tensors: outputs of an op must not alias each other
  };
  at::Tensor g_w1 = take({d.Ch, d.C}).view({d.Ch, d.C, 1, 1});
  at::Tensor g_b1 = take({d.Ch});
  at::Tensor g_wdw = take({9, d.Ch}).t().contiguous().view({d.Ch, 1, 3, 3});
  at::Tensor g_bdw = take({d.Ch});
  at::Tensor g_w2 = take({d.Co, d.Ch}).view({d.Co, d.Ch, 1, 1});
  at::Tensor g_b2 = grad.sum({0, 2, 3});
  return {grad_input, g_w1, g_b1, g_wdw, g_bdw, g_w2, g_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, CPU, m) {
  m.impl("conv_mlp", &conv_mlp_cpu);
  m.impl("_conv_mlp_backward", &conv_mlp_backward_cpu);
}

}  // namespace ops_dscn
