// CPU kernels of ops_dscn::strip_offsets and ops_dscn::_strip_offsets_backward: the offset branch of a DSCN layer
// (DSCNX / DSCNY) in one pass: depthwise 1xK (x-strip) or Kx1 (y-strip) conv with zero 'same' padding -> LayerNorm
// over channels -> exact GELU -> Linear(C -> G * K').
//
// Why: run as separate operators, the branch makes four passes over a (N, H, W, C) tensor for an output of only
// G * K' values per pixel, and the LayerNorm over few (32-64) channels costs more in its own pass than the
// arithmetic does; in training autograd also keeps three (N, H, W, C) tensors and makes as many passes again
// backwards. Here a task takes a block of pixels: per pixel, the conv, the norm and GELU are vector loops over its
// channels held in L1; the block's (pixels, C) activations then go through the Linear as one matrix product
// straight into the output (float: cpu_small_gemm.h's register-blocked product where G * K' is at most 64, as for
// every DSAN-T stage and DSAN-S stage 1; otherwise ATen's BLAS). The backward recomputes a block's activations from
// the input (the forward keeps nothing else), takes the offsets' gradient back through the Linear, GELU and the
// LayerNorm in the same block, and writes the gradient of the conv's output, from which the conv's gradients are
// one depthwise conv (input) and ops_dscn::_dw_conv_weight_grad (weight) in ops_dscn/strip_offsets.py.
//
// Layout: the input is an NCHW tensor in channels_last memory (NHWC), the output (N, H, W, G * K') contiguous, as
// the layer-by-layer branch produces it. Numerics: the same operations in the same precision (LayerNorm: mean, then
// the mean of squared deviations); summation order and the float erf differ, to float rounding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/dscn_params.h"
#include "cpu_gelu.h"
#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "cpu_small_gemm.h"
#include "cpu_weights.h"

namespace ops_dscn {
namespace {

// Pixels per task: enough rows for the Linear's matrix product to be efficient, few enough that the block's
// activations (pixels * C values) stay in L1/L2.
constexpr int64_t kBlockPixels = 256;

struct OffsetDims {
  int64_t N, H, W, C, K, GK;
  bool on_x;
};

template <typename scalar_t>
struct OffsetWeights {
  std::vector<scalar_t> wdw;  // (K, C): tap-major
  std::vector<scalar_t> bdw;  // (C,), zeros without a bias
  at::Tensor ln_w_t, ln_b_t, lin_b_t;  // contiguous owners of the pointers below
  const scalar_t* ln_w;       // (C,)
  const scalar_t* ln_b;       // (C,)
  double eps;
  at::Tensor lin_w;           // (GK, C), the Linear's weight
  at::Tensor lin_wt;          // (C, GK) view of it
  const scalar_t* lin_b;      // (GK,) or nullptr
  // float: the Linear as small_gemm() reads it, padded: for the forward its transposed weight and bias, for the
  // backward its weight (the input gradient is g @ W). float64 keeps BLAS.
  PaddedMatrix<scalar_t> lin_pad;

  OffsetWeights(const OffsetDims& d, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps_,
                const at::Tensor& lin_weight, const std::optional<at::Tensor>& lin_bias, bool backward = false)
      : eps(eps_) {
    tap_major(dw_weight, d.C, d.K, wdw);
    values_or_zeros(dw_bias, d.C, bdw);
    ln_w_t = ln_weight.detach().contiguous();
    ln_b_t = ln_bias.detach().contiguous();
    ln_w = ln_w_t.const_data_ptr<scalar_t>();
    ln_b = ln_b_t.const_data_ptr<scalar_t>();
    lin_w = lin_weight.detach().contiguous();
    lin_wt = lin_w.t();
    lin_b_t = lin_bias.has_value() ? lin_bias->detach().contiguous() : at::Tensor();
    lin_b = lin_b_t.defined() ? lin_b_t.const_data_ptr<scalar_t>() : nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      lin_pad = backward ? PaddedMatrix<scalar_t>(lin_w.const_data_ptr<scalar_t>(), nullptr, d.C, d.GK, true)
                         : PaddedMatrix<scalar_t>(lin_w.const_data_ptr<scalar_t>(), lin_b, d.GK, d.C);
    }
  }
};

// Tasks of equal blocks of pixels, at most kBlockPixels each, their count a multiple of the thread count: in
// 256-pixel blocks one image of DSAN's 14x14 or 7x7 stages was one block, which left the other threads idle at
// batch 1 (and a 28x28 image four blocks, the last of 16 pixels).
struct PixelBlocks {
  int64_t pixels, block, count;
  PixelBlocks(int64_t pixels_, int64_t max_block) : pixels(pixels_) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t rounds = (pixels + threads * max_block - 1) / (threads * max_block);
    block = std::max<int64_t>(1, (pixels + threads * rounds - 1) / (threads * rounds));
    count = (pixels + block - 1) / block;
  }
  int64_t begin(int64_t b) const { return b * block; }
  int64_t end(int64_t b) const { return std::min(pixels, (b + 1) * block); }
};

