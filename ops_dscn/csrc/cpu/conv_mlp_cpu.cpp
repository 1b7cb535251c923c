// CPU kernel of ops_dscn::conv_mlp: DSAN's convolutional MLP, fc1 (1x1 conv) -> depthwise 3x3 conv -> exact GELU ->
// fc2 (1x1 conv), optionally plus a residual, in one pass over the image, for inference.
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
// on views of the task's buffers. The depthwise conv and GELU are vector loops over channels.
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
#include <optional>
#include <vector>

#include "../common/dscn_params.h"
#include "cpu_gelu.h"
#include "cpu_simd.h"

namespace ops_dscn {
namespace {

// Hidden rows kept per step are sized so that the ring (step + 2 halo rows) plus the step's activations take about
// this many bytes, which stays in a core's L2 (1-2 MB on current x86 server cores).
constexpr int64_t kStepBytes = 1 << 20;

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
};

// Activations of output row r, columns [0, W): gelu(bias + sum of the 3x3 taps over the hidden rows up / mid /
// down, each (W, Ch); nullptr for a row outside the image, which the conv's zero padding makes 0).
template <int Bytes, typename scalar_t>
DSCN_INLINE void dw_gelu_row(const scalar_t* up, const scalar_t* mid, const scalar_t* down, const scalar_t* wdw,
                             const scalar_t* bdw, scalar_t* out, int64_t W, int64_t Ch) {
  const scalar_t* rows[3] = {up, mid, down};
  // Scalar tap sum of one element, used for the channels the vectors do not cover and the first / last column.
  auto one = [&](int64_t w, int64_t c) DSCN_LAMBDA_INLINE {
    scalar_t acc = bdw[c];
    for (int dy = 0; dy < 3; ++dy) {
      if (rows[dy] == nullptr) continue;
      for (int dx = 0; dx < 3; ++dx) {
        const int64_t ww = w + dx - 1;
        if (ww < 0 || ww >= W) continue;
        acc += rows[dy][ww * Ch + c] * wdw[(dy * 3 + dx) * Ch + c];
      }
    }
    return gelu_scalar(acc);
  };
  int64_t c0 = 0;
#if DSCN_HAS_VEC
  using VT = Vec<scalar_t, Bytes>;
  using V = typename VT::type;
  constexpr int64_t L = VT::size;
  for (; c0 + L <= Ch; c0 += L) {
    // The chunk's 9 tap weights and its bias stay in registers while the loop walks along the row.
    V k[9];
    for (int t = 0; t < 9; ++t) k[t] = VT::load(wdw + t * Ch + c0);
    const V b = VT::load(bdw + c0);
    for (int64_t w = 0; w < W; ++w) {
      V acc = b;
      const bool left = w > 0, right = w + 1 < W;
      for (int dy = 0; dy < 3; ++dy) {
        const scalar_t* r = rows[dy];
        if (r == nullptr) continue;
        r += w * Ch + c0;
        if (left) acc += VT::load(r - Ch) * k[dy * 3];
        acc += VT::load(r) * k[dy * 3 + 1];
        if (right) acc += VT::load(r + Ch) * k[dy * 3 + 2];
      }
      VT::store(out + w * Ch + c0, gelu_vec<scalar_t, Bytes>(acc));
    }
  }
#endif
  for (int64_t c = c0; c < Ch; ++c) {
    for (int64_t w = 0; w < W; ++w) out[w * Ch + c] = one(w, c);
  }
}

// One task: output rows [r0, r1) of image n, in steps of `step` rows.
template <int Bytes, typename scalar_t>
DSCN_INLINE void mlp_task_body(const MlpDims& d, const MlpWeights<scalar_t>& wt, const scalar_t* x,
                               const scalar_t* residual, scalar_t* y, int64_t n, int64_t r0, int64_t r1, int64_t step,
                               const at::TensorOptions& opts) {
  const int64_t hid_row = d.W * d.Ch;  // elements of one hidden row
  std::vector<scalar_t> ring((step + 2) * hid_row), act(step * hid_row);
  int64_t buf_lo = 0, buf_hi = 0;  // the hidden rows [buf_lo, buf_hi) are in `ring`, row buf_lo first
  for (int64_t s0 = r0; s0 < r1; s0 += step) {
    const int64_t s1 = std::min(s0 + step, r1);
    const int64_t need_lo = std::max<int64_t>(s0 - 1, 0), need_hi = std::min(s1 + 1, d.H);
    // The halo rows the previous step already computed move to the front of the ring.
    int64_t have_hi = need_lo;
    if (buf_hi > buf_lo && need_lo >= buf_lo && need_lo < buf_hi) {
      have_hi = std::min(buf_hi, need_hi);
      std::memmove(ring.data(), ring.data() + (need_lo - buf_lo) * hid_row,
                   (have_hi - need_lo) * hid_row * sizeof(scalar_t));
    }
    if (have_hi < need_hi) {  // fc1 for the missing rows: (rows * W, C) @ (C, Ch) + b1
      const int64_t m = (need_hi - have_hi) * d.W;
      const at::Tensor a = at::from_blob(const_cast<scalar_t*>(x) + ((n * d.H + have_hi) * d.W) * d.C, {m, d.C}, opts);
      at::Tensor h = at::from_blob(ring.data() + (have_hi - need_lo) * hid_row, {m, d.Ch}, opts);
      if (wt.b1 != nullptr) {
        at::addmm_out(h, at::from_blob(const_cast<scalar_t*>(wt.b1), {d.Ch}, opts), a, wt.w1t);
      } else {
        at::mm_out(h, a, wt.w1t);
      }
    }
    buf_lo = need_lo;
    buf_hi = need_hi;
    for (int64_t r = s0; r < s1; ++r) {
      const scalar_t* mid = ring.data() + (r - need_lo) * hid_row;
      dw_gelu_row<Bytes>(r > 0 ? mid - hid_row : nullptr, mid, r + 1 < d.H ? mid + hid_row : nullptr, wt.wdw.data(),
                         wt.bdw.data(), act.data() + (r - s0) * hid_row, d.W, d.Ch);
    }
    // fc2: (rows * W, Ch) @ (Ch, Co), then + b2 (+ residual) in the same, cache-hot, output rows.
    const int64_t m = (s1 - s0) * d.W;
    const int64_t first = (n * d.H + s0) * d.W * d.Co;
    at::Tensor out = at::from_blob(y + first, {m, d.Co}, opts);
    at::mm_out(out, at::from_blob(act.data(), {m, d.Ch}, opts), wt.w2t);
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

// Returns (N, Co, H, W) in channels_last memory. The Python wrapper (ops_dscn/conv_mlp.py) and the fake kernel run
// the same checks with the same messages.
at::Tensor conv_mlp_cpu(const at::Tensor& input_, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                        const at::Tensor& dw_weight, const std::optional<at::Tensor>& dw_bias,
                        const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                        const std::optional<at::Tensor>& residual_) {
  TORCH_CHECK_VALUE(input_.dim() == 4, "conv_mlp: input must be 4-D (N, C, H, W); got ", input_.dim(),
                    "-D with shape ", input_.sizes());
  TORCH_CHECK_VALUE(input_.scalar_type() == at::kFloat || input_.scalar_type() == at::kDouble,
                    "conv_mlp: input dtype must be one of float32, float64; got ", dtype_name(input_.scalar_type()));
  TORCH_CHECK_VALUE(fc1_weight.dim() == 4, "conv_mlp: fc1_weight must be 4-D (hidden, C, 1, 1); got shape ",
                    fc1_weight.sizes());
  TORCH_CHECK_VALUE(fc2_weight.dim() == 4, "conv_mlp: fc2_weight must be 4-D (C_out, hidden, 1, 1); got shape ",
                    fc2_weight.sizes());
  const MlpDims d{input_.size(0), input_.size(2), input_.size(3), input_.size(1), fc1_weight.size(0),
                  fc2_weight.size(0)};
  check_weight(fc1_weight, "fc1_weight", {d.Ch, d.C, 1, 1}, input_);
  check_weight(dw_weight, "dw_weight", {d.Ch, 1, 3, 3}, input_);
  check_weight(fc2_weight, "fc2_weight", {d.Co, d.Ch, 1, 1}, input_);
  check_bias(fc1_bias, "fc1_bias", d.Ch, input_);
  check_bias(dw_bias, "dw_bias", d.Ch, input_);
  check_bias(fc2_bias, "fc2_bias", d.Co, input_);
  if (residual_.has_value()) {
    const std::vector<int64_t> expected{d.N, d.Co, d.H, d.W};
    TORCH_CHECK_VALUE(residual_->sizes() == at::IntArrayRef(expected), "conv_mlp: residual must have shape ",
                      at::IntArrayRef(expected), "; got ", residual_->sizes());
    TORCH_CHECK_VALUE(residual_->scalar_type() == input_.scalar_type(),
                      "conv_mlp: residual dtype must equal input dtype ", dtype_name(input_.scalar_type()), "; got ",
                      dtype_name(residual_->scalar_type()));
    TORCH_CHECK_VALUE(residual_->device() == input_.device(), "conv_mlp: residual must be on the input's device ",
                      input_.device(), "; got ", residual_->device());
  }
  TORCH_CHECK(input_.device().is_cpu(), "conv_mlp: input must be a CPU tensor for the CPU kernel; got ",
              input_.device());
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor input = input_.contiguous(cl);
  at::Tensor output = at::empty({d.N, d.Co, d.H, d.W}, input.options().memory_format(cl));
  if (output.numel() == 0) return output;
  const at::Tensor residual = residual_.has_value() ? residual_->contiguous(cl) : at::Tensor();
  // Plain (no autograd history) views, so the BLAS calls from the worker threads see ordinary tensors.
  const at::TensorOptions opts = input.options().requires_grad(false);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_mlp_cpu", [&] {
    MlpWeights<scalar_t> wt;
    const at::Tensor w1 = fc1_weight.detach().reshape({d.Ch, d.C}).contiguous();
    const at::Tensor w2 = fc2_weight.detach().reshape({d.Co, d.Ch}).contiguous();
    wt.w1t = w1.t();
    wt.w2t = w2.t();
    const at::Tensor b1 = fc1_bias.has_value() ? fc1_bias->detach().contiguous() : at::Tensor();
    wt.b1 = b1.defined() ? b1.const_data_ptr<scalar_t>() : nullptr;
    const at::Tensor wdw = dw_weight.detach().reshape({d.Ch, 9}).t().contiguous();
    wt.wdw.assign(wdw.const_data_ptr<scalar_t>(), wdw.const_data_ptr<scalar_t>() + 9 * d.Ch);
    wt.bdw.assign(d.Ch, scalar_t(0));
    if (dw_bias.has_value()) {
      const at::Tensor b = dw_bias->detach().contiguous();
      std::copy_n(b.const_data_ptr<scalar_t>(), d.Ch, wt.bdw.begin());
    }
    wt.b2.assign(d.Co, scalar_t(0));
    if (fc2_bias.has_value()) {
      const at::Tensor b = fc2_bias->detach().contiguous();
      std::copy_n(b.const_data_ptr<scalar_t>(), d.Co, wt.b2.begin());
    }
    // Rows per step: the ring (step + 2 rows) and the activations (step rows) in about kStepBytes.
    const int64_t row_bytes = d.W * d.Ch * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t step_cap = std::max<int64_t>(1, (kStepBytes / row_bytes - 2) / 2);
    // Images are split into bands of rows only when there are fewer images than threads (each band recomputes one
    // halo row of fc1 at each of its ends).
    const int64_t threads = at::get_num_threads();
    const int64_t bands = d.N >= threads ? 1 : std::min<int64_t>(d.H, (threads + d.N - 1) / d.N);
    const int64_t band_h = (d.H + bands - 1) / bands;
    const int64_t step = std::min(step_cap, band_h);
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* res = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, d.N * bands, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / bands, r0 = (t % bands) * band_h, r1 = std::min(d.H, r0 + band_h);
        if (r0 < r1) mlp_task<scalar_t>(d, wt, x, res, y, n, r0, r1, step, opts);
      }
    });
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(ops_dscn, CPU, m) {
  m.impl("conv_mlp", &conv_mlp_cpu);
}

}  // namespace ops_dscn
