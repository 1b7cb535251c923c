// CPU kernel of ops_dscn::strip_offsets: the offset branch of a DSCN layer (DSCNX / DSCNY) in one pass, for
// inference: depthwise 1xK (x-strip) or Kx1 (y-strip) conv with zero 'same' padding -> LayerNorm over channels ->
// exact GELU -> Linear(C -> G * K').
//
// Why: run as separate operators, the branch makes four passes over a (N, H, W, C) tensor for an output of only
// G * K' values per pixel, and the LayerNorm over few (32-64) channels costs more in its own pass than the
// arithmetic does. Here a task takes a block of pixels: per pixel, the conv, the norm and GELU are vector loops
// over its channels held in L1; the block's (pixels, C) activations then go through the Linear as one matrix
// product (ATen's BLAS) straight into the output.
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
#include <vector>

#include "../common/dscn_params.h"
#include "cpu_gelu.h"
#include "cpu_simd.h"

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
  const scalar_t* ln_w;       // (C,)
  const scalar_t* ln_b;       // (C,)
  double eps;
  at::Tensor lin_wt;          // (C, GK) view of the Linear's weight
  const scalar_t* lin_b;      // (GK,) or nullptr
};

// Output pixels [p0, p1) (flattened (n, h, w)): their activations into `act` ((p1 - p0, C)), then the Linear.
template <int Bytes, typename scalar_t>
DSCN_INLINE void offsets_task_body(const OffsetDims& d, const OffsetWeights<scalar_t>& wt, const scalar_t* x,
                                   scalar_t* out, int64_t p0, int64_t p1, scalar_t* act,
                                   const at::TensorOptions& opts) {
  using acc_t = scalar_t;
  const int64_t C = d.C, pad = (d.K - 1) / 2;
  const scalar_t* wdw = wt.wdw.data();
  const scalar_t* bdw = wt.bdw.data();
  // Taps read along W (x-strip) or H (y-strip): the element stride of one step along that axis.
  const int64_t axis_len = d.on_x ? d.W : d.H;
  const int64_t step = d.on_x ? C : d.W * C;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t w = p % d.W, h = (p / d.W) % d.H;
    const int64_t pos = d.on_x ? w : h;
    // Valid taps t in [t0, t1): the neighbour pos + t - pad lies inside the axis.
    const int64_t t0 = std::max<int64_t>(0, pad - pos), t1 = std::min<int64_t>(d.K, axis_len + pad - pos);
    const scalar_t* centre = x + p * C;
    scalar_t* a = act + (p - p0) * C;
    int64_t c0 = 0;
#if DSCN_HAS_VEC
    using VT = Vec<scalar_t, Bytes>;
    using V = typename VT::type;
    constexpr int64_t L = VT::size;
    V vsum = V{};
    for (; c0 + L <= C; c0 += L) {
      V acc = VT::load(bdw + c0);
      for (int64_t t = t0; t < t1; ++t) acc += VT::load(centre + (t - pad) * step + c0) * VT::load(wdw + t * C + c0);
      VT::store(a + c0, acc);
      vsum += acc;
    }
    acc_t sum = 0;
    sum += hsum<scalar_t, Bytes>(vsum);  // a tree: lane by lane was a chain of L dependent adds per pixel
#else
    acc_t sum = 0;
#endif
    for (int64_t c = c0; c < C; ++c) {
      acc_t acc = bdw[c];
      for (int64_t t = t0; t < t1; ++t) acc += centre[(t - pad) * step + c] * wdw[t * C + c];
      a[c] = acc;
      sum += acc;
    }
    const acc_t mean = sum / static_cast<acc_t>(C);
    acc_t sq = 0;
    c0 = 0;
#if DSCN_HAS_VEC
    {
      V vsq = V{};
      for (; c0 + L <= C; c0 += L) {
        const V dev = VT::load(a + c0) - mean;
        vsq += dev * dev;
      }
      sq += hsum<scalar_t, Bytes>(vsq);
    }
#endif
    for (int64_t c = c0; c < C; ++c) sq += (a[c] - mean) * (a[c] - mean);
    const acc_t rstd = static_cast<acc_t>(1) / std::sqrt(sq / static_cast<acc_t>(C) + static_cast<acc_t>(wt.eps));
    c0 = 0;
#if DSCN_HAS_VEC
    for (; c0 + L <= C; c0 += L) {
      const V v = (VT::load(a + c0) - mean) * rstd * VT::load(wt.ln_w + c0) + VT::load(wt.ln_b + c0);
      VT::store(a + c0, gelu_vec<scalar_t, Bytes>(v));
    }
#endif
    for (int64_t c = c0; c < C; ++c) a[c] = gelu_scalar<scalar_t>((a[c] - mean) * rstd * wt.ln_w[c] + wt.ln_b[c]);
  }
  const int64_t m = p1 - p0;
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

void check_param(const at::Tensor& t, const char* name, const std::vector<int64_t>& expected, const at::Tensor& input) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), "strip_offsets: ", name, " must have shape ",
                    at::IntArrayRef(expected), "; got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == input.scalar_type(), "strip_offsets: ", name,
                    " dtype must equal input dtype ", dtype_name(input.scalar_type()), "; got ",
                    dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == input.device(), "strip_offsets: ", name, " must be on the input's device ",
                    input.device(), "; got ", t.device());
}