#if DSCN_HAS_VEC
// NV vectors of channels [c0, c0 + NV * L) of one pixel's depthwise conv (taps [t0, t1)) into d; adds them to vsum.
// Each vector has two accumulators, for even and odd taps: one chain of K dependent FMAs per vector (a pixel of
// DSAN-T stage 1 is two vectors, K = 11) was latency-bound.
template <int NV, typename VT, typename scalar_t>
DSCN_INLINE void conv_vectors(const scalar_t* centre, const scalar_t* wdw, const scalar_t* bdw, int64_t C,
                              int64_t step, int64_t pad, int64_t t0, int64_t t1, int64_t c0, scalar_t* d,
                              typename VT::type& vsum) {
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
  V a[NV], b[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    a[v] = VT::load(bdw + c0 + v * L);
    b[v] = V{};
  }
  const auto tap = [&](V* acc, int64_t t) DSCN_LAMBDA_INLINE {
    const scalar_t* xt = centre + (t - pad) * step + c0;
    const scalar_t* wt = wdw + t * C + c0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[v] += VT::load(xt + v * L) * VT::load(wt + v * L);
  };
  int64_t t = t0;
  for (; t + 2 <= t1; t += 2) {
    tap(a, t);
    tap(b, t + 1);
  }
  if (t < t1) tap(a, t);
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const V r = a[v] + b[v];
    VT::store(d + c0 + v * L, r);
    vsum += r;
  }
}
#endif

// The depthwise conv of pixel p (flattened (n, h, w)) into d (C values); returns its LayerNorm mean. Shared by the
// forward and the backward (which recomputes it), so both see the same values.
template <int Bytes, typename scalar_t>
DSCN_INLINE scalar_t conv_and_mean(const OffsetDims& dims, const OffsetWeights<scalar_t>& wt, const scalar_t* x,
                                   int64_t p, scalar_t* d) {
  using acc_t = scalar_t;
  const int64_t C = dims.C, pad = (dims.K - 1) / 2;
  const scalar_t* wdw = wt.wdw.data();
  const scalar_t* bdw = wt.bdw.data();
  // Taps read along W (x-strip) or H (y-strip): the element stride of one step along that axis.
  const int64_t axis_len = dims.on_x ? dims.W : dims.H;
  const int64_t step = dims.on_x ? C : dims.W * C;
  const int64_t w = p % dims.W, h = (p / dims.W) % dims.H;
  const int64_t pos = dims.on_x ? w : h;
  // Valid taps t in [t0, t1): the neighbour pos + t - pad lies inside the axis.
  const int64_t t0 = std::max<int64_t>(0, pad - pos), t1 = std::min<int64_t>(dims.K, axis_len + pad - pos);
  const scalar_t* centre = x + p * C;
  int64_t c0 = 0;
  acc_t sum = 0;
#if DSCN_HAS_VEC
  using VT = Vec<scalar_t, Bytes>;
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
  V vsum = V{};
  for (; c0 + 4 * L <= C; c0 += 4 * L) conv_vectors<4, VT>(centre, wdw, bdw, C, step, pad, t0, t1, c0, d, vsum);
  const int64_t rest = (C - c0) / L;
  if (rest == 3) {
    conv_vectors<3, VT>(centre, wdw, bdw, C, step, pad, t0, t1, c0, d, vsum);
  } else if (rest == 2) {
    conv_vectors<2, VT>(centre, wdw, bdw, C, step, pad, t0, t1, c0, d, vsum);
  } else if (rest == 1) {
    conv_vectors<1, VT>(centre, wdw, bdw, C, step, pad, t0, t1, c0, d, vsum);
  }
  c0 += rest * L;
  sum += hsum<scalar_t, Bytes>(vsum);  // a tree: lane by lane was a chain of L dependent adds per pixel
#endif
  for (int64_t c = c0; c < C; ++c) {
    acc_t acc = bdw[c];
    for (int64_t t = t0; t < t1; ++t) acc += centre[(t - pad) * step + c] * wdw[t * C + c];
    d[c] = acc;
    sum += acc;
  }
  return sum / static_cast<acc_t>(C);
}

// 1 / std of the LayerNorm over the C values d with their mean: the mean of the squared deviations, + eps.
template <int Bytes, typename scalar_t>
DSCN_INLINE scalar_t layer_norm_rstd(const scalar_t* d, scalar_t mean, int64_t C, double eps) {
  using acc_t = scalar_t;
  acc_t sq = 0;
  int64_t c0 = 0;
#if DSCN_HAS_VEC
  using VT = Vec<scalar_t, Bytes>;
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
  {
    V vsq = V{};
    for (; c0 + L <= C; c0 += L) {
      const V dev = VT::load(d + c0) - mean;
      vsq += dev * dev;
    }
    sq += hsum<scalar_t, Bytes>(vsq);
  }
#endif
  for (int64_t c = c0; c < C; ++c) sq += (d[c] - mean) * (d[c] - mean);
  return static_cast<acc_t>(1) / std::sqrt(sq / static_cast<acc_t>(C) + static_cast<acc_t>(eps));
}

// The conv of the pixels [p0, p1) into d ((p1 - p0, C)) and their LayerNorm (mean, 1 / std) into stats ((p1 - p0, 2)),
// in two passes: per pixel the statistics are a chain of dependent steps (the conv, a channel sum, the squared
// deviations, another sum, a square root and a division), and with the pixels' conv and mean first, the second
// pass's iterations are short and independent, so the core overlaps them.
template <int Bytes, typename scalar_t>
DSCN_INLINE void conv_and_stats(const OffsetDims& dims, const OffsetWeights<scalar_t>& wt, const scalar_t* x,
                                int64_t p0, int64_t p1, scalar_t* d, scalar_t* stats) {
  const int64_t C = dims.C;
  for (int64_t p = p0; p < p1; ++p) stats[2 * (p - p0)] = conv_and_mean<Bytes>(dims, wt, x, p, d + (p - p0) * C);
  for (int64_t i = 0; i < p1 - p0; ++i) {
    stats[2 * i + 1] = layer_norm_rstd<Bytes>(d + i * C, stats[2 * i], C, wt.eps);
  }
}

// Output pixels [p0, p1) (flattened (n, h, w)): their activations into `act` ((p1 - p0, C)), then the Linear.
// `stats`: scratch for the pixels' (mean, 1 / std).
template <int Bytes, typename scalar_t>
DSCN_INLINE void offsets_task_body(const OffsetDims& d, const OffsetWeights<scalar_t>& wt, const scalar_t* x,
                                   scalar_t* out, int64_t p0, int64_t p1, scalar_t* act, scalar_t* stats,
                                   const at::TensorOptions& opts) {
  const int64_t C = d.C;
  // Passes over the block: the conv and the statistics of every pixel (conv_and_stats: two), then the norm and GELU
  // of every pixel. In one pass, each pixel's chain of dependent steps (conv, two reductions, sqrt and division, then
  // GELU's division) left the core waiting; the later passes have no dependencies between pixels, and the first a
  // shorter body, so more pixels overlap (DSAN-T stage 1 at batch 32: 1.1-1.3x faster with two passes; the
  // statistics in two, b16: stage-1 forward 1.56 -> 1.35 ms, backward 3.05 -> 2.81 ms, medians of 4 rounds).
  conv_and_stats<Bytes>(d, wt, x, p0, p1, act, stats);
  for (int64_t p = p0; p < p1; ++p) {
    scalar_t* a = act + (p - p0) * C;
    const scalar_t mean = stats[2 * (p - p0)], rstd = stats[2 * (p - p0) + 1];
    int64_t c0 = 0;
#if DSCN_HAS_VEC
    using VT = Vec<scalar_t, Bytes>;
    using V = typename VT::type;
    for (; c0 + VT::size <= C; c0 += VT::size) {
      const V v = (VT::load(a + c0) - mean) * rstd * VT::load(wt.ln_w + c0) + VT::load(wt.ln_b + c0);
      VT::store(a + c0, gelu_vec<scalar_t, Bytes>(v));
    }
#endif
    for (int64_t c = c0; c < C; ++c) a[c] = gelu_scalar<scalar_t>((a[c] - mean) * rstd * wt.ln_w[c] + wt.ln_b[c]);
  }
  const int64_t m = p1 - p0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (small_gemm<Bytes>(act, C, wt.lin_pad, out + p0 * d.GK, d.GK, m)) return;
  }
  at::Tensor o = at::from_blob(out + p0 * d.GK, {m, d.GK}, opts);
  const at::Tensor av = at::from_blob(act, {m, C}, opts);
  at::mm_out(o, av, wt.lin_wt);
  // The bias is added here, to the block's rows while they are in cache: addmm_out would broadcast it into the
  // output through a TensorIterator copy first, whose fixed cost per call was 3 % of a DSAN-T forward at batch 32.
  if (wt.lin_b != nullptr) {
    scalar_t* rows = out + p0 * d.GK;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < d.GK; ++j) rows[i * d.GK + j] += wt.lin_b[j];
    }
  }
}