// Returns (N, H, W, G * K') contiguous. The fake kernel (ops_dscn/strip_offsets.py) runs the same checks with the
// same messages.
at::Tensor strip_offsets_cpu(const at::Tensor& input_, const at::Tensor& dw_weight,
                             const std::optional<at::Tensor>& dw_bias, const at::Tensor& ln_weight,
                             const at::Tensor& ln_bias, double eps, const at::Tensor& lin_weight,
                             const std::optional<at::Tensor>& lin_bias, bool on_x) {
  TORCH_CHECK_VALUE(input_.dim() == 4, "strip_offsets: input must be 4-D (N, C, H, W); got ", input_.dim(),
                    "-D with shape ", input_.sizes());
  TORCH_CHECK_VALUE(input_.scalar_type() == at::kFloat || input_.scalar_type() == at::kDouble,
                    "strip_offsets: input dtype must be one of float32, float64; got ",
                    dtype_name(input_.scalar_type()));
  TORCH_CHECK_VALUE(dw_weight.dim() == 4, "strip_offsets: dw_weight must be 4-D; got shape ", dw_weight.sizes());
  TORCH_CHECK_VALUE(lin_weight.dim() == 2, "strip_offsets: lin_weight must be 2-D (G * K', C); got shape ",
                    lin_weight.sizes());
  const int64_t C = input_.size(1), K = on_x ? dw_weight.size(3) : dw_weight.size(2);
  TORCH_CHECK_VALUE(K % 2 == 1, "strip_offsets: the depthwise kernel length must be odd ('same' padding); got ", K);
  const OffsetDims d{input_.size(0), input_.size(2), input_.size(3), C, K, lin_weight.size(0), on_x};
  check_param(dw_weight, "dw_weight", on_x ? std::vector<int64_t>{C, 1, 1, K} : std::vector<int64_t>{C, 1, K, 1},
              input_);
  if (dw_bias.has_value()) check_param(*dw_bias, "dw_bias", {C}, input_);
  check_param(ln_weight, "ln_weight", {C}, input_);
  check_param(ln_bias, "ln_bias", {C}, input_);
  check_param(lin_weight, "lin_weight", {d.GK, C}, input_);
  if (lin_bias.has_value()) check_param(*lin_bias, "lin_bias", {d.GK}, input_);
  TORCH_CHECK_VALUE(eps >= 0, "strip_offsets: eps must be >= 0; got ", eps);
  TORCH_CHECK(input_.device().is_cpu(), "strip_offsets: input must be a CPU tensor for the CPU kernel; got ",
              input_.device());
  const at::Tensor input = input_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor output = at::empty({d.N, d.H, d.W, d.GK}, input.options());
  if (output.numel() == 0) return output;
  const at::TensorOptions opts = input.options().requires_grad(false);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "strip_offsets_cpu", [&] {
    OffsetWeights<scalar_t> wt;
    const at::Tensor wdw = dw_weight.detach().reshape({C, K}).t().contiguous();
    wt.wdw.assign(wdw.const_data_ptr<scalar_t>(), wdw.const_data_ptr<scalar_t>() + K * C);
    wt.bdw.assign(C, scalar_t(0));
    if (dw_bias.has_value()) {
      const at::Tensor b = dw_bias->detach().contiguous();
      std::copy_n(b.const_data_ptr<scalar_t>(), C, wt.bdw.begin());
    }
    const at::Tensor lnw = ln_weight.detach().contiguous(), lnb = ln_bias.detach().contiguous();
    wt.ln_w = lnw.const_data_ptr<scalar_t>();
    wt.ln_b = lnb.const_data_ptr<scalar_t>();
    wt.eps = eps;
    const at::Tensor lw = lin_weight.detach().contiguous();
    wt.lin_wt = lw.t();
    const at::Tensor lb = lin_bias.has_value() ? lin_bias->detach().contiguous() : at::Tensor();
    wt.lin_b = lb.defined() ? lb.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    const int64_t pixels = d.N * d.H * d.W;
    // A multiple of the thread count of equal blocks of at most kBlockPixels: in 256-pixel blocks one image of
    // DSAN's 14x14 or 7x7 stages was one block, which left the other threads idle at batch 1 (and a 28x28 image
    // four blocks, the last of 16 pixels).
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t rounds = (pixels + threads * kBlockPixels - 1) / (threads * kBlockPixels);
    const int64_t block = std::max<int64_t>(1, (pixels + threads * rounds - 1) / (threads * rounds));
    const int64_t blocks = (pixels + block - 1) / block;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> act(block * C);
      for (int64_t b = begin; b < end; ++b) {
        offsets_task<scalar_t>(d, wt, x, y, b * block, std::min(pixels, (b + 1) * block), act.data(), opts);
      }
    });
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, CPU, m) {
  m.impl("strip_offsets", &strip_offsets_cpu);
}

}  // namespace ops_dscn