DSCN_DEFINE_ISA_DISPATCH(offsets_task)

// One thread's parameter gradients, in one zeroed buffer: the Linear's weight (GK, C) and bias (GK), the
// LayerNorm's weight (C) and bias (C).
template <typename scalar_t>
struct OffsetGrads {
  scalar_t* lin_w;
  scalar_t* lin_b;
  scalar_t* ln_w;
  scalar_t* ln_b;
  static int64_t size(const OffsetDims& d) { return d.GK * d.C + d.GK + 2 * d.C; }
  OffsetGrads(scalar_t* base, const OffsetDims& d)
      : lin_w(base), lin_b(base + d.GK * d.C), ln_w(lin_b + d.GK), ln_b(ln_w + d.C) {}
};

// A backward task's scratch, for a block of pixels: (block, C) rows of the normalised conv output, the activations,
// the GELU derivatives and the activations' gradient; per pixel the LayerNorm's (mean, 1 / std) and the two means
// of its gradient, (mean(dn), mean(dn * n)) (see offsets_backward_task_body); the block's LayerNorm and Linear bias
// gradients.
template <typename scalar_t>
struct OffsetScratch {
  std::vector<scalar_t> nrm, act, dgelu, grad, stats, dn_means, ln_w, ln_b, lin_b;
  OffsetScratch(int64_t block, const OffsetDims& d)
      : nrm(block * d.C), act(block * d.C), dgelu(block * d.C), grad(block * d.C), stats(2 * block),
        dn_means(2 * block), ln_w(d.C), ln_b(d.C), lin_b(d.GK) {}
};

// Backward of output pixels [p0, p1): recomputes their conv, LayerNorm and GELU, then takes the gradient g of the
// offsets back through the Linear (one matrix product for the block, one for the weight gradient), GELU and the
// LayerNorm, into gd ((N, H, W, C): the gradient of the conv's output). The parameter gradients are summed per block,
// then added to the thread's buffer `gr`, which keeps float sums over few terms.
template <int Bytes, typename scalar_t>
DSCN_INLINE void offsets_backward_task_body(const OffsetDims& d, const OffsetWeights<scalar_t>& wt,
                                            const scalar_t* x, const scalar_t* g, scalar_t* gd, int64_t p0,
                                            int64_t p1, OffsetScratch<scalar_t>& s, const OffsetGrads<scalar_t>& gr,
                                            const at::TensorOptions& opts) {
  const int64_t C = d.C, m = p1 - p0;
#if DSCN_HAS_VEC
  using VT = Vec<scalar_t, Bytes>;
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
#endif
  // The forward again: n = (conv - mean) / std, z = n * ln_w + ln_b, act = gelu(z), and gelu'(z); in two passes
  // over the block, as the forward (offsets_task_body) does, so that pixels overlap.
  conv_and_stats<Bytes>(d, wt, x, p0, p1, s.nrm.data(), s.stats.data());
  for (int64_t i = 0; i < m; ++i) {
    scalar_t* nr = s.nrm.data() + i * C;
    scalar_t* a = s.act.data() + i * C;
    scalar_t* dg = s.dgelu.data() + i * C;
    const scalar_t mean = s.stats[2 * i], rstd = s.stats[2 * i + 1];
    int64_t c0 = 0;
#if DSCN_HAS_VEC
    for (; c0 + L <= C; c0 += L) {
      const V n = (VT::load(nr + c0) - mean) * rstd;
      V act, grad;
      gelu_and_grad_vec<scalar_t, Bytes>(n * VT::load(wt.ln_w + c0) + VT::load(wt.ln_b + c0), act, grad);
      VT::store(nr + c0, n);
      VT::store(a + c0, act);
      VT::store(dg + c0, grad);
    }
#endif
    for (int64_t c = c0; c < C; ++c) {
      nr[c] = (nr[c] - mean) * rstd;
      gelu_and_grad_scalar<scalar_t>(nr[c] * wt.ln_w[c] + wt.ln_b[c], a[c], dg[c]);
    }
  }
  // The Linear: d act = g W, d W += g^T act, d b += the column sums of g.
  const scalar_t* gb = g + p0 * d.GK;
  const at::Tensor gm = at::from_blob(const_cast<scalar_t*>(gb), {m, d.GK}, opts);
  bool done = false;
  if constexpr (std::is_same_v<scalar_t, float>) done = small_gemm<Bytes>(gb, d.GK, wt.lin_pad, s.grad.data(), C, m);
  if (!done) {
    at::Tensor ga = at::from_blob(s.grad.data(), {m, C}, opts);
    at::mm_out(ga, gm, wt.lin_w);
  }
  if (!gemm_tn_accumulate<Bytes>(gb, d.GK, s.act.data(), C, gr.lin_w, C, d.GK, C, m)) {
    at::from_blob(gr.lin_w, {d.GK, C}, opts).addmm_(gm.t(), at::from_blob(s.act.data(), {m, C}, opts));
  }
  std::fill(s.lin_b.begin(), s.lin_b.end(), scalar_t(0));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < d.GK; ++j) s.lin_b[j] += gb[i * d.GK + j];
  }
  for (int64_t j = 0; j < d.GK; ++j) gr.lin_b[j] += s.lin_b[j];
  // GELU and LayerNorm: with dn = dz * ln_w, d conv = (dn - mean(dn) - n * mean(dn * n)) / std. Two passes again:
  // each pixel's output waits for its two channel sums, which in one pass left the core idle.
  std::fill(s.ln_w.begin(), s.ln_w.end(), scalar_t(0));
  std::fill(s.ln_b.begin(), s.ln_b.end(), scalar_t(0));
  const scalar_t inv_c = static_cast<scalar_t>(1) / static_cast<scalar_t>(C);
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* nr = s.nrm.data() + i * C;
    const scalar_t* dg = s.dgelu.data() + i * C;
    scalar_t* dn = s.grad.data() + i * C;  // d act in, d n out
    scalar_t s1 = 0, s2 = 0;
    int64_t c0 = 0;
#if DSCN_HAS_VEC
    {
      V v1 = V{}, v2 = V{};
      for (; c0 + L <= C; c0 += L) {
        const V dz = VT::load(dn + c0) * VT::load(dg + c0);
        const V n = VT::load(nr + c0);
        VT::store(s.ln_w.data() + c0, VT::load(s.ln_w.data() + c0) + dz * n);
        VT::store(s.ln_b.data() + c0, VT::load(s.ln_b.data() + c0) + dz);
        const V dnv = dz * VT::load(wt.ln_w + c0);
        VT::store(dn + c0, dnv);
        v1 += dnv;
        v2 += dnv * n;
      }
      s1 += hsum<scalar_t, Bytes>(v1);
      s2 += hsum<scalar_t, Bytes>(v2);
    }
#endif
    for (int64_t c = c0; c < C; ++c) {
      const scalar_t dz = dn[c] * dg[c];
      s.ln_w[c] += dz * nr[c];
      s.ln_b[c] += dz;
      dn[c] = dz * wt.ln_w[c];
      s1 += dn[c];
      s2 += dn[c] * nr[c];
    }
    s.dn_means[2 * i] = s1 * inv_c;
    s.dn_means[2 * i + 1] = s2 * inv_c;
  }
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* nr = s.nrm.data() + i * C;
    const scalar_t* dn = s.grad.data() + i * C;
    const scalar_t s1 = s.dn_means[2 * i], s2 = s.dn_means[2 * i + 1], rstd = s.stats[2 * i + 1];
    scalar_t* out = gd + (p0 + i) * C;
    int64_t c0 = 0;
#if DSCN_HAS_VEC
    for (; c0 + L <= C; c0 += L) {
      VT::store(out + c0, (VT::load(dn + c0) - s1 - VT::load(nr + c0) * s2) * rstd);
    }
#endif
    for (int64_t c = c0; c < C; ++c) out[c] = (dn[c] - s1 - nr[c] * s2) * rstd;
  }
  for (int64_t c = 0; c < C; ++c) {
    gr.ln_w[c] += s.ln_w[c];
    gr.ln_b[c] += s.ln_b[c];
  }
}

DSCN_DEFINE_ISA_DISPATCH(offsets_backward_task)

void check_param(const at::Tensor& t, const char* name, const std::vector<int64_t>& expected, const at::Tensor& input) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), "strip_offsets: ", name, " must have shape ",
                    at::IntArrayRef(expected), "; got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == input.scalar_type(), "strip_offsets: ", name,
                    " dtype must equal input dtype ", dtype_name(input.scalar_type()), "; got ",
                    dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == input.device(), "strip_offsets: ", name, " must be on the input's device ",
                    input.device(), "; got ", t.device());
}

// The checks of a call's arguments (forward and backward); returns its dimensions. The fake kernels
// (ops_dscn/strip_offsets.py) run the same checks with the same messages.
OffsetDims check_args(const at::Tensor& input, const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                      const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                      const at::Tensor& lin_weight, const std::optional<at::Tensor>& lin_bias, bool on_x) {
  TORCH_CHECK_VALUE(input.dim() == 4, "strip_offsets: input must be 4-D (N, C, H, W); got ", input.dim(),
                    "-D with shape ", input.sizes());
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                    "strip_offsets: input dtype must be one of float32, float64; got ",
                    dtype_name(input.scalar_type()));
  TORCH_CHECK_VALUE(dw_weight.dim() == 4, "strip_offsets: dw_weight must be 4-D; got shape ", dw_weight.sizes());
  TORCH_CHECK_VALUE(lin_weight.dim() == 2, "strip_offsets: lin_weight must be 2-D (G * K', C); got shape ",
                    lin_weight.sizes());
  // A kernel along the wrong axis: say so rather than report a shape built from its other side.
  TORCH_CHECK_VALUE((on_x ? dw_weight.size(2) : dw_weight.size(3)) == 1, "strip_offsets: dw_weight must have shape ",
                    on_x ? "[C, 1, 1, K] (a kernel along W, on_x=True)" : "[C, 1, K, 1] (a kernel along H, on_x=False)",
                    "; got ", dw_weight.sizes());
  const int64_t C = input.size(1), K = on_x ? dw_weight.size(3) : dw_weight.size(2);
  TORCH_CHECK_VALUE(K % 2 == 1, "strip_offsets: the depthwise kernel length must be odd ('same' padding); got ", K);
  const OffsetDims d{input.size(0), input.size(2), input.size(3), C, K, lin_weight.size(0), on_x};
  check_param(dw_weight, "dw_weight", on_x ? std::vector<int64_t>{C, 1, 1, K} : std::vector<int64_t>{C, 1, K, 1},
              input);
  if (dw_bias.has_value()) check_param(*dw_bias, "dw_bias", {C}, input);
  check_param(ln_weight, "ln_weight", {C}, input);
  check_param(ln_bias, "ln_bias", {C}, input);
  check_param(lin_weight, "lin_weight", {d.GK, C}, input);
  if (lin_bias.has_value()) check_param(*lin_bias, "lin_bias", {d.GK}, input);
  TORCH_CHECK_VALUE(eps >= 0, "strip_offsets: eps must be >= 0; got ", eps);
  TORCH_CHECK(input.device().is_cpu(), "strip_offsets: input must be a CPU tensor for the CPU kernel; got ",
              input.device());
  return d;
}

// Returns (N, H, W, G * K') contiguous.
at::Tensor strip_offsets_cpu(const at::Tensor& input_, const at::Tensor& dw_weight,
                             const std::optional<at::Tensor>& dw_bias, const at::Tensor& ln_weight,
                             const at::Tensor& ln_bias, double eps, const at::Tensor& lin_weight,
                             const std::optional<at::Tensor>& lin_bias, bool on_x) {
  const OffsetDims d = check_args(input_, dw_weight, dw_bias, ln_weight, ln_bias, eps, lin_weight, lin_bias, on_x);
  const at::Tensor input = input_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor output = at::empty({d.N, d.H, d.W, d.GK}, input.options());
  if (output.numel() == 0) return output;
  const at::TensorOptions opts = input.options().requires_grad(false);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "strip_offsets_cpu", [&] {
    const OffsetWeights<scalar_t> wt(d, dw_weight, dw_bias, ln_weight, ln_bias, eps, lin_weight, lin_bias);
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    const PixelBlocks blocks(d.N * d.H * d.W, kBlockPixels);
    at::parallel_for(0, blocks.count, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> act(blocks.block * d.C), stats(2 * blocks.block);
      for (int64_t b = begin; b < end; ++b) {
        offsets_task<scalar_t>(d, wt, x, y, blocks.begin(b), blocks.end(b), act.data(), stats.data(), opts);
      }
    });
  });
  return output;
}

// Returns the gradients of (the depthwise conv's output (N, C, H, W) in channels_last memory, ln_weight, ln_bias,
// lin_weight, lin_bias); the conv's own input and parameter gradients follow from the first (ops_dscn/
// strip_offsets.py). lin_bias is not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> strip_offsets_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& dw_weight,
    const std::optional<at::Tensor>& dw_bias, const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
    const at::Tensor& lin_weight, bool on_x) {
  const OffsetDims d =
      check_args(input_, dw_weight, dw_bias, ln_weight, ln_bias, eps, lin_weight, std::nullopt, on_x);
  const std::vector<int64_t> out_shape{d.N, d.H, d.W, d.GK};
  TORCH_CHECK_VALUE(grad_output_.sizes() == at::IntArrayRef(out_shape),
                    "strip_offsets backward: grad_output must have shape ", at::IntArrayRef(out_shape), "; got ",
                    grad_output_.sizes());
  check_param(grad_output_, "grad_output", out_shape, input_);
  const at::Tensor input = input_.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad_output = grad_output_.contiguous();
  const at::TensorOptions opts = input.options().requires_grad(false);
  at::Tensor grad_conv = at::empty({d.N, d.H, d.W, d.C}, opts);
  // The forward's blocks: 64-1024 pixels were measured alike (within noise) for DSAN-T's shapes at batch 16.
  const PixelBlocks blocks(d.N * d.H * d.W, kBlockPixels);
  const int64_t slots = parallel_slots_for(blocks.count);
  // One zeroed buffer of parameter gradients per slot of blocks, summed below in slot order (see OffsetGrads and
  // cpu_parallel.h).
  at::Tensor partial = at::zeros({slots, OffsetGrads<float>::size(d)}, opts);
  if (grad_conv.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "strip_offsets_backward_cpu", [&] {
      const OffsetWeights<scalar_t> wt(d, dw_weight, dw_bias, ln_weight, ln_bias, eps, lin_weight, std::nullopt,
                                       /*backward=*/true);
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
      scalar_t* gd = grad_conv.mutable_data_ptr<scalar_t>();
      scalar_t* part = partial.mutable_data_ptr<scalar_t>();
      parallel_over_slots(blocks.count, slots, [&](int64_t slot, int64_t begin, int64_t end) {
        OffsetScratch<scalar_t> scratch(blocks.block, d);
        const OffsetGrads<scalar_t> gr(part + slot * partial.size(1), d);
        for (int64_t b = begin; b < end; ++b) {
          offsets_backward_task<scalar_t>(d, wt, x, g, gd, blocks.begin(b), blocks.end(b), scratch, gr, opts);
        }
      });
    });
  }
  const at::Tensor total = partial.sum(0);
  const int64_t lw = d.GK * d.C;
  return {grad_conv.permute({0, 3, 1, 2}), total.narrow(0, lw + d.GK, d.C).clone(),
          total.narrow(0, lw + d.GK + d.C, d.C).clone(), total.narrow(0, 0, lw).view({d.GK, d.C}).clone(),
          total.narrow(0, lw, d.GK).clone()};
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, CPU, m) {
  m.impl("strip_offsets", &strip_offsets_cpu);
  m.impl("_strip_offsets_backward", &strip_offsets_backward_cpu);
}

}  // namespace ops_dscn
